#pragma once
// The connector report: one row per UTC day x connector x direction, and the active insights.
// Pure functions over a WindowStore and a Config; rendered as JSON, CSV, an aligned table and an HTML page.
#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "proto/json.hpp"
#include "daemon/window_store.hpp"

namespace mailflow {

struct ReportRow {
  std::string date;  // YYYY-MM-DD (UTC)
  std::string connector;
  config::Direction direction = config::Direction::inbound;
  config::ConnectorType type = config::ConnectorType::internet;
  bool forced_tls = false;
  bool configured = true;  // false: the connector was removed from (or renamed in) the config since
  std::uint64_t messages = 0;
  TlsCounts counts{};               // messages by proto::TlsVersion (exact; the percentages are rounded)
  std::array<double, 5> percent{};  // by proto::TlsVersion, tls_percent(counts)
};

struct Insight {
  std::string connector;
  config::Direction direction = config::Direction::inbound;
  std::string insight;  // "significant_tls10" | "significant_tls11" | "significant_no_tls"
  double share = 0;     // 0..1 over the whole window
  std::uint64_t messages = 0;
  double threshold = 0;
  std::string text;  // "Inbound partner connector partner-contoso is seeing significant TLS1.0 mail
                     // flow: 12.5% of 1,024 messages in the last 7 days"
};

// One connector x direction over the whole window: the page's bars, JSON "connectors", /api/v1/connectors.csv and
// the table's first section.
struct ConnectorSummary {
  std::string connector;
  config::Direction direction = config::Direction::inbound;
  config::ConnectorType type = config::ConnectorType::internet;
  bool forced_tls = false;
  bool configured = true;  // false: removed from the config, shown while its history is inside the window
  std::uint64_t messages = 0;
  TlsCounts counts{};               // by proto::TlsVersion
  std::array<double, 5> percent{};  // by proto::TlsVersion, tls_percent(counts)
};

// The drill-down behind one connector (daemon/report_remotes.cpp): its remote servers and, outbound, its
// destination domains over the report's days, merged from the per-day heavy-hitters tables.
struct DrilldownRow {
  std::string key;            // address (remotes) or destination domain (domains); "(other)" for the rest
  std::string name;           // EHLO/HELO name (inbound), MX host name (outbound)
  std::string verified_name;  // inbound: the forward-confirmed reverse name ("" when none or not yet known)
  std::vector<std::string> domains;  // sender (inbound) or destination (outbound) domains seen, a few
  TlsCounts messages{};              // by proto::TlsVersion
  // Inbound: handshakes refused (e.g. below the listener's min_version). Outbound: sessions that failed the
  // destination's DANE or MTA-STS policy.
  std::uint64_t refused = 0;
  std::string policy;  // outbound: the policy of the last session ("dane", "mta-sts", "none"); "" unknown
  std::string refused_version;       // the version the last refused client offered ("" when unknown)
  std::string cipher;                // the cipher seen most
  std::string first_seen;            // RFC 3339 UTC; "" when never
  std::string last_seen;
  std::uint64_t error = 0;  // may have sent up to this many more (heavy-hitters error; 0 = exact)
  std::uint64_t total() const;
  std::uint64_t legacy() const;  // none + TLS1.0 + TLS1.1 + refused: what has to be fixed
};

struct DrilldownTable {
  bool enabled = true;  // remotes: false under telemetry.remotes: false
  std::vector<DrilldownRow> rows;  // the ones to fix first: legacy() descending, then total, then key
  DrilldownRow other;              // key "(other)": everything not listed
  std::uint64_t error_bound = 0;   // a server or domain not listed sent at most this many (0: exact)
};

struct ConnectorDrilldown {
  std::string connector;
  config::Direction direction = config::Direction::inbound;
  DrilldownTable remotes;
  DrilldownTable domains;  // outbound only (inbound: empty)
};

// "Protected in transit" per direction over the whole window: every connector of that direction together.
struct TransitSummary {
  config::Direction direction = config::Direction::inbound;
  std::uint64_t messages = 0;
  std::uint64_t tls = 0;         // any TLS version
  std::uint64_t tls12_plus = 0;  // TLS1.2 or TLS1.3
};

struct Report {
  std::string generated_at;  // RFC 3339 UTC
  int days = 7;
  int window_days = 7;
  std::vector<ReportRow> rows;  // by date (newest first), then in connector order (see build_report)
  std::vector<Insight> insights;
  std::vector<ConnectorSummary> connectors;  // in connector order
  std::vector<ConnectorDrilldown> drilldowns;  // in connector order (add_drilldown)
  std::vector<TransitSummary> in_transit;    // one per direction that has a listener or history (inbound first)
};

// Insights over the whole window (same rule as the shipped alerts: messages >= min_messages and share
// strictly greater than the threshold). Used for mailflow_insight_active and the report.
std::vector<Insight> compute_insights(const WindowStore& store, const config::Config& config,
                                      WindowStore::TimePoint now);

// Connector order: configured connectors (config order), then "internet" for each direction that has a
// listener (inbound first), then connectors that are no longer configured but still have messages in the
// window (sorted; "internet" of a direction that no longer has a listener is one of them). A removed connector is reported with type "internet", forced_tls false and the
// telemetry.defaults thresholds: its config is gone, and that is how unmatched traffic is treated too.
// Every connector gets a row for every day, zero messages included, so the table has no holes, except days
// before the first message in the window (the daemon, or its state, did not exist yet): those are left out,
// and an empty window reports today only. Days are newest first, in every rendering.
// `days` is clamped to 1..window days; today (UTC, from `now`) is the first day.
Report build_report(const WindowStore& store, const config::Config& config, int days,
                    WindowStore::TimePoint now);

// `?connector=NAME` (`mailflowd report --connector NAME --format json`): the report of that connector alone,
// both directions where it has both: its rows, insights, summary and drill-down, and "protected in transit"
// over it alone. false, the report unchanged, when it has no such connector.
bool keep_only_connector(Report& report, std::string_view connector);

// Helpers shared with the renderers and the HTTP/metrics side.
// Per TLS version, in percent with one decimal (0..100): a row with messages adds up to exactly 100.0
// (largest remainder); all 0.0 without messages.
std::array<double, 5> tls_percent(const TlsCounts& counts);
std::string format_thousands(std::uint64_t value);  // 1024 -> "1,024"
using proto::json_escape;                          // proto/json.hpp
std::string html_escape(std::string_view text);
std::string rfc3339_utc(WindowStore::TimePoint t);  // "2026-11-25T10:00:00Z"
std::string csv_field(std::string_view text);       // quoted (RFC 4180) when it holds , " CR or LF
// Aligned text columns, two spaces apart, `right[i]`: column i right-aligned; trailing blanks trimmed.
std::string align_columns(const std::vector<std::vector<std::string>>& cells, const std::vector<bool>& right);

std::string render_json(const Report& report);
std::string render_csv(const Report& report);
std::string render_table(const Report& report);  // the summary, then the days (aligned), insights below
// The whole-window summary per connector alone (/api/v1/connectors, .csv, .txt; `mailflowd report --summary`).
std::string render_summary_json(const Report& report);
std::string render_summary_csv(const Report& report);
std::string render_summary_table(const Report& report);
std::string render_html(const Report& report);   // self-contained page, inline SVG, no JavaScript

// ---- the drill-down (daemon/report_remotes.cpp) ----
class RemoteStore;
// Fills report.drilldowns for report.connectors over the report's days, and appends to each insight its top
// offender over the UTC days the window touches ("...: 203.0.113.7 (mx2.contoso.com) sent 9 of the 12 TLS1.0
// messages since 2026-11-18 00:00 UTC").
void add_drilldown(Report& report, const RemoteStore& store, WindowStore::TimePoint now);
// `, "remotes": {...}, "domains": {...}` of one connector, inside its object of the JSON `connectors` list.
void append_drilldown_members(std::string& out, const Report& report, std::string_view connector,
                              config::Direction direction);
void append_drilldown_html(std::string& out, const Report& report);  // per connector a <details> section
// Every connector's servers, or (`connector` not empty) that connector's.
std::string render_remotes_csv(const Report& report, std::string_view connector = {});
std::string render_domains_csv(const Report& report);
// `mailflowd report --connector NAME`: that connector's servers (both directions when it has both), legacy
// TLS first; "" when the report has no such connector (--format csv: render_remotes_csv with its name). And
// `--domains`: every outbound connector's domains.
std::string render_remotes_table(const Report& report, std::string_view connector);
std::string render_domains_table(const Report& report);

}  // namespace mailflow
