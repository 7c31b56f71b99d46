#include "daemon/certificate_check.hpp"

#include <ctime>
#include <exception>
#include <filesystem>
#include <utility>

#include "daemon/http_server.hpp"
#include "daemon/resolver.hpp"
#include "daemon/runtime.hpp"
#include "daemon/tls.hpp"

namespace mailflow {
namespace {

config::ConfigError finding(const config::Config& config, const std::string& path, std::string message,
                            bool warning) {
  config::ConfigError out;
  out.file = config.source_path;
  if (const auto it = config.positions.find(path); it != config.positions.end()) {
    out.line = it->second.first;
    out.column = it->second.second;
  }
  out.message = std::move(message);
  out.warning = warning;
  return out;
}

std::string utc_date(std::int64_t unix_seconds) {
  const std::time_t time = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  gmtime_r(&time, &tm);
  char buffer[32];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buffer;
}

// A loaded certificate's notAfter, and the warning when it expired or expires soon; `path`: its pair's key in
// the configuration ("listeners[0].tls.certificates[1]", "http.tls").
void add_expiry(const config::Config& config, const std::string& listener, const std::string& path,
                const CertificateInfo& info, std::chrono::system_clock::time_point now,
                CertificateFindings& out) {
  out.expiries.push_back({listener, info.cert_path, info.not_after});
  const auto now_seconds = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  const std::string subject = info.subject.empty() ? "" : " (CN " + info.subject + ")";
  if (info.not_after <= now_seconds) {
    out.warnings.push_back(finding(
        config, path + ".cert",
        path + ".cert: certificate " + info.cert_path + subject + " expired on " + utc_date(info.not_after),
        true));
  } else if (info.not_after - now_seconds <
             std::chrono::duration_cast<std::chrono::seconds>(certificate_warning_period).count()) {
    const auto days = (info.not_after - now_seconds) / 86400;
    out.warnings.push_back(finding(config, path + ".cert",
                                   path + ".cert: certificate " + info.cert_path + subject + " expires on " +
                                       utc_date(info.not_after) + " (in " + std::to_string(days) +
                                       (days == 1 ? " day)" : " days)"),
                                   true));
  }
}

std::string pair_path(std::size_t listener, std::size_t certificate) {
  return "listeners[" + std::to_string(listener) + "].tls.certificates[" + std::to_string(certificate) + "]";
}

void check_pair(const config::Config& config, const std::string& listener, const std::string& path,
                const config::CertificatePair& pair, const config::ListenerTls& settings,
                std::chrono::system_clock::time_point now, CertificateFindings& out) {
  config::ListenerTls one = settings;
  one.certificates = {pair};
  try {
    const ServerTls tls(one, listener);  // exactly what the daemon builds at start and on reload
    for (const auto& info : tls.certificates()) add_expiry(config, listener, path, info, now, out);
  } catch (const std::exception& e) {
    out.errors.push_back(finding(config, path + ".cert", path + ": " + e.what(), false));
  }
}

}  // namespace

CertificateFindings check_certificates(const config::Config& config, std::chrono::system_clock::time_point now) {
  CertificateFindings out;
  for (std::size_t l = 0; l < config.listeners.size(); ++l) {
    const auto& listener = config.listeners[l];
    if (!listener.tls) continue;
    const std::string tls_path = "listeners[" + std::to_string(l) + "].tls";
    config::ListenerTls settings = *listener.tls;
    // A cipher list OpenSSL refuses is the listener's one error, said at its line; its pairs are still
    // checked (with the default list) for problems of their own.
    if (const std::string problem = cipher_list_problem(settings.ciphers); !problem.empty()) {
      out.errors.push_back(finding(config, tls_path + ".ciphers", tls_path + ".ciphers: " + problem, false));
      settings.ciphers = config::ListenerTls{}.ciphers;
    }
    for (std::size_t c = 0; c < settings.certificates.size(); ++c)
      check_pair(config, listener.name, pair_path(l, c), settings.certificates[c], settings, now, out);
  }
  bool webpki_reported = false;  // one trust store for every upstream with mta_sts on: its error once
  const TrustStores stores(config.mta_sts.ca_file);  // each file loaded once, as Runtime::build loads them
  for (std::size_t u = 0; u < config.upstreams.size(); ++u) {
    const auto& upstream = config.upstreams[u];
    if (upstream.tls == config::UpstreamTls::none) continue;
    const std::string path = "upstreams[" + std::to_string(u) + "]";
    try {
      // As the daemon builds it (Runtime::build): ca_file for tls: verify, else the Web PKI store with
      // mta_sts on.
      const ClientTls tls(upstream, stores);
    } catch (const std::exception& e) {
      if (upstream.tls != config::UpstreamTls::verify && upstream.mta_sts != config::MtaStsMode::off) {
        if (!std::exchange(webpki_reported, true))
          out.errors.push_back(
              finding(config, "mta_sts.ca_file", std::string("mta_sts.ca_file: ") + e.what(), false));
      } else {
        out.errors.push_back(finding(config, path + ".ca_file", path + ": " + e.what(), false));
      }
    }
  }
  const OwnListeners own(config);
  for (auto& loop : upstream_loops(config, own)) out.errors.push_back(std::move(loop));
  if (!own.interfaces_error().empty()) {
    // At the first wildcard listener: the addresses are what it stands for.
    std::string at = "listeners";
    for (std::size_t i = 0; i < config.listeners.size(); ++i) {
      boost::system::error_code ec;
      if (boost::asio::ip::make_address(config.listeners[i].address.host, ec).is_unspecified() && !ec) {
        at = "listeners[" + std::to_string(i) + "].address";
        break;
      }
    }
    out.warnings.push_back(finding(config, at,
                                   "this host's interface addresses could not be read (" +
                                       own.interfaces_error() + "): " + interfaces_unread_effect,
                                   true));
  }
  for (const auto& [key, problem] : https_ca_file_problems(config)) {
    if (key == "mta_sts.ca_file" && webpki_reported) continue;  // said above, as the handshakes load it
    out.errors.push_back(finding(config, key, key + ": " + problem, false));
  }
  // state_dir is made at start where it is missing: the nearest part of its path that exists must be a
  // directory. (Whether the daemon's user may write there is not known here: --check-config may run as root.)
  {
    std::error_code ec;
    std::filesystem::path existing = std::filesystem::absolute(config.state_dir, ec);
    while (!ec && !std::filesystem::exists(existing, ec) && existing.has_relative_path())
      existing = existing.parent_path();
    if (!ec && std::filesystem::exists(existing, ec) && !std::filesystem::is_directory(existing, ec))
      out.errors.push_back(
          finding(config, "state_dir",
                  "state_dir " + config.state_dir + ": " + existing.string() + " is not a directory", false));
  }
  if (const std::string problem = dns_settings_problem(resolver_settings(config.dns)); !problem.empty())
    out.errors.push_back(finding(config, "dns.trust_anchor_file", problem, false));
  if (config.http.tls) {
    // First as the HTTP server loads it (at OpenSSL's default security level, which refuses weak keys that a
    // listener's @SECLEVEL=0 takes); then, for its dates, the way a listener's pair is read.
    try {
      HttpServer::check_tls(*config.http.tls);
      check_pair(config, "http", "http.tls", *config.http.tls, config::ListenerTls{}, now, out);
    } catch (const std::exception& e) {
      out.errors.push_back(finding(config, "http.tls.cert", e.what(), false));
    }
  }
  return out;
}

CertificateFindings served_certificates(const Runtime& runtime, const std::optional<CertificateInfo>& http,
                                        std::chrono::system_clock::time_point now) {
  CertificateFindings out;
  const config::Config& config = *runtime.config;
  for (std::size_t l = 0; l < config.listeners.size(); ++l) {
    const ServerTls* tls = runtime.server_tls(config.listeners[l].name);
    if (tls == nullptr) continue;
    const auto certificates = tls->certificates();  // in configuration order
    for (std::size_t c = 0; c < certificates.size(); ++c)
      add_expiry(config, config.listeners[l].name, pair_path(l, c), certificates[c], now, out);
  }
  if (http) add_expiry(config, "http", "http.tls", *http, now, out);
  return out;
}

}  // namespace mailflow
