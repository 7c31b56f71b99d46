#include "daemon/telemetry.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>
#include <vector>

#include "daemon/process_metrics.hpp"
#include "daemon/report.hpp"
#include "daemon/window_store.hpp"

namespace mailflow {

std::string_view to_string(Leg leg) { return leg == Leg::client ? "client" : "upstream"; }

namespace {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

constexpr std::size_t kVersions = proto::all_tls_versions.size();
constexpr std::array<Leg, 2> kLegs{Leg::client, Leg::upstream};
constexpr std::array<std::string_view, 2> kInsights{"significant_tls10", "significant_no_tls"};
constexpr const char* kStateFile = "windows.state";
constexpr std::size_t kMaxStateFileBytes = 512u << 20;  // far above 90 days x hourly x many connectors

std::size_t index_of(proto::TlsVersion version) { return static_cast<std::size_t>(version); }
std::size_t index_of(config::Direction direction) { return static_cast<std::size_t>(direction); }
std::size_t index_of(Leg leg) { return static_cast<std::size_t>(leg); }

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

// Every metric family of mailflowd, declared together (names, types, help). The label names are fixed by
// the code that adds series below; INTERFACE.md "Metrics" is the contract.
struct Families {
  explicit Families(prometheus::Registry& r)
      : messages(prometheus::BuildCounter()
                     .Name("mailflow_messages_total")
                     .Help("Messages accepted by the upstream, by connector, direction and TLS version of the "
                           "external leg")
                     .Register(r)),
        message_bytes(prometheus::BuildCounter()
                          .Name("mailflow_message_bytes_total")
                          .Help("Bytes of accepted messages")
                          .Register(r)),
        recipients(prometheus::BuildCounter()
                       .Name("mailflow_recipients_total")
                       .Help("Recipients of accepted messages")
                       .Register(r)),
        sessions(prometheus::BuildCounter()
                     .Name("mailflow_sessions_total")
                     .Help("Finished connection legs by listener, leg (client/upstream) and TLS version")
                     .Register(r)),
        sessions_active(prometheus::BuildGauge()
                            .Name("mailflow_sessions_active")
                            .Help("Client sessions currently open")
                            .Register(r)),
        tls_handshake_failures(prometheus::BuildCounter()
                                   .Name("mailflow_tls_handshake_failures_total")
                                   .Help("Failed TLS handshakes by listener, leg and reason")
                                   .Register(r)),
        upstream_errors(prometheus::BuildCounter()
                            .Name("mailflow_upstream_errors_total")
                            .Help("Upstream connection and protocol errors")
                            .Register(r)),
        rejects(prometheus::BuildCounter()
                    .Name("mailflow_rejects_total")
                    .Help("Refusals and limits hit, by listener and reason")
                    .Register(r)),
        window_messages(prometheus::BuildGauge()
                            .Name("mailflow_window_messages")
                            .Help("Messages within the rolling window (telemetry.window)")
                            .Register(r)),
        window_tls_share(prometheus::BuildGauge()
                             .Name("mailflow_window_tls_share")
                             .Help("Share (0..1) of the window's messages per TLS version")
                             .Register(r)),
        connector_info(prometheus::BuildGauge()
                           .Name("mailflow_connector_info")
                           .Help("Configured connectors (always 1)")
                           .Register(r)),
        alert_threshold(prometheus::BuildGauge()
                            .Name("mailflow_alert_threshold")
                            .Help("Alert thresholds per connector (tls10_share, no_tls_share, min_messages)")
                            .Register(r)),
        insight_active(prometheus::BuildGauge()
                           .Name("mailflow_insight_active")
                           .Help("1 while an insight (significant_tls10, significant_no_tls) is active")
                           .Register(r)),
        below_tls12(prometheus::BuildCounter()
                        .Name("mailflow_below_tls12_total")
                        .Help("Messages without TLS or with TLS1.0/1.1: what breaks if TLS1.2 is enforced")
                        .Register(r)),
        session_duration(prometheus::BuildHistogram()
                             .Name("mailflow_session_duration_seconds")
                             .Help("Client session duration")
                             .Register(r)),
        config_reloads(prometheus::BuildCounter()
                           .Name("mailflow_config_reloads_total")
                           .Help("Configuration reloads by result (success, failure)")
                           .Register(r)),
        state_errors(prometheus::BuildCounter()
                         .Name("mailflow_state_errors_total")
                         .Help("Problems saving or loading the rolling windows state")
                         .Register(r)),
        build_info(prometheus::BuildGauge()
                       .Name("mailflow_build_info")
                       .Help("Build information (always 1)")
                       .Register(r)) {}

