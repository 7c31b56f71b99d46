// CIDRs, globs, durations, names of enums, error text.
#include <doctest/doctest.h>

#include "config/config.hpp"

namespace mailflow::config {
namespace {

std::array<std::uint8_t, 16> ip(std::string_view text) {
  const auto address = parse_ip_address(text);
  REQUIRE(address.has_value());
  return *address;
}

TEST_CASE("Cidr::parse") {
  const auto v4 = Cidr::parse("203.0.113.0/24");
  REQUIRE(v4);
  CHECK(v4->prefix == 24 + 96);
  CHECK(v4->network[10] == 0xff);
  CHECK(v4->network[11] == 0xff);
  CHECK(v4->network[12] == 203);
  CHECK(v4->to_string() == "203.0.113.0/24");

  const auto v6 = Cidr::parse("2001:db8::/32");
  REQUIRE(v6);
  CHECK(v6->prefix == 32);
  CHECK(v6->to_string() == "2001:db8::/32");

  CHECK(Cidr::parse("::1")->prefix == 128);
  CHECK(Cidr::parse("192.0.2.7")->prefix == 128);
  CHECK(Cidr::parse("192.0.2.7")->to_string() == "192.0.2.7/32");
  CHECK(Cidr::parse("0.0.0.0/0")->to_string() == "0.0.0.0/0");
  CHECK(Cidr::parse("::/0")->prefix == 0);
  // Host bits are cleared.
  CHECK(Cidr::parse("203.0.113.77/24")->to_string() == "203.0.113.0/24");
  CHECK(Cidr::parse("2001:db8::1/32") == Cidr::parse("2001:db8::/32"));

  for (const char* bad :
       {"", "/24", "10.0.0.0/", "10.0.0.0/33", "::/129", "10.0.0/8", "300.0.0.0/8", "10.0.0.0/-1",
        "10.0.0.0/+8", "10.0.0.0/8/8", "example.org/24", "10.0.0.0 /8", "10.0.0.0/0008", "[::1]/128"}) {
    CAPTURE(bad);
    CHECK_FALSE(Cidr::parse(bad).has_value());
  }
}

TEST_CASE("Cidr::contains") {
  const auto net = *Cidr::parse("203.0.113.0/24");
  CHECK(net.contains(ip("203.0.113.0")));
  CHECK(net.contains(ip("203.0.113.255")));
  CHECK_FALSE(net.contains(ip("203.0.114.0")));
  CHECK_FALSE(net.contains(ip("203.0.112.255")));
  // IPv4 networks match IPv4-mapped IPv6 addresses (what a dual-stack socket reports) and nothing else.
  CHECK(net.contains(ip("::ffff:203.0.113.9")));
  CHECK_FALSE(net.contains(ip("2001:db8::1")));
  CHECK_FALSE(net.contains(ip("::cb00:7109")));  // IPv4-compatible (not mapped) form

  const auto odd = *Cidr::parse("10.0.0.0/9");
  CHECK(odd.contains(ip("10.127.255.255")));
  CHECK_FALSE(odd.contains(ip("10.128.0.0")));

  const auto v6 = *Cidr::parse("2001:db8:1::/48");
  CHECK(v6.contains(ip("2001:db8:1:ffff::1")));
  CHECK_FALSE(v6.contains(ip("2001:db8:2::1")));

  const auto any4 = *Cidr::parse("0.0.0.0/0");
  CHECK(any4.contains(ip("1.2.3.4")));
  CHECK_FALSE(any4.contains(ip("2001:db8::1")));
  const auto any = *Cidr::parse("::/0");
  CHECK(any.contains(ip("1.2.3.4")));
  CHECK(any.contains(ip("2001:db8::1")));

  const auto host = *Cidr::parse("127.0.0.2/32");
  CHECK(host.contains(ip("127.0.0.2")));
  CHECK_FALSE(host.contains(ip("127.0.0.1")));
}

TEST_CASE("parse_ip_address") {
  CHECK(ip("192.0.2.1") == ip("::ffff:192.0.2.1"));
  CHECK_FALSE(parse_ip_address("192.0.2").has_value());
  CHECK_FALSE(parse_ip_address("[::1]").has_value());
  CHECK_FALSE(parse_ip_address("").has_value());
  CHECK_FALSE(parse_ip_address("mail.example.org").has_value());
}

TEST_CASE("glob_match") {
  CHECK(glob_match("*.contoso.com", "mx1.contoso.com"));
  CHECK(glob_match("*.contoso.com", "a.b.contoso.com"));
  CHECK_FALSE(glob_match("*.contoso.com", "contoso.com"));
  CHECK_FALSE(glob_match("*.contoso.com", "evilcontoso.com"));
  CHECK(glob_match("*.Contoso.COM", "MX1.contoso.com"));
  CHECK(glob_match("mx1.example.org", "MX1.EXAMPLE.ORG"));
  CHECK_FALSE(glob_match("mx1.example.org", "mx1.example.org.evil"));
  CHECK(glob_match("*", ""));
  CHECK(glob_match("*", "anything"));
  CHECK(glob_match("", ""));
  CHECK_FALSE(glob_match("", "a"));
  CHECK(glob_match("mx*.example.*", "mx12.example.net"));
  CHECK_FALSE(glob_match("mx*.example.*", "smtp.example.net"));
  CHECK(glob_match("a**b", "ab"));
  CHECK(glob_match("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab"));
  CHECK_FALSE(glob_match("*a*a*a*a*a*a*b", std::string(5000, 'a')));  // linear, not exponential
  CHECK_FALSE(glob_match("?", "a"));                                  // only '*' is special
  CHECK(glob_match("?", "?"));
}

TEST_CASE("durations") {
  using std::chrono::milliseconds;
  CHECK(parse_duration("250ms") == milliseconds(250));
  CHECK(parse_duration("30s") == milliseconds(30'000));
  CHECK(parse_duration("5m") == milliseconds(300'000));
  CHECK(parse_duration("1h") == milliseconds(3'600'000));
  CHECK(parse_duration("7d") == milliseconds(7 * 86'400'000LL));
  CHECK(parse_duration("1h30m") == milliseconds(5'400'000));
  CHECK(parse_duration("0") == milliseconds(0));
  CHECK(parse_duration("0s") == milliseconds(0));
  for (const char* bad :
       {"", "30", "s", "30 s", "-5s", "1.5s", "30S", "5min", "1y", "10h5", "99999999999999d"}) {
    CAPTURE(bad);
    CHECK_FALSE(parse_duration(bad).has_value());
  }
  CHECK(format_duration(milliseconds(0)) == "0s");
  CHECK(format_duration(milliseconds(250)) == "250ms");
  CHECK(format_duration(milliseconds(90'000)) == "1m30s");
  CHECK(format_duration(std::chrono::hours(24 * 7)) == "7d");
  CHECK(format_duration(std::chrono::hours(36)) == "1d12h");
}

TEST_CASE("enum names") {
  CHECK(to_string(Direction::inbound) == "inbound");
  CHECK(to_string(Direction::outbound) == "outbound");
  CHECK(to_string(ConnectorType::partner) == "partner");
  CHECK(to_string(ConnectorType::onpremises) == "onpremises");
  CHECK(to_string(ConnectorType::internet) == "internet");
  CHECK(to_string(UpstreamTls::none) == "none");
  CHECK(to_string(UpstreamTls::opportunistic) == "opportunistic");
  CHECK(to_string(UpstreamTls::required) == "required");
  CHECK(to_string(UpstreamTls::verify) == "verify");
  CHECK(to_string(LogFormat::json) == "json");
}

TEST_CASE("ConfigError::to_string") {
  CHECK(ConfigError{"a.yaml", 3, 7, "boom"}.to_string() == "a.yaml:3:7: boom");
  CHECK(ConfigError{"a.yaml", 0, 0, "cannot read"}.to_string() == "a.yaml: cannot read");
}

}  // namespace
}  // namespace mailflow::config
