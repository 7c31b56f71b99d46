#include "proto/server_session.hpp"

#include <doctest/doctest.h>

#include <optional>
#include <string>
#include <vector>

#include "split_helpers.hpp"

using namespace mailflow::proto;
using mailflow::test::printable;
using Kind = ServerSession::ActionKind;
using State = ServerSession::State;

namespace {

ServerSession::Options opts() {
  ServerSession::Options o;
  o.hostname = "mx.example.org";
  o.starttls_available = true;
  o.max_message_size = 1000;
  o.max_recipients = 2;
  o.max_bad_commands = 20;
  return o;
}

// One line of a scripted conversation: what the client says, what the session must do, and (for the upstream
// steps) what the upstream answered.
struct Turn {
  std::string line;
  Kind kind;
  std::string reply_prefix;  // the reply must start with this ("" when the action has no local reply)
  std::string reason;        // expected reject_reason ("" for none)
  std::optional<int> upstream = std::nullopt;
  State after = State::ready;
};

void play(ServerSession& s, const Turn& t) {
  INFO("line: " << t.line);
  const auto a = s.on_line(t.line, false);
  CHECK(a.kind == t.kind);
  CHECK_MESSAGE(a.reply.rfind(t.reply_prefix, 0) == 0, "reply: ", printable(a.reply));
  if (t.reply_prefix.empty()) CHECK(a.reply.empty());
  CHECK(a.reject_reason == t.reason);
  if (!a.reply.empty()) {
    CHECK(a.reply.size() >= 2);
    CHECK(a.reply.substr(a.reply.size() - 2) == "\r\n");
  }
  switch (a.kind) {
    case Kind::begin_mail:
      REQUIRE(t.upstream.has_value());
      s.on_mail_reply(*t.upstream);
      break;
    case Kind::forward_rcpt:
      REQUIRE(t.upstream.has_value());
      s.on_rcpt_reply(*t.upstream);
      break;
    case Kind::begin_data:
      s.on_data_finished();
      break;
    case Kind::start_tls:
      s.on_tls_started();
      break;
    default:
      break;
  }
  CHECK(s.state() == t.after);
}

const std::string ehlo_reply =
    "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
    "250 STARTTLS\r\n";

std::vector<Turn> happy_path() {
  return {
      {"EHLO client.example", Kind::reply, ehlo_reply, "", {}, State::ready},
      {"MAIL FROM:<a@b.example> SIZE=100", Kind::begin_mail, "", "", 250, State::mail},
      {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt},
      {"RCPT TO:<e@d.example>", Kind::forward_rcpt, "", "", 550, State::rcpt},
      {"DATA", Kind::begin_data, "", "", {}, State::ready},
      {"MAIL FROM:<>", Kind::begin_mail, "", "", 250, State::mail},
      {"RSET", Kind::reset, "250 2.0.0 Ok\r\n", "", {}, State::ready},
      {"QUIT", Kind::close, "221 2.0.0 Bye\r\n", "", {}, State::closed},
  };
}

// Commands that are refused in any open state and change nothing.
struct Injection {
  std::string line;
  std::string reply_prefix;
  std::string reason;
};
const std::vector<Injection> injections = {
    {"FOO", "500 5.5.2 ", "unrecognized_command"},
    {"", "500 5.5.2 ", "unrecognized_command"},
    {std::string("NO\0OP", 5), "500 5.5.2 ", "bad_bytes"},
    {"NOOP \xff", "500 5.5.2 ", "bad_bytes"},
    {"VRFY root", "502 5.5.1 ", "vrfy_disabled"},
    {"EXPN staff", "502 5.5.1 ", "vrfy_disabled"},
    {"AUTH PLAIN AGFhAGI=", "502 5.5.1 ", "not_implemented"},
    {"EHLO", "501 5.5.4 ", "syntax_error"},
};

}  // namespace

TEST_CASE("ServerSession: banner") {
  ServerSession s(opts());
  CHECK(s.banner() == "220 mx.example.org ESMTP mailflowd\r\n");
  CHECK(s.state() == State::need_helo);
}

TEST_CASE("ServerSession: the happy path") {
  ServerSession s(opts());
  for (const auto& t : happy_path()) play(s, t);
  CHECK(s.bad_commands() == 0);
}

