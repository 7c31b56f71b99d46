#include "daemon/telemetry.hpp"

#include <doctest/doctest.h>

#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "daemon/exposition.hpp"
#include "daemon/heavy_hitters.hpp"
#include "daemon/reasons.hpp"
#include "daemon/report.hpp"
#include "daemon/state_file.hpp"
#include "daemon/state_writer.hpp"
#include "daemon/tlsrpt.hpp"

namespace {

using mailflow::Telemetry;

// What the daemon's StateWriter does with Telemetry's files, here on the test's thread: false + error at the
// first file that cannot be written.
bool save_state(Telemetry& telemetry, const std::string& dir, std::string& error) {
  for (const auto& file : telemetry.state_files())
    if (!mailflow::write_state_file(dir, file.name, file.text, error)) return false;
  return true;
}
using mailflow::config::Direction;
using mailflow::proto::TlsVersion;
using namespace std::chrono_literals;

// 2026-11-25T10:30:00Z
const std::chrono::system_clock::time_point kNow = std::chrono::sys_days{std::chrono::year{2026} / 11 / 25} + 10h + 30min;

mailflow::config::Config test_config() {
  mailflow::config::Config config;
  mailflow::config::Listener in;
  in.name = "inbound";
  in.direction = Direction::inbound;
  in.upstream = "mailstore";
  config.listeners.push_back(in);

  mailflow::config::Connector contoso;
  contoso.name = "partner-contoso";
  contoso.type = mailflow::config::ConnectorType::partner;
  contoso.direction = Direction::inbound;
  contoso.require_tls = true;
  contoso.alerts = {0.1, 0.2, 2};
  config.connectors.push_back(contoso);

  mailflow::config::Connector fabrikam;
  fabrikam.name = "partner-fabrikam";
  fabrikam.type = mailflow::config::ConnectorType::partner;
  fabrikam.direction = Direction::inbound;
  config.connectors.push_back(fabrikam);
  return config;
}

// The sample value of the exposition line whose series (name{labels}) is exactly `series`.
std::optional<double> sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.size() > series.size() && line.compare(0, series.size(), series) == 0 && line[series.size()] == ' ') {
      return std::stod(line.substr(series.size() + 1));
    }
  }
  return std::nullopt;
}

bool has_series_prefix(const std::string& text, const std::string& prefix) {
  return text.find("\n" + prefix) != std::string::npos || text.rfind(prefix, 0) == 0;
}

std::filesystem::path fresh_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("mailflow-telemetry-" + name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace

TEST_CASE("configure exports zero series for every connector, the implicit internet connector and listeners") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  const std::string text = telemetry.metrics_text();

  for (const char* connector : {"partner-contoso", "partner-fabrikam", "internet"}) {
    for (const char* version : {"none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"}) {
      const std::string labels = std::string("{connector=\"") + connector + "\",direction=\"inbound\",tls_version=\"" +
                                 version + "\"}";
      CAPTURE(labels);
      CHECK(sample(text, "mailflow_messages_total" + labels) == 0.0);
      CHECK(sample(text, "mailflow_message_bytes_total" + labels) == 0.0);
      CHECK(sample(text, "mailflow_recipients_total" + labels) == 0.0);
      CHECK(sample(text, "mailflow_window_messages" + labels) == 0.0);
      CHECK(sample(text, "mailflow_window_tls_share" + labels) == 0.0);
    }
    const std::string cd = std::string("connector=\"") + connector + "\",direction=\"inbound\"";
    CHECK(sample(text, "mailflow_below_tls12_total{" + cd + "}") == 0.0);
    CHECK(sample(text, "mailflow_insight_active{" + cd + ",insight=\"significant_tls10\"}") == 0.0);
    CHECK(sample(text, "mailflow_insight_active{" + cd + ",insight=\"significant_no_tls\"}") == 0.0);
  }
  // No outbound listener: no outbound internet connector.
  CHECK_FALSE(has_series_prefix(text, "mailflow_messages_total{connector=\"internet\",direction=\"outbound\""));

  CHECK(sample(text, R"(mailflow_connector_info{connector="partner-contoso",direction="inbound",forced_tls="true",type="partner"})") == 1.0);
  CHECK(sample(text, R"(mailflow_connector_info{connector="partner-fabrikam",direction="inbound",forced_tls="false",type="partner"})") == 1.0);
  CHECK(sample(text, R"(mailflow_connector_info{connector="internet",direction="inbound",forced_tls="false",type="internet"})") == 1.0);

  CHECK(sample(text, R"(mailflow_alert_threshold{connector="partner-contoso",direction="inbound",kind="tls10_share"})") == 0.1);
  CHECK(sample(text, R"(mailflow_alert_threshold{connector="partner-contoso",direction="inbound",kind="no_tls_share"})") == 0.2);
  CHECK(sample(text, R"(mailflow_alert_threshold{connector="partner-contoso",direction="inbound",kind="min_messages"})") == 2.0);
  // internet inherits telemetry.defaults
  CHECK(sample(text, R"(mailflow_alert_threshold{connector="internet",direction="inbound",kind="min_messages"})") == 100.0);

  CHECK(sample(text, R"(mailflow_sessions_active{listener="inbound"})") == 0.0);
  for (const char* leg : {"client", "upstream"}) {
    for (const char* version : {"none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"}) {
      CHECK(sample(text, std::string("mailflow_sessions_total{leg=\"") + leg + "\",listener=\"inbound\",tls_version=\"" +
                             version + "\"}") == 0.0);
    }
  }
  CHECK(sample(text, R"(mailflow_session_duration_seconds_count{listener="inbound"})") == 0.0);
  CHECK(sample(text, R"(mailflow_session_duration_seconds_bucket{listener="inbound",le="600"})") == 0.0);
  CHECK(sample(text, R"(mailflow_config_reloads_total{result="success"})") == 0.0);
  CHECK(sample(text, R"(mailflow_config_reloads_total{result="failure"})") == 0.0);
  CHECK(sample(text, "mailflow_build_info{version=\"" MAILFLOW_VERSION "\"}") == 1.0);

  CHECK(text.find("# TYPE mailflow_messages_total counter") != std::string::npos);
  CHECK(text.find("# TYPE mailflow_window_tls_share gauge") != std::string::npos);
  CHECK(text.find("# TYPE mailflow_session_duration_seconds histogram") != std::string::npos);
  CHECK(text.find("# TYPE process_cpu_seconds_total counter") != std::string::npos);
  for (const char* name : {"process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds",
                           "process_max_fds", "process_start_time_seconds"}) {
    CAPTURE(name);
    const auto value = sample(text, name);
    REQUIRE(value.has_value());
    CHECK(*value > 0);
  }
}

