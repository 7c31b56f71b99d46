#include "proto/client_session.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace mailflow::proto;
using Kind = ClientSession::ActionKind;

namespace {

Reply reply(int code, std::vector<std::string> lines) { return Reply{code, std::move(lines)}; }

const Reply banner = reply(220, {"upstream.example ESMTP Postfix"});
const Reply ehlo_full = reply(250, {"upstream.example", "PIPELINING", "SIZE 10240000", "STARTTLS",
                                    "XCLIENT NAME ADDR PROTO HELO PORT", "8BITMIME"});
const Reply ehlo_after_tls = reply(250, {"upstream.example", "PIPELINING", "size 5000", "xclient ADDR"});
const Reply ok220 = reply(220, {"2.0.0 Ready to start TLS"});

ClientSession::Options options(UpstreamTlsPolicy tls, bool xclient) {
  ClientSession::Options o;
  o.ehlo_name = "relay.example.org";
  o.tls = tls;
  o.xclient_allowed = xclient;
  o.client_address = "192.0.2.1";
  o.client_port = 4321;
  o.client_helo = "client.example";
  return o;
}

}  // namespace

TEST_CASE("ClientSession: full path with STARTTLS and XCLIENT") {
  ClientSession c(options(UpstreamTlsPolicy::required, true));
  CHECK(c.start().kind == Kind::read_reply);
  auto a = c.on_reply(banner);
  CHECK(a.kind == Kind::send);
  CHECK(a.data == "EHLO relay.example.org\r\n");
  a = c.on_reply(ehlo_full);
  CHECK(a.kind == Kind::send);
  CHECK(a.data == "STARTTLS\r\n");
  a = c.on_reply(ok220);
  CHECK(a.kind == Kind::start_tls);
  a = c.on_tls_started();
  CHECK(c.tls_active());
  CHECK(a.kind == Kind::send);
  CHECK(a.data == "EHLO relay.example.org\r\n");
  a = c.on_reply(ehlo_after_tls);
  CHECK(a.kind == Kind::send);
  CHECK(a.data == "XCLIENT ADDR=192.0.2.1 PORT=4321 HELO=client.example PROTO=ESMTP\r\n");
  a = c.on_reply(reply(220, {"upstream.example ESMTP Postfix"}));
  CHECK(a.kind == Kind::send);
  CHECK(a.data == "EHLO client.example\r\n");
  a = c.on_reply(reply(250, {"upstream.example", "PIPELINING", "SIZE 777"}));
  CHECK(a.kind == Kind::ready);
  CHECK(c.xclient_done());
  CHECK(c.extensions().pipelining);
  CHECK(c.size_limit() == 777);
  CHECK(c.tls_active());
  CHECK_FALSE(c.starttls_declined());
}

TEST_CASE("ClientSession: capabilities are case-insensitive and forgotten after STARTTLS") {
  ClientSession c(options(UpstreamTlsPolicy::opportunistic, false));
  c.start();
  c.on_reply(banner);
  c.on_reply(ehlo_full);
  CHECK(c.size_limit() == 10240000);
  CHECK(c.extensions().pipelining);
  c.on_reply(ok220);
  c.on_tls_started();
  CHECK_FALSE(c.extensions().pipelining);
  CHECK(c.size_limit() == 0);
  auto a = c.on_reply(ehlo_after_tls);
  CHECK(a.kind == Kind::ready);  // XCLIENT offered but not allowed
  CHECK(c.size_limit() == 5000);
  CHECK(c.extensions().pipelining);
  CHECK_FALSE(c.xclient_done());
}

TEST_CASE("ClientSession: XCLIENT values are xtext-encoded, IPv6 tagged") {
  auto o = options(UpstreamTlsPolicy::none, true);
  o.client_address = "2001:db8::1";
  o.client_helo = "we+ird=name";
  o.client_esmtp = false;
  ClientSession c(o);
  c.start();
  c.on_reply(banner);
  auto a = c.on_reply(ehlo_full);  // policy none: STARTTLS not used even though offered
  CHECK(a.kind == Kind::send);
  CHECK(a.data == "XCLIENT ADDR=IPV6:2001:db8::1 PORT=4321 HELO=we+2Bird+3Dname PROTO=SMTP\r\n");
  CHECK_FALSE(c.tls_active());

  o.client_address = "IPV6:2001:db8::2";
  ClientSession d(o);
  d.start();
  d.on_reply(banner);
  CHECK(d.on_reply(ehlo_full).data.find("ADDR=IPV6:2001:db8::2 ") != std::string::npos);
}

