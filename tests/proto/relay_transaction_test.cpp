// The relay's transaction rules (proto/relay_transaction.hpp), driven by a real ServerSession on the client
// side and a scripted upstream on the other, with an error injected at every step the engine asks for.
#include <doctest/doctest.h>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proto/relay_transaction.hpp"
#include "proto/reply.hpp"
#include "proto/server_session.hpp"

using namespace mailflow::proto;

namespace {

Reply reply_of(int code, std::string text = "ok") { return Reply{code, {std::move(text)}}; }

std::vector<Reply> replies_in(std::string_view out) {
  std::vector<Reply> replies;
  for (;;) {
    auto parsed = parse_reply(out);
    if (parsed.status != ReplyStatus::complete) break;
    replies.push_back(parsed.reply);
    out.remove_prefix(parsed.consumed);
  }
  REQUIRE(out.empty());
  return replies;
}

// The I/O side, in memory: a client that sends command lines (pipelined in groups or one at a time) and an
// upstream that answers every command it receives by a rule. `fail_at` = N makes the N-th step fail the way
// the daemon reports it: a refused route, a dropped connection, a message that did not make it.
struct Relay {
  bool upstream_pipelining = true;
  bool upstream_size = true;      // SIZE announced
  bool upstream_8bitmime = true;  // 8BITMIME announced
  // What a connection opened from now on announces, when it differs from the above (the kept one keeps its
  // own): another MX host, or the upstream restarted with other settings.
  std::optional<UpstreamExtensions> new_connection_extensions;
  int fail_at = 0;
  std::function<Reply(std::string_view line)> upstream_rule = [](std::string_view line) {
    if (line.starts_with("DATA")) return reply_of(354, "go ahead");
    if (line.find("refused") != std::string_view::npos) return reply_of(550, "no such user");
    return reply_of(250);
  };
  Reply final_reply = reply_of(250, "queued");
  // The reply the daemon gives the message itself instead of sending its terminator (refused here: too big, a
  // line too long, ...; or the upstream lost on the way).
  std::optional<std::string> message_refusal;
  // The upstream answers the first command with this verb twice: its reply, then a 250 nobody asked for.
  std::string_view answer_twice;
  // Losses the way the daemon's UpstreamLeg reports them: `kept_closes`: a failure on a kept connection that
  // has answered nothing since it was kept is its idle close (closed_idle); `close_kept_once`: the next kept
  // connection is found closed at its first reply; `every_loss_closed_idle`: every loss claims to be one (the
  // engine's own rules must still hold).
  bool kept_closes = false;
  bool close_kept_once = false;
  bool every_loss_closed_idle = false;
  bool kept_unanswered = false;
  bool closed_idle = false;

  ServerSession session{ServerSession::Options{}};
  std::string out;  // everything the client was told
  RelayTransaction txn{session, out};

  int steps = 0;
  bool connected = false;
  std::string path;                  // of the current connection
  std::vector<std::string> writes;   // what the upstream received, one entry per write
  std::deque<Reply> upstream_owes;   // replies the upstream has given and not yet read
  int opens = 0;
  int upstream_rcpt_2xx = 0;
  int upstream_final_2xx = 0;
  int delivered = 0;
  std::uint32_t delivered_recipients = 0;
  std::vector<std::string_view> rejects;

  std::map<std::string, RelayRoute> routes{
      {"contoso.com", {"partner-contoso", "mx/contoso.com", false}},
      {"fabrikam.com", {"partner-fabrikam", "mx/fabrikam.com", true}},
      {"alias.contoso.com", {"partner-alias", "mx/contoso.com", false}},
      {"example.org", {"internet", "mx/example.org", false}},
  };
  std::map<std::string, std::string> dead_paths;  // path -> the refusal its open gets
  std::string_view dead_reason;                   // the reason given with those refusals (an MX route result)

  bool fail() { return ++steps == fail_at; }
  UpstreamExtensions extensions() const { return {upstream_pipelining, upstream_size, upstream_8bitmime}; }
  void drop() {
    connected = false;
    upstream_owes.clear();
  }
  // A failure now: dropped, and whether it is reported as the idle close of a kept connection.
  bool lose() {
    if (connected) closed_idle = (kept_closes && kept_unanswered) || every_loss_closed_idle;
    drop();
    return closed_idle;
  }

