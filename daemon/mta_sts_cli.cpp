#include "daemon/mta_sts_cli.hpp"

#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "daemon/cli_http.hpp"
#include "daemon/mta_sts.hpp"
#include "daemon/resolver.hpp"
#include "daemon/state_file.hpp"
#include "proto/command.hpp"
#include "proto/json.hpp"
#include "proto/tlsrpt.hpp"

namespace mailflow {
namespace {

namespace net = boost::asio;

constexpr std::string_view kUsage =
    "usage: mailflowd mta-sts -c|--config FILE --domain DOMAIN [--connect HOST:PORT] [--fetch-only]\n"
    "                         [--state]\n"
    "  --domain      the recipient domain whose MTA-STS policy to look up\n"
    "  --connect     connect to HOST:PORT instead of mta-sts.DOMAIN:443 (the certificate must still\n"
    "                be valid for mta-sts.DOMAIN)\n"
    "  --fetch-only  fetch the policy without looking up the _mta-sts TXT record\n"
    "  --state       use and update the cache file state_dir/mta-sts.state; refused while the daemon runs\n"
    "                on that state_dir (it keeps its cache in memory and saves it over the file)\n"
    "exit: 0 policy or none, 1 configuration error or state_dir in use, 2 usage, 3 fetch or policy failure\n"
    "      (as TLS-RPT reports it), 4 temporary failure of the _mta-sts TXT lookup (the relay goes on as\n"
    "      without a record: with a cached policy, else none), or a fetch that failed for a reason of this\n"
    "      host's own (mta_sts.ca_file unreadable, no descriptor left: \"local_error\"; the relay reports\n"
    "      nothing): either way the mode shown is not what the domain publishes\n";

std::string quote(std::string_view text) { return "\"" + proto::json_escape(text) + "\""; }

std::string policy_json(const std::optional<proto::mta_sts::Policy>& policy) {
  if (!policy) return "null";
  std::string out = "{\"mode\": " + quote(to_string(policy->mode)) + ", \"max_age\": " +
                    std::to_string(policy->max_age) + ", \"mx\": [";
  for (std::size_t i = 0; i < policy->mx.size(); ++i) out += (i ? ", " : "") + quote(policy->mx[i]);
  return out + "]}";
}

std::int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int run_mta_sts_cli(int argc, char** argv) { return run_mta_sts_cli(argc, argv, std::cout, std::cerr); }

int run_mta_sts_cli(int argc, char** argv, std::ostream& out, std::ostream& err) {
  std::optional<std::string> config_path;
  std::string domain;
  std::string connect;
  bool fetch_only = false;
  bool use_state = false;
  int i = 1;
  if (i < argc && std::string_view(argv[i]) == "mta-sts") ++i;
  const auto usage_error = [&](const std::string& message) {
    err << "mailflowd mta-sts: " << cli::shown(message) << "\n" << kUsage;
    return 2;
  };
  for (; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      out << kUsage;
      return 0;
    }
    if (arg == "--fetch-only") {
      fetch_only = true;
    } else if (arg == "--state") {
      use_state = true;
    } else {
      cli::ValuedOption option;
      std::string error;
      if (!cli::parse_valued_option(argc, argv, i, {"--config", "-c", "--domain", "--connect"}, option,
                                    error))
        return usage_error(error.empty() ? "unknown argument \"" + std::string(arg) + "\"" : error);
      const std::string value(option.value);
      if ((option.name == "--config" || option.name == "-c") && value.empty())
        return usage_error(std::string(option.name) + " needs a value");  // not a file named ""
      if (option.name == "--config" || option.name == "-c")
        config_path = value;
      else if (option.name == "--domain") domain = value;
      else connect = value;
    }
  }
  if (!config_path) return usage_error("--config FILE is required (dns: and mta_sts: settings)");
  if (domain.empty()) return usage_error("--domain DOMAIN is required");
  // The domain as the relay takes it from an RCPT address: lower-cased, without a trailing dot. One the relay
  // refuses in RCPT, or an address literal (never routed through MX delivery), never gets a policy looked up.
  if (domain.starts_with('[')) return usage_error("an address literal has no MTA-STS policy: " + domain);
  if (const auto parsed = proto::parse_command("RCPT TO:<postmaster@" + domain + ">");
      parsed.error != proto::CommandError::none) {
    return usage_error("not a domain the relay accepts in RCPT TO: " + domain + " (" + parsed.message + ")");
  }
  domain = proto::address_domain("postmaster@" + domain);
  const auto loaded = config::load_config_file(*config_path);
  if (!loaded.errors.empty()) {
    for (const auto& e : loaded.errors) err << cli::shown(e.to_string()) << "\n";
    err << "mailflowd mta-sts: cannot use --config " << cli::shown(*config_path) << "\n";
    return 1;
  }
  const config::Config& config = *loaded.config;
  MtaStsSettings settings;
  settings.ca_file = config.mta_sts.ca_file;
  settings.fetch_timeout = config.mta_sts.fetch_timeout;
  settings.max_policies = config.mta_sts.max_policies;
  settings.connect_to = connect;

