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

std::array<double, 5> percentages(const TlsCounts& counts, std::uint64_t total) {
  std::array<double, 5> out{};
  if (total == 0) return out;
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = 100.0 * static_cast<double>(counts[i]) / static_cast<double>(total);
  return out;
}

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
  for (const auto& key : store.keys(now)) {  // already sorted
    const bool internet =
        key.connector == "internet";  // unmatched traffic is never "removed from the config"
    push({key.connector, key.direction, ConnectorType::internet, false, internet, config.telemetry.defaults});
  }
  return entries;
}

std::string pluralize(std::uint64_t n, std::string_view singular, std::string_view plural) {
  return format_thousands(n) + " " + std::string(n == 1 ? singular : plural);
}

void add_insights(std::vector<Insight>& out, const Entry& entry, const TlsCounts& counts, int window_days) {
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
    insight.text = fmt::format("{} {} connector {} is seeing {}: {}% of {} in the last {}",
                               direction_title(entry.direction), type_words(entry.type), entry.name,
                               kind.what, one_decimal(share * 100.0), pluralize(total, "message", "messages"),
                               pluralize(static_cast<std::uint64_t>(window_days), "day", "days"));
    out.push_back(std::move(insight));
  }
}

std::string csv_field(std::string_view text) {
  if (text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

}  // namespace

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

std::string json_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || c == 0x7f)
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
        else
          out += ch;
    }
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

Report build_report(const WindowStore& store, const config::Config& config, int days,
                    WindowStore::TimePoint now) {
  Report report;
  report.generated_at = rfc3339_utc(now);
  report.window_days = window_days_of(store);
  report.days = std::clamp(days, 1, report.window_days);

  const std::vector<Entry> entries = entries_of(store, config, now);
  const auto today = std::chrono::floor<std::chrono::days>(now);
  report.rows.reserve(entries.size() * static_cast<std::size_t>(report.days));
  for (int back = report.days - 1; back >= 0; --back) {
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
      row.messages = total_of(counts);
      row.percent = percentages(counts, row.messages);
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
    summary.percent = percentages(counts, summary.messages);
    report.connectors.push_back(std::move(summary));
  }
  return report;
}

