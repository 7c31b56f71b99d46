#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <doctest/doctest.h>

#include <boost/asio/ip/address.hpp>

#include "daemon/link.hpp"

using boost::asio::ip::make_address;
using mailflow::address_text;
using mailflow::endpoint_text;

TEST_CASE("address_text: IPv4 dotted quad, IPv4-mapped IPv6 as IPv4, IPv6 as Asio writes it") {
  CHECK(address_text(make_address("192.0.2.1")) == "192.0.2.1");
  CHECK(address_text(make_address("0.0.0.0")) == "0.0.0.0");
  CHECK(address_text(make_address("255.255.255.255")) == "255.255.255.255");
  CHECK(address_text(make_address("10.20.100.9")) == "10.20.100.9");
  CHECK(address_text(make_address("::ffff:203.0.113.7")) == "203.0.113.7");
  CHECK(address_text(make_address("2001:db8::1")) == "2001:db8::1");
  CHECK(address_text(make_address("::1")) == "::1");
  CHECK(address_text(boost::asio::ip::address()) == "0.0.0.0");
}

TEST_CASE("endpoint_text: IPv6 in brackets") {
  CHECK(endpoint_text(make_address("127.0.0.1"), 2525) == "127.0.0.1:2525");
  CHECK(endpoint_text(make_address("::ffff:127.0.0.1"), 25) == "127.0.0.1:25");
  CHECK(endpoint_text(make_address("2001:db8::1"), 25) == "[2001:db8::1]:25");
}
