#pragma once
// The client-facing SMTP conversation as a transition table (state x command -> action, next state).
// Sans-I/O: it never touches a socket. The daemon feeds it framed lines and upstream outcomes and performs
// the actions it returns.
#include <cstdint>
#include <string>
#include <string_view>

#include "proto/command.hpp"
#include "proto/line_framer.hpp"

namespace mailflow::proto {

class ServerSession {
 public:
  struct Options {
    std::string hostname = "localhost";
    bool starttls_available = false;  // listener has certificates
    std::uint64_t max_message_size = 36700160;
    std::uint32_t max_recipients = 100;
    std::uint32_t max_bad_commands = 20;
    // Like Postfix's smtpd_junk_command_limit: EHLO, HELO, RSET, NOOP and HELP carry no mail and are answered
    // locally, so a client could repeat them forever (one per timeouts.command) and hold its session slots.
    // Those beyond this many count as bad commands (towards max_bad_commands) until a message is delivered;
    // 0 means no limit.
    std::uint32_t max_junk_commands = 100;
  };

  enum class State {
    need_helo,  // after the banner, and after STARTTLS
    ready,      // greeted, no transaction
    mail,       // MAIL accepted upstream, no recipient yet
    rcpt,       // at least one recipient accepted
    closed,
  };

  enum class ActionKind {
    reply,             // send `reply` to the client, nothing else
    close,             // send `reply` (421/221/...), then close the connection
    start_tls,         // send `reply` (220), then run the TLS handshake and call on_tls_started()
    begin_mail,        // choose connector/upstream, forward MAIL (command.address, command.size), then
                       // relay the upstream reply and call on_mail_reply(code)
    forward_rcpt,      // forward RCPT, relay the upstream reply, call on_rcpt_reply(code)
    begin_data,        // send DATA upstream; on 354 tell the client 354 and stream; then on_data_finished()
    reset,             // send `reply` (250) to the client and abort any upstream transaction (RSET)
  };

  struct Action {
    ActionKind kind = ActionKind::reply;
    std::string reply;               // wire form, CRLF included; empty for begin_mail/forward_rcpt/begin_data
    std::string_view reject_reason;  // non-empty when this is a refusal to count in mailflow_rejects_total
  };
  // reject_reason values (the `reason` label of mailflow_rejects_total), with the reply that carries them:
  //   bad_sequence           503 5.5.1  MAIL before EHLO/HELO (or after STARTTLS), nested MAIL, RCPT before
  //   MAIL,
  //                                     DATA before MAIL, STARTTLS inside a transaction
  //   no_valid_recipients    554 5.5.1  DATA after RCPT commands that were all refused
  //   (DATA after MAIL with no RCPT command at all is bad_sequence, 503 5.5.1)
  //   unrecognized_command   500 5.5.2  unknown verb, empty line
  //   bad_bytes              500 5.5.2  NUL, control characters or bytes >= 0x80 in a command
  //   syntax_error           501 5.5.4  known verb, malformed arguments (EHLO without name, "MAIL TO:", DATA
  //   x,
  //                                     STARTTLS with an argument)
  //   bad_address            501 5.1.7 (MAIL) / 501 5.1.3 (RCPT)  invalid path syntax
  //   unknown_parameter      555 5.5.4  MAIL parameter other than SIZE/BODY, any RCPT parameter, bad SIZE
  //   value message_too_big        552 5.3.4  MAIL SIZE= above max_message_size too_many_recipients 452 4.5.3
  //   RCPT beyond max_recipients (not counted as a bad command: 4xx) vrfy_disabled          502 5.5.1  VRFY,
  //   EXPN not_implemented        502 5.5.1  AUTH; BDAT too, with kind close (its chunk follows whatever the
  //   reply) starttls_unavailable   502 5.5.1  STARTTLS on a listener without certificates starttls_twice
  //   503 5.5.1  STARTTLS when TLS is already active line_too_long          500 5.5.2
  //   on_framing_error(too_long) bare_newline_command   500 5.5.2  on_framing_error(bad_newline);
  //   on_framing_error(bare_lf) answers the
  //                                     same and closes (kind close): the line's tail is never answered;
  //                                     on_framing_error(too_long_bare_lf) closes without a reply (the line
  //                                     had its 500 as too_long)
  //   too_many_bad_commands  421 4.7.0  (kind close) the max_bad_commands-th local 5xx (or junk command
  //                                     beyond max_junk_commands) replaces that reply; max_bad_commands == 0
  //                                     means no limit. Refusals of MAIL/RCPT/DATA and of a message that the
  //                                     daemon gives count too (on_refusal()): the 421 then follows the
  //                                     refusal.
  //   unauth_pipelining      554 5.5.0  (kind close) pipelining RFC 2920 does not allow (on_line's
  //                                     `input_waiting`); the command is not executed
  // After close (QUIT, 421) every further line gets kind close with a 421 and no reason.

