#pragma once
// The relay's own rules for SMTP transactions, between the client's conversation (ServerSession) and one
// upstream connection, as a sans-I/O engine (the way Boost.MySQL's algorithms return their next action):
// which reply the client gets when, the pipeline of upstream replies still owed, the route a transaction is
// bound to (INTERFACE rule 4), MAIL answered locally and sent with the first RCPT (rule 6), RSET when DATA
// gets no 354, and the one place a delivered message is reported. The daemon performs the steps it asks for
// (daemon/relay_session.cpp); tests/proto/relay_transaction_test.cpp drives it with scripted upstreams and an
// error injected at every step.
//
// An upstream's 421 closes its channel (RFC 5321 3.8, 4.2.2), whatever command it answers: the client gets
// it, as it is, as the reply to the command it answers, and nothing after it; then closing() is true and the
// daemon ends the client's session once the reply is flushed, as the client's session with the upstream
// itself would have ended. (A message the upstream accepted before is delivered: its 250 came first.) The 421
// of a kept connection that answered nothing of the transaction yet is its idle close instead (below).
//
// Invariants (tested): every command handed over gets exactly one reply, in command order (up to an
// upstream's 421, or the one that follows the client's max_bad_commands-th refusal (see take_rejects()), which
// ends the session: none after it); the client never gets a 2xx to RCPT or to
// end-of-data that the upstream did not give; a message is reported delivered at most once, and only after
// the upstream's 2xx to its end-of-data.
//
// A kept connection found closed (a server may close an idle connection after its timeout, RFC 5321
// 4.5.3.2.7; RFC 5321 3.8 has the client treat the loss as a 451, and Postfix's smtp client tries what a
// failed session, a cached one's included, left over on another session of the same delivery): when the
// upstream closed a reused connection before it answered anything of the transaction (on_written/on_reply
// with `closed_idle`), the commands sent there are sent again, once, on a new connection to the same route
// (MAIL with the parameters of what the new connection announced), and the client notices nothing. Never
// after the upstream answered a command of the transaction, never for a new connection, never twice. A replay
// always comes before the upstream's 354, so no message byte is ever involved.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "proto/client_session.hpp"
#include "proto/command.hpp"
#include "proto/reply.hpp"
#include "proto/server_session.hpp"

namespace mailflow::proto {

// Where a recipient goes, as the engine needs to know it (the daemon fills it from its connector match).
struct RelayRoute {
  std::string connector;     // the connector's name ("internet" when none matched)
  std::string path;          // the upstream connection it needs, e.g. "partner-mx/contoso.com": another path,
                             // another transaction
  bool require_tls = false;  // the connector forces TLS on the client leg
};

class RelayTransaction {
 public:
  enum class Step {
    idle,            // nothing to do: read the client's next command
    open_upstream,   // connect (or reuse) the connection for route_to_open(), then on_opened()
    reset_upstream,  // RSET the upstream's open transaction, then on_reset()
    write_upstream,  // write upstream_output(), then on_written()
    read_reply,      // read one upstream reply (within reply_wait()'s deadline), then on_reply()
    send_message,    // the client has its 354 (flush it): stream the message, then on_message_end() or
                     // on_message_aborted()
  };
  enum class ReplyWait { command, data_end };
  static constexpr std::string_view upstream_lost_reply = "451 4.4.2 Upstream connection lost, try again later\r\n";

  // Both outlive the engine: `client_out` is where the client's replies are appended, in order.
  RelayTransaction(ServerSession& session, std::string& client_out);

  // ---- the client's commands, as ServerSession hands them over (begin_mail, forward_rcpt, begin_data) ----
  // `tls_missing`: the transaction's connector is already certain, forces TLS, and the session has none.
  void mail(const Command& command, bool tls_missing);  // ServerSession's MAIL, parsed
  // `domain`: the recipient's domain; `route`: where it goes; `tls_active`: on the client leg.
  void rcpt(std::string_view argument, std::string_view domain, const RelayRoute& route, bool tls_active);
  void data();
  void reset();  // the client's RSET (its 250 is the caller's): the upstream's transaction is reset too
  // The replies the client pipelined for are due: its input is drained, or a reply of the caller's follows.
  void flush();

