// The report's drill-down (daemon/report_remotes.cpp): rows merged over the report's days and sorted legacy
// first, the insight's offender clause, and the JSON, CSV, table and HTML renderings.
#include <doctest/doctest.h>

#include <chrono>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "daemon/remote_store.hpp"
#include "daemon/report.hpp"

namespace {

using namespace std::chrono;
using mailflow::HeavyHitters;
using mailflow::RemoteStore;
using mailflow::RemoteTable;
using mailflow::WindowStore;
using mailflow::config::Direction;
using mailflow::proto::TlsVersion;

const WindowStore::TimePoint kNow = sys_days(2026y / 11 / 25) + hours(10);

struct Fixture {
  mailflow::config::Config config;
  WindowStore windows;
  RemoteStore remotes;

  Fixture() {
    config.listeners.push_back({.name = "in", .address = {}, .direction = Direction::inbound, .tls = {},
                                .proxy_trusted = {}, .upstream = "store"});
    config.listeners.push_back({.name = "out", .address = {}, .direction = Direction::outbound, .tls = {},
                                .proxy_trusted = {}, .upstream = "store"});
    mailflow::config::Connector partner;
    partner.name = "partner-contoso";
    partner.type = mailflow::config::ConnectorType::partner;
    partner.direction = Direction::inbound;
    partner.alerts = {0.05, 0.05, 10};
    config.connectors.push_back(partner);
    remotes.set_limits({.top_remotes = 100, .top_domains = 50, .remotes = true, .window = hours(24 * 7)});
  }

  void inbound(std::string_view address, std::string_view ehlo, TlsVersion version, int count,
               WindowStore::TimePoint when = kNow) {
    const std::string domains[] = {"contoso.com"};
    for (int i = 0; i < count; ++i) {
      windows.add("partner-contoso", Direction::inbound, version, when);
      HeavyHitters::Observation o;
      o.key = address;
      o.name = ehlo;
      o.cipher = version == TlsVersion::none ? "" : "AES128-SHA";
      o.domains = domains;
      o.version = version;
      remotes.add("partner-contoso", Direction::inbound, RemoteTable::remotes, o, when);
    }
  }

  void outbound(std::string_view domain, std::string_view mx, std::string_view address, TlsVersion version) {
    const std::string domains[] = {std::string(domain)};
    windows.add("internet", Direction::outbound, version, kNow);
    HeavyHitters::Observation o;
    o.key = address;
    o.name = mx;
    o.domains = domains;
    o.version = version;
    remotes.add("internet", Direction::outbound, RemoteTable::remotes, o, kNow);
    o.key = domain;
    o.domains = {};
    remotes.add("internet", Direction::outbound, RemoteTable::domains, o, kNow);
  }

