#include "daemon/telemetry.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "daemon/exposition.hpp"
#include "daemon/reasons.hpp"
#include "daemon/process_metrics.hpp"
#include "daemon/remote_store.hpp"
#include "daemon/report.hpp"
#include "daemon/state_file.hpp"
#include "daemon/tlsrpt.hpp"
#include "daemon/window_store.hpp"

namespace mailflow {

std::string_view to_string(Leg leg) { return leg == Leg::client ? "client" : "upstream"; }

std::string_view to_string(HttpReject reason) {
  switch (reason) {
    case HttpReject::connection_limit: return "connection_limit";
    case HttpReject::address_limit: return "address_limit";
    case HttpReject::head_timeout: return "head_timeout";
    case HttpReject::bad_request: return "bad_request";
    case HttpReject::auth_missing: return "auth_missing";
    case HttpReject::auth_failed: return "auth_failed";
    case HttpReject::auth_busy: return "auth_busy";
    case HttpReject::auth_backoff: return "auth_backoff";
    case HttpReject::write_timeout: return "write_timeout";
    case HttpReject::accept_failed: return "accept_failed";
  }
  return "unknown";
}

namespace {

constexpr std::size_t kVersions = proto::all_tls_versions.size();
constexpr std::array<Leg, 2> kLegs{Leg::client, Leg::upstream};
constexpr std::array<std::string_view, 3> kInsights{"significant_tls10", "significant_tls11", "significant_no_tls"};
constexpr std::array<std::string_view, 4> kThresholdKinds{"tls10_share", "tls11_share", "no_tls_share",
                                                          "min_messages"};
constexpr std::array<config::ConnectorType, 3> kConnectorTypes{
    config::ConnectorType::partner, config::ConnectorType::onpremises, config::ConnectorType::internet};
constexpr const char* kStateFile = "windows.state";
constexpr const char* kRemotesFile = "remotes.state";  // the drill-down tables (RemoteStore)
// The least a state file may have (far above 90 days x hourly x many connectors); state_load_limit raises it
// where the configuration can write more (remotes.state with a large top_remotes).
constexpr std::size_t kMaxStateFileBytes = 512u << 20;

// SMTP sessions: from an immediate QUIT (10 ms) to a slow DATA near the default timeouts (10 min).
constexpr std::array<double, 14> kSessionBuckets{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};

std::size_t index_of(proto::TlsVersion version) { return static_cast<std::size_t>(version); }
std::size_t index_of(config::Direction direction) { return static_cast<std::size_t>(direction); }
std::size_t index_of(Leg leg) { return static_cast<std::size_t>(leg); }
std::size_t index_of(config::ConnectorType type) { return static_cast<std::size_t>(type); }

bool below_tls12(proto::TlsVersion version) {
  return version == proto::TlsVersion::none || version == proto::TlsVersion::tls10 ||
         version == proto::TlsVersion::tls11;
}

// Heterogeneous lookup: the hot path looks up std::string_view without building a std::string.
struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};
template <class Value>
using StringMap = std::unordered_map<std::string, Value, StringHash, std::equal_to<>>;

// Every metric family of mailflowd, declared together (name, type, help). The label names are rendered
// where the series are created (Impl) and the samples written by metrics_text; INTERFACE.md "Metrics" is
// the contract.
struct Family {
  std::string_view name;
  std::string_view type;
  std::string_view help;
};
namespace family {
constexpr Family messages{"mailflow_messages_total", "counter",
                          "Messages accepted by the upstream, by connector, direction and TLS version of the external "
                          "leg"};
constexpr Family message_bytes{"mailflow_message_bytes_total", "counter", "Bytes of accepted messages"};
constexpr Family recipients{"mailflow_recipients_total", "counter", "Recipients of accepted messages"};
constexpr Family sessions{"mailflow_sessions_total", "counter",
                          "Finished connection legs by listener, leg (client/upstream) and TLS version"};
constexpr Family tls_handshake_failures{"mailflow_tls_handshake_failures_total", "counter",
                                        "Failed TLS handshakes by listener, leg and reason"};
constexpr Family tls_handshake_refused{"mailflow_tls_handshake_refused_total", "counter",
                                       "Failed client TLS handshakes by listener, the connector known before the "
                                       "handshake (listener, client address, EHLO name) and the highest version the "
                                       "client offered"};
constexpr Family upstream_errors{"mailflow_upstream_errors_total", "counter", "Upstream connection and protocol errors"};
constexpr Family rejects{"mailflow_rejects_total", "counter", "Refusals and limits hit, by listener and reason"};
constexpr Family http_rejects{"mailflow_http_rejects_total", "counter",
                              "HTTP connections and requests refused (caps, deadlines, bad requests, auth), by reason"};
constexpr Family mx_attempts{"mailflow_mx_attempts_total", "counter",
                             "Connection attempts to MX hosts (mx upstreams), by upstream and result"};
constexpr Family outbound_policy{"mailflow_outbound_policy_total", "counter",
                                 "Outbound sessions under a TLS policy (dane, mta-sts, none), by connector and result "
                                 "(success or the RFC 8460 result type)"};
constexpr Family tlsrpt_deliveries{"mailflow_tlsrpt_deliveries_total", "counter",
                                   "TLS-RPT reports tried per rua address, by method (mailto, https) and result "
                                   "(success, temporary_failure, permanent_failure, gave_up, skipped)"};
constexpr Family tlsrpt_sessions_dropped{"mailflow_tlsrpt_sessions_dropped_total", "counter",
                                         "Outbound sessions in no TLS report: their domain came after the "
                                         "TLS-RPT store's bound of domains of the day"};
constexpr Family internal_errors{"mailflow_internal_errors_total", "counter",
                                 "Exceptions that escaped a coroutine (logged, cleaned up; the component restarts)"};
constexpr Family below_tls12{"mailflow_below_tls12_total", "counter",
                             "Messages without TLS or with TLS1.0/1.1: what breaks if TLS1.2 is enforced"};
constexpr Family config_reloads{"mailflow_config_reloads_total", "counter",
                                "Configuration reloads by result (success, failure)"};
constexpr Family config_last_reload{
    "mailflow_config_last_reload_successful", "gauge",
    "1 when the last reload was applied (or none was tried since the start), 0 when "
    "it was refused and the configuration before it runs"};
constexpr Family state_errors{"mailflow_state_errors_total", "counter",
                              "Problems saving or loading the rolling windows state"};
constexpr Family dns_lookups{"mailflow_dns_lookups_total", "counter",
                             "DNS lookups of the resolver (mx upstreams), by record type and result"};
constexpr Family sessions_active{"mailflow_sessions_active", "gauge", "Client sessions currently open"};
constexpr Family window_messages{"mailflow_window_messages", "gauge",
                                 "Messages within the rolling window (telemetry.window)"};
constexpr Family window_tls_share{"mailflow_window_tls_share", "gauge",
                                  "Share (0..1) of the window's messages per TLS version"};
constexpr Family connector_info{"mailflow_connector_info", "gauge", "Configured connectors (always 1)"};
constexpr Family alert_threshold{"mailflow_alert_threshold", "gauge",
                                 "Alert thresholds per connector (tls10_share, tls11_share, no_tls_share, min_messages)"};
constexpr Family insight_active{"mailflow_insight_active", "gauge",
                                "1 while an insight (significant_tls10, significant_tls11, significant_no_tls) is active"};
constexpr Family remotes_tracked{"mailflow_remotes_tracked", "gauge",
                                  "Remote servers tracked in the window's drill-down (at most telemetry.top_remotes)"};
constexpr Family remotes_error_bound{"mailflow_remotes_error_bound", "gauge",
                                     "Heavy-hitters error bound of the window's drill-down: a server not listed sent "
                                     "at most this many messages (0: exact)"};
constexpr Family build_info{"mailflow_build_info", "gauge", "Build information (always 1)"};
constexpr Family sockets_unused{"mailflow_sockets_unused", "gauge",
                                "Sockets passed by systemd socket activation that no listener accepts on"};
constexpr Family certificate_expiry{"mailflow_certificate_expiry_timestamp_seconds", "gauge",
                                   "notAfter of each served certificate (unix seconds), by listener (http: "
                                   "http.tls) and certificate file"};
constexpr Family session_duration{"mailflow_session_duration_seconds", "histogram", "Client session duration"};
// process_* the way the Prometheus Go client exports them.
constexpr Family process_cpu{"process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."};
constexpr Family process_max_fds{"process_max_fds", "gauge", "Maximum number of open file descriptors."};
constexpr Family process_open_fds{"process_open_fds", "gauge", "Number of open file descriptors."};
constexpr Family process_resident{"process_resident_memory_bytes", "gauge", "Resident memory size in bytes."};
constexpr Family process_start_time{"process_start_time_seconds", "gauge",
                                    "Start time of the process since unix epoch in seconds."};
constexpr Family process_virtual{"process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."};
}  // namespace family

// The rarely used families whose label values arrive at run time (reasons, upstream names).
enum class Labelled : std::size_t {
  tls_handshake_failures,
  upstream_errors,
  rejects,
  config_reloads,
  state_errors,
  http_rejects,
  internal_errors,
  mx_attempts,
  tls_handshake_refused,
  outbound_policy,
  tlsrpt_deliveries
};
constexpr std::size_t kLabelledFamilies = 11;
constexpr std::array<const Family*, kLabelledFamilies> kLabelledFamily{
    &family::tls_handshake_failures, &family::upstream_errors,  &family::rejects,
    &family::config_reloads,         &family::state_errors,     &family::http_rejects,
    &family::internal_errors,        &family::mx_attempts,      &family::tls_handshake_refused,
    &family::outbound_policy,        &family::tlsrpt_deliveries};

// Label text that does not depend on a series, rendered once.
struct FixedLabels {
  std::array<std::string, kVersions> tls_version;
  std::array<std::string, kLegs.size()> leg;
  std::array<std::string, kInsights.size()> insight;
  std::array<std::string, kThresholdKinds.size()> kind;
  std::array<std::string, kConnectorTypes.size()> type;
  std::array<std::string, 2> forced_tls;  // false, true
  std::array<std::string, kSessionBuckets.size() + 1> le;
  std::string version;  // mailflow_build_info