TEST_CASE("ServerSession: an error injected before each step changes nothing but the error count") {
  const auto script = happy_path();
  for (std::size_t at = 0; at < script.size(); ++at) {
    for (const auto& inj : injections) {
      CAPTURE(at);
      INFO("injected: " << printable(inj.line));
      ServerSession s(opts());
      for (std::size_t i = 0; i < script.size(); ++i) {
        if (i == at) {
          const State before = s.state();
          const auto a = s.on_line(inj.line, false);
          CHECK(a.kind == Kind::reply);
          CHECK_MESSAGE(a.reply.rfind(inj.reply_prefix, 0) == 0, printable(a.reply));
          CHECK(a.reject_reason == inj.reason);
          CHECK(s.state() == before);
          CHECK(s.bad_commands() == 1);
        }
        play(s, script[i]);
      }
    }
  }
}

TEST_CASE("ServerSession: framing errors injected at each step") {
  const auto script = happy_path();
  for (std::size_t at = 0; at < script.size(); ++at) {
    ServerSession s(opts());
    for (std::size_t i = 0; i < script.size(); ++i) {
      if (i == at) {
        auto a = s.on_framing_error(CommandFramer::Kind::too_long);
        CHECK(a.kind == Kind::reply);
        CHECK(a.reply == "500 5.5.2 Line too long\r\n");
        CHECK(a.reject_reason == "line_too_long");
        a = s.on_framing_error(CommandFramer::Kind::bad_newline);
        CHECK(a.kind == Kind::reply);
        CHECK(a.reply.rfind("500 5.5.2 ", 0) == 0);
        CHECK(a.reply.find("bare CR or LF") != std::string::npos);
        CHECK(a.reject_reason == "bare_newline_command");
        CHECK(s.bad_commands() == 2);
      }
      play(s, script[i]);
    }
  }
}

TEST_CASE("ServerSession: upstream refusals injected at each upstream step") {
  SUBCASE("MAIL refused upstream: no transaction") {
    ServerSession s(opts());
    play(s, {"EHLO c", Kind::reply, "250-", "", {}, State::ready});
    play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 451, State::ready});
    play(s, {"RCPT TO:<c@d.example>",
             Kind::reply,
             "503 5.5.1 Error: need MAIL command",
             "bad_sequence",
             {},
             State::ready});
    play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  }
  SUBCASE("every RCPT refused upstream: DATA gets 554 no valid recipients") {
    ServerSession s(opts());
    play(s, {"EHLO c", Kind::reply, "250-", "", {}, State::ready});
    play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
    play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 550, State::mail});
    play(s, {"DATA",
             Kind::reply,
             "554 5.5.1 Error: no valid recipients",
             "no_valid_recipients",
             {},
             State::mail});
    CHECK(s.accepted_recipients() == 0);
    play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
    CHECK(s.accepted_recipients() == 1);
    play(s, {"DATA", Kind::begin_data, "", "", {}, State::ready});
  }
  SUBCASE("upstream lost mid-transaction") {
    ServerSession s(opts());
    play(s, {"EHLO c", Kind::reply, "250-", "", {}, State::ready});
    play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
    play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
    s.on_transaction_aborted();
    CHECK(s.state() == State::ready);
    CHECK(s.accepted_recipients() == 0);
    play(s, {"DATA", Kind::reply, "503 5.5.1 Error: need RCPT command", "bad_sequence", {}, State::ready});
  }
}