  void drive() {
    for (;;) {
      for (auto reason : txn.take_rejects()) rejects.push_back(reason);
      switch (txn.next()) {
        case RelayTransaction::Step::idle:
          return;
        case RelayTransaction::Step::open_upstream: {
          ++opens;
          const std::string& want = txn.route_to_open().path;
          const bool reused = connected && path == want;
          kept_unanswered = reused;
          closed_idle = false;
          if (auto dead = dead_paths.find(want); dead != dead_paths.end()) {
            drop();
            txn.on_opened(dead->second, false, extensions(), dead_reason);
          } else if (fail()) {
            drop();
            txn.on_opened("451 4.4.1 No mail host could be used\r\n", false, extensions());
          } else {
            if (!reused) drop();
            connected = true;
            path = want;
            txn.on_opened(std::nullopt, reused,
                          !reused && new_connection_extensions ? *new_connection_extensions : extensions());
          }
          break;
        }
        case RelayTransaction::Step::reset_upstream:
          writes.push_back("RSET\r\n");
          if (fail() || !connected) {
            lose();
            txn.on_reset(false);
          } else {
            kept_unanswered = false;
            txn.on_reset(true);
          }
          break;
        case RelayTransaction::Step::write_upstream: {
          const std::string data(txn.upstream_output());
          writes.push_back(data);
          if (fail() || !connected) {
            txn.on_written(false, lose());
            break;
          }
          std::string_view rest = data;
          while (!rest.empty()) {
            const auto end = rest.find("\r\n");
            const Reply reply = upstream_rule(rest.substr(0, end));
            if (rest.starts_with("RCPT") && reply.positive()) ++upstream_rcpt_2xx;
            upstream_owes.push_back(reply);
            if (!answer_twice.empty() && rest.starts_with(answer_twice)) {
              answer_twice = {};
              upstream_owes.push_back(reply_of(250, "unasked"));
            }
            rest.remove_prefix(end + 2);
          }
          txn.on_written(true);
          break;
        }
        case RelayTransaction::Step::read_reply:
          if (close_kept_once && kept_unanswered) {
            close_kept_once = false;
            closed_idle = true;
            drop();
            txn.on_reply(std::nullopt, true);
          } else if (fail() || upstream_owes.empty()) {
            txn.on_reply(std::nullopt, lose());
          } else {
            Reply reply = upstream_owes.front();
            upstream_owes.pop_front();
            if (reply.code == 421) {  // the upstream closes the channel: lost as at its end of stream
              const bool idle = lose();
              txn.on_reply(reply, idle);
              break;
            }
            kept_unanswered = false;
            // What the upstream said behind it has arrived already (UpstreamLeg::unread()).
            if (!txn.on_reply(reply, false, !upstream_owes.empty())) drop();  // out of step: dropped
          }
          break;
        case RelayTransaction::Step::send_message:
          if (fail()) {
            drop();
            txn.on_message_end("451 4.4.2 Upstream connection lost, try again later\r\n");
          } else if (message_refusal) {
            drop();
            txn.on_message_end(*message_refusal);
          } else {
            upstream_owes.push_back(final_reply);
            if (final_reply.positive()) ++upstream_final_2xx;
            txn.on_message_end(std::nullopt);
          }
          break;
      }
      if (auto recipients = txn.take_delivered()) {
        ++delivered;
        delivered_recipients += *recipients;
      }
    }
  }

  void command(std::string_view line) {
    const auto action = session.on_line(line, false);
    using Kind = ServerSession::ActionKind;
    if (action.kind != Kind::begin_mail && action.kind != Kind::forward_rcpt && action.kind != Kind::begin_data) {
      txn.flush();  // replies go out in command order
      drive();
    }
    switch (action.kind) {
      case Kind::begin_mail:
        txn.mail(session.last_command(), false);
        break;
      case Kind::forward_rcpt: {
        const std::string& address = session.last_command().address;
        const std::string domain = address.substr(address.find('@') + 1);
        txn.rcpt(session.last_command().argument, domain, routes.at(domain), session.tls_active());
        break;
      }
      case Kind::begin_data:
        txn.data();
        break;
      case Kind::reset:
        out += action.reply;
        txn.reset();
        break;
      default:
        out += action.reply;
        break;
    }
    drive();
  }

  // A group the client pipelines (RFC 2920): the replies are due once the group is sent.
  void group(std::initializer_list<std::string_view> lines) {
    for (auto line : lines) command(line);
    txn.flush();
    drive();
  }
};

std::vector<int> codes(const std::string& out) {
  std::vector<int> result;
  for (const auto& reply : replies_in(out)) result.push_back(reply.code);
  return result;
}

}  // namespace

TEST_CASE("a pipelined transaction: MAIL answered here, sent with the first RCPT, the group in one write") {
  Relay relay;
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<c@contoso.com>", "DATA"});
  relay.group({});  // the message (send_message) went through in the last group
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 250, 354, 250});
  REQUIRE(relay.writes.size() == 1);  // DATA may end a pipelined group (RFC 2920 3.1)
  CHECK(relay.writes[0] ==
        "MAIL FROM:<a@example.net>\r\nRCPT TO:<b@contoso.com>\r\nRCPT TO:<c@contoso.com>\r\nDATA\r\n");
  CHECK(relay.delivered == 1);
  CHECK(relay.delivered_recipients == 2);
  CHECK(relay.txn.accepted_domains() == std::vector<std::string>{"contoso.com"});
  REQUIRE(relay.txn.route());
  CHECK(relay.txn.route()->connector == "partner-contoso");
}