  FixedLabels() {
    using exposition::label;
    for (const auto v : proto::all_tls_versions) tls_version[index_of(v)] = label("tls_version", proto::to_string(v));
    for (const auto l : kLegs) leg[index_of(l)] = label("leg", to_string(l));
    for (std::size_t i = 0; i < kInsights.size(); ++i) insight[i] = label("insight", kInsights[i]);
    for (std::size_t i = 0; i < kThresholdKinds.size(); ++i) kind[i] = label("kind", kThresholdKinds[i]);
    for (const auto t : kConnectorTypes) type[index_of(t)] = label("type", config::to_string(t));
    forced_tls = {label("forced_tls", "false"), label("forced_tls", "true")};
    for (std::size_t i = 0; i < kSessionBuckets.size(); ++i) {
      std::string bound;
      exposition::append_value(bound, kSessionBuckets[i]);
      le[i] = label("le", bound);
    }
    le.back() = label("le", "+Inf");
    version = label("version", MAILFLOW_VERSION);
  }
};

const FixedLabels& fixed_labels() {
  static const FixedLabels labels;
  return labels;
}

// Everything counted for one (connector, direction), plain values under Impl::mutex: a scrape copies it whole.
struct ConnectorValues {
  std::array<std::uint64_t, kVersions> messages{};
  std::array<std::uint64_t, kVersions> bytes{};
  std::array<std::uint64_t, kVersions> recipients{};
  std::uint64_t below_tls12 = 0;
  // mailflow_connector_info and mailflow_alert_threshold exist only while the connector is configured.
  bool configured = false;
  config::ConnectorType type = config::ConnectorType::internet;
  bool forced_tls = false;
  config::AlertThresholds alerts;
};

// A series set is created once and never destroyed (counters must never go backwards while the process
// lives), so a scrape may read its constant label text after it released the mutex.
struct ConnectorSeries {
  ConnectorSeries(std::string_view connector, config::Direction dir, std::size_t position)
      : name(connector), direction(dir), index(position) {
    exposition::append_label(labels, "connector", connector);
    labels.push_back(',');
    exposition::append_label(labels, "direction", config::to_string(dir));
  }
  const std::string name;
  const config::Direction direction;
  const std::size_t index;  // in Impl::connector_list, and so in a scrape's rows
  std::string labels;       // connector="…",direction="…": set by the constructor, constant after
  ConnectorValues values;
};

struct ListenerValues {
  std::int64_t active = 0;
  std::array<std::array<std::uint64_t, kVersions>, kLegs.size()> sessions{};
  std::array<std::uint64_t, kSessionBuckets.size() + 1> duration_buckets{};  // per bucket, not cumulative
  double duration_sum = 0;
  std::uint64_t duration_count = 0;
};

struct ListenerSeries {
  explicit ListenerSeries(std::string_view name) : label(exposition::label("listener", name)) {}
  const std::string label;  // listener="…"
  ListenerValues values;
};

// A configured (or implicit "internet") connector as telemetry sees it.
struct ConnectorView {
  std::string name;
  config::Direction direction;
  config::ConnectorType type;
  bool forced_tls;
  config::AlertThresholds alerts;
};

std::vector<ConnectorView> connector_views(const config::Config& config) {
  std::vector<ConnectorView> views;
  std::set<std::pair<std::string, config::Direction>> seen;
  for (const auto& c : config.connectors) {
    if (seen.emplace(c.name, c.direction).second) {
      views.push_back({c.name, c.direction, c.type, c.require_tls, c.alerts});
    }
  }
  for (const auto direction : {config::Direction::inbound, config::Direction::outbound}) {
    const bool has_listener = std::any_of(config.listeners.begin(), config.listeners.end(),
                                          [&](const config::Listener& l) { return l.direction == direction; });
    if (has_listener && seen.emplace("internet", direction).second) {
      views.push_back({"internet", direction, config::ConnectorType::internet, false, config.telemetry.defaults});
    }
  }
  return views;
}

// What one scrape writes, copied under Impl::mutex; label text is referenced, not copied (see ConnectorSeries).
struct Snapshot {
  struct ConnectorRow {
    const ConnectorSeries* series;
    ConnectorValues values;
    TlsCounts window;
    std::array<bool, kInsights.size()> insight;
    std::uint64_t remotes_tracked = 0;
    std::uint64_t remotes_error_bound = 0;
  };
  std::vector<ConnectorRow> connectors;
  std::vector<std::pair<const ListenerSeries*, ListenerValues>> listeners;
  std::array<std::array<std::uint64_t, all_dns_outcomes.size()>, all_dns_types.size()> dns_lookups{};
  std::array<std::vector<std::pair<const std::string*, std::uint64_t>>, kLabelledFamilies> labelled;
  std::vector<std::pair<std::string, std::int64_t>> certificates;  // rendered labels, notAfter
  std::uint64_t sockets_unused = 0;
  std::uint64_t last_reload_successful = 1;
  std::uint64_t tlsrpt_sessions_dropped = 0;
};

void write_exposition(std::string& out, const Snapshot& snapshot, const std::optional<ProcessStats>& process) {
  using exposition::append_header;
  using exposition::append_sample;
  const FixedLabels& fixed = fixed_labels();
  const auto& rows = snapshot.connectors;
  const auto& listeners = snapshot.listeners;
  auto header = [&](const Family& f) { append_header(out, f.name, f.help, f.type); };

  // Per (connector, direction) and tls_version.
  auto per_version = [&](const Family& f, auto value_of) {
    if (rows.empty()) return;
    header(f);
    for (const auto& row : rows) {
      for (std::size_t v = 0; v < kVersions; ++v) {
        append_sample(out, f.name, {row.series->labels, fixed.tls_version[v]}, value_of(row, v));
      }
    }
  };
  auto labelled = [&](Labelled which) {
    // Written even without samples: a family with a declared vocabulary (daemon/reasons.hpp) is exported
    // from the start, HELP and TYPE included.
    const auto& samples = snapshot.labelled[static_cast<std::size_t>(which)];
    const Family& f = *kLabelledFamily[static_cast<std::size_t>(which)];
    header(f);
    for (const auto& [labels, value] : samples) append_sample(out, f.name, {*labels}, value);
  };

  // Counters, gauges, histogram, process_*: the order the exposition has always had (prometheus-cpp's registry order).
  per_version(family::messages, [](const Snapshot::ConnectorRow& row, std::size_t v) { return row.values.messages[v]; });
  per_version(family::message_bytes, [](const Snapshot::ConnectorRow& row, std::size_t v) { return row.values.bytes[v]; });
  per_version(family::recipients,
              [](const Snapshot::ConnectorRow& row, std::size_t v) { return row.values.recipients[v]; });
  if (!listeners.empty()) {
    header(family::sessions);
    for (const auto& [series, values] : listeners) {
      for (const auto leg : kLegs) {
        for (std::size_t v = 0; v < kVersions; ++v) {
          append_sample(out, family::sessions.name, {fixed.leg[index_of(leg)], series->label, fixed.tls_version[v]},
                        values.sessions[index_of(leg)][v]);
        }
      }
    }
  }
  labelled(Labelled::tls_handshake_failures);
  labelled(Labelled::tls_handshake_refused);
  labelled(Labelled::upstream_errors);
  labelled(Labelled::rejects);
  labelled(Labelled::http_rejects);
  labelled(Labelled::internal_errors);
  labelled(Labelled::mx_attempts);
  labelled(Labelled::outbound_policy);
  labelled(Labelled::tlsrpt_deliveries);
  if (!rows.empty()) {
    header(family::below_tls12);
    for (const auto& row : rows) append_sample(out, family::below_tls12.name, {row.series->labels}, row.values.below_tls12);
  }
  labelled(Labelled::config_reloads);
  labelled(Labelled::state_errors);
  header(family::dns_lookups);  // fixed label values: every series from the start, zeros included
  for (const auto type : all_dns_types) {
    for (const auto outcome : all_dns_outcomes) {
      out.append(family::dns_lookups.name);
      out.append("{result=\"").append(to_string(outcome)).append("\",type=\"").append(to_string(type)).append("\"} ");
      exposition::append_value(out, snapshot.dns_lookups[static_cast<std::size_t>(type)][static_cast<std::size_t>(outcome)]);
      out.push_back('\n');
    }
  }

  if (!listeners.empty()) {
    header(family::sessions_active);
    for (const auto& [series, values] : listeners) {
      append_sample(out, family::sessions_active.name, {series->label}, values.active);
    }
  }
  // The window gauges and insights exist only while the connector is configured: a connector renamed or removed
  // by a reload leaves no ghost series behind (its history stays in the report, marked as removed; its counters
  // stay, they must never go backwards).
  const bool any_configured =
      std::any_of(rows.begin(), rows.end(), [](const Snapshot::ConnectorRow& row) { return row.values.configured; });
  auto configured_per_version = [&](const Family& f, auto value_of) {
    if (!any_configured) return;
    header(f);
    for (const auto& row : rows) {
      if (!row.values.configured) continue;
      for (std::size_t v = 0; v < kVersions; ++v) {
        append_sample(out, f.name, {row.series->labels, fixed.tls_version[v]}, value_of(row, v));
      }
    }
  };
  configured_per_version(family::window_messages,
                         [](const Snapshot::ConnectorRow& row, std::size_t v) { return row.window[v]; });
  configured_per_version(family::window_tls_share, [](const Snapshot::ConnectorRow& row, std::size_t v) {
    std::uint64_t total = 0;
    for (const auto count : row.window) total += count;
    return total == 0 ? 0.0 : static_cast<double>(row.window[v]) / static_cast<double>(total);
  });
  if (any_configured) {
    header(family::connector_info);
    for (const auto& row : rows) {
      if (!row.values.configured) continue;
      append_sample(out, family::connector_info.name,
                    {row.series->labels, fixed.forced_tls[row.values.forced_tls ? 1 : 0],
                     fixed.type[index_of(row.values.type)]},
                    std::uint64_t{1});
    }
    header(family::alert_threshold);
    for (const auto& row : rows) {
      if (!row.values.configured) continue;
      const auto& alerts = row.values.alerts;
      append_sample(out, family::alert_threshold.name, {row.series->labels, fixed.kind[0]}, alerts.tls10_share);
      append_sample(out, family::alert_threshold.name, {row.series->labels, fixed.kind[1]}, alerts.tls11_share);
      append_sample(out, family::alert_threshold.name, {row.series->labels, fixed.kind[2]}, alerts.no_tls_share);
      append_sample(out, family::alert_threshold.name, {row.series->labels, fixed.kind[3]}, alerts.min_messages);
    }
  }
  if (any_configured) {
    header(family::insight_active);
    for (const auto& row : rows) {
      if (!row.values.configured) continue;
      for (std::size_t i = 0; i < kInsights.size(); ++i) {
        append_sample(out, family::insight_active.name, {row.series->labels, fixed.insight[i]},
                      std::uint64_t{row.insight[i] ? 1u : 0u});
      }
    }
  }
  if (!rows.empty()) {
    header(family::remotes_tracked);
    for (const auto& row : rows) append_sample(out, family::remotes_tracked.name, {row.series->labels}, row.remotes_tracked);
    header(family::remotes_error_bound);
    for (const auto& row : rows)
      append_sample(out, family::remotes_error_bound.name, {row.series->labels}, row.remotes_error_bound);
  }
  header(family::build_info);
  append_sample(out, family::build_info.name, {fixed.version}, std::uint64_t{1});
  header(family::sockets_unused);
  append_sample(out, family::sockets_unused.name, {}, snapshot.sockets_unused);
  header(family::config_last_reload);
  append_sample(out, family::config_last_reload.name, {}, snapshot.last_reload_successful);
  header(family::tlsrpt_sessions_dropped);
  append_sample(out, family::tlsrpt_sessions_dropped.name, {}, snapshot.tlsrpt_sessions_dropped);
  header(family::certificate_expiry);
  for (const auto& [labels, not_after] : snapshot.certificates) {
    append_sample(out, family::certificate_expiry.name, {labels}, not_after);
  }

  if (!listeners.empty()) {
    header(family::session_duration);
    constexpr std::string_view kBucket = "mailflow_session_duration_seconds_bucket";
    constexpr std::string_view kSum = "mailflow_session_duration_seconds_sum";
    constexpr std::string_view kCount = "mailflow_session_duration_seconds_count";
    for (const auto& [series, values] : listeners) {
      std::uint64_t cumulative = 0;
      for (std::size_t i = 0; i < values.duration_buckets.size(); ++i) {
        cumulative += values.duration_buckets[i];
        append_sample(out, kBucket, {series->label, fixed.le[i]}, cumulative);
      }
      append_sample(out, kSum, {series->label}, values.duration_sum);
      append_sample(out, kCount, {series->label}, values.duration_count);
    }
  }

  if (process) {
    auto single = [&](const Family& f, double value) {
      header(f);
      append_sample(out, f.name, {}, value);
    };
    single(family::process_cpu, process->cpu_seconds);
    single(family::process_max_fds, process->max_fds);
    single(family::process_open_fds, process->open_fds);
    single(family::process_resident, process->resident_bytes);
    single(family::process_start_time, process->start_time_seconds);
    single(family::process_virtual, process->virtual_bytes);
  }
}


}  // namespace