  net::io_context io;
  std::exception_ptr failure;
  std::string json;
  std::string txt_failed;  // why the exit is 4
  int code = 0;
  const auto started = std::chrono::steady_clock::now();
  const auto elapsed_ms = [&] {
    return std::to_string(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count());
  };
  try {
    if (fetch_only) {
      net::co_spawn(io, fetch_policy(io.get_executor(), domain, settings),
                    [&](std::exception_ptr e, PolicyFetch fetched) {
                      failure = e;
                      json = "{\"domain\": " + quote(domain) + ", \"fetch\": " + quote(to_string(fetched.status)) +
                             ", \"policy\": " + policy_json(fetched.policy) + ", \"detail\": " +
                             quote(fetched.detail) + ", \"elapsed_ms\": " + elapsed_ms() + "}\n";
                      // local_error: this host's own failure (its CA file, no socket), no answer of the
                      // domain's.
                      code = fetched.status == PolicyFetch::Status::ok            ? 0
                             : fetched.status == PolicyFetch::Status::local_error ? 4
                                                                                  : 3;
                    });
      io.run();
    } else {
      MtaStsCache cache(settings.max_policies);
      std::string error;
      std::optional<StateDirLock> lock;
      if (use_state) {
        try {
          lock.emplace(config.state_dir);
        } catch (const StateDirLock::InUse& e) {
          err << "mailflowd mta-sts: --state: " << e.what()
              << "\nmailflowd mta-sts: the daemon is running on this state_dir: its MTA-STS cache lives in "
                 "its memory and its next save would overwrite this update; run without --state\n";
          return 1;
        }
      }
      if (use_state && !cache.load(config.state_dir, unix_now(), error)) {
        err << "mailflowd mta-sts: " << error << "\n";
        return 1;
      }
      if (!error.empty()) err << "mailflowd mta-sts: " << error << "\n";
      Resolver resolver(io.get_executor(), resolver_settings(config.dns), nullptr);
      net::co_spawn(io, lookup_policy(resolver, cache, domain, settings, unix_now()),
                    [&](std::exception_ptr e, PolicyState state) {
                      failure = e;
                      json = "{\"domain\": " + quote(domain) + ", \"mode\": " + quote(to_string(state.mode)) +
                             ", \"id\": " + quote(state.id) +
                             ", \"from_cache\": " + (state.from_cache ? "true" : "false") +
                             ", \"policy\": " + policy_json(state.policy) + ", \"failure\": " +
                             (state.failure ? quote(proto::tlsrpt::to_string(*state.failure)) : "null") +
                             ", \"detail\": " + quote(state.detail) +
                             ", \"txt\": " + quote(to_string(state.txt)) +
                             ", \"elapsed_ms\": " + elapsed_ms() + "}\n";
                      code = state.failure ? 3 : 0;
                      // The fetch or the TXT lookup failed for a reason of this host's own (its CA file, no
                      // socket): the relay reports nothing and does not deliver without a policy; the mode
                      // shown is no answer.
                      if (code == 0 && state.local_failure) {
                        txt_failed = "the policy could not be had for a reason of this host's (" +
                                     state.detail + "): the mode shown is not what the domain publishes";
                        code = 4;
                      }
                      // The relay takes a failed TXT lookup as no record and reports nothing; whoever asks
                      // here must see that the answer is the fallback, not the domain's (as `route` exits 4).
                      if (code == 0 && is_temporary(state.txt)) {
                        txt_failed = "the _mta-sts." + domain + " TXT lookup failed (" +
                                     std::string(to_string(state.txt)) +
                                     (state.txt_detail.empty() ? "" : ": " + state.txt_detail) +
                                     "): the mode shown is the relay's fallback (" +
                                     (state.policy ? "the policy cached under id " + state.id
                                                   : std::string("no policy")) +
                                     "), not what the domain publishes";
                        code = 4;
                      }
                    });
      io.run();
      if (use_state) {
        // state_dir deleted while the lookup ran (an operator's rm -rf, a clean-up job): the lock is held on
        // a file nobody else can open, so a daemon started since holds the new state_dir's, and this write
        // would go into its files (one NAME.tmp for both; its next save overwrites this one). As the daemon's
        // own saves do (StateWriter): the lock taken again first, or nothing written.
        std::string lock_error;
        const auto kept = lock->keep(lock_error);
        if (kept == StateDirLock::Kept::lost) {
          err << "mailflowd mta-sts: --state: state_dir " << cli::shown(config.state_dir)
              << " was deleted while this command ran, and cannot be taken again: " << cli::shown(lock_error)
              << "\nmailflowd mta-sts: the cache is not written; run it again\n";
          return 1;
        }
        if (kept == StateDirLock::Kept::taken_again)
          err << "mailflowd mta-sts: --state: state_dir " << cli::shown(config.state_dir)
              << " was deleted while this command ran: made again, with this lookup's cache in it\n";
      }
      const StateFile file = cache.state_file();
      if (use_state && !write_state_file(config.state_dir, file.name, file.text, error)) {
        err << "mailflowd mta-sts: " << error << "\n";
        return 1;
      }
    }
  } catch (const std::exception& e) {
    err << "mailflowd mta-sts: " << e.what() << "\n";
    return 1;
  }
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      err << "mailflowd mta-sts: " << e.what() << "\n";
      return 1;
    }
  }
  out << json;
  if (!txt_failed.empty()) err << "mailflowd mta-sts: " << txt_failed << "\n";
  return code;
}

}  // namespace mailflow