TEST_CASE("without upstream PIPELINING, MAIL's reply comes before the RCPT is sent, and its refusal answers every RCPT") {
  Relay relay;
  relay.upstream_pipelining = false;
  relay.upstream_rule = [](std::string_view line) {
    return line.starts_with("MAIL") ? reply_of(550, "sender refused") : reply_of(250);
  };
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<c@contoso.com>", "DATA"});
  const auto replies = replies_in(relay.out);
  REQUIRE(replies.size() == 5);
  CHECK(replies[1].code == 250);  // MAIL: answered here
  CHECK(replies[2].code == 550);  // each RCPT hears the upstream's refusal of MAIL
  CHECK(replies[2].lines == std::vector<std::string>{"sender refused"});
  CHECK(replies[3].code == 550);
  CHECK(replies[4].code == 554);  // DATA without an accepted recipient: ServerSession's own refusal
  REQUIRE(relay.writes.size() == 1);  // the RCPTs were never sent
  CHECK(relay.writes[0] == "MAIL FROM:<a@example.net>\r\n");
  CHECK(relay.delivered == 0);
}

TEST_CASE("MAIL goes upstream with only the parameters of the extensions the upstream announced") {
  const auto mail_sent = [](bool size, bool eight_bit_mime, bool pipelining, std::string_view mail) {
    Relay relay;
    relay.upstream_size = size;
    relay.upstream_8bitmime = eight_bit_mime;
    relay.upstream_pipelining = pipelining;
    relay.group({"EHLO client.example"});
    relay.group({std::string(mail), "RCPT TO:<b@contoso.com>", "DATA"});
    relay.group({});  // the message (send_message)
    CHECK(relay.delivered == 1);
    REQUIRE(!relay.writes.empty());
    return relay.writes[0].substr(0, relay.writes[0].find("\r\n") + 2);
  };
  // RFC 1870 SIZE=, RFC 6152 BODY=: neither where the upstream did not announce it (a HELO-only one none).
  CHECK(mail_sent(false, false, true, "MAIL FROM:<a@example.net> SIZE=100 BODY=7BIT") ==
        "MAIL FROM:<a@example.net>\r\n");
  CHECK(mail_sent(false, true, false, "MAIL FROM:<a@example.net>  size=100   BODY=7bit") ==
        "MAIL FROM:<a@example.net> BODY=7bit\r\n");
  CHECK(mail_sent(true, false, true, "MAIL FROM: <> BODY=7BIT SIZE=100") == "MAIL FROM: <> SIZE=100\r\n");
  CHECK(mail_sent(true, true, true, "MAIL FROM:<\"a b\"@example.net> SIZE=100 BODY=8BITMIME") ==
        "MAIL FROM:<\"a b\"@example.net> SIZE=100 BODY=8BITMIME\r\n");
  CHECK(mail_sent(false, false, true, "MAIL FROM:<a@example.net>") == "MAIL FROM:<a@example.net>\r\n");
}

TEST_CASE("a recipient of another route or connector gets 452 4.5.3; one of the same route and connector goes along") {
  Relay relay;
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<c@example.org>",
               "RCPT TO:<d@alias.contoso.com>", "RCPT TO:<e@contoso.com>"});
  const auto replies = replies_in(relay.out);
  REQUIRE(replies.size() == 6);
  CHECK(replies[2].code == 250);
  CHECK(replies[3].code == 452);
  CHECK(replies[3].lines.front() == "4.5.3 Recipient is delivered by another route: send it in a separate transaction");
  CHECK(replies[4].code == 452);
  CHECK(replies[4].lines.front() ==
        "4.5.3 Recipient belongs to connector partner-alias: send it in a separate transaction");
  CHECK(replies[5].code == 250);
  CHECK(relay.rejects == std::vector<std::string_view>{"recipient_route", "recipient_route"});
  CHECK(relay.opens == 1);
}

TEST_CASE("forced TLS: at MAIL when the connector is certain, else at the route's first RCPT") {
  Relay relay;
  relay.group({"EHLO client.example"});
  const auto mail = relay.session.on_line("MAIL FROM:<a@example.net>", false);
  REQUIRE(mail.kind == ServerSession::ActionKind::begin_mail);
  relay.txn.mail(relay.session.last_command(), true);
  relay.drive();
  relay.group({"RCPT TO:<b@contoso.com>"});  // no transaction: 503
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@fabrikam.com>", "RCPT TO:<c@contoso.com>"});
  CHECK(codes(relay.out) == std::vector<int>{250, 530, 503, 250, 530, 250});
  CHECK(relay.rejects == std::vector<std::string_view>{"tls_required", "tls_required"});
}

TEST_CASE("a route that cannot be opened answers its recipients at once; the next route is still tried") {
  Relay relay;
  relay.dead_paths["mx/contoso.com"] = "556 5.1.10 Recipient domain does not accept mail (null MX)\r\n";
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<c@contoso.com>",
               "RCPT TO:<d@example.org>", "DATA"});
  CAPTURE(relay.out);
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 556, 556, 250, 354, 250});
  CHECK(relay.opens == 2);  // contoso.com once, example.org once
  CHECK(relay.txn.accepted_domains() == std::vector<std::string>{"example.org"});
}