struct Telemetry::Impl {
  explicit Impl(Clock c) : clock(c ? std::move(c) : Clock([] { return std::chrono::system_clock::now(); })) {
    for (const char* result : {"success", "failure"}) labelled(Labelled::config_reloads, {{"result", result}});
    for (const auto reason : reasons::state_errors) labelled(Labelled::state_errors, {{"reason", reason}});
    for (const auto reason : all_http_rejects) labelled(Labelled::http_rejects, {{"reason", to_string(reason)}});
    for (const auto component : internal_components) labelled(Labelled::internal_errors, {{"component", component}});
    for (const auto method : reasons::tlsrpt_methods) {
      for (const auto result : reasons::tlsrpt_results)
        labelled(Labelled::tlsrpt_deliveries, {{"method", method}, {"result", result}});
    }
  }

  Clock clock;
  TlsRptStore tlsrpt;

  std::atomic<std::uint64_t> messages_total{0};
  std::atomic<std::int64_t> sessions_active{0};
  std::atomic<std::uint64_t> sockets_unused{0};
  std::atomic<bool> last_reload_successful{true};
  // Counted without the mutex: every resolver (one per event loop) adds here.
  std::array<std::array<std::atomic<std::uint64_t>, all_dns_outcomes.size()>, all_dns_types.size()> dns_lookups{};

