// The per-connector drill-down of the report: remote servers and destination domains (issue #18, #14 item 6),
// merged from RemoteStore's per-day heavy-hitters tables, and its renderings. Kept apart from report.cpp so
// that the two grow independently; render_json and render_html call in here once each.
#include <fmt/format.h>

#include <algorithm>

#include "daemon/remote_store.hpp"
#include "daemon/report.hpp"

namespace mailflow {

namespace {

using config::Direction;
using proto::TlsVersion;

constexpr std::size_t kVersions = proto::all_tls_versions.size();
// CSV/JSON column stems per version, as report.csv's *_pct columns.
constexpr std::array<std::string_view, kVersions> kColumn{"none", "tls10", "tls11", "tls12", "tls13"};

std::string time_text(std::int64_t unix_seconds) {
  if (unix_seconds == 0) return {};
  return rfc3339_utc(WindowStore::TimePoint(std::chrono::seconds(unix_seconds)));
}

std::string joined(const std::vector<std::string>& items, std::string_view separator) {
  std::string out;
  for (const auto& item : items) {
    if (!out.empty()) out += separator;
    out += item;
  }
  return out;
}

DrilldownRow row_of(const HeavyHitters::Entry& entry, const RemoteStore& store, bool inbound_remote,
                    WindowStore::TimePoint now) {
  DrilldownRow row;
  row.key = entry.key;
  row.name = entry.name;
  if (inbound_remote) row.verified_name = store.name(entry.key, now).value_or("");
  row.domains = entry.domains;
  row.messages = entry.stats.messages;
  row.refused = entry.stats.refused;
  if (entry.refused_version) row.refused_version = std::string(proto::to_string(*entry.refused_version));
  row.policy = entry.policy;
  row.cipher = std::string(entry.cipher());
  row.first_seen = time_text(entry.stats.first_seen);
  row.last_seen = time_text(entry.stats.last_seen);
  row.error = entry.error;
  return row;
}

DrilldownTable table_of(const HeavyHitters& merged, const RemoteStore& store, bool inbound_remote,
                        WindowStore::TimePoint now) {
  DrilldownTable table;
  for (const auto* entry : merged.entries()) table.rows.push_back(row_of(*entry, store, inbound_remote, now));
  // The ones to fix first: the most legacy (no TLS, TLS1.0/1.1, refused), then the busiest.
  std::sort(table.rows.begin(), table.rows.end(), [](const DrilldownRow& a, const DrilldownRow& b) {
    if (a.legacy() != b.legacy()) return a.legacy() > b.legacy();
    if (a.total() != b.total()) return a.total() > b.total();
    return a.key < b.key;
  });
  // A key no address or domain can be (they are letters, digits, '-', '_', '.', ':' and '[]'): a destination
  // domain may well be called "other".
  table.other.key = "(other)";
  table.other.messages = merged.other().messages;
  table.other.refused = merged.other().refused;
  table.other.first_seen = time_text(merged.other().first_seen);
  table.other.last_seen = time_text(merged.other().last_seen);
  table.error_bound = merged.error_bound();
  return table;
}

// "none", "TLS1.0" or "TLS1.1" for the insights that name one (others get no offender clause).
std::optional<TlsVersion> insight_version(std::string_view insight) {
  if (insight.find("no_tls") != std::string_view::npos) return TlsVersion::none;
  if (insight.find("tls10") != std::string_view::npos) return TlsVersion::tls10;
  if (insight.find("tls11") != std::string_view::npos) return TlsVersion::tls11;
  return std::nullopt;
}

// The "other" row is shown (in every rendering) when it holds anything: messages, or refused handshakes
// (inbound) and policy failures (outbound) alone.
bool has_other(const DrilldownTable& table) { return table.other.total() + table.other.refused != 0; }

std::string server_words(const DrilldownRow& row) {
  const std::string& name = !row.verified_name.empty() ? row.verified_name : row.name;
  return name.empty() ? row.key : row.key + " (" + name + ")";
}

std::string percent_text(double percent) { return fmt::format("{:.1f}", percent); }

// ---- JSON ----
void append_json_row(std::string& out, const DrilldownRow& row, std::string_view key_name) {
  out += fmt::format("{{\"{}\": \"{}\", \"name\": \"{}\", \"verified_name\": \"{}\", \"domains\": [", key_name,
                     json_escape(row.key), json_escape(row.name), json_escape(row.verified_name));
  for (std::size_t i = 0; i < row.domains.size(); ++i)
    out += fmt::format("{}\"{}\"", i == 0 ? "" : ", ", json_escape(row.domains[i]));
  out += fmt::format("], \"messages\": {}, \"counts\": {{", row.total());
  for (std::size_t v = 0; v < kVersions; ++v)
    out += fmt::format("{}\"{}\": {}", v == 0 ? "" : ", ", proto::to_string(proto::all_tls_versions[v]),
                       row.messages[v]);
  out += "}, \"percent\": {";
  const auto percent = tls_percent(row.messages);
  for (std::size_t v = 0; v < kVersions; ++v)
    out += fmt::format("{}\"{}\": {}", v == 0 ? "" : ", ", proto::to_string(proto::all_tls_versions[v]),
                       percent_text(percent[v]));
  out += fmt::format(
      "}}, \"refused\": {}, \"refused_version\": {}, \"policy\": {}, \"cipher\": \"{}\", \"first_seen\": {}, "
      "\"last_seen\": {}, \"error\": {}}}",
      row.refused, row.refused_version.empty() ? "null" : "\"" + row.refused_version + "\"",
      row.policy.empty() ? "null" : "\"" + json_escape(row.policy) + "\"", json_escape(row.cipher),
      row.first_seen.empty() ? "null" : "\"" + row.first_seen + "\"",
      row.last_seen.empty() ? "null" : "\"" + row.last_seen + "\"", row.error);
}

void append_json_table(std::string& out, const DrilldownTable& table, std::string_view key_name) {
  out += fmt::format("{{\"enabled\": {}, \"error_bound\": {}, \"rows\": [", table.enabled ? "true" : "false",
                     table.error_bound);
  for (std::size_t i = 0; i < table.rows.size(); ++i) {
    out += i == 0 ? "\n     " : ",\n     ";
    append_json_row(out, table.rows[i], key_name);
  }
  out += "],\n    \"other\": ";
  append_json_row(out, table.other, key_name);
  out += "}";
}


std::string drilldown_table_text(const DrilldownTable& table, std::string_view key_title, bool inbound) {
  std::vector<std::vector<std::string>> cells;
  // Outbound, REFUSED counts the sessions that failed the destination's DANE or MTA-STS policy (POLICY: the
  // last session's).
  cells.push_back({std::string(key_title), inbound ? "EHLO" : "MX HOST", "VERIFIED NAME", "MESSAGES", "NONE",
                   "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3", inbound ? "REFUSED" : "POLICY FAILED", "CIPHER",
                   "LAST SEEN", inbound ? "SENDER DOMAINS" : "DOMAINS", inbound ? "" : "POLICY", "+/-"});
  auto line = [&](const DrilldownRow& row) {
    std::vector<std::string> cells_of{row.key, row.name.empty() ? "-" : row.name,
                                      row.verified_name.empty() ? "-" : row.verified_name,
                                      format_thousands(row.total())};
    for (const auto count : row.messages) cells_of.push_back(format_thousands(count));
    cells_of.push_back(format_thousands(row.refused));
    cells_of.push_back(row.cipher.empty() ? "-" : row.cipher);
    cells_of.push_back(row.last_seen.empty() ? "-" : row.last_seen);
    cells_of.push_back(row.domains.empty() ? "-" : joined(row.domains, ","));
    cells_of.push_back(inbound ? "" : row.policy.empty() ? "-" : row.policy);
    cells_of.push_back(row.error == 0 ? "" : format_thousands(row.error));
    cells.push_back(std::move(cells_of));
  };
  for (const auto& row : table.rows) line(row);
  if (has_other(table)) line(table.other);
  std::string out = align_columns(cells, {false, false, false, true, true, true, true, true, true, true, false, false,
                                    false, false, true});
  if (table.error_bound != 0)
    out += fmt::format("(more servers than the table holds: one not listed sent at most {} messages; +/- is what "
                       "a listed one may have sent beyond its counts)\n",
                       format_thousands(table.error_bound));
  return out;
}

}  // namespace

std::uint64_t DrilldownRow::total() const {
  std::uint64_t sum = 0;
  for (const auto count : messages) sum += count;
  return sum;
}

std::uint64_t DrilldownRow::legacy() const {
  return messages[static_cast<std::size_t>(TlsVersion::none)] + messages[static_cast<std::size_t>(TlsVersion::tls10)] +
         messages[static_cast<std::size_t>(TlsVersion::tls11)] + refused;
}

void add_drilldown(Report& report, const RemoteStore& store, WindowStore::TimePoint now) {
  const auto today = std::chrono::floor<std::chrono::days>(now);
  const auto first = today - std::chrono::days(report.days - 1);
  const auto window_first =
      std::chrono::floor<std::chrono::days>(now - store.limits().window + std::chrono::hours(1));
  for (const ConnectorSummary& connector : report.connectors) {
    ConnectorDrilldown drilldown;
    drilldown.connector = connector.connector;
    drilldown.direction = connector.direction;
    const bool inbound = connector.direction == Direction::inbound;
    drilldown.remotes = table_of(
        store.merged(connector.connector, connector.direction, RemoteTable::remotes, first, today), store, inbound,
        now);
    drilldown.remotes.enabled = store.limits().remotes;
    if (!inbound) {
      drilldown.domains = table_of(
          store.merged(connector.connector, connector.direction, RemoteTable::domains, first, today), store, false,
          now);
    }
    report.drilldowns.push_back(std::move(drilldown));

    // Insights are over the whole window: so is their offender, over the UTC days the window touches.
    for (Insight& insight : report.insights) {
      if (insight.connector != connector.connector || insight.direction != connector.direction) continue;
      const auto version = insight_version(insight.insight);
      if (!version || !store.limits().remotes) continue;
      const DrilldownTable window = table_of(
          store.merged(connector.connector, connector.direction, RemoteTable::remotes, window_first, today), store,
          inbound, now);
      const auto v = static_cast<std::size_t>(*version);
      const DrilldownRow* top = nullptr;
      std::uint64_t all = window.other.messages[v];
      for (const auto& row : window.rows) {
        all += row.messages[v];
        if (row.messages[v] > 0 && (top == nullptr || row.messages[v] > top->messages[v])) top = &row;
      }
      if (top == nullptr) continue;
      const std::string what = *version == TlsVersion::none ? "messages without TLS"
                                                             : std::string(proto::to_string(*version)) + " messages";
      // The servers are kept per UTC day, the window per hour: these counts start at midnight of the window's
      // first day, up to 23 hours before the insight's own messages do, so the clause says since when.
      insight.text += fmt::format("; {} sent {} of the {} {} since {} 00:00 UTC", server_words(*top),
                                  format_thousands(top->messages[v]), format_thousands(all), what,
                                  rfc3339_utc(WindowStore::TimePoint(window_first)).substr(0, 10));
    }
  }
}

void append_drilldown_members(std::string& out, const Report& report, std::string_view connector,
                              Direction direction) {
  for (const ConnectorDrilldown& d : report.drilldowns) {
    if (d.connector != connector || d.direction != direction) continue;
    out += ",\n   \"remotes\": ";
    append_json_table(out, d.remotes, "address");
    if (d.direction == Direction::outbound) {
      out += ",\n   \"domains\": ";
      append_json_table(out, d.domains, "domain");
    }
    return;
  }
}

std::string render_remotes_csv(const Report& report, std::string_view connector) {
  std::string out =
      "connector,direction,address,name,verified_name,domains,messages,none,tls10,tls11,tls12,tls13,"
      "none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,refused,refused_version,cipher,first_seen,last_seen,error\n";
  for (const auto& d : report.drilldowns) {
    if (!connector.empty() && d.connector != connector) continue;
    auto line = [&](const DrilldownRow& row) {
      out += fmt::format("{},{},{},{},{},{},{}", csv_field(d.connector), config::to_string(d.direction),
                         csv_field(row.key), csv_field(row.name), csv_field(row.verified_name),
                         csv_field(joined(row.domains, " ")), row.total());
      for (const auto count : row.messages) out += fmt::format(",{}", count);
      for (const double percent : tls_percent(row.messages)) out += "," + percent_text(percent);
      out += fmt::format(",{},{},{},{},{},{}\n", row.refused, row.refused_version, csv_field(row.cipher),
                         row.first_seen, row.last_seen, row.error);
    };
    for (const auto& row : d.remotes.rows) line(row);
    if (has_other(d.remotes)) line(d.remotes.other);
  }
  return out;
}

std::string render_domains_csv(const Report& report) {
  std::string out =
      "connector,direction,domain,mx_host,messages,none,tls10,tls11,tls12,tls13,"
      "none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,first_seen,last_seen,error,policy,policy_failures\n";
  for (const auto& d : report.drilldowns) {
    if (d.direction != Direction::outbound) continue;
    auto line = [&](const DrilldownRow& row) {
      out += fmt::format("{},{},{},{},{}", csv_field(d.connector), config::to_string(d.direction),
                         csv_field(row.key), csv_field(row.name), row.total());
      for (const auto count : row.messages) out += fmt::format(",{}", count);
      for (const double percent : tls_percent(row.messages)) out += "," + percent_text(percent);
      out += fmt::format(",{},{},{},{},{}\n", row.first_seen, row.last_seen, row.error, csv_field(row.policy),
                         row.refused);
    };
    for (const auto& row : d.domains.rows) line(row);
    if (has_other(d.domains)) line(d.domains.other);
  }
  return out;
}

std::string render_remotes_table(const Report& report, std::string_view connector) {
  std::string out;
  for (const auto& d : report.drilldowns) {
    if (d.connector != connector) continue;
    const bool inbound = d.direction == Direction::inbound;
    out += fmt::format("{}Connector {} ({}): {} servers, last {} {} (UTC), legacy TLS first\n\n",
                       out.empty() ? "" : "\n", d.connector, config::to_string(d.direction),
                       inbound ? "sending" : "receiving", report.days, report.days == 1 ? "day" : "days");
    if (!d.remotes.enabled) {
      out += "The per-server drill-down is off (telemetry.remotes: false).\n";
    } else if (d.remotes.rows.empty() && !has_other(d.remotes)) {
      out += "No messages in these days.\n";
    } else {
      out += drilldown_table_text(d.remotes, "ADDRESS", inbound);
    }
    if (!inbound && !d.domains.rows.empty()) {
      out += "\nDestination domains:\n";
      out += drilldown_table_text(d.domains, "DOMAIN", false);
    }
  }
  return out;
}

std::string render_domains_table(const Report& report) {
  std::string out = fmt::format("Destination domains per outbound connector, last {} {} (UTC), legacy TLS first\n",
                                report.days, report.days == 1 ? "day" : "days");
  bool any = false;
  for (const auto& d : report.drilldowns) {
    if (d.direction != Direction::outbound) continue;
    any = true;
    out += fmt::format("\nConnector {}:\n", d.connector);
    if (d.domains.rows.empty() && !has_other(d.domains))
      out += "No messages in these days.\n";
    else
      out += drilldown_table_text(d.domains, "DOMAIN", false);
  }
  if (!any) out += "\nNo outbound connector.\n";
  return out;
}

void append_drilldown_html(std::string& out, const Report& report) {
  out += fmt::format(
      "<section id=\"drilldown\"><h2>Which servers to fix (last {} {})</h2>\n"
      "<p class=\"advice\">Per connector, the remote servers behind it (and, outbound, the destination domains), "
      "the ones without TLS or with TLS1.0/1.1 first. Click a connector to open it.</p>\n",
      report.days, report.days == 1 ? "day" : "days");
  for (const auto& d : report.drilldowns) {
    const bool inbound = d.direction == Direction::inbound;
    std::size_t legacy = 0;
    for (const auto& row : d.remotes.rows)
      if (row.legacy() != 0) ++legacy;
    out += fmt::format(
        "<details class=\"drilldown\" data-connector=\"{}\" data-direction=\"{}\"><summary><strong>{}</strong> "
        "{} &middot; {} servers, {} with legacy TLS or refused</summary>\n",
        html_escape(d.connector), config::to_string(d.direction), html_escape(d.connector),
        config::to_string(d.direction), d.remotes.rows.size(), legacy);
    auto table = [&](const DrilldownTable& t, std::string_view key_title) {
      if (!t.enabled) {
        out += "<p>The per-server drill-down is off (<code>telemetry.remotes: false</code>).</p>\n";
        return;
      }
      out += fmt::format("<table><thead><tr><th>{}</th><th>{}</th><th>Verified name</th><th class=\"num\">Messages"
                         "</th>",
                         key_title, inbound ? "EHLO" : "MX host");
      for (const auto v : proto::all_tls_versions) out += fmt::format("<th class=\"num\">{}</th>", proto::to_string(v));
      // Outbound: the sessions that failed the destination's DANE or MTA-STS policy, and the last one's policy.
      out += fmt::format("<th class=\"num\">{}</th><th>Cipher</th><th>Last seen</th><th>Domains</th>{}</tr></thead>"
                         "<tbody>\n",
                         inbound ? "Refused" : "Policy failed", inbound ? "" : "<th>Policy</th>");
      auto line = [&](const DrilldownRow& row) {
        out += fmt::format("<tr{}><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>",
                           row.legacy() != 0 ? " class=\"fix\"" : "", html_escape(row.key), html_escape(row.name),
                           html_escape(row.verified_name), format_thousands(row.total()));
        for (std::size_t v = 0; v < kVersions; ++v) {
          const bool bad = row.messages[v] != 0 && v <= static_cast<std::size_t>(TlsVersion::tls11);
          out += fmt::format("<td class=\"num{}\">{}</td>", bad ? (v == 0 ? " bad" : " warn") : "",
                             format_thousands(row.messages[v]));
        }
        out += fmt::format("<td class=\"num{}\">{}</td><td>{}</td><td>{}</td><td>{}</td>",
                           row.refused != 0 ? " bad" : "", format_thousands(row.refused), html_escape(row.cipher),
                           html_escape(row.last_seen), html_escape(joined(row.domains, ", ")));
        if (!inbound) out += fmt::format("<td>{}</td>", html_escape(row.policy));
        out += "</tr>\n";
      };
      for (const auto& row : t.rows) line(row);
      if (has_other(t)) line(t.other);
      // Key, name, verified name, messages, the versions, refused, cipher, last seen, domains (and the policy).
      const std::size_t columns = 4 + kVersions + 4 + (inbound ? 0 : 1);
      if (t.rows.empty())
        out += fmt::format("<tr class=\"zero\"><td colspan=\"{}\">no messages in these days</td></tr>\n",
                           columns);
      out += "</tbody></table>\n";
      if (t.error_bound != 0)
        out += fmt::format("<p class=\"pct\">More than the table holds: one not listed sent at most {} messages.</p>\n",
                           format_thousands(t.error_bound));
    };
    table(d.remotes, "Address");
    if (!inbound) {
      out += "<h3>Destination domains</h3>\n";
      table(d.domains, "Domain");
    }
    out += "</details>\n";
  }
  out += "</section>\n";
}

}  // namespace mailflow
