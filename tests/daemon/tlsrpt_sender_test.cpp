// TLS-RPT sending, the parts without I/O: the retry bookkeeping (TlsRptLedger), rua URIs and dot-stuffing.
// The deliveries themselves run against real servers in tests/integration/test_tlsrpt_send.py.
#include <doctest/doctest.h>

#include <chrono>

#include "daemon/tlsrpt_ledger.hpp"
#include "daemon/tlsrpt_sender.hpp"

using mailflow::TlsRptDelivery;
using mailflow::TlsRptLedger;
using Kind = TlsRptLedger::Verdict::Kind;
using namespace std::chrono_literals;

namespace {
const TlsRptLedger::Key day{"2026-01-02", "a.example.net"};
const std::vector<std::string> rua{"mailto:r@a.example.net", "https://r.a.example.net/v1"};
}  // namespace

TEST_CASE("ledger: a report every rua took is done, and only the failed rua are tried again") {
  TlsRptLedger ledger;
  CHECK(ledger.to_try(day, rua) == rua);
  auto verdict = ledger.record(day, rua, {{rua[0], TlsRptDelivery::success}, {rua[1], TlsRptDelivery::temporary_failure}},
                               1000, 24h);
  CHECK(verdict.kind == Kind::retry);
  CHECK(ledger.to_try(day, rua) == std::vector<std::string>{rua[1]});
  verdict = ledger.record(day, rua, {{rua[1], TlsRptDelivery::success}}, 4600, 24h);
  CHECK(verdict.kind == Kind::done);
  CHECK(ledger.size() == 0);
  CHECK(ledger.to_try(day, rua) == rua);  // forgotten: a new report of that key starts over
}

TEST_CASE("ledger: a permanent refusal finishes that rua, without retries") {
  TlsRptLedger ledger;
  const auto verdict = ledger.record(
      day, rua, {{rua[0], TlsRptDelivery::permanent_failure}, {rua[1], TlsRptDelivery::success}}, 1000, 24h);
  CHECK(verdict.kind == Kind::done);
  CHECK(verdict.given_up.empty());
}

TEST_CASE("ledger: still failing retry_for after the first try: given up, with the rua that never took it") {
  TlsRptLedger ledger;
  const std::int64_t first = 1'000'000;
  CHECK(ledger.record(day, rua, {{rua[0], TlsRptDelivery::temporary_failure}, {rua[1], TlsRptDelivery::success}},
                      first, 24h)
            .kind == Kind::retry);
  // Hourly retries: the last one before the bound is still a retry; the first at or past it gives up.
  CHECK(ledger.record(day, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, first + 23 * 3600, 24h).kind ==
        Kind::retry);
  const auto verdict = ledger.record(day, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, first + 24 * 3600, 24h);
  CHECK(verdict.kind == Kind::gave_up);
  CHECK(verdict.given_up == std::vector<std::string>{rua[0]});
  CHECK(ledger.size() == 0);
}

TEST_CASE("ledger: retry_for 0 gives up at the first temporary failure, reports keep their own clocks") {
  TlsRptLedger ledger;
  const TlsRptLedger::Key other{"2026-01-03", "a.example.net"};
  CHECK(ledger.record(day, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 50, 0s).kind == Kind::gave_up);
  CHECK(ledger.record(other, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 100, 10s).kind == Kind::retry);
  CHECK(ledger.record(other, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 109, 10s).kind == Kind::retry);
  CHECK(ledger.record(other, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 110, 10s).kind == Kind::gave_up);
}

TEST_CASE("ledger: reports that left the store are forgotten") {
  TlsRptLedger ledger;
  const TlsRptLedger::Key other{"2026-01-03", "b.example"};
  ledger.record(day, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 1, 24h);
  ledger.record(other, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 1, 24h);
  CHECK(ledger.size() == 2);
  ledger.keep_only({other});
  CHECK(ledger.size() == 1);
  CHECK(ledger.to_try(day, rua) == rua);
}

TEST_CASE("parse_rua: mailto and https URIs as RFC 8460 section 3 writes them") {
  using mailflow::parse_rua;
  using Method = mailflow::RuaTarget::Method;
  auto mail = parse_rua("mailto:TLS-Reports%40x@Example.NET?subject=hi");
  CHECK(mail.valid);
  CHECK(mail.method == Method::mailto);
  CHECK(mail.address == "TLS-Reports@x@Example.NET");
  CHECK(mail.domain == "example.net");
  CHECK(parse_rua("mailto:reports@a.example").address == "reports@a.example");
  CHECK_FALSE(parse_rua("mailto:no-domain").valid);
  CHECK_FALSE(parse_rua("mailto:bad%zzescape@a.example").valid);
  CHECK_FALSE(parse_rua("mailto:@a.example").valid);

  auto web = parse_rua("https://Reports.Example.net:8443/v1/tlsrpt?x=1#frag");
  CHECK(web.valid);
  CHECK(web.method == Method::https);
  CHECK(web.host == "reports.example.net");
  CHECK(web.port == "8443");
  CHECK(web.target == "/v1/tlsrpt?x=1");
  auto plain = parse_rua("https://reports.example.net");
  CHECK(plain.valid);
  CHECK(plain.port == "443");
  CHECK(plain.target == "/");
  auto v6 = parse_rua("https://[2001:db8::1]:444/r");
  CHECK(v6.valid);
  CHECK(v6.host == "2001:db8::1");
  CHECK(v6.port == "444");
  CHECK_FALSE(parse_rua("https://user:pw@reports.example.net/").valid);
  CHECK_FALSE(parse_rua("https://reports.example.net:0/").valid);
  CHECK_FALSE(parse_rua("https://reports.example.net:99999/").valid);
  CHECK_FALSE(parse_rua("http://reports.example.net/").valid);
}

TEST_CASE("dot_stuff_for_data: leading dots doubled, the terminator appended") {
  using mailflow::dot_stuff_for_data;
  CHECK(dot_stuff_for_data("a\r\n.b\r\n..c\r\n") == "a\r\n..b\r\n...c\r\n.\r\n");
  CHECK(dot_stuff_for_data(".first\r\nlast") == "..first\r\nlast\r\n.\r\n");
  CHECK(dot_stuff_for_data("x.y\r\n") == "x.y\r\n.\r\n");
}