TEST_CASE("delivered messages count with exact labels, below_tls12 only below TLS1.2, window gauges") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls10, 1000, 3);
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls10, 500, 1);
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls12, 250, 2);
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::none, 10, 1);
  telemetry.message_delivered("partner-fabrikam", Direction::inbound, TlsVersion::tls13, 10, 1);
  CHECK(telemetry.messages_total() == 5);

  const std::string text = telemetry.metrics_text();
  const std::string c = R"({connector="partner-contoso",direction="inbound",tls_version=)";
  CHECK(sample(text, "mailflow_messages_total" + c + "\"TLS1.0\"}") == 2.0);
  CHECK(sample(text, "mailflow_messages_total" + c + "\"TLS1.2\"}") == 1.0);
  CHECK(sample(text, "mailflow_messages_total" + c + "\"none\"}") == 1.0);
  CHECK(sample(text, "mailflow_messages_total" + c + "\"TLS1.3\"}") == 0.0);
  CHECK(sample(text, "mailflow_message_bytes_total" + c + "\"TLS1.0\"}") == 1500.0);
  CHECK(sample(text, "mailflow_recipients_total" + c + "\"TLS1.0\"}") == 4.0);
  CHECK(sample(text, "mailflow_recipients_total" + c + "\"TLS1.2\"}") == 2.0);
  CHECK(sample(text, R"(mailflow_below_tls12_total{connector="partner-contoso",direction="inbound"})") == 3.0);
  CHECK(sample(text, R"(mailflow_below_tls12_total{connector="partner-fabrikam",direction="inbound"})") == 0.0);

  CHECK(sample(text, "mailflow_window_messages" + c + "\"TLS1.0\"}") == 2.0);
  CHECK(sample(text, "mailflow_window_tls_share" + c + "\"TLS1.0\"}") == 0.5);
  CHECK(sample(text, "mailflow_window_tls_share" + c + "\"TLS1.2\"}") == 0.25);
  CHECK(sample(text, "mailflow_window_tls_share" + c + "\"TLS1.3\"}") == 0.0);
  CHECK(sample(text, R"(mailflow_window_tls_share{connector="partner-fabrikam",direction="inbound",tls_version="TLS1.3"})") == 1.0);

  // contoso: 4 messages >= min_messages 2; TLS1.0 50% > 10%, none 25% > 20%.
  CHECK(sample(text, R"(mailflow_insight_active{connector="partner-contoso",direction="inbound",insight="significant_tls10"})") == 1.0);
  CHECK(sample(text, R"(mailflow_insight_active{connector="partner-contoso",direction="inbound",insight="significant_no_tls"})") == 1.0);
  // fabrikam: 1 message < default min_messages 100.
  CHECK(sample(text, R"(mailflow_insight_active{connector="partner-fabrikam",direction="inbound",insight="significant_tls10"})") == 0.0);
}

TEST_CASE("an unknown connector (unmatched outbound traffic) gets its series on first use") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  telemetry.message_delivered("internet", Direction::outbound, TlsVersion::tls11, 42, 1);
  const std::string text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_messages_total{connector="internet",direction="outbound",tls_version="TLS1.1"})") == 1.0);
  CHECK(sample(text, R"(mailflow_messages_total{connector="internet",direction="outbound",tls_version="TLS1.3"})") == 0.0);
  CHECK(sample(text, R"(mailflow_below_tls12_total{connector="internet",direction="outbound"})") == 1.0);
}

TEST_CASE("sessions, handshake failures, upstream errors, rejects, reloads and state errors") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  telemetry.session_opened("inbound");
  telemetry.session_opened("inbound");
  telemetry.session_closed("inbound", 0.3);
  telemetry.leg_finished("inbound", mailflow::Leg::client, TlsVersion::tls13);
  telemetry.leg_finished("inbound", mailflow::Leg::upstream, TlsVersion::none);
  telemetry.tls_handshake_failed("inbound", mailflow::Leg::client, "protocol_version");
  telemetry.upstream_error("mailstore", "connect");
  telemetry.upstream_error("mailstore", "connect");
  telemetry.rejected("inbound", "bad_command");
  telemetry.config_reloaded(true);
  telemetry.config_reloaded(false);
  telemetry.config_reloaded(false);
  telemetry.state_error("save");
  CHECK(telemetry.sessions_active() == 1);

  const std::string text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_sessions_active{listener="inbound"})") == 1.0);
  CHECK(sample(text, R"(mailflow_session_duration_seconds_count{listener="inbound"})") == 1.0);
  CHECK(sample(text, R"(mailflow_session_duration_seconds_bucket{listener="inbound",le="0.25"})") == 0.0);
  CHECK(sample(text, R"(mailflow_session_duration_seconds_bucket{listener="inbound",le="0.5"})") == 1.0);
  CHECK(sample(text, R"(mailflow_sessions_total{leg="client",listener="inbound",tls_version="TLS1.3"})") == 1.0);
  CHECK(sample(text, R"(mailflow_sessions_total{leg="upstream",listener="inbound",tls_version="none"})") == 1.0);
  CHECK(sample(text, R"(mailflow_tls_handshake_failures_total{leg="client",listener="inbound",reason="protocol_version"})") == 1.0);
  CHECK(sample(text, R"(mailflow_upstream_errors_total{reason="connect",upstream="mailstore"})") == 2.0);
  CHECK(sample(text, R"(mailflow_rejects_total{listener="inbound",reason="bad_command"})") == 1.0);
  CHECK(sample(text, R"(mailflow_config_reloads_total{result="success"})") == 1.0);
  CHECK(sample(text, R"(mailflow_config_reloads_total{result="failure"})") == 2.0);
  CHECK(sample(text, R"(mailflow_state_errors_total{reason="save"})") == 1.0);
}

