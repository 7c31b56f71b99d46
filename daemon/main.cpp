// mailflowd: command line entry point. Everything else lives in the mailflow_relay library.
#include <malloc.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "daemon/certificate_check.hpp"
#include "daemon/cli_http.hpp"
#include "daemon/log.hpp"
#include "daemon/mta_sts_cli.hpp"
#include "daemon/report_cli.hpp"
#include "daemon/route_cli.hpp"
#include "daemon/server.hpp"
#include "daemon/signal_thread.hpp"
#include "daemon/tlsrpt_cli.hpp"

namespace {

constexpr const char* default_config = "/etc/mailflowd/mailflowd.yaml";

void usage(std::FILE* out) {
  std::fprintf(
      out,
      "usage: mailflowd [-c|--config FILE]       run the relay (default %s)\n"
      "       mailflowd --check-config FILE      validate a configuration and exit\n"
      "       mailflowd report [-c|--config FILE] [--url URL] [--days N] [--format table|json|csv] ...\n"
      "       mailflowd route -c|--config FILE --recipient ADDRESS [--listener NAME] [--sender ADDRESS] "
      "[--client IP] [--format text|json] [--seed N]\n"
      "       mailflowd mta-sts -c|--config FILE --domain DOMAIN [--connect HOST:PORT] [--fetch-only] "
      "[--state]\n"
      "       mailflowd tlsrpt [-c|--config FILE] [--url URL] [--date YYYY-MM-DD] [--domain DOMAIN] "
      "[--format json|gzip] ...\n"
      "       mailflowd -V|--version\n"
      "       mailflowd [report|route|mta-sts|tlsrpt] -h|--help   this text, or the subcommand's\n",
      default_config);
}

int check_config(const std::string& path) {
  auto result = mailflow::config::load_config_file(path);
  std::vector<mailflow::config::ConfigError> findings = std::move(result.errors);
  std::size_t errors = findings.size();
  findings.insert(findings.end(), result.warnings.begin(), result.warnings.end());
  if (result.config) {
    // The certificates and keys as the daemon will load them: a valid-looking file that start or reload
    // would refuse must fail here, where systemd's ExecReload can still say so.
    auto certificates = mailflow::check_certificates(*result.config, std::chrono::system_clock::now());
    errors += certificates.errors.size();
    for (auto* list : {&certificates.errors, &certificates.warnings})
      findings.insert(findings.end(), list->begin(), list->end());
  }
  std::stable_sort(findings.begin(), findings.end(), [](const auto& a, const auto& b) {
    return std::pair(a.line, a.column) < std::pair(b.line, b.column);
  });
  // Shown as the commands show what they echo: a file name or a value with control bytes stays text.
  for (const auto& finding : findings)
    std::fprintf(stderr, "%s\n", mailflow::cli::shown(finding.to_string()).c_str());
  const std::size_t warnings = findings.size() - errors;
  if (errors > 0) {
    std::fprintf(stderr, "%s: %zu error(s)", mailflow::cli::shown(path).c_str(), errors);
    if (warnings > 0) std::fprintf(stderr, ", %zu warning(s)", warnings);
    std::fprintf(stderr, "\n");
    return 1;
  }
  std::printf("%s", mailflow::config::summarize(*result.config).c_str());
  if (warnings > 0)
    std::fprintf(stderr, "%s: %zu warning(s)\n", mailflow::cli::shown(path).c_str(), warnings);
  return 0;
}

int run_daemon(const std::string& path) {
  // First: SIGHUP, SIGTERM, SIGINT and SIGQUIT are blocked in every thread from here on (each inherits the
  // mask) and taken by a thread of their own as they come (signal_thread.hpp). Their default action killed a
  // daemon that was still starting, and one that came while it exited, after its state was saved. A stop
  // signal before the server runs ends the start-up (exit 0), whatever it waits for: reading a configuration
  // file that is a FIFO, a state_dir on a hung mount.
  // The log's sink and line format before that thread may log (startup_stopped): the first call replaces
  // spdlog's default logger, which is not safe while another thread logs through it; the call with the
  // configuration's settings below changes them in place, as a reload does.
  mailflow::setup_logging({});
  std::optional<mailflow::SignalThread> signals;
  try {
    signals.emplace();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mailflowd: %s\n", e.what());
    return 1;
  }
  // Standard error may be a pipe (`mailflowd 2>&1 | logger`, a container's log pipe): once its reader was
  // gone, the next log line raised SIGPIPE, whose default action ended the daemon, without its drain or the
  // windows saved. Ignored, as Postfix's master and nginx ignore it (systemd does so for its services,
  // IgnoreSIGPIPE=yes): the write fails with EPIPE instead. Asio writes to sockets with MSG_NOSIGNAL already.
  signal(SIGPIPE, SIG_IGN);
  // A file size limit (`ulimit -f`, LimitFSIZE= in a unit) that a state save or a log file goes over raised
  // SIGXFSZ, whose default action ended the daemon in the middle of that write (a core, no drain, nothing
  // saved). Ignored, as Postfix ignores it where it sets a file size limit (util/file_limit.c): the write
  // fails with EFBIG instead, and the save is logged and counted as failed (state_save_failed).
  signal(SIGXFSZ, SIG_IGN);
  auto result = mailflow::config::load_config_file(path);
  if (!result.errors.empty()) {
    for (const auto& error : result.errors)
      std::fprintf(stderr, "%s\n", mailflow::cli::shown(error.to_string()).c_str());
    return 1;
  }
  mailflow::setup_logging(result.config->log);
  for (const auto& warning : result.warnings)
    mailflow::log_event(mailflow::LogLevel::warn, "config_warning", {{"warning", warning.to_string()}});
  // Sessions take and give back their DATA buffers (64 KiB) all the time. With glibc's default (128 KiB)
  // every burst of frees shrank the heap with brk() and the next messages page-faulted it back in: 64,000
  // page faults in a 3 s bench run, 6 % of the relay's CPU. Keep up to 16 MiB of free heap instead.
  mallopt(M_TRIM_THRESHOLD, 16 * 1024 * 1024);
  try {
    mailflow::Server server(path, result.config, *signals);
    return server.run();
  } catch (const std::exception& e) {
    mailflow::log_event(mailflow::LogLevel::error, "startup_failed", {{"error", e.what()}});
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path = default_config;
  if (argc >= 2 && std::string_view(argv[1]) == "report") return mailflow::run_report_cli(argc, argv);
  if (argc >= 2 && std::string_view(argv[1]) == "route") return mailflow::run_route_cli(argc, argv);
  if (argc >= 2 && std::string_view(argv[1]) == "mta-sts") return mailflow::run_mta_sts_cli(argc, argv);
  if (argc >= 2 && std::string_view(argv[1]) == "tlsrpt") return mailflow::run_tlsrpt_cli(argc, argv);
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--version" || arg == "-V") {
      std::printf("mailflowd %s (%s)\n", MAILFLOW_VERSION, MAILFLOW_BUILD_TYPE);
      return 0;
    }
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    }
    // "--config FILE" or "--config=FILE", as every subcommand takes its options.
    mailflow::cli::ValuedOption option;
    std::string option_error;
    if (mailflow::cli::parse_valued_option(argc, argv, i, {"--check-config", "--config", "-c"}, option,
                                           option_error)) {
      // An empty file name is no file name: refused as a missing one is, not read as a file named "".
      if (option.value.empty()) {
        std::fprintf(stderr, "mailflowd: %s needs a value\n", std::string(option.name).c_str());
        return 2;
      }
      if (option.name != "--check-config") {
        config_path = std::string(option.value);
        continue;
      }
      if (i + 1 < argc) {  // a second file would go unchecked, and the user believe it checked
        std::fprintf(stderr, "mailflowd: unexpected argument '%s' after --check-config FILE\n",
                     mailflow::cli::shown(argv[i + 1]).c_str());
        usage(stderr);
        return 2;
      }
      return check_config(std::string(option.value));
    }
    if (!option_error.empty()) {
      std::fprintf(stderr, "mailflowd: %s\n", mailflow::cli::shown(option_error).c_str());
      return 2;
    }
    std::fprintf(stderr, "mailflowd: unknown argument '%s'\n", mailflow::cli::shown(argv[i]).c_str());
    usage(stderr);
    return 2;
  }
  return run_daemon(config_path);
}
