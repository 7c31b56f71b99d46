// The loader: defaults, every section, and the errors a user sees (text and exact line:col).
#include <doctest/doctest.h>
#include <unistd.h>

#include "config/config.hpp"
#include "tests/config/test_util.hpp"

namespace mailflow::config {
namespace {

using test::all_errors;
using test::load;
using test::TempDir;

constexpr std::string_view minimal = R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:2526"}
)";

// The minimal config plus `extra` appended (extra sections at top level).
std::string with(std::string_view extra) { return std::string(minimal) + std::string(extra); }

// Expects exactly one error and returns it.
ConfigError only_error(const LoadResult& result) {
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 1);
  CHECK(result.config == nullptr);
  return result.errors.front();
}

TEST_CASE("minimal config: every default") {
  const auto result = load(minimal);
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  REQUIRE(result.config);
  const Config& c = *result.config;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  CHECK(c.hostname == host);
  CHECK(c.source_path == "test.yaml");
  CHECK(c.state_dir == "/var/lib/mailflowd");
  REQUIRE(c.listeners.size() == 1);
  const Listener& l = c.listeners[0];
  CHECK(l.name == "in");
  CHECK(l.address.host == "127.0.0.1");
  CHECK(l.address.port == 2525);
  CHECK(l.address.text == "127.0.0.1:2525");
  CHECK(l.direction == Direction::inbound);
  CHECK_FALSE(l.tls.has_value());
  CHECK(l.proxy_trusted.empty());
  CHECK(l.upstream == "up");
  REQUIRE(c.upstreams.size() == 1);
  const Upstream& u = c.upstreams[0];
  CHECK(u.tls == UpstreamTls::opportunistic);
  CHECK(u.ca_file == "/etc/ssl/certs/ca-certificates.crt");
  CHECK(u.xclient);
  CHECK(c.connectors.empty());
  CHECK(c.telemetry.window == std::chrono::hours(24 * 7));
  CHECK(c.telemetry.defaults.tls10_share == doctest::Approx(0.05));
  CHECK(c.telemetry.defaults.no_tls_share == doctest::Approx(0.05));
  CHECK(c.telemetry.defaults.min_messages == 100);
  CHECK(c.http.address.text == "127.0.0.1:9725");
  CHECK(c.http.address.port == 9725);
  CHECK_FALSE(c.http.basic_auth.has_value());
  CHECK_FALSE(c.http.tls.has_value());
  CHECK(c.limits.max_sessions == 10000);
  CHECK(c.limits.max_sessions_per_ip == 50);
  CHECK(c.limits.max_message_size == 36700160);
  CHECK(c.limits.max_recipients == 100);
  CHECK(c.limits.max_bad_commands == 20);
  CHECK(c.limits.max_junk_commands == 100);
  CHECK(c.limits.max_line == 1000);
  CHECK(c.limits.drain_timeout == std::chrono::seconds(30));
  CHECK(c.limits.greet_pause == std::chrono::milliseconds(0));
  CHECK(c.limits.bare_newline == proto::BareNewlinePolicy::normalize);
  CHECK(c.log.level == "info");
  CHECK(c.log.format == LogFormat::text);
  CHECK(c.timeouts.greeting == std::chrono::seconds(300));
  CHECK(c.timeouts.command == std::chrono::seconds(300));
  CHECK(c.timeouts.data_block == std::chrono::seconds(180));
  CHECK(c.timeouts.data_end == std::chrono::seconds(600));
  CHECK(c.timeouts.tls_handshake == std::chrono::seconds(30));
  CHECK(c.timeouts.upstream_connect == std::chrono::seconds(30));
  CHECK(c.timeouts.upstream_open == std::chrono::seconds(240));
  CHECK_FALSE(c.performance.busy_poll);
  CHECK(c.performance.event_loops == 1);
  CHECK(c.find_listener("in") == &c.listeners[0]);
  CHECK(c.find_upstream("up") == &c.upstreams[0]);
  CHECK(c.find_listener("up") == nullptr);
  CHECK(c.find_upstream("nope") == nullptr);
  CHECK(c.find_connector("nope") == nullptr);
}