  mutable std::mutex mutex;  // guards everything below
  std::shared_ptr<const config::Config> config = std::make_shared<const config::Config>();
  WindowStore windows;
  RemoteStore remotes;
  std::vector<std::unique_ptr<ConnectorSeries>> connector_list;  // creation order: the exposition's order
  std::array<StringMap<ConnectorSeries*>, 2> connector_index;    // by direction, then name
  std::vector<std::unique_ptr<ListenerSeries>> listener_list;
  StringMap<ListenerSeries*> listener_index;
  // Rendered label text -> value; std::map: sorted output, and a node's key never moves (see Snapshot).
  std::array<std::map<std::string, std::uint64_t, std::less<>>, kLabelledFamilies> labelled_counters;
  // The nodes of each map in its order, rebuilt at the scrape after a counter was created (none is ever
  // erased): a scrape copies ~40,000 counters of 1,000 connectors x 2 directions, and walking the tree node
  // by node under the mutex took a sixth of its CPU.
  using LabelledEntry = std::pair<const std::string, std::uint64_t>;
  std::array<std::vector<const LabelledEntry*>, kLabelledFamilies> labelled_order;
  std::string labelled_key;  // reused: counting a known label set allocates nothing
  std::vector<std::pair<std::string, std::int64_t>> certificates;  // rendered labels, notAfter

