// The checks across sections (issue #17): require_tls where no STARTTLS is offered (error), connectors that
// can never match and patterns that never match (warnings), and YAML mistakes named for what they are.
#include <doctest/doctest.h>

#include "config/config.hpp"
#include "tests/config/test_util.hpp"

namespace mailflow::config {
namespace {

using test::all_errors;
using test::load;
using test::TempDir;

std::string all_warnings(const LoadResult& result) {
  std::string out;
  for (const auto& warning : result.warnings) out += warning.to_string() + "\n";
  return out;
}

// Listeners `in` (inbound, STARTTLS), `plain` (inbound, no tls) and `out` (outbound, no tls) on lines 2-6,
// then the given connectors from line 10 on.
struct Files {
  TempDir dir;
  std::string cert = dir.write("c.pem", "x");
  std::string key = dir.write("c.key", "x");
  std::string listeners(bool with_plain = true, bool with_out = true) const {
    std::string out = "listeners:\n  - {name: in, address: \"127.0.0.1:2525\", upstream: up,\n"
                      "     tls: {certificates: [{cert: " + cert + ", key: " + key + "}]}}\n";
    out += with_plain ? "  - {name: plain, address: \"127.0.0.1:2526\", upstream: up}\n" : "  # no plain\n";
    out += with_out ? "  - {name: out, address: \"127.0.0.1:2527\", upstream: up, direction: outbound}\n"
                    : "  # no out\n";
    out += "  # (line 6)\nupstreams:\n  - {name: up, address: \"127.0.0.1:25\"}\nconnectors:\n";
    return out;
  }
};

TEST_CASE("require_tls on a listener without STARTTLS is an error") {
  Files f;
  const auto result = load(f.listeners() + "  - {name: forced, match: {listener: plain}, require_tls: true}\n");
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 1);
  CHECK(result.config == nullptr);
  CHECK(result.errors[0].to_string() ==
        "test.yaml:10:59: connectors[0].require_tls: listener \"plain\" offers no STARTTLS (no tls: block), so "
        "every client of connector \"forced\" would get 530 5.7.0 and its mail would bounce; add a tls: block "
        "with certificates to the listener, or set require_tls: false");
}

TEST_CASE("require_tls on a listener with STARTTLS is fine") {
  Files f;
  const auto result = load(f.listeners() + "  - {name: forced, match: {listener: in}, require_tls: true}\n");
  INFO(all_errors(result), all_warnings(result));
  CHECK(result.errors.empty());
  CHECK(result.warnings.empty());
}

TEST_CASE("require_tls without match.listener: every listener of its direction counts") {
  Files f;
  SUBCASE("some offer STARTTLS: a warning") {
    const auto result =
        load(f.listeners() + "  - {name: forced, direction: inbound, require_tls: true, match: {ehlo: [a]}}\n");
    INFO(all_errors(result));
    REQUIRE(result.errors.empty());
    REQUIRE(result.warnings.size() == 1);
    CHECK(result.warnings[0].warning);
    CHECK(result.warnings[0].to_string() ==
          "test.yaml:10:53: warning: connectors[0].require_tls: listener \"plain\" offers no STARTTLS (no tls: "
          "block): clients of connector \"forced\" that connect there get 530 5.7.0; restrict the connector "
          "with match.listener to listeners with tls:");
  }
  SUBCASE("none offers STARTTLS: an error") {
    const auto result = load(f.listeners() + "  - {name: forced, direction: outbound, require_tls: true}\n");
    INFO(all_errors(result));
    REQUIRE(result.errors.size() == 1);
    CHECK(result.errors[0].line == 10);
    CHECK(result.errors[0].column == 54);
    CHECK(result.errors[0].message.starts_with(
        "connectors[0].require_tls: listener \"out\" offers no STARTTLS (no tls: block)"));
  }
}

TEST_CASE("a connector after a catch-all never matches") {
  Files f;
  const auto result = load(f.listeners() +
                           "  - {name: everything, direction: inbound}\n"
                           "  - {name: partner, direction: inbound, match: {client_cidrs: [\"192.0.2.0/24\"]}}\n"
                           "  - {name: outgoing, direction: outbound}\n");
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  REQUIRE(result.config != nullptr);
  REQUIRE(result.warnings.size() == 1);
  CHECK(result.warnings[0].to_string() ==
        "test.yaml:11:12: warning: connectors[1]: connector \"partner\" never matches: connector \"everything\" "
        "(line 10) comes first and matches all inbound traffic (first match wins); move it above \"everything\" "
        "or narrow that one's match");
}

TEST_CASE("identical and covering matches are shadowed, narrower or different ones are not") {
  Files f;
  const auto result = load(f.listeners() +
                           "  - {name: a, match: {listener: in, sender_domains: [\"*.contoso.com\", fabrikam.com]}}\n"
                           "  - {name: b, match: {listener: in, sender_domains: [\"*.contoso.com\", fabrikam.com]}}\n"
                           "  - {name: c, match: {listener: in, sender_domains: [mail.contoso.com]}}\n"
                           "  - {name: d, match: {listener: in, sender_domains: [contoso.com]}}\n"
                           "  - {name: e, match: {listener: [in, plain], sender_domains: [fabrikam.com]}}\n"
                           "  - {name: f, match: {listener: in, sender_domains: [fabrikam.com], ehlo: [mx]}}\n");
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  INFO(all_warnings(result));
  REQUIRE(result.warnings.size() == 3);
  CHECK(result.warnings[0].line == 11);  // b: identical to a
  CHECK(result.warnings[0].message.find("connector \"b\" never matches: connector \"a\" (line 10) comes first and "
                                        "matches everything this one would") != std::string::npos);
  CHECK(result.warnings[1].line == 12);  // c: mail.contoso.com is inside *.contoso.com
  CHECK(result.warnings[2].line == 15);  // f: a narrower ehlo does not help, a (or b) takes fabrikam.com first
  CHECK(result.warnings[2].message.find("connector \"f\" never matches: connector \"a\"") != std::string::npos);
  // d: contoso.com itself is not matched by *.contoso.com; e: listener plain is not covered by a.
}

TEST_CASE("a connector whose client_cidrs lie inside an earlier one's never matches") {
  Files f;
  const auto result = load(f.listeners() +
                           "  - {name: wide, direction: inbound, match: {client_cidrs: [\"10.0.0.0/8\", \"2001:db8::/32\"]}}\n"
                           "  - {name: narrow, direction: inbound, match: {client_cidrs: [\"10.1.0.0/16\", \"2001:db8:1::/48\"]}}\n"
                           "  - {name: partly, direction: inbound, match: {client_cidrs: [\"10.2.0.0/16\", \"192.0.2.0/24\"]}}\n"
                           "  - {name: stricter, direction: inbound, match: {client_cidrs: [\"10.3.0.0/16\"], sni: [mx]}}\n");
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  INFO(all_warnings(result));
  REQUIRE(result.warnings.size() == 2);
  CHECK(result.warnings[0].to_string().starts_with(
      "test.yaml:11:12: warning: connectors[1]: connector \"narrow\" never matches: connector \"wide\" (line 10)"));
  CHECK(result.warnings[1].to_string().starts_with(
      "test.yaml:13:12: warning: connectors[3]: connector \"stricter\" never matches: connector \"wide\""));
}

TEST_CASE("a connector without a listener of its direction never matches") {
  Files f;
  const auto result = load(f.listeners(true, false) + "  - {name: apps, type: onpremises, direction: outbound}\n");
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  REQUIRE(result.warnings.size() == 1);
  CHECK(result.warnings[0].to_string() ==
        "test.yaml:10:47: warning: connectors[0]: no outbound listener is configured, so connector \"apps\" never "
        "matches (a connector sees only the traffic of listeners with its direction)");
}

TEST_CASE("an EHLO or SNI pattern with a trailing dot never matches") {
  Files f;
  const auto result =
      load(f.listeners() + "  - {name: p, match: {listener: in, ehlo: [\"mx.contoso.com.\"], sni: [mx1.example.org.]}}\n");
  INFO(all_errors(result));
  REQUIRE(result.errors.empty());
  INFO(all_warnings(result));
  REQUIRE(result.warnings.size() == 2);
  CHECK(result.warnings[0].to_string() ==
        "test.yaml:10:44: warning: connectors[0].match.ehlo: \"mx.contoso.com.\" ends with a dot, but names are "
        "compared as clients send them, without it, so this pattern never matches (write \"mx.contoso.com\")");
  CHECK(result.warnings[1].line == 10);
  CHECK(result.warnings[1].column == 70);
  CHECK(result.warnings[1].message.starts_with("connectors[0].match.sni: \"mx1.example.org.\" ends with a dot"));
}

TEST_CASE("an unclosed quote is named as such, at the quote") {
  SUBCASE("YAML fails further down") {
    const auto result = load("listeners:\n  - name: in\n    address: \"127.0.0.1:4525\n    upstream: up\n"
                             "upstreams:\n  - {name: up, address: \"[::1]:25\"}\n");
    INFO(all_errors(result));
    REQUIRE(result.errors.size() == 1);
    CHECK(result.errors[0].to_string() ==
          "test.yaml:3:14: unclosed quote: the value \"127.0.0.1:4525 has no closing \" on its line; YAML syntax "
          "error at line 6 column 26: end of map not found");
  }
  SUBCASE("never closed at all (yaml-cpp would read it to the end of the file)") {
    const auto result = load("listeners:\n  - name: in\n    address: '127.0.0.1:4525\n    upstream: up\n");
    INFO(all_errors(result));
    REQUIRE(result.errors.size() == 1);
    CHECK(result.errors[0].to_string() ==
          "test.yaml:3:14: unclosed quote: the value '127.0.0.1:4525 has no closing ' (YAML would read the rest "
          "of the file into it)");
  }
  SUBCASE("quotes inside words, comments and closed quotes are no mistake") {
    const auto result = load("# it's a \"comment\n"
                             "hostname: it's.example # don't\n"
                             "listeners:\n  - {name: in, address: \"127.0.0.1:2525\", upstream: up}\n"
                             "upstreams:\n  - {name: up, address: '127.0.0.1:25'}\n");
    INFO(all_errors(result));
    CHECK(result.errors.size() == 1);  // it's.example is no valid host name, and nothing else is wrong
  }
}

TEST_CASE("log.output") {
  const std::string base = "listeners:\n  - {name: in, address: \"127.0.0.1:2525\", upstream: up}\n"
                           "upstreams:\n  - {name: up, address: \"127.0.0.1:25\"}\n";
  const auto standard = load(base);
  REQUIRE(standard.config != nullptr);
  CHECK(standard.config->log.output == LogOutput::standard_error);
  const auto syslog = load(base + "log: {output: syslog}\n");
  REQUIRE(syslog.config != nullptr);
  CHECK(syslog.config->log.output == LogOutput::syslog);
  const auto bad = load(base + "log: {output: journal}\n");
  REQUIRE(bad.errors.size() == 1);
  CHECK(bad.errors[0].to_string() == "test.yaml:5:15: log.output: expected one of stderr, syslog, got \"journal\"");
}

TEST_CASE("tlsrpt.send with a listener or upstream named tlsrpt is a warning: the report mails share its series") {
  const std::string config = "listeners:\n  - {name: tlsrpt, address: \"127.0.0.1:2525\", upstream: tlsrpt}\n"
                             "upstreams:\n  - {name: tlsrpt, address: \"127.0.0.1:25\"}\n";
  const auto sending = load(config + "tlsrpt:\n  send: true\n");
  INFO(all_errors(sending), all_warnings(sending));
  REQUIRE(sending.errors.empty());
  REQUIRE(sending.warnings.size() == 2);
  CHECK(all_warnings(sending) ==
        "test.yaml:6:3: warning: tlsrpt.send: the report mails are counted as listener \"tlsrpt\", which is also "
        "the name of a configured listener: their metrics share series (rename the listener)\n"
        "test.yaml:6:3: warning: tlsrpt.send: the report mails are counted as upstream \"tlsrpt\", which is also "
        "the name of a configured upstream: their metrics share series (rename the upstream)\n");
  const auto quiet = load(config + "tlsrpt:\n  send: false\n");
  INFO(all_warnings(quiet));
  CHECK(quiet.errors.empty());
  CHECK(quiet.warnings.empty());
}

TEST_CASE("http.tls beside a listener named http with certificates is a warning: their expiry series mix") {
  Files f;
  const std::string tls = "tls: {certificates: [{cert: " + f.cert + ", key: " + f.key + "}]}";
  const std::string config = "listeners:\n  - {name: http, address: \"127.0.0.1:2525\", upstream: up, " +
                             tls + "}\nupstreams:\n  - {name: up, address: \"127.0.0.1:25\"}\n";
  const auto clash = load(config + "http:\n  tls: {cert: " + f.cert + ", key: " + f.key + "}\n");
  INFO(all_errors(clash), all_warnings(clash));
  REQUIRE(clash.errors.empty());
  CHECK(all_warnings(clash) ==
        "test.yaml:6:3: warning: http.tls: its certificate is exported as listener \"http\" in "
        "mailflow_certificate_expiry_timestamp_seconds, which is also the name of a configured listener with "
        "certificates: their series cannot be told apart (rename the listener)\n");
  const auto no_http_tls = load(config);
  INFO(all_warnings(no_http_tls));
  CHECK(no_http_tls.warnings.empty());
}

}  // namespace
}  // namespace mailflow::config
