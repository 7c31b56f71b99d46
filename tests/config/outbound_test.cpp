// The outbound keys (issue #14): mx upstreams and their TLS policy, dns, recipient_domains, max_hops,
// top_domains; defaults and the errors a user sees (text and exact line:col).
#include <doctest/doctest.h>

#include "config/config.hpp"
#include "tests/config/test_util.hpp"

namespace mailflow::config {
namespace {

using test::all_errors;
using test::load;
using test::TempDir;

constexpr std::string_view listeners = R"(listeners:
  - {name: out, address: "127.0.0.1:2587", direction: outbound, upstream: internet}
)";

std::string with(std::string_view rest) { return std::string(listeners) + std::string(rest); }

ConfigError only_error(const LoadResult& result) {
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 1);
  CHECK(result.config == nullptr);
  return result.errors.front();
}

TEST_CASE("outbound defaults") {
  const auto result = load(with("upstreams:\n  - {name: internet, mx: true}\n"));
  INFO(all_errors(result));
  REQUIRE(result.config);
  const Config& c = *result.config;
  const Upstream& u = c.upstreams.at(0);
  CHECK(u.mx);
  CHECK(u.port == 25);
  CHECK(u.address.host.empty());
  CHECK_FALSE(u.min_version.has_value());
  CHECK(u.verify_names.empty());
  CHECK(c.dns.servers.empty());
  CHECK(c.dns.timeout == std::chrono::seconds(5));
  CHECK(c.dns.trust_anchor_file.empty());
  CHECK(c.limits.max_hops == 50);
  CHECK(c.telemetry.top_domains == 50);
  const std::string summary = summarize(c);
  CHECK(summary.find("  internet mx (port 25) tls=opportunistic xclient=auto") != std::string::npos);
  CHECK(summary.find("dns: /etc/resolv.conf, timeout 5s") != std::string::npos);
}

TEST_CASE("outbound keys with explicit values") {
  TempDir dir;
  const std::string anchor = dir.write("root.key", ". DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n");
  const auto result = load(with(R"(upstreams:
  - name: internet
    mx: true
    port: 2525
    tls: verify
    ca_file: )" + anchor + R"(
    min_version: TLSv1.2
    verify_names: ["*.Contoso.com", mx1.fabrikam.com]
  - {name: store, address: "10.0.0.5:25", tls: required, min_version: TLS1.3}
  - {name: plain, mx: false, address: "10.0.0.6:25"}
dns:
  servers: ["127.0.0.1:53", "[::1]:5353", 192.0.2.53]
  timeout: 1500ms
  trust_anchor_file: )" + anchor + R"(
connectors:
  - name: partner-contoso
    direction: outbound
    match: {recipient_domains: [Contoso.COM, "*.contoso.com"]}
    upstream: internet
limits: {max_hops: 30}
telemetry: {top_domains: 20}
)"));
  INFO(all_errors(result));
  REQUIRE(result.config);
  const Config& c = *result.config;
  const Upstream& internet = *c.find_upstream("internet");
  CHECK(internet.mx);
  CHECK(internet.port == 2525);
  CHECK(internet.tls == UpstreamTls::verify);
  CHECK(internet.min_version == proto::TlsVersion::tls12);
  CHECK(internet.verify_names == std::vector<std::string>{"*.contoso.com", "mx1.fabrikam.com"});
  CHECK(c.find_upstream("store")->min_version == proto::TlsVersion::tls13);
  CHECK_FALSE(c.find_upstream("plain")->mx);
  CHECK(c.find_upstream("plain")->address.port == 25);
  REQUIRE(c.dns.servers.size() == 3);
  CHECK(c.dns.servers[0].host == "127.0.0.1");
  CHECK(c.dns.servers[0].port == 53);
  CHECK(c.dns.servers[1].host == "::1");
  CHECK(c.dns.servers[1].port == 5353);
  CHECK(c.dns.servers[2].host == "192.0.2.53");
  CHECK(c.dns.servers[2].port == 53);
  CHECK(c.dns.timeout == std::chrono::milliseconds(1500));
  CHECK(c.dns.trust_anchor_file == anchor);
  REQUIRE(c.connectors.size() == 1);
  CHECK(c.connectors[0].direction == Direction::outbound);
  CHECK(c.connectors[0].match.recipient_domains == std::vector<std::string>{"contoso.com", "*.contoso.com"});
  CHECK(c.limits.max_hops == 30);
  CHECK(c.telemetry.top_domains == 20);
  const std::string summary = summarize(c);
  CHECK(summary.find("  internet mx (port 2525) tls=verify min_version=TLS1.2 verify_names=*.contoso.com,"
                     "mx1.fabrikam.com xclient=auto") != std::string::npos);
  CHECK(summary.find("recipient=contoso.com,*.contoso.com") != std::string::npos);
  CHECK(summary.find("dns: 127.0.0.1:53,[::1]:5353,192.0.2.53, timeout 1s500ms, DNSSEC trust anchor") !=
        std::string::npos);
}

TEST_CASE("mx and address: exactly one of them, port only with mx") {
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, address: \"10.0.0.5:25\"}\n")))
            .to_string() ==
        "test.yaml:4:32: upstreams[0]: \"address\" and \"mx: true\" exclude each other (mx: true delivers to the "
        "recipient domain's MX hosts; remove one)");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, tls: none}\n"))).to_string() ==
        "test.yaml:4:5: upstreams[0]: missing required key \"address\" (or mx: true)");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: false}\n"))).to_string() ==
        "test.yaml:4:26: upstreams[0]: missing required key \"address\" (mx is false)");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, address: \"10.0.0.5:25\", port: 2525}\n")))
            .to_string() ==
        "test.yaml:4:46: upstreams[0].port: only for mx: true; an address carries its own port (\"host:port\")");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, port: 0}\n"))).to_string() ==
        "test.yaml:4:38: upstreams[0].port: must be between 1 and 65535, got 0");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: maybe}\n"))).message ==
        "upstreams[0].mx: expected true or false, got \"maybe\"");
}