TEST_CASE("reload drops info and thresholds of removed connectors but keeps their counters") {
  Telemetry telemetry([] { return kNow; });
  auto config = test_config();
  telemetry.configure(config);
  telemetry.message_delivered("partner-fabrikam", Direction::inbound, TlsVersion::tls12, 10, 1);

  config.connectors.pop_back();                  // fabrikam removed
  config.connectors.front().require_tls = false;  // contoso's forced_tls changes
  telemetry.configure(config);
  const std::string text = telemetry.metrics_text();
  CHECK(text.find(R"(mailflow_connector_info{connector="partner-fabrikam")") == std::string::npos);
  CHECK(text.find(R"(mailflow_alert_threshold{connector="partner-fabrikam")") == std::string::npos);
  CHECK(sample(text, R"(mailflow_connector_info{connector="partner-contoso",direction="inbound",forced_tls="false",type="partner"})") == 1.0);
  CHECK_FALSE(sample(text, R"(mailflow_connector_info{connector="partner-contoso",direction="inbound",forced_tls="true",type="partner"})"));
  CHECK(sample(text, R"(mailflow_messages_total{connector="partner-fabrikam",direction="inbound",tls_version="TLS1.2"})") == 1.0);
}

TEST_CASE("a connector removed or renamed by a reload leaves no ghost window or insight series") {
  Telemetry telemetry([] { return kNow; });
  auto config = test_config();
  telemetry.configure(config);
  // fabrikam: 3 of 3 messages over TLS1.1 (min_messages 100 by default: lower it so the insight is active).
  config.connectors.back().alerts.min_messages = 1;
  telemetry.configure(config);
  for (int i = 0; i < 3; ++i) telemetry.message_delivered("partner-fabrikam", Direction::inbound, TlsVersion::tls11, 10, 1);
  const std::string before = telemetry.metrics_text();
  const std::string active =
      R"(mailflow_insight_active{connector="partner-fabrikam",direction="inbound",insight="significant_tls11"})";
  CHECK(sample(before, active) == 1.0);
  CHECK(sample(before, R"(mailflow_alert_threshold{connector="partner-fabrikam",direction="inbound",kind="tls11_share"})") ==
        0.05);
  CHECK(sample(before, R"(mailflow_window_messages{connector="partner-fabrikam",direction="inbound",tls_version="TLS1.1"})") ==
        3.0);

  config.connectors.back().name = "partner-fabrikam-eu";  // renamed by a reload
  telemetry.configure(config);
  const std::string after = telemetry.metrics_text();
  CHECK_FALSE(sample(after, active));
  CHECK_FALSE(has_series_prefix(after, R"(mailflow_insight_active{connector="partner-fabrikam",)"));
  CHECK_FALSE(has_series_prefix(after, R"(mailflow_window_messages{connector="partner-fabrikam",)"));
  CHECK_FALSE(has_series_prefix(after, R"(mailflow_window_tls_share{connector="partner-fabrikam",)"));
  // The new name starts with zeros; the old counters stay (they never go backwards).
  CHECK(sample(after, R"(mailflow_insight_active{connector="partner-fabrikam-eu",direction="inbound",insight="significant_tls11"})") ==
        0.0);
  CHECK(sample(after, R"(mailflow_messages_total{connector="partner-fabrikam",direction="inbound",tls_version="TLS1.1"})") ==
        3.0);
  // The report keeps the history, marked as removed, without an insight.
  const auto report = telemetry.report(1);
  CHECK(report.insights.empty());
  bool found = false;
  for (const auto& c : report.connectors) {
    if (c.connector != "partner-fabrikam") continue;
    found = true;
    CHECK_FALSE(c.configured);
    CHECK(c.counts[static_cast<std::size_t>(TlsVersion::tls11)] == 3);
  }
  CHECK(found);
}

TEST_CASE("unmatched traffic of a direction whose last listener a reload removed: no insight, in metrics or report") {
  Telemetry telemetry([] { return kNow; });
  auto config = test_config();
  config.telemetry.defaults.min_messages = 1;
  mailflow::config::Listener out;
  out.name = "outbound";
  out.direction = Direction::outbound;
  out.upstream = "mailstore";
  config.listeners.push_back(out);
  telemetry.configure(config);
  for (int i = 0; i < 3; ++i) telemetry.message_delivered("internet", Direction::outbound, TlsVersion::tls10, 10, 1);
  const std::string active =
      R"(mailflow_insight_active{connector="internet",direction="outbound",insight="significant_tls10"})";
  CHECK(sample(telemetry.metrics_text(), active) == 1.0);
  CHECK(telemetry.report(1).insights.size() == 1);

  config.listeners.pop_back();  // the outbound listener is gone: so is the outbound "internet" connector
  telemetry.configure(config);
  const std::string after = telemetry.metrics_text();
  CHECK_FALSE(sample(after, active));
  CHECK_FALSE(has_series_prefix(after, R"(mailflow_window_messages{connector="internet",direction="outbound",)"));
  // The report agrees with the metrics: the history is kept, marked as no longer configured, and raises nothing.
  const auto report = telemetry.report(1);
  CHECK(report.insights.empty());
  bool found = false;
  for (const auto& c : report.connectors) {
    if (c.connector != "internet" || c.direction != Direction::outbound) continue;
    found = true;
    CHECK_FALSE(c.configured);
    CHECK(c.counts[static_cast<std::size_t>(TlsVersion::tls10)] == 3);
  }
  CHECK(found);
}