TEST_CASE("every recipient that a refused route answers counts the refusal's reason, not only the first") {
  Relay relay;
  relay.dead_paths["mx/contoso.com"] = "550 5.1.2 Recipient domain not found\r\n";
  relay.dead_reason = "nxdomain";
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<c@contoso.com>",
               "RCPT TO:<d@contoso.com>", "RSET"});
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 550, 550, 550, 250});  // EHLO first
  CHECK(relay.opens == 1);
  CHECK(relay.rejects == std::vector<std::string_view>{"nxdomain", "nxdomain", "nxdomain"});
  // A refusal without a reason (no host could be reached) is no reject of mailflowd's own.
  relay.dead_reason = {};
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<c@contoso.com>", "RSET"});
  CHECK(relay.rejects.size() == 3);
}

TEST_CASE("DATA refused by the upstream: its reply is relayed and the upstream transaction is reset") {
  Relay relay;
  relay.upstream_rule = [](std::string_view line) {
    return line.starts_with("DATA") ? reply_of(554, "no valid recipients") : reply_of(250);
  };
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 554});
  REQUIRE(relay.writes.size() == 2);
  CHECK(relay.writes[1] == "RSET\r\n");
  CHECK_FALSE(relay.txn.upstream_in_transaction());
  // The next transaction reuses the connection without another RSET.
  relay.upstream_rule = [](std::string_view line) {
    return line.starts_with("DATA") ? reply_of(354) : reply_of(250);
  };
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
  CHECK(relay.writes.size() == 3);
  CHECK(relay.opens == 2);
  CHECK(relay.delivered == 1);
}

TEST_CASE("an upstream 421 is relayed as it is and ends the session: nothing is said or sent after it") {
  for (const bool pipelined : {true, false}) {
    for (const std::string at : {"MAIL", "RCPT", "DATA", "final"}) {
      CAPTURE(pipelined);
      CAPTURE(at);
      Relay relay;
      relay.upstream_pipelining = pipelined;
      bool armed = false;  // from the second transaction on
      relay.upstream_rule = [at, &armed](std::string_view line) {
        if (armed && line.starts_with(at) && (at != "RCPT" || line.find("closeme") != std::string_view::npos))
          return reply_of(421, "4.3.0 mx.example closing transmission channel");
        if (line.starts_with("DATA")) return reply_of(354, "go ahead");
        return reply_of(250);
      };
      relay.group({"EHLO client.example"});
      relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});  // delivered first
      armed = true;
      if (at == "final") relay.final_reply = reply_of(421, "4.3.0 mx.example closing transmission channel");
      const std::size_t told = relay.out.size();
      relay.group(
          {"MAIL FROM:<a@example.net>", "RCPT TO:<closeme@contoso.com>", "RCPT TO:<c@contoso.com>", "DATA"});
      const auto replies = replies_in(std::string_view(relay.out).substr(told));
      REQUIRE_FALSE(replies.empty());
      CHECK(replies.back().code == 421);
      const std::vector<std::string> said{"4.3.0 mx.example closing transmission channel"};
      CHECK(replies.back().lines == said);
      for (std::size_t i = 0; i + 1 < replies.size(); ++i) CHECK(replies[i].code != 421);
      CHECK(relay.txn.closing());
      CHECK(relay.txn.next() == RelayTransaction::Step::idle);
      CHECK_FALSE(relay.txn.upstream_in_transaction());
      CHECK(relay.delivered == 1);  // the message before the 421 stays delivered, once
    }
  }
}

TEST_CASE("a kept connection's 421 before it answered anything is its idle close: replayed, not relayed") {
  Relay relay;
  relay.kept_closes = true;
  int mails = 0;
  relay.upstream_rule = [&mails](std::string_view line) {
    if (line.starts_with("MAIL") && ++mails == 2) return reply_of(421, "4.4.2 mx.example timeout exceeded");
    if (line.starts_with("DATA")) return reply_of(354, "go ahead");
    return reply_of(250);
  };
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});  // the kept connection: 421
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 354, 250, 250, 250, 354, 250});
  CHECK_FALSE(relay.txn.closing());
  CHECK(relay.opens == 3);  // the first connection, its reuse, the new one for the replay
  CHECK(relay.delivered == 2);
}

TEST_CASE("a reused connection whose last transaction is still open gets RSET before the next MAIL") {
  Relay relay;
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>"});
  relay.group({"RCPT TO:<refused@contoso.com>"});
  relay.group({"DATA"});  // 554 here: no valid recipients
  CHECK(relay.txn.upstream_in_transaction());  // MAIL accepted there, every RCPT refused, DATA never sent
  relay.session.on_tls_started();              // a STARTTLS on the client leg starts the conversation over
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>"});
  REQUIRE(relay.writes.size() == 3);
  CHECK(relay.writes[0] == "MAIL FROM:<a@example.net>\r\nRCPT TO:<refused@contoso.com>\r\n");
  CHECK(relay.writes[1] == "RSET\r\n");
  CHECK(relay.writes[2] == "MAIL FROM:<a@example.net>\r\nRCPT TO:<b@contoso.com>\r\n");
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 550, 554, 250, 250, 250});
  CHECK(relay.opens == 2);
}

