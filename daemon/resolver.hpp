#pragma once
// DNS for delivery to MX hosts (upstreams[].mx) and for fixed upstreams' host names (with /etc/hosts first,
// with_hosts_file()): MX and address lookups through libunbound, a validating, caching resolver library,
// driven by the Asio event loop that asks. <unbound.h> stays inside resolver.cpp.
//
// Thread model: one Resolver per event loop, created on it and used only from its thread. libunbound does
// the network I/O in a worker thread of its own (ub_ctx_async(ctx, 1)) and hands answers back through a pipe
// (ub_fd); the loop waits for that pipe to become readable and calls ub_process there, which runs the
// answers' callbacks on the loop thread. No lock is needed on this side, and a lookup never blocks the loop.
// (One ub_ctx shared by several loops would need a lock around ub_process and a way to hand each answer to
// the loop that asked; one per loop costs one cache per loop, which is small next to a session's buffers.)
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <array>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/address.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "daemon/dns_vocabulary.hpp"
#include "proto/dane.hpp"
#include "proto/mx_plan.hpp"

namespace mailflow {

class Telemetry;

struct MxResult {
  enum class Status {
    hosts,     // plan.hosts in the order to try (plan.kind: mx, or implicit = the domain itself)
    null_mx,   // RFC 7505: the domain accepts no mail (556 5.1.10)
    nxdomain,  // the domain does not exist (550 5.1.2)
    failed,    // temporary DNS failure (451 4.4.3); see outcome and detail
  };
  Status status = Status::failed;
  proto::MxPlan plan;
  DnsOutcome outcome = DnsOutcome::error;  // of the MX query
  bool secure = false;                     // the MX answer was DNSSEC-validated (needs dns.trust_anchor_file)
  std::string detail;                      // failed: why, for logs and reply texts
};
std::string_view to_string(MxResult::Status status);  // "hosts", "null_mx", "nxdomain", "failed"

struct AddressResult {
  enum class Status {
    addresses,  // at least one address
    none,       // the name has neither AAAA nor A (nodata or nxdomain on both)
    failed,     // no address, and at least one of the two lookups failed temporarily
  };
  Status status = Status::failed;
  // IPv6 and IPv4 alternating, IPv6 first (proto::interleave_families); DNS order within a family.
  std::vector<boost::asio::ip::address> addresses;
  DnsOutcome aaaa = DnsOutcome::error;
  DnsOutcome a = DnsOutcome::error;
  // Every answer that came DNSSEC-validated (every CNAME on the way included); a failed lookup (bogus,
  // timeout) is not used and does not count as insecure.
  bool secure = false;
  // The name's CNAME expansion, where it is an alias: the owner of the addresses (libunbound's canonname, without
  // the final dot); "" when the name is no alias. DANE looks for TLSA records there first (RFC 7672 2.2.3).
  std::string canonical;
  std::string detail;  // failed: the failed lookup's reason; none: both answers ("AAAA nxdomain, A nxdomain")