  Family<Counter>& messages;
  Family<Counter>& message_bytes;
  Family<Counter>& recipients;
  Family<Counter>& sessions;
  Family<Gauge>& sessions_active;
  Family<Counter>& tls_handshake_failures;
  Family<Counter>& upstream_errors;
  Family<Counter>& rejects;
  Family<Gauge>& window_messages;
  Family<Gauge>& window_tls_share;
  Family<Gauge>& connector_info;
  Family<Gauge>& alert_threshold;
  Family<Gauge>& insight_active;
  Family<Counter>& below_tls12;
  Family<Histogram>& session_duration;
  Family<Counter>& config_reloads;
  Family<Counter>& state_errors;
  Family<Gauge>& build_info;
};

// SMTP sessions: from an immediate QUIT (10 ms) to a slow DATA near the default timeouts (10 min).
const Histogram::BucketBoundaries kSessionBuckets{0.01, 0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                                  5,    10,   30,  60,   120, 300, 600};

// Cached series of one (connector, direction): the hot path touches only these pointers.
struct ConnectorSeries {
  std::array<Counter*, kVersions> messages{};
  std::array<Counter*, kVersions> bytes{};
  std::array<Counter*, kVersions> recipients{};
  std::array<Gauge*, kVersions> window_messages{};
  std::array<Gauge*, kVersions> window_share{};
  std::array<Gauge*, kInsights.size()> insight{};
  Counter* below_tls12 = nullptr;
};

struct ListenerSeries {
  Gauge* active = nullptr;
  Histogram* duration = nullptr;
  std::array<std::array<Counter*, kVersions>, kLegs.size()> sessions{};
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

std::string errno_text(int error) { return std::strerror(error); }

bool write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

}  // namespace

struct Telemetry::Impl {
  explicit Impl(Clock c) : clock(c ? std::move(c) : Clock([] { return std::chrono::system_clock::now(); })) {
    families.build_info.Add({{"version", MAILFLOW_VERSION}}).Set(1);
    for (const char* result : {"success", "failure"}) families.config_reloads.Add({{"result", result}});
  }

  Clock clock;
  prometheus::Registry registry;
  Families families{registry};

  std::atomic<std::uint64_t> messages_total{0};
  std::atomic<std::int64_t> sessions_active{0};

  mutable std::mutex mutex;  // guards everything below
  std::shared_ptr<const config::Config> config = std::make_shared<const config::Config>();
  WindowStore windows;
  std::array<StringMap<ConnectorSeries>, 2> connectors;  // by direction
  StringMap<ListenerSeries> listeners;
  StringMap<Counter*> labelled_counters;  // rarely used families, keyed by family + label values
  std::vector<Gauge*> info_series;
  std::vector<Gauge*> threshold_series;

  // Callers hold `mutex`.
  ConnectorSeries& connector(std::string_view name, config::Direction direction) {
    auto& map = connectors[index_of(direction)];
    if (auto it = map.find(name); it != map.end()) return it->second;
    const std::string name_text(name);
    const std::string direction_text(config::to_string(direction));
    ConnectorSeries series;
    for (const auto version : proto::all_tls_versions) {
      const prometheus::Labels labels{
          {"connector", name_text}, {"direction", direction_text}, {"tls_version", std::string(proto::to_string(version))}};
      const auto i = index_of(version);
      series.messages[i] = &families.messages.Add(labels);
      series.bytes[i] = &families.message_bytes.Add(labels);
      series.recipients[i] = &families.recipients.Add(labels);
      series.window_messages[i] = &families.window_messages.Add(labels);
      series.window_share[i] = &families.window_tls_share.Add(labels);
    }
    for (std::size_t i = 0; i < kInsights.size(); ++i) {
      series.insight[i] = &families.insight_active.Add(
          {{"connector", name_text}, {"direction", direction_text}, {"insight", std::string(kInsights[i])}});
    }
    series.below_tls12 = &families.below_tls12.Add({{"connector", name_text}, {"direction", direction_text}});
    return map.emplace(name_text, series).first->second;
  }