TEST_CASE("ServerSession: sequencing") {
  ServerSession s(opts());
  play(s, {"MAIL FROM:<a@b.example>",
           Kind::reply,
           "503 5.5.1 Error: send HELO/EHLO first",
           "bad_sequence",
           {},
           State::need_helo});
  play(s, {"RCPT TO:<c@d.example>",
           Kind::reply,
           "503 5.5.1 Error: need MAIL command",
           "bad_sequence",
           {},
           State::need_helo});
  play(s, {"DATA", Kind::reply, "503 5.5.1 Error: need RCPT command", "bad_sequence", {}, State::need_helo});
  play(s, {"NOOP", Kind::reply, "250 2.0.0 Ok\r\n", "", {}, State::need_helo});
  play(s, {"RSET", Kind::reset, "250 2.0.0 Ok\r\n", "", {}, State::need_helo});
  play(s, {"HELP", Kind::reply, "214 2.0.0 ", "", {}, State::need_helo});
  play(s, {"HELO client", Kind::reply, "250 mx.example.org\r\n", "", {}, State::ready});
  CHECK_FALSE(s.esmtp());
  CHECK(s.helo_name() == "client");
  play(s, {"RCPT TO:<c@d.example>",
           Kind::reply,
           "503 5.5.1 Error: need MAIL command",
           "bad_sequence",
           {},
           State::ready});
  play(s, {"DATA", Kind::reply, "503 5.5.1 Error: need RCPT command", "bad_sequence", {}, State::ready});
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  CHECK(s.last_command().address == "a@b.example");
  play(s, {"MAIL FROM:<a@b.example>",
           Kind::reply,
           "503 5.5.1 Error: nested MAIL command",
           "bad_sequence",
           {},
           State::mail});
  // No RCPT command yet: a sequence error (554 "no valid recipients" is for RCPTs that all failed).
  play(s, {"DATA", Kind::reply, "503 5.5.1 Error: need RCPT command", "bad_sequence", {}, State::mail});
  play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"MAIL FROM:<a@b.example>",
           Kind::reply,
           "503 5.5.1 Error: nested MAIL command",
           "bad_sequence",
           {},
           State::rcpt});
  CHECK(s.bad_commands() == 8);
}

TEST_CASE("ServerSession: EHLO/HELO inside a transaction resets it") {
  ServerSession s(opts());
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  CHECK(s.esmtp());
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"HELO again", Kind::reset, "250 mx.example.org\r\n", "", {}, State::ready});
  CHECK(s.accepted_recipients() == 0);
  CHECK_FALSE(s.esmtp());
  CHECK(s.helo_name() == "again");
  play(s, {"EHLO third", Kind::reply, "250-mx.example.org\r\n", "", {}, State::ready});
}

TEST_CASE("ServerSession: argument errors") {
  ServerSession s(opts());
  play(s, {"EHLO c", Kind::reply, "250-", "", {}, State::ready});
  play(s, {"MAIL TO:<a@b.example>", Kind::reply, "501 5.5.4 ", "syntax_error", {}, State::ready});
  play(s, {"MAIL FROM:<a b@c>", Kind::reply, "501 5.1.7 ", "bad_address", {}, State::ready});
  play(s,
       {"MAIL FROM:<a@b.example> FOO=1", Kind::reply, "555 5.5.4 ", "unknown_parameter", {}, State::ready});
  play(s,
       {"MAIL FROM:<a@b.example> SIZE=1001", Kind::reply, "552 5.3.4 ", "message_too_big", {}, State::ready});
  play(s, {"MAIL FROM:<a@b.example> SIZE=1000", Kind::begin_mail, "", "", 250, State::mail});
  CHECK(s.last_command().size == 1000);
  play(s, {"RCPT TO:<>", Kind::reply, "501 5.1.3 ", "bad_address", {}, State::mail});
  play(s, {"RCPT TO:<x@y.example> NOTIFY=NEVER",
           Kind::reply,
           "555 5.5.4 ",
           "unknown_parameter",
           {},
           State::mail});
  play(s, {"DATA x", Kind::reply, "554 5.5.1 ", "no_valid_recipients", {}, State::mail});
  play(s, {"RCPT TO:<x@y.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"DATA x", Kind::reply, "501 5.5.4 Syntax: DATA", "syntax_error", {}, State::rcpt});
  play(s, {"RSET x", Kind::reply, "501 5.5.4 Syntax: RSET", "syntax_error", {}, State::rcpt});
  play(s, {"QUIT now", Kind::close, "221 2.0.0 ", "", {}, State::closed});
}

TEST_CASE("ServerSession: max_recipients gives 452 for each extra RCPT") {
  ServerSession s(opts());
  play(s, {"EHLO c", Kind::reply, "250-", "", {}, State::ready});
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<1@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"RCPT TO:<2@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"RCPT TO:<3@d.example>",
           Kind::reply,
           "452 4.5.3 Error: too many recipients",
           "too_many_recipients",
           {},
           State::rcpt});
  play(s, {"RCPT TO:<4@d.example>", Kind::reply, "452 4.5.3 ", "too_many_recipients", {}, State::rcpt});
  CHECK(s.bad_commands() == 0);  // 4xx are not errors of the client's making
  play(s, {"DATA", Kind::begin_data, "", "", {}, State::ready});
  // A new transaction starts from zero.
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<1@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
}