  // ---- what to do now, and its inputs ----
  Step next();
  const RelayRoute& route_to_open() const { return opening_; }
  std::string_view upstream_output() const { return upstream_out_; }
  ReplyWait reply_wait() const;

  // ---- outcomes ----
  // `refusal`: the route cannot be used (its reply in wire form). `reused`: the previous connection was kept.
  // `extensions`: what the connection's upstream announced (MAIL goes there with only the parameters of
  // those). `reason`: the refusal's mailflow_rejects_total reason where it is mailflowd's own (an MX route
  // result; "" for an upstream that could not be reached), static storage: reported by take_rejects() for the
  // recipient that opened the route and for every later one of the transaction that the same refusal answers.
  void on_opened(std::optional<std::string> refusal, bool reused, const UpstreamExtensions& extensions,
                 std::string_view reason = {});
  void on_reset(bool ok);  // false: the upstream was dropped
  // false: the upstream was dropped. `closed_idle` (with a failure): the connection was a kept one that the
  // upstream had closed (write error, end of stream or reset) before it answered anything since it was kept.
  void on_written(bool ok, bool closed_idle = false);
  // nullopt: the upstream was dropped (lost, timeout, garbage); `closed_idle` as for on_written. False: the
  // reply cannot answer the command it was read for (RFC 5321 4.3.2: DATA gets 354 or a refusal, the others a
  // completion or a refusal; a 2xx to DATA, a 3xx to anything else): the upstream is out of step, never
  // relayed; the engine takes the connection as lost, and the caller drops it (upstream_errors protocol).
  // `followed`: the upstream sent more behind the reply, already received. Behind the last reply owed (before
  // the next command was sent, or the message behind a 354) that is a reply nobody asked for, which would
  // answer the next command in its place: out of step too. (Behind the reply to the message it is left to the
  // next transaction's check of a kept connection: the upstream took the message.)
  bool on_reply(std::optional<Reply> reply, bool closed_idle = false, bool followed = false);
  // The message went through DATA: nullopt when its terminator reached the upstream (its reply is read next);
  // else the reply the client gets instead (message refused here, or the upstream lost on the way), and the
  // upstream connection is gone.
  void on_message_end(std::optional<std::string> local_reply);
  // The client went away or stalled mid-message: nothing is delivered, the upstream connection is gone.
  void on_message_aborted();
  // The daemon closed the upstream connection outside a step (a new route, the session's end).
  void on_upstream_closed();
  // The upstream answered 421 (see the top), or a refusal was the client's max_bad_commands-th: the client
  // has the 421, nothing more is done (next() is idle) and the daemon closes the client's session.
  bool closing() const { return closing_; }
  // Why, as the session's result: upstream_closed or too_many_bad_commands.
  std::string_view closing_reason() const { return closing_reason_; }

  // ---- for the daemon's bookkeeping ----
  // The transaction's route, fixed by its first recipient that reached an upstream (rule 4).
  const std::optional<RelayRoute>& route() const { return route_; }
  bool upstream_in_transaction() const { return upstream_transaction_; }  // QUIT would be impolite
  // A message the upstream accepted: its recipient count, once; then nullopt until the next one.
  std::optional<std::uint32_t> take_delivered() { return std::exchange(delivered_, std::nullopt); }
  // The distinct domains of the recipients the upstream accepted in the current (or just delivered)
  // transaction, at most max_domains.
  const std::vector<std::string>& accepted_domains() const { return accepted_domains_; }
  static constexpr std::size_t max_domains = 32;
  // Local refusals since the last call (mailflow_rejects_total reasons): recipient_route, tls_required, the
  // reasons given to on_opened, and too_many_bad_commands.
  //
  // Every refusal the client gets for MAIL, RCPT, DATA or a message counts as a bad command
  // (ServerSession::on_refusal(), as Postfix's smtpd_hard_error_limit counts a before-queue proxy's refusals
  // too, and every failed DATA: data_cmd returns its error), the upstream's and those of the relay's own
  // checks alike (a message too big, a line too long, bare CR/LF refused, too many hops), except a 452 to
  // MAIL or RCPT (too many recipients, or "send it in a separate transaction": the client is to send it
  // again, and Postfix does not count its own either) and the failures of the way to the upstream
  // (unreachable, lost: a 451 with no reject reason). The max_bad_commands-th is followed by the 421 and the
  // session ends (closing()); a delivered message starts the count over.
  std::vector<std::string_view> take_rejects() { return std::exchange(rejects_, {}); }

