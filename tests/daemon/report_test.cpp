// The connector report (rows, insights, JSON/CSV/table/HTML) and the `mailflowd report` client.
#include "daemon/report.hpp"

#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)
#include <vector>

#include "daemon/report_cli.hpp"
#include "tests/daemon/test_certificate.hpp"

namespace {

using namespace std::chrono;
using mailflow::Report;
using mailflow::WindowStore;
using mailflow::config::ConnectorType;
using mailflow::config::Direction;
using mailflow::proto::TlsVersion;

constexpr auto in = Direction::inbound;
constexpr auto out = Direction::outbound;

WindowStore::TimePoint at(year_month_day day, int hour, int minute = 0) {
  return sys_days{day} + hours(hour) + minutes(minute);
}
constexpr year_month_day nov(unsigned d) { return year{2026} / November / day{d}; }

const WindowStore::TimePoint kNow = at(nov(25), 10);

mailflow::config::Config make_config() {
  mailflow::config::Config config;
  config.listeners.push_back({.name = "in",
                              .address = {},
                              .direction = in,
                              .tls = {},
                              .proxy_trusted = {},
                              .upstream = "mailstore"});
  config.listeners.push_back({.name = "out",
                              .address = {},
                              .direction = out,
                              .tls = {},
                              .proxy_trusted = {},
                              .upstream = "mailstore"});
  mailflow::config::Connector contoso;
  contoso.name = "partner-contoso";
  contoso.type = ConnectorType::partner;
  contoso.direction = in;
  contoso.alerts = {0.05, 0.05, 100};
  config.connectors.push_back(contoso);
  mailflow::config::Connector onprem;
  onprem.name = "onprem";
  onprem.type = ConnectorType::onpremises;
  onprem.direction = out;
  onprem.require_tls = true;
  onprem.alerts = {0.5, 0.01, 10};  // per-connector override of telemetry.defaults
  config.connectors.push_back(onprem);
  config.telemetry.window = hours(24 * 7);
  config.telemetry.defaults = {0.05, 0.05, 100};
  return config;
}

void add(WindowStore& store, std::string_view connector, Direction direction, WindowStore::TimePoint t,
         std::array<std::uint64_t, 5> counts) {
  for (std::size_t i = 0; i < counts.size(); ++i)
    store.add(connector, direction, static_cast<TlsVersion>(i), t, counts[i]);
}

// The known store behind the exact-output tests.
WindowStore known_store() {
  WindowStore store(hours(24 * 7));
  add(store, "partner-contoso", in, at(nov(25), 9, 12), {12, 128, 0, 820, 64});  // 1,024 messages
  add(store, "onprem", out, at(nov(24), 23, 59), {1, 0, 0, 19, 0});
  add(store, "old-partner", in, at(nov(24), 1), {0, 3, 0, 0, 0});  // removed from the config
  return store;
}

}  // namespace

TEST_CASE("report rows: newest day first, every connector x direction, zeros included, removed connectors kept") {
  const auto config = make_config();
  const WindowStore store = known_store();
  const Report report = mailflow::build_report(store, config, 2, kNow);
  CHECK(report.generated_at == "2026-11-25T10:00:00Z");
  CHECK(report.days == 2);
  CHECK(report.window_days == 7);
  REQUIRE(report.rows.size() == 10);
  const std::vector<std::string> order{"partner-contoso", "onprem", "internet", "internet", "old-partner"};
  for (std::size_t i = 0; i < report.rows.size(); ++i) {
    CAPTURE(i);
    CHECK(report.rows[i].date == (i < 5 ? "2026-11-25" : "2026-11-24"));
    CHECK(report.rows[i].connector == order[i % 5]);
    CHECK(report.rows[i].configured == (order[i % 5] != "old-partner"));
  }
  CHECK(report.rows[2].direction == in);
  CHECK(report.rows[3].direction == out);
  CHECK(report.rows[6].type == ConnectorType::onpremises);
  CHECK(report.rows[6].forced_tls);
  CHECK(report.rows[6].messages == 20);
  CHECK(report.rows[6].counts == mailflow::TlsCounts{1, 0, 0, 19, 0});
  CHECK(report.rows[9].type == ConnectorType::internet);  // documented choice for removed connectors
  CHECK_FALSE(report.rows[9].configured);                 // ...shown as removed, not as internet traffic
  CHECK(report.rows[0].messages == 1024);
  CHECK(report.rows[0].counts == mailflow::TlsCounts{12, 128, 0, 820, 64});
  CHECK(report.rows[2].messages == 0);
  CHECK(report.rows[2].percent == std::array<double, 5>{});
  CHECK(report.connectors.back().connector == "old-partner");
  CHECK_FALSE(report.connectors.back().configured);
  CHECK(report.connectors.front().counts == mailflow::TlsCounts{12, 128, 0, 820, 64});

  // days is clamped to the window; an internet row only for directions that have a listener.
  auto inbound_only = config;
  inbound_only.listeners.pop_back();
  const Report wide = mailflow::build_report(store, inbound_only, 30, kNow);
  CHECK(wide.days == 7);
  // ...but no zero rows for the days before the first message (2026-11-24 01:00): the daemon did not exist.
  CHECK(wide.rows.size() == 2 * 4);
  CHECK(wide.rows.front().date == "2026-11-25");
  CHECK(wide.rows.back().date == "2026-11-24");
  CHECK(mailflow::build_report(store, config, 0, kNow).days == 1);
  // Days without traffic after the first message stay (zeros), and an empty window reports today only.
  WindowStore sparse(hours(24 * 7));
  add(sparse, "partner-contoso", in, at(nov(20), 5), {0, 0, 0, 1, 0});
  const Report gap = mailflow::build_report(sparse, config, 7, kNow);
  REQUIRE(gap.rows.size() == 6 * 4);
  CHECK(gap.rows.back().date == "2026-11-20");
  CHECK(gap.rows[4].date == "2026-11-24");
  CHECK(gap.rows[4].messages == 0);
  const Report empty = mailflow::build_report(WindowStore(hours(24 * 7)), config, 7, kNow);
  CHECK(empty.days == 7);
  REQUIRE(empty.rows.size() == 4);
  CHECK(empty.rows.front().date == "2026-11-25");

  // Once its last message rolls off, a removed connector disappears from the report.
  const Report later = mailflow::build_report(store, config, 1, kNow + hours(24 * 6));
  for (const auto& row : later.rows) CHECK(row.connector != "old-partner");
}

