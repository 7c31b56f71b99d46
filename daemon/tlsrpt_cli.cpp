#include "daemon/tlsrpt_cli.hpp"

#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>

#include "daemon/cli_http.hpp"
#include "daemon/state_text.hpp"

namespace mailflow {
namespace {

constexpr std::string_view kUsage =
    "usage: mailflowd tlsrpt [-c|--config FILE] [--url http://127.0.0.1:9725] [--date YYYY-MM-DD]\n"
    "                        [--domain DOMAIN] [--format json|gzip] [--user USER] [--password-file FILE]\n"
    "                        [--ca-file FILE] [-k|--insecure]\n"
    "  --date           the UTC day (default: today, still being counted; reports are sent for finished\n"
    "                   days)\n"
    "  --domain         one recipient (policy) domain's report; without it, every domain of the day with\n"
    "                   its rua addresses\n"
    "  --format         json (default) or gzip: the report exactly as it is sent (application/tlsrpt+gzip),\n"
    "                   needs --domain; write it to a file, not a terminal\n";

bool valid_domain(std::string_view domain) {
  return !domain.empty() && domain.size() <= 253 && std::all_of(domain.begin(), domain.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
           c == '_';
  });
}

}  // namespace

int run_tlsrpt_cli(int argc, char** argv) { return run_tlsrpt_cli(argc, argv, std::cout, std::cerr); }

int run_tlsrpt_cli(int argc, char** argv, std::ostream& out, std::ostream& err, std::chrono::milliseconds timeout) {
  cli::DaemonOptions daemon_options;
  std::optional<std::string> date;
  std::optional<std::string> domain;
  std::string format = "json";

  int i = 1;
  if (i < argc && std::string_view(argv[i]) == "tlsrpt") ++i;
  const auto usage_error = [&](const std::string& message) {
    err << "mailflowd tlsrpt: " << cli::shown(message) << "\n" << kUsage << cli::daemon_options_usage;
    return 2;
  };
  for (; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      out << kUsage << cli::daemon_options_usage;
      return 0;
    }
    std::string option_error;
    if (cli::parse_daemon_option(argc, argv, i, daemon_options, option_error)) continue;
    if (!option_error.empty()) return usage_error(option_error);
    cli::ValuedOption option;
    if (!cli::parse_valued_option(argc, argv, i, {"--date", "--domain", "--format"}, option, option_error))
      return usage_error(option_error.empty() ? "unknown argument \"" + std::string(arg) + "\"" : option_error);
    const std::string_view name = option.name;
    const std::string_view value = option.value;
    if (name == "--date") {
      if (!state_text::valid_date(value))
        return usage_error("--date must be YYYY-MM-DD, not \"" + std::string(value) + "\"");
      date = std::string(value);
    } else if (name == "--domain") {
      if (!valid_domain(value)) return usage_error("--domain must be a domain name, not \"" + std::string(value) + "\"");
      domain = std::string(value);
    } else if (name == "--format") {
      if (value != "json" && value != "gzip")
        return usage_error("--format must be json or gzip, not \"" + std::string(value) + "\"");
      format = std::string(value);
    }
  }
  if (format == "gzip" && !domain) return usage_error("--format gzip needs --domain (one report is one file)");
  if (format == "gzip" && &out == &std::cout && isatty(STDOUT_FILENO))
    return usage_error("--format gzip writes binary data: redirect it to a file");

  cli::Daemon daemon;
  std::string usage;
  if (const int code = cli::resolve_daemon(daemon_options, "mailflowd tlsrpt", err, daemon, usage); code != 0)
    return code == 2 ? usage_error(usage) : code;

  std::string target = daemon.url.base_path + "/api/v1/tlsrpt";
  std::string query;
  if (date) query += "date=" + *date;
  if (domain) query += (query.empty() ? "" : "&") + ("domain=" + *domain + "&format=" + format);
  if (!query.empty()) target += "?" + query;

  const cli::Fetch result = cli::fetch(daemon.url, target, daemon_options.tls, timeout);
  if (!result.error.empty() || result.status != 200)
    return cli::print_failure(result, daemon, daemon_options, target, "mailflowd tlsrpt", err);
  out << result.body;
  if (format == "json" && !result.body.empty() && result.body.back() != '\n') out << '\n';
  out.flush();
  return 0;
}

}  // namespace mailflow
