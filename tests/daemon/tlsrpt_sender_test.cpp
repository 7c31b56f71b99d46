// TLS-RPT sending, the parts without I/O: the retry bookkeeping (TlsRptLedger) and its state file text, rua
// URIs and dot-stuffing.
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
  // Kept, nothing left to try, until the store forgot it too (a crash between the two must not resend it).
  CHECK(ledger.size() == 1);
  CHECK(ledger.to_try(day, rua).empty());
  CHECK(ledger.record(day, rua, {}, 4700, 24h).kind == Kind::done);
  CHECK(ledger.keep_only({}, "2026-01-03") == 1);
  CHECK(ledger.to_try(day, rua) == rua);  // forgotten: a new report of that key starts over
}

TEST_CASE("ledger: a report sent and gone from the store stays sent while the store may hold its day again") {
  // The clock is stepped back over midnight after the day's report went out: the store records sessions for
  // that day again. Its report must not go out a second time (RFC 8460 section 4: one report per UTC day).
  TlsRptLedger ledger;
  REQUIRE(ledger
              .record(day, rua,
                      {{rua[0], TlsRptDelivery::success}, {rua[1], TlsRptDelivery::permanent_failure}}, 1000,
                      24h)
              .kind == Kind::done);
  CHECK(ledger.keep_only({}, "2025-12-18") == 0);  // the store forgot it, 2026-01-02 may come back
  CHECK(ledger.to_try(day, rua).empty());
  CHECK(ledger.record(day, rua, {}, 90000, 24h).kind == Kind::done);
  std::string error;
  const auto loaded = TlsRptLedger::parse(ledger.serialize(), error);  // and after a restart
  REQUIRE(loaded);
  CHECK(loaded->to_try(day, rua).empty());
  CHECK(ledger.keep_only({}, "2026-01-03") == 1);  // past max_days: the store cannot hold that day any more
  CHECK(ledger.to_try(day, rua) == rua);
}

TEST_CASE("ledger: a rua that took the report is in the saved text at once, before the other rua are tried") {
  TlsRptLedger ledger;
  ledger.tried(day, rua[0], TlsRptDelivery::success, 1000);
  std::string error;
  const auto loaded = TlsRptLedger::parse(ledger.serialize(), error);  // a crash while rua[1] is being tried
  REQUIRE(loaded.has_value());
  CHECK(loaded->to_try(day, rua) == std::vector<std::string>{rua[1]});
  // The first try's time is that of the first rua tried: retry_for counts from it.
  CHECK(ledger.verdict(day, rua, 1000 + 24 * 3600, 24h).kind == Kind::gave_up);
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
  // Kept with nothing left to try until the store forgot it: neither rua gets it again, none is given up twice.
  CHECK(ledger.to_try(day, rua).empty());
  const auto again = ledger.record(day, rua, {}, first + 25 * 3600, 24h);
  CHECK(again.kind == Kind::done);
  CHECK(again.given_up.empty());
  CHECK(ledger.keep_only({}, "2026-01-03") == 1);
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
  ledger.keep_only({other}, "2026-01-03");
  CHECK(ledger.size() == 1);
  CHECK(ledger.to_try(day, rua) == rua);
}

TEST_CASE("ledger: serialize and parse give back which rua took each report and when its first try was") {
  TlsRptLedger ledger;
  const TlsRptLedger::Key other{"2026-01-03", "b.example"};
  // A rua with characters the state file encodes (space, comma, percent, a line break).
  const std::vector<std::string> odd{"mailto:a%2Cb@b.example?subject=x y", "https://r.b.example/p,q\nr"};
  ledger.record(day, rua, {{rua[0], TlsRptDelivery::success}, {rua[1], TlsRptDelivery::temporary_failure}},
                1000, 24h);
  ledger.record(other, odd,
                {{odd[0], TlsRptDelivery::permanent_failure}, {odd[1], TlsRptDelivery::temporary_failure}},
                2000, 24h);
  ledger.record({"2026-01-04", "c.example"}, rua, {{rua[0], TlsRptDelivery::temporary_failure}}, 3000, 24h);
  const std::string text = ledger.serialize();
  CHECK(text.starts_with("mailflowd-tlsrpt-ledger 2\n"));
  CHECK(text.ends_with("\nend\n"));
  std::string error;
  auto loaded = TlsRptLedger::parse(text, error);
  REQUIRE_MESSAGE(loaded, error);
  CHECK(loaded->size() == 3);
  CHECK(loaded->serialize() == text);
  CHECK(loaded->to_try(day, rua) == std::vector<std::string>{rua[1]});  // rua[0] took it: not again
  CHECK(loaded->to_try(other, odd) == std::vector<std::string>{odd[1]});
  CHECK(loaded->to_try({"2026-01-04", "c.example"}, rua) == rua);
  // The first try's time came along: given up 24h after it, not 24h after the load.
  CHECK(loaded->record(day, rua, {{rua[1], TlsRptDelivery::temporary_failure}}, 1000 + 24 * 3600 - 1, 24h)
            .kind == Kind::retry);
  CHECK(loaded->record(day, rua, {{rua[1], TlsRptDelivery::temporary_failure}}, 1000 + 24 * 3600, 24h).kind ==
        Kind::gave_up);

  auto empty = TlsRptLedger::parse(TlsRptLedger().serialize(), error);
  REQUIRE(empty);
  CHECK(empty->size() == 0);
}