TEST_CASE("ServerSession: STARTTLS") {
  SUBCASE("the normal upgrade, then a new EHLO is required and STARTTLS is no longer offered") {
    ServerSession s(opts());
    play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
    play(s, {"STARTTLS", Kind::start_tls, "220 2.0.0 Ready to start TLS\r\n", "", {}, State::need_helo});
    CHECK(s.tls_active());
    CHECK(s.helo_name().empty());        // a new EHLO is needed...
    CHECK(s.helo_before_tls() == "c");   // ...but the one before STARTTLS attributes a failed handshake
    play(s, {"MAIL FROM:<a@b.example>",
             Kind::reply,
             "503 5.5.1 Error: send HELO/EHLO first",
             "bad_sequence",
             {},
             State::need_helo});
    play(s, {"EHLO c", Kind::reply, "250-mx.example.org\r\n", "", {}, State::ready});
    const auto a = s.on_line("EHLO c", false);
    CHECK(a.reply.find("STARTTLS") == std::string::npos);
    CHECK(a.reply.find("250 ENHANCEDSTATUSCODES\r\n") != std::string::npos);
    play(s, {"STARTTLS", Kind::reply, "503 5.5.1 ", "starttls_twice", {}, State::ready});
  }
  SUBCASE("not available") {
    auto o = opts();
    o.starttls_available = false;
    ServerSession s(o);
    const auto a = s.on_line("EHLO c", false);
    CHECK(a.reply.find("STARTTLS") == std::string::npos);
    play(s, {"STARTTLS", Kind::reply, "502 5.5.1 ", "starttls_unavailable", {}, State::ready});
    play(s, {"STARTTLS x", Kind::reply, "502 5.5.1 ", "starttls_unavailable", {}, State::ready});
  }
  SUBCASE("with an argument, or inside a transaction") {
    ServerSession s(opts());
    play(s, {"EHLO c", Kind::reply, "250-", "", {}, State::ready});
    play(s, {"STARTTLS now", Kind::reply, "501 5.5.4 ", "syntax_error", {}, State::ready});
    play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
    play(s, {"STARTTLS", Kind::reply, "503 5.5.1 ", "bad_sequence", {}, State::mail});
    CHECK_FALSE(s.tls_active());
  }
  SUBCASE("before EHLO is accepted too (RFC 3207 leaves it to the server)") {
    ServerSession s(opts());
    play(s, {"STARTTLS", Kind::start_tls, "220 2.0.0 ", "", {}, State::need_helo});
  }
}

TEST_CASE("ServerSession: max_bad_commands ends the session with 421") {
  auto o = opts();
  o.max_bad_commands = 3;
  ServerSession s(o);
  play(s, {"FOO", Kind::reply, "500 5.5.2 ", "unrecognized_command", {}, State::need_helo});
  play(s, {"MAIL FROM:<a@b.example>", Kind::reply, "503 5.5.1 ", "bad_sequence", {}, State::need_helo});
  CHECK(s.bad_commands() == 2);
  const auto a = s.on_framing_error(CommandFramer::Kind::too_long);
  CHECK(a.kind == Kind::close);
  CHECK(a.reply == "421 4.7.0 mx.example.org Error: too many errors\r\n");
  CHECK(a.reject_reason == "too_many_bad_commands");
  CHECK(s.state() == State::closed);
  const auto after = s.on_line("NOOP", false);
  CHECK(after.kind == Kind::close);
  CHECK(after.reply.rfind("421 ", 0) == 0);
}