TEST_CASE("percentages: a row with messages adds up to exactly 100.0, rounded by largest remainder") {
  using P = std::array<double, 5>;
  CHECK(mailflow::tls_percent({2, 1, 0, 1, 3}) == P{28.6, 14.3, 0.0, 14.3, 42.8});  // each alone: 42.9, 100.1
  CHECK(mailflow::tls_percent({1, 1, 1, 0, 0}) == P{33.4, 33.3, 33.3, 0.0, 0.0});   // each alone: 99.9
  CHECK(mailflow::tls_percent({12, 128, 0, 820, 64}) == P{1.2, 12.5, 0.0, 80.1, 6.2});  // the contract's row
  CHECK(mailflow::tls_percent({0, 0, 0, 0, 0}) == P{});
  CHECK(mailflow::tls_percent({0, 0, 0, 0, 5}) == P{0, 0, 0, 0, 100.0});
  for (std::uint64_t n = 1; n < 60; ++n) {
    const auto p = mailflow::tls_percent({n, 2 * n + 1, 1, n * n, 3});
    double sum = 0;
    for (const double v : p) sum += v * 10;
    CHECK(static_cast<long>(sum + 0.5) == 1000);
  }
}

TEST_CASE("report JSON is exactly the documented shape") {
  const auto config = make_config();
  const Report report = mailflow::build_report(known_store(), config, 2, kNow);
  const std::string expected =
      R"({"generated_at": "2026-11-25T10:00:00Z", "days": 2,
 "rows": [{"date": "2026-11-25", "connector": "partner-contoso", "direction": "inbound", "type": "partner", "forced_tls": false, "messages": 1024, "percent": {"none": 1.2, "TLS1.0": 12.5, "TLS1.1": 0.0, "TLS1.2": 80.1, "TLS1.3": 6.2}, "counts": {"none": 12, "TLS1.0": 128, "TLS1.1": 0, "TLS1.2": 820, "TLS1.3": 64}, "configured": true},
  {"date": "2026-11-25", "connector": "onprem", "direction": "outbound", "type": "onpremises", "forced_tls": true, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-25", "connector": "internet", "direction": "inbound", "type": "internet", "forced_tls": false, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-25", "connector": "internet", "direction": "outbound", "type": "internet", "forced_tls": false, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-25", "connector": "old-partner", "direction": "inbound", "type": "internet", "forced_tls": false, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": false},
  {"date": "2026-11-24", "connector": "partner-contoso", "direction": "inbound", "type": "partner", "forced_tls": false, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-24", "connector": "onprem", "direction": "outbound", "type": "onpremises", "forced_tls": true, "messages": 20, "percent": {"none": 5.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 95.0, "TLS1.3": 0.0}, "counts": {"none": 1, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 19, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-24", "connector": "internet", "direction": "inbound", "type": "internet", "forced_tls": false, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-24", "connector": "internet", "direction": "outbound", "type": "internet", "forced_tls": false, "messages": 0, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": true},
  {"date": "2026-11-24", "connector": "old-partner", "direction": "inbound", "type": "internet", "forced_tls": false, "messages": 3, "percent": {"none": 0.0, "TLS1.0": 100.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}, "counts": {"none": 0, "TLS1.0": 3, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "configured": false}],
 "insights": [{"connector": "partner-contoso", "direction": "inbound", "insight": "significant_tls10", "share": 0.125, "messages": 1024, "threshold": 0.05, "text": "Inbound partner connector partner-contoso is seeing significant TLS1.0 mail flow: 12.5% of 1,024 messages in the last 7 days"},
  {"connector": "onprem", "direction": "outbound", "insight": "significant_no_tls", "share": 0.05, "messages": 20, "threshold": 0.01, "text": "Outbound on-premises connector onprem is seeing significant mail flow without TLS: 5.0% of 20 messages in the last 7 days"}],
 "window_days": 7,
 "connectors": [{"connector": "partner-contoso", "direction": "inbound", "type": "partner", "forced_tls": false, "configured": true, "messages": 1024, "counts": {"none": 12, "TLS1.0": 128, "TLS1.1": 0, "TLS1.2": 820, "TLS1.3": 64}, "percent": {"none": 1.2, "TLS1.0": 12.5, "TLS1.1": 0.0, "TLS1.2": 80.1, "TLS1.3": 6.2}},
  {"connector": "onprem", "direction": "outbound", "type": "onpremises", "forced_tls": true, "configured": true, "messages": 20, "counts": {"none": 1, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 19, "TLS1.3": 0}, "percent": {"none": 5.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 95.0, "TLS1.3": 0.0}},
  {"connector": "internet", "direction": "inbound", "type": "internet", "forced_tls": false, "configured": true, "messages": 0, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}},
  {"connector": "internet", "direction": "outbound", "type": "internet", "forced_tls": false, "configured": true, "messages": 0, "counts": {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "percent": {"none": 0.0, "TLS1.0": 0.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}},
  {"connector": "old-partner", "direction": "inbound", "type": "internet", "forced_tls": false, "configured": false, "messages": 3, "counts": {"none": 0, "TLS1.0": 3, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}, "percent": {"none": 0.0, "TLS1.0": 100.0, "TLS1.1": 0.0, "TLS1.2": 0.0, "TLS1.3": 0.0}}],
 "in_transit": [{"direction": "inbound", "messages": 1027, "tls": 1015, "tls12_plus": 884, "tls_share": 0.9883154819863681, "tls12_plus_share": 0.8607594936708861},
  {"direction": "outbound", "messages": 20, "tls": 19, "tls12_plus": 19, "tls_share": 0.95, "tls12_plus_share": 0.95}]}
)";
  CHECK(mailflow::render_json(report) == expected);
}