TEST_CASE("ClientSession: an error injected at each step") {
  SUBCASE("banner refused") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    auto a = c.on_reply(reply(554, {"go away"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "greeting_rejected");
    CHECK(a.reply.code == 554);
    a = c.on_reply(reply(421, {"busy"}));  // (re)banner 421 also counts as greeting_rejected
    CHECK(a.kind == Kind::fail);
  }
  SUBCASE("banner 421") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    CHECK(c.on_reply(reply(421, {"busy"})).reason == "greeting_rejected");
  }
  SUBCASE("EHLO 5xx falls back to HELO") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    c.on_reply(banner);
    auto a = c.on_reply(reply(502, {"5.5.2 Error: command not recognized"}));
    CHECK(a.kind == Kind::send);
    CHECK(a.data == "HELO relay.example.org\r\n");
    a = c.on_reply(reply(250, {"upstream.example"}));
    CHECK(a.kind == Kind::ready);  // no extensions: no STARTTLS under opportunistic, no XCLIENT
    CHECK_FALSE(c.tls_active());
    CHECK_FALSE(c.extensions().pipelining);
  }
  SUBCASE("EHLO and HELO refused") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(reply(500, {"no"}));
    auto a = c.on_reply(reply(501, {"no"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "ehlo_rejected");
  }
  SUBCASE("EHLO 4xx") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    c.on_reply(banner);
    auto a = c.on_reply(reply(421, {"4.3.2 shutting down"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "ehlo_rejected");
  }
  SUBCASE("HELO fallback under required TLS: STARTTLS unavailable") {
    ClientSession c(options(UpstreamTlsPolicy::required, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(reply(500, {"no"}));
    auto a = c.on_reply(reply(250, {"upstream.example"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "starttls_unavailable");
  }
  SUBCASE("required TLS not offered") {
    ClientSession c(options(UpstreamTlsPolicy::required, true));
    c.start();
    c.on_reply(banner);
    auto a = c.on_reply(reply(250, {"upstream.example", "PIPELINING"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "starttls_unavailable");
  }
  SUBCASE("opportunistic TLS not offered: plaintext, XCLIENT still used") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    c.on_reply(banner);
    auto a = c.on_reply(reply(250, {"upstream.example", "XCLIENT ADDR"}));
    CHECK(a.kind == Kind::send);
    CHECK(a.data.rfind("XCLIENT ", 0) == 0);
  }
  SUBCASE("STARTTLS refused under required") {
    ClientSession c(options(UpstreamTlsPolicy::required, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(ehlo_full);
    auto a = c.on_reply(reply(454, {"4.7.0 TLS not available"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "starttls_rejected");
    CHECK(a.reply.code == 454);
  }
  SUBCASE("STARTTLS refused under opportunistic: go on without TLS") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(ehlo_full);
    CHECK_FALSE(c.starttls_declined());
    auto a = c.on_reply(reply(454, {"4.7.0 TLS not available"}));
    CHECK(a.kind == Kind::send);
    CHECK(a.data.rfind("XCLIENT ADDR=192.0.2.1 ", 0) == 0);
    CHECK_FALSE(c.tls_active());
    // What declined it, for the daemon's upstream_tls_fallback line.
    REQUIRE(c.starttls_declined());
    CHECK(c.starttls_declined()->code == 454);
    CHECK(c.starttls_declined()->lines == std::vector<std::string>{"4.7.0 TLS not available"});
    a = c.on_reply(reply(220, {"upstream.example ESMTP"}));
    CHECK(a.data == "EHLO client.example\r\n");
    a = c.on_reply(reply(250, {"upstream.example", "STARTTLS"}));
    CHECK(a.kind == Kind::ready);  // STARTTLS is not retried
  }
  SUBCASE("STARTTLS refused under opportunistic, no XCLIENT allowed: ready") {
    ClientSession c(options(UpstreamTlsPolicy::opportunistic, false));
    c.start();
    c.on_reply(banner);
    c.on_reply(ehlo_full);
    CHECK(c.on_reply(reply(502, {"no"})).kind == Kind::ready);
  }
  SUBCASE("EHLO after TLS refused") {
    ClientSession c(options(UpstreamTlsPolicy::required, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(ehlo_full);
    c.on_reply(ok220);
    c.on_tls_started();
    auto a = c.on_reply(reply(421, {"bye"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "ehlo_rejected");
  }
  SUBCASE("XCLIENT refused: ready without it") {
    ClientSession c(options(UpstreamTlsPolicy::none, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(ehlo_full);
    auto a = c.on_reply(reply(550, {"5.7.0 insufficient authorization"}));
    CHECK(a.kind == Kind::ready);
    CHECK_FALSE(c.xclient_done());
    CHECK(c.size_limit() == 10240000);
  }
  SUBCASE("EHLO after XCLIENT refused: HELO with the client's name") {
    ClientSession c(options(UpstreamTlsPolicy::none, true));
    c.start();
    c.on_reply(banner);
    c.on_reply(ehlo_full);
    c.on_reply(reply(220, {"ok"}));
    auto a = c.on_reply(reply(502, {"no"}));
    CHECK(a.kind == Kind::send);
    CHECK(a.data == "HELO client.example\r\n");
    a = c.on_reply(reply(250, {"ok"}));
    CHECK(a.kind == Kind::ready);
    CHECK(c.xclient_done());
  }
  SUBCASE("a reply after ready is a protocol error") {
    ClientSession c(options(UpstreamTlsPolicy::none, false));
    c.start();
    c.on_reply(banner);
    CHECK(c.on_reply(reply(250, {"x"})).kind == Kind::ready);
    auto a = c.on_reply(reply(250, {"x"}));
    CHECK(a.kind == Kind::fail);
    CHECK(a.reason == "protocol");
  }
}

TEST_CASE("ClientSession: names never carry line breaks into commands") {
  auto o = options(UpstreamTlsPolicy::none, true);
  o.client_helo = "evil\r\nRCPT TO:<x@y.z>";
  ClientSession c(o);
  c.start();
  c.on_reply(banner);
  auto a = c.on_reply(ehlo_full);
  CHECK(a.data == "XCLIENT ADDR=192.0.2.1 PORT=4321 HELO=evil__RCPT_TO:<x@y.z> PROTO=ESMTP\r\n");
  a = c.on_reply(reply(220, {"ok"}));
  CHECK(a.data == "EHLO evil__RCPT_TO:<x@y.z>\r\n");
}

namespace {
// Drives the engine against an upstream that answers like Postfix (EHLO_full, then ok), except that the reply
// at position `bad_at` is replaced by `bad`. Returns "ready[+tls][+xclient]" or "fail:<reason>".
std::string drive(UpstreamTlsPolicy policy, std::size_t bad_at, const Reply& bad) {
  ClientSession c(options(policy, true));
  auto a = c.start();
  std::size_t index = 0;
  for (int guard = 0; guard < 20; ++guard) {
    switch (a.kind) {
      case Kind::ready:
        return std::string("ready") + (c.tls_active() ? "+tls" : "") + (c.xclient_done() ? "+xclient" : "");
      case Kind::fail:
        return "fail:" + std::string(a.reason);
      case Kind::start_tls:
        a = c.on_tls_started();
        continue;
      default:
        break;
    }
    Reply next;
    if (index == bad_at) {
      next = bad;
    } else if (a.kind == Kind::read_reply) {
      next = banner;
    } else if (a.data.rfind("EHLO", 0) == 0) {
      next = c.tls_active() || c.xclient_done() ? ehlo_after_tls : ehlo_full;
    } else if (a.data.rfind("HELO", 0) == 0) {
      next = reply(250, {"upstream.example"});
    } else {
      next = ok220;  // STARTTLS, XCLIENT
    }
    ++index;
    a = c.on_reply(next);
  }
  return "loop";
}
}  // namespace

TEST_CASE("ClientSession: 421 or 554 injected at each step of the full conversation") {
  // Steps: 0 banner, 1 EHLO, 2 STARTTLS, 3 EHLO (TLS), 4 XCLIENT, 5 EHLO (client's name).
  const Reply transient = reply(421, {"4.3.2 busy"});
  const Reply permanent = reply(554, {"5.5.1 no"});
  struct Expect {
    std::size_t at;
    const char* on_421;
    const char* on_554;
  };
  const Expect required[] = {
      {0, "fail:greeting_rejected", "fail:greeting_rejected"},
      {1, "fail:ehlo_rejected", "fail:starttls_unavailable"},  // 554: HELO fallback has no STARTTLS
      {2, "fail:starttls_rejected", "fail:starttls_rejected"},
      {3, "fail:ehlo_rejected", "ready+tls"},  // 554: HELO after TLS, no extensions, so no XCLIENT
      {4, "fail:xclient_rejected", "ready+tls"},  // 554: XCLIENT refused, go on without it; 421: a goodbye
      {5, "fail:ehlo_rejected", "ready+tls+xclient"},
      {99, "ready+tls+xclient", "ready+tls+xclient"},
  };
  for (const auto& e : required) {
    CAPTURE(e.at);
    CHECK(drive(UpstreamTlsPolicy::required, e.at, transient) == e.on_421);
    CHECK(drive(UpstreamTlsPolicy::required, e.at, permanent) == e.on_554);
  }
  const Expect opportunistic[] = {
      {1, "fail:ehlo_rejected", "ready"},  // HELO: no STARTTLS, no XCLIENT
      {2, "fail:starttls_rejected", "ready+xclient"},  // 421: the server closes; 554: on without TLS
      {99, "ready+tls+xclient", "ready+tls+xclient"},
  };
  for (const auto& e : opportunistic) {
    CAPTURE(e.at);
    CHECK(drive(UpstreamTlsPolicy::opportunistic, e.at, transient) == e.on_421);
    CHECK(drive(UpstreamTlsPolicy::opportunistic, e.at, permanent) == e.on_554);
  }
}