  explicit ServerSession(Options options);

  // The banner to send after accept: "220 <hostname> ESMTP mailflowd\r\n".
  std::string banner() const;

  // A command line the framer produced (CRLF removed). `input_waiting`: more of the client's input was
  // already received behind it. RFC 2920 allows that only behind a command that may be followed within a
  // group, and only once PIPELINING was announced (the EHLO reply): EHLO, HELO, DATA, NOOP, VRFY and EXPN
  // must end a group (BDAT ends the session itself: see not_implemented), and a client that got no EHLO reply
  // must wait for every reply. Otherwise the client talks past the conversation (a message sent behind DATA
  // that the upstream refused would be run as commands): 554 5.5.0 and close, as Postfix's
  // smtpd_forbid_unauth_pipelining. A STARTTLS that starts TLS is exempt: what follows it is the daemon's to
  // discard (starttls_pipelining); so is QUIT, which ends the session anyway.
  Action on_line(std::string_view line, bool input_waiting);
  // A framing problem (CommandFramer::Kind::too_long or bad_newline): one 500 5.5.x reply.
  Action on_framing_error(CommandFramer::Kind kind);

  // Outcomes of the upstream steps requested by begin_mail / forward_rcpt / begin_data.
  void on_mail_reply(int code);    // 2xx: state mail
  void on_rcpt_reply(int code);    // 2xx: state rcpt, one more accepted recipient
  void on_data_finished();         // end of DATA whatever the outcome: state ready
  void
  on_message_delivered();  // the upstream answered 2xx to end-of-data: the junk and bad counts start over
  void on_transaction_aborted();   // upstream lost mid-transaction: state ready
  // A refusal given for MAIL, RCPT, DATA or a message (the upstream's 4xx/5xx, or one of the relay's own
  // checks) counts as a bad command, as Postfix counts every error reply towards smtpd_hard_error_limit, a
  // before-queue proxy's included: the 421 that ends the session (state closed) when it is the
  // max_bad_commands-th, else "".
  std::string on_refusal();
  void on_tls_started();           // handshake done: state need_helo, tls active, transaction cleared

  State state() const { return state_; }
  bool tls_active() const { return tls_active_; }
  bool esmtp() const { return esmtp_; }                  // EHLO (not HELO) was used
  // PIPELINING was in the EHLO reply this conversation goes on from (not after HELO, nor after STARTTLS).
  bool pipelining_announced() const {
    return esmtp_ && state_ != State::need_helo && state_ != State::closed;
  }
  const std::string& helo_name() const { return helo_name_; }
  // The EHLO/HELO name given before the last STARTTLS (helo_name() is cleared by it): what is known of the client
  // while its handshake runs, for attributing a refused one.
  const std::string& helo_before_tls() const { return helo_before_tls_; }
  const Command& last_command() const { return last_command_; }  // the command behind the last action
  std::uint32_t accepted_recipients() const { return recipients_; }
  std::uint32_t bad_commands() const { return bad_commands_; }
  std::uint32_t junk_commands() const { return junk_commands_; }  // since the start or the last delivery

 private:
  enum class Step : std::uint8_t;  // an entry of the transition table (server_session.cpp)
  Action dispatch(Step step, const ParsedCommand& parsed, State effective);
  Action refuse(int code, std::string_view enhanced, std::string_view text, std::string_view reason);
  Action refuse_parse_error(const ParsedCommand& parsed, std::string_view address_enhanced);
  Action refuse_pipelining();  // 554 5.5.0 and close (unauth_pipelining)
  Action junk(Action a);       // a junk command's answer: `a`, or the 421 once it is one too many
  Action count_bad_command(Action a);  // one more bad command: `a`, or the 421 that ends the session
  std::string ehlo_reply(bool esmtp) const;
  void clear_transaction();

  Options options_;
  State state_ = State::need_helo;
  bool mail_pending_ = false;
  bool rcpt_seen_ = false;  // a RCPT command (accepted or not) in this transaction  // begin_mail returned, on_mail_reply() not yet called
  bool tls_active_ = false;
  bool esmtp_ = false;
  std::string helo_name_;
  std::string helo_before_tls_;
  Command last_command_;
  std::uint32_t recipients_ = 0;
  std::uint32_t pending_rcpts_ = 0;
  std::uint32_t bad_commands_ = 0;
  std::uint32_t junk_commands_ = 0;
};

}  // namespace mailflow::proto