  std::mutex scrape_mutex;  // guards the two below: one scrape at a time reuses them
  Snapshot snapshot;
  std::size_t last_text_size = 0;

  // Callers hold `mutex`.
  ConnectorSeries& connector(std::string_view name, config::Direction direction) {
    auto& index = connector_index[index_of(direction)];
    if (auto it = index.find(name); it != index.end()) return *it->second;
    auto& series = *connector_list.emplace_back(std::make_unique<ConnectorSeries>(name, direction, connector_list.size()));
    index.emplace(std::string(name), &series);
    return series;
  }

  ListenerSeries& listener(std::string_view name) {
    if (auto it = listener_index.find(name); it != listener_index.end()) return *it->second;
    auto& series = *listener_list.emplace_back(std::make_unique<ListenerSeries>(name));
    listener_index.emplace(std::string(name), &series);
    return series;
  }

  // Labels in the order of their names (the exposition's convention).
  std::uint64_t& labelled(Labelled family,
                          std::initializer_list<std::pair<std::string_view, std::string_view>> labels) {
    labelled_key.clear();
    for (const auto& [name, value] : labels) {
      if (!labelled_key.empty()) labelled_key.push_back(',');
      exposition::append_label(labelled_key, name, value);
    }
    auto& counters = labelled_counters[static_cast<std::size_t>(family)];
    auto it = counters.find(labelled_key);
    if (it == counters.end()) it = counters.emplace(labelled_key, 0).first;
    return it->second;
  }

  void count_state_error(std::string_view reason) {
    std::lock_guard lock(mutex);
    ++labelled(Labelled::state_errors, {{"reason", reason}});
  }

  // Copies what a scrape writes, window sums and insights computed here; the text is written without the lock.
  void take_snapshot(WindowStore::TimePoint now, Snapshot& out) {
    std::lock_guard lock(mutex);
    windows.prune(now);
    remotes.prune(now);
    std::vector<std::pair<const ConnectorSeries*, std::size_t>> active;
    for (const auto& insight : compute_insights(windows, *config, now)) {
      for (std::size_t i = 0; i < kInsights.size(); ++i) {
        if (insight.insight == kInsights[i]) active.emplace_back(&connector(insight.connector, insight.direction), i);
      }
    }
    out.connectors.resize(connector_list.size());
    for (std::size_t i = 0; i < connector_list.size(); ++i) {
      const ConnectorSeries& series = *connector_list[i];
      auto& row = out.connectors[i];
      row.series = &series;
      row.values = series.values;
      row.window = windows.window_totals(series.name, series.direction, now);
      row.insight = {};
      const auto today = std::chrono::floor<std::chrono::days>(now);
      const auto first_day = std::chrono::floor<std::chrono::days>(now - windows.window() + std::chrono::hours(1));
      const HeavyHitters window_remotes =
          remotes.merged(series.name, series.direction, RemoteTable::remotes, first_day, today);
      row.remotes_tracked = window_remotes.size();
      row.remotes_error_bound = window_remotes.error_bound();
    }
    for (const auto& [series, i] : active) out.connectors[series->index].insight[i] = true;

    out.listeners.clear();
    for (const auto& series : listener_list) out.listeners.emplace_back(series.get(), series->values);
    for (std::size_t f = 0; f < kLabelledFamilies; ++f) {
      auto& order = labelled_order[f];
      if (order.size() != labelled_counters[f].size()) {
        order.clear();
        for (const auto& entry : labelled_counters[f]) order.push_back(&entry);
      }
      out.labelled[f].clear();
      for (const LabelledEntry* entry : order) out.labelled[f].emplace_back(&entry->first, entry->second);
    }
    out.certificates = certificates;
  }
};

std::size_t state_load_limit(const config::Config& config, std::string_view file) {
  // What a file written under `config` can reach, per connector x direction: hourly buckets, and a table of
  // top_remotes (+ top_domains) entries a day. The bytes per line are generous (a bucket line is ~40 bytes, a
  // drill-down entry 100-200, one with long names and four domains a few KiB): the margin also covers the
  // history that removed connectors keep for a window.
  constexpr std::size_t kBucketLineBytes = 256;
  constexpr std::size_t kEntryLineBytes = 2048;
  const std::size_t keys = connector_views(config).size();
  const auto hours = static_cast<std::size_t>(config.telemetry.window.count());
  std::size_t bound = 0;
  if (file == kStateFile) bound = keys * hours * kBucketLineBytes;
  if (file == kRemotesFile) {
    const std::size_t lines_a_day =
        config.telemetry.top_remotes + config.telemetry.top_domains + 4;  // + T, O
    bound = keys * (hours / 24 + 1) * lines_a_day * kEntryLineBytes;  // +1: the window's first day is partial
  }
  return std::max(kMaxStateFileBytes, bound);
}