TEST_CASE("a reply that cannot answer its command is never relayed: 451 4.4.2 and the connection dropped") {
  struct Case {
    const char* verb;
    int code;
    std::vector<int> client;  // EHLO, MAIL, RCPT, DATA, as the client hears them
  };
  for (const Case& c : {Case{"DATA", 250, {250, 250, 250, 451}}, Case{"DATA", 221, {250, 250, 250, 451}},
                        Case{"DATA", 350, {250, 250, 250, 451}}, Case{"RCPT", 354, {250, 250, 451}},
                        Case{"MAIL", 354, {250, 250, 451}}}) {
    CAPTURE(c.verb);
    CAPTURE(c.code);
    Relay relay;
    relay.upstream_pipelining = false;
    relay.upstream_rule = [&c](std::string_view line) {
      if (line.starts_with(c.verb)) return reply_of(c.code, "out of step");
      return line.starts_with("DATA") ? reply_of(354) : reply_of(250);
    };
    relay.group({"EHLO client.example"});
    relay.command("MAIL FROM:<a@example.net>");
    relay.command("RCPT TO:<b@contoso.com>");
    if (c.client.size() == 4) relay.command("DATA");
    CHECK(codes(relay.out) == c.client);
    CHECK(relay.out.find("out of step") == std::string::npos);
    CHECK_FALSE(relay.connected);
    CHECK(relay.delivered == 0);
  }
  // The end of the message: a 354 there is no completion.
  Relay relay;
  relay.final_reply = reply_of(354, "out of step");
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
  relay.group({});
  CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 354, 451});
  CHECK(relay.delivered == 0);
}

TEST_CASE("a reply nobody asked for behind the last one owed answers no other command: 451, dropped") {
  for (const bool pipelining : {false, true}) {
    for (const std::string_view verb : {"MAIL", "RCPT", "DATA"}) {
      CAPTURE(pipelining);
      CAPTURE(verb);
      Relay relay;
      relay.upstream_pipelining = pipelining;
      relay.answer_twice = verb;
      relay.group({"EHLO client.example"});
      if (pipelining) {
        relay.group(
            {"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<refused@contoso.com>"});
        relay.group({"DATA"});
      } else {
        relay.command("MAIL FROM:<a@example.net>");
        relay.command("RCPT TO:<b@contoso.com>");
        relay.command("RCPT TO:<refused@contoso.com>");
        relay.command("DATA");
      }
      if (relay.txn.next() == RelayTransaction::Step::send_message) relay.group({});
      const auto replies = replies_in(relay.out);
      REQUIRE(replies.size() >= 4);
      CHECK(replies[3].code != 250);  // refused@ was refused by the upstream, if it got that far
      // Inside a pipelined group a reply behind another is no surprise: the shift shows at the group's last
      // reply, whose command is then lost (451) with the transaction, so that no message follows.
      if (!pipelining) CHECK(relay.out.find("unasked") == std::string::npos);
      CHECK(replies.back().code != 354);
      CHECK(relay.out.find("451 4.4.2") != std::string::npos);
      CHECK(relay.delivered == 0);
      CHECK_FALSE(relay.connected);
    }
  }
}

TEST_CASE("an upstream 4xx or 5xx to the message is relayed and never counted as delivered") {
  for (int code : {451, 554}) {
    Relay relay;
    relay.final_reply = reply_of(code, "content refused");
    relay.group({"EHLO client.example"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
    relay.group({});
    CHECK(codes(relay.out).back() == code);
    CHECK(relay.delivered == 0);
  }
}

namespace {
// A Relay whose client session ends at its `limit`-th bad command (limits.max_bad_commands).
void limit_bad_commands(Relay& relay, std::uint32_t limit) {
  ServerSession::Options options;
  options.max_bad_commands = limit;
  relay.session = ServerSession(options);
}
}  // namespace

TEST_CASE(
    "refused recipients are bad commands: the max_bad_commands-th is followed by the 421, nothing after it") {
  for (const bool pipelined : {true, false}) {
    for (const int code : {550, 450}) {
      CAPTURE(pipelined);
      CAPTURE(code);
      Relay relay;
      limit_bad_commands(relay, 3);
      relay.upstream_pipelining = pipelined;
      relay.upstream_rule = [code](std::string_view line) {
        return line.starts_with("RCPT") ? reply_of(code, "5.1.1 no such user") : reply_of(250);
      };
      relay.group({"EHLO client.example"});
      // Pipelined upstream: the RCPTs behind the third are sent there too, and their replies never relayed.
      // Without, the third's 421 comes before the next RCPT is taken (the daemon reads no more: closing()).
      if (pipelined)
        relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<a@contoso.com>", "RCPT TO:<b@contoso.com>",
                     "RCPT TO:<c@contoso.com>", "RCPT TO:<d@contoso.com>", "RCPT TO:<e@contoso.com>"});
      else
        relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<a@contoso.com>", "RCPT TO:<b@contoso.com>",
                     "RCPT TO:<c@contoso.com>"});
      const auto replies = replies_in(relay.out);
      CHECK(codes(relay.out) == std::vector<int>{250, 250, code, code, code, 421});
      CHECK(replies.back().lines.front() == "4.7.0 localhost Error: too many errors");
      CHECK(relay.txn.closing());
      CHECK(relay.txn.closing_reason() == "too_many_bad_commands");
      CHECK(relay.txn.next() == RelayTransaction::Step::idle);
      CHECK(relay.session.state() == ServerSession::State::closed);
      for (auto reason : relay.txn.take_rejects()) relay.rejects.push_back(reason);
      CHECK(relay.rejects == std::vector<std::string_view>{"too_many_bad_commands"});
    }
  }
}