TEST_CASE("every section with explicit values") {
  TempDir dir;
  const std::string cert = dir.write("a.pem", "cert");
  const std::string key = dir.write("a.key", "key");
  const std::string cert2 = dir.write("b.pem", "cert");
  const std::string ca = dir.write("ca.pem", "ca");
  const std::string yaml = R"(
hostname: mx1.example.org
state_dir: /srv/mailflowd
listeners:
  - name: inbound
    address: "[::]:25"
    direction: inbound
    tls:
      certificates:
        - {cert: )" + cert +
                           ", key: " + key + R"(}
        - cert: )" + cert2 +
                           R"(
          key: )" + key + R"(
      min_version: TLS1.2
      ciphers: "HIGH"
    proxy_protocol: {trusted: ["127.0.0.1/32", "10.1.0.0/16", "::1"]}
    upstream: store
  - name: out_1
    address: 0.0.0.0:587
    direction: outbound
    upstream: smart
upstreams:
  - name: store
    address: "10.0.0.5:25"
    tls: verify
    ca_file: )" + ca + R"(
    xclient: off
  - name: smart
    address: "[2001:db8::25]:2525"
    tls: required
  - {name: plain, address: "mail.example.net:25", tls: none}
connectors:
  - name: partner-contoso
    type: partner
    direction: inbound
    match:
      listener: inbound
      client_cidrs: ["203.0.113.0/24", "2001:db8:1::/48"]
      sender_domains: [Contoso.COM, "*.contoso.com"]
      ehlo: ["*.Contoso.com"]
      sni: mx1.example.org
    require_tls: true
    upstream: plain
    alerts: {tls10_share: 0.5, tls11_share: 0.25, min_messages: 7}
  - name: apps
    type: onpremises
    match: {listener: [out_1]}
  - name: internet
    type: internet
    direction: outbound
    alerts: {no_tls_share: 0}
telemetry:
  window: 30d
  defaults: {tls10_share: 0.1, tls11_share: 0.15, no_tls_share: 0.2, min_messages: 50}
http:
  address: "0.0.0.0:9100"
  basic_auth: {user: prom, password_hash: "$2b$12$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS"}
  tls: {cert: )" + cert +
                           ", key: " + key + R"(}
limits:
  max_sessions: 200
  max_sessions_per_ip: 5
  max_message_size: 10MiB
  max_recipients: 10
  max_bad_commands: 3
  max_junk_commands: 0
  max_line: 2000
  drain_timeout: 1m30s
  greet_pause: 250ms
  bare_newline: reject
log: {level: debug, format: json}
timeouts: {greeting: 1s, command: 2s, data_block: 3s, data_end: 4m, tls_handshake: 5s, upstream_connect: 6s,
           upstream_open: 1m}
performance: {busy_poll: true, event_loops: 3}
)";
  const auto result = load(yaml);
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  const Config& c = *result.config;
  CHECK(c.hostname == "mx1.example.org");
  CHECK(c.state_dir == "/srv/mailflowd");

  REQUIRE(c.listeners.size() == 2);
  const Listener& in = c.listeners[0];
  CHECK(in.address.host == "::");
  CHECK(in.address.port == 25);
  REQUIRE(in.tls.has_value());
  REQUIRE(in.tls->certificates.size() == 2);
  CHECK(in.tls->certificates[0].cert == cert);
  CHECK(in.tls->certificates[0].key == key);
  CHECK(in.tls->certificates[1].cert == cert2);
  CHECK(in.tls->min_version == proto::TlsVersion::tls12);
  CHECK(in.tls->ciphers == "HIGH");
  REQUIRE(in.proxy_trusted.size() == 3);
  CHECK(in.proxy_trusted[1].to_string() == "10.1.0.0/16");
  CHECK(in.proxy_trusted[2].to_string() == "::1/128");
  CHECK(in.upstream == "store");
  CHECK(c.listeners[1].direction == Direction::outbound);
  CHECK(c.listeners[1].address.host == "0.0.0.0");

  REQUIRE(c.upstreams.size() == 3);
  CHECK(c.upstreams[0].tls == UpstreamTls::verify);
  CHECK(c.upstreams[0].ca_file == ca);
  CHECK_FALSE(c.upstreams[0].xclient);
  CHECK(c.upstreams[1].tls == UpstreamTls::required);
  CHECK(c.upstreams[1].address.host == "2001:db8::25");
  CHECK(c.upstreams[1].address.port == 2525);
  CHECK(c.upstreams[2].tls == UpstreamTls::none);
  CHECK(c.upstreams[2].address.host == "mail.example.net");

  REQUIRE(c.connectors.size() == 3);
  const Connector& p = c.connectors[0];
  CHECK(p.type == ConnectorType::partner);
  CHECK(p.direction == Direction::inbound);
  CHECK(p.match.listeners == std::vector<std::string>{"inbound"});
  REQUIRE(p.match.client_cidrs.size() == 2);
  CHECK(p.match.client_cidrs[0].to_string() == "203.0.113.0/24");
  CHECK(p.match.client_cidrs[1].to_string() == "2001:db8:1::/48");
  CHECK(p.match.sender_domains == std::vector<std::string>{"contoso.com", "*.contoso.com"});
  CHECK(p.match.ehlo == std::vector<std::string>{"*.contoso.com"});
  CHECK(p.match.sni == std::vector<std::string>{"mx1.example.org"});
  CHECK(p.require_tls);
  CHECK(p.upstream == "plain");
  // alerts: own values win, missing keys come from telemetry.defaults (not the built-in defaults).
  CHECK(p.alerts.tls10_share == doctest::Approx(0.5));
  CHECK(p.alerts.tls11_share == doctest::Approx(0.25));
  CHECK(p.alerts.no_tls_share == doctest::Approx(0.2));
  CHECK(p.alerts.min_messages == 7);
  const Connector& apps = c.connectors[1];
  CHECK(apps.type == ConnectorType::onpremises);
  CHECK(apps.direction == Direction::outbound);  // taken from listener out_1
  CHECK_FALSE(apps.require_tls);
  CHECK(apps.upstream.empty());
  CHECK(apps.alerts.tls10_share == doctest::Approx(0.1));
  CHECK(apps.alerts.tls11_share == doctest::Approx(0.15));
  CHECK(apps.alerts.min_messages == 50);
  CHECK(c.connectors[2].type == ConnectorType::internet);
  CHECK(c.connectors[2].alerts.no_tls_share == 0.0);
  CHECK(c.find_connector("apps") == &c.connectors[1]);

  CHECK(c.telemetry.window == std::chrono::hours(24 * 30));
  CHECK(c.telemetry.defaults.no_tls_share == doctest::Approx(0.2));
  CHECK(c.http.address.text == "0.0.0.0:9100");
  REQUIRE(c.http.basic_auth.has_value());
  CHECK(c.http.basic_auth->user == "prom");
  CHECK(c.http.basic_auth->password_hash == "$2b$12$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS");
  REQUIRE(c.http.tls.has_value());
  CHECK(c.http.tls->key == key);
  CHECK(c.limits.max_sessions == 200);
  CHECK(c.limits.max_sessions_per_ip == 5);
  CHECK(c.limits.max_message_size == 10 * 1024 * 1024);
  CHECK(c.limits.max_recipients == 10);
  CHECK(c.limits.max_bad_commands == 3);
  CHECK(c.limits.max_junk_commands == 0);  // no limit
  CHECK(c.limits.max_line == 2000);
  CHECK(c.limits.drain_timeout == std::chrono::seconds(90));
  CHECK(c.limits.greet_pause == std::chrono::milliseconds(250));
  CHECK(c.limits.bare_newline == proto::BareNewlinePolicy::reject);
  CHECK(c.log.level == "debug");
  CHECK(c.log.format == LogFormat::json);
  CHECK(c.performance.busy_poll);
  CHECK(c.performance.event_loops == 3);
  CHECK(c.timeouts.greeting == std::chrono::seconds(1));
  CHECK(c.timeouts.command == std::chrono::seconds(2));
  CHECK(c.timeouts.data_block == std::chrono::seconds(3));
  CHECK(c.timeouts.data_end == std::chrono::minutes(4));
  CHECK(c.timeouts.tls_handshake == std::chrono::seconds(5));
  CHECK(c.timeouts.upstream_connect == std::chrono::seconds(6));
  CHECK(c.timeouts.upstream_open == std::chrono::minutes(1));

  const std::string summary = summarize(c);
  CHECK(summary.find("listeners (2):") != std::string::npos);
  CHECK(summary.find("inbound [::]:25 inbound, STARTTLS min TLS1.2 (2 certificates), PROXY from "
                     "127.0.0.1/32,10.1.0.0/16,::1/128 -> upstream store") != std::string::npos);
  CHECK(
      summary.find("partner-contoso partner inbound match: listener=inbound client=203.0.113.0/24,"
                   "2001:db8:1::/48 sender=contoso.com,*.contoso.com ehlo=*.contoso.com sni=mx1.example.org, "
                   "forced TLS, upstream plain; alerts tls10_share>0.5 tls11_share>0.25 no_tls_share>0.2 min_messages=7") !=
      std::string::npos);
  CHECK(summary.find("telemetry: window 30d") != std::string::npos);
  CHECK(summary.find("http: 0.0.0.0:9100 (HTTPS) (basic auth)") != std::string::npos);
  CHECK(summary.find("performance: busy_poll=on event_loops=3") != std::string::npos);
}