Telemetry::Telemetry(Clock clock) : impl_(std::make_unique<Impl>(std::move(clock))) {}
Telemetry::~Telemetry() = default;

void Telemetry::configure(const config::Config& config) {
  auto snapshot = std::make_shared<const config::Config>(config);
  const auto views = connector_views(config);
  std::lock_guard lock(impl_->mutex);
  impl_->config = snapshot;
  impl_->windows.set_window(config.telemetry.window);
  impl_->remotes.set_limits({config.telemetry.top_remotes, config.telemetry.top_domains, config.telemetry.remotes,
                             config.telemetry.window});
  // A shorter window drops what it no longer covers now, not at whichever scrape comes next: a reload back to
  // the longer one must not bring back hours depending on whether Prometheus scraped in between.
  const auto now = impl_->clock();
  impl_->windows.prune(now);
  impl_->remotes.prune(now);

  // Connectors that left the configuration lose their info and threshold series (a changed type or
  // forced_tls is a new info series); their counters stay (counters must never go backwards while the
  // process lives).
  for (auto& series : impl_->connector_list) series->values.configured = false;
  for (const auto& view : views) {
    ConnectorValues& values = impl_->connector(view.name, view.direction).values;
    values.configured = true;
    values.type = view.type;
    values.forced_tls = view.forced_tls;
    values.alerts = view.alerts;
  }
  for (const auto& listener : config.listeners) impl_->listener(listener.name);

  // Every declared reason from the start (daemon/reasons.hpp); existing counters keep their values.
  for (const auto& listener : config.listeners) {
    for (const auto reason : reasons::rejects) {
      impl_->labelled(Labelled::rejects, {{"listener", listener.name}, {"reason", reason}});
    }
    for (const auto leg : kLegs) {
      for (const auto reason : reasons::tls_handshake_failures) {
        impl_->labelled(Labelled::tls_handshake_failures,
                        {{"leg", to_string(leg)}, {"listener", listener.name}, {"reason", reason}});
      }
    }
    if (!listener.tls) continue;
    // The connectors a client of this listener can be attributed to before its handshake: those of the
    // listener's direction that may match it, and "internet".
    for (const auto& view : views) {
      if (view.direction != listener.direction) continue;
      const auto* connector = config.find_connector(view.name);
      if (connector != nullptr && !connector->match.listeners.empty() &&
          std::find(connector->match.listeners.begin(), connector->match.listeners.end(), listener.name) ==
              connector->match.listeners.end())
        continue;
      for (const auto offered : reasons::tls_offered) {
        impl_->labelled(Labelled::tls_handshake_refused,
                        {{"connector", view.name}, {"listener", listener.name}, {"offered", offered}});
      }
    }
  }
  for (const auto& upstream : config.upstreams) {
    for (const auto reason : reasons::upstream_errors) {
      impl_->labelled(Labelled::upstream_errors, {{"reason", reason}, {"upstream", upstream.name}});
    }
    if (!upstream.mx) continue;
    for (const auto result : reasons::mx_attempts) {
      impl_->labelled(Labelled::mx_attempts, {{"result", result}, {"upstream", upstream.name}});
    }
  }
  if (config.tlsrpt.send) {  // the report mails' own sessions, under listener and upstream "tlsrpt"
    impl_->listener(reasons::tlsrpt_sessions);
    for (const auto reason : reasons::upstream_errors) {
      impl_->labelled(Labelled::upstream_errors, {{"reason", reason}, {"upstream", reasons::tlsrpt_sessions}});
    }
    for (const auto result : reasons::mx_attempts) {
      impl_->labelled(Labelled::mx_attempts, {{"result", result}, {"upstream", reasons::tlsrpt_sessions}});
    }
    for (const auto reason : reasons::tls_handshake_failures) {  // they have an upstream leg only
      impl_->labelled(
          Labelled::tls_handshake_failures,
          {{"leg", to_string(Leg::upstream)}, {"listener", reasons::tlsrpt_sessions}, {"reason", reason}});
    }
  }
  impl_->tlsrpt.set_submitter(
      {config.tlsrpt.organization_name, config.tlsrpt.contact_info, config.tlsrpt.submitter});
  for (const auto& view : views) {
    if (view.direction != config::Direction::outbound) continue;
    for (const auto policy : reasons::outbound_policies) {
      impl_->labelled(Labelled::outbound_policy, {{"connector", view.name}, {"policy", policy}, {"result", "success"}});
      for (const auto type : proto::tlsrpt::all_result_types) {
        impl_->labelled(Labelled::outbound_policy,
                        {{"connector", view.name}, {"policy", policy}, {"result", proto::tlsrpt::to_string(type)}});
      }
    }
  }
}

void Telemetry::certificates_loaded(const std::vector<CertificateExpiry>& certificates) {
  std::vector<std::pair<std::string, std::int64_t>> rendered;
  for (const auto& certificate : certificates) {
    std::string labels;
    exposition::append_label(labels, "certificate", certificate.certificate);
    labels.push_back(',');
    exposition::append_label(labels, "listener", certificate.listener);
    rendered.emplace_back(std::move(labels), certificate.not_after);
  }
  std::sort(rendered.begin(), rendered.end());
  // A file listed twice for one listener (a pair repeated, or a listener named "http" with http.tls's file)
  // is one series: a series twice in one scrape is a duplicate sample, which Prometheus drops with an error.
  // The same file read at the same time has the same notAfter.
  rendered.erase(std::unique(rendered.begin(), rendered.end(),
                             [](const auto& a, const auto& b) { return a.first == b.first; }),
                 rendered.end());
  std::lock_guard lock(impl_->mutex);
  impl_->certificates = std::move(rendered);
}

