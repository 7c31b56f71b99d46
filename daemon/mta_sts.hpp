#pragma once
// MTA-STS (RFC 8461) for the MX walk: the policy fetch over HTTPS (Boost.Beast), the per-domain policy cache
// (persisted in state_dir/mta-sts.state), the lookup the MX walk calls per recipient domain, and the check
// whether an MX host may be used under the policy given the TLS result. The pure parts (TXT record, policy
// file, MX patterns) are proto/mta_sts.hpp.
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
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "daemon/state_file.hpp"
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
  };
  Status status = Status::fetch_error;
  std::optional<proto::mta_sts::Policy> policy;
  std::string detail;  // why, for logs
};
std::string_view to_string(PolicyFetch::Status status);  // "ok", "fetch_error", "invalid", "webpki_invalid"

// GET https://mta-sts.<domain>/.well-known/mta-sts.txt: certificate verified for mta-sts.<domain> (SNI sent),
// no redirects followed, Content-Type text/plain, body at most 64 KiB, all within settings.fetch_timeout.
// `resolver`: where mta-sts.<domain>'s addresses are looked up (the daemon's DNS, dns.servers); null: the
// system's resolver (getaddrinfo). Not used with settings.connect_to.
boost::asio::awaitable<PolicyFetch> fetch_policy(boost::asio::any_io_executor executor, std::string domain,
                                                 const MtaStsSettings& settings, Resolver* resolver = nullptr);

struct CachedPolicy {
  std::string id;  // the TXT record's id when fetched
  proto::mta_sts::Policy policy;
  std::int64_t fetched_at = 0;  // unix seconds
  std::int64_t expires_at = 0;  // fetched_at + max_age
};

// RFC 8461 3.3: after a failed fetch, the same domain and id are not fetched again for this many seconds.
inline constexpr std::int64_t mta_sts_fetch_retry_after = 300;
// RFC 8461 3.3: a cached policy is refreshed (fetched again, its id unchanged) once it is this many seconds
// old, or half its max_age where that is shorter, so that a fetch blocked at its expiry does not end it.
inline constexpr std::int64_t mta_sts_refresh_after = 86400;

// The policies fetched, per domain (thread-safe). Persisted as state_dir/mta-sts.state; the failed fetches
// are remembered in memory only.
class MtaStsCache {
 public:
  explicit MtaStsCache(std::size_t max_policies = 10000) : max_policies_(max_policies) {}
  void set_max_policies(std::size_t max_policies);  // mta_sts.max_policies, at start and reload
  std::optional<CachedPolicy> find(std::string_view domain, std::int64_t now) const;  // unexpired only
  void store(const std::string& domain, CachedPolicy policy, std::int64_t now);  // forgets a failed fetch
  std::size_t size() const;
  // Whether the policy that the TXT record's `id` names is to be fetched: not when an unexpired policy with
  // that id is cached and not yet due for its refresh, nor within mta_sts_fetch_retry_after of a failed fetch
  // for the domain and id.
  bool fetch_due(std::string_view domain, std::string_view id, std::int64_t now) const;
  // A fetch for the domain and id failed (at most max_policies remembered; the oldest are dropped first).
  void fetch_failed(const std::string& domain, const std::string& id, std::int64_t now);

  std::string serialize() const;
  // False: corrupt. Drops the policies expired at `now` or at the newest fetch in the text, whichever is
  // earlier (a clock far ahead drops none: they are back when it is corrected).
  bool deserialize(std::string_view text, std::int64_t now, std::string& error);
  // Its name in state_dir and serialize(), for the StateWriter (atomic save); load moves a corrupt file aside
  // (returns true, error says so) and starts empty.
  StateFile state_file() const;
  bool load(const std::string& state_dir, std::int64_t now, std::string& error);

 private:
  mutable std::mutex mutex_;
  std::size_t max_policies_;
  std::map<std::string, CachedPolicy, std::less<>> policies_;
  struct FailedFetch {
    std::string id;
    std::int64_t at = 0;
  };
  std::map<std::string, FailedFetch, std::less<>> failed_fetches_;
};

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

  bool enforced() const { return mode == Mode::enforce; }
};
std::string_view to_string(PolicyState::Mode mode);

// RFC 8461 section 5: the TXT record, then the cache (same id, not expired) or a fetch; a failed fetch falls
// back to an unexpired cached policy; no TXT record and no cached policy: none. A cached policy due for its
// refresh is fetched again, inline (under its own id where there is no TXT record, or DNS failed). A failed
// fetch is reported once: within mta_sts_fetch_retry_after the domain and id are not fetched again, and the
// lookup answers as if the fetch had failed (the cached policy, or none) without a failure to report. `now`
// in unix seconds.
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
