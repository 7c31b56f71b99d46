// /etc/hosts and /etc/resolv.conf text as a fixed upstream's host name is looked up with it: the first byte
// picks the reader (even: hosts_records, odd: read_search_list and then search_names for a host name taken
// from the text). Every hosts record is "name A|AAAA address" with a name of letters, digits, '-', '_' and
// '.' (1 to 253 bytes; labels of 1 to 63, one final dot at most) and an address in its canonical spelling
// that a line of the file has, whole, as its first field, with the name among that line's other fields (a
// line ends at a NUL byte, as glibc reads it). A search list has at most max_search_domains names, none
// empty, longer than 253 bytes, with an empty label (a final dot) or a NUL byte (libunbound takes names as C
// strings), each a field of the text; ndots is 0 to 15. search_names asks the name as written exactly once,
// first or last, and every other name is the name, a dot and a search domain. read_name_servers (odd too)
// gives at most max_name_servers addresses, each in its canonical spelling, an IPv6 one with a plain zone.
#include <arpa/inet.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "proto/hosts_file.hpp"

namespace {

std::vector<std::string_view> split(std::string_view text, std::string_view separators) {
  std::vector<std::string_view> out;
  for (std::size_t at = 0; at < text.size();) {
    at = text.find_first_not_of(separators, at);
    if (at == std::string_view::npos) break;
    const std::size_t stop = std::min(text.find_first_of(separators, at), text.size());
    out.push_back(text.substr(at, stop - at));
    at = stop;
  }
  return out;
}

// `text` as an address of `family` when the whole of it is one, in its canonical spelling; "" else.
std::string canonical(std::string_view text, int family) {
  if (text.find('\0') != std::string_view::npos) return "";
  unsigned char bin[16];
  char buf[INET6_ADDRSTRLEN];
  if (inet_pton(family, std::string(text).c_str(), bin) != 1) return "";
  if (inet_ntop(family, bin, buf, sizeof buf) == nullptr) return "";
  return buf;
}

bool host_byte(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
         c == '.';
}

void check_hosts(std::string_view text) {
  const auto records = mailflow::proto::hosts_records(text);
  const auto lines = split(text, "\n");
  for (const std::string& record : records) {
    const auto parts = split(record, " ");
    FUZZ_CHECK(parts.size() == 3);
    const std::string_view name = parts[0];
    FUZZ_CHECK(!name.empty() && name.size() <= 253 && std::all_of(name.begin(), name.end(), host_byte));
    // A DNS name, which libunbound takes as local data: labels of 1 to 63 bytes, one final dot at most.
    const std::string_view labels = name.ends_with('.') ? name.substr(0, name.size() - 1) : name;
    for (std::size_t at = 0; at <= labels.size();) {
      const std::size_t dot = std::min(labels.find('.', at), labels.size());
      FUZZ_CHECK(dot > at && dot - at <= 63);
      at = dot + 1;
    }
    FUZZ_CHECK(parts[1] == "A" || parts[1] == "AAAA");
    const int family = parts[1] == "A" ? AF_INET : AF_INET6;
    FUZZ_CHECK(canonical(parts[2], family) == parts[2]);
    const bool from_a_line = std::any_of(lines.begin(), lines.end(), [&](std::string_view line) {
      line = line.substr(0, line.find('\0'));
      const auto fields = split(line.substr(0, line.find('#')), " \t\r\f\v");
      return fields.size() >= 2 && canonical(fields[0], family) == parts[2] &&
             std::find(fields.begin() + 1, fields.end(), name) != fields.end();
    });
    FUZZ_CHECK(from_a_line);
  }
}

void check_search(std::string_view text, std::string_view host) {
  std::vector<std::string> search{"left.over"};
  int ndots = -1;
  mailflow::proto::read_search_list(text, search, ndots);
  FUZZ_CHECK(search.size() <= mailflow::proto::max_search_domains);
  FUZZ_CHECK(ndots >= 0 && ndots <= 15);
  for (const std::string& domain : search) {
    FUZZ_CHECK(!domain.empty() && domain.size() <= 253);
    FUZZ_CHECK(!domain.starts_with('.') && !domain.ends_with('.') && domain.find("..") == std::string::npos);
    FUZZ_CHECK(domain.find('\0') == std::string::npos);
    FUZZ_CHECK(text.find(domain) != std::string_view::npos);
  }
  // At most max_name_servers, each an address in its canonical spelling (an IPv6 one with a zone of letters,
  // digits, '-', '_' and '.' at most): what libunbound's ub_ctx_set_fwd takes.
  const auto servers = mailflow::proto::read_name_servers(text);
  FUZZ_CHECK(servers.size() <= mailflow::proto::max_name_servers);
  for (const std::string& server : servers) {
    const auto zone = server.find('%');
    const std::string address = server.substr(0, zone);
    FUZZ_CHECK(canonical(address, AF_INET) == address || canonical(address, AF_INET6) == address);
    if (zone != std::string::npos) {
      FUZZ_CHECK(address.find(':') != std::string::npos && zone + 1 < server.size());
      FUZZ_CHECK(
          std::all_of(server.begin() + static_cast<std::ptrdiff_t>(zone) + 1, server.end(), host_byte));
    }
  }
  const std::vector<std::string> hosts;
  const std::string name(host);
  const auto names = mailflow::proto::search_names(name, search, ndots, hosts);
  FUZZ_CHECK(!names.empty());
  FUZZ_CHECK(std::count(names.begin(), names.end(), name) == 1);
  FUZZ_CHECK(names.front() == name || names.back() == name);
  if (name.ends_with('.') || search.empty()) {
    FUZZ_CHECK(names.size() == 1);
    return;
  }
  FUZZ_CHECK(names.size() == search.size() + 1);
  const auto dots = std::count(name.begin(), name.end(), '.');
  FUZZ_CHECK((names.front() == name) == (dots >= ndots));
  std::size_t next = names.front() == name ? 1 : 0;
  for (const std::string& domain : search) FUZZ_CHECK(names[next++] == name + "." + domain);
  // A host name the hosts file has is asked only as written, whatever its case.
  std::string upper = name;
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c; });
  const std::vector<std::string> listed{upper + " A 192.0.2.1"};
  FUZZ_CHECK(mailflow::proto::search_names(name, search, ndots, listed) == std::vector<std::string>{name});
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    check_hosts(text);
  } else {
    // The host name: the text's last line (a fixed upstream's host as configured), the rest is resolv.conf.
    const auto last = text.rfind('\n');
    const std::string_view host = last == std::string_view::npos ? text : text.substr(last + 1);
    check_search(last == std::string_view::npos ? std::string_view() : text.substr(0, last), host);
  }
  return 0;
}