  mailflow::Report report(int days) {
    auto r = mailflow::build_report(windows, config, days, kNow);
    mailflow::add_drilldown(r, remotes, kNow);
    return r;
  }
};

TEST_CASE("drill-down: rows over the report's days, the ones to fix first, and the insight's offender") {
  Fixture f;
  f.inbound("203.0.113.7", "mx2.contoso.com", TlsVersion::tls10, 9);
  f.inbound("203.0.113.8", "mx3.contoso.com", TlsVersion::tls10, 3, kNow - days(3));
  f.inbound("203.0.113.9", "mx9.contoso.com", TlsVersion::tls13, 50);
  f.inbound("203.0.113.10", "old.contoso.com", TlsVersion::none, 1);
  f.remotes.set_name("203.0.113.7", "mx2.contoso.com", kNow, seconds(60));
  f.outbound("fabrikam.com", "mx.fabrikam.com", "192.0.2.25", TlsVersion::tls12);
  f.outbound("legacy.example", "mx.legacy.example", "192.0.2.26", TlsVersion::tls11);

  const auto week = f.report(7);
  REQUIRE(week.drilldowns.size() == 3);  // partner-contoso, internet inbound, internet outbound
  const auto& partner = week.drilldowns[0];
  CHECK(partner.connector == "partner-contoso");
  REQUIRE(partner.remotes.rows.size() == 4);
  CHECK(partner.remotes.rows[0].key == "203.0.113.7");  // 9 legacy
  CHECK(partner.remotes.rows[1].key == "203.0.113.8");  // 3 legacy
  CHECK(partner.remotes.rows[2].key == "203.0.113.10");  // 1 legacy
  CHECK(partner.remotes.rows[3].key == "203.0.113.9");  // 50, none legacy: last
  CHECK(partner.remotes.rows[0].verified_name == "mx2.contoso.com");
  CHECK(partner.remotes.rows[0].messages[1] == 9);
  CHECK(partner.remotes.rows[0].cipher == "AES128-SHA");
  CHECK(partner.remotes.rows[0].last_seen == "2026-11-25T10:00:00Z");
  CHECK(partner.remotes.error_bound == 0);
  CHECK(partner.domains.rows.empty());

  // Insights are over the window: 12 TLS1.0 messages of 63, 9 of them from one server.
  REQUIRE(!week.insights.empty());
  CHECK(week.insights[0].text ==
        "Inbound partner connector partner-contoso is seeing significant TLS1.0 mail flow: 19.0% of 63 "
        "messages in the last 7 days; 203.0.113.7 (mx2.contoso.com) sent 9 of the 12 TLS1.0 messages "
        "since 2026-11-18 00:00 UTC");

  // One day: the server seen three days ago is not in the rows (its messages are outside these days).
  const auto today = f.report(1);
  CHECK(today.drilldowns[0].remotes.rows.size() == 3);

  const auto& out = week.drilldowns[2];
  CHECK(out.direction == Direction::outbound);
  REQUIRE(out.domains.rows.size() == 2);
  CHECK(out.domains.rows[0].key == "legacy.example");
  CHECK(out.domains.rows[0].name == "mx.legacy.example");

  const std::string json = mailflow::render_json(week);
  // The drill-down sits inside each connector's object of the report's `connectors` list.
  const auto contoso = json.find("{\"connector\": \"partner-contoso\", \"direction\": \"inbound\", \"type\"");
  REQUIRE(contoso != std::string::npos);
  CHECK(json.find("\"remotes\": {\"enabled\": true", contoso) < json.find("{\"connector\": ", contoso + 1));
  CHECK(json.find("{\"address\": \"203.0.113.7\", \"name\": \"mx2.contoso.com\", \"verified_name\": "
                  "\"mx2.contoso.com\", \"domains\": [\"contoso.com\"], \"messages\": 9, \"counts\": {\"none\": 0, "
                  "\"TLS1.0\": 9, \"TLS1.1\": 0, \"TLS1.2\": 0, \"TLS1.3\": 0}") != std::string::npos);
  CHECK(json.find("\"domains\": {\"enabled\": true, \"error_bound\": 0, \"rows\": [\n     {\"domain\": "
                  "\"legacy.example\"") != std::string::npos);

  const std::string csv = mailflow::render_remotes_csv(week);
  CHECK(csv.starts_with("connector,direction,address,name,verified_name,domains,messages,none,tls10,tls11,tls12,"
                        "tls13,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,refused,refused_version,cipher,"
                        "first_seen,last_seen,error\n"
                        "partner-contoso,inbound,203.0.113.7,mx2.contoso.com,mx2.contoso.com,contoso.com,9,0,9,0,0,0,"
                        "0.0,100.0,0.0,0.0,0.0,0,,AES128-SHA,2026-11-25T10:00:00Z,2026-11-25T10:00:00Z,0\n"));
  const std::string domains_csv = mailflow::render_domains_csv(week);
  CHECK(domains_csv.find("\ninternet,outbound,legacy.example,mx.legacy.example,1,0,0,1,0,0,0.0,0.0,100.0,0.0,0.0,") !=
        std::string::npos);

  const std::string table = mailflow::render_remotes_table(week, "partner-contoso");
  const auto first = table.find("203.0.113.7");
  CHECK(first != std::string::npos);
  CHECK(first < table.find("203.0.113.8"));
  CHECK(table.find("203.0.113.8") < table.find("203.0.113.9"));
  CHECK(mailflow::render_remotes_table(week, "no-such").empty());
  CHECK(mailflow::render_domains_table(week).find("legacy.example") != std::string::npos);

  const std::string html = mailflow::render_html(week);
  CHECK(html.find("<details class=\"drilldown\" data-connector=\"partner-contoso\" data-direction=\"inbound\">") !=
        std::string::npos);
  CHECK(html.find("<tr class=\"fix\"><td>203.0.113.7</td>") != std::string::npos);
}

TEST_CASE("drill-down: the offender's count says since when, as it starts before the window's hours") {
  // The window is the 168 hours up to 2026-11-25 10:00 UTC, from 2026-11-18 11:00 on; the servers are kept
  // per UTC day, so 2026-11-18 counts whole. Four TLS1.0 messages at 05:00 that day are in the offender's
  // count, not in the insight's share: the sentence must not read as if both counted the same messages.
  Fixture f;
  const auto before_window = sys_days(2026y / 11 / 18) + hours(5);
  f.inbound("203.0.113.7", "mx2.contoso.com", TlsVersion::tls10, 4, before_window);
  f.inbound("203.0.113.7", "mx2.contoso.com", TlsVersion::tls10, 6);
  f.inbound("203.0.113.9", "mx9.contoso.com", TlsVersion::tls13, 54);
  const auto week = f.report(7);
  REQUIRE(week.insights.size() == 1);
  CHECK(week.insights[0].messages == 60);
  CHECK(week.insights[0].text ==
        "Inbound partner connector partner-contoso is seeing significant TLS1.0 mail flow: 10.0% of 60 "
        "messages in the last 7 days; 203.0.113.7 (mx2.contoso.com) sent 10 of the 10 TLS1.0 messages "
        "since 2026-11-18 00:00 UTC");
}

TEST_CASE("drill-down: over the bound, the other row and the error bound show, remotes off says so") {
  Fixture f;
  f.remotes.set_limits({.top_remotes = 2, .top_domains = 50, .remotes = true, .window = hours(24 * 7)});
  f.inbound("203.0.113.1", "a", TlsVersion::tls12, 5);
  f.inbound("203.0.113.2", "b", TlsVersion::tls12, 4);
  f.inbound("203.0.113.3", "c", TlsVersion::tls12, 1);
  auto report = f.report(1);
  const auto& table = report.drilldowns[0].remotes;
  CHECK(table.rows.size() == 2);
  CHECK(table.other.total() + table.rows[0].total() + table.rows[1].total() == 10);
  CHECK(table.error_bound > 0);
  CHECK(mailflow::render_remotes_table(report, "partner-contoso").find("one not listed sent at most") !=
        std::string::npos);
  CHECK(mailflow::render_remotes_csv(report).find("\npartner-contoso,inbound,(other),") != std::string::npos);

  f.remotes.set_limits({.top_remotes = 2, .top_domains = 50, .remotes = false, .window = hours(24 * 7)});
  report = f.report(1);
  CHECK_FALSE(report.drilldowns[0].remotes.enabled);
  CHECK(report.drilldowns[0].remotes.rows.empty());
  CHECK(mailflow::render_remotes_table(report, "partner-contoso").find("telemetry.remotes: false") !=
        std::string::npos);
}

TEST_CASE("drill-down: an other row of refused handshakes only shows in every rendering") {
  Fixture f;
  f.remotes.set_limits({.top_remotes = 1, .top_domains = 50, .remotes = true, .window = hours(24 * 7)});
  HeavyHitters::Observation refused;
  refused.key = "203.0.113.66";
  refused.offered = TlsVersion::tls10;
  refused.time = duration_cast<seconds>(kNow.time_since_epoch()).count();
  f.remotes.add("partner-contoso", Direction::inbound, RemoteTable::remotes, refused, kNow);
  f.inbound("203.0.113.1", "a", TlsVersion::tls12, 5);  // takes the one slot: the refused server goes to "other"
  const auto report = f.report(1);
  const auto& table = report.drilldowns[0].remotes;
  REQUIRE(table.rows.size() == 1);
  REQUIRE(table.other.refused == 1);
  CHECK(table.other.total() == 0);
  CHECK(mailflow::render_remotes_csv(report).find("\npartner-contoso,inbound,(other),") != std::string::npos);
  CHECK(mailflow::render_html(report).find("<td>(other)</td>") != std::string::npos);
  const std::string text = mailflow::render_remotes_table(report, "partner-contoso");
  const auto other = text.find("\n(other) ");
  CHECK_MESSAGE(other != std::string::npos, text);
  if (other != std::string::npos) {
    // ADDRESS EHLO VERIFIED MESSAGES NONE TLS1.0 TLS1.1 TLS1.2 TLS1.3 REFUSED
    std::istringstream words(text.substr(other + 1, text.find('\n', other + 1) - other - 1));
    std::vector<std::string> cells{std::istream_iterator<std::string>(words), std::istream_iterator<std::string>()};
    REQUIRE(cells.size() >= 10);
    CHECK(cells[9] == "1");
  }

  // Outbound, the same for a destination domain whose sessions only failed its policy.
  f.remotes.set_limits({.top_remotes = 1, .top_domains = 1, .remotes = true, .window = hours(24 * 7)});
  HeavyHitters::Observation failed;
  failed.key = "strict.example";
  failed.name = "mx.strict.example";
  failed.policy = "dane";
  failed.time = refused.time;
  f.remotes.add("internet", Direction::outbound, RemoteTable::domains, failed, kNow);
  f.outbound("fabrikam.com", "mx.fabrikam.com", "192.0.2.25", TlsVersion::tls12);
  const auto out = f.report(1);
  REQUIRE(out.drilldowns[2].domains.other.refused == 1);
  CHECK(mailflow::render_domains_csv(out).find("\ninternet,outbound,(other),") != std::string::npos);
  CHECK(mailflow::render_domains_table(out).find("\n(other) ") != std::string::npos);
}

}  // namespace
