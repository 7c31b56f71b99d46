#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <doctest/doctest.h>

#include "daemon/own_listeners.hpp"
#include "daemon/runtime.hpp"

namespace {

using boost::asio::ip::make_address;

mailflow::config::Config listeners(std::initializer_list<std::pair<const char*, std::uint16_t>> bound) {
  mailflow::config::Config config;
  for (const auto& [host, port] : bound) {
    mailflow::config::Listener listener;
    listener.address.host = host;
    listener.address.port = port;
    config.listeners.push_back(listener);
  }
  return config;
}

TEST_CASE("own listeners: an exact address and port") {
  const mailflow::OwnListeners own(listeners({{"127.0.0.1", 2525}, {"::1", 2526}}), {});
  CHECK(own.contains(make_address("127.0.0.1"), 2525));
  CHECK(own.contains(make_address("::ffff:127.0.0.1"), 2525));  // mapped is the same host
  CHECK_FALSE(own.contains(make_address("127.0.0.1"), 25));
  CHECK_FALSE(own.contains(make_address("127.0.0.2"), 2525));
  CHECK(own.contains(make_address("::1"), 2526));
  CHECK_FALSE(own.contains(make_address("::1"), 2525));
}

TEST_CASE("own listeners: a wildcard listener is every address of this host, loopback included") {
  const mailflow::OwnListeners v4(listeners({{"0.0.0.0", 25}}), {make_address("192.0.2.7"), make_address("2001:db8::7")});
  CHECK(v4.contains(make_address("192.0.2.7"), 25));
  CHECK(v4.contains(make_address("127.0.0.53"), 25));
  CHECK_FALSE(v4.contains(make_address("192.0.2.8"), 25));
  CHECK_FALSE(v4.contains(make_address("2001:db8::7"), 25));  // 0.0.0.0 takes no IPv6
  // The server binds "::" IPv6-only: an IPv4 address of this host on that port is someone else's (a mail
  // server on 0.0.0.0:25 beside mailflowd's [::]:25), no loop.
  const mailflow::OwnListeners v6(listeners({{"::", 25}}),
                                  {make_address("192.0.2.7"), make_address("2001:db8::7")});
  CHECK(v6.contains(make_address("2001:db8::7"), 25));
  CHECK(v6.contains(make_address("::1"), 25));
  CHECK_FALSE(v6.contains(make_address("192.0.2.7"), 25));
  CHECK_FALSE(v6.contains(make_address("127.0.0.1"), 25));
  CHECK_FALSE(v6.contains(make_address("::ffff:192.0.2.7"), 25));  // an IPv4 connection
  CHECK_FALSE(v6.contains(make_address("2001:db8::8"), 25));
}

TEST_CASE("own listeners: the unspecified address is this host's loopback (a connect() there reaches it)") {
  const mailflow::OwnListeners own(listeners({{"127.0.0.1", 2525}, {"::1", 2526}, {"192.0.2.7", 2527}}), {});
  CHECK(own.contains(make_address("0.0.0.0"), 2525));
  CHECK(own.contains(make_address("::ffff:0.0.0.0"), 2525));
  CHECK(own.contains(make_address("::"), 2526));
  CHECK_FALSE(own.contains(make_address("::"), 2525));  // :: is ::1, not 127.0.0.1
  CHECK_FALSE(own.contains(make_address("0.0.0.0"), 2526));
  CHECK_FALSE(own.contains(make_address("0.0.0.0"), 2527));  // not an interface address
}

// What the loader cannot see (this host's interfaces): an upstream at one of them on a wildcard listener's
// port.
TEST_CASE("upstream loops: an address of this host on a wildcard listener's port") {
  auto config = listeners({{"0.0.0.0", 25}, {"::", 26}});
  config.listeners[0].name = "in";
  config.listeners[0].address.text = "0.0.0.0:25";
  config.listeners[1].name = "in6";
  config.listeners[1].address.text = "[::]:26";
  const auto upstream = [&](const char* host, std::uint16_t port, const char* text) {
    mailflow::config::Upstream u;
    u.address = {host, port, text};
    config.upstreams.push_back(u);
  };
  upstream("192.0.2.8", 25, "192.0.2.8:25");            // another host
  upstream("192.0.2.7", 25, "192.0.2.7:25");            // this host, on in's port: a loop
  upstream("192.0.2.7", 26, "192.0.2.7:26");            // in6 takes no IPv4
  upstream("2001:db8::7", 26, "[2001:db8::7]:26");      // this host, on in6's port: a loop
  upstream("mx.example.org", 25, "mx.example.org:25");  // a name: not resolved here
  config.upstreams.emplace_back().mx = true;
  const mailflow::OwnListeners own(config, {make_address("192.0.2.7"), make_address("2001:db8::7")});
  const auto loops = mailflow::upstream_loops(config, own);
  REQUIRE(loops.size() == 2);
  CHECK(loops[0].first == "upstreams[1].address");
  CHECK(loops[0].second ==
        "\"192.0.2.7:25\" is an address of this host where mailflowd's own listener \"in\" (\"0.0.0.0:25\") "
        "takes "
        "it: its mail would come back to it, in a loop");
  CHECK(loops[1].first == "upstreams[3].address");
}

TEST_CASE("own listeners: the real interfaces include loopback") {
  const mailflow::OwnListeners own(listeners({{"0.0.0.0", 2525}}));
  CHECK(own.contains(make_address("127.0.0.1"), 2525));
}

}  // namespace
