#pragma once
// /etc/hosts and /etc/resolv.conf text as a fixed upstream's host name is looked up with it, without I/O:
// daemon/resolver reads the files (with_hosts_file) and gives the records to libunbound as local data; the
// parsing is here, where the fuzz targets reach it.
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto {

// Each line of either file ends at its first NUL byte, as glibc reads it (a C string).
//
// hosts(5) text as local data records, in its order: "name A address" / "name AAAA address". A line whose
// first field is no IP address (or one with a zone, fe80::1%lo0), and a name with bytes other than letters,
// digits, '-', '_' and '.', longer than 253, or with an empty label or one longer than 63 (no DNS name, which
// libunbound would refuse), are skipped.
std::vector<std::string> hosts_records(std::string_view text);
// resolv.conf(5) text's search list ("search", or "domain" and its first name: the last such line wins; at
// most max_search_domains names) and ndots ("options ndots:N", 1 unless said, at most 15, N as atoi reads
// it), as glibc reads them: a keyword only at the start of a line, a comment only a line that starts with '#'
// or ';' (behind a setting they are words of it), words separated by blanks and tabs only (the CR of a CRLF
// line end stays in the last word), a search line without a name ignored; a search domain with an empty label
// (a..b, .a, a..) or a control byte (that CR) is left out: glibc asks names under it that no zone has.
// glibc 2.26 and later read any number (Debian 12: 2.36); Kubernetes allows a pod 32, the bound kept here.
inline constexpr std::size_t max_search_domains = 32;
void read_search_list(std::string_view text, std::vector<std::string>& search, int& ndots);
// resolv.conf(5) text's name servers as glibc's res_init takes them, for libunbound (ub_ctx_set_fwd): a line
// that starts with "nameserver" and a blank, its next word (up to a blank or tab) an IPv4 address as
// inet_aton reads it ("10.1" is 10.0.0.1) or an IPv6 address, with a zone ("fe80::1%eth0") kept; the rest of
// the line ignored; a line whose word is no address ("nameserver", "nameserver localhost",
// "nameserver 10.0.0.1\r" of a CRLF line end) skipped; at most max_name_servers (glibc's MAXNS), in the
// file's order, the address as inet_ntop writes it. Empty: the file names none (glibc then asks 127.0.0.1, as
// libunbound does).
inline constexpr std::size_t max_name_servers = 3;
std::vector<std::string> read_name_servers(std::string_view text);
// The names `host` is looked up under, in turn until one has addresses, as glibc's getaddrinfo does with
// /etc/resolv.conf (res_search): with fewer dots than `ndots` the `search` domains first, then the name as
// written; else the name first. A name with the root's final dot, or one `hosts_records` has (any case), only
// as written (the files service sees no search list).
std::vector<std::string> search_names(const std::string& host, const std::vector<std::string>& search,
                                      int ndots, const std::vector<std::string>& hosts_records);

}  // namespace mailflow::proto