TEST_CASE("refused client handshakes: zeros per listener with TLS x matchable connector x offered version") {
  Telemetry telemetry([] { return kNow; });
  auto config = test_config();
  config.listeners.front().tls = mailflow::config::ListenerTls{};
  mailflow::config::Listener plain;
  plain.name = "plain";
  plain.direction = Direction::inbound;
  plain.upstream = "mailstore";
  config.listeners.push_back(plain);
  config.connectors.back().match.listeners = {"plain"};  // fabrikam cannot be seen on "inbound"
  telemetry.configure(config);
  std::string text = telemetry.metrics_text();
  for (const auto offered : mailflow::reasons::tls_offered) {
    for (const std::string connector : {"partner-contoso", "internet"}) {
      CAPTURE(connector);
      CAPTURE(offered);
      CHECK(sample(text, "mailflow_tls_handshake_refused_total{connector=\"" + connector +
                             "\",listener=\"inbound\",offered=\"" + std::string(offered) + "\"}") == 0.0);
    }
  }
  CHECK_FALSE(has_series_prefix(text, R"(mailflow_tls_handshake_refused_total{connector="partner-fabrikam")"));
  CHECK_FALSE(has_series_prefix(text, R"(mailflow_tls_handshake_refused_total{connector="partner-contoso",listener="plain")"));
  telemetry.handshake_refused("inbound", "partner-contoso", mailflow::config::Direction::inbound, "203.0.113.7",
                              "mx2.contoso.example", "TLS1.0");
  text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_tls_handshake_refused_total{connector="partner-contoso",listener="inbound",offered="TLS1.0"})") ==
        1.0);
}

TEST_CASE("window length follows telemetry.window") {
  Telemetry telemetry([] { return kNow; });
  auto config = test_config();
  config.telemetry.window = std::chrono::hours(24 * 30);
  telemetry.configure(config);
  CHECK(telemetry.window_days() == 30);
  const auto report = telemetry.report(30);
  CHECK(report.days == 30);
}

TEST_CASE("state survives save and load, a missing file is an empty start") {
  const auto dir = fresh_dir("roundtrip");
  std::string error;
  {
    Telemetry telemetry([] { return kNow; });
    telemetry.configure(test_config());
    CHECK(telemetry.load_state(dir.string(), error));  // no file yet
    CHECK(error.empty());
    telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls10, 1, 1);
    telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls13, 1, 1);
    REQUIRE_MESSAGE(save_state(telemetry, dir.string(), error), error);
  }
  CHECK(std::filesystem::exists(dir / "windows.state"));
  CHECK_FALSE(std::filesystem::exists(dir / "windows.state.tmp"));

  Telemetry restarted([] { return kNow + 1h; });
  restarted.configure(test_config());
  REQUIRE(restarted.load_state(dir.string(), error));
  CHECK(error.empty());
  const std::string text = restarted.metrics_text();
  CHECK(sample(text, R"(mailflow_window_messages{connector="partner-contoso",direction="inbound",tls_version="TLS1.0"})") == 1.0);
  CHECK(sample(text, R"(mailflow_window_tls_share{connector="partner-contoso",direction="inbound",tls_version="TLS1.3"})") == 0.5);
  // Counters are process-lifetime (Prometheus handles the reset); only windows persist.
  CHECK(sample(text, R"(mailflow_messages_total{connector="partner-contoso",direction="inbound",tls_version="TLS1.0"})") == 0.0);
  std::filesystem::remove_all(dir);
}

// The drill-down's rows of partner-contoso/inbound in the report at the telemetry's clock (7 days).
std::size_t contoso_remotes(Telemetry& telemetry) {
  for (const auto& drilldown : telemetry.report(7).drilldowns)
    if (drilldown.connector == "partner-contoso" && drilldown.direction == Direction::inbound)
      return drilldown.remotes.rows.size();
  return 0;
}

TEST_CASE("a clock far ahead at start shows an empty window but deletes no history: corrected, it is back") {
  const auto dir = fresh_dir("clock-ahead");
  std::string error;
  auto now = kNow;
  const Telemetry::Clock clock = [&now] { return now; };
  const std::string tls12 =
      R"(mailflow_window_messages{connector="partner-contoso",direction="inbound",tls_version="TLS1.2"})";
  mailflow::Remote remote;
  remote.address = "192.0.2.7";
  remote.name = "mx.contoso.example";
  {
    Telemetry telemetry(clock);
    telemetry.configure(test_config());
    telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls12, 1, 1, remote);
    REQUIRE_MESSAGE(save_state(telemetry, dir.string(), error), error);
  }
  // A VM boots with its clock a year ahead: mailflowd loads its state, is scraped, asked for the report and
  // saves before NTP steps the clock back.
  now = kNow + 24h * 365;
  Telemetry restarted(clock);
  restarted.configure(test_config());
  REQUIRE(restarted.load_state(dir.string(), error));
  CHECK(sample(restarted.metrics_text(), tls12) == 0.0);  // the window ending a year from now is empty
  CHECK(contoso_remotes(restarted) == 0);
  REQUIRE_MESSAGE(save_state(restarted, dir.string(), error), error);

  now = kNow + 1h;  // the clock is corrected
  CHECK(sample(restarted.metrics_text(), tls12) == 1.0);
  CHECK(contoso_remotes(restarted) == 1);
  Telemetry again(clock);  // and what it saved under the wrong clock still holds the history
  again.configure(test_config());
  REQUIRE(again.load_state(dir.string(), error));
  CHECK(sample(again.metrics_text(), tls12) == 1.0);
  CHECK(contoso_remotes(again) == 1);
  std::filesystem::remove_all(dir);
}

