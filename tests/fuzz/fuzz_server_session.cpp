// The whole client-facing pipeline as the daemon drives it: CommandFramer -> ServerSession, DATA through a
// DataFilter, upstream answers chosen by the input. Checks the session's promises: every local reply is one
// well-formed reply, refusals carry a reason, upstream steps happen only in the right states, the error limit
// holds, and nothing is executed after close.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/data_filter.hpp"
#include "proto/line_framer.hpp"
#include "proto/reply.hpp"
#include "proto/server_session.hpp"

using namespace mailflow::proto;
using Kind = ServerSession::ActionKind;
using State = ServerSession::State;

namespace {
void check_reply(const ServerSession::Action& a) {
  if (a.kind == Kind::begin_mail || a.kind == Kind::forward_rcpt || a.kind == Kind::begin_data) {
    FUZZ_CHECK(a.reply.empty());
    FUZZ_CHECK(a.reject_reason.empty());
    return;
  }
  if (a.kind == Kind::close && a.reply.empty()) {  // the tail of a line that had its reply: closed, counted
    FUZZ_CHECK(!a.reject_reason.empty());
    return;
  }
  const ReplyParseResult r = parse_reply(a.reply);
  FUZZ_CHECK(r.status == ReplyStatus::complete);
  FUZZ_CHECK(r.consumed == a.reply.size());
  FUZZ_CHECK(r.reply.code >= 200 && r.reply.code < 600);
  if (r.reply.code >= 400 && a.kind != Kind::close) FUZZ_CHECK(!a.reject_reason.empty());
  if (!a.reject_reason.empty()) FUZZ_CHECK(r.reply.code >= 400);
  if (a.kind == Kind::start_tls) FUZZ_CHECK(r.reply.code == 220);
  if (a.kind == Kind::reset) FUZZ_CHECK(r.reply.code == 250);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  ServerSession::Options options;
  options.hostname = "mx.example.org";
  options.starttls_available = data[0] & 1;
  options.max_recipients = 1 + (data[0] >> 1) % 4;
  options.max_bad_commands = 1 + data[1] % 8;
  options.max_message_size = 200;
  options.max_junk_commands = data[1] >> 3;  // 0 (no limit) .. 31; bits 0..2 give max_bad_commands
  const std::uint8_t upstream_seed = data[1];
  const unsigned waiting_pattern = data[0] >> 3;  // bits 3..7: unused by the options above
  unsigned lines = 0;
  std::string_view input(reinterpret_cast<const char*>(data + 2), size - 2);

  ServerSession session(options);
  CommandFramer framer;
  std::uint32_t upstream_counter = upstream_seed;
  auto upstream_code = [&upstream_counter]() { return (++upstream_counter % 3) == 0 ? 550 : 250; };

  while (!input.empty() && session.state() != State::closed) {
    const auto ev = framer.next(input);
    FUZZ_CHECK(ev.consumed <= input.size());
    if (ev.kind == CommandFramer::Kind::need_more) break;
    const State before = session.state();
    const std::uint32_t bad_before = session.bad_commands();
    // Whether the rest of the input came in the same read as this line (the daemon's read buffer holds it):
    // data[0]'s high bits, one per command in turn, so that a conversation can also get past its EHLO.
    const bool input_waiting = input.size() > ev.consumed && ((waiting_pattern >> (lines++ % 5)) & 1) != 0;
    const bool was_announced = session.pipelining_announced();
    ServerSession::Action a = ev.kind == CommandFramer::Kind::line ? session.on_line(ev.line, input_waiting)
                                                                   : session.on_framing_error(ev.kind);
    input.remove_prefix(ev.consumed);
    check_reply(a);
    // RFC 2920: nothing runs with input behind it unless PIPELINING was announced, and never DATA.
    if (ev.kind == CommandFramer::Kind::line && input_waiting && !was_announced)
      FUZZ_CHECK(a.kind == Kind::close || a.kind == Kind::start_tls);
    if (a.kind == Kind::begin_data) FUZZ_CHECK(!input_waiting);
    if (a.reject_reason == "unauth_pipelining") FUZZ_CHECK(input_waiting && a.kind == Kind::close);
    FUZZ_CHECK(session.bad_commands() <= options.max_bad_commands);
    FUZZ_CHECK(session.bad_commands() >= bad_before);
    // A command that got a positive answer counts as a bad command only as junk beyond max_junk_commands.
    if (session.bad_commands() > bad_before && !a.reply.empty() && a.reply[0] == '2')
      FUZZ_CHECK(options.max_junk_commands != 0 && session.junk_commands() > options.max_junk_commands);
    if (a.kind == Kind::close) FUZZ_CHECK(session.state() == State::closed);
    switch (a.kind) {
      case Kind::begin_mail:
        FUZZ_CHECK(before == State::ready);
        FUZZ_CHECK(session.last_command().verb == Verb::mail);
        FUZZ_CHECK(session.last_command().size <= options.max_message_size);
        session.on_mail_reply(upstream_code());
        break;
      case Kind::forward_rcpt:
        FUZZ_CHECK(before == State::mail || before == State::rcpt);
        FUZZ_CHECK(session.accepted_recipients() < options.max_recipients);
        session.on_rcpt_reply(upstream_code());
        break;
      case Kind::begin_data: {
        FUZZ_CHECK(before == State::rcpt);
        FUZZ_CHECK(session.accepted_recipients() > 0);
        if (upstream_code() == 550) {  // upstream refused DATA: no 354, the client's next line is a command
          session.on_data_finished();
          break;
        }
        DataFilter filter({});
        std::string out;
        input.remove_prefix(filter.feed(input, out));
        for (std::size_t i = 0; i < out.size(); ++i) {
          if (out[i] == '\n') FUZZ_CHECK(i > 0 && out[i - 1] == '\r');
        }
        if (!filter.done()) return 0;  // the client never finished the message
        session.on_data_finished();
        break;
      }
      case Kind::start_tls:
        FUZZ_CHECK(options.starttls_available && !session.tls_active());
        // Whatever was pipelined behind STARTTLS is discarded, as the daemon must.
        input = {};
        session.on_tls_started();
        FUZZ_CHECK(session.state() == State::need_helo);
        break;
      default:
        break;
    }
  }
  return 0;
}