 private:
  enum class Owed { mail, rcpt, data, final_reply, local_mail, local_rcpt };
  struct Entry {
    Owed owed;
    std::string text;     // local_*: the reply in wire form; rcpt: the recipient's domain
    bool counted = true;  // local_*: a refusal counts as a bad command (see take_rejects())
  };

  void queue(Owed owed, std::string_view line);
  std::string upstream_mail_line() const;
  void local(Owed owed, std::string reply, bool counted = true);
  void emit_local(const Entry& entry);
  // A reply to MAIL, RCPT, DATA or a message was given (see take_rejects()): a refusal that `counts` is one
  // more bad command, and the max_bad_commands-th ends the session after its 421.
  void answered(int code, bool counts);
  void upstream_lost(bool closed_idle);
  void upstream_closing(const Reply& reply);

  ServerSession& session_;
  std::string& client_out_;

  // Replies owed to the client, in command order. A vector, not a deque: an idle session (most of them) then
  // holds no allocation for it (libstdc++'s deque allocates its first block on construction); a pipeline is at
  // most limits.max_recipients + 2 entries, so taking the front is cheap.
  std::vector<Entry> owed_;
  std::string upstream_out_;  // commands queued for the upstream, not yet written
  bool due_ = false;          // the owed upstream replies are to be read now

  bool open_requested_ = false;
  RelayRoute opening_;
  std::string held_rcpt_;  // the first recipient's RCPT, sent once the connection is there (and MAIL is)
  std::string held_domain_;
  bool start_ = false;     // send MAIL (+ the first RCPT) once the connection is there
  bool reset_needed_ = false;
  bool go_ahead_ = false;

  // The replay of a transaction whose kept connection was found closed (see the top): `sent_` holds the
  // commands queued since the kept connection was taken, while `replayable_` (nothing answered yet);
  // `replaying_`: the new connection is being opened for them.
  bool replayable_ = false;
  bool replaying_ = false;
  std::string sent_;

  UpstreamExtensions extensions_;      // of the current connection
  bool upstream_transaction_ = false;  // the upstream accepted MAIL and has not finished or reset since
  std::optional<RelayRoute> route_;
  std::string mail_argument_;  // "FROM:<...> SIZE=..." of MAIL: answered here, sent with the first RCPT
  std::vector<std::pair<std::string, std::string>> mail_parameters_;  // its parameters, as parsed
  std::optional<Reply> mail_refusal_;   // the upstream refused MAIL: every RCPT of the transaction hears it
  // Routes that could not be opened in this transaction (path -> the reply and its reason): the next recipient
  // of a dead domain is answered at once instead of walking its MX hosts again.
  struct FailedRoute {
    std::string reply;
    std::string_view reason;
  };
  std::map<std::string, FailedRoute, std::less<>> failed_;
  std::vector<std::string> accepted_domains_;
  std::uint32_t recipients_ = 0;  // of the message in DATA
  std::optional<std::uint32_t> delivered_;
  std::vector<std::string_view> rejects_;
  bool closing_ = false;  // the client's session ends (see closing())
  std::string_view closing_reason_;
};

}  // namespace mailflow::proto