TEST_CASE("a clock far behind at start (an RTC reset) hides the window but keeps it: corrected, it is back") {
  auto now = kNow;
  Telemetry telemetry([&now] { return now; });
  telemetry.configure(test_config());
  mailflow::Remote remote;
  remote.address = "192.0.2.7";
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls12, 1, 1, remote);
  const std::string tls12 =
      R"(mailflow_window_messages{connector="partner-contoso",direction="inbound",tls_version="TLS1.2"})";
  now = kNow - 24h * 365;
  CHECK(sample(telemetry.metrics_text(), tls12) == 0.0);
  CHECK(contoso_remotes(telemetry) == 0);
  now = kNow + 1h;
  CHECK(sample(telemetry.metrics_text(), tls12) == 1.0);
  CHECK(contoso_remotes(telemetry) == 1);
}

TEST_CASE("messages counted before the clock was stepped back count now, once, and roll off a window later") {
  auto now = kNow + 3h;
  Telemetry telemetry([&now] { return now; });
  telemetry.configure(test_config());
  mailflow::Remote remote;
  remote.address = "192.0.2.7";
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls10, 1, 1, remote);
  const std::string tls10 =
      R"(mailflow_window_messages{connector="partner-contoso",direction="inbound",tls_version="TLS1.0"})";
  now = kNow;  // NTP steps the clock back three hours
  CHECK(sample(telemetry.metrics_text(), tls10) == 1.0);
  CHECK(contoso_remotes(telemetry) == 1);
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls10, 1, 1, remote);
  CHECK(sample(telemetry.metrics_text(), tls10) == 2.0);
  now = kNow + 3h;  // the hour they were first counted in: neither is counted twice
  CHECK(sample(telemetry.metrics_text(), tls10) == 2.0);
  now = kNow + 24h * 7;  // both count in the hour of the step, and leave the window with it
  CHECK(sample(telemetry.metrics_text(), tls10) == 0.0);
}

TEST_CASE("a save of many connectors (copied a few at a time) holds every one of them") {
  const auto dir = fresh_dir("many");
  auto config = test_config();
  for (int i = 0; i < 100; ++i) {
    mailflow::config::Connector c;
    c.name = "partner-" + std::to_string(i);
    c.type = mailflow::config::ConnectorType::partner;
    c.direction = Direction::inbound;
    config.connectors.push_back(c);
  }
  std::string error;
  {
    Telemetry telemetry([] { return kNow; });
    telemetry.configure(config);
    for (int i = 0; i < 100; ++i) {
      const std::string address = "192.0.2." + std::to_string(i);
      for (int m = 0; m <= i % 3; ++m)
        telemetry.message_delivered(
            "partner-" + std::to_string(i), Direction::inbound, TlsVersion::tls12, 1, 1,
            {.address = address, .name = {}, .cipher = {}, .domains = {}, .policy = {}});
    }
    REQUIRE_MESSAGE(save_state(telemetry, dir.string(), error), error);
  }
  Telemetry restarted([] { return kNow; });
  restarted.configure(config);
  REQUIRE(restarted.load_state(dir.string(), error));
  CHECK(error.empty());
  const std::string text = restarted.metrics_text();
  const auto report = restarted.report(7);
  for (int i = 0; i < 100; ++i) {
    CAPTURE(i);
    CHECK(sample(text, "mailflow_window_messages{connector=\"partner-" + std::to_string(i) +
                           "\",direction=\"inbound\",tls_version=\"TLS1.2\"}") == 1.0 + i % 3);
  }
  std::size_t remotes = 0;
  for (const auto& drilldown : report.drilldowns) remotes += drilldown.remotes.rows.size();
  CHECK(remotes == 100);
  std::filesystem::remove_all(dir);
}

TEST_CASE("a corrupt state file is moved aside and counted, the daemon starts empty") {
  const auto dir = fresh_dir("corrupt");
  {
    std::ofstream out(dir / "windows.state");
    out << "this is not a mailflowd state file\n\x01\x02";
  }
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  std::string error;
  CHECK(telemetry.load_state(dir.string(), error));
  CHECK_FALSE(error.empty());
  const auto unix_time = std::chrono::duration_cast<std::chrono::seconds>(kNow.time_since_epoch()).count();
  CHECK(std::filesystem::exists(dir / ("windows.state.corrupt-" + std::to_string(unix_time))));
  CHECK_FALSE(std::filesystem::exists(dir / "windows.state"));
  const std::string text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_state_errors_total{reason="corrupt"})") == 1.0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("the load limit of remotes.state holds what a 90-day window with top_remotes at 10,000 writes") {
  auto config = test_config();  // three inbound connectors (internet too)
  mailflow::config::Listener out;
  out.name = "outbound";
  out.direction = Direction::outbound;
  out.upstream = "mailstore";
  config.listeners.push_back(out);  // internet outbound: remotes and domains
  config.telemetry.window = 90 * 24h;
  config.telemetry.top_remotes = 10'000;
  config.telemetry.top_domains = 10'000;
  // One day's full table of ordinary remotes (an IPv6 client, its EHLO name, two sender domains, a cipher).
  mailflow::HeavyHitters table(10'000);
  const std::vector<std::string> domains{"customer-example.net", "example.org"};
  for (int i = 0; i < 10'000; ++i) {
    const std::string address = "2001:db8:1234:" + std::to_string(1000 + i) + "::25";
    const std::string name = "mail-relay-" + std::to_string(i) + ".customer-example.net";
    mailflow::HeavyHitters::Observation o;
    o.key = address;
    o.name = name;
    o.cipher = "TLS_AES_256_GCM_SHA384";
    o.domains = domains;
    o.version = TlsVersion::tls13;
    o.time = 1'795'000'000;
    table.add(o);
  }
  std::string day;
  table.serialize(day);
  // 5 tables a day (3 inbound remotes, outbound remotes and domains), 91 days (the window's first day is
  // partial).
  const std::size_t written = 5 * 91 * day.size();
  CAPTURE(written);
  CHECK(mailflow::state_load_limit(config, "remotes.state") >= written);
  // With the defaults the limit stays the fixed 512 MiB.
  CHECK(mailflow::state_load_limit(test_config(), "remotes.state") == 512u << 20);
  CHECK(mailflow::state_load_limit(test_config(), "windows.state") == 512u << 20);
}