TEST_CASE("ServerSession: a line ended by a bare LF is answered once and closes the session") {
  // "MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n": the client may believe the line runs to the CRLF, so its tail must
  // never be answered as a command of its own.
  const auto script = happy_path();
  for (std::size_t at = 0; at < script.size(); ++at) {
    ServerSession s(opts());
    for (std::size_t i = 0; i < at; ++i) play(s, script[i]);
    const auto a = s.on_framing_error(CommandFramer::Kind::bare_lf);
    CHECK(a.kind == Kind::close);
    CHECK(a.reply == "500 5.5.2 Error: bare LF in command\r\n");
    CHECK(a.reject_reason == "bare_newline_command");
    CHECK(s.state() == State::closed);
    const auto after = s.on_line("RCPT TO:<c@d.example>", false);
    CHECK(after.kind == Kind::close);
    CHECK(after.reject_reason.empty());
  }
}

TEST_CASE("ServerSession: BDAT is refused once and closes the session, its chunk never read as commands") {
  // No CHUNKING is announced, but a client that sends BDAT sends its chunk behind it whatever the reply
  // (RFC 3030 2), in the same read or a later one: where the chunk ends is unknowable.
  const auto script = happy_path();
  for (std::size_t at = 0; at < script.size(); ++at) {
    CAPTURE(at);
    ServerSession s(opts());
    for (std::size_t i = 0; i < at; ++i) play(s, script[i]);
    if (s.state() == State::closed) continue;
    const auto a = s.on_line("BDAT 64 LAST", false);
    CHECK(a.kind == Kind::close);
    CHECK(a.reply.starts_with("502 5.5.1 "));
    CHECK(a.reject_reason == "not_implemented");
    CHECK(s.state() == State::closed);
    const auto after = s.on_line("MAIL FROM:<a@b.example>", false);
    CHECK(after.kind == Kind::close);
    CHECK(after.reject_reason.empty());
  }
}

TEST_CASE("ServerSession: an over-long line ended by a bare LF closes the session without a second reply") {
  ServerSession s(opts());
  s.on_line("EHLO c", false);
  const auto first = s.on_framing_error(CommandFramer::Kind::too_long);
  CHECK(first.kind == Kind::reply);
  CHECK(first.reply.rfind("500 5.5.2 ", 0) == 0);
  const auto tail = s.on_framing_error(CommandFramer::Kind::too_long_bare_lf);
  CHECK(tail.kind == Kind::close);
  CHECK(tail.reply.empty());
  CHECK(tail.reject_reason == "bare_newline_command");
  CHECK(s.state() == State::closed);
}

TEST_CASE("ServerSession: a pipelining daemon gets the same answers") {
  // MAIL, RCPT, DATA processed before the upstream answered MAIL/RCPT.
  ServerSession s(opts());
  s.on_line("EHLO c", false);
  CHECK(s.on_line("MAIL FROM:<a@b.example>", false).kind == Kind::begin_mail);
  CHECK(s.on_line("RCPT TO:<c@d.example>", false).kind == Kind::forward_rcpt);
  CHECK(s.on_line("RCPT TO:<e@d.example>", false).kind == Kind::forward_rcpt);
  CHECK(s.on_line("RCPT TO:<f@d.example>", false).kind == Kind::reply);  // over max_recipients (2)
  CHECK(s.on_line("DATA", false).kind == Kind::begin_data);
  s.on_mail_reply(250);
  s.on_rcpt_reply(250);
  s.on_rcpt_reply(550);
  CHECK(s.state() == State::rcpt);
  CHECK(s.accepted_recipients() == 1);
  s.on_data_finished();
  CHECK(s.state() == State::ready);
}

namespace {
// The daemon's loop without sockets: bytes -> CommandFramer -> ServerSession, every action written down.
std::vector<std::string> converse(const std::vector<std::string>& chunks) {
  auto o = opts();
  o.max_bad_commands = 4;
  ServerSession s(o);
  CommandFramer framer;
  std::vector<std::string> log;
  std::string buf;
  for (const auto& chunk : chunks) {
    buf += chunk;
    while (s.state() != State::closed) {
      const auto ev = framer.next(buf);
      ServerSession::Action a;
      if (ev.kind == CommandFramer::Kind::line) {
        a = s.on_line(ev.line, false);
      } else if (ev.kind != CommandFramer::Kind::need_more) {
        a = s.on_framing_error(ev.kind);
      }
      buf.erase(0, ev.consumed);
      if (ev.kind == CommandFramer::Kind::need_more) break;
      if (a.kind == Kind::begin_mail) s.on_mail_reply(250);
      if (a.kind == Kind::forward_rcpt) s.on_rcpt_reply(250);
      if (a.kind == Kind::begin_data) s.on_data_finished();
      log.push_back(std::to_string(static_cast<int>(a.kind)) + " " + a.reply + std::string(a.reject_reason));
    }
  }
  return log;
}
}  // namespace