TEST_CASE("report CSV has the documented header and one line per row") {
  const Report report = mailflow::build_report(known_store(), make_config(), 1, kNow);
  CHECK(mailflow::render_csv(report) ==
      "date,connector,direction,type,forced_tls,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,none_count,tls10_count,tls11_count,tls12_count,tls13_count,configured\n"
      "2026-11-25,partner-contoso,inbound,partner,false,1024,1.2,12.5,0.0,80.1,6.2,12,128,0,820,64,true\n"
      "2026-11-25,onprem,outbound,onpremises,true,0,0.0,0.0,0.0,0.0,0.0,0,0,0,0,0,true\n"
      "2026-11-25,internet,inbound,internet,false,0,0.0,0.0,0.0,0.0,0.0,0,0,0,0,0,true\n"
      "2026-11-25,internet,outbound,internet,false,0,0.0,0.0,0.0,0.0,0.0,0,0,0,0,0,true\n"
      "2026-11-25,old-partner,inbound,internet,false,0,0.0,0.0,0.0,0.0,0.0,0,0,0,0,0,false\n");
}

TEST_CASE("report table is aligned and lists the insights") {
  const Report report = mailflow::build_report(known_store(), make_config(), 1, kNow);
  CHECK(mailflow::render_table(report) ==
      "Connector report (UTC), window 7 days, generated 2026-11-25T10:00:00Z\n"
      "\n"
      "Whole window:\n"
      "CONNECTOR        DIRECTION  TYPE        FORCED_TLS  MESSAGES       NONE       TLS1.0    TLS1.1       TLS1.2     TLS1.3\n"
      "partner-contoso  inbound    partner     no             1,024  12 (1.2%)  128 (12.5%)  0 (0.0%)  820 (80.1%)  64 (6.2%)\n"
      "onprem           outbound   onpremises  yes               20   1 (5.0%)     0 (0.0%)  0 (0.0%)   19 (95.0%)   0 (0.0%)\n"
      "internet         inbound    internet    no                 0          0            0         0            0          0\n"
      "internet         outbound   internet    no                 0          0            0         0            0          0\n"
      "old-partner      inbound    removed     no                 3   0 (0.0%)   3 (100.0%)  0 (0.0%)     0 (0.0%)   0 (0.0%)\n"
      "Inbound protected in transit: 98.8% with TLS, 86.1% with TLS1.2 or later (884 of 1,027 messages)\n"
      "Outbound protected in transit: 95.0% with TLS, 95.0% with TLS1.2 or later (19 of 20 messages)\n"
      "\n"
      "Per day, newest first: last 1 day\n"
      "DATE        CONNECTOR        DIRECTION  TYPE        FORCED_TLS  MESSAGES       NONE       TLS1.0    TLS1.1       TLS1.2     TLS1.3\n"
      "2026-11-25  partner-contoso  inbound    partner     no             1,024  12 (1.2%)  128 (12.5%)  0 (0.0%)  820 (80.1%)  64 (6.2%)\n"
      "2026-11-25  onprem           outbound   onpremises  yes                0          0            0         0            0          0\n"
      "2026-11-25  internet         inbound    internet    no                 0          0            0         0            0          0\n"
      "2026-11-25  internet         outbound   internet    no                 0          0            0         0            0          0\n"
      "2026-11-25  old-partner      inbound    removed     no                 0          0            0         0            0          0\n"
      "\n"
      "Insights:\n"
      "  - Inbound partner connector partner-contoso is seeing significant TLS1.0 mail flow: 12.5% of 1,024 messages in the last 7 days\n"
      "  - Outbound on-premises connector onprem is seeing significant mail flow without TLS: 5.0% of 20 messages in the last 7 days\n"
      "Get the servers behind these connectors to TLS1.2 or later before TLS1.0/1.1 are switched off.\n");
}

TEST_CASE("the whole window is the last 7 x 24 hours, so it reaches into an eighth UTC day that no row shows") {
  // At 10:00, the window's first hour is 11:00 seven days back: what came then counts in the summary and the
  // insights, not in the 7 daily rows (operations.md says so).
  WindowStore store(hours(24 * 7));
  add(store, "partner-contoso", in, at(nov(18), 11), {0, 2, 0, 0, 0});
  add(store, "partner-contoso", in, at(nov(18), 10), {0, 5, 0, 0, 0});  // rolled off
  add(store, "partner-contoso", in, at(nov(25), 9), {0, 0, 0, 3, 0});
  const Report report = mailflow::build_report(store, make_config(), 7, kNow);
  CHECK(report.connectors.front().messages == 5);
  std::uint64_t rows = 0;
  for (const auto& row : report.rows)
    if (row.connector == "partner-contoso") rows += row.messages;
  CHECK(rows == 3);
  CHECK(report.rows.back().date == "2026-11-19");
}

TEST_CASE("the whole-window summary alone: CSV with exact counts, JSON, table") {
  const Report report = mailflow::build_report(known_store(), make_config(), 1, kNow);
  CHECK(mailflow::render_summary_csv(report) ==
      "connector,direction,type,forced_tls,configured,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,none_count,tls10_count,tls11_count,tls12_count,tls13_count\n"
      "partner-contoso,inbound,partner,false,true,1024,1.2,12.5,0.0,80.1,6.2,12,128,0,820,64\n"
      "onprem,outbound,onpremises,true,true,20,5.0,0.0,0.0,95.0,0.0,1,0,0,19,0\n"
      "internet,inbound,internet,false,true,0,0.0,0.0,0.0,0.0,0.0,0,0,0,0,0\n"
      "internet,outbound,internet,false,true,0,0.0,0.0,0.0,0.0,0.0,0,0,0,0,0\n"
      "old-partner,inbound,internet,false,false,3,0.0,100.0,0.0,0.0,0.0,0,3,0,0,0\n");
  const std::string json = mailflow::render_summary_json(report);
  CHECK(json.starts_with("{\"generated_at\": \"2026-11-25T10:00:00Z\", \"window_days\": 7,\n \"connectors\": ["));
  CHECK(json.find("\"in_transit\": [{\"direction\": \"inbound\", \"messages\": 1027, \"tls\": 1015, \"tls12_plus\": 884") !=
        std::string::npos);
  CHECK(json.find("\"rows\"") == std::string::npos);
  const std::string table = mailflow::render_summary_table(report);
  CHECK(table.find("old-partner      inbound    removed") != std::string::npos);
  CHECK(table.find("DATE") == std::string::npos);
}

