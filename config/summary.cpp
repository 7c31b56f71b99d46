// The human summary printed by `mailflowd --check-config` for a valid configuration.
#include <fmt/format.h>

#include "config/config.hpp"

namespace mailflow::config {
namespace {

std::string_view tls_name(proto::TlsVersion version) {
  // Local spelling (same as proto::to_string) so that this library needs only proto's headers.
  switch (version) {
    case proto::TlsVersion::none:
      return "none";
    case proto::TlsVersion::tls10:
      return "TLS1.0";
    case proto::TlsVersion::tls11:
      return "TLS1.1";
    case proto::TlsVersion::tls12:
      return "TLS1.2";
    case proto::TlsVersion::tls13:
      return "TLS1.3";
  }
  return "none";
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ",") + item;
  return out;
}

std::string alerts_text(const AlertThresholds& alerts) {
  return fmt::format("tls10_share>{:g} tls11_share>{:g} no_tls_share>{:g} min_messages={}", alerts.tls10_share,
                     alerts.tls11_share, alerts.no_tls_share, alerts.min_messages);
}

}  // namespace

std::string summarize(const Config& config) {
  std::string out;
  out += fmt::format("configuration {} is valid\n",
                     config.source_path.empty() ? "(string)" : config.source_path);
  out += fmt::format("hostname: {}\nstate_dir: {}\n", config.hostname, config.state_dir);

  out += fmt::format("listeners ({}):\n", config.listeners.size());
  for (const auto& listener : config.listeners) {
    std::string tls = "no STARTTLS";
    if (listener.tls) {
      tls = fmt::format("STARTTLS min {} ({} certificate{})", tls_name(listener.tls->min_version),
                        listener.tls->certificates.size(), listener.tls->certificates.size() == 1 ? "" : "s");
    }
    std::string proxy;
    if (!listener.proxy_trusted.empty()) {
      std::vector<std::string> cidrs;
      for (const auto& cidr : listener.proxy_trusted) cidrs.push_back(cidr.to_string());
      proxy = ", PROXY from " + join(cidrs);
    }
    out += fmt::format("  {} {} {}, {}{} -> upstream {}\n", listener.name, listener.address.text,
                       to_string(listener.direction), tls, proxy, listener.upstream);
  }

  out += fmt::format("upstreams ({}):\n", config.upstreams.size());
  for (const auto& upstream : config.upstreams) {
    std::string policy;
    if (upstream.min_version) policy += fmt::format(" min_version={}", tls_name(*upstream.min_version));
    if (!upstream.verify_names.empty()) policy += " verify_names=" + join(upstream.verify_names);
    out += fmt::format("  {} {} tls={}{} xclient={}{}\n", upstream.name,
                       upstream.mx ? fmt::format("mx (port {})", upstream.port) : upstream.address.text,
                       to_string(upstream.tls), policy, upstream.xclient ? "auto" : "off",
                       upstream.mx ? fmt::format(" mta_sts={}", to_string(upstream.mta_sts)) : "");
  }

  out += fmt::format("connectors ({}, first match wins; unmatched traffic counts as \"internet\"):\n",
                     config.connectors.size());
  for (const auto& connector : config.connectors) {
    std::vector<std::string> match;
    if (!connector.match.listeners.empty()) match.push_back("listener=" + join(connector.match.listeners));
    if (!connector.match.client_cidrs.empty()) {
      std::vector<std::string> cidrs;
      for (const auto& cidr : connector.match.client_cidrs) cidrs.push_back(cidr.to_string());
      match.push_back("client=" + join(cidrs));
    }
    if (!connector.match.sender_domains.empty())
      match.push_back("sender=" + join(connector.match.sender_domains));
    if (!connector.match.recipient_domains.empty())
      match.push_back("recipient=" + join(connector.match.recipient_domains));
    if (!connector.match.ehlo.empty()) match.push_back("ehlo=" + join(connector.match.ehlo));
    if (!connector.match.sni.empty()) match.push_back("sni=" + join(connector.match.sni));
    std::string match_text;
    for (const auto& m : match) match_text += (match_text.empty() ? "" : " ") + m;
    out += fmt::format("  {} {} {} match: {}{}{}; alerts {}\n", connector.name, to_string(connector.type),
                       to_string(connector.direction), match_text.empty() ? "everything" : match_text,
                       connector.require_tls ? ", forced TLS" : "",
                       connector.upstream.empty() ? "" : ", upstream " + connector.upstream,
                       alerts_text(connector.alerts));
  }

  out += fmt::format(
      "telemetry: window {}, defaults {}\n",
      format_duration(std::chrono::duration_cast<std::chrono::milliseconds>(config.telemetry.window)),
      alerts_text(config.telemetry.defaults));
  {
    std::vector<std::string> servers;
    for (const auto& server : config.dns.servers) servers.push_back(server.text);
    out += fmt::format("dns: {}, timeout {}{}\n", servers.empty() ? "/etc/resolv.conf" : join(servers),
                       format_duration(config.dns.timeout),
                       config.dns.trust_anchor_file.empty() ? ""
                                                            : ", DNSSEC trust anchor " + config.dns.trust_anchor_file);
  }
  out += fmt::format("http: {}{}{}\n", config.http.address.text, config.http.tls ? " (HTTPS)" : "",
                     config.http.basic_auth ? " (basic auth)" : "");
  out +=
      fmt::format("limits: max_sessions={} per_ip={} max_message_size={} max_recipients={} bare_newline={}\n",
                  config.limits.max_sessions, config.limits.max_sessions_per_ip,
                  config.limits.max_message_size, config.limits.max_recipients,
                  config.limits.bare_newline == proto::BareNewlinePolicy::normalize ? "normalize" : "reject");
  out += fmt::format("log: level={} format={} output={}\n", config.log.level, to_string(config.log.format),
                     to_string(config.log.output));
  out +=
      fmt::format("performance: busy_poll={} event_loops={}\n", config.performance.busy_poll ? "on" : "off",
                  config.performance.event_loops == 0 ? std::string("auto")
                                                      : std::to_string(config.performance.event_loops));
  return out;
}

}  // namespace mailflow::config