TEST_CASE("ServerSession behind CommandFramer: a pipelined conversation cut at every byte boundary") {
  const std::string stream =
      "EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" +
      std::string(600, 'x') + "\r\nNOOP\rX\r\nVRFY x\r\nMAIL FROM:<a@b.example>\r\n" + "DATA\r\nRSET\r\nQUIT\r\n";
  const auto whole = converse({stream});
  REQUIRE(whole.size() == 9);
  CHECK(whole[4].find("line_too_long") != std::string::npos);
  CHECK(whole[5].find("bare_newline_command") != std::string::npos);
  CHECK(whole[6].find("vrfy_disabled") != std::string::npos);
  CHECK(whole[7].rfind("3 ", 0) == 0);                                                           // begin_mail
  CHECK(whole[8].find("421 4.7.0 mx.example.org Error: too many errors") != std::string::npos);  // 4th error
  for (const auto& chunks : mailflow::test::splits_of(stream)) {
    CHECK(converse(chunks) == whole);
  }
}

TEST_CASE("ServerSession behind CommandFramer: a bare LF closes the session at every byte boundary") {
  const std::string stream = "EHLO c.example\r\nMAIL FROM:<a@b.example>\nRCPT TO:<c@d.example>\r\nNOOP\r\n";
  const auto whole = converse({stream});
  REQUIRE(whole.size() == 2);
  CHECK(whole[1].find("500 5.5.2 Error: bare LF in command") != std::string::npos);
  CHECK(whole[1].find("bare_newline_command") != std::string::npos);
  for (const auto& chunks : mailflow::test::splits_of(stream)) {
    CHECK(converse(chunks) == whole);
  }
}

namespace {
// A session greeted with `greeting` (nothing waiting behind it), the upstream accepting everything.
ServerSession greeted_with(const std::string& greeting) {
  ServerSession s(opts());
  if (!greeting.empty()) REQUIRE(s.on_line(greeting, false).kind == Kind::reply);
  return s;
}

void check_refused_for_pipelining(ServerSession& s, const std::string& line) {
  INFO("line: " << line);
  const auto a = s.on_line(line, true);
  CHECK(a.kind == Kind::close);
  CHECK(a.reply == "554 5.5.0 Error: SMTP protocol synchronization\r\n");
  CHECK(a.reject_reason == "unauth_pipelining");
  CHECK(s.state() == State::closed);
}
}  // namespace

TEST_CASE("input behind a command that must end an RFC 2920 group: 554 5.5.0, close, the command not run") {
  for (const std::string line : {"EHLO c", "HELO c", "NOOP", "VRFY postmaster", "EXPN staff"}) {
    auto s = greeted_with("EHLO c");
    check_refused_for_pipelining(s, line);
  }
  auto s = greeted_with("EHLO c");
  CHECK(s.on_line("MAIL FROM:<a@b.example>", true).kind == Kind::begin_mail);
  s.on_mail_reply(250);
  CHECK(s.on_line("RCPT TO:<c@d.example>", true).kind == Kind::forward_rcpt);
  s.on_rcpt_reply(250);
  // The message sent behind DATA, without waiting for the 354 (or the upstream's refusal of DATA).
  check_refused_for_pipelining(s, "DATA");
  CHECK(s.on_line("MAIL FROM:<a@b.example>", false).kind == Kind::close);  // nothing runs after it

  auto before_ehlo = greeted_with("");
  check_refused_for_pipelining(before_ehlo, "EHLO c");
}

