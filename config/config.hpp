#pragma once
// The validated, immutable configuration. The daemon only ever sees a Config that passed validation,
// held as std::shared_ptr<const Config> and swapped whole on reload.
#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "proto/data_filter.hpp"
#include "proto/tls_version.hpp"

namespace mailflow::config {

enum class Direction { inbound, outbound };
enum class ConnectorType { partner, onpremises, internet };
enum class UpstreamTls { none, opportunistic, required, verify, dane };
// upstreams[].mta_sts (RFC 8461): off, testing (deliver, report failures), enforce (skip MX hosts that fail).
enum class MtaStsMode { off, testing, enforce };
enum class LogFormat { text, json };
enum class LogOutput { standard_error, syslog };  // "stderr" | "syslog"

std::string_view to_string(Direction);
std::string_view to_string(ConnectorType);
std::string_view to_string(UpstreamTls);
std::string_view to_string(MtaStsMode);
std::string_view to_string(LogFormat);
std::string_view to_string(LogOutput);

// An IPv4 or IPv6 network. IPv4 is stored as an IPv4-mapped IPv6 address (::ffff:a.b.c.d) with the prefix
// offset by 96, so one comparison serves both families.
struct Cidr {
  std::array<std::uint8_t, 16> network{};
  int prefix = 0;  // 0..128 in the mapped space

