#pragma once
// Every metric of mailflowd, declared in one place (telemetry.cpp), plus the rolling windows behind the
// connector report. Thread-safe: sessions on any thread call the recording functions.
// Deliberately free of prometheus-cpp and Asio headers: it is included by every daemon file.
#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "daemon/dns_vocabulary.hpp"
#include "daemon/state_file.hpp"
#include "proto/tls_version.hpp"

namespace mailflow {

struct Report;
class TlsRptStore;

enum class Leg { client, upstream };
std::string_view to_string(Leg leg);

// Why the HTTP side refused a connection or a request (mailflow_http_rejects_total{reason}); every reason is
// exported from the start, zeros included.
enum class HttpReject {
  connection_limit,  // at the total HTTP connection cap: closed to make room, or refused when none was idle
  address_limit,     // over the per-address HTTP connection cap
  head_timeout,      // the request head was not complete within its deadline
  bad_request,       // 400/413/431: unparsable, oversized, a Transfer-Encoding not chunked, a target refused
  auth_missing,      // 401 without (usable) credentials
  auth_failed,       // 401: wrong user name or password
  auth_busy,         // 503: too many password checks pending
  auth_backoff,      // 429: the address failed too often, no check was run
  write_timeout,     // a response the client did not take within its deadline: the connection was closed
  accept_failed,     // accept() failed (out of descriptors): each try, one per 100 ms pause; not a connection
                     // that went away before it was taken (daemon/accept_error.hpp)
};
inline constexpr std::array<HttpReject, 10> all_http_rejects{
    HttpReject::connection_limit, HttpReject::address_limit, HttpReject::head_timeout,
    HttpReject::bad_request,      HttpReject::auth_missing,  HttpReject::auth_failed,
    HttpReject::auth_busy,        HttpReject::auth_backoff,  HttpReject::write_timeout,
    HttpReject::accept_failed};
std::string_view to_string(HttpReject reason);

// The coroutines whose escaped exceptions are counted (mailflow_internal_errors_total{component}).
inline constexpr std::array<std::string_view, 6> internal_components{"session", "accept", "signals",
                                                                     "periodic", "drain",  "http"};

// One served certificate's notAfter (daemon/certificate_check.hpp finds them).
struct CertificateExpiry {
  std::string listener;        // the listener's name, or "http" for http.tls
  std::string certificate;     // the cert file path as configured (unique, unlike a CN that SNI pairs share)
  std::int64_t not_after = 0;  // unix seconds
};

// The far side of a delivered message, for the per-connector drill-down (the report's remotes and domains).
// Inbound: the client's address (after PROXY/XCLIENT), its EHLO/HELO name, the TLS cipher of the client leg,
// the sender domain. Outbound: the MX (or fixed upstream) address, the MX host name (or the upstream's host),
// the cipher of the upstream leg, the destination domains (the message counts once in each distinct one).
struct Remote {
  std::string_view address;
  std::string_view name;
  std::string_view cipher;
  std::span<const std::string> domains;
  std::string_view policy;  // outbound: the policy that governed the connection ("dane", "mta-sts", "none")
};

// The largest state file Telemetry::load_state reads under `config` (a larger one is moved aside).
std::size_t state_load_limit(const config::Config& config, std::string_view file);

class Telemetry {
 public:
  using Clock = std::function<std::chrono::system_clock::time_point()>;

  explicit Telemetry(Clock clock = {});  // empty clock: system_clock::now
  ~Telemetry();
  Telemetry(const Telemetry&) = delete;
  Telemetry& operator=(const Telemetry&) = delete;

  // At start and after every successful reload: mailflow_connector_info, mailflow_alert_threshold, the
  // window length, and the zero-valued series of every configured connector x tls_version (no gaps).
  void configure(const config::Config& config);

