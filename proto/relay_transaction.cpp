#include "proto/relay_transaction.hpp"

#include <algorithm>
#include <cstdlib>

#include "proto/ascii.hpp"

namespace mailflow::proto {

RelayTransaction::RelayTransaction(ServerSession& session, std::string& client_out)
    : session_(session), client_out_(client_out) {}

void RelayTransaction::mail(const Command& command, bool tls_missing) {
  route_.reset();
  replayable_ = false;
  sent_.clear();
  mail_refusal_.reset();
  failed_.clear();
  accepted_domains_.clear();
  mail_argument_ = command.argument;
  mail_parameters_ = command.parameters;
  if (tls_missing) {
    rejects_.push_back("tls_required");
    local(Owed::local_mail, format_reply(530, "5.7.0", "Must issue a STARTTLS command first"));
    return;
  }
  local(Owed::local_mail, format_reply(250, "2.1.0", "Ok"));
}

// RFC 5321 2.2.1 and 4.1.1.11: a MAIL parameter goes only to an upstream that announced its extension (one
// that did not answers 555, and a server that knows only HELO knows none), as Postfix's smtp client sends
// SIZE= only where SIZE was announced and BODY= only where 8BITMIME was. BODY=7BIT says what no BODY= says.
// BODY=8BITMIME still goes where 8BITMIME was not announced: RFC 6152 3 has a relay convert such a message to
// 7 bits or refuse it, this one streams and cannot convert, and dropping the parameter would hand the
// upstream 8-bit data undeclared; so the upstream is told, and refuses it (555, relayed to the RCPT) or takes
// it.
std::string RelayTransaction::upstream_mail_line() const {
  // Nothing to leave out (no parameter, or an upstream that announced both): as written, without a rebuild.
  if (mail_parameters_.empty() || (extensions_.size && extensions_.eight_bit_mime))
    return "MAIL " + mail_argument_ + "\r\n";
  // The parameters are the argument's last space-separated words (the parser's own split), the path before.
  std::string_view path = mail_argument_;
  for (std::size_t i = 0; i < mail_parameters_.size(); ++i) {
    path = path.substr(0, path.find_last_not_of(' ') + 1);
    path = path.substr(0, path.rfind(' '));
  }
  path = path.substr(0, path.find_last_not_of(' ') + 1);
  std::string line = "MAIL " + std::string(path);
  for (const auto& [keyword, value] : mail_parameters_) {
    const bool announced =
        keyword == "SIZE" ? extensions_.size : extensions_.eight_bit_mime || ascii_lower(value) != "7bit";
    if (announced) line += " " + keyword + "=" + value;
  }
  return line + "\r\n";
}

void RelayTransaction::rcpt(std::string_view argument, std::string_view domain, const RelayRoute& route,
                            bool tls_active) {
  const std::string line = "RCPT " + std::string(argument) + "\r\n";
  if (route_) {
    const bool same_path = route_->path == route.path;
    if (!same_path || route_->connector != route.connector) {
      // RFC 5321 4.5.3.1.10: the client sends this recipient again, in a transaction of its own.
      const std::string why =
          same_path ? "belongs to connector " + route.connector : "is delivered by another route";
      rejects_.push_back("recipient_route");
      local(Owed::local_rcpt,
            format_reply(452, "4.5.3", "Recipient " + why + ": send it in a separate transaction"));
      return;
    }
    if (mail_refusal_) {
      local(Owed::local_rcpt, format_reply(*mail_refusal_));
      return;
    }
    queue(Owed::rcpt, line);
    owed_.back().text = domain;
    if (!extensions_.pipelining) due_ = true;
    return;
  }
  // The first recipient that gets this far chooses the transaction's connector and route.
  if (route.require_tls && !tls_active) {
    rejects_.push_back("tls_required");
    local(Owed::local_rcpt, format_reply(530, "5.7.0", "Must issue a STARTTLS command first"));
    return;
  }
  if (auto failed = failed_.find(route.path); failed != failed_.end()) {
    // Counted as the relay's refusal (a reject reason: an MX route result), not where the upstream could not
    // be reached.
    const bool refused = !failed->second.reason.empty();
    if (refused) rejects_.push_back(failed->second.reason);
    local(Owed::local_rcpt, failed->second.reply, refused);
    return;
  }
  opening_ = route;
  held_rcpt_ = line;
  held_domain_ = domain;
  open_requested_ = true;
  due_ = true;  // what is owed goes first: the connection may be replaced
}

void RelayTransaction::data() {
  queue(Owed::data, "DATA\r\n");
  due_ = true;
}

void RelayTransaction::reset() {
  route_.reset();
  replayable_ = false;
  sent_.clear();
  mail_refusal_.reset();
  failed_.clear();
  reset_needed_ = upstream_transaction_;
}

void RelayTransaction::flush() {
  if (!owed_.empty() || !upstream_out_.empty()) due_ = true;
}

RelayTransaction::Step RelayTransaction::next() {
  if (closing_) return Step::idle;
  for (;;) {
    while (!owed_.empty() && (owed_.front().owed == Owed::local_mail || owed_.front().owed == Owed::local_rcpt)) {
      const Entry entry = std::move(owed_.front());
      owed_.erase(owed_.begin());
      emit_local(entry);
      if (closing_) return Step::idle;  // the client's max_bad_commands-th refusal
    }
    if (replaying_) return Step::open_upstream;  // the replies still owed come from the new connection
    if (due_ && !upstream_out_.empty()) return Step::write_upstream;
    if (!owed_.empty()) return due_ ? Step::read_reply : Step::idle;
    if (open_requested_) return Step::open_upstream;
    if (reset_needed_) return Step::reset_upstream;
    if (start_) {
      // MAIL goes upstream with the first RCPT; without PIPELINING its reply comes first, so that a refusal
      // answers the RCPT instead of the RCPT being sent at all.
      start_ = false;
      queue(Owed::mail, upstream_mail_line());
      due_ = !extensions_.pipelining;
      if (!extensions_.pipelining) continue;
    }
    if (!held_rcpt_.empty()) {
      if (mail_refusal_) {
        local(Owed::local_rcpt, format_reply(*mail_refusal_));
      } else {
        queue(Owed::rcpt, held_rcpt_);
        owed_.back().text = held_domain_;
        due_ = !extensions_.pipelining;
      }
      held_rcpt_.clear();
      continue;
    }
    if (go_ahead_) return Step::send_message;
    due_ = false;
    return Step::idle;
  }
}

RelayTransaction::ReplyWait RelayTransaction::reply_wait() const {
  return !owed_.empty() && owed_.front().owed == Owed::final_reply ? ReplyWait::data_end : ReplyWait::command;
}

void RelayTransaction::on_opened(std::optional<std::string> refusal, bool reused,
                                 const UpstreamExtensions& extensions, std::string_view reason) {
  open_requested_ = false;
  if (refusal && !reason.empty()) rejects_.push_back(reason);
  if (!reused) upstream_transaction_ = false;
  if (std::exchange(replaying_, false)) {
    // The commands the closed connection never answered go again (MAIL built for the new connection, below),
    // and their replies are still owed in the same order. Several at once need PIPELINING on the new
    // connection (RFC 2920); without it, or without a connection, the transaction is lost as it would have
    // been without the replay.
    const auto commands = std::count_if(owed_.begin(), owed_.end(), [](const Entry& entry) {
      return entry.owed == Owed::mail || entry.owed == Owed::rcpt || entry.owed == Owed::data;
    });
    upstream_out_ = std::exchange(sent_, {});
    if (refusal || (commands > 1 && !extensions.pipelining)) {
      upstream_lost(false);
      return;
    }
    extensions_ = extensions;
    // MAIL, the first command queued on the kept connection (nothing was answered there, so it is still
    // owed), was built for what that connection announced; the new one (another MX host, the upstream
    // restarted with other settings) gets the parameters of what it announced itself.
    if (upstream_out_.starts_with("MAIL "))
      upstream_out_.replace(0, upstream_out_.find("\r\n") + 2, upstream_mail_line());
    due_ = true;
    return;
  }
  if (refusal) {
    failed_.emplace(opening_.path, FailedRoute{*refusal, reason});
    local(Owed::local_rcpt, std::move(*refusal), !reason.empty());
    held_rcpt_.clear();
    return;
  }
  route_ = opening_;
  extensions_ = extensions;
  replayable_ = reused;
  sent_.clear();
  start_ = true;
  // The last transaction left MAIL open there (all its recipients were refused): reset it first.
  if (upstream_transaction_) reset_needed_ = true;
}

void RelayTransaction::on_reset(bool ok) {
  // Refused or not, the upstream has no transaction of ours open any more (a refusal dropped the connection,
  // and what is sent next hears that). Its 250 shows the kept connection alive: no replay after it.
  if (ok) replayable_ = false;
  reset_needed_ = false;
  upstream_transaction_ = false;
}

void RelayTransaction::on_written(bool ok, bool closed_idle) {
  upstream_out_.clear();
  if (!ok) upstream_lost(closed_idle);
}

bool RelayTransaction::on_reply(std::optional<Reply> reply, bool closed_idle, bool followed) {
  // A 421 closes the connection (RFC 5321 3.8): from a kept connection that answered nothing yet, its idle
  // close.
  if (!reply || (reply->code == 421 && closed_idle)) {
    upstream_lost(closed_idle);
    return true;
  }
  if (reply->code == 421) {
    upstream_closing(*reply);
    return true;
  }
  const bool refusal = reply->transient() || reply->permanent();
  const bool fits =
      owed_.front().owed == Owed::data ? reply->code == 354 || refusal : reply->positive() || refusal;
  const bool last = std::none_of(owed_.begin() + 1, owed_.end(), [](const Entry& entry) {
    return entry.owed == Owed::mail || entry.owed == Owed::rcpt || entry.owed == Owed::data;
  });
  const bool unasked = followed && last && owed_.front().owed != Owed::final_reply;
  if (!fits || unasked) {
    // A 250 to DATA relayed would be a 2xx the upstream never gave to a message, a 354 to RCPT a go-ahead for
    // message bytes that the client's session would run as commands; a 250 sent behind the 354 would be read
    // as the message's reply, whatever the upstream answers to the message.
    upstream_lost(false);
    return false;
  }
  // The upstream answered a command of the transaction: from now on it is its connection's, for better or
  // worse.
  replayable_ = false;
  sent_.clear();
  const Entry entry = std::move(owed_.front());
  owed_.erase(owed_.begin());
  switch (entry.owed) {
    case Owed::mail:
      // Answered locally already; a refusal becomes the reply to this transaction's RCPTs.
      upstream_transaction_ = reply->positive();
      if (!reply->positive()) mail_refusal_ = std::move(*reply);
      break;
    case Owed::rcpt:
      if (mail_refusal_) reply = *mail_refusal_;
      client_out_ += format_reply(*reply);
      session_.on_rcpt_reply(reply->code);
      answered(reply->code, reply->code != 452);
      if (reply->positive() && accepted_domains_.size() < max_domains &&
          std::find(accepted_domains_.begin(), accepted_domains_.end(), entry.text) == accepted_domains_.end())
        accepted_domains_.push_back(entry.text);
      break;
    case Owed::data:
      client_out_ += format_reply(*reply);
      if (reply->code == 354) {
        go_ahead_ = true;
      } else {
        session_.on_data_finished();
        reset_needed_ = upstream_transaction_;
        answered(reply->code, true);
      }
      break;
    case Owed::final_reply:
      client_out_ += format_reply(*reply);
      upstream_transaction_ = false;
      // The one place a message is reported delivered: the upstream took responsibility for it.
      if (reply->positive()) {
        delivered_ = recipients_;
        session_.on_message_delivered();
      } else {
        answered(reply->code, true);
      }
      break;
    case Owed::local_mail:
    case Owed::local_rcpt:
      break;  // never at the front here: next() emits them
  }
  return true;
}

void RelayTransaction::on_message_end(std::optional<std::string> local_reply) {
  go_ahead_ = false;
  recipients_ = session_.accepted_recipients();
  session_.on_data_finished();
  if (local_reply) {
    client_out_ += *local_reply;
    upstream_transaction_ = false;
    // The relay's own refusal of the message counts, the 451 for an upstream lost on the way does not.
    answered(std::atoi(local_reply->c_str()), *local_reply != upstream_lost_reply);
    return;
  }
  owed_.push_back({Owed::final_reply, {}});
  due_ = true;
}

void RelayTransaction::on_message_aborted() {
  go_ahead_ = false;
  upstream_transaction_ = false;
  session_.on_transaction_aborted();
}

void RelayTransaction::on_upstream_closed() { upstream_transaction_ = false; }

void RelayTransaction::queue(Owed owed, std::string_view line) {
  upstream_out_ += line;
  if (replayable_) sent_ += line;
  owed_.push_back({owed, {}});
}

void RelayTransaction::local(Owed owed, std::string reply, bool counted) {
  owed_.push_back({owed, std::move(reply), counted});
}

void RelayTransaction::emit_local(const Entry& entry) {
  client_out_ += entry.text;
  const int code = std::atoi(entry.text.c_str());
  if (entry.owed == Owed::local_mail)
    session_.on_mail_reply(code);
  else
    session_.on_rcpt_reply(code);
  answered(code, entry.counted && code != 452);
}

void RelayTransaction::answered(int code, bool counts) {
  if (!counts || code < 400 || closing_) return;
  std::string goodbye = session_.on_refusal();
  if (goodbye.empty()) return;
  // As Postfix's smtpd: the refusal, then the 421 before the client's next command; nothing after it (what
  // the client pipelined behind is not answered, what went upstream for it is left there).
  client_out_ += goodbye;
  rejects_.push_back("too_many_bad_commands");
  closing_ = true;
  closing_reason_ = "too_many_bad_commands";
  owed_.clear();
  held_rcpt_.clear();
  open_requested_ = false;
  upstream_out_.clear();
  start_ = false;
  go_ahead_ = false;
  replaying_ = false;
}

void RelayTransaction::upstream_closing(const Reply& reply) {
  // The client hears the 421 for the command it answers, and nothing after it: the session ends (see the
  // header).
  client_out_ += format_reply(reply);
  closing_ = true;
  closing_reason_ = "upstream_closed";
  owed_.clear();
  held_rcpt_.clear();
  open_requested_ = false;
  upstream_lost(false);  // with nothing owed any more: the rest of the transaction's state is dropped
}

void RelayTransaction::upstream_lost(bool closed_idle) {
  upstream_out_.clear();
  if (closed_idle && std::exchange(replayable_, false) && route_) {
    // The kept connection was closed before it answered anything of the transaction (see the header): the
    // same route on a new connection, which gets what was sent here (sent_) and owes the same replies.
    opening_ = *route_;
    replaying_ = true;
    upstream_transaction_ = false;
    return;
  }
  replayable_ = false;
  sent_.clear();
  // Every reply still owed is given now: local ones as they are, the upstream's as "connection lost". The
  // client had its local 250 to MAIL; its RCPTs hear the 451.
  bool aborted = false;
  for (const Entry& entry : std::exchange(owed_, {})) {
    if (closing_) break;  // a local refusal among them was the client's max_bad_commands-th
    switch (entry.owed) {
      case Owed::local_mail:
      case Owed::local_rcpt:
        emit_local(entry);
        break;
      case Owed::mail:
        aborted = true;
        break;
      case Owed::rcpt:
        client_out_ += upstream_lost_reply;
        session_.on_rcpt_reply(451);
        aborted = true;
        break;
      case Owed::data:
        client_out_ += upstream_lost_reply;
        aborted = true;
        break;
      case Owed::final_reply:
        client_out_ += upstream_lost_reply;
        break;
    }
  }
  if (!held_rcpt_.empty() && !closing_) {
    client_out_ += upstream_lost_reply;
    session_.on_rcpt_reply(451);
    held_rcpt_.clear();
    aborted = true;
  }
  start_ = false;
  reset_needed_ = false;
  go_ahead_ = false;
  upstream_transaction_ = false;
  if (aborted) session_.on_transaction_aborted();
}

}  // namespace mailflow::proto