TEST_CASE("the example of the contract (INTERFACE.md) is valid as written") {
  // Verbatim from the design contract, with certificate paths pointing at files that exist and a whole hash
  // for its "$2b$...".
  std::string yaml = R"(hostname: mx1.example.org            # used in banner/EHLO/Received
state_dir: /var/lib/mailflowd        # rolling windows survive restarts here
listeners:
  - name: inbound                    # label value, [a-z0-9_-]+
    address: "0.0.0.0:25"            # also "[::]:25"
    direction: inbound               # inbound | outbound
    tls:                             # absent => no STARTTLS offered
      certificates:                  # first is default; others picked by SNI
        - {cert: @CERT@, key: @KEY@}
      min_version: TLS1.0            # accept legacy clients so that they can be *measured*
      ciphers: "DEFAULT:@SECLEVEL=0" # needed for TLS1.0/1.1 with OpenSSL 3
    proxy_protocol: {trusted: ["127.0.0.1/32"]}   # PROXY v1/v2 accepted only from these
    upstream: mailstore              # default route
upstreams:
  - name: mailstore
    address: "10.0.0.5:25"
    tls: opportunistic               # none | opportunistic | required | verify
    ca_file: /etc/ssl/certs/ca-certificates.crt   # for verify
    xclient: auto                    # auto (if advertised) | off
connectors:                          # first match wins; unmatched => "internet"
  - name: partner-contoso
    type: partner                    # partner | onpremises | internet
    direction: inbound
    match:                           # all given keys must match
      listener: inbound
      client_cidrs: ["203.0.113.0/24"]
      sender_domains: ["contoso.com"]
      ehlo: ["*.contoso.com"]
      sni: ["mx1.example.org"]
    require_tls: false               # "Forced TLS": refuse MAIL before STARTTLS with 530
    upstream: mailstore
    alerts: {tls10_share: 0.05, no_tls_share: 0.05, min_messages: 100}
telemetry:
  window: 7d                         # 1d..90d, hourly buckets
  defaults: {tls10_share: 0.05, no_tls_share: 0.05, min_messages: 100}
http:
  address: "127.0.0.1:9725"          # /metrics, /, /api/v1/report(.csv), /healthz, /readyz
  basic_auth: {user: prom, password_hash: "@HASH@"}   # optional
  tls: {cert: @CERT@, key: @KEY@}                           # optional
limits: {max_sessions: 10000, max_sessions_per_ip: 50, max_message_size: 36700160,
         max_recipients: 100, max_bad_commands: 20, max_line: 1000, drain_timeout: 30s,
         greet_pause: 0s, bare_newline: normalize}  # greet_pause >0: input before the banner => 554
log: {level: info, format: text}    # format: text | json
timeouts: {greeting: 300s, command: 300s, data_block: 180s, data_end: 600s,
           tls_handshake: 30s, upstream_connect: 30s}
)";
  TempDir dir;
  const std::string cert = dir.write("mx1.pem", "x");
  const std::string key = dir.write("mx1.key", "x");
  for (const auto& [from, to] :
       {std::pair<std::string, std::string>{"@CERT@", cert},
        {"@KEY@", key},
        {"@HASH@", "$2b$12$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS"}}) {
    for (auto at = yaml.find(from); at != std::string::npos; at = yaml.find(from))
      yaml.replace(at, from.size(), to);
  }
  const auto result = load(yaml);
  INFO(all_errors(result));
  REQUIRE(result.config);
  const Config& c = *result.config;
  CHECK(c.hostname == "mx1.example.org");
  CHECK(c.listeners[0].address.text == "0.0.0.0:25");
  CHECK(c.listeners[0].proxy_trusted.size() == 1);
  CHECK(c.connectors[0].name == "partner-contoso");
  CHECK(c.connectors[0].match.ehlo == std::vector<std::string>{"*.contoso.com"});
  CHECK(c.http.basic_auth->user == "prom");
  CHECK(c.limits.drain_timeout == std::chrono::seconds(30));
  CHECK(c.timeouts.data_end == std::chrono::seconds(600));
}

TEST_CASE("unknown keys: exact position, suggestion, and the rest still checked") {
  const auto result = load(R"(listeners:
  - name: in
    adress: "127.0.0.1:2525"
    upstream: up
upstreams:
  - {name: up, address: "127.0.0.1:2526"}
colour: blue
)");
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 3);
  CHECK(result.errors[0].to_string() == "test.yaml:2:5: listeners[0]: missing required key \"address\"");
  CHECK(result.errors[1].to_string() ==
        "test.yaml:3:5: unknown key \"adress\" in listeners[0] (did you mean \"address\"?)");
  CHECK(result.errors[2].line == 7);
  CHECK(result.errors[2].column == 1);
  CHECK(result.errors[2].message.starts_with("unknown key \"colour\" (expected one of: hostname state_dir"));
  CHECK(result.config == nullptr);
}

TEST_CASE("duplicate keys are errors") {
  const auto e = only_error(load(with("log:\n  level: info\n  level: debug\n")));
  CHECK(e.to_string() == "test.yaml:7:3: duplicate key \"level\" in log (first at line 6)");
}

TEST_CASE("a second YAML document is an error, not silently left unread") {
  SUBCASE("settings after ---") {
    const auto e = only_error(load(with("---\nlimits: {max_sessions: 5}\n")));
    CHECK(e.to_string() ==
          "test.yaml:5:1: a second YAML document (after \"---\") is not read: the configuration is one "
          "document "
          "(remove the \"---\" line)");
  }
  SUBCASE("a leading --- and a trailing empty document are fine") {
    const auto result = load("---\n" + with("---\n# nothing more\n"));
    INFO(all_errors(result));
    CHECK(result.errors.empty());
  }
}

TEST_CASE("a YAML merge key says that merge keys are not supported, and whole aliases work") {
  const std::string listeners = R"(listeners:
  - &first {name: in, address: "127.0.0.1:2525", upstream: up}
  - <<: *first
    name: in2
    address: "127.0.0.1:2527"
upstreams:
  - {name: up, address: "127.0.0.1:2526"}
)";
  const auto result = load(listeners);
  INFO(all_errors(result));
  REQUIRE_FALSE(result.errors.empty());
  CHECK(
      result.errors.front().to_string() ==
      "test.yaml:3:5: listeners[1]: YAML merge keys (\"<<\") are not supported: write the keys out (an alias "
      "of a whole value, like *name, works)");
  const auto aliased = load(
      "upstreams:\n  - {name: &up up, address: \"127.0.0.1:2526\"}\nlisteners:\n"
      "  - {name: in, address: \"127.0.0.1:2525\", upstream: *up}\n");
  INFO(all_errors(aliased));
  REQUIRE(aliased.config);
  CHECK(aliased.config->listeners[0].upstream == "up");
}

TEST_CASE("timeouts.upstream_open not longer than upstream_connect: a warning at the value") {
  SUBCASE("upstream_open given") {
    const auto result = load(with("timeouts:\n  upstream_connect: 30s\n  upstream_open: 30s\n"));
    INFO(all_errors(result));
    REQUIRE(result.errors.empty());
    REQUIRE(result.warnings.size() == 1);
    CHECK(
        result.warnings[0].to_string() ==
        "test.yaml:7:18: warning: timeouts.upstream_open (30s) is not longer than timeouts.upstream_connect "
        "(30s): a host that does not answer leaves no time to try the next one");
  }
  SUBCASE("upstream_connect raised past the default upstream_open") {
    const auto result = load(with("timeouts: {upstream_connect: 5m}\n"));
    REQUIRE(result.warnings.size() == 1);
    CHECK(result.warnings[0].line == 5);
    CHECK(result.warnings[0].message.starts_with("timeouts.upstream_open (4m) is not longer than"));
  }
  SUBCASE("longer: no warning") {
    const auto result = load(with("timeouts: {upstream_connect: 5s, upstream_open: 6s}\n"));
    CHECK(result.errors.empty());
    CHECK(result.warnings.empty());
  }
}