  // A message the upstream accepted (2xx to end-of-data): counted exactly once, here.
  void message_delivered(std::string_view connector, config::Direction direction, proto::TlsVersion version,
                         std::uint64_t bytes, std::uint32_t recipients, const Remote& remote = {});
  // A failed client-leg handshake (e.g. refused below the listener's min_version), attributed to the connector
  // known before it (listener, client address, EHLO name) and the version the client offered (one of
  // reasons::tls_offered): mailflow_tls_handshake_refused_total{listener, connector, offered}, zeros from the
  // start for every listener with TLS x connector it can match; and, inbound, the remote's `refused` count in the
  // drill-down (`address`, `name`: the client's address and EHLO name; the outbound drill-down lists MX hosts).
  // The log line is the caller's.
  void handshake_refused(std::string_view listener, std::string_view connector, config::Direction direction,
                         std::string_view address, std::string_view name, std::string_view offered);
  // Verified reverse names of inbound remotes (looked up off the session path, see Server): the addresses
  // still without a name (at most `most`), and the answer for one ("" = none, or not forward-confirmed).
  std::vector<std::string> addresses_to_name(std::size_t most);
  void remote_named(std::string_view address, std::string_view verified_name, std::chrono::seconds ttl);
  void session_opened(std::string_view listener);                       // sessions_active +1
  void session_closed(std::string_view listener, double duration_seconds);  // -1, duration histogram
  void leg_finished(std::string_view listener, Leg leg, proto::TlsVersion version);  // sessions_total
  void tls_handshake_failed(std::string_view listener, Leg leg, std::string_view reason);
  void upstream_error(std::string_view upstream, std::string_view reason);
  void rejected(std::string_view listener, std::string_view reason);
  void http_rejected(HttpReject reason);  // mailflow_http_rejects_total{reason}
  void internal_error(std::string_view component);  // one of internal_components
  void mx_attempt(std::string_view upstream, std::string_view result);  // one of reasons::mx_attempts
  // mailflow_outbound_policy_total{connector,policy,result}: one per outbound session under a policy (called by
  // the MX walk, and for a fixed upstream with tls: dane). policy: one of reasons::outbound_policies; result: "success" or an RFC 8460 result type.
  // Every outbound connector exports all policy x result series from the start.
  // A failure (result other than "success") also counts against `domain` in the connector's destination-domain
  // drill-down (its `refused`: sessions that failed the domain's policy).
  void outbound_policy(std::string_view connector, std::string_view policy, std::string_view result,
                       std::string_view domain = {});
  // mailflow_tlsrpt_deliveries_total{method,result}: a TLS-RPT report tried at one rua (reasons::tlsrpt_methods x
  // reasons::tlsrpt_results, all exported from the start).
  void tlsrpt_delivery(std::string_view method, std::string_view result);
  // mailflow_config_reloads_total{result="success"|"failure"}, and mailflow_config_last_reload_successful: 1
  // from the start, 0 from a refused reload until one succeeds (the counter alone cannot say which came
  // last).
  void config_reloaded(bool success);
  // mailflow_sockets_unused: the sockets from systemd (LISTEN_FDS) that no listener accepts on, at start and
  // after every reload.
  void sockets_unused(std::size_t count);
  void state_error(std::string_view reason);  // mailflow_state_errors_total{reason}: save/load problems
  // mailflow_dns_lookups_total{type,result}: every lookup of the resolver; all series exported from the start.
  void dns_lookup(DnsType type, DnsOutcome outcome);
  // mailflow_certificate_expiry_timestamp_seconds{listener, certificate}: the whole set, at start and after
  // every successful reload (certificates no longer configured disappear).
  void certificates_loaded(const std::vector<CertificateExpiry>& certificates);

  // Prometheus text exposition (0.0.4) of every family, window gauges refreshed first, process_* included.
  // Written into `buffer` (its text discarded, its capacity reused): the HTTP server hands back the body of
  // the scrape before, so that a scrape of ~10 MB does not fault in a fresh allocation each time.
  std::string metrics_text(std::string buffer = {});

  // The connector report over the last `days` UTC days (1..window).
  Report report(int days);
  // telemetry.window in whole days (the largest `days` a report may ask for).
  int window_days() const;

  // Rolling windows persistence (state_dir/windows.state): state_files() gives the text of the files
  // (windows, remotes, TLS-RPT), serialized now, for the StateWriter (atomic save: temp, fsync, rename). load
  // moves a corrupt or foreign file aside (windows.state.corrupt-<time>), counts state_error("corrupt"),
  // starts empty and returns true with `error` set (for the log). False + error when the file or directory is
  // unusable; those failures are not counted here (the caller counts them with state_error). The drill-down
  // tables (state_dir/remotes.state) are loaded the same way, with the windows. Called after configure(): the
  // window, the drill-down limits and the largest file read (state_load_limit) follow it.
  std::vector<StateFile> state_files();
  bool load_state(const std::string& state_dir, std::string& error);

  // The TLS-RPT aggregates (daemon/tlsrpt.hpp): saved and loaded with the windows (state_dir/tlsrpt.state).
  TlsRptStore& tlsrpt();

  std::uint64_t messages_total() const;  // for sd_notify STATUS=
  std::uint64_t sessions_active() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mailflow