TEST_CASE("insights: at, under and over the threshold, and below min_messages") {
  const auto config = make_config();  // partner-contoso: 5% / 5% / 100 messages
  const auto insights_for = [&](std::array<std::uint64_t, 5> counts) {
    WindowStore store;
    add(store, "partner-contoso", in, kNow - hours(30), counts);
    return mailflow::compute_insights(store, config, kNow);
  };
  CHECK(insights_for({0, 5, 0, 95, 0}).empty());     // 5.0% == threshold: not strictly greater
  CHECK(insights_for({0, 4, 0, 96, 0}).empty());     // under
  CHECK(insights_for({5, 0, 0, 95, 0}).empty());     // no TLS at the threshold
  CHECK(insights_for({0, 50, 0, 49, 0}).empty());    // 99 messages < min_messages, however bad
  const auto over = insights_for({0, 6, 0, 94, 0});  // exactly min_messages and 6%
  REQUIRE(over.size() == 1);
  CHECK(over[0].insight == "significant_tls10");
  CHECK(over[0].messages == 100);
  CHECK(over[0].share == doctest::Approx(0.06));
  CHECK(over[0].threshold == doctest::Approx(0.05));
  CHECK(over[0].text ==
        "Inbound partner connector partner-contoso is seeing significant TLS1.0 mail flow: 6.0% of 100 "
        "messages in "
        "the last 7 days");
  const auto both = insights_for({600, 500, 0, 1000, 0});
  REQUIRE(both.size() == 2);
  CHECK(both[0].insight == "significant_tls10");
  CHECK(both[1].insight == "significant_no_tls");
  CHECK(
      both[1].text ==
      "Inbound partner connector partner-contoso is seeing significant mail flow without TLS: 28.6% of 2,100 "
      "messages in the last 7 days");

  // Messages that rolled off do not count; TLS1.1 is not TLS1.0, it has its own insight and threshold.
  WindowStore store;
  add(store, "partner-contoso", in, kNow - hours(24 * 7), {0, 100, 0, 0, 0});
  add(store, "partner-contoso", in, kNow, {0, 0, 100, 100, 0});
  const auto tls11 = mailflow::compute_insights(store, config, kNow);
  REQUIRE(tls11.size() == 1);
  CHECK(tls11[0].insight == "significant_tls11");
  CHECK(tls11[0].threshold == doctest::Approx(0.05));
  CHECK(tls11[0].text ==
        "Inbound partner connector partner-contoso is seeing significant TLS1.1 mail flow: 50.0% of 200 messages "
        "in the last 7 days");
  CHECK(insights_for({0, 0, 5, 95, 0}).empty());  // TLS1.1 at the threshold: not strictly greater
  auto lenient = config;
  lenient.connectors[0].alerts.tls11_share = 0.5;  // per-connector threshold: 50% is not above it
  CHECK(mailflow::compute_insights(store, lenient, kNow).empty());
  // A partner entirely on TLS1.1 raises it, and only it.
  const auto all11 = insights_for({0, 0, 100, 0, 0});
  REQUIRE(all11.size() == 1);
  CHECK(all11[0].insight == "significant_tls11");
  CHECK(all11[0].share == doctest::Approx(1.0));
}

TEST_CASE("insights: a connector removed from the config raises none, whatever its history") {
  WindowStore store;
  add(store, "gone-partner", in, kNow, {0, 500, 500, 0, 0});
  CHECK(mailflow::compute_insights(store, make_config(), kNow).empty());
  const Report report = mailflow::build_report(store, make_config(), 7, kNow);
  CHECK(report.insights.empty());
  REQUIRE(report.connectors.back().connector == "gone-partner");
  CHECK_FALSE(report.connectors.back().configured);
  CHECK(report.connectors.back().messages == 1000);
}

TEST_CASE("insights: per-connector thresholds override telemetry.defaults and the others use the defaults") {
  auto config = make_config();
  config.connectors[0].alerts = {0.2, 0.05, 10};
  WindowStore store;
  add(store, "partner-contoso", in, kNow, {0, 125, 0, 875, 0});  // 12.5% TLS1.0 < 20%
  add(store, "internet", in, kNow, {0, 125, 0, 875, 0});         // the same against the 5% default
  add(store, "onprem", out, kNow, {0, 40, 0, 60, 0});            // 40% < 50% override
  add(store, "gone", out, kNow, {0, 0, 0, 999, 0});
  add(store, "gone", out, kNow, {1, 0, 0, 0, 0});  // 0.1% no TLS: under
  config.telemetry.window = hours(24);
  store.set_window(hours(24));
  const auto insights = mailflow::compute_insights(store, config, kNow);
  REQUIRE(insights.size() == 1);
  CHECK(insights[0].connector == "internet");
  CHECK(insights[0].threshold == doctest::Approx(0.05));
  CHECK(insights[0].text ==
        "Inbound internet connector internet is seeing significant TLS1.0 mail flow: 12.5% of 1,000 messages "
        "in the "
        "last 1 day");
  config.connectors[0].alerts.tls10_share = 0.1;
  CHECK(mailflow::compute_insights(store, config, kNow).size() == 2);
}