std::string render_json(const Report& report) {
  std::string out;
  out.reserve(256 + report.rows.size() * 220);
  out += fmt::format("{{\"generated_at\": \"{}\", \"days\": {},\n \"rows\": [",
                     json_escape(report.generated_at), report.days);
  bool first = true;
  for (const ReportRow& row : report.rows) {
    if (!first) out += ",\n  ";
    first = false;
    out += fmt::format(
        "{{\"date\": \"{}\", \"connector\": \"{}\", \"direction\": \"{}\", \"type\": \"{}\", \"forced_tls\": "
        "{}, "
        "\"messages\": {}, \"percent\": {{",
        json_escape(row.date), json_escape(row.connector), config::to_string(row.direction),
        config::to_string(row.type), row.forced_tls ? "true" : "false", row.messages);
    for (std::size_t i = 0; i < kVersionNames.size(); ++i)
      out += fmt::format("{}\"{}\": {}", i == 0 ? "" : ", ", kVersionNames[i], one_decimal(row.percent[i]));
    out += "}}";
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
  out += "]";
  append_drilldown_json(out, report);  // report_remotes.cpp
  out += "}\n";
  return out;
}

std::string render_csv(const Report& report) {
  std::string out =
      "date,connector,direction,type,forced_tls,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct\n";
  for (const ReportRow& row : report.rows) {
    out += fmt::format("{},{},{},{},{},{}", csv_field(row.date), csv_field(row.connector),
                       config::to_string(row.direction), config::to_string(row.type),
                       row.forced_tls ? "true" : "false", row.messages);
    for (const double p : row.percent) {
      out += ',';
      out += one_decimal(p);
    }
    out += '\n';
  }
  return out;
}

std::string render_table(const Report& report) {
  const std::vector<std::string> header{"DATE",       "CONNECTOR", "DIRECTION", "TYPE",
                                        "FORCED_TLS", "MESSAGES",  "NONE%",     "TLS1.0%",
                                        "TLS1.1%",    "TLS1.2%",   "TLS1.3%"};
  const std::vector<bool> right{false, false, false, false, false, true, true, true, true, true, true};
  std::vector<std::vector<std::string>> cells;
  cells.reserve(report.rows.size() + 1);
  cells.push_back(header);
  for (const ReportRow& row : report.rows) {
    std::vector<std::string> line{row.date,
                                  row.connector,
                                  std::string(config::to_string(row.direction)),
                                  std::string(config::to_string(row.type)),
                                  row.forced_tls ? "yes" : "no",
                                  format_thousands(row.messages)};
    for (const double p : row.percent) line.push_back(one_decimal(p));
    cells.push_back(std::move(line));
  }
  std::vector<std::size_t> width(header.size(), 0);
  for (const auto& line : cells)
    for (std::size_t i = 0; i < line.size(); ++i) width[i] = std::max(width[i], line[i].size());

  std::string out = fmt::format("Connector report: last {} {} (UTC), window {} {}, generated {}\n\n",
                                report.days, report.days == 1 ? "day" : "days", report.window_days,
                                report.window_days == 1 ? "day" : "days", report.generated_at);
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
)css";

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

  // Insights first: this is what the administrator came for.
  out += "<section id=\"insights\"><h2>Insights</h2>\n";
  if (report.insights.empty()) {
    out += "<p class=\"ok\">No active insights: no connector is above its TLS1.0 or no-TLS threshold.</p>\n";
  } else {
    for (const Insight& insight : report.insights)
      out +=
          fmt::format("<p class=\"insight {}\">{}</p>\n",
                      insight.insight == "significant_tls10" ? "tls10" : "notls", html_escape(insight.text));
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

  out += fmt::format(
      "<section id=\"daily\"><h2>Per day (UTC), last {} {}</h2>\n<table>\n<thead><tr><th>Date</th>"
      "<th>Connector</th><th>Direction</th><th>Type</th><th>Forced TLS</th><th class=\"num\">Messages</th>",
      report.days, report.days == 1 ? "day" : "days");
  for (const auto name : kVersionNames) out += fmt::format("<th class=\"num\">{} %</th>", html_escape(name));
  out += "</tr></thead>\n<tbody>\n";
  // Newest day first: today is what an administrator looks for; connector order is kept within a day.
  std::vector<const ReportRow*> newest_first;
  for (const ReportRow& row : report.rows) newest_first.push_back(&row);
  std::stable_sort(newest_first.begin(), newest_first.end(),
                   [](const ReportRow* a, const ReportRow* b) { return a->date > b->date; });
  for (const ReportRow* row_ptr : newest_first) {
    const ReportRow& row = *row_ptr;
    out +=
        fmt::format("<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>",
                    row.messages == 0 ? " class=\"zero\"" : "", html_escape(row.date),
                    html_escape(row.connector), config::to_string(row.direction), type_words(row.type),
                    row.forced_tls ? "yes" : "no", format_thousands(row.messages));
    for (std::size_t i = 0; i < row.percent.size(); ++i) {
      const char* cls = "num";
      if (row.percent[i] > 0 && i == static_cast<std::size_t>(TlsVersion::none)) cls = "num bad";
      if (row.percent[i] > 0 && (i == static_cast<std::size_t>(TlsVersion::tls10) ||
                                 i == static_cast<std::size_t>(TlsVersion::tls11)))
        cls = "num warn";
      out += fmt::format("<td class=\"{}\">{}</td>", cls, one_decimal(row.percent[i]));
    }
    out += "</tr>\n";
  }
  out += "</tbody>\n</table>\n</section>\n";
  append_drilldown_html(out, report);  // report_remotes.cpp
  out +=
      "<footer>mailflowd &middot; JSON: <code>/api/v1/report</code> &middot; CSV: "
      "<code>/api/v1/report.csv</code> "
      "&middot; Prometheus: <code>/metrics</code></footer>\n";
  out += "</main>\n</body>\n</html>\n";
  return out;
}

}  // namespace mailflow