TEST_CASE("input behind any command while PIPELINING was not announced: 554 5.5.0 and close") {
  for (const std::string line : {"MAIL FROM:<a@b.example>", "RSET", "HELP", "XYZZY"}) {
    auto helo = greeted_with("HELO c");
    check_refused_for_pipelining(helo, line);
    auto not_greeted = greeted_with("");
    check_refused_for_pipelining(not_greeted, line);
  }
  // After STARTTLS the EHLO reply that announced it no longer holds.
  auto s = greeted_with("EHLO c");
  REQUIRE(s.on_line("STARTTLS", false).kind == Kind::start_tls);
  s.on_tls_started();
  CHECK_FALSE(s.pipelining_announced());
  check_refused_for_pipelining(s, "RSET");
}

TEST_CASE("pipelining RFC 2920 allows after the EHLO reply, and STARTTLS, are not refused") {
  auto s = greeted_with("EHLO c");
  CHECK(s.pipelining_announced());
  CHECK(s.on_line("RSET", true).kind == Kind::reset);
  CHECK(s.on_line("HELP", true).kind == Kind::reply);
  const auto unknown = s.on_line("XYZZY", true);  // an ordinary bad command, answered as one
  CHECK(unknown.reject_reason == "unrecognized_command");
  CHECK(s.on_line("MAIL FROM:<a@b.example>", true).kind == Kind::begin_mail);
  s.on_mail_reply(250);
  CHECK(s.on_line("RCPT TO:<c@d.example>", true).kind == Kind::forward_rcpt);
  s.on_rcpt_reply(250);
  CHECK(s.on_line("DATA", false).kind == Kind::begin_data);
  // STARTTLS keeps its own rule: what was pipelined behind it is the daemon's to discard
  // (starttls_pipelining).
  auto helo = greeted_with("HELO c");
  CHECK(helo.on_line("STARTTLS", true).kind == Kind::start_tls);
  // QUIT ends the session whatever is behind it (a TLS client's close_notify, say): its 221.
  auto quitting = greeted_with("HELO c");
  const auto quit = quitting.on_line("QUIT", true);
  CHECK(quit.kind == Kind::close);
  CHECK(quit.reply.starts_with("221 "));
  CHECK(quit.reject_reason.empty());
  // A refused STARTTLS discards nothing: the usual rule.
  auto o = opts();
  o.starttls_available = false;
  ServerSession no_tls(o);
  REQUIRE(no_tls.on_line("HELO c", false).kind == Kind::reply);
  check_refused_for_pipelining(no_tls, "STARTTLS");
}

TEST_CASE("ServerSession: junk commands beyond max_junk_commands count as bad commands") {
  auto o = opts();
  o.max_junk_commands = 3;
  o.max_bad_commands = 3;
  ServerSession s(o);
  // EHLO, HELO, RSET, NOOP, HELP: each carries no mail, so each is junk; the first three are free.
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  play(s, {"NOOP", Kind::reply, "250 2.0.0 ", "", {}, State::ready});
  play(s, {"RSET", Kind::reset, "250 2.0.0 ", "", {}, State::ready});
  CHECK(s.bad_commands() == 0);
  // Beyond the limit each one keeps its own answer but counts as a bad command...
  play(s, {"HELP", Kind::reply, "214 2.0.0 ", "", {}, State::ready});
  play(s, {"HELO c", Kind::reply, "250 mx.example.org", "", {}, State::ready});
  CHECK(s.bad_commands() == 2);
  CHECK(s.junk_commands() == 5);
  // ...and the max_bad_commands-th is answered with the 421 that ends the session.
  const auto a = s.on_line("NOOP", false);
  CHECK(a.kind == Kind::close);
  CHECK(a.reply == "421 4.7.0 mx.example.org Error: too many errors\r\n");
  CHECK(a.reject_reason == "too_many_bad_commands");
  CHECK(s.state() == State::closed);
}

TEST_CASE("ServerSession: junk commands refused for their syntax count once") {
  auto o = opts();
  o.max_junk_commands = 1;
  ServerSession s(o);
  play(s, {"EHLO", Kind::reply, "501 5.5.4 ", "syntax_error", {}, State::need_helo});
  CHECK(s.bad_commands() == 1);
  CHECK(s.junk_commands() == 0);  // a refused command is a bad command, not junk besides
}

