#include <doctest/doctest.h>

#include "config/config.hpp"
#include "daemon/connector_match.hpp"

namespace {

using mailflow::MatchInput;
using mailflow::match_connector;

std::array<std::uint8_t, 16> v4(std::uint8_t a, std::uint8_t b, std::uint8_t c, std::uint8_t d) {
  return {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d};
}

std::shared_ptr<const mailflow::config::Config> load(const std::string& connectors) {
  const std::string yaml = R"(hostname: mx.test
state_dir: /tmp
listeners:
  - {name: in, address: "127.0.0.1:2525", direction: inbound, upstream: store}
  - {name: out, address: "127.0.0.1:2587", direction: outbound, upstream: store}
upstreams:
  - {name: store, address: "127.0.0.1:25", tls: none}
connectors:
)" + connectors;
  auto result = mailflow::config::load_config_string(yaml, "test.yaml");
  for (const auto& e : result.errors) MESSAGE(e.to_string());
  REQUIRE(result.errors.empty());
  return result.config;
}

}  // namespace

TEST_CASE("first matching connector wins, unmatched is internet") {
  auto config = load(R"(  - name: by-cidr
    type: partner
    match: {listener: in, client_cidrs: ["127.0.0.2/32"]}
  - name: by-domain
    type: partner
    match: {listener: in, sender_domains: ["contoso.com", "*.contoso.com"]}
  - name: by-ehlo-and-sni
    type: onpremises
    match: {listener: in, ehlo: ["*.corp.example"], sni: ["mx.test"]}
)");
  MatchInput input;
  input.listener = "in";
  input.client_address = v4(127, 0, 0, 2);
  input.sender_domain = "contoso.com";
  CHECK(match_connector(*config, input)->name == "by-cidr");

  input.client_address = v4(127, 0, 0, 1);
  CHECK(match_connector(*config, input)->name == "by-domain");
  input.sender_domain = "mail.contoso.com";
  CHECK(match_connector(*config, input)->name == "by-domain");
  input.sender_domain = "notcontoso.com";
  CHECK(match_connector(*config, input) == nullptr);

  input.ehlo = "host1.corp.example";
  CHECK(match_connector(*config, input) == nullptr);  // every given key must match: sni missing
  input.sni = "mx.test";
  CHECK(match_connector(*config, input)->name == "by-ehlo-and-sni");
}

TEST_CASE("a connector never matches traffic of the other direction") {
  auto config = load(R"(  - name: partner-out
    type: partner
    match: {listener: out}
)");
  MatchInput input;
  input.client_address = v4(127, 0, 0, 1);
  input.listener = "in";
  input.direction = mailflow::config::Direction::inbound;
  CHECK(match_connector(*config, input) == nullptr);
  input.listener = "out";
  input.direction = mailflow::config::Direction::outbound;
  REQUIRE(match_connector(*config, input) != nullptr);
  CHECK(match_connector(*config, input)->name == "partner-out");
}

TEST_CASE("recipient_domains: exact or *.suffix, case-insensitive, never an unknown domain") {
  auto config = load(R"(  - name: partner-contoso
    type: partner
    match: {listener: out, recipient_domains: ["Contoso.com", "*.contoso.com"]}
  - name: partner-fabrikam-from-apps
    type: partner
    match: {listener: out, sender_domains: ["apps.example"], recipient_domains: ["fabrikam.com"]}
)");
  MatchInput input;
  input.listener = "out";
  input.direction = mailflow::config::Direction::outbound;
  input.client_address = v4(10, 0, 0, 1);
  input.sender_domain = "example.org";

  // Before the first RCPT the recipient domain is unknown: a connector that needs one does not match.
  CHECK(match_connector(*config, input) == nullptr);
  input.recipient_domain = "contoso.com";
  REQUIRE(match_connector(*config, input) != nullptr);
  CHECK(match_connector(*config, input)->name == "partner-contoso");
  input.recipient_domain = "eu.mail.contoso.com";
  CHECK(match_connector(*config, input)->name == "partner-contoso");
  input.recipient_domain = "notcontoso.com";
  CHECK(match_connector(*config, input) == nullptr);
  input.recipient_domain = "contoso.com.evil.example";
  CHECK(match_connector(*config, input) == nullptr);

  // Every given key must match: the sender domain too.
  input.recipient_domain = "fabrikam.com";
  CHECK(match_connector(*config, input) == nullptr);
  input.sender_domain = "apps.example";
  REQUIRE(match_connector(*config, input) != nullptr);
  CHECK(match_connector(*config, input)->name == "partner-fabrikam-from-apps");
}

TEST_CASE("recipient_domains are stored lower-case and checked like sender_domains") {
  auto config = load(R"(  - name: p
    type: partner
    match: {listener: out, recipient_domains: [EU.Contoso.COM]}
)");
  REQUIRE(config->connectors.size() == 1);
  CHECK(config->connectors[0].match.recipient_domains == std::vector<std::string>{"eu.contoso.com"});
  MatchInput input;
  input.listener = "out";
  input.direction = mailflow::config::Direction::outbound;
  input.recipient_domain = "eu.contoso.com";
  CHECK(match_connector(*config, input) != nullptr);
}
