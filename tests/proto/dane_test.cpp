// DANE for SMTP without I/O (proto/dane.hpp): TLSA RDATA, usability for SMTP, and what an RRset means for a host.
#include <doctest/doctest.h>

#include "proto/dane.hpp"

using namespace mailflow::proto;

namespace {

TlsaRecord record(int usage, int selector, int matching, std::size_t length) {
  return TlsaRecord{static_cast<std::uint8_t>(usage), static_cast<std::uint8_t>(selector),
                    static_cast<std::uint8_t>(matching), std::string(length, '\x5a')};
}

}  // namespace

TEST_CASE("TLSA RDATA: three octets of parameters, then the association data") {
  const auto parsed = parse_tlsa_rdata(std::string("\x03\x01\x01", 3) + std::string(32, '\xab'));
  REQUIRE(parsed);
  CHECK(parsed->usage == 3);
  CHECK(parsed->selector == 1);
  CHECK(parsed->matching == 1);
  CHECK(parsed->data == std::string(32, '\xab'));
  CHECK_FALSE(parse_tlsa_rdata(std::string("\x03\x01", 2)));
  CHECK(parse_tlsa_rdata(std::string("\x02\x00\x00", 3)));  // parsed, though unusable (no data)
}

TEST_CASE("usable for SMTP: DANE-TA and DANE-EE, known selector and matching type, digests of the right length") {
  CHECK(usable_for_smtp(record(3, 1, 1, 32)));
  CHECK(usable_for_smtp(record(2, 0, 2, 64)));
  CHECK(usable_for_smtp(record(3, 0, 0, 700)));
  CHECK_FALSE(usable_for_smtp(record(0, 1, 1, 32)));  // PKIX-TA
  CHECK_FALSE(usable_for_smtp(record(1, 1, 1, 32)));  // PKIX-EE
  CHECK_FALSE(usable_for_smtp(record(4, 1, 1, 32)));
  CHECK_FALSE(usable_for_smtp(record(3, 2, 1, 32)));  // unknown selector
  CHECK_FALSE(usable_for_smtp(record(3, 1, 3, 32)));  // unknown matching type
  CHECK_FALSE(usable_for_smtp(record(3, 1, 1, 31)));  // a SHA2-256 digest is 32 octets
  CHECK_FALSE(usable_for_smtp(record(3, 1, 2, 32)));  // a SHA2-512 digest is 64
  CHECK_FALSE(usable_for_smtp(record(3, 0, 0, 0)));
}

TEST_CASE("what a host's TLSA answer means (RFC 7672 2.2)") {
  TlsaAnswer secure_records{TlsaAnswer::Kind::records, true, {record(0, 1, 1, 32), record(3, 1, 1, 32)}};
  SUBCASE("insecure MX or address records: no TLSA lookup, no DANE") {
    CHECK(plan_dane(false, &secure_records).kind == DanePlan::Kind::none);
    CHECK(plan_dane(true, nullptr).kind == DanePlan::Kind::none);
  }
  SUBCASE("secure usable records: authenticate with the usable ones only") {
    const auto plan = plan_dane(true, &secure_records);
    CHECK(plan.kind == DanePlan::Kind::authenticate);
    REQUIRE(plan.records.size() == 1);
    CHECK(plan.records[0].usage == 3);
  }
  SUBCASE("secure records, none usable: TLS without authentication, still mandatory") {
    TlsaAnswer unusable{TlsaAnswer::Kind::records, true, {record(1, 1, 1, 32)}};
    CHECK(plan_dane(true, &unusable).kind == DanePlan::Kind::encrypt);
  }
  SUBCASE("insecure records do not count") {
    TlsaAnswer insecure = secure_records;
    insecure.secure = false;
    CHECK(plan_dane(true, &insecure).kind == DanePlan::Kind::none);
  }
  SUBCASE("no records: the upstream's other policy") {
    TlsaAnswer none{TlsaAnswer::Kind::none, true, {}};
    CHECK(plan_dane(true, &none).kind == DanePlan::Kind::none);
  }
  SUBCASE("a failed lookup (SERVFAIL, timeout, bogus): the host is not used") {
    TlsaAnswer failed{TlsaAnswer::Kind::failed, false, {}};
    CHECK(plan_dane(true, &failed).kind == DanePlan::Kind::skip);
  }
}