TEST_CASE("min_version and verify_names") {
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, min_version: TLS1.4}\n"))).message ==
        "upstreams[0].min_version: expected one of TLS1.0, TLS1.1, TLS1.2, TLS1.3, got \"TLS1.4\"");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, tls: none, min_version: TLS1.2}\n")))
            .to_string() ==
        "test.yaml:4:43: upstreams[0].min_version: needs tls: opportunistic, required or verify (tls is none)");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, verify_names: [a.example]}\n")))
            .to_string() ==
        "test.yaml:4:32: upstreams[0].verify_names: only for tls: verify (the names a verified certificate must "
        "match; tls is opportunistic)");
  TempDir dir;
  const std::string ca = dir.write("ca.pem", "x");
  const auto result = load(with("upstreams:\n  - {name: internet, mx: true, tls: verify, ca_file: " + ca +
                                ", verify_names: [\"a.*.example\", \"@x\", ok.example]}\n"));
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 2);
  CHECK(result.errors[0].message ==
        "upstreams[0].verify_names: expected a host name like mx1.example.com or *.example.com, got \"a.*.example\"");
  CHECK(result.errors[1].message ==
        "upstreams[0].verify_names: expected a host name like mx1.example.com or *.example.com, got \"@x\"");
}

TEST_CASE("dns errors") {
  const auto result = load(with(R"(upstreams:
  - {name: internet, mx: true}
dns:
  servers: ["ns.example:53", "127.0.0.1:99999", "[::1]:x", [x]]
  timeout: 10ms
  trust_anchor_file: /nonexistent/root.key
)"));
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 6);
  CHECK(result.errors[0].to_string() ==
        "test.yaml:6:13: dns.servers[0]: expected the IP address of a DNS server, got \"ns.example:53\"");
  CHECK(result.errors[1].to_string() ==
        "test.yaml:6:30: dns.servers[1]: invalid port \"99999\" in \"127.0.0.1:99999\" (expected 1..65535)");
  CHECK(result.errors[2].to_string() ==
        "test.yaml:6:49: dns.servers[2]: invalid port \"x\" in \"[::1]:x\" (expected 1..65535)");
  CHECK(result.errors[3].to_string() ==
        "test.yaml:6:60: dns.servers[3]: expected an address like 127.0.0.1:53, got a list");
  CHECK(result.errors[4].to_string() == "test.yaml:7:12: dns.timeout: must be between 100ms and 5m, got 10ms");
  CHECK(result.errors[5].to_string() ==
        "test.yaml:8:22: dns.trust_anchor_file: cannot read \"/nonexistent/root.key\": No such file or directory");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\ndns: {resolvers: []}\n"))).message ==
        "unknown key \"resolvers\" in dns (expected one of: servers timeout trust_anchor_file)");
  // An empty list (or one whose items are all commented out) names no server; it used to mean
  // /etc/resolv.conf silently, which leaving the key out says.
  for (const char* empty : {"dns: {servers: []}\n", "dns:\n  servers:\n  # - 127.0.0.1\n"}) {
    CAPTURE(empty);
    const std::string mx = "upstreams:\n  - {name: internet, mx: true}\n";
    CHECK(only_error(load(with(mx + empty))).message ==
          "dns.servers: an empty list names no DNS server; leave the key out to use the name servers of "
          "/etc/resolv.conf");
  }
}

TEST_CASE("recipient_domains: bad patterns, and the checker's reference errors") {
  const auto result = load(with(R"(upstreams:
  - {name: internet, mx: true}
connectors:
  - name: p
    direction: outbound
    match: {recipient_domains: ["ok.example", "bad domain", "*", "a..b", "mail.*.example", "x.example."]}
    upstream: nowhere
)"));
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 6);
  CHECK(result.errors[0].to_string() ==
        "test.yaml:8:47: connectors[0].match.recipient_domains: expected a domain like example.com or "
        "*.example.com, got \"bad domain\"");
  CHECK(result.errors[1].message.ends_with("got \"*\""));
  CHECK(result.errors[2].message.ends_with("got \"a..b\""));
  CHECK(result.errors[3].message.ends_with("got \"mail.*.example\""));
  CHECK(result.errors[4].message.ends_with("got \"x.example.\""));
  CHECK(result.errors[5].to_string() ==
        "test.yaml:9:15: connectors[0].upstream: no upstream named \"nowhere\" (known: internet)");
}

TEST_CASE("an mx upstream as the route of an inbound listener or connector is fine") {
  const auto result = load(R"(listeners:
  - {name: in, address: "127.0.0.1:2525", direction: inbound, upstream: internet}
upstreams:
  - {name: internet, mx: true, port: 2526}
connectors:
  - {name: p, match: {listener: in, recipient_domains: [contoso.com]}, upstream: internet}
)");
  INFO(all_errors(result));
  CHECK(result.errors.empty());
}

TEST_CASE("max_hops and top_domains ranges") {
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\nlimits: {max_hops: 0}\n"))).message ==
        "limits.max_hops: must be between 1 and 1000, got 0");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\ntelemetry: {top_domains: 0}\n")))
            .message == "telemetry.top_domains: must be between 1 and 10000, got 0");
}

}  // namespace
}  // namespace mailflow::config