  // Failed because this process could not make a socket for a lookup (DnsOutcome::local_resources): nothing
  // is known about the name.
  bool local_failure() const {
    return status == Status::failed &&
           (aaaa == DnsOutcome::local_resources || a == DnsOutcome::local_resources);
  }
};
std::string_view to_string(AddressResult::Status status);  // "addresses", "none", "failed"

// The TLSA records of a name (_PORT._tcp.HOST, RFC 6698 / RFC 7672).
struct TlsaResult {
  proto::TlsaAnswer answer;  // records / none / failed, the DNSSEC status, the records
  DnsOutcome outcome = DnsOutcome::error;
  std::string detail;
};

struct PtrResult {
  DnsOutcome outcome = DnsOutcome::error;  // of the PTR query
  std::vector<std::string> names;           // without the final dot, DNS order
  std::string detail;
};

// "7.113.0.203.in-addr.arpa" / nibbles + ".ip6.arpa" (RFC 1035 3.5, RFC 3596 2.5).
std::string reverse_name(const boost::asio::ip::address& address);
// TXT records of a name (MTA-STS's _mta-sts.<domain>, TLS-RPT's _smtp._tls.<domain>).
struct TxtResult {
  DnsOutcome outcome = DnsOutcome::error;  // success: at least one record; nodata/nxdomain: none
  // One string per record: its character-strings concatenated without separators (as RFC 7208 3.3 does for
  // SPF, and as RFC 8461 3.1 and RFC 8460 3 expect), in DNS order. Bytes as received (may be binary).
  std::vector<std::string> records;
  bool secure = false;  // DNSSEC-validated (needs dns.trust_anchor_file)
  std::string detail;   // temporary failures: why
};

// The character-strings of one TXT rdata (RFC 1035 3.3.14) joined; nullopt when a length runs past the end.
std::optional<std::string> join_txt_rdata(std::string_view rdata);

// The dns settings as a start or a reload takes them: dns.trust_anchor_file is read here, once, and every
// Resolver made from these settings is given what was read, so that a file changed afterwards applies at the
// next reload, not at some event loop's first lookup (each makes its resolver then).
struct ResolverSettings {
  config::Dns dns;
  std::vector<std::string> trust_anchors;  // proto::trust_anchor_records of the file as read
  std::string problem;  // a file could not be read or split: why (a Resolver made from these throws it)
  // Without dns.servers: resolv.conf's name servers as read then (proto::read_name_servers), given to every
  // Resolver made from these settings; empty: 127.0.0.1.
  std::vector<std::string> name_servers;
  // The settings, the trust anchor file's content and, without dns.servers, resolv.conf's name servers: a
  // resolver made for another key is replaced.
  std::string key;
  // Which start or reload made these (Runtime::build counts them; 0 elsewhere): an event loop's resolver
  // follows the newest settings, also for sessions that began before the reload (loop_resolver).
  std::uint64_t generation = 0;
  // "": DNS only. Else a hosts file (hosts(5)) whose names are answered from it before DNS is asked, as
  // getaddrinfo's "files dns" does: for fixed upstreams' host names (with_hosts_file()). Its entries as read
  // then, as libunbound local data ("mail.example.org A 192.0.2.25"), in the file's order.
  std::string hosts_file;
  std::vector<std::string> hosts_records;
  // The names whose records were kept (proto::dns_name_key, sorted): the fixed upstreams' host names of the
  // configuration these were made for, and what the search list makes of them. No other name is answered
  // from the file (loop_resolver: a session from before a reload that renamed its upstream).
  std::vector<std::string> hosts_names;
  // With a hosts file only: resolv.conf's search list and ndots, as getaddrinfo applies them
  // (proto::search_names()).
  std::vector<std::string> search;
  int ndots = 1;
  // With a hosts file, for at least one host name: resolv.conf exists and could not be read, so there is no
  // search list: why (else ""). Without dns.servers such a file is `problem` instead.
  std::string search_problem;
};
// Where the name servers come from without dns.servers (and the search list, with_hosts_file's caller).
inline constexpr const char* resolv_conf_path = "/etc/resolv.conf";
ResolverSettings resolver_settings(const config::Dns& dns);
// `settings` for a fixed upstream's host name: `hosts_file`'s names first, then DNS as `settings` say. The
// file is read here, once (start, reload), as the trust anchor file is, and its entries are part of the key,
// so a reload after it changed makes new resolvers and a change without one is used by none. A file that
// does not exist leaves DNS alone (as glibc's files service does); one that exists and cannot be read (a
// directory in its place, permissions, EIO) too, and `problem` says why (else ""): glibc's lookups pass it
// over as silently, and the administrator would not know that its names are asked of DNS. A line whose first
// field is no IP address, and a name with bytes other than letters, digits, '-', '_' and '.' or that is no
// DNS name (an empty label), are skipped (glibc skips the first too). `resolv_conf`'s search list and ndots
// are read here as well (proto::search_names()). Only the records of `names` (fixed upstreams' host names as
// written) are kept (hosts_names), matched whole in any case (a final dot is part of the name), as getaddrinfo asks the
// files service for the name as written and nothing else: the names the search list makes are DNS's. Each
// event loop's context took every record of the file as local data, on the loop's thread: a hosts file of
// 100,000 lines (an ad-blocking list) held a loop ~7 s at its first lookup after each start and reload and
// cost ~70 MB per loop.
ResolverSettings with_hosts_file(ResolverSettings settings, const std::string& hosts_file,
                                 const std::string& resolv_conf, const std::vector<std::string>& names,
                                 std::string& problem);

// The settings for fixed upstreams' host names, as a start or a reload makes them (Runtime::build) and
// `mailflowd route` shows them: `dns` with hosts_file_path's names first and resolv.conf's search list
// (with_hosts_file), for the host names of `config`'s fixed upstreams. Where libunbound still cannot take the
// file, `dns` itself, and `problem` says why (else ""); where the file cannot be read, the settings without
// its names, and `problem` says why.
inline constexpr const char* hosts_file_path = "/etc/hosts";
ResolverSettings fixed_upstream_settings(const ResolverSettings& dns, const config::Config& config,
                                         std::string& problem);

// "" when libunbound takes these settings (dns.servers, the trust anchor), else why not: it checks them only
// when a resolver is made, so start, reload and --check-config make one to find out.
std::string dns_settings_problem(const ResolverSettings& settings);

class Resolver {
 public:
  // Applies `dns`: forwarders (dns.servers) or /etc/resolv.conf, the trust anchor, the timeout. Throws
  // std::runtime_error with libunbound's reason when it refuses a setting. `telemetry` may be null (counts
  // nothing); every lookup is counted in mailflow_dns_lookups_total{type,result} otherwise.
  // `seed`: the shuffle of equal MX preferences; 0 = a random one.
  Resolver(boost::asio::any_io_executor executor, const ResolverSettings& settings, Telemetry* telemetry,
           std::uint64_t seed = 0);
  ~Resolver();
  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;