TEST_CASE(
    "the relay's own refusals of recipients count as bad commands, but not a 452 nor a lost way to the "
    "upstream") {
  SUBCASE(
      "forced TLS at RCPT and a route's refusal with a reason count, with the client's own bad commands") {
    Relay relay;
    limit_bad_commands(relay, 4);
    relay.dead_paths["mx/example.org"] = "550 5.1.2 Recipient domain not found\r\n";
    relay.dead_reason = "nxdomain";
    relay.group({"EHLO client.example", "VRFY x"});  // 502: the first bad command
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@fabrikam.com>", "RSET"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<c@example.org>", "RCPT TO:<d@example.org>"});
    CHECK(codes(relay.out) == std::vector<int>{250, 502, 250, 530, 250, 250, 550, 550, 421});
    CHECK(relay.txn.closing_reason() == "too_many_bad_commands");
  }
  SUBCASE("452: too many recipients upstream, another route here; 451: no upstream could be reached") {
    Relay relay;
    limit_bad_commands(relay, 2);
    relay.dead_paths["mx/example.org"] = "451 4.4.1 No mail host could be used\r\n";
    relay.upstream_rule = [](std::string_view line) {
      if (line.find("full") != std::string_view::npos) return reply_of(452, "4.5.3 too many recipients");
      return line.starts_with("DATA") ? reply_of(354, "go ahead") : reply_of(250);
    };
    relay.group({"EHLO client.example"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<c@example.org>", "RCPT TO:<d@example.org>",
                 "RCPT TO:<e@example.org>", "RSET"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<full1@contoso.com>",
                 "RCPT TO:<full2@contoso.com>", "RCPT TO:<full3@contoso.com>", "RCPT TO:<f@example.org>",
                 "RCPT TO:<g@example.org>", "RCPT TO:<h@example.org>"});
    CHECK(codes(relay.out) ==
          std::vector<int>{250, 250, 451, 451, 451, 250, 250, 250, 452, 452, 452, 452, 452, 452});
    CHECK_FALSE(relay.txn.closing());
    CHECK(relay.session.bad_commands() == 0);
  }
  SUBCASE("a delivered message starts the count over") {
    Relay relay;
    limit_bad_commands(relay, 3);
    relay.group({"EHLO client.example"});
    for (int round = 0; round < 3; ++round) {
      relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<refused1@contoso.com>",
                   "RCPT TO:<refused2@contoso.com>", "RCPT TO:<b@contoso.com>", "DATA"});
      relay.group({});
    }
    CHECK(relay.delivered == 3);
    CHECK_FALSE(relay.txn.closing());
    CHECK(relay.session.bad_commands() == 0);
  }
}