TEST_CASE("HTML page: self-contained, insights first with advice, bars, percentages, everything escaped") {
  auto config = make_config();
  config.connectors[0].name = "partner-<b>&\"co\"";
  WindowStore store = known_store();
  add(store, "partner-<b>&\"co\"", in, kNow, {0, 30, 0, 70, 0});
  add(store, "<script>alert(1)</script>", in, kNow, {1, 0, 0, 0, 0});
  const std::string html = mailflow::render_html(mailflow::build_report(store, config, 7, kNow));

  CHECK(html.starts_with("<!DOCTYPE html>"));
  CHECK(html.find("<script") == std::string::npos);
  CHECK(html.find("&lt;script&gt;alert(1)&lt;/script&gt;") != std::string::npos);
  CHECK(html.find("partner-&lt;b&gt;&amp;&quot;co&quot;") != std::string::npos);
  CHECK(html.find("partner-<b>") == std::string::npos);
  // No external assets: no links, sources or URLs anywhere.
  CHECK(html.find("src=") == std::string::npos);
  CHECK(html.find("<link") == std::string::npos);
  CHECK(html.find("http") == std::string::npos);
  CHECK(html.find("@import") == std::string::npos);

  const auto insight = html.find(
      "Inbound partner connector partner-&lt;b&gt;&amp;&quot;co&quot; is seeing significant TLS1.0 mail "
      "flow: "
      "30.0% of 100 messages in the last 7 days");
  const auto advice = html.find("before</em> TLS1.0 and TLS1.1 are switched off");
  const auto bars = html.find("<svg class=\"bar\"", html.find("id=\"connectors\""));
  const auto daily = html.find("id=\"daily\"");
  REQUIRE(insight != std::string::npos);
  REQUIRE(advice != std::string::npos);
  REQUIRE(bars != std::string::npos);
  REQUIRE(daily != std::string::npos);
  CHECK(insight < bars);
  CHECK(advice < bars);
  CHECK(bars < daily);
  // Window volume, thousands separators, and the shares as text next to the bar.
  CHECK(html.find(">1,024<") != std::string::npos);
  CHECK(
      html.find("<span>none 1.2%</span> &middot; <span>TLS1.0 12.5%</span> &middot; <span>TLS1.1 0.0%</span> "
                "&middot; <span>TLS1.2 80.1%</span> &middot; <span>TLS1.3 6.2%</span>") != std::string::npos);
  CHECK(html.find("fill=\"#d32f2f\"") != std::string::npos);  // none is red
  CHECK(html.find("removed from config") != std::string::npos);

  // Without insights the page says so instead of advising.
  WindowStore quiet;
  add(quiet, "partner-contoso", in, kNow, {0, 0, 0, 10, 0});
  const std::string calm = mailflow::render_html(mailflow::build_report(quiet, make_config(), 7, kNow));
  CHECK(calm.find("No active insights") != std::string::npos);
  CHECK(calm.find("switched off") == std::string::npos);
}

TEST_CASE("report over 1,000 connectors renders every format quickly") {
  auto config = make_config();
  config.connectors.clear();
  WindowStore store;
  for (int i = 0; i < 1000; ++i) {
    mailflow::config::Connector c;
    c.name = "partner-" + std::to_string(i);
    c.direction = in;
    config.connectors.push_back(c);
    for (int h = 0; h < 7 * 24; h += 5) add(store, c.name, in, kNow - hours(h), {0, 1, 0, 10, 1});
  }
  const auto begin = steady_clock::now();
  const Report report = mailflow::build_report(store, config, 7, kNow);
  CHECK(report.rows.size() == 7 * (1000 + 2));  // + internet inbound and outbound
  CHECK(report.insights.size() == 1000);        // 1/12 TLS1.0 > 5% and >= 100 messages each
  CHECK(mailflow::render_json(report).size() > 7 * 1000 * 200);
  const std::string csv = mailflow::render_csv(report);
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 7 * 1002 + 1);
  CHECK(!mailflow::render_table(report).empty());
  CHECK(!mailflow::render_html(report).empty());
  const auto elapsed = duration_cast<milliseconds>(steady_clock::now() - begin);
  MESSAGE("report over 1,000 connectors, all formats: " << elapsed.count() << " ms");
  CHECK(elapsed < seconds(20));
}

TEST_CASE("JSON and CSV escape hostile names") {
  CHECK(mailflow::json_escape("a\"b\\c\n\x01") == "a\\\"b\\\\c\\n\\u0001");
  CHECK(mailflow::html_escape("<a href='x'>&</a>") == "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;");
  CHECK(mailflow::format_thousands(0) == "0");
  CHECK(mailflow::format_thousands(999) == "999");
  CHECK(mailflow::format_thousands(1000) == "1,000");
  CHECK(mailflow::format_thousands(1234567) == "1,234,567");
  WindowStore store;
  add(store, "we\"ird,name", in, kNow, {1, 0, 0, 0, 0});
  const Report report = mailflow::build_report(store, make_config(), 1, kNow);
  CHECK(mailflow::render_json(report).find("\"connector\": \"we\\\"ird,name\"") != std::string::npos);
  CHECK(mailflow::render_csv(report).find("\n2026-11-25,\"we\"\"ird,name\",inbound,") != std::string::npos);
  // A cell that a spreadsheet would run as a formula is shown as text (a leading '), nothing of it lost.
  CHECK(mailflow::csv_field("=HYPERLINK(\"http://x/\",\"y\")") == "\"'=HYPERLINK(\"\"http://x/\"\",\"\"y\"\")\"");
  CHECK(mailflow::csv_field("+1") == "\"'+1\"");
  CHECK(mailflow::csv_field("-2+3") == "\"'-2+3\"");
  CHECK(mailflow::csv_field("@SUM(A1)") == "\"'@SUM(A1)\"");
  CHECK(mailflow::csv_field("mx1.example.net") == "mx1.example.net");
  CHECK(mailflow::csv_field("a=b") == "a=b");
  CHECK(mailflow::csv_field("") == "");
}

// ---------------------------------------------------------------------------------------------------------------
// `mailflowd report`: against a one-shot fake HTTP server on loopback.

namespace {

namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;

struct FakeServer {
  boost::asio::io_context io;
  tcp::acceptor acceptor{io, tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0)};
  std::thread thread;
  std::string target;
  std::string authorization;