  ListenerSeries& listener(std::string_view name) {
    if (auto it = listeners.find(name); it != listeners.end()) return it->second;
    const std::string name_text(name);
    ListenerSeries series;
    series.active = &families.sessions_active.Add({{"listener", name_text}});
    series.duration = &families.session_duration.Add({{"listener", name_text}}, kSessionBuckets);
    for (const auto leg : kLegs) {
      for (const auto version : proto::all_tls_versions) {
        series.sessions[index_of(leg)][index_of(version)] = &families.sessions.Add(
            {{"listener", name_text}, {"leg", std::string(to_string(leg))},
             {"tls_version", std::string(proto::to_string(version))}});
      }
    }
    return listeners.emplace(name_text, series).first->second;
  }

  Counter& labelled(Family<Counter>& family, std::string_view name1, std::string_view value1,
                    std::string_view name2 = {}, std::string_view value2 = {}, std::string_view name3 = {},
                    std::string_view value3 = {}) {
    std::string key = family.GetName();
    for (const auto part : {value1, value2, value3}) {
      key += '\x1f';
      key += part;
    }
    if (auto it = labelled_counters.find(key); it != labelled_counters.end()) return *it->second;
    prometheus::Labels labels{{std::string(name1), std::string(value1)}};
    if (!name2.empty()) labels.emplace(std::string(name2), std::string(value2));
    if (!name3.empty()) labels.emplace(std::string(name3), std::string(value3));
    Counter& counter = family.Add(labels);
    labelled_counters.emplace(std::move(key), &counter);
    return counter;
  }

  void count_state_error(std::string_view reason) {
    std::lock_guard lock(mutex);
    labelled(families.state_errors, "reason", reason).Increment();
  }