TEST_CASE("value errors point at the value") {
  SUBCASE("duration") {
    const auto e = only_error(load(with("timeouts:\n  command: 30x\n")));
    CHECK(e.to_string() == "test.yaml:6:12: timeouts.command: expected a duration like 30s, got \"30x\"");
  }
  SUBCASE("a number without unit is not a duration") {
    const auto e = only_error(load(with("limits: {drain_timeout: 30}\n")));
    CHECK(e.to_string() == "test.yaml:5:25: limits.drain_timeout: expected a duration like 30s, got \"30\"");
  }
  SUBCASE("integer") {
    const auto e = only_error(load(with("limits:\n  max_sessions: lots\n")));
    CHECK(e.to_string() == "test.yaml:6:17: limits.max_sessions: expected a whole number, got \"lots\"");
  }
  SUBCASE("negative integer") {
    const auto e = only_error(load(with("limits:\n  max_recipients: -1\n")));
    CHECK(e.message == "limits.max_recipients: expected a whole number, got \"-1\"");
  }
  SUBCASE("size") {
    const auto e = only_error(load(with("limits:\n  max_message_size: 35 MB\n")));
    CHECK(e.message ==
          "limits.max_message_size: expected a size in bytes like 36700160 or 35MiB, got \"35 MB\"");
  }
  SUBCASE("mapping where a scalar belongs") {
    const auto e = only_error(load(with("log:\n  level: {a: 1}\n")));
    CHECK(e.to_string() ==
          "test.yaml:6:10: log.level: expected one of trace, debug, info, warn, error, critical, "
          "off, got a mapping");
  }
  SUBCASE("missing value points at the key") {
    const auto e = only_error(load(with("log:\n  level:\nhostname: a\n")));
    CHECK(e.to_string() ==
          "test.yaml:6:3: log.level: missing value (expected one of trace, debug, info, warn, "
          "error, critical, off)");
  }
  SUBCASE("section that is not a mapping") {
    const auto e = only_error(load(with("limits: 5\n")));
    CHECK(e.to_string() == "test.yaml:5:1: limits: expected a mapping of keys, got \"5\"");
  }
  SUBCASE("host names with empty or overlong labels") {
    // The hostname goes into the banner, EHLO and Received: as it is; "a..b" or "mx1.example.org." is no domain
    // (RFC 5321 4.1.2) and an upstream such as Postfix with reject_invalid_helo_hostname refuses our EHLO.
    for (const std::string& bad : std::vector<std::string>{"mx1..example.org", "mx1.example.org.", ".example.org",
                                                           std::string(64, 'a') + ".example.org"}) {
      CAPTURE(bad);
      CHECK(only_error(load(with("hostname: \"" + bad + "\"\n"))).message == "hostname: invalid host name \"" + bad + "\"");
      if (bad.ends_with('.')) continue;  // an upstream's absolute name (below)
      CHECK(only_error(load("listeners:\n  - {name: in, address: \"127.0.0.1:2525\", upstream: up}\nupstreams:\n"
                            "  - {name: up, address: \"" + bad + ":25\"}\n")).message ==
            "upstreams[0].address: invalid host name \"" + bad + "\"");
    }
    CHECK(load(with("hostname: " + std::string(63, 'a') + ".example.org\n")).errors.empty());
    // An upstream's host name may end with the root's dot (asked as written, no search list); one dot only.
    const auto upstream = [](const std::string& host) {
      return load(
          "listeners:\n  - {name: in, address: \"127.0.0.1:2525\", upstream: up}\nupstreams:\n"
          "  - {name: up, address: \"" +
          host + ":25\"}\n");
    };
    CHECK(upstream("mx1.example.org.").errors.empty());
    CHECK(upstream("mailstore.").errors.empty());
    for (const std::string& bad : std::vector<std::string>{"mx1.example.org..", ".", "..", "a..b."}) {
      CAPTURE(bad);
      CHECK(only_error(upstream(bad)).message == "upstreams[0].address: invalid host name \"" + bad + "\"");
    }
  }
  SUBCASE("bool") {
    const auto e =
        only_error(load(with("connectors:\n  - {name: c, match: {listener: in}, require_tls: maybe}\n")));
    CHECK(e.message == "connectors[0].require_tls: expected true or false, got \"maybe\"");
  }
}

TEST_CASE("ranges") {
  struct Case {
    std::string extra;
    std::string message;
  };
  const Case cases[] = {
      {"telemetry: {window: 12h}\n", "telemetry.window: must be between 1d and 90d, got 12h"},
      {"telemetry: {window: 91d}\n", "telemetry.window: must be between 1d and 90d, got 91d"},
      {"telemetry: {window: 36h}\n", "telemetry.window: must be a whole number of days (1d..90d)"},
      {"telemetry: {defaults: {tls10_share: 1.5}}\n",
       "telemetry.defaults.tls10_share: must be a share between 0 and 1 (0.05 = 5%), got 1.5"},
      {"connectors: [{name: c, direction: inbound, alerts: {tls11_share: 2}}]\n",
       "connectors[0].alerts.tls11_share: must be a share between 0 and 1 (0.05 = 5%), got 2"},
      {"telemetry: {defaults: {no_tls_share: -0.1}}\n",
       "telemetry.defaults.no_tls_share: must be a share between 0 and 1 (0.05 = 5%), got -0.1"},
      {"telemetry: {defaults: {no_tls_share: 5%}}\n",
       "telemetry.defaults.no_tls_share: expected a share between 0 and 1 like 0.05, got \"5%\""},
      {"limits: {max_sessions: 0}\n", "limits.max_sessions: must be between 1 and 1000000, got 0"},
      {"limits: {max_line: 999}\n", "limits.max_line: must be between 1000 and 1048576, got 999"},
      {"limits: {max_message_size: 100}\n",
       "limits.max_message_size: must be between 1024 and 1099511627776, got 100"},
      {"limits: {greet_pause: 10m}\n", "limits.greet_pause: must be between 0s and 5m, got 10m"},
      {"timeouts: {command: 0}\n", "timeouts.command: must be between 1ms and 1d, got 0"},
      {"timeouts: {upstream_open: 2d}\n", "timeouts.upstream_open: must be between 1ms and 1d, got 2d"},
      {"performance: {event_loops: 0}\n",
       "performance.event_loops: expected a whole number from 1 to 1024, or auto, got \"0\""},
      {"performance: {event_loops: 1025}\n",
       "performance.event_loops: expected a whole number from 1 to 1024, or auto, got \"1025\""},
      {"performance: {event_loops: all}\n",
       "performance.event_loops: expected a whole number from 1 to 1024, or auto, got \"all\""},
      {"http: {address: \"127.0.0.1:70000\"}\n",
       "http.address: invalid port \"70000\" in \"127.0.0.1:70000\" (expected 1..65535)"},
      {"http: {address: \"127.0.0.1:0\"}\n",
       "http.address: invalid port \"0\" in \"127.0.0.1:0\" (expected 1..65535)"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.extra);
    const auto e = only_error(load(with(c.extra)));
    CHECK(e.message == c.message);
    CHECK(e.line == 5);
  }
}

TEST_CASE("performance.event_loops: auto means one loop per usable CPU, decided at start") {
  const auto result = load(with("performance: {event_loops: auto}\n"));
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  CHECK(result.config->performance.event_loops == 0);
  CHECK(summarize(*result.config).find("performance: busy_poll=off event_loops=auto") != std::string::npos);
}

