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

TEST_CASE("trust anchor file: a NUL byte in a record is an error, not a record cut short") {
  // ub_ctx_add_ta takes each record as a C string: one with a NUL byte would be loaded cut short (here a DS
  // whose digest ends at AB), a trust anchor that is not the one in the file. In a comment it changes
  // nothing.
  std::string error;
  using namespace std::string_view_literals;
  CHECK_FALSE(trust_anchor_records("example.org. IN DS 1 13 2 AB\0CD\n"sv, error).has_value());
  CHECK(error.find("NUL byte") != std::string::npos);
  const auto records = trust_anchor_records("; a comment \0 here\nexample.org. IN DS 1 13 2 ABCD\n"sv, error);
  REQUIRE(records.has_value());
  CHECK(*records == std::vector<std::string>{"example.org. IN DS 1 13 2 ABCD"});
}

}  // namespace