TEST_CASE("an unusable state_dir fails load and save with a message") {
  const auto dir = fresh_dir("notadir");
  const auto file = dir / "plain-file";
  std::ofstream(file) << "x";
  Telemetry telemetry([] { return kNow; });
  std::string error;
  CHECK_FALSE(telemetry.load_state(file.string(), error));
  CHECK(error.find("plain-file") != std::string::npos);
  CHECK_FALSE(save_state(telemetry, file.string(), error));
  CHECK(error.find("plain-file") != std::string::npos);
  CHECK_FALSE(save_state(telemetry, (file / "deeper").string(), error));
  CHECK(error.find("plain-file") != std::string::npos);
  // A state_dir that is gone (deleted while the daemon ran) is made again, as at start.
  CHECK_MESSAGE(save_state(telemetry, (dir / "missing" / "deeper").string(), error), error);
  CHECK(std::filesystem::exists(dir / "missing" / "deeper" / "windows.state"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("a state file that cannot be written does not keep the others from being saved") {
  // One file's save failing (here windows.state.tmp is in the way; in life a disk too full for the biggest
  // file) must not cost the smaller ones, above all tlsrpt.state with the reports not yet sent.
  const auto dir = fresh_dir("partial-save");
  std::filesystem::create_directory(dir / "windows.state.tmp");
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  mailflow::Remote remote;
  remote.address = "203.0.113.7";
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls12, 1, 1, remote);
  telemetry.tlsrpt().record("2026-11-25", {"example.net", {"mailto:tlsrpt@example.net"}, {}, std::nullopt});
  {
    mailflow::StateWriter writer(dir.string(), telemetry);  // as the daemon saves them
    writer.write([&telemetry] { return telemetry.state_files(); });
    writer.wait();
  }
  CHECK(sample(telemetry.metrics_text(), R"(mailflow_state_errors_total{reason="save_failed"})") == 1.0);
  CHECK_FALSE(std::filesystem::exists(dir / "windows.state"));
  CHECK(std::filesystem::exists(dir / "remotes.state"));
  CHECK(std::filesystem::exists(dir / "tlsrpt.state"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("concurrent sessions count every message exactly once while scrapes run") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  constexpr int kThreads = 4;
  constexpr int kPerThread = 5000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&telemetry, t] {
      for (int i = 0; i < kPerThread; ++i) {
        telemetry.message_delivered(t % 2 ? "partner-contoso" : "internet", Direction::inbound,
                                    i % 2 ? TlsVersion::tls13 : TlsVersion::tls11, 10, 1);
      }
    });
  }
  for (int i = 0; i < 20; ++i) CHECK_FALSE(telemetry.metrics_text().empty());
  for (auto& thread : threads) thread.join();
  CHECK(telemetry.messages_total() == kThreads * kPerThread);
  const std::string text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_messages_total{connector="internet",direction="inbound",tls_version="TLS1.1"})") == 5000.0);
  CHECK(sample(text, R"(mailflow_window_messages{connector="partner-contoso",direction="inbound",tls_version="TLS1.3"})") == 5000.0);
  CHECK(sample(text, R"(mailflow_message_bytes_total{connector="partner-contoso",direction="inbound",tls_version="TLS1.3"})") == 50000.0);
}