  static std::optional<Cidr> parse(std::string_view text);  // "203.0.113.0/24", "2001:db8::/32", "::1"
  bool contains(const std::array<std::uint8_t, 16>& address) const;  // address in mapped form
  std::string to_string() const;  // "203.0.113.0/24" (IPv4 shown as IPv4), "2001:db8::/32"
  bool operator==(const Cidr&) const = default;
};

// "192.0.2.1" -> ::ffff:192.0.2.1, "2001:db8::1" -> itself; nullopt if not an IP literal.
std::optional<std::array<std::uint8_t, 16>> parse_ip_address(std::string_view text);

// "host:port" or "[v6]:port" split into parts.
struct Endpoint {
  std::string host;  // "0.0.0.0", "::", "127.0.0.1", or a name for upstreams
  std::uint16_t port = 0;
  std::string text;  // as written
  bool operator==(const Endpoint&) const = default;
};

struct CertificatePair {
  std::string cert;  // PEM chain
  std::string key;
  bool operator==(const CertificatePair&) const = default;
};

struct ListenerTls {
  std::vector<CertificatePair> certificates;  // first is default; others selected by SNI (their SANs/CN)
  proto::TlsVersion min_version = proto::TlsVersion::tls10;
  std::string ciphers = "DEFAULT:@SECLEVEL=0";
  bool operator==(const ListenerTls&) const = default;
};

struct Listener {
  std::string name;
  Endpoint address;
  Direction direction = Direction::inbound;
  std::optional<ListenerTls> tls;  // absent: no STARTTLS offered
  // Non-empty: a PROXY header is required from these and refused from others.
  std::vector<Cidr> proxy_trusted;
  std::string upstream;  // default route (name of an upstream)
  bool operator==(const Listener&) const = default;
};

struct Upstream {
  std::string name;
  Endpoint address;    // empty (host "", port 0) when mx is true
  bool mx = false;     // true: deliver to the recipient domain's MX hosts (RFC 5321 section 5), not to address
  std::uint16_t port = 25;  // the MX hosts' SMTP port (mx only; address carries its own port)
  UpstreamTls tls = UpstreamTls::opportunistic;
  // Absent: every version down to TLS1.0 is offered (what a partner's MX can do is what is measured).
  std::optional<proto::TlsVersion> min_version;
  // tls: verify only. Lower-case, exact ("mx1.contoso.com") or "*.contoso.com" (one leftmost label, as in
  // certificates). Empty: the host name connected to (the MX host name, or address's host).
  std::vector<std::string> verify_names;
  std::string ca_file = "/etc/ssl/certs/ca-certificates.crt";
  bool xclient = true;  // "auto": used if advertised; false for "off"
  MtaStsMode mta_sts = MtaStsMode::off;  // default: testing for mx upstreams, off for a fixed address
  bool operator==(const Upstream&) const = default;
};

// MTA-STS policy fetching (upstreams[].mta_sts turns it on per upstream).
struct MtaSts {
  std::string ca_file;  // PEM CA certificates for https://mta-sts.<domain>; empty: the system trust store
  std::chrono::milliseconds fetch_timeout{10000};  // a whole policy fetch
  std::uint32_t max_policies = 10000;              // cached policy domains (state_dir/mta-sts.state)
  bool operator==(const MtaSts&) const = default;
};

// SMTP TLS reporting (RFC 8460). Reports are always kept (state_dir/tlsrpt.state) and served; `send` mails them.
struct TlsRpt {
  bool send = false;
  std::string organization_name;  // default: the hostname
  std::string contact_info;       // default: postmaster@<hostname>
  std::string submitter;          // default: the hostname
  // Sending (send: true; daemon/tlsrpt_sender.hpp): mailto: rua through mailflowd's own MX delivery, https:
  // rua with a POST.
  std::string from;                // envelope and From: address; default: tlsrpt-noreply@<hostname>
  std::uint16_t smtp_port = 25;    // the rua domain's MX hosts' port (another port for tests)
  std::string ca_file;             // PEM CA certificates for https: rua; empty: the system trust store
  std::chrono::milliseconds interval{3600000};  // how often finished days are sent (and failures retried)
  std::chrono::milliseconds retry_for{86400000};  // a report still failing this long after its first try: given up
  std::chrono::milliseconds https_timeout{30000};  // one POST: lookup, connect, TLS, request and answer
  std::uint32_t max_reports_per_run = 1000;        // domain reports attempted per run; the rest wait for the next
  bool operator==(const TlsRpt&) const = default;
};

// The resolver used for MX, A/AAAA (and, later, TLSA/MTA-STS) lookups.
struct Dns {
  std::vector<Endpoint> servers;        // IP literals with port; empty: the nameservers of /etc/resolv.conf
  std::chrono::milliseconds timeout{5000};  // per lookup, retries included
  std::string trust_anchor_file;        // empty: no DNSSEC validation (answers are never "secure")
  bool operator==(const Dns&) const = default;
};

struct AlertThresholds {
  double tls10_share = 0.05;
  double no_tls_share = 0.05;
  std::uint64_t min_messages = 100;
  double tls11_share = 0.05;  // last: keeps the brace-initialised {tls10, no_tls, min_messages} meaning
  bool operator==(const AlertThresholds&) const = default;
};

struct ConnectorMatch {
  std::vector<std::string> listeners;       // empty = any (YAML accepts one name or a list)
  std::vector<Cidr> client_cidrs;           // empty = any
  std::vector<std::string> sender_domains;  // lower-case; exact or "*.example.com"; empty = any
  std::vector<std::string> recipient_domains;  // same form; empty = any; given: an unknown domain never matches
  std::vector<std::string> ehlo;            // glob patterns ("*.contoso.com"), lower-case; empty = any
  std::vector<std::string> sni;             // glob patterns, lower-case; empty = any
  bool operator==(const ConnectorMatch&) const = default;
};

struct Connector {
  std::string name;
  ConnectorType type = ConnectorType::partner;
  Direction direction = Direction::inbound;
  ConnectorMatch match;
  bool require_tls = false;
  std::string upstream;    // empty: the listener's
  AlertThresholds alerts;  // resolved: missing keys inherited from telemetry.defaults
  bool operator==(const Connector&) const = default;
};

struct Telemetry {
  std::chrono::hours window{24 * 7};  // 1d..90d
  AlertThresholds defaults;
  std::uint32_t top_domains = 50;  // destination domains kept per connector in the report; the rest is "other"
  std::uint32_t top_remotes = 100;  // remote servers kept per connector and day (heavy hitters); the rest is "other"
  bool remotes = true;              // false: no per-address drill-down (addresses and names are personal data)
  bool operator==(const Telemetry&) const = default;
};

struct BasicAuth {
  std::string user;
  std::string password_hash;  // crypt(3) hash: $2b$ (bcrypt), $6$, $5$, $y$
  bool operator==(const BasicAuth&) const = default;
};

struct Http {
  Endpoint address{"127.0.0.1", 9725, "127.0.0.1:9725"};
  std::optional<BasicAuth> basic_auth;
  std::optional<CertificatePair> tls;
  bool operator==(const Http&) const = default;
};

struct Limits {
  std::uint32_t max_sessions = 10000;
  std::uint32_t max_sessions_per_ip = 50;
  std::uint64_t max_message_size = 36700160;
  std::uint32_t max_recipients = 100;
  std::uint32_t max_bad_commands = 20;
  std::uint32_t max_junk_commands = 100;  // 0: no limit (Postfix smtpd_junk_command_limit)
  std::size_t max_line = 1000;
  std::chrono::milliseconds drain_timeout{30000};
  std::chrono::milliseconds greet_pause{0};
  proto::BareNewlinePolicy bare_newline = proto::BareNewlinePolicy::normalize;
  std::uint32_t max_hops = 50;  // Received: headers above this => 554 5.4.6 (Postfix hopcount_limit)
  bool operator==(const Limits&) const = default;
};

struct Log {
  std::string level = "info";  // trace, debug, info, warn, error, critical, off
  LogFormat format = LogFormat::text;
  LogOutput output = LogOutput::standard_error;  // syslog: syslog(3), facility mail, for hosts without journald
  bool operator==(const Log&) const = default;
};

struct Performance {
  // Event loops poll briefly before they block (adaptive, at most 100 us; see daemon/poll_window.hpp).
  // Off by default (issue #16): polling spends CPU that a quota or a shared host pays for.
  bool busy_poll = false;
  // How many event loops (threads) relay sessions; 0 ("auto"): one per CPU the process may run on.
  unsigned event_loops = 1;
  bool operator==(const Performance&) const = default;
};

struct Timeouts {
  std::chrono::milliseconds greeting{300000};
  std::chrono::milliseconds command{300000};
  std::chrono::milliseconds data_block{180000};
  std::chrono::milliseconds data_end{600000};
  std::chrono::milliseconds tls_handshake{30000};
  std::chrono::milliseconds upstream_connect{30000};
  // The whole opening of an upstream for a RCPT (DNS, MTA-STS, every connect attempt and the setup steps):
  // under the 5 minutes a client waits for its RCPT reply (RFC 5321 4.5.3.2.2 and 4.5.3.2.3), so that it gets
  // ours.
  std::chrono::milliseconds upstream_open{240000};
  bool operator==(const Timeouts&) const = default;
};

struct Config {
  std::string source_path;
  std::string hostname;  // default: the machine's host name
  std::string state_dir = "/var/lib/mailflowd";
  std::vector<Listener> listeners;
  std::vector<Upstream> upstreams;
  std::vector<Connector> connectors;  // in match order
  Dns dns;
  MtaSts mta_sts;
  TlsRpt tlsrpt;
  Telemetry telemetry;
  Http http;
  Limits limits;
  Log log;
  Timeouts timeouts;
  Performance performance;
  // Line and column (1-based) of the values that are checked outside the loader, by key path: each
  // "listeners[N].tls.certificates[M].cert", "http.tls.cert", "upstreams[N].ca_file", "mta_sts.ca_file",
  // "tlsrpt.ca_file" and "dns.trust_anchor_file" (the daemon loads them).
  std::map<std::string, std::pair<int, int>, std::less<>> positions;

