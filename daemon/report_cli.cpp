#include "daemon/report_cli.hpp"

#include <cctype>
#include <charconv>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "daemon/cli_http.hpp"

namespace mailflow {
namespace {

constexpr std::string_view kUsage =
    "usage: mailflowd report [-c|--config FILE] [--url http://127.0.0.1:9725] [--days N] [--format "
    "table|json|csv]\n"
    "                        [--summary | --connector NAME | --domains]\n"
    "                        [--user USER] [--password-file FILE] [--ca-file FILE] [-k|--insecure]\n"
    "  --days           UTC days to show, today included (default 7, at most the telemetry window)\n"
    "  --format         table (default), json or csv\n"
    "  --connector      the drill-down of one connector: its remote servers (and, outbound, destination\n"
    "                   domains) with messages per TLS version, legacy TLS first. --format csv: its\n"
    "                   servers (/api/v1/remotes.csv?connector=NAME); json: the report of that connector\n"
    "                   alone (/api/v1/report?connector=NAME)\n"
    "  --domains        the destination domains of every outbound connector (csv: /api/v1/domains.csv)\n"
    "  --summary        only the whole-window summary per connector (messages per TLS version), not the "
    "days\n"
    "                   (the whole telemetry window: not with --days)\n";

}  // namespace

int run_report_cli(int argc, char** argv) { return run_report_cli(argc, argv, std::cout, std::cerr); }

int run_report_cli(int argc, char** argv, std::ostream& out, std::ostream& err,
                   std::chrono::milliseconds timeout) {
  cli::DaemonOptions daemon_options;
  std::optional<int> days;
  std::string format = "table";
  std::optional<std::string> connector;  // --connector NAME: that connector's drill-down
  bool domains = false;                  // --domains: the destination domains
  bool summary = false;                  // --summary: the whole-window summary per connector

  int i = 1;
  if (i < argc && std::string_view(argv[i]) == "report") ++i;
  const auto usage_error = [&](const std::string& message) {
    err << "mailflowd report: " << cli::shown(message) << "\n" << kUsage << cli::daemon_options_usage;
    return 2;
  };
  for (; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      out << kUsage << cli::daemon_options_usage;
      return 0;
    }
    std::string option_error;
    if (cli::parse_daemon_option(argc, argv, i, daemon_options, option_error)) continue;
    if (!option_error.empty()) return usage_error(option_error);
    if (arg == "--domains") {
      domains = true;
      continue;
    }
    if (arg == "--summary") {
      summary = true;
      continue;
    }
    cli::ValuedOption option;
    if (!cli::parse_valued_option(argc, argv, i, {"--days", "--format", "--connector"}, option, option_error))
      return usage_error(option_error.empty() ? "unknown argument \"" + std::string(arg) + "\"" : option_error);
    const std::string_view name = option.name;
    const std::string_view value = option.value;
    if (name == "--connector") {
      if (value.empty()) return usage_error("--connector needs a connector name");
      if (!config::valid_name(value))
        return usage_error("--connector \"" + std::string(value) +
                           "\" is no connector name (names are 1-64 of a-z, 0-9, _ and -)");
      connector = std::string(value);
    } else if (name == "--days") {
      int n = 0;
      const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      if (ec != std::errc() || ptr != value.data() + value.size() || n < 1)
        return usage_error("--days must be a positive whole number, not \"" + std::string(value) + "\"");
      days = n;
    } else if (name == "--format") {
      if (value != "table" && value != "json" && value != "csv")
        return usage_error("--format must be table, json or csv, not \"" + std::string(value) + "\"");
      format = std::string(value);
    }
  }

  cli::Daemon daemon;
  std::string usage;
  if (const int code = cli::resolve_daemon(daemon_options, "mailflowd report", err, daemon, usage); code != 0)
    return code == 2 ? usage_error(usage) : code;
  const cli::Url* url = &daemon.url;

  if (int{summary} + int{connector.has_value()} + int{domains} > 1)
    return usage_error("--summary, --connector and --domains exclude each other");
  if (summary && days)
    return usage_error("--summary covers the whole telemetry window: --days does not apply to it");
  std::string target = url->base_path + (summary ? "/api/v1/connectors" : "/api/v1/report");
  if (format == "csv") target += ".csv";
  if (format == "table") target += ".txt";
  // The drill-down: its own CSV and text forms; JSON carries it in the report itself (?connector=NAME: that
  // connector's alone).
  if ((connector || domains) && format != "json") {
    target = url->base_path + (domains ? "/api/v1/domains" : "/api/v1/remotes") + (format == "csv" ? ".csv" : ".txt");
  }
  std::string query;
  if (days) query += "days=" + std::to_string(*days);
  if (connector) query += (query.empty() ? "" : "&") + ("connector=" + *connector);
  if (!query.empty()) target += "?" + query;

  const cli::Fetch result = cli::fetch(*url, target, daemon_options.tls, timeout);
  if (!result.error.empty() || result.status != 200)
    return cli::print_failure(result, daemon, daemon_options, target, "mailflowd report", err);
  // A 200 in another media type is not the report: a proxy's login page, another service on that port. Printed
  // with exit 0 it would go into a script's pipe as if it were the report.
  const std::string_view expected = format == "json" ? "application/json" : format == "csv" ? "text/csv" : "text/plain";
  std::string media = result.content_type.substr(0, result.content_type.find(';'));
  while (!media.empty() && media.back() == ' ') media.pop_back();
  for (char& c : media) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (media != expected) {
    err << "mailflowd report: GET " << target << " answered 200 with Content-Type "
        << (result.content_type.empty() ? "(none)" : cli::shown(result.content_type)) << ", not the report ("
        << expected << "): is "
        << (daemon_options.config_path && !daemon_options.url ? "--config's http.address" : "--url")
        << " mailflowd's http.address?\n";
    return 1;
  }
  // Which daemon this is, for a human: the table only (json and csv stay machine-readable as they come).
  if (format == "table") {
    std::string version = "version unknown";
    if (result.server.starts_with("mailflowd/")) version = "version " + result.server.substr(10);
    const std::string shown = (url->https ? "https://" : "http://") + cli::authority(*url) + url->base_path;
    out << "mailflowd at " << shown << " (" << version << ")\n";
  }
  out << result.body;
  if (!result.body.empty() && result.body.back() != '\n') out << '\n';
  out.flush();
  return 0;
}

}  // namespace mailflow