TEST_CASE("exposition values: integers exact, other doubles shortest round-trip, NaN and infinities") {
  auto text = [](auto value) {
    std::string out;
    mailflow::exposition::append_value(out, value);
    return out;
  };
  CHECK(text(std::uint64_t{18446744073709551615u}) == "18446744073709551615");
  CHECK(text(std::int64_t{-3}) == "-3");
  CHECK(text(100.0) == "100");
  CHECK(text(0.0) == "0");
  CHECK(text(0.05) == "0.05");
  CHECK(text(1.0 / 3.0) == "0.3333333333333333");
  CHECK(std::stod(text(2.0 / 11.0)) == 2.0 / 11.0);
  CHECK(text(1795627617.94) == "1795627617.94");
  CHECK(text(1e300) == "1e+300");
  CHECK(text(std::numeric_limits<double>::quiet_NaN()) == "NaN");
  CHECK(text(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(text(-std::numeric_limits<double>::infinity()) == "-Inf");
}

TEST_CASE("exposition labels and help text are escaped as the text format requires") {
  CHECK(mailflow::exposition::label("reason", "a\"b\\c\nd") == R"(reason="a\"b\\c\nd")");
  std::string out;
  mailflow::exposition::append_header(out, "x_total", "line\\one\ntwo \"quoted\"", "counter");
  CHECK(out == "# HELP x_total line\\\\one\\ntwo \"quoted\"\n# TYPE x_total counter\n");
  out.clear();
  mailflow::exposition::append_sample(out, "x_total", {}, std::uint64_t{7});
  mailflow::exposition::append_sample(out, "x_total", {"", R"(a="1")", "", R"(b="2",c="3")"}, 0.5);
  CHECK(out == "x_total 7\nx_total{a=\"1\",b=\"2\",c=\"3\"} 0.5\n");
}

TEST_CASE("hostile label values come out escaped, one family block each, and the histogram is complete") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  const std::string listener = "in\"bound\\\nx";
  telemetry.session_opened(listener);
  telemetry.session_closed(listener, 0.25);  // le is inclusive: lands in 0.25
  telemetry.session_opened(listener);
  telemetry.session_closed(listener, 1000);  // beyond the last bound: +Inf only
  telemetry.rejected(listener, "bad\"reason");
  telemetry.message_delivered("odd \"connector\"\n", Direction::outbound, TlsVersion::tls12, 1, 1);
  const std::string text = telemetry.metrics_text();

  const std::string l = R"(listener="in\"bound\\\nx")";
  CHECK(sample(text, "mailflow_rejects_total{" + l + R"(,reason="bad\"reason"})") == 1.0);
  CHECK(sample(text, "mailflow_sessions_active{" + l + "}") == 0.0);
  CHECK(sample(text, "mailflow_session_duration_seconds_bucket{" + l + ",le=\"0.1\"}") == 0.0);
  CHECK(sample(text, "mailflow_session_duration_seconds_bucket{" + l + ",le=\"0.25\"}") == 1.0);
  CHECK(sample(text, "mailflow_session_duration_seconds_bucket{" + l + ",le=\"600\"}") == 1.0);
  CHECK(sample(text, "mailflow_session_duration_seconds_bucket{" + l + ",le=\"+Inf\"}") == 2.0);
  CHECK(sample(text, "mailflow_session_duration_seconds_sum{" + l + "}") == 1000.25);
  CHECK(sample(text, "mailflow_session_duration_seconds_count{" + l + "}") == 2.0);
  CHECK(sample(text, R"(mailflow_messages_total{connector="odd \"connector\"\n",direction="outbound",tls_version="TLS1.2"})") ==
        1.0);
  // No raw line feed inside a sample: every line is a comment or starts with a metric name.
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    CAPTURE(line);
    CHECK((line.rfind("# ", 0) == 0 || line.rfind("mailflow_", 0) == 0 || line.rfind("process_", 0) == 0));
  }
  // Every family is declared once, its HELP right before its TYPE.
  std::set<std::string> families;
  std::istringstream types(text);
  std::string previous;
  for (std::string line; std::getline(types, line); previous = line) {
    if (line.rfind("# TYPE ", 0) != 0) continue;
    const std::string name = line.substr(7, line.find(' ', 7) - 7);
    CHECK(families.insert(name).second);
    CHECK(previous.rfind("# HELP " + name + " ", 0) == 0);
  }
  // Families with a declared vocabulary are written from the start, even without a series (test_config has no
  // upstreams, so mailflow_upstream_errors_total has none) and so is the certificate gauge.
  CHECK(families.count("mailflow_upstream_errors_total") == 1);
  CHECK(families.count("mailflow_certificate_expiry_timestamp_seconds") == 1);
  CHECK(families.size() >= 26);  // 20 mailflow_ families at least + 6 process_
}

TEST_CASE("promtool check metrics accepts the exposition of many connectors with hostile names") {
  auto config = test_config();
  mailflow::config::Listener out;
  out.name = "outbound";
  out.direction = Direction::outbound;
  out.upstream = "mailstore";
  config.listeners.push_back(out);
  for (int i = 0; i < 200; ++i) {
    mailflow::config::Connector c;
    c.name = "c-" + std::to_string(i) + (i % 7 == 0 ? "\"\\\n" : "");
    c.direction = i % 2 ? Direction::outbound : Direction::inbound;
    c.type = i % 3 ? mailflow::config::ConnectorType::partner : mailflow::config::ConnectorType::onpremises;
    c.require_tls = i % 5 == 0;
    config.connectors.push_back(c);
  }
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(config);
  for (int i = 0; i < 50; ++i) {
    telemetry.message_delivered(config.connectors[static_cast<std::size_t>(i)].name,
                                config.connectors[static_cast<std::size_t>(i)].direction,
                                static_cast<TlsVersion>(i % 5), 1000, 2);
  }
  telemetry.session_opened("inbound");
  telemetry.session_closed("inbound", 0.7);
  telemetry.tls_handshake_failed("inbound", mailflow::Leg::upstream, "weird \"reason\"");
  telemetry.upstream_error("mailstore", "timeout");
  telemetry.state_error("load\\path");

  const auto dir = fresh_dir("promtool");
  const auto file = dir / "metrics.txt";
  std::ofstream(file) << telemetry.metrics_text();
  const auto report = dir / "promtool.out";
  const std::string command = "promtool check metrics < '" + file.string() + "' > '" + report.string() + "' 2>&1";
  const int status = std::system(command.c_str());
  std::ifstream in(report);
  const std::string output((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  INFO("promtool (installed by deploy/dev/deps.sh test, package prometheus) said: ", output);
  CHECK(status == 0);
  CHECK(output.empty());  // no lint findings either
  std::filesystem::remove_all(dir);
}

TEST_CASE("a fresh telemetry exports every declared reason of the four reason families, zeros included") {
  auto config = test_config();
  mailflow::config::Upstream mailstore;
  mailstore.name = "mailstore";
  config.upstreams.push_back(mailstore);
  Telemetry telemetry([] { return kNow; });
  const std::string before = telemetry.metrics_text();  // before configure: no listener, no upstream yet
  for (const char* family : {"mailflow_rejects_total", "mailflow_tls_handshake_failures_total",
                             "mailflow_upstream_errors_total", "mailflow_state_errors_total"}) {
    CAPTURE(family);
    CHECK(before.find(std::string("# HELP ") + family + " ") != std::string::npos);
    CHECK(before.find(std::string("# TYPE ") + family + " counter\n") != std::string::npos);
  }
  for (const auto reason : mailflow::reasons::state_errors) {
    CHECK(sample(before, "mailflow_state_errors_total{reason=\"" + std::string(reason) + "\"}") == 0.0);
  }

  telemetry.configure(config);
  const std::string text = telemetry.metrics_text();
  for (const auto reason : mailflow::reasons::rejects) {
    CAPTURE(reason);
    CHECK(sample(text, R"(mailflow_rejects_total{listener="inbound",reason=")" + std::string(reason) + "\"}") == 0.0);
  }
  for (const auto reason : mailflow::reasons::tls_handshake_failures) {
    CAPTURE(reason);
    for (const char* leg : {"client", "upstream"}) {
      CHECK(sample(text, std::string(R"(mailflow_tls_handshake_failures_total{leg=")") + leg +
                             R"(",listener="inbound",reason=")" + std::string(reason) + "\"}") == 0.0);
    }
  }
  for (const auto reason : mailflow::reasons::upstream_errors) {
    CAPTURE(reason);
    CHECK(sample(text, R"(mailflow_upstream_errors_total{reason=")" + std::string(reason) + R"(",upstream="mailstore"})") ==
          0.0);
  }
  // A counted reason moves its own series; a reload keeps what was counted.
  telemetry.rejected("inbound", "tls_required");
  telemetry.configure(config);
  CHECK(sample(telemetry.metrics_text(), R"(mailflow_rejects_total{listener="inbound",reason="tls_required"})") == 1.0);
}

TEST_CASE("mailflow_certificate_expiry_timestamp_seconds: one gauge per certificate, replaced on reload") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  CHECK(telemetry.metrics_text().find("# TYPE mailflow_certificate_expiry_timestamp_seconds gauge\n") !=
        std::string::npos);
  telemetry.certificates_loaded({{"inbound", "/etc/mailflowd/tls/mx1.pem", 1798761600},
                                 {"inbound", "/etc/mailflowd/tls/mx2.pem", 1767225600},
                                 {"http", "/etc/mailflowd/tls/http.pem", 1780000000}});
  std::string text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_certificate_expiry_timestamp_seconds{certificate="/etc/mailflowd/tls/mx1.pem",listener="inbound"})") ==
        1798761600.0);
  CHECK(sample(text, R"(mailflow_certificate_expiry_timestamp_seconds{certificate="/etc/mailflowd/tls/mx2.pem",listener="inbound"})") ==
        1767225600.0);
  CHECK(sample(text, R"(mailflow_certificate_expiry_timestamp_seconds{certificate="/etc/mailflowd/tls/http.pem",listener="http"})") ==
        1780000000.0);
  // A reload with a renewed mx1 and without mx2: the gauge follows, the removed certificate disappears.
  telemetry.certificates_loaded({{"inbound", "/etc/mailflowd/tls/mx1.pem", 1806537600}});
  text = telemetry.metrics_text();
  CHECK(sample(text, R"(mailflow_certificate_expiry_timestamp_seconds{certificate="/etc/mailflowd/tls/mx1.pem",listener="inbound"})") ==
        1806537600.0);
  CHECK(text.find("mx2.pem") == std::string::npos);
  CHECK(text.find("http.pem") == std::string::npos);
}