void Telemetry::message_delivered(std::string_view connector, config::Direction direction, proto::TlsVersion version,
                                  std::uint64_t bytes, std::uint32_t recipients, const Remote& remote) {
  const auto now = impl_->clock();
  const auto i = index_of(version);
  {
    std::lock_guard lock(impl_->mutex);
    ConnectorValues& values = impl_->connector(connector, direction).values;
    ++values.messages[i];
    values.bytes[i] += bytes;
    values.recipients[i] += recipients;
    if (below_tls12(version)) ++values.below_tls12;
    impl_->windows.add(connector, direction, version, now);

    HeavyHitters::Observation observation;
    observation.key = remote.address;
    observation.name = remote.name;
    observation.cipher = remote.cipher;
    observation.domains = remote.domains;
    observation.version = version;
    observation.policy = remote.policy;
    impl_->remotes.add(connector, direction, RemoteTable::remotes, observation, now);
    if (direction == config::Direction::outbound) {
      // Once per distinct destination domain, with the MX host it went to as the row's name.
      for (std::size_t d = 0; d < remote.domains.size(); ++d) {
        const std::string& domain = remote.domains[d];
        if (std::find(remote.domains.begin(), remote.domains.begin() + static_cast<std::ptrdiff_t>(d), domain) !=
            remote.domains.begin() + static_cast<std::ptrdiff_t>(d))
          continue;
        HeavyHitters::Observation per_domain = observation;
        per_domain.key = domain;
        per_domain.domains = {};
        impl_->remotes.add(connector, direction, RemoteTable::domains, per_domain, now);
      }
    }
  }
  impl_->messages_total.fetch_add(1, std::memory_order_relaxed);
}

void Telemetry::handshake_refused(std::string_view listener, std::string_view connector,
                                  config::Direction direction, std::string_view address, std::string_view name,
                                  std::string_view offered) {
  const auto now = impl_->clock();
  HeavyHitters::Observation observation;
  observation.key = address;
  observation.name = name;
  // "other" (SSL3, unknown) and "no_hello" name no version: the row's refused_version stays unknown, never
  // "none", which everywhere else is plaintext mail.
  observation.offered = proto::parse_tls_version(offered);
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::tls_handshake_refused,
                    {{"connector", connector}, {"listener", listener}, {"offered", offered}});
  // The outbound drill-down lists the MX hosts mail went to: a client of an outbound listener is none of them.
  if (direction == config::Direction::inbound)
    impl_->remotes.add(connector, direction, RemoteTable::remotes, observation, now);
}

std::vector<std::string> Telemetry::addresses_to_name(std::size_t most) {
  std::lock_guard lock(impl_->mutex);
  return impl_->remotes.take_pending(most);
}

void Telemetry::remote_named(std::string_view address, std::string_view verified_name, std::chrono::seconds ttl) {
  const auto now = impl_->clock();
  std::lock_guard lock(impl_->mutex);
  impl_->remotes.set_name(address, verified_name, now, ttl);
}

void Telemetry::session_opened(std::string_view listener) {
  {
    std::lock_guard lock(impl_->mutex);
    ++impl_->listener(listener).values.active;
  }
  impl_->sessions_active.fetch_add(1, std::memory_order_relaxed);
}

void Telemetry::session_closed(std::string_view listener, double duration_seconds) {
  {
    std::lock_guard lock(impl_->mutex);
    ListenerValues& values = impl_->listener(listener).values;
    --values.active;
    // The first bucket whose bound is >= the duration (le is inclusive); NaN lands in +Inf only.
    const auto bucket = std::find_if(kSessionBuckets.begin(), kSessionBuckets.end(),
                                     [&](double bound) { return bound >= duration_seconds; });
    ++values.duration_buckets[static_cast<std::size_t>(bucket - kSessionBuckets.begin())];
    values.duration_sum += duration_seconds;
    ++values.duration_count;
  }
  impl_->sessions_active.fetch_sub(1, std::memory_order_relaxed);
}

void Telemetry::leg_finished(std::string_view listener, Leg leg, proto::TlsVersion version) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->listener(listener).values.sessions[index_of(leg)][index_of(version)];
}

void Telemetry::tls_handshake_failed(std::string_view listener, Leg leg, std::string_view reason) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::tls_handshake_failures,
                    {{"leg", to_string(leg)}, {"listener", listener}, {"reason", reason}});
}

void Telemetry::upstream_error(std::string_view upstream, std::string_view reason) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::upstream_errors, {{"reason", reason}, {"upstream", upstream}});
}

void Telemetry::rejected(std::string_view listener, std::string_view reason) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::rejects, {{"listener", listener}, {"reason", reason}});
}

void Telemetry::http_rejected(HttpReject reason) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::http_rejects, {{"reason", to_string(reason)}});
}

void Telemetry::mx_attempt(std::string_view upstream, std::string_view result) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::mx_attempts, {{"result", result}, {"upstream", upstream}});
}

void Telemetry::outbound_policy(std::string_view connector, std::string_view policy, std::string_view result,
                                std::string_view domain) {
  const auto now = impl_->clock();
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::outbound_policy, {{"connector", connector}, {"policy", policy}, {"result", result}});
  if (result == "success" || domain.empty()) return;
  HeavyHitters::Observation failed;  // no version: a session that failed the domain's policy
  failed.key = domain;
  failed.policy = policy;
  impl_->remotes.add(connector, config::Direction::outbound, RemoteTable::domains, failed, now);
}

void Telemetry::tlsrpt_delivery(std::string_view method, std::string_view result) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::tlsrpt_deliveries, {{"method", method}, {"result", result}});
}

TlsRptStore& Telemetry::tlsrpt() { return impl_->tlsrpt; }

void Telemetry::internal_error(std::string_view component) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::internal_errors, {{"component", component}});
}

void Telemetry::config_reloaded(bool success) {
  std::lock_guard lock(impl_->mutex);
  ++impl_->labelled(Labelled::config_reloads, {{"result", success ? "success" : "failure"}});
  impl_->last_reload_successful.store(success, std::memory_order_relaxed);
}

void Telemetry::state_error(std::string_view reason) { impl_->count_state_error(reason); }

void Telemetry::dns_lookup(DnsType type, DnsOutcome outcome) {
  impl_->dns_lookups[static_cast<std::size_t>(type)][static_cast<std::size_t>(outcome)].fetch_add(
      1, std::memory_order_relaxed);
}

