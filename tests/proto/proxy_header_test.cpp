#include "proto/proxy_header.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "split_helpers.hpp"

using namespace mailflow::proto;
using mailflow::test::printable;

namespace {

const std::string v2_sig("\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A", 12);

std::string v2(unsigned char ver_cmd, unsigned char fam, const std::string& body) {
  std::string h = v2_sig;
  h.push_back(static_cast<char>(ver_cmd));
  h.push_back(static_cast<char>(fam));
  h.push_back(static_cast<char>(body.size() >> 8));
  h.push_back(static_cast<char>(body.size() & 0xFF));
  return h + body;
}

std::string bytes(std::initializer_list<int> list) {
  std::string s;
  for (int b : list) s.push_back(static_cast<char>(b));
  return s;
}

std::string tlv(int type, const std::string& value) {
  return bytes({type, static_cast<int>(value.size() >> 8), static_cast<int>(value.size() & 0xFF)}) + value;
}

// Every proper prefix of a valid header must be "incomplete" (never invalid, never complete), and the whole
// header followed by SMTP bytes must be complete with exactly the header consumed.
ProxyParseResult check_valid(const std::string& header) {
  for (std::size_t i = 0; i < header.size(); ++i) {
    const auto r = parse_proxy_header(std::string_view(header).substr(0, i));
    INFO("prefix of " << printable(header) << " length " << i << " error " << r.error);
    REQUIRE(r.status == ProxyStatus::incomplete);
  }
  const auto r = parse_proxy_header(header + "EHLO x\r\n");
  INFO(printable(header) << " error " << r.error);
  REQUIRE(r.status == ProxyStatus::complete);
  CHECK(r.consumed == header.size());
  CHECK(looks_like_proxy_header(header));
  return r;
}

void check_invalid(const std::string& input) {
  const auto r = parse_proxy_header(input);
  INFO(printable(input));
  CHECK(r.status == ProxyStatus::invalid);
  CHECK_FALSE(r.error.empty());
}

}  // namespace

TEST_CASE("PROXY v1: TCP4, TCP6, UNKNOWN") {
  auto r = check_valid("PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n");
  CHECK(r.header.version == 1);
  CHECK_FALSE(r.header.local);
  CHECK(r.header.source_address == "192.0.2.1");
  CHECK(r.header.destination_address == "198.51.100.7");
  CHECK(r.header.source_port == 56324);
  CHECK(r.header.destination_port == 25);

  r = check_valid("PROXY TCP6 2001:DB8::1 2001:db8:0:0::2 65535 0\r\n");
  CHECK(r.header.source_address == "2001:db8::1");  // canonical form
  CHECK(r.header.destination_address == "2001:db8::2");
  CHECK(r.header.source_port == 65535);
  CHECK(r.header.destination_port == 0);

  r = check_valid("PROXY UNKNOWN\r\n");
  CHECK(r.header.local);
  CHECK(r.header.version == 1);
  r = check_valid("PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n");
  CHECK(r.header.local);
}

TEST_CASE("PROXY v1: the longest header is 107 octets") {
  const std::string longest =
      "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 "
      "65535\r\n";
  REQUIRE(longest.size() == 104);
  check_valid(longest);
  check_invalid("PROXY UNKNOWN " + std::string(100, 'x') + "\r\n");
  // No LF within 107 octets: invalid at once, without waiting for more.
  check_invalid("PROXY UNKNOWN " + std::string(93, 'x'));
  CHECK(parse_proxy_header("PROXY UNKNOWN " + std::string(92, 'x')).status == ProxyStatus::incomplete);
}

TEST_CASE("PROXY v1: malformed headers") {
  check_invalid("PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\n");     // bare LF
  check_invalid("PROXY TCP4 192.0.2.1 198.51.100.7 56324 25 \r\n");  // extra field
  check_invalid("PROXY TCP4 192.0.2.1 198.51.100.7 56324\r\n");      // missing field
  check_invalid("PROXY TCP4 192.0.2.256 198.51.100.7 1 2\r\n");
  check_invalid("PROXY TCP4 2001:db8::1 198.51.100.7 1 2\r\n");  // family mismatch
  check_invalid("PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n");
  check_invalid("PROXY TCP4 192.0.2.1 198.51.100.7 65536 25\r\n");
  check_invalid("PROXY TCP4 192.0.2.1 198.51.100.7 025 25\r\n");
  check_invalid("PROXY TCP4 192.0.2.1  198.51.100.7 1 2\r\n");
  check_invalid("PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n");
  check_invalid("PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n");
  check_invalid("PROXY \r\n");
  // Found by fuzz_proxy: inet_pton stops at a NUL, so an embedded NUL must not shorten the address.
  check_invalid(std::string("PROXY TCP6 208::1 2001:db8::2\0\0\0\0 65535 25\r\n", 44));
  // Garbage is refused as soon as it cannot become a header.
  check_invalid("PROXY TCP5");
  check_invalid("PROXY TCP4 192.0.2.1 hello");
  check_invalid("PROXY TCP4 1 2 3 4 5 6");
  check_invalid("PROXY TCP4 192.0.2.1\r198");
  check_invalid("PROXX");
  check_invalid("EHLO client\r\n");
  check_invalid("GET / HTTP/1.0\r\n");
  check_invalid(std::string(1, '\0'));
}