TEST_CASE("mailflow_certificate_expiry_timestamp_seconds: a certificate named twice is one series") {
  // The same file twice in a listener's certificates, or a listener named "http" serving the file of
  // http.tls: a series twice in one exposition is invalid (Prometheus drops one of them, OpenMetrics parsers
  // refuse it).
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  telemetry.certificates_loaded({{"http", "/etc/mailflowd/tls/mx1.pem", 1798761600},
                                 {"http", "/etc/mailflowd/tls/mx1.pem", 1798761600},
                                 {"inbound", "/etc/mailflowd/tls/mx1.pem", 1798761600},
                                 {"http", "/etc/mailflowd/tls/mx1.pem", 1798761600}});
  const std::string text = telemetry.metrics_text();
  const std::string series =
      R"(mailflow_certificate_expiry_timestamp_seconds{certificate="/etc/mailflowd/tls/mx1.pem",listener="http"} )";
  const auto first = text.find(series);
  REQUIRE(first != std::string::npos);
  CHECK(text.find(series, first + 1) == std::string::npos);
  CHECK(text.find(R"(listener="inbound"} 1798761600)") != std::string::npos);
}

namespace {
// The exposition without process_* (the process's own CPU time and memory move between two scrapes).
std::string without_process(const std::string& text) {
  std::string out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with("process_") || line.find(" process_") != std::string::npos) continue;
    out += line + '\n';
  }
  return out;
}
}  // namespace

TEST_CASE(
    "a scrape written into the buffer of the one before holds its own text only, and reuses the buffer") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  telemetry.message_delivered("partner-contoso", Direction::inbound, TlsVersion::tls12, 100, 1);
  std::string old = telemetry.metrics_text();
  const std::string fresh = telemetry.metrics_text();
  old.append(
      std::string(old.size(), 'x'));  // text the next scrape must not keep, and more capacity than it needs
  const auto* storage = old.data();
  const std::string reused = telemetry.metrics_text(std::move(old));
  CHECK(reused.data() == storage);  // written in place: no new allocation
  CHECK(without_process(reused) == without_process(fresh));
  CHECK(reused.find('x' + std::string(16, 'x')) == std::string::npos);
}

TEST_CASE("labelled counters created out of order come out sorted by their label text, one block each") {
  Telemetry telemetry([] { return kNow; });
  telemetry.configure(test_config());
  for (const char* upstream : {"zeta", "alpha", "mid", "alpha", "beta"})
    telemetry.upstream_error(upstream, "connect");
  telemetry.upstream_error("mid", "banner");
  const std::string text = telemetry.metrics_text();
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with("mailflow_upstream_errors_total{")) lines.push_back(line);
  }
  CHECK(std::is_sorted(lines.begin(), lines.end()));
  CHECK(std::set<std::string>(lines.begin(), lines.end()).size() == lines.size());
  CHECK(sample(text, R"(mailflow_upstream_errors_total{reason="connect",upstream="alpha"})") == 2.0);
  CHECK(sample(text, R"(mailflow_upstream_errors_total{reason="banner",upstream="mid"})") == 1.0);
  CHECK(sample(text, R"(mailflow_upstream_errors_total{reason="connect",upstream="zeta"})") == 1.0);
}
