// The DNSSEC trust anchor file split into records (proto/trust_anchor.hpp).
#include <doctest/doctest.h>

#include "proto/trust_anchor.hpp"

using namespace mailflow::proto;

namespace {

TEST_CASE("trust anchor file: one string per record, parentheses joined, comments and empty lines left out") {
  std::string error;
  const auto records = trust_anchor_records(
      "; autotrust trust anchor file\n"
      ";;id: . 1\n"
      "\n"
      ". 86400 IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n"
      "example.net. 3600 IN DNSKEY 257 3 13 ( AbCd\n"
      "        EfGh ) ; KSK; key id = 1\n"
      "example.org. IN DS 1 13 2 ABCD ;;state=2 [ VALID ]\r\n",
      error);
  REQUIRE(records.has_value());
  REQUIRE(records->size() == 3);
  CHECK((*records)[0] ==
        ". 86400 IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D");
  CHECK((*records)[1] == "example.net. 3600 IN DNSKEY 257 3 13   AbCd         EfGh");
  CHECK((*records)[2] == "example.org. IN DS 1 13 2 ABCD");
  CHECK_FALSE(trust_anchor_records("$ORIGIN example.net.\n@ IN DS 1 13 2 ABCD\n", error).has_value());
  CHECK(error.find("$ directive") != std::string::npos);
  CHECK(trust_anchor_records("; nothing\n\n", error)->empty());
}

}  // namespace