std::string Telemetry::metrics_text(std::string buffer) {
  const auto now = impl_->clock();
  std::lock_guard scrape_lock(impl_->scrape_mutex);
  impl_->take_snapshot(now, impl_->snapshot);
  for (std::size_t t = 0; t < all_dns_types.size(); ++t) {
    for (std::size_t o = 0; o < all_dns_outcomes.size(); ++o) {
      impl_->snapshot.dns_lookups[t][o] = impl_->dns_lookups[t][o].load(std::memory_order_relaxed);
    }
  }
  impl_->snapshot.sockets_unused = impl_->sockets_unused.load(std::memory_order_relaxed);
  impl_->snapshot.tlsrpt_sessions_dropped = impl_->tlsrpt.dropped_domains();  // the store's own lock
  impl_->snapshot.last_reload_successful =
      impl_->last_reload_successful.load(std::memory_order_relaxed) ? 1 : 0;
  const auto process = read_process_stats();
  buffer.clear();
  buffer.reserve(impl_->last_text_size + impl_->last_text_size / 16 + 4096);  // one allocation, no regrowth
  write_exposition(buffer, impl_->snapshot, process);
  impl_->last_text_size = buffer.size();
  return buffer;
}

Report Telemetry::report(int days) {
  const auto now = impl_->clock();
  std::lock_guard lock(impl_->mutex);
  impl_->windows.prune(now);  // buckets of a clock stepped back since count now, as at a scrape
  impl_->remotes.prune(now);
  Report report = build_report(impl_->windows, *impl_->config, days, now);
  add_drilldown(report, impl_->remotes, now);
  return report;
}

int Telemetry::window_days() const {
  std::lock_guard lock(impl_->mutex);
  return static_cast<int>(impl_->windows.window().count() / 24);
}

std::vector<StateFile> Telemetry::state_files() {
  // Copied under the mutex, serialized without it: formatting a large state (1,000 connectors x 90 days)
  // takes far longer than the copy, and every session waits on this mutex when it opens. Copied a few keys at
  // a time, too: the whole copy of that state takes 0.1-0.2 s. Each key's history is copied whole, so a
  // message is in this save or the next one, never in neither or twice.
  constexpr std::size_t kKeysPerLock = 16;
  std::optional<WindowStore> windows(std::in_place);
  std::optional<RemoteStore> remotes(std::in_place);
  for (std::optional<WindowStore::Key> after;;) {
    std::lock_guard lock(impl_->mutex);
    if (!(after = impl_->windows.copy_to(*windows, after, kKeysPerLock))) break;
  }
  for (std::optional<RemoteStore::Key> after;;) {
    std::lock_guard lock(impl_->mutex);
    if (!(after = impl_->remotes.copy_to(*remotes, after, kKeysPerLock))) break;
  }
  std::vector<StateFile> files(2);
  files[0] = {kStateFile, windows->serialize()};
  windows.reset();
  files[1] = {kRemotesFile, remotes->serialize()};
  remotes.reset();
  // TLS-RPT aggregates: kept until sent, so they are state like the windows.
  files.push_back(impl_->tlsrpt.state_file());
  return files;
}

bool Telemetry::load_state(const std::string& state_dir, std::string& error) {
  namespace fs = std::filesystem;
  error.clear();
  // TLS-RPT aggregates (state_dir/tlsrpt.state): the store moves a corrupt file aside itself; counted here.
  std::string tlsrpt_note;
  const auto unix_now =
      std::chrono::duration_cast<std::chrono::seconds>(impl_->clock().time_since_epoch()).count();
  if (!impl_->tlsrpt.load(state_dir, unix_now, tlsrpt_note)) {
    error = tlsrpt_note;
    return false;
  }
  if (!tlsrpt_note.empty()) {
    impl_->count_state_error("corrupt");
    error = tlsrpt_note;
  }
  std::shared_ptr<const config::Config> config;
  {
    std::lock_guard lock(impl_->mutex);
    config = impl_->config;
  }
  // Each file on its own: a corrupt drill-down never costs the windows, nor the other way round.
  const auto load = [&](const char* file, auto parse, std::string_view what) {
    std::string text;
    std::string parse_error;
    const StateRead read =
        read_state_file(state_dir, file, state_load_limit(*config, file), text, parse_error);
    if (read == StateRead::absent) return true;  // first start: empty
    if (read == StateRead::failed) {
      error = parse_error;
      return false;
    }
    if (read == StateRead::read) {
      std::lock_guard lock(impl_->mutex);
      if (parse(text, parse_error)) {
        // What the configured window no longer covers (it was shortened while the daemon was stopped).
        impl_->windows.prune(impl_->clock());
        impl_->remotes.prune(impl_->clock());
        return true;
      }
    }
    // Keep the evidence, start empty: a broken state file must never keep the relay from starting.
    const auto unix_time =
        std::chrono::duration_cast<std::chrono::seconds>(impl_->clock().time_since_epoch()).count();
    impl_->count_state_error("corrupt");
    const std::string path = (std::filesystem::path(state_dir) / file).string();
    error += (error.empty() ? "" : "; ") + path + " is unusable (" + parse_error + "); " +
             move_state_file_aside(state_dir, file, unix_time) + ", starting with empty " + std::string(what);
    return true;
  };
  if (!load(kStateFile, [&](std::string_view text, std::string& e) { return impl_->windows.deserialize(text, e); },
            "windows"))
    return false;
  return load(kRemotesFile,
              [&](std::string_view text, std::string& e) { return impl_->remotes.deserialize(text, e); },
              "drill-down tables");
}

void Telemetry::sockets_unused(std::size_t count) {
  impl_->sockets_unused.store(count, std::memory_order_relaxed);
}

std::uint64_t Telemetry::messages_total() const { return impl_->messages_total.load(std::memory_order_relaxed); }

std::uint64_t Telemetry::sessions_active() const {
  const auto active = impl_->sessions_active.load(std::memory_order_relaxed);
  return active < 0 ? 0 : static_cast<std::uint64_t>(active);
}

}  // namespace mailflow