TEST_CASE("refusals of DATA and of the message are bad commands too, as Postfix's data_cmd returns them") {
  const auto limited = [](std::function<Reply(std::string_view)> rule = {}) {
    auto relay = std::make_unique<Relay>();
    limit_bad_commands(*relay, 2);
    if (rule) relay->upstream_rule = std::move(rule);
    relay->group({"EHLO client.example"});
    return relay;
  };
  const auto transaction = [](Relay& relay) {
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
    relay.group({});
  };
  SUBCASE("the upstream's 5xx and 4xx to the end of data") {
    for (const int code : {554, 451}) {
      CAPTURE(code);
      auto relay = limited();
      relay->final_reply = reply_of(code, "content refused");
      transaction(*relay);
      CHECK_FALSE(relay->txn.closing());
      transaction(*relay);
      CHECK(codes(relay->out) == std::vector<int>{250, 250, 250, 354, code, 250, 250, 354, code, 421});
      CHECK(relay->txn.closing());
      CHECK(relay->txn.closing_reason() == "too_many_bad_commands");
      CHECK(relay->session.state() == ServerSession::State::closed);
      CHECK(relay->delivered == 0);
    }
  }
  SUBCASE("the upstream's refusal of DATA, a 452 included") {
    for (const int code : {554, 452}) {
      CAPTURE(code);
      auto relay = limited([code](std::string_view line) {
        return line.starts_with("DATA") ? reply_of(code, "no thanks") : reply_of(250);
      });
      transaction(*relay);
      transaction(*relay);
      CHECK(codes(relay->out) == std::vector<int>{250, 250, 250, code, 250, 250, code, 421});
      CHECK(relay->txn.closing_reason() == "too_many_bad_commands");
    }
  }
  SUBCASE("the relay's own refusal of the message (too big, a line too long, bare CR/LF, too many hops)") {
    auto relay = limited();
    relay->message_refusal = "552 5.3.4 Message size exceeds fixed maximum message size\r\n";
    transaction(*relay);
    transaction(*relay);
    CHECK(codes(relay->out) == std::vector<int>{250, 250, 250, 354, 552, 250, 250, 354, 552, 421});
    CHECK(relay->txn.closing_reason() == "too_many_bad_commands");
    for (auto reason : relay->txn.take_rejects()) relay->rejects.push_back(reason);
    CHECK(relay->rejects == std::vector<std::string_view>{"too_many_bad_commands"});
  }
  SUBCASE("not the 451 of an upstream lost on the way, and a delivered message starts the count over") {
    auto relay = limited();
    relay->message_refusal = std::string(RelayTransaction::upstream_lost_reply);
    for (int i = 0; i < 3; ++i) transaction(*relay);
    CHECK_FALSE(relay->txn.closing());
    CHECK(relay->session.bad_commands() == 0);
    relay->message_refusal.reset();
    relay->final_reply = reply_of(554, "content refused");
    transaction(*relay);
    relay->final_reply = reply_of(250, "queued");
    transaction(*relay);
    CHECK(relay->session.bad_commands() == 0);
    relay->final_reply = reply_of(554, "content refused");
    transaction(*relay);
    CHECK_FALSE(relay->txn.closing());
    CHECK(relay->delivered == 1);
  }
}

TEST_CASE(
    "a kept connection found closed before it answered is replayed once on a new connection, unnoticed") {
  for (const bool pipelining : {true, false}) {
    CAPTURE(pipelining);
    Relay relay;
    relay.upstream_pipelining = pipelining;
    relay.kept_closes = true;
    relay.group({"EHLO client.example"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
    relay.group({});
    const std::size_t first = relay.writes.size();
    relay.close_kept_once = true;  // the upstream closed the kept connection meanwhile
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<c@contoso.com>", "RCPT TO:<d@contoso.com>", "DATA"});
    relay.group({});
    CAPTURE(relay.out);
    CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 354, 250, 250, 250, 250, 354, 250});
    CHECK(relay.delivered == 2);
    CHECK(relay.delivered_recipients == 3);
    CHECK(relay.opens == 3);  // the first transaction's, the kept one's, the replay's
    REQUIRE(relay.writes.size() > first + 1);
    // What the kept connection got first goes again, as it was, on the new one.
    CHECK(relay.writes[first + 1] == relay.writes[first]);
    CHECK(relay.writes[first].starts_with("MAIL FROM:<a@example.net>\r\n"));
  }
}

TEST_CASE("a replay's MAIL carries the parameters of what the new connection announced, not the old one's") {
  Relay relay;
  relay.kept_closes = true;
  relay.group({"EHLO client.example"});
  relay.group({"MAIL FROM:<a@example.net> SIZE=100", "RCPT TO:<b@contoso.com>", "DATA"});
  relay.group({});
  const std::size_t first = relay.writes.size();
  relay.close_kept_once = true;
  relay.new_connection_extensions = UpstreamExtensions{true, false, true};  // no SIZE there
  relay.group({"MAIL FROM:<a@example.net> SIZE=100 BODY=8BITMIME", "RCPT TO:<c@contoso.com>", "DATA"});
  relay.group({});
  CAPTURE(relay.out);
  CHECK(relay.delivered == 2);
  CHECK(relay.opens == 3);
  REQUIRE(relay.writes.size() > first + 1);
  // The same commands again, MAIL built for the new connection: SIZE= is not sent where SIZE was not
  // announced.
  const auto rest = [](const std::string& write) { return write.substr(write.find("\r\n") + 2); };
  CHECK(relay.writes[first].starts_with(
      "MAIL FROM:<a@example.net> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<c@contoso.com>\r\n"));
  CHECK(relay.writes[first + 1].starts_with("MAIL FROM:<a@example.net> BODY=8BITMIME\r\n"));
  CHECK(rest(relay.writes[first + 1]) == rest(relay.writes[first]));
}