TEST_CASE("PROXY v2: PROXY over IPv4 and IPv6, TLVs skipped") {
  const std::string v4 = bytes({192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x00, 0x19});
  auto r = check_valid(v2(0x21, 0x11, v4));
  CHECK(r.header.version == 2);
  CHECK_FALSE(r.header.local);
  CHECK(r.header.source_address == "192.0.2.1");
  CHECK(r.header.destination_address == "198.51.100.7");
  CHECK(r.header.source_port == 56324);
  CHECK(r.header.destination_port == 25);

  r = check_valid(v2(0x21, 0x11, v4 + tlv(0x01, "smtp") + tlv(0x04, "") + tlv(0x20, std::string(40, 'x'))));
  CHECK(r.header.source_address == "192.0.2.1");
  CHECK(r.consumed == 16 + 12 + 7 + 3 + 43);

  std::string v6 = bytes({0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1});
  v6 += bytes({0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2});
  v6 += bytes({0x01, 0xBB, 0x00, 0x19});
  r = check_valid(v2(0x21, 0x21, v6));
  CHECK(r.header.source_address == "2001:db8::1");
  CHECK(r.header.destination_address == "2001:db8::2");
  CHECK(r.header.source_port == 443);
  CHECK(r.header.destination_port == 25);
}

TEST_CASE("PROXY v2: LOCAL, UNSPEC and UNIX mean: use the socket's address") {
  auto r = check_valid(v2(0x20, 0x00, ""));
  CHECK(r.header.local);
  r = check_valid(v2(0x20, 0x11, bytes({1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2})));  // LOCAL ignores addresses
  CHECK(r.header.local);
  CHECK(r.header.source_address.empty());
  r = check_valid(v2(0x21, 0x00, ""));
  CHECK(r.header.local);
  r = check_valid(v2(0x21, 0x31, std::string(216, '\0')));
  CHECK(r.header.local);
}

TEST_CASE("PROXY v2: truncated, oversized, garbage") {
  const std::string v4 = bytes({192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0, 2});
  check_invalid(v2(0x21, 0x11, v4.substr(0, 8)));           // address block shorter than INET needs
  check_invalid(v2(0x21, 0x31, std::string(10, '\0')));     // ... than UNIX needs (216 octets)
  check_invalid(v2(0x21, 0x31, ""));
  check_invalid(v2(0x21, 0x11, v4 + bytes({0x01, 0x00})));  // TLV header cut
  check_invalid(v2(0x21, 0x11, v4 + bytes({0x01, 0x00, 0x05, 'a'})));  // TLV value cut
  check_invalid(v2(0x11, 0x11, v4));                                   // version 1 in binary form
  check_invalid(v2(0x22, 0x11, v4));                                   // command 2
  check_invalid(v2(0x21, 0x12, v4));                                   // UDP
  check_invalid(v2(0x21, 0x41, v4));                                   // family 4
  // Oversized: the length field alone says so; no need to wait for the bytes.
  std::string big = v2(0x21, 0x11, v4 + tlv(0x20, std::string(512 - 12 - 3 + 1, 'x')));
  check_invalid(big.substr(0, 16));
  check_invalid(big);
  // Exactly at the limit is fine.
  check_valid(v2(0x21, 0x11, v4 + tlv(0x20, std::string(512 - 12 - 3, 'x'))));
  // Signature mismatch.
  std::string bad_sig = v2(0x21, 0x11, v4);
  bad_sig[7] = 'X';
  check_invalid(bad_sig);
  check_invalid(bad_sig.substr(0, 8));
  // A truncated but so far valid header is incomplete however it was cut.
  CHECK(parse_proxy_header(v2(0x21, 0x11, v4).substr(0, 20)).status == ProxyStatus::incomplete);
}

TEST_CASE("looks_like_proxy_header") {
  CHECK(looks_like_proxy_header("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
  CHECK(looks_like_proxy_header("PROXY"));
  CHECK(looks_like_proxy_header(v2_sig.substr(0, 5)));
  CHECK(looks_like_proxy_header(v2_sig));
  CHECK_FALSE(looks_like_proxy_header("PROX"));
  CHECK_FALSE(looks_like_proxy_header("EHLO client\r\n"));
  CHECK_FALSE(looks_like_proxy_header("\r\n\r\n"));
  CHECK_FALSE(looks_like_proxy_header(""));
  CHECK_FALSE(looks_like_proxy_header("PROXZ"));
}

TEST_CASE("may_be_proxy_header: too short to tell, a prefix of either signature") {
  CHECK(may_be_proxy_header("P"));
  CHECK(may_be_proxy_header("PROX"));
  CHECK(may_be_proxy_header("\r\n"));
  CHECK(may_be_proxy_header(v2_sig.substr(0, 4)));
  CHECK_FALSE(may_be_proxy_header(""));
  CHECK_FALSE(may_be_proxy_header("PROXY"));  // long enough: looks_like_proxy_header() tells
  CHECK_FALSE(may_be_proxy_header(v2_sig.substr(0, 5)));
  CHECK_FALSE(may_be_proxy_header("EHLO"));
  CHECK_FALSE(may_be_proxy_header("\r\nX"));
  CHECK_FALSE(may_be_proxy_header("PRX"));
}
