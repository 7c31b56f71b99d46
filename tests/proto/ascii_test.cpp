// ASCII case folding of names (proto/ascii.hpp): only A-Z change, whatever the locale.
#include <doctest/doctest.h>

#include <string>

#include "proto/ascii.hpp"

namespace {

using mailflow::proto::ascii_lower;
using mailflow::proto::dns_name_key;

TEST_CASE("ascii_lower: A-Z only, every other byte as it was") {
  CHECK(ascii_lower("MX1.Example.NET") == "mx1.example.net");
  CHECK(ascii_lower("mailto:Reports@RPT.example") == "mailto:reports@rpt.example");
  CHECK(ascii_lower("@[]_09-z") == "@[]_09-z");
  CHECK(ascii_lower("\xC3\x84\xD6") == "\xC3\x84\xD6");  // bytes >= 0x80 are no letters here
  CHECK(ascii_lower("").empty());
}

TEST_CASE("dns_name_key: lower-case, without the trailing dot") {
  CHECK(dns_name_key("MX.Example.NET.") == "mx.example.net");
  CHECK(dns_name_key("mx.example.net") == "mx.example.net");
  CHECK(dns_name_key(".") == "");  // the root, as a null MX's exchange
  CHECK(dns_name_key("") == "");
}

}  // namespace