TEST_CASE("ledger: parse refuses what serialize never writes, and says which line") {
  const std::string header = "mailflowd-tlsrpt-ledger 1\n";
  const std::string good = "report 2026-01-02 a.example.net 1000 mailto:r@a.example.net\n";
  const std::pair<std::string, std::string> cases[] = {
      {"", "empty file"},
      {"mailflowd-tlsrpt 1\n" + good, "line 1: not a mailflowd TLS-RPT ledger"},
      {header + good.substr(0, good.size() - 1), "line 2: no line end"},  // cut short by a full disk
      {header + "report 2026-01-02 a.example.net 1000\n", "line 2: unexpected line"},
      {header + good + "day 2026-01-02 a.example.net 1000 -\n", "line 3: unexpected line"},
      {header + "report 2026-1-2 a.example.net 1000 -\n", "line 2: malformed report"},
      {header + "report 2026-01-02 - 1000 -\n", "line 2: malformed report"},  // no domain
      {header + "report 2026-01-02 a.example.net -5 -\n", "line 2: malformed report"},
      {header + "report 2026-01-02 a.example.net 9999999999999999999 -\n", "line 2: malformed report"},
      {header + "report 2026-01-02 a.example.net 1000 mailto:%G0\n", "line 2: malformed report"},
      {header + good + good, "line 3: reports out of order or repeated"},
      {header + "report 2026-01-03 a.example.net 1000 -\n" + good,
       "line 3: reports out of order or repeated"},
  };
  for (const auto& [text, why] : cases) {
    CAPTURE(text);
    std::string error;
    CHECK_FALSE(TlsRptLedger::parse(text, error));
    CHECK(error.starts_with(why));
  }
  std::string error;
  CHECK(TlsRptLedger::parse(header + good, error));
}

TEST_CASE("ledger: a file cut at any byte is refused, never read as fewer reports") {
  // A ledger that lost its last entries (a full disk, a copy cut short at a line end) would send those
  // reports again to every rua that already took them.
  TlsRptLedger ledger;
  ledger.record(day, rua, {{rua[0], TlsRptDelivery::success}}, 1000, 24h);
  ledger.record({"2026-01-04", "c.example"}, rua, {{rua[0], TlsRptDelivery::success}}, 3000, 24h);
  const std::string whole = ledger.serialize();
  for (std::size_t cut = 0; cut < whole.size(); ++cut) {
    CAPTURE(whole.substr(0, cut));
    std::string error;
    CHECK_FALSE(TlsRptLedger::parse(whole.substr(0, cut), error));
    CHECK_FALSE(error.empty());
  }
  std::string error;
  CHECK(TlsRptLedger::parse(whole, error));
}

TEST_CASE("ledger: a loaded ledger drops the reports that left the store at the first keep_only") {
  TlsRptLedger ledger;
  const TlsRptLedger::Key old{"2025-12-01", "a.example.net"};
  ledger.record(old, rua, {{rua[0], TlsRptDelivery::success}}, 1, 24h);
  ledger.record(day, rua, {{rua[0], TlsRptDelivery::success}}, 2, 24h);
  std::string error;
  auto loaded = TlsRptLedger::parse(ledger.serialize(), error);
  REQUIRE(loaded);
  CHECK(loaded->keep_only({day}, "2026-01-02") == 1);
  CHECK(loaded->keep_only({day}, "2026-01-02") == 0);
  CHECK(loaded->size() == 1);
  CHECK(loaded->serialize().find("2025-12-01") == std::string::npos);
  CHECK(loaded->to_try(old, rua) == rua);
  CHECK(loaded->to_try(day, rua) == std::vector<std::string>{rua[1]});
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
  auto fq = parse_rua("mailto:reports@Example.NET.");  // the root's dot: the same domain, left out
  CHECK(fq.valid);
  CHECK(fq.address == "reports@Example.NET");
  CHECK(fq.domain == "example.net");
  CHECK_FALSE(parse_rua("mailto:reports@.").valid);
  CHECK_FALSE(parse_rua("mailto:no-domain").valid);
  CHECK_FALSE(parse_rua("mailto:bad%zzescape@a.example").valid);
  CHECK_FALSE(parse_rua("mailto:@a.example").valid);

  auto web = parse_rua("https://Reports.Example.net:8443/v1/tlsrpt?x=1#frag");
  CHECK(web.valid);
  CHECK(web.method == Method::https);
  CHECK(web.host == "reports.example.net");
  CHECK(web.port == "8443");
  CHECK(web.target == "/v1/tlsrpt?x=1");
  auto fqdn = parse_rua("https://Reports.Example.net.:8443/v1");  // the root's dot: the same host
  CHECK(fqdn.valid);
  CHECK(fqdn.host == "reports.example.net");
  CHECK(parse_rua("https://reports.example.net./").host == "reports.example.net");
  CHECK_FALSE(parse_rua("https://./").valid);
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

TEST_CASE(
    "ledger: a rua not tried in the run is not given up with the others, and the report is kept for it") {
  TlsRptLedger ledger;
  const std::int64_t first = 1'000'000;
  // retry_for 0: rua[1] tried and failed, rua[0] skipped (its destination timed out earlier in the run).
  ledger.tried(day, rua[1], TlsRptDelivery::temporary_failure, first);
  const auto verdict = ledger.verdict(day, rua, first, 0s, {rua[0]});
  CHECK(verdict.kind == Kind::retry);
  CHECK(verdict.given_up == std::vector<std::string>{rua[1]});
  CHECK(ledger.to_try(day, rua) == std::vector<std::string>{rua[0]});
  // Its try at the next run: failing, it is given up then.
  ledger.tried(day, rua[0], TlsRptDelivery::temporary_failure, first + 60);
  const auto next = ledger.verdict(day, rua, first + 60, 0s);
  CHECK(next.kind == Kind::gave_up);
  CHECK(next.given_up == std::vector<std::string>{rua[0]});
}