TEST_CASE("enumerations") {
  const std::pair<std::string, std::string> cases[] = {
      {"limits: {bare_newline: strip}\n",
       "limits.bare_newline: expected one of normalize, reject, got \"strip\""},
      {"log: {format: xml}\n", "log.format: expected one of text, json, got \"xml\""},
      {"performance: {busy_poll: sometimes}\n",
       "performance.busy_poll: expected true or false, got \"sometimes\""},
      {"log: {level: verbose}\n",
       "log.level: expected one of trace, debug, info, warn, error, critical, off, got \"verbose\""},
  };
  for (const auto& [extra, message] : cases) {
    CAPTURE(extra);
    CHECK(only_error(load(with(extra))).message == message);
  }
  const auto upstream_tls = only_error(load(R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:2526", tls: always, xclient: auto}
)"));
  CHECK(upstream_tls.to_string() ==
        "test.yaml:4:48: upstreams[0].tls: expected one of none, opportunistic, "
        "required, verify, dane, got \"always\"");
  const auto xclient = only_error(load(R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:2526", xclient: on}
)"));
  CHECK(xclient.message == "upstreams[0].xclient: expected one of auto, off, got \"on\"");
}

TEST_CASE("addresses") {
  const auto address_error = [](const std::string& address) {
    const auto result = load("listeners:\n  - {name: in, address: " + address +
                             ", upstream: up}\nupstreams:\n  - {name: up, address: \"127.0.0.1:2526\"}\n");
    INFO(all_errors(result));
    REQUIRE(result.errors.size() == 1);
    CHECK(result.errors[0].line == 2);
    CHECK(result.errors[0].column == 25);
    return result.errors[0].message;
  };
  CHECK(address_error("\"127.0.0.1\"") ==
        "listeners[0].address: missing port in \"127.0.0.1\" (expected host:port)");
  CHECK(address_error("\"::1:25\"") ==
        "listeners[0].address: IPv6 addresses need brackets: write \"[::1]:25\"");
  CHECK(address_error("\"mx.example.org:25\"") ==
        "listeners[0].address: expected an IP address to listen on, got \"mx.example.org\" (use 127.0.0.1, "
        "0.0.0.0 "
        "or \"[::]\")");
  CHECK(address_error("\"[1.2.3.4]:25\"") ==
        "listeners[0].address: expected an IPv6 address inside [...], got \"[1.2.3.4]:25\"");
  CHECK(address_error("\":25\"") ==
        "listeners[0].address: missing host in \":25\" (use 0.0.0.0:port for all IPv4 addresses)");
  // A listener's IPv6 socket is IPv6-only, which Linux does not let bind an IPv4-mapped address (the start
  // failed with "Invalid argument" after --check-config had passed).
  CHECK(address_error("\"[::ffff:127.0.0.1]:25\"") ==
        "listeners[0].address: \"[::ffff:127.0.0.1]:25\" is an IPv4-mapped IPv6 address, which a listener "
        "(IPv6-only) cannot listen on: write \"127.0.0.1:25\"");
  const auto unquoted =
      only_error(load("listeners:\n  - name: in\n    address: [::]:25\n    upstream: up\n"));
  CHECK(unquoted.to_string() ==
        "test.yaml:3:18: YAML syntax error: end of map not found (quote addresses like \"[::]:25\")");

  const auto two = load(R"(listeners:
  - {name: a, address: "127.0.0.1:2525", upstream: up}
  - {name: b, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "bad host:25"}
)");
  INFO(all_errors(two));
  REQUIRE(two.errors.size() == 2);
  CHECK(two.errors[0].to_string() ==
        "test.yaml:3:24: listeners[1].address: \"127.0.0.1:2525\" is already used by listener \"a\"");
  CHECK(two.errors[1].message == "upstreams[0].address: invalid host name \"bad host\"");
}

// Linux refuses a second listening socket on a port that a wildcard address of the same family holds (and the
// reverse), SO_REUSEADDR or not: such a file passed --check-config and then failed at start with "Address
// already in use".
TEST_CASE("listeners and http.address that cannot all listen are errors") {
  const auto overlapping = load(R"(listeners:
  - {name: a, address: "0.0.0.0:2525", upstream: up}
  - {name: b, address: "127.0.0.1:2525", upstream: up}
  - {name: c, address: "[::]:2525", upstream: up}
  - {name: d, address: "[0::1]:2525", upstream: up}
  - {name: e, address: "127.0.0.1:9725", upstream: up}
  - {name: f, address: "[::1]:2526", upstream: up}
  - {name: g, address: "127.0.0.1:2526", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
http: {address: "0.0.0.0:9725"}
)");
  INFO(all_errors(overlapping));
  REQUIRE(overlapping.errors.size() == 3);
  CHECK(overlapping.errors[0].to_string() ==
        "test.yaml:3:24: listeners[1].address: \"127.0.0.1:2525\" cannot listen beside listener \"a\" on "
        "\"0.0.0.0:2525\" (that address takes the port on every local address of its family)");
  CHECK(overlapping.errors[1].to_string() ==
        "test.yaml:5:24: listeners[3].address: \"[0::1]:2525\" cannot listen beside listener \"c\" on "
        "\"[::]:2525\" (that address takes the port on every local address of its family)");
  CHECK(overlapping.errors[2].to_string() ==
        "test.yaml:11:17: http.address: \"0.0.0.0:9725\" cannot listen beside listener \"e\" on "
        "\"127.0.0.1:9725\" (this address takes the port on every local address of its family)");

  const auto same = load(R"(listeners:
  - {name: a, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
http: {address: "127.0.0.1:2525"}
)");
  INFO(all_errors(same));
  REQUIRE(same.errors.size() == 1);
  CHECK(same.errors[0].to_string() ==
        "test.yaml:5:17: http.address: \"127.0.0.1:2525\" is already used by listener \"a\"");

  const auto default_http = load(R"(listeners:
  - {name: a, address: "0.0.0.0:9725", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
)");
  INFO(all_errors(default_http));
  REQUIRE(default_http.errors.size() == 1);
  CHECK(default_http.errors[0].to_string() ==
        "test.yaml:2:24: listeners[0].address: \"0.0.0.0:9725\" cannot listen beside http.address, whose default "
        "is \"127.0.0.1:9725\" (set http.address to another one)");

  // The HTTP server binds "[::]" dual-stack (IPv4 clients too, unlike a listener's IPv6-only "[::]"): it
  // cannot listen beside an IPv4 listener on its port, while "[::1]" can.
  const auto dual_stack = load(R"(listeners:
  - {name: a, address: "0.0.0.0:9725", upstream: up}
  - {name: b, address: "127.0.0.1:9726", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
http: {address: "[::]:9725"}
)");
  INFO(all_errors(dual_stack));
  REQUIRE(dual_stack.errors.size() == 1);
  CHECK(dual_stack.errors[0].to_string() ==
        "test.yaml:6:17: http.address: \"[::]:9725\" cannot listen beside listener \"a\" on \"0.0.0.0:9725\" "
        "(http.address \"[::]\" takes IPv4 clients too, on every local address)");
  CHECK(load(R"(listeners:
  - {name: a, address: "127.0.0.1:9725", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
http: {address: "[::1]:9725"}
)").errors.empty());
}

TEST_CASE("names, duplicates and references") {
  const auto result = load(R"(listeners:
  - {name: In, address: "127.0.0.1:2525", upstream: up}
  - {name: b, address: "127.0.0.1:2526", upstream: nowhere}
  - {name: b, address: "127.0.0.1:2527"}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
  - {name: up, address: "127.0.0.1:26"}
connectors:
  - {name: c1, match: {listener: [b, ghost]}, upstream: gone}
  - {name: c1, direction: inbound}
)");
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 8);
  CHECK(
      result.errors[0].to_string() ==
      "test.yaml:2:12: listeners[0].name: invalid name \"In\": use 1-64 characters of a-z, 0-9, '_' and '-'");
  CHECK(result.errors[1].to_string() ==
        "test.yaml:3:52: listeners[1].upstream: no upstream named \"nowhere\" (known: up)");
  CHECK(result.errors[2].to_string() ==
        "test.yaml:4:5: listeners[2]: missing required key \"upstream\" (the default "
        "route for its mail)");
  CHECK(result.errors[3].to_string() ==
        "test.yaml:4:12: duplicate listener name \"b\" (first defined at line 3)");
  CHECK(result.errors[4].to_string() ==
        "test.yaml:7:12: duplicate upstream name \"up\" (first defined at line 6)");
  CHECK(result.errors[5].to_string() ==
        "test.yaml:9:38: connectors[0].match.listener: no listener named \"ghost\" (known: b)");
  CHECK(result.errors[6].to_string() ==
        "test.yaml:9:57: connectors[0].upstream: no upstream named \"gone\" (known: "
        "up)");
  CHECK(result.errors[7].to_string() ==
        "test.yaml:10:12: duplicate connector name \"c1\" (first defined at line 9)");
}

TEST_CASE("at least one listener") {
  SUBCASE("absent") {
    const auto e = only_error(load("upstreams:\n  - {name: up, address: \"127.0.0.1:25\"}\n"));
    CHECK(e.to_string() == "test.yaml:1:1: at least one listener is required");
  }
  SUBCASE("empty list") {
    const auto e = only_error(load("hostname: a\nlisteners: []\n"));
    CHECK(e.to_string() == "test.yaml:2:1: at least one listener is required");
  }
  SUBCASE("empty file") {
    const auto e = only_error(load("# nothing here\n"));
    CHECK(e.to_string() == "test.yaml: the configuration is empty: at least one listener is required");
  }
  SUBCASE("not a mapping") {
    const auto e = only_error(load("- a\n- b\n"));
    CHECK(e.to_string() == "test.yaml:1:1: the configuration: expected a mapping of keys, got a list");
  }
}

TEST_CASE("YAML syntax errors carry a position") {
  const auto e = only_error(load("listeners:\n  - {name: in\nupstreams: []\n"));
  CHECK(e.line == 3);
  CHECK(e.message.starts_with("YAML syntax error: "));
}

TEST_CASE("a tab in the indentation is named, not only \"illegal block entry\"") {
  const auto e = only_error(load("listeners:\n\t- {name: in, address: \"127.0.0.1:2525\", upstream: up}\n"));
  CHECK(e.to_string() ==
        "test.yaml:2:2: YAML syntax error: illegal block entry (line 2 is indented with a tab; YAML "
        "indents with spaces only)");
  // A blank line with a tab is no indentation: an error further down is not blamed on it.
  const auto other = only_error(load("listeners:\n\t\n  - {name: in\nupstreams: []\n"));
  CHECK(other.message.find("tab") == std::string::npos);
}

TEST_CASE("nesting deeper than the YAML parser goes is said as such, not as \"bad file\"") {
  const auto e = only_error(load("listeners: " + std::string(3000, '[') + std::string(3000, ']') + "\n"));
  CHECK(e.line == 1);
  CHECK(e.message == "YAML syntax error: lists or mappings nested deeper than the YAML parser reads");
}

TEST_CASE("connector direction follows its listener") {
  const std::string listeners = R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
  - {name: out, address: "127.0.0.1:2526", direction: outbound, upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
connectors:
)";
  SUBCASE("mismatch is an error at the direction") {
    const auto e =
        only_error(load(listeners + "  - name: p\n    direction: outbound\n    match: {listener: in}\n"));
    CHECK(e.to_string() ==
          "test.yaml:8:16: connectors[0].direction: the connector is outbound but its listener "
          "\"in\" is inbound (a connector's direction is its listener's)");
  }
  SUBCASE("listeners of both directions") {
    const auto e = only_error(load(listeners + "  - {name: p, match: {listener: [in, out]}}\n"));
    CHECK(e.to_string() ==
          "test.yaml:7:38: connectors[0].match.listener: listener \"out\" is outbound but \"in\" "
          "is inbound; a connector has one direction");
  }
  SUBCASE("taken from the listener when omitted") {
    const auto result = load(listeners + "  - {name: p, match: {listener: out}}\n");
    INFO(all_errors(result));
    REQUIRE(result.config);
    CHECK(result.config->connectors[0].direction == Direction::outbound);
  }
  SUBCASE("required without match.listener") {
    const auto e = only_error(load(listeners + "  - {name: p, match: {client_cidrs: 192.0.2.0/24}}\n"));
    CHECK(e.to_string() ==
          "test.yaml:7:5: connectors[0]: missing required key \"direction\" (needed when "
          "match.listener is not given)");
  }
  SUBCASE("given without match.listener") {
    const auto result = load(listeners + "  - {name: p, direction: outbound, match: {sni: [\"*\"]}}\n");
    INFO(all_errors(result));
    REQUIRE(result.config);
    CHECK(result.config->connectors[0].direction == Direction::outbound);
    CHECK(result.config->connectors[0].match.listeners.empty());
  }
}

TEST_CASE("the name internet is reserved unless the type is internet") {
  const auto e = only_error(load(with("connectors:\n  - {name: internet, direction: inbound}\n")));
  CHECK(e.to_string() ==
        "test.yaml:6:12: connectors[0].name: \"internet\" is reserved for unmatched traffic; choose "
        "another name or set type: internet");
  CHECK(load(with("connectors:\n  - {name: internet, type: internet, direction: inbound}\n")).errors.empty());
  CHECK(only_error(load(with("connectors:\n  - {name: x, type: cloud, direction: inbound}\n"))).message ==
        "connectors[0].type: expected one of partner, onpremises, internet, got \"cloud\"");
}

// "each list matches if any item matches": an empty one (or one whose items are all commented out) matched
// everything instead, as if the key were absent, so a partner connector whose CIDRs were commented out took all
// the traffic; `listener: []` also let a connector without `direction` through as inbound.
TEST_CASE("an empty match list is an error, not any") {
  const auto result = load(with(R"(connectors:
  - name: p
    match:
      listener: []
  - name: q
    direction: inbound
    match:
      client_cidrs:
      #  - 203.0.113.0/24
      sender_domains: []
      recipient_domains: []
      ehlo: []
      sni: []
)"));
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 6);
  CHECK(result.errors[0].to_string() ==
        "test.yaml:8:17: connectors[0].match.listener: an empty list matches nothing; leave the key out to match "
        "any");
  CHECK(result.errors[1].to_string() ==
        "test.yaml:12:7: connectors[1].match.client_cidrs: an empty list matches nothing; leave the key out to "
        "match any");
  CHECK(result.errors[2].line == 14);
  CHECK(result.errors[3].line == 15);
  CHECK(result.errors[4].line == 16);
  CHECK(result.errors[5].message == "connectors[1].match.sni: an empty list matches nothing; leave the key out to "
                                    "match any");
}

TEST_CASE("match values") {
  const auto result = load(with(R"(connectors:
  - name: p
    direction: inbound
    match:
      client_cidrs: ["203.0.113.5/24", "300.1.1.1/8", "10.0.0.0/33", "2001:db8::/32"]
      sender_domains: ["ok.example", "bad domain", "@x.org"]
      ehlo: ["*.ok", "has space"]
      sni: [[nested]]
)"));
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 7);
  CHECK(result.errors[0].to_string() ==
        "test.yaml:9:22: connectors[0].match.client_cidrs: \"203.0.113.5/24\" has "
        "host bits set; did you mean 203.0.113.0/24?");
  CHECK(result.errors[1].to_string() ==
        "test.yaml:9:40: connectors[0].match.client_cidrs: expected a CIDR like "
        "203.0.113.0/24 or 2001:db8::/32, got \"300.1.1.1/8\"");
  CHECK(result.errors[2].column == 55);
  CHECK(result.errors[3].to_string() ==
        "test.yaml:10:38: connectors[0].match.sender_domains: expected a domain like "
        "example.com or *.example.com, got \"bad domain\"");
  CHECK(result.errors[4].column == 52);
  CHECK(result.errors[5].to_string() ==
        "test.yaml:11:22: connectors[0].match.ehlo: expected a name pattern like "
        "*.example.com, got \"has space\"");
  CHECK(result.errors[6].to_string() ==
        "test.yaml:12:13: connectors[0].match.sni[0]: expected a name pattern like "
        "*.example.com, got a list");
}

TEST_CASE("listener tls") {
  TempDir dir;
  const std::string cert = dir.write("c.pem", "x");
  const std::string base =
      "listeners:\n  - name: in\n    address: \"127.0.0.1:2525\"\n    upstream: up\n    tls:\n";
  const std::string upstreams = "upstreams:\n  - {name: up, address: \"127.0.0.1:25\"}\n";
  SUBCASE("certificates required and non-empty") {
    CHECK(only_error(load(base + "      min_version: TLS1.2\n" + upstreams)).to_string() ==
          "test.yaml:5:5: listeners[0].tls: missing required key \"certificates\"");
    CHECK(only_error(load(base + "      certificates: []\n" + upstreams)).to_string() ==
          "test.yaml:6:21: listeners[0].tls.certificates: at least one {cert, key} pair is required");
  }
  SUBCASE("files must exist, each error at its value") {
    const auto result =
        load(base + "      certificates:\n        - {cert: /nonexistent/a.pem, key: " + dir.path().string() +
             "}\n        - {cert: " + cert + "}\n" + upstreams);
    INFO(all_errors(result));
    REQUIRE(result.errors.size() == 3);
    CHECK(result.errors[0].to_string() ==
          "test.yaml:7:18: listeners[0].tls.certificates[0].cert: cannot read "
          "\"/nonexistent/a.pem\": No such file or directory");
    CHECK(result.errors[1].to_string() == "test.yaml:7:43: listeners[0].tls.certificates[0].key: \"" +
                                              dir.path().string() + "\" is not a regular file");
    CHECK(result.errors[2].to_string() ==
          "test.yaml:8:11: listeners[0].tls.certificates[1]: missing required key \"key\"");
  }
  SUBCASE("min_version") {
    const std::string certs = "      certificates: [{cert: " + cert + ", key: " + cert + "}]\n";
    const auto e = only_error(load(base + certs + "      min_version: SSLv3\n" + upstreams));
    CHECK(e.to_string() ==
          "test.yaml:7:20: listeners[0].tls.min_version: expected one of TLS1.0, TLS1.1, TLS1.2, TLS1.3, got "
          "\"SSLv3\"");
    const auto ok = load(base + certs + "      min_version: TLSv1.1\n" + upstreams);
    INFO(all_errors(ok));
    REQUIRE(ok.config);
    CHECK(ok.config->listeners[0].tls->min_version == proto::TlsVersion::tls11);
    CHECK(ok.config->listeners[0].tls->ciphers == "DEFAULT:@SECLEVEL=0");
  }
}

TEST_CASE("relative certificate paths are relative to the working directory") {
  TempDir dir;
  dir.write("run/c.pem", "x");
  const std::string yaml =
      "listeners:\n  - name: in\n    address: \"127.0.0.1:2525\"\n    upstream: up\n"
      "    tls: {certificates: [{cert: run/c.pem, key: run/c.pem}]}\n"
      "upstreams:\n  - {name: up, address: \"127.0.0.1:25\"}\n";
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  const auto inside = load(yaml);
  std::filesystem::current_path(cwd);
  CHECK(inside.errors.empty());
  CHECK(load(yaml).errors.size() == 2);  // from elsewhere neither file is found
}

TEST_CASE("proxy_protocol.trusted") {
  const auto result = load(R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up, proxy_protocol: {trusted: [127.0.0.1/32, localhost]}}
  - {name: b, address: "127.0.0.1:2526", upstream: up, proxy_protocol: {trusted: ::1, allow: all}}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
)");
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 2);
  CHECK(result.errors[0].to_string() ==
        "test.yaml:2:98: listeners[0].proxy_protocol.trusted: expected a CIDR like "
        "203.0.113.0/24 or 2001:db8::/32, got \"localhost\"");
  CHECK(result.errors[1].message ==
        "unknown key \"allow\" in listeners[1].proxy_protocol (expected one of: trusted)");
}

TEST_CASE("upstream tls verify needs a readable CA file") {
  const auto e = only_error(load(R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25", tls: verify, ca_file: /nonexistent/ca.pem}
)"));
  CHECK(e.to_string() ==
        "test.yaml:4:63: upstreams[0].ca_file: cannot read \"/nonexistent/ca.pem\": No such file or "
        "directory");
  // Without verify the CA file is not used, so it is not checked.
  CHECK(load(R"(listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25", tls: required, ca_file: /nonexistent/ca.pem}
)")
            .errors.empty());
}

TEST_CASE("http") {
  SUBCASE("basic_auth needs user and password_hash") {
    const auto e = only_error(load(with("http:\n  basic_auth: {user: prom}\n")));
    CHECK(e.to_string() == "test.yaml:6:3: http.basic_auth: missing required key \"password_hash\"");
  }
  SUBCASE("a plain password is refused") {
    const auto e = only_error(load(with("http:\n  basic_auth: {user: prom, password_hash: secret}\n")));
    CHECK(e.line == 6);
    CHECK(e.column == 43);
    CHECK(
        e.message.starts_with("http.basic_auth.password_hash: expected a crypt(3) hash starting with $2b$"));
  }
  SUBCASE("a hash no password can match is refused") {
    // Truncated or altered in copying: crypt(3) never yields it, so every request would get 401 without a
    // word.
    for (const std::string hash :
         {"$2b$12$abcdefghijklmnopqrstuv", "$2b$12$tooshort",
          "$2b$99$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS",
          "$2b$12$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcSx", "$6$", "$y$garbage",
          "$5$UCwp6dWhAFpEIkow$djHmgiKeTN3JhfPe0DtwWwa40iEHbtYmhhNVUf8v",
          "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAt!7"}) {
      INFO(hash);
      const auto e =
          only_error(load(with("http:\n  basic_auth: {user: prom, password_hash: \"" + hash + "\"}\n")));
      CHECK(e.line == 6);
      CHECK(e.message.starts_with("http.basic_auth.password_hash: not a whole crypt(3) hash"));
    }
    for (const std::string hash :
         {"$2b$04$BAPtbhCRXzcUNbdJ0QLw5eZpS1YlGPR8S8OUow.Ca4QzF/2V7e3O6",
          "$2y$12$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS",
          "$5$UCwp6dWhAFpEIkow$djHmgiKeTN3JhfPe0DtwWwa40iEHbtYmhhNVUf8veE8",
          "$6$rounds=5000$abc$K4v3HcZ8yAmpRfxML6S46NCcqy9r4/"
          "KdbQpFvqSWsBf4dgySOEOo1DHJTrmn2BsJK2aNmPN8Tfb826D2o9.z51",
          "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7"}) {
      INFO(hash);
      const auto result = load(with("http:\n  basic_auth: {user: prom, password_hash: \"" + hash + "\"}\n"));
      CHECK(all_errors(result) == "");
    }
  }
  SUBCASE("a hash whose check costs more than a scrape can wait is refused") {
    // $2b$31: one check of days, holding the password thread (and the exit at SIGTERM) all that time.
    for (const auto& [hash, words] : std::vector<std::pair<std::string, std::string>>{
             {"$2b$31$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS", "bcrypt cost 31 is over 15"},
             {"$2y$16$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS", "bcrypt cost 16 is over 15"},
             {"$6$rounds=999999999$abc$K4v3HcZ8yAmpRfxML6S46NCcqy9r4/"
              "KdbQpFvqSWsBf4dgySOEOo1DHJTrmn2BsJK2aNmPN8Tfb826D2o9.z51",
              "$6$ rounds=999999999 is over 1000000"},
             {"$5$rounds=99999999999999999999$UCwp6dWhAFpEIkow$djHmgiKeTN3JhfPe0DtwWwa40iEHbtYmhhNVUf8veE8",
              "$5$ rounds=99999999999999999999 is over 1000000"}}) {
      INFO(hash);
      const auto e =
          only_error(load(with("http:\n  basic_auth: {user: prom, password_hash: \"" + hash + "\"}\n")));
      CHECK(e.line == 6);
      CHECK(e.message.starts_with("http.basic_auth.password_hash: " + words + ", the most a password check"));
    }
    for (const std::string hash :
         {"$2b$15$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS",
          "$5$rounds=1000000$UCwp6dWhAFpEIkow$djHmgiKeTN3JhfPe0DtwWwa40iEHbtYmhhNVUf8veE8"}) {
      INFO(hash);
      CHECK(all_errors(load(with("http:\n  basic_auth: {user: prom, password_hash: \"" + hash + "\"}\n"))) ==
            "");
    }
  }
  SUBCASE("http.tls files") {
    const auto result = load(with("http:\n  tls: {cert: /nonexistent/h.pem}\n"));
    INFO(all_errors(result));
    REQUIRE(result.errors.size() == 2);
    CHECK(result.errors[0].to_string() == "test.yaml:6:3: http.tls: missing required key \"key\"");
    CHECK(result.errors[1].to_string() ==
          "test.yaml:6:15: http.tls.cert: cannot read \"/nonexistent/h.pem\": No such file or directory");
  }
  SUBCASE("address must be an IP to bind") {
    CHECK(only_error(load(with("http: {address: \"localhost:9725\"}\n"))).message ==
          "http.address: expected an IP address to listen on, got \"localhost\" (use 127.0.0.1, 0.0.0.0 or "
          "\"[::]\")");
  }
}

TEST_CASE("many errors are reported at once, in file order") {
  const auto result = load(R"(hostname: "bad host"
listeners:
  - name: in
    address: "127.0.0.1:99999"
    direction: sideways
    upstream: up
upstreams:
  - {name: up, address: "127.0.0.1:25", tls: maybe}
telemetry: {window: 100d}
limits: {max_line: 10, bare_newline: keep}
log: {format: yaml}
timeouts: {greeting: soon}
)");
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 9);
  for (std::size_t i = 1; i < result.errors.size(); ++i) {
    CHECK(std::pair(result.errors[i - 1].line, result.errors[i - 1].column) <
          std::pair(result.errors[i].line, result.errors[i].column));
  }
  CHECK(result.errors[0].line == 1);
  CHECK(result.errors[8].to_string() ==
        "test.yaml:12:22: timeouts.greeting: expected a duration like 30s, got \"soon\"");
}

TEST_CASE("alerts inherit from telemetry.defaults whatever the key order") {
  const auto result = load(R"(connectors:
  - {name: a, direction: inbound, alerts: {tls10_share: 0.3}}
  - {name: b, direction: inbound}
telemetry:
  defaults: {no_tls_share: 0.25, min_messages: 9}
listeners:
  - {name: in, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
)");
  INFO(all_errors(result));
  REQUIRE(result.config);
  const auto& a = result.config->connectors[0].alerts;
  CHECK(a.tls10_share == doctest::Approx(0.3));
  CHECK(a.no_tls_share == doctest::Approx(0.25));
  CHECK(a.min_messages == 9);
  const auto& b = result.config->connectors[1].alerts;
  CHECK(b.tls10_share == doctest::Approx(0.05));
  CHECK(b.no_tls_share == doctest::Approx(0.25));
}

TEST_CASE("load_config_file") {
  const auto missing = load_config_file("/nonexistent/mailflowd.yaml");
  REQUIRE(missing.errors.size() == 1);
  CHECK(missing.errors[0].to_string() ==
        "/nonexistent/mailflowd.yaml: cannot read the configuration: No such file or directory");
  TempDir dir;
  // A directory opens like a file and reads as nothing: that is no empty configuration.
  const auto directory = load_config_file(dir.path().string());
  REQUIRE(directory.errors.size() == 1);
  CHECK(directory.errors[0].to_string() == dir.path().string() + ": cannot read the configuration: Is a directory");
  // A file larger than any configuration is refused once that much is read, not read whole (nor parsed).
  const std::string huge = dir.write("huge.yaml", with("# " + std::string(max_config_bytes, 'x') + "\n"));
  const auto too_big = load_config_file(huge);
  REQUIRE(too_big.errors.size() == 1);
  const std::string said = too_big.errors[0].to_string();
  CHECK(said == huge + ": the configuration is larger than 16 MiB (no configuration is that large: is it the "
                       "right file?)");
  const std::string path = dir.write("m.yaml", minimal);
  const auto ok = load_config_file(path);
  REQUIRE(ok.config);
  CHECK(ok.config->source_path == path);
  CHECK(summarize(*ok.config).starts_with("configuration " + path + " is valid\n"));
  const std::string bad = dir.write("bad.yaml", with("log: {level: loud}\n"));
  const auto result = load_config_file(bad);
  REQUIRE(result.errors.size() == 1);
  CHECK(result.errors[0].to_string() ==
        bad +
            ":5:14: log.level: expected one of trace, debug, info, warn, error, critical, off, got \"loud\"");
}

}  // namespace
}  // namespace mailflow::config