  // The MX hosts of `domain` in the order to try (RFC 5321 5.1, RFC 7505), within dns.timeout.
  boost::asio::awaitable<MxResult> resolve_mx(std::string domain);
  // AAAA and A of `host`, both queried at once, each within dns.timeout.
  boost::asio::awaitable<AddressResult> resolve_addresses(std::string host);
  // The same for several hosts, every query at once (one result per host, in order): dns.timeout bounds them
  // all together, not each in turn.
  boost::asio::awaitable<std::vector<AddressResult>> resolve_addresses(std::vector<std::string> hosts);
  // TLSA records of `name`, within dns.timeout; malformed records are left out.
  boost::asio::awaitable<TlsaResult> resolve_tlsa(std::string name);
  // PTR of `address`, within dns.timeout (counted as DnsType::ptr).
  boost::asio::awaitable<PtrResult> resolve_ptr(boost::asio::ip::address address);
  // The forward-confirmed reverse name (FCrDNS): the first PTR name whose A/AAAA contain `address`; "" when
  // there is none. `failed` is set when a lookup failed temporarily (worth trying again sooner).
  boost::asio::awaitable<std::string> verified_name(boost::asio::ip::address address, bool& failed);
  // TXT of `name`, within dns.timeout; counted as mailflow_dns_lookups_total{type="TXT"}.
  boost::asio::awaitable<TxtResult> resolve_txt(std::string name);

  // A Resolver for one user (a session) on `shared`'s context, cache and event loop, which it keeps alive:
  // its lookups can be given up with cancel() without touching anyone else's.
  static std::shared_ptr<Resolver> share(std::shared_ptr<Resolver> shared);
  // Gives up this Resolver's lookups at once, those in flight and every later one: each ends as a failure
  // (DnsOutcome::error, detail "cancelled") without waiting for an answer, and is not counted. For a session
  // that was closed (drain timeout, shutdown): its lookups must not hold it open, nor lead it on to connect.
  void cancel();
  // A lookup on this context could not be sent (DnsOutcome::local_resources). libunbound keeps the SERVFAIL
  // it answered in its cache for a while, and would give it for the same name once descriptors are back, as
  // though the name's servers had failed: such a context is replaced (loop_resolver) rather than used on. So
  // is one whose wait on libunbound's result pipe failed (logged dns_resolver_failed): no answer comes back
  // through it, and its lookups, those in flight when it failed too, fail at once
  // (DnsOutcome::local_resources, the relay's own failure) instead of each waiting for dns.timeout.
  bool spoiled() const;

 private:
  struct Impl;
  struct Lookups;
  Resolver(std::shared_ptr<Resolver> shared);
  std::shared_ptr<Impl> impl_;
  std::shared_ptr<Resolver> shared_;  // share(): the Resolver whose context this one uses
  std::shared_ptr<Lookups> lookups_;
};

}  // namespace mailflow