  // `content_type` empty: what the daemon serves at the requested path (JSON, .csv, .txt).
  FakeServer(http::status status, std::string body, std::string content_type = {}) {
    thread = std::thread([this, status, body = std::move(body), content_type = std::move(content_type)] {
      beast::error_code ec;
      tcp::socket socket(io);
      acceptor.accept(socket, ec);
      if (ec) return;
      beast::flat_buffer buffer;
      http::request<http::string_body> request;
      http::read(socket, buffer, request, ec);
      if (ec) return;
      target = std::string(request.target());
      authorization = std::string(request[http::field::authorization]);
      http::response<http::string_body> response{status, 11};
      const std::string path = target.substr(0, target.find('?'));
      response.set(http::field::content_type,
                   !content_type.empty()      ? content_type
                   : path.ends_with(".csv")   ? "text/csv; charset=utf-8"
                   : path.ends_with(".txt") || status != http::status::ok ? "text/plain; charset=utf-8"
                                                                            : "application/json");
      response.set(http::field::server, "mailflowd/9.8.7+test");
      response.body() = body;
      response.prepare_payload();
      http::write(socket, response, ec);
      socket.shutdown(tcp::socket::shutdown_both, ec);
    });
  }
  // Waits until the one exchange is over (the recorded request is then safe to read).
  void wait() {
    if (thread.joinable()) thread.join();
  }
  ~FakeServer() {
    if (thread.joinable()) {
      // Unblock a pending accept by connecting once.
      beast::error_code ec;
      tcp::socket poke(io);
      poke.connect(acceptor.local_endpoint(), ec);
      thread.join();
    }
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port()); }
};

struct CliResult {
  int code;
  std::string out;
  std::string err;
};

CliResult run_cli(std::vector<std::string> args) {
  args.insert(args.begin(), {"mailflowd", "report"});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::ostringstream out;
  std::ostringstream err;
  const int code = mailflow::run_report_cli(static_cast<int>(argv.size()), argv.data(), out, err, seconds(5));
  return {code, out.str(), err.str()};
}

}  // namespace

TEST_CASE("mailflowd report fetches the chosen format and prints the body") {
  {
    FakeServer server(http::status::ok, "{\"days\": 3}\n");
    const auto r = run_cli({"--url", server.url(), "--days", "3", "--format", "json"});
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.out == "{\"days\": 3}\n");
    CHECK(r.err.empty());
    CHECK(server.target == "/api/v1/report?days=3");
    CHECK(server.authorization.empty());
  }
  {
    FakeServer server(http::status::ok, "date,connector\n");
    const auto r = run_cli({"--format=csv", "--url=" + server.url() + "/"});
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.out == "date,connector\n");
    CHECK(server.target == "/api/v1/report.csv");
  }
  {
    // Default format is the server-rendered table, after a line that names the daemon (never the password);
    // basic auth from the URL; a path prefix is kept.
    FakeServer server(http::status::ok, "DATE  CONNECTOR");
    const std::string url = "http://prom:s3cret@" + server.url().substr(7) + "/mailflow";
    const auto r = run_cli({"--url", url});
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.out == "mailflowd at " + server.url() + "/mailflow (version 9.8.7+test)\nDATE  CONNECTOR\n");
    CHECK(server.target == "/mailflow/api/v1/report.txt");
    CHECK(server.authorization == "Basic cHJvbTpzM2NyZXQ=");
  }
  {
    // A password with a '/' (it would end the authority) and a '%', %-escaped as RFC 3986 3.2.1 wants them.
    FakeServer server(http::status::ok, "{}");
    const auto r =
        run_cli({"--format", "json", "--url", "http://prom:a%2Fb%25c%40d@" + server.url().substr(7)});
    server.wait();
    CHECK(r.code == 0);
    CHECK(server.target == "/api/v1/report");
    CHECK(server.authorization == "Basic cHJvbTphL2IlY0Bk");
  }
}

namespace {

// A file that is removed again at the end of the scope.
struct TempFile {
  std::filesystem::path path;
  TempFile(const std::string& name, const std::string& text)
      : path(std::filesystem::temp_directory_path() /
             ("mailflowd-report-test-" + std::to_string(::getpid()) + "-" + name)) {
    FILE* f = std::fopen(path.c_str(), "w");
    REQUIRE(f != nullptr);
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  ~TempFile() { std::filesystem::remove(path); }
};

}  // namespace

TEST_CASE("mailflowd report --config: address and user from the daemon's file, password from a file or env") {
  ::unsetenv("MAILFLOWD_PASSWORD");
  FakeServer server(http::status::ok, "DATE  CONNECTOR\n");
  const std::string port = server.url().substr(server.url().rfind(':') + 1);
  const auto config_text = [](const std::string& http_address) {
    return "hostname: t.localhost\n"
           "listeners: [{name: in, address: \"127.0.0.1:2525\", direction: inbound, upstream: up}]\n"
           "upstreams: [{name: up, address: \"127.0.0.1:2526\", tls: none}]\n"
           "http:\n"
           "  address: \"" + http_address + "\"\n"
           "  basic_auth: {user: prom, password_hash: "
           "\"$6$salt$DGAQW8l.nT4RCbPNEQZjx6ZZzjHy2eW5krORahM6YQzUbUKsZPuhNkX7AUpx1TMPuF37mzmXtWWdUw3tTKEd.1\"}\n";
  };
  // The daemon listens on every address: the report connects to loopback.
  const TempFile config("config.yaml", config_text("0.0.0.0:" + port));
  const TempFile password("password", "s3cret\n");
  SUBCASE("--password-file: its first line") {
    const auto r = run_cli({"--config", config.path.string(), "--password-file", password.path.string()});
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.err == "");
    CHECK(r.out == "mailflowd at http://127.0.0.1:" + port + " (version 9.8.7+test)\nDATE  CONNECTOR\n");
    CHECK(server.authorization == "Basic cHJvbTpzM2NyZXQ=");  // prom:s3cret
  }
  SUBCASE("MAILFLOWD_PASSWORD, --user over the config's, json without the first line") {
    ::setenv("MAILFLOWD_PASSWORD", "s3cret", 1);
    const auto r = run_cli({"--config", config.path.string(), "--user", "admin", "--format", "json"});
    ::unsetenv("MAILFLOWD_PASSWORD");
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.out == "DATE  CONNECTOR\n");
    CHECK(server.authorization == "Basic YWRtaW46czNjcmV0");  // admin:s3cret
  }
  SUBCASE("--url overrides the config's address") {
    const TempFile elsewhere("elsewhere.yaml", config_text("127.0.0.1:1"));
    const auto r = run_cli({"--config", elsewhere.path.string(), "--url", server.url(), "--format", "csv"});
    server.wait();
    CHECK(r.code == 0);
    CHECK(server.target == "/api/v1/report.csv");
    CHECK(server.authorization == "Basic cHJvbTo=");  // prom: (no password given)
  }
}