TEST_CASE("ServerSession: a delivered message starts the junk count over") {
  auto o = opts();
  o.max_junk_commands = 2;
  ServerSession s(o);
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  play(s, {"NOOP", Kind::reply, "250 2.0.0 ", "", {}, State::ready});
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"DATA", Kind::begin_data, "", "", {}, State::ready});
  // A refused message is no delivery: the count goes on.
  CHECK(s.junk_commands() == 2);
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"DATA", Kind::begin_data, "", "", {}, State::ready});
  s.on_message_delivered();
  CHECK(s.junk_commands() == 0);
  play(s, {"NOOP", Kind::reply, "250 2.0.0 ", "", {}, State::ready});
  play(s, {"RSET", Kind::reset, "250 2.0.0 ", "", {}, State::ready});
  CHECK(s.bad_commands() == 0);
  play(s, {"NOOP", Kind::reply, "250 2.0.0 ", "", {}, State::ready});
  CHECK(s.bad_commands() == 1);
}

TEST_CASE("ServerSession: a delivered message starts the bad command count over, as Postfix's error count") {
  // smtpd_hard_error_limit is "the maximal number of errors a remote SMTP client is allowed to make without
  // delivering mail": a client that makes a few mistakes in each of many messages it delivers is not cut off.
  auto o = opts();
  o.max_bad_commands = 3;
  ServerSession s(o);
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  play(s, {"FOO", Kind::reply, "500 5.5.2 ", "unrecognized_command", {}, State::ready});
  play(s, {"BAR", Kind::reply, "500 5.5.2 ", "unrecognized_command", {}, State::ready});
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 250, State::rcpt});
  play(s, {"DATA", Kind::begin_data, "", "", {}, State::ready});
  s.on_message_delivered();
  CHECK(s.bad_commands() == 0);
  play(s, {"FOO", Kind::reply, "500 5.5.2 ", "unrecognized_command", {}, State::ready});
  play(s, {"BAR", Kind::reply, "500 5.5.2 ", "unrecognized_command", {}, State::ready});
  play(s, {"BAZ", Kind::close, "421 4.7.0 ", "too_many_bad_commands", {}, State::closed});
}

TEST_CASE("ServerSession: refusals relayed for MAIL and RCPT count with the client's own bad commands") {
  auto o = opts();
  o.max_bad_commands = 3;
  ServerSession s(o);
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  play(s, {"FOO", Kind::reply, "500 5.5.2 ", "unrecognized_command", {}, State::ready});
  play(s, {"MAIL FROM:<a@b.example>", Kind::begin_mail, "", "", 250, State::mail});
  play(s, {"RCPT TO:<c@d.example>", Kind::forward_rcpt, "", "", 550, State::mail});
  CHECK(s.on_refusal().empty());  // the second
  CHECK(s.bad_commands() == 2);
  play(s, {"RCPT TO:<e@d.example>", Kind::forward_rcpt, "", "", 550, State::mail});
  const std::string goodbye = s.on_refusal();  // the third: the 421 follows the refusal
  CHECK(goodbye.starts_with("421 4.7.0 "));
  CHECK(s.state() == State::closed);
  CHECK(s.on_refusal().empty());  // closed: no second 421
}

TEST_CASE("ServerSession: max_junk_commands 0 means no limit") {
  auto o = opts();
  o.max_junk_commands = 0;
  o.max_bad_commands = 2;
  ServerSession s(o);
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  for (int i = 0; i < 1000; ++i) {
    CAPTURE(i);
    play(s, {"NOOP", Kind::reply, "250 2.0.0 ", "", {}, State::ready});
  }
  CHECK(s.bad_commands() == 0);
}

TEST_CASE("ServerSession: by default a NOOP loop is ended after max_junk_commands + max_bad_commands") {
  auto o = opts();
  o.max_bad_commands = 20;
  ServerSession s(o);
  CHECK(o.max_junk_commands == 100);
  play(s, {"EHLO c", Kind::reply, ehlo_reply, "", {}, State::ready});
  int answered = 1;
  while (answered < 1000 && s.on_line("NOOP", false).kind == Kind::reply) ++answered;
  CHECK(answered == 100 + 19);  // the 120th junk command gets the 421
  CHECK(s.state() == State::closed);
}
