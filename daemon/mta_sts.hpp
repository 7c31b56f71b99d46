#pragma once
// MTA-STS (RFC 8461) for the MX walk: the policy fetch over HTTPS (Boost.Beast), the lookup the MX walk calls
// per recipient domain, and the check whether an MX host may be used under the policy given the TLS result.
// The per-domain policy cache (state_dir/mta-sts.state) is mta_sts_cache.hpp; the pure parts (TXT record,
// policy file, MX patterns) are proto/mta_sts.hpp.
//
// Wiring (the MX walk): `auto state = co_await lookup_policy(resolver, cache, domain, settings)` once per
// domain; `mx_listed(state, host)` to skip hosts before connecting when state.enforced(); after the handshake
// `check_mx(state, host, tls)`: not usable => the next MX (enforce), and `failure` goes to TLS-RPT and to
// Telemetry::outbound_policy(connector, "mta-sts", ...).
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "daemon/dns_vocabulary.hpp"
#include "daemon/mta_sts_cache.hpp"
#include "proto/mta_sts.hpp"
#include "proto/tls_version.hpp"
#include "proto/tlsrpt.hpp"

namespace mailflow {

class Resolver;

struct MtaStsSettings {
  std::string ca_file;  // PEM CA file for the HTTPS fetch; empty: the system trust store
  std::chrono::milliseconds fetch_timeout{10000};  // the whole fetch: connect, handshake, request, answer
  // And no later than this (the caller's own deadline: the MX walk's timeouts.upstream_open).
  std::chrono::steady_clock::time_point not_after = std::chrono::steady_clock::time_point::max();
  std::size_t max_policies = 10000;                // cached domains; the soonest to expire is dropped first
  // "host:port" to connect to instead of mta-sts.<domain>:443 (SNI and the verified name stay
  // mta-sts.<domain>); for `mailflowd mta-sts --connect` and the tests. Empty: the real place.
  std::string connect_to;
};

struct PolicyFetch {
  enum class Status {
    ok,              // policy holds a valid policy
    fetch_error,     // no usable answer: connect, TLS (other than the certificate), timeout, non-200, 3xx,
                     // wrong Content-Type, over 64 KiB (TLS-RPT sts-policy-fetch-error)
    invalid,         // an answer that is not a valid policy (sts-policy-invalid)
    webpki_invalid,  // the certificate of mta-sts.<domain> did not verify (sts-webpki-invalid)
    local_error,     // the relay's own failure, none of the domain's: mta_sts.ca_file could not be loaded, or
                  // no socket for want of descriptors, memory or ports (HttpsResponse::local, or the lookup
                  // of mta-sts.<domain>'s addresses: DnsOutcome::local_resources); not reported
  };
  Status status = Status::fetch_error;
  std::optional<proto::mta_sts::Policy> policy;
  std::string detail;  // why, for logs
};
// "ok", "fetch_error", "invalid", "webpki_invalid", "local_error"
std::string_view to_string(PolicyFetch::Status status);

// GET https://mta-sts.<domain>/.well-known/mta-sts.txt: certificate verified for mta-sts.<domain> (SNI sent),
// no redirects followed, Content-Type text/plain, body at most 64 KiB, all within settings.fetch_timeout.
// `resolver`: where mta-sts.<domain>'s addresses are looked up (the daemon's DNS, dns.servers); null: the
// system's resolver (getaddrinfo). Not used with settings.connect_to.
boost::asio::awaitable<PolicyFetch> fetch_policy(boost::asio::any_io_executor executor, std::string domain,
                                                 const MtaStsSettings& settings, Resolver* resolver = nullptr);

// What the MX walk works with for one recipient domain.
struct PolicyState {
  enum class Mode { none, testing, enforce };
  Mode mode = Mode::none;
  std::optional<proto::mta_sts::Policy> policy;  // the policy in force (testing/enforce); from the cache or fresh
  std::string id;
  bool from_cache = false;
  // A failure to report (TLS-RPT) even though delivery goes on: sts-policy-fetch-error, sts-policy-invalid
  // or sts-webpki-invalid; with a still-valid cached policy the failure is reported and that policy used.
  std::optional<proto::tlsrpt::ResultType> failure;
  std::string detail;
  // The fetch, or the _mta-sts TXT lookup (DnsOutcome::local_resources), failed for a reason of the relay's
  // own (PolicyFetch::Status::local_error; `detail` says why): nothing to report, and not recorded as the
  // domain's failed fetch, so the next message fetches again; a cached policy stays in force as after a
  // failed refresh, and without one the MX walk does not go on (451 4.4.1, upstream_errors local_resources)
  // rather than deliver as though the domain published none.
  bool local_failure = false;
  // The _mta-sts TXT lookup: a temporary failure (is_temporary: timeout, servfail, bogus, error; not
  // local_resources, above) is taken as no record (RFC 8461 5: the cached policy, if any, else none) and is
  // not reported; `mailflowd mta-sts` says so.
  DnsOutcome txt = DnsOutcome::error;
  std::string txt_detail;  // the resolver's words for a failed TXT lookup

  bool enforced() const { return mode == Mode::enforce; }
};
std::string_view to_string(PolicyState::Mode mode);

// RFC 8461 section 5: the TXT record, then the cache (same id, not expired) or a fetch; a failed fetch falls
// back to an unexpired cached policy; no TXT record and no cached policy: none. A cached policy due for its
// refresh is fetched again, inline (under its own id where there is no TXT record, or DNS failed). A failed
// fetch is reported once: within mta_sts_fetch_retry_after the domain and id are not fetched again, and the
// lookup answers as if the fetch had failed (the cached policy, or none) without a failure to report. A fetch
// that failed for the relay's own reason (local_failure) is neither reported nor recorded. `now` in unix
// seconds.
boost::asio::awaitable<PolicyState> lookup_policy(Resolver& resolver, MtaStsCache& cache, std::string domain,
                                                  const MtaStsSettings& settings, std::int64_t now);

// The TLS result of one MX session, as the MX walk saw it.
struct MxTls {
  bool tls = false;  // STARTTLS completed
  proto::TlsVersion version = proto::TlsVersion::none;
  // The certificate chained to the trust store and is valid for the MX host name (RFC 8461 4.2).
  bool certificate_valid = false;
  // When not valid: why, as TLS-RPT says it (certificate-expired, certificate-host-mismatch, ...).
  proto::tlsrpt::ResultType certificate_problem = proto::tlsrpt::ResultType::certificate_not_trusted;
};

struct MxVerdict {
  bool usable = true;  // false only in enforce mode
  std::optional<proto::tlsrpt::ResultType> failure;  // what to report (also in testing mode)
  std::string reason;  // failure-reason-code text
};

// Listed per section 4.1 (true when there is no policy to apply).
bool mx_listed(const PolicyState& state, std::string_view mx_host);
// Section 4: listed, TLS1.2 or later, certificate valid for the MX name. Mode none: always usable, no failure.
MxVerdict check_mx(const PolicyState& state, std::string_view mx_host, const MxTls& tls);

}  // namespace mailflow