  const Upstream* find_upstream(std::string_view name) const;
  const Listener* find_listener(std::string_view name) const;
  const Connector* find_connector(std::string_view name) const;

  // Field by field (positions and source_path included): the test of docs/configuration.md's defaults compares
  // a file that leaves a key out with one that states its documented default.
  bool operator==(const Config&) const = default;
};

struct ConfigError {
  std::string file;
  int line = 0;    // 1-based; 0 when not tied to a position
  int column = 0;  // 1-based
  std::string message;
  bool warning = false;  // a configuration that loads but probably does not do what was meant

  std::string to_string() const;  // "file:line:col: message", or "file:line:col: warning: message"
};

struct LoadResult {
  std::shared_ptr<const Config> config;  // null when errors is non-empty
  std::vector<ConfigError> errors;
  // Connectors that can never match, require_tls on listeners without STARTTLS on some of them, ...: printed
  // by --check-config (which still exits 0) and logged at start and reload. Sorted by position.
  std::vector<ConfigError> warnings;
};

// A configuration is kilobytes; a file larger than this (a log, an image, a device named by mistake) is
// refused after reading this much, never read whole.
inline constexpr std::size_t max_config_bytes = 16 * 1024 * 1024;

// Parses and validates; collects every error it can find (never stops at the first).
LoadResult load_config_file(const std::string& path);
LoadResult load_config_string(std::string_view yaml, const std::string& file_name);

// Human summary for --check-config: listeners, upstreams, connectors, window.
std::string summarize(const Config& config);

// Durations as written in the config: "250ms", "30s", "5m", "1h", "7d", also combined ("1h30m"); "0" alone.
std::optional<std::chrono::milliseconds> parse_duration(std::string_view text);
// The exact form with the largest units first: "7d", "1m30s", "250ms", "0s".
std::string format_duration(std::chrono::milliseconds duration);

// A listener, upstream or connector name as the loader accepts it: 1-64 of a-z 0-9 _ - (label-value safe).
bool valid_name(std::string_view name);

// Every key path the loader accepts, e.g. "hostname", "listeners[].tls.min_version" ("[]" = each list item).
// docs/configuration.md documents exactly these (a test compares them).
std::vector<std::string> known_keys();

// A domain or domain pattern as connectors' sender_domains/recipient_domains and upstreams' verify_names
// accept it: labels of a-z 0-9 - _ separated by single dots, optionally starting with "*." (any one or more
// leading labels). Lower-cased; nullopt when invalid.
std::optional<std::string> parse_domain_pattern(std::string_view text);

// Glob match used for ehlo/sni/sender_domains patterns: '*' matches any run of characters, case-insensitive.
bool glob_match(std::string_view pattern, std::string_view text);

}  // namespace mailflow::config
