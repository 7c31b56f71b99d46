#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <doctest/doctest.h>

#include "config/config.hpp"
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
  CHECK(loops[0].message ==
        "upstreams[1].address: \"192.0.2.7:25\" reaches mailflowd's own listener \"in\" (\"0.0.0.0:25\") on "
        "this host: its mail would come back to it, in a loop");
  CHECK(loops[1].message.starts_with(
      "upstreams[3].address: \"[2001:db8::7]:26\" reaches mailflowd's own listener "
      "\"in6\" (\"[::]:26\")"));
}

// The check without any interface address (what it finds on every host), on a configuration as the loader
// reads it: the loader leaves the check to upstream_loops, which says it at the address's file:line:col.
mailflow::config::Config loaded(std::string_view yaml) {
  auto result = mailflow::config::load_config_string(yaml, "test.yaml");
  REQUIRE(result.errors.empty());
  return *result.config;
}

std::vector<mailflow::config::ConfigError> loops_without_interfaces(const mailflow::config::Config& config) {
  return mailflow::upstream_loops(config, mailflow::OwnListeners(config, {}));
}

// A fixed upstream on one of mailflowd's own listeners relays each RCPT back into itself, session inside
// session, until the per-address limit answers 421: nothing is ever delivered.
TEST_CASE("upstream loops: an upstream address that is one of the listeners") {
  const auto config = loaded(R"(listeners:
  - {name: a, address: "127.0.0.1:2525", upstream: self}
  - {name: b, address: "0.0.0.0:2526", upstream: loop}
  - {name: c, address: "[::]:2527", upstream: up}
upstreams:
  - {name: self, address: "127.0.0.1:2525"}
  - {name: loop, address: "127.0.0.2:2526"}
  - {name: v6, address: "[::1]:2527"}
  - {name: up, address: "127.0.0.1:2527"}
  - {name: other, address: "10.0.0.5:2525"}
)");
  const auto loops = loops_without_interfaces(config);
  REQUIRE(loops.size() == 3);
  CHECK(loops[0].to_string() ==
        "test.yaml:6:27: upstreams[0].address: \"127.0.0.1:2525\" reaches mailflowd's own listener \"a\" "
        "(\"127.0.0.1:2525\") on this host: its mail would come back to it, in a loop");
  CHECK(loops[1].to_string() ==
        "test.yaml:7:27: upstreams[1].address: \"127.0.0.2:2526\" reaches mailflowd's own listener \"b\" "
        "(\"0.0.0.0:2526\") on this host: its mail would come back to it, in a loop");
  CHECK(loops[2].to_string() ==
        "test.yaml:8:25: upstreams[2].address: \"[::1]:2527\" reaches mailflowd's own listener \"c\" "
        "(\"[::]:2527\") on this host: its mail would come back to it, in a loop");
}

// connect() takes 0.0.0.0 and [::] as this host's loopback address, and [::ffff:127.0.0.1] is 127.0.0.1 over
// IPv4: each of them reaches the listener below on its port.
TEST_CASE("upstream loops: an upstream address that connect() takes to one of the listeners") {
  const auto config = loaded(R"(listeners:
  - {name: a, address: "127.0.0.1:2528", upstream: any}
  - {name: b, address: "0.0.0.0:2529", upstream: mapped}
  - {name: c, address: "[::1]:2530", upstream: any6}
  - {name: d, address: "[::]:2531", upstream: other}
upstreams:
  - {name: any, address: "0.0.0.0:2528"}
  - {name: mapped, address: "[::ffff:127.0.0.9]:2529"}
  - {name: any6, address: "[::]:2530"}
  - {name: other, address: "[::ffff:127.0.0.1]:2531"}
)");
  const auto loops = loops_without_interfaces(config);
  REQUIRE(loops.size() == 3);
  CHECK(loops[0].to_string() ==
        "test.yaml:7:26: upstreams[0].address: \"0.0.0.0:2528\" reaches mailflowd's own listener \"a\" "
        "(\"127.0.0.1:2528\") on this host: its mail would come back to it, in a loop");
  CHECK(loops[1].message ==
        "upstreams[1].address: \"[::ffff:127.0.0.9]:2529\" reaches mailflowd's own listener \"b\" "
        "(\"0.0.0.0:2529\") on this host: its mail would come back to it, in a loop");
  CHECK(loops[2].message ==
        "upstreams[2].address: \"[::]:2530\" reaches mailflowd's own listener \"c\" (\"[::1]:2530\") on this "
        "host: its mail would come back to it, in a loop");
}

TEST_CASE("own listeners: the real interfaces include loopback") {
  const mailflow::OwnListeners own(listeners({{"0.0.0.0", 2525}}));
  CHECK(own.contains(make_address("127.0.0.1"), 2525));
}

}  // namespace