  void refresh_window_gauges(WindowStore::TimePoint now) {
    windows.prune(now);
    for (const auto direction : {config::Direction::inbound, config::Direction::outbound}) {
      for (auto& [name, series] : connectors[index_of(direction)]) {
        const TlsCounts counts = windows.window_totals(name, direction, now);
        std::uint64_t total = 0;
        for (const auto c : counts) total += c;
        for (std::size_t i = 0; i < kVersions; ++i) {
          series.window_messages[i]->Set(static_cast<double>(counts[i]));
          series.window_share[i]->Set(total == 0 ? 0.0 : static_cast<double>(counts[i]) / static_cast<double>(total));
        }
        for (auto* gauge : series.insight) gauge->Set(0);
      }
    }
    for (const auto& insight : compute_insights(windows, *config, now)) {
      for (std::size_t i = 0; i < kInsights.size(); ++i) {
        if (insight.insight == kInsights[i]) connector(insight.connector, insight.direction).insight[i]->Set(1);
      }
    }
  }
};

Telemetry::Telemetry(Clock clock) : impl_(std::make_unique<Impl>(std::move(clock))) {}
Telemetry::~Telemetry() = default;

void Telemetry::configure(const config::Config& config) {
  auto snapshot = std::make_shared<const config::Config>(config);
  std::lock_guard lock(impl_->mutex);
  auto& f = impl_->families;
  impl_->config = snapshot;
  impl_->windows.set_window(config.telemetry.window);

  std::vector<Gauge*> info;
  std::vector<Gauge*> thresholds;
  for (const auto& view : connector_views(config)) {
    impl_->connector(view.name, view.direction);
    const std::string direction(config::to_string(view.direction));
    Gauge& g = f.connector_info.Add({{"connector", view.name},
                                     {"direction", direction},
                                     {"type", std::string(config::to_string(view.type))},
                                     {"forced_tls", view.forced_tls ? "true" : "false"}});
    g.Set(1);
    info.push_back(&g);
    const std::pair<const char*, double> kinds[] = {{"tls10_share", view.alerts.tls10_share},
                                                     {"no_tls_share", view.alerts.no_tls_share},
                                                     {"min_messages", static_cast<double>(view.alerts.min_messages)}};
    for (const auto& [kind, value] : kinds) {
      Gauge& t = f.alert_threshold.Add({{"connector", view.name}, {"direction", direction}, {"kind", kind}});
      t.Set(value);
      thresholds.push_back(&t);
    }
  }
  // Connectors that left the configuration (or changed type/forced_tls) lose their info and threshold
  // series; their counters stay (counters must never go backwards while the process lives).
  auto drop_stale = [](Family<Gauge>& family, const std::vector<Gauge*>& old, const std::vector<Gauge*>& now) {
    for (Gauge* gauge : old) {
      if (std::find(now.begin(), now.end(), gauge) == now.end()) family.Remove(gauge);
    }
  };
  drop_stale(f.connector_info, impl_->info_series, info);
  drop_stale(f.alert_threshold, impl_->threshold_series, thresholds);
  impl_->info_series = std::move(info);
  impl_->threshold_series = std::move(thresholds);

  for (const auto& listener : config.listeners) impl_->listener(listener.name);
}

void Telemetry::message_delivered(std::string_view connector, config::Direction direction, proto::TlsVersion version,
                                  std::uint64_t bytes, std::uint32_t recipients) {
  const auto now = impl_->clock();
  const auto i = index_of(version);
  {
    std::lock_guard lock(impl_->mutex);
    ConnectorSeries& series = impl_->connector(connector, direction);
    series.messages[i]->Increment();
    series.bytes[i]->Increment(static_cast<double>(bytes));
    series.recipients[i]->Increment(recipients);
    if (below_tls12(version)) series.below_tls12->Increment();
    impl_->windows.add(connector, direction, version, now);
  }
  impl_->messages_total.fetch_add(1, std::memory_order_relaxed);
}

void Telemetry::session_opened(std::string_view listener) {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->listener(listener).active->Increment();
  }
  impl_->sessions_active.fetch_add(1, std::memory_order_relaxed);
}

void Telemetry::session_closed(std::string_view listener, double duration_seconds) {
  {
    std::lock_guard lock(impl_->mutex);
    auto& series = impl_->listener(listener);
    series.active->Decrement();
    series.duration->Observe(duration_seconds);
  }
  impl_->sessions_active.fetch_sub(1, std::memory_order_relaxed);
}

void Telemetry::leg_finished(std::string_view listener, Leg leg, proto::TlsVersion version) {
  std::lock_guard lock(impl_->mutex);
  impl_->listener(listener).sessions[index_of(leg)][index_of(version)]->Increment();
}

void Telemetry::tls_handshake_failed(std::string_view listener, Leg leg, std::string_view reason) {
  std::lock_guard lock(impl_->mutex);
  impl_->labelled(impl_->families.tls_handshake_failures, "listener", listener, "leg", to_string(leg), "reason", reason)
      .Increment();
}

void Telemetry::upstream_error(std::string_view upstream, std::string_view reason) {
  std::lock_guard lock(impl_->mutex);
  impl_->labelled(impl_->families.upstream_errors, "upstream", upstream, "reason", reason).Increment();
}

void Telemetry::rejected(std::string_view listener, std::string_view reason) {
  std::lock_guard lock(impl_->mutex);
  impl_->labelled(impl_->families.rejects, "listener", listener, "reason", reason).Increment();
}

void Telemetry::config_reloaded(bool success) {
  std::lock_guard lock(impl_->mutex);
  impl_->labelled(impl_->families.config_reloads, "result", success ? "success" : "failure").Increment();
}

void Telemetry::state_error(std::string_view reason) { impl_->count_state_error(reason); }

std::string Telemetry::metrics_text() {
  const auto now = impl_->clock();
  {
    std::lock_guard lock(impl_->mutex);
    impl_->refresh_window_gauges(now);
  }
  std::vector<prometheus::MetricFamily> families = impl_->registry.Collect();

  if (const auto stats = read_process_stats()) {
    auto add = [&](const char* name, const char* help, prometheus::MetricType type, double value) {
      prometheus::MetricFamily family{name, help, type, {}};
      prometheus::ClientMetric metric;
      if (type == prometheus::MetricType::Counter) {
        metric.counter.value = value;
      } else {
        metric.gauge.value = value;
      }
      family.metric.push_back(metric);
      families.push_back(std::move(family));
    };
    using prometheus::MetricType;
    add("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", MetricType::Counter,
        stats->cpu_seconds);
    add("process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge, stats->max_fds);
    add("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, stats->open_fds);
    add("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge, stats->resident_bytes);
    add("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", MetricType::Gauge,
        stats->start_time_seconds);
    add("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge, stats->virtual_bytes);
  }

  std::ostringstream out;
  prometheus::TextSerializer{}.Serialize(out, families);
  return std::move(out).str();
}

Report Telemetry::report(int days) {
  const auto now = impl_->clock();
  std::lock_guard lock(impl_->mutex);
  return build_report(impl_->windows, *impl_->config, days, now);
}

int Telemetry::window_days() const {
  std::lock_guard lock(impl_->mutex);
  return static_cast<int>(impl_->windows.window().count() / 24);
}

bool Telemetry::save_state(const std::string& state_dir, std::string& error) {
  namespace fs = std::filesystem;
  std::string text;
  {
    std::lock_guard lock(impl_->mutex);
    text = impl_->windows.serialize();
  }
  const fs::path path = fs::path(state_dir) / kStateFile;
  const fs::path temp = fs::path(state_dir) / (std::string(kStateFile) + ".tmp");
  auto fail = [&](const std::string& what, int saved_errno) {
    error = what + ": " + errno_text(saved_errno);  // the caller logs and counts it (state_error)
    return false;
  };

  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (fd < 0) return fail("cannot create " + temp.string(), errno);
  if (!write_all(fd, text) || ::fsync(fd) != 0) {
    const int saved = errno;
    ::close(fd);
    ::unlink(temp.c_str());
    return fail("cannot write " + temp.string(), saved);
  }
  if (::close(fd) != 0) {
    const int saved = errno;
    ::unlink(temp.c_str());
    return fail("cannot write " + temp.string(), saved);
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int saved = errno;
    ::unlink(temp.c_str());
    return fail("cannot rename " + temp.string() + " to " + path.string(), saved);
  }
  // The rename is durable only once the directory entry is on disk.
  const int dir_fd = ::open(state_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return fail("cannot open " + state_dir, errno);
  if (::fsync(dir_fd) != 0) {
    const int saved = errno;
    ::close(dir_fd);
    return fail("cannot sync " + state_dir, saved);
  }
  ::close(dir_fd);
  error.clear();
  return true;
}

bool Telemetry::load_state(const std::string& state_dir, std::string& error) {
  namespace fs = std::filesystem;
  error.clear();
  const fs::path path = fs::path(state_dir) / kStateFile;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return true;  // first start: empty windows
    error = "cannot open " + path.string() + ": " + errno_text(errno);
    return false;
  }
  std::string text;
  char buffer[65536];
  bool too_big = false;
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int saved = errno;
      ::close(fd);
      error = "cannot read " + path.string() + ": " + errno_text(saved);
      return false;
    }
    if (n == 0) break;
    if (text.size() + static_cast<std::size_t>(n) > kMaxStateFileBytes) {
      too_big = true;
      break;
    }
    text.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fd);

  std::string parse_error = too_big ? "larger than " + std::to_string(kMaxStateFileBytes) + " bytes" : "";
  if (!too_big) {
    std::lock_guard lock(impl_->mutex);
    if (impl_->windows.deserialize(text, parse_error)) return true;
  }
  // Keep the evidence, start empty: a broken state file must never keep the relay from starting.
  const auto unix_time =
      std::chrono::duration_cast<std::chrono::seconds>(impl_->clock().time_since_epoch()).count();
  const fs::path aside = fs::path(state_dir) / (std::string(kStateFile) + ".corrupt-" + std::to_string(unix_time));
  impl_->count_state_error("corrupt");
  if (::rename(path.c_str(), aside.c_str()) != 0) {
    error = path.string() + " is unusable (" + parse_error + ") and cannot be moved aside: " + errno_text(errno) +
            "; starting with empty windows";
  } else {
    error = path.string() + " is unusable (" + parse_error + "); moved to " + aside.string() +
            ", starting with empty windows";
  }
  return true;
}

std::uint64_t Telemetry::messages_total() const { return impl_->messages_total.load(std::memory_order_relaxed); }

std::uint64_t Telemetry::sessions_active() const {
  const auto active = impl_->sessions_active.load(std::memory_order_relaxed);
  return active < 0 ? 0 : static_cast<std::uint64_t>(active);
}

}  // namespace mailflow