TEST_CASE("mailflowd report: a URL with a user and no password takes the password from --password-file or env") {
  ::unsetenv("MAILFLOWD_PASSWORD");
  const TempFile password("url-user-password", "s3cret\n");
  {
    FakeServer server(http::status::ok, "{}");
    const auto r = run_cli({"--format", "json", "--url", "http://prom@" + server.url().substr(7), "--password-file",
                            password.path.string()});
    server.wait();
    CHECK(r.code == 0);
    CHECK(server.authorization == "Basic cHJvbTpzM2NyZXQ=");  // prom:s3cret
  }
  {
    ::setenv("MAILFLOWD_PASSWORD", "s3cret", 1);
    FakeServer server(http::status::ok, "{}");
    const auto r = run_cli({"--format", "json", "--url", "http://prom@" + server.url().substr(7)});
    ::unsetenv("MAILFLOWD_PASSWORD");
    server.wait();
    CHECK(r.code == 0);
    CHECK(server.authorization == "Basic cHJvbTpzM2NyZXQ=");
  }
}

TEST_CASE("mailflowd report: an unusable --config or --password-file is an error, not a guess") {
  const TempFile broken("broken.yaml", "hostname: t.localhost\nhttp: {address: nowhere}\n");
  auto r = run_cli({"--config", broken.path.string()});
  CHECK(r.code == 1);
  CHECK(r.out.empty());
  CHECK(r.err.find(broken.path.string() + ":") != std::string::npos);  // file:line:col errors
  CHECK(r.err.find("cannot use --config") != std::string::npos);
  r = run_cli({"--user", "prom", "--password-file", "/nonexistent/mailflowd-password"});
  CHECK(r.code == 1);
  CHECK(r.err.find("cannot read a password from --password-file /nonexistent/mailflowd-password") !=
        std::string::npos);
  r = run_cli({"--password-file", broken.path.string()});  // whose password?
  CHECK(r.code == 2);
  CHECK(r.err.find("--password-file needs a user") != std::string::npos);
}

TEST_CASE("mailflowd report: a 200 that is not the report asked for (a proxy's login page) is an error, exit 1") {
  for (const auto& [format, content_type] : std::vector<std::pair<std::string, std::string>>{
           {"json", "text/html; charset=utf-8"}, {"csv", "text/html"}, {"table", "application/json"},
           {"json", ""}}) {
    CAPTURE(format);
    CAPTURE(content_type);
    FakeServer server(http::status::ok, "<html><body>Please log in</body></html>\n",
                      content_type.empty() ? "text/plain" : content_type);
    const auto r = run_cli({"--url", server.url(), "--format", format});
    server.wait();
    CHECK(r.code == 1);
    CHECK(r.out.empty());
    CHECK(r.err.find("answered 200 with Content-Type " + (content_type.empty() ? "text/plain" : content_type)) !=
          std::string::npos);
    CHECK(r.err.find("not the report") != std::string::npos);
  }
  // The media type decides, not its parameters or case.
  FakeServer server(http::status::ok, "{}\n", "Application/JSON;charset=UTF-8");
  const auto r = run_cli({"--url", server.url(), "--format", "json"});
  server.wait();
  CHECK(r.code == 0);
  CHECK(r.out == "{}\n");
}

TEST_CASE("mailflowd report: a non-200 answer shows the server's message and exits 1") {
  FakeServer server(http::status::bad_request, "days must be between 1 and 7\n");
  const auto r = run_cli({"--url", server.url(), "--days", "30"});
  server.wait();
  CHECK(r.code == 1);
  CHECK(r.out.empty());
  CHECK(r.err.find("400") != std::string::npos);
  CHECK(r.err.find("days must be between 1 and 7") != std::string::npos);
}

TEST_CASE("mailflowd report: nobody listening is a clear error and exit 1") {
  std::uint16_t port = 0;
  {
    boost::asio::io_context io;
    tcp::acceptor probe(io, tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    port = probe.local_endpoint().port();
  }  // closed again: connecting is refused
  const auto r = run_cli({"--url", "http://127.0.0.1:" + std::to_string(port)});
  CHECK(r.code == 1);
  CHECK(r.out.empty());
  CHECK(r.err.find("cannot connect to 127.0.0.1:" + std::to_string(port)) != std::string::npos);
  CHECK(r.err.find("is mailflowd running") != std::string::npos);
}

TEST_CASE("mailflowd report: a server that never answers times out with exit 1") {
  boost::asio::io_context io;
  tcp::acceptor silent(io,
                       tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));  // listens, never reads
  std::vector<std::string> args{"mailflowd", "report", "--url",
                                "http://127.0.0.1:" + std::to_string(silent.local_endpoint().port())};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::ostringstream out;
  std::ostringstream err;
  const auto start = steady_clock::now();
  CHECK(mailflow::run_report_cli(4, argv.data(), out, err, milliseconds(300)) == 1);
  CHECK(steady_clock::now() - start < seconds(3));
  CHECK(err.str().find("timed out") != std::string::npos);
  // A slow daemon is no TLS server: it neither closed nor answered in TLS, so no hint to use https://.
  CHECK(err.str().find("closed without answering") == std::string::npos);
  CHECK(err.str().find("https://") == std::string::npos);
}

