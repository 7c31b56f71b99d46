// DANE (RFC 7672) from TLSA RDATA as DNS gives it: the first byte sets what the resolver said (host and TLSA
// answer DNSSEC-validated, lookup failed or empty), the rest is a list of RDATA, each a length byte and its
// bytes. A record is usable for SMTP exactly when RFC 7672 3.1 says so (DANE-TA or DANE-EE, selector 0 or 1,
// full data or a digest of the length its matching type gives); the plan authenticates with exactly the
// usable records in their order, encrypts without authentication when a secure RRset has none, skips the host
// when the lookup failed, and leaves DANE out when anything was not validated.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "proto/dane.hpp"

using namespace mailflow::proto;

namespace {

bool usable(std::string_view rdata) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(rdata[i]); };
  const std::size_t data = rdata.size() - 3;
  const bool digest_ok =
      (byte(2) == 0 && data > 0) || (byte(2) == 1 && data == 32) || (byte(2) == 2 && data == 64);
  return (byte(0) == 2 || byte(0) == 3) && byte(1) <= 1 && digest_ok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const unsigned flags = data[0];
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  TlsaAnswer answer;
  answer.kind = (flags & 3) == 0   ? TlsaAnswer::Kind::failed
                : (flags & 3) == 1 ? TlsaAnswer::Kind::none
                                   : TlsaAnswer::Kind::records;
  answer.secure = (flags & 4) != 0;
  const bool host_secure = (flags & 8) != 0;
  std::vector<TlsaRecord> expected;
  while (!rest.empty()) {
    const std::size_t length = std::min<std::size_t>(static_cast<unsigned char>(rest[0]), rest.size() - 1);
    const std::string_view rdata = rest.substr(1, length);
    rest.remove_prefix(1 + length);
    const auto record = parse_tlsa_rdata(rdata);
    FUZZ_CHECK(record.has_value() == (rdata.size() >= 3));
    if (!record) continue;
    FUZZ_CHECK(record->usage == static_cast<unsigned char>(rdata[0]));
    FUZZ_CHECK(record->selector == static_cast<unsigned char>(rdata[1]));
    FUZZ_CHECK(record->matching == static_cast<unsigned char>(rdata[2]));
    FUZZ_CHECK(record->data == rdata.substr(3));
    FUZZ_CHECK(usable_for_smtp(*record) == usable(rdata));
    if (answer.kind == TlsaAnswer::Kind::records) answer.records.push_back(*record);
    if (usable(rdata)) expected.push_back(*record);
  }
  const DanePlan plan = plan_dane(host_secure, (flags & 16) ? nullptr : &answer);
  FUZZ_CHECK(!plan.why.empty());
  if (!host_secure || (flags & 16) || answer.kind == TlsaAnswer::Kind::none ||
      (answer.kind == TlsaAnswer::Kind::records && !answer.secure)) {
    FUZZ_CHECK(plan.kind == DanePlan::Kind::none);
  } else if (answer.kind == TlsaAnswer::Kind::failed) {
    FUZZ_CHECK(plan.kind == DanePlan::Kind::skip);
  } else if (expected.empty()) {
    FUZZ_CHECK(plan.kind == DanePlan::Kind::encrypt);
  } else {
    FUZZ_CHECK(plan.kind == DanePlan::Kind::authenticate);
    FUZZ_CHECK(plan.records.size() == expected.size());
    for (std::size_t i = 0; i < expected.size(); ++i) {
      FUZZ_CHECK(
          plan.records[i].usage == expected[i].usage && plan.records[i].selector == expected[i].selector &&
          plan.records[i].matching == expected[i].matching && plan.records[i].data == expected[i].data);
    }
  }
  if (plan.kind != DanePlan::Kind::authenticate) FUZZ_CHECK(plan.records.empty());
  return 0;
}
