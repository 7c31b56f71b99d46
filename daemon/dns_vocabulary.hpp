#pragma once
// The words of DNS lookups shared by the resolver and telemetry (mailflow_dns_lookups_total{type,result}),
// defined once. Free of Asio and libunbound headers (telemetry.hpp includes it).
#include <array>
#include <string_view>

namespace mailflow {

// The label values of mailflow_dns_lookups_total, declared once: `type` and `result`.
enum class DnsType { mx, a, aaaa, tlsa, txt, ptr };
inline constexpr std::array<DnsType, 6> all_dns_types{DnsType::mx,   DnsType::a,   DnsType::aaaa,
                                                      DnsType::tlsa, DnsType::txt, DnsType::ptr};
std::string_view to_string(DnsType type);  // "MX", "A", "AAAA", "TLSA", "TXT", "PTR"

enum class DnsOutcome {
  success,   // NOERROR with records
  nodata,    // NOERROR, none of the asked type
  nxdomain,  // the name does not exist
  servfail,  // the server (or the resolver behind dns.servers) could not answer
  timeout,   // no answer within dns.timeout; the query was cancelled
  bogus,     // DNSSEC validation failed (only with dns.trust_anchor_file)
  error,     // anything else: REFUSED, FORMERR, a resolver library error
  // SERVFAIL or an error after libunbound said that it could not make a socket for a query (out of
  // descriptors, memory, buffers): it could not send the query, so the answer says nothing about the name;
  // also a lookup whose pipe to libunbound's worker failed (UB_PIPE: the result pipe, dns_resolver_failed)
  local_resources,
};
inline constexpr std::array<DnsOutcome, 8> all_dns_outcomes{
    DnsOutcome::success, DnsOutcome::nodata, DnsOutcome::nxdomain, DnsOutcome::servfail,
    DnsOutcome::timeout, DnsOutcome::bogus,  DnsOutcome::error,    DnsOutcome::local_resources};
std::string_view to_string(DnsOutcome outcome);
// servfail, timeout, bogus, error and local_resources: try again later (451 4.4.3), never a bounce.
bool is_temporary(DnsOutcome outcome);

}  // namespace mailflow