TEST_CASE("mailflowd report: an answer cut short, or stalled after its head, is no hint to use https://") {
  for (const bool stall : {false, true}) {
    CAPTURE(stall);
    boost::asio::io_context io;
    tcp::acceptor acceptor(io, tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    std::thread server([&] {
      beast::error_code ec;
      tcp::socket socket(io);
      acceptor.accept(socket, ec);
      if (ec) return;
      beast::flat_buffer buffer;
      http::request<http::string_body> request;
      http::read(socket, buffer, request, ec);
      const std::string head =
          "HTTP/1.1 200 OK\r\nServer: mailflowd/9.8.7\r\nContent-Length: 100\r\n\r\nDATE  CONNECTOR\n";
      boost::asio::write(socket, boost::asio::buffer(head), ec);
      if (stall) std::this_thread::sleep_for(milliseconds(800));  // past the client's deadline
      socket.shutdown(tcp::socket::shutdown_both, ec);
    });
    std::vector<std::string> args{"mailflowd", "report", "--url",
                                  "http://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port())};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    std::ostringstream out;
    std::ostringstream err;
    CHECK(mailflow::run_report_cli(4, argv.data(), out, err, milliseconds(300)) == 1);
    server.join();
    CHECK(out.str().empty());
    CHECK(err.str().find(stall ? "timed out" : "partial message") != std::string::npos);
    CHECK(err.str().find("closed without answering") == std::string::npos);
    CHECK(err.str().find("https://") == std::string::npos);
  }
}

TEST_CASE("mailflowd report: bad usage exits 2 with the usage text") {
  for (const auto& args : std::vector<std::vector<std::string>>{{"--days", "0"},
                                                                {"--days", "seven"},
                                                                {"--days"},
                                                                {"--format", "xml"},
                                                                {"--url", "ftp://127.0.0.1:9725"},
                                                                {"--url", "http://127.0.0.1:99999"},
                                                                {"--url", "http://:9725"},
                                                                {"--verbose"},
                                                                {"--summary", "--days", "3"},
                                                                {"--connector", "no such/name"},
                                                                {"--url", "http://u:50%@127.0.0.1:9725"},
                                                                {"extra"}}) {
    CAPTURE(args.front());
    const auto r = run_cli(args);
    CHECK(r.code == 2);
    CHECK(r.out.empty());
    CHECK(r.err.find("usage: mailflowd report") != std::string::npos);
  }
  const auto help = run_cli({"--help"});
  CHECK(help.code == 0);
  CHECK(help.out.find("usage: mailflowd report") != std::string::npos);
}

namespace {

using mailflow::test::make_test_certificate;
using mailflow::test::TestCertificate;

// One HTTPS exchange on loopback.
struct FakeTlsServer {
  boost::asio::io_context io;
  boost::asio::ssl::context context{boost::asio::ssl::context::tls_server};
  tcp::acceptor acceptor{io, tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0)};
  std::thread thread;
  std::string target;

  FakeTlsServer(const TestCertificate& certificate, std::string body) {
    context.use_certificate_chain(boost::asio::buffer(certificate.cert_pem));
    context.use_private_key(boost::asio::buffer(certificate.key_pem), boost::asio::ssl::context::pem);
    thread = std::thread([this, body = std::move(body)] {
      beast::error_code ec;
      tcp::socket socket(io);
      acceptor.accept(socket, ec);
      if (ec) return;
      boost::asio::ssl::stream<tcp::socket> stream(std::move(socket), context);
      stream.handshake(boost::asio::ssl::stream_base::server, ec);
      if (ec) return;
      beast::flat_buffer buffer;
      http::request<http::string_body> request;
      http::read(stream, buffer, request, ec);
      if (ec) return;
      target = std::string(request.target());
      http::response<http::string_body> response{http::status::ok, 11};
      const std::string path = target.substr(0, target.find('?'));
      response.set(http::field::content_type, path.ends_with(".csv")   ? "text/csv; charset=utf-8"
                                              : path.ends_with(".txt") ? "text/plain; charset=utf-8"
                                                                       : "application/json");
      response.body() = body;
      response.prepare_payload();
      http::write(stream, response, ec);
      stream.shutdown(ec);
    });
  }
  void wait() {
    if (thread.joinable()) thread.join();
  }
  ~FakeTlsServer() {
    if (thread.joinable()) {
      beast::error_code ec;
      tcp::socket poke(io);
      poke.connect(acceptor.local_endpoint(), ec);
      thread.join();
    }
  }
  std::string url() const { return "https://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port()); }
};

}  // namespace

TEST_CASE("mailflowd report over https: verified with --ca-file, refused when untrusted, --insecure skips") {
  const TestCertificate certificate = make_test_certificate();
  const auto ca_file = std::filesystem::temp_directory_path() /
                       ("mailflowd-report-test-" + std::to_string(::getpid()) + ".pem");
  {
    FILE* f = std::fopen(ca_file.c_str(), "w");
    REQUIRE(f != nullptr);
    std::fwrite(certificate.cert_pem.data(), 1, certificate.cert_pem.size(), f);
    std::fclose(f);
  }
  {
    FakeTlsServer server(certificate, "csv body\n");
    const auto r = run_cli({"--url", server.url(), "--format", "csv", "--ca-file", ca_file.string()});
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.err == "");
    CHECK(r.out == "csv body\n");
    CHECK(server.target == "/api/v1/report.csv");
  }
  {
    FakeTlsServer server(certificate, "secret\n");
    const auto r = run_cli({"--url", server.url()});  // system trust store: the self-signed cert is unknown
    server.wait();
    CHECK(r.code == 1);
    CHECK(r.out.empty());
    CHECK(r.err.find("TLS handshake failed") != std::string::npos);
    CHECK(r.err.find("certificate verify failed") != std::string::npos);
  }
  {
    FakeTlsServer server(certificate, "table\n");
    const auto r = run_cli({"--insecure", "--url", server.url(), "--days", "2"});
    server.wait();
    CHECK(r.code == 0);
    CHECK(r.out == "mailflowd at " + server.url() + " (version unknown)\ntable\n");  // no Server: header
    CHECK(server.target == "/api/v1/report.txt?days=2");
  }
  {
    // http:// at a TLS server: the answer is a TLS alert or nothing, and the message says to use https://.
    FakeTlsServer server(certificate, "table\n");
    const std::string url = "http://" + server.url().substr(8);
    const auto r = run_cli({"--url", url});
    server.wait();
    CHECK(r.code == 1);
    CHECK(r.out.empty());
    CHECK(r.err.find("use an https:// URL") != std::string::npos);
  }
  std::filesystem::remove(ca_file);
}