TEST_CASE("no replay once the upstream answered, for a new connection, or twice") {
  SUBCASE("the kept connection answered MAIL, then was lost") {
    Relay relay;
    relay.kept_closes = true;
    relay.upstream_pipelining = false;
    relay.group({"EHLO client.example"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
    relay.group({});
    relay.fail_at = relay.steps + 4;  // open (reused), write MAIL, read its 250, write RCPT: lost
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<c@contoso.com>"});
    CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 354, 250, 250, 451});
    CHECK(relay.opens == 2);
  }
  SUBCASE("a new connection lost before it answered, even when it claims an idle close") {
    Relay relay;
    relay.every_loss_closed_idle = true;
    relay.fail_at = 3;  // open, write the group, read MAIL's reply: lost
    relay.group({"EHLO client.example"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>"});
    CHECK(codes(relay.out) == std::vector<int>{250, 250, 451});
    CHECK(relay.opens == 1);
  }
  SUBCASE("the replay's connection lost too") {
    Relay relay;
    relay.every_loss_closed_idle = true;
    relay.group({"EHLO client.example"});
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "DATA"});
    relay.group({});
    relay.close_kept_once = true;
    relay.fail_at = relay.steps + 4;  // open (reused), write, read: closed (replayed); open, write: lost
    relay.group({"MAIL FROM:<a@example.net>", "RCPT TO:<c@contoso.com>"});
    CHECK(codes(relay.out) == std::vector<int>{250, 250, 250, 354, 250, 250, 451});
    CHECK(relay.opens == 3);
  }
}

namespace {

// Runs `script` with the N-th step failing, for every N until a run has no step left to fail, and checks
// the engine's invariants on each run.
void every_step_fails(bool pipelined_client, bool upstream_pipelining, bool kept_closes = false,
                      bool every_loss_closed_idle = false) {
  const std::vector<std::vector<std::string_view>> script{
      {"EHLO client.example"},
      {"MAIL FROM:<a@example.net>", "RCPT TO:<b@contoso.com>", "RCPT TO:<refused@contoso.com>",
       "RCPT TO:<c@example.org>", "DATA"},
      {"MAIL FROM:<a@example.net>", "RCPT TO:<d@contoso.com>", "DATA"},
      {"RSET"},
      {"MAIL FROM:<a@example.net>", "RCPT TO:<e@example.org>", "DATA"},
      {"QUIT"},
  };
  for (int fail_at = 1;; ++fail_at) {
    CAPTURE(fail_at);
    Relay relay;
    relay.fail_at = fail_at;
    relay.upstream_pipelining = upstream_pipelining;
    relay.kept_closes = kept_closes;
    relay.every_loss_closed_idle = every_loss_closed_idle;
    std::size_t commands = 0;
    for (const auto& group : script) {
      if (pipelined_client) {
        for (auto line : group) relay.command(line);
        relay.txn.flush();
        relay.drive();
      } else {
        for (auto line : group) relay.group({line});
      }
      commands += group.size();
    }
    const auto replies = replies_in(relay.out);
    int go_aheads = 0;
    int rcpt_2xx = 0;
    int final_2xx = 0;
    // Every command, and every message after a 354, has exactly one reply.
    for (const auto& reply : replies) go_aheads += reply.code == 354;
    CHECK(replies.size() == commands + go_aheads);
    // Walk the replies against the commands: which reply answered which RCPT and which message.
    std::size_t r = 0;
    for (const auto& group : script) {
      for (auto line : group) {
        REQUIRE(r < replies.size());
        const int code = replies[r++].code;
        if (line.starts_with("RCPT") && code / 100 == 2) ++rcpt_2xx;
        if (line == "DATA" && code == 354) {
          REQUIRE(r < replies.size());
          final_2xx += replies[r++].code / 100 == 2;
        }
      }
    }
    // Never a 2xx to RCPT or to the message that the upstream did not give; delivered once per 2xx.
    CHECK(rcpt_2xx <= relay.upstream_rcpt_2xx);
    CHECK(final_2xx <= relay.upstream_final_2xx);
    CHECK(relay.delivered == final_2xx);
    CHECK(relay.session.state() == ServerSession::State::closed);
    if (relay.steps < fail_at) {
      CHECK(relay.delivered == 3);  // the run without a failure delivers all three messages
      break;
    }
  }
}

}  // namespace

TEST_CASE("an error injected at every step: one reply per command, no 2xx the upstream did not give") {
  SUBCASE("client pipelines, upstream pipelines") { every_step_fails(true, true); }
  SUBCASE("client pipelines, upstream does not") { every_step_fails(true, false); }
  SUBCASE("client waits for each reply, upstream pipelines") { every_step_fails(false, true); }
  SUBCASE("client waits for each reply, upstream does not") { every_step_fails(false, false); }
  // The same with the losses of kept connections reported as idle closes (replayed), and with every loss
  // claiming to be one (the engine's own rules decide).
  SUBCASE("kept connections close: client pipelines, upstream pipelines") {
    every_step_fails(true, true, true);
  }
  SUBCASE("kept connections close: client pipelines, upstream does not") {
    every_step_fails(true, false, true);
  }
  SUBCASE("kept connections close: client waits, upstream pipelines") { every_step_fails(false, true, true); }
  SUBCASE("kept connections close: client waits, upstream does not") { every_step_fails(false, false, true); }
  SUBCASE("every loss claims an idle close") { every_step_fails(true, true, true, true); }
}
