#include "daemon/relay_session.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <limits>
#include <optional>
#include <random>

#include "daemon/connector_match.hpp"
#include "daemon/deadlines.hpp"
#include "daemon/failpoint.hpp"
#include "daemon/link.hpp"
#include "daemon/log.hpp"
#include "daemon/mta_sts.hpp"
#include "daemon/telemetry.hpp"
#include "daemon/upstream_leg.hpp"
#include "proto/data_filter.hpp"
#include "proto/line_framer.hpp"
#include "proto/proxy_header.hpp"
#include "proto/relay_transaction.hpp"
#include "proto/reply.hpp"
#include "proto/server_session.hpp"
#include "proto/trace_hops.hpp"

namespace mailflow {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;
using SteadyClock = std::chrono::steady_clock;

namespace {

constexpr std::size_t command_read_chunk = 4096;
constexpr std::size_t data_read_chunk = 65536;
// A DATA "block": the client must deliver this much (or the end of the message) within timeouts.data_block,
// so a byte every few seconds cannot keep a session alive forever.
constexpr std::size_t data_block_size = 65536;
constexpr auto proxy_header_timeout = std::chrono::seconds(5);
constexpr auto goodbye_timeout = std::chrono::seconds(5);

std::array<std::uint8_t, 16> mapped_bytes(const asio::ip::address& address) {
  if (address.is_v4()) return asio::ip::make_address_v6(asio::ip::v4_mapped, address.to_v4()).to_bytes();
  return address.to_v6().to_bytes();
}

// RFC 5321 §4.1.3 address literal body: "192.0.2.1" or "IPv6:2001:db8::1".
std::string address_literal(const asio::ip::address& address) {
  const std::string text = address_text(address);
  return text.find(':') == std::string::npos ? text : "IPv6:" + text;
}

// "Tue, 01 Dec 2026 10:00:00 +0000" (RFC 5322 §3.3), written by hand: strftime() and fmt cost the Received:
// header some 3,000 instructions per message (issue #16).
void append_rfc5322_date(std::string& out) {
  static constexpr std::string_view days = "SunMonTueWedThuFriSat";
  static constexpr std::string_view months = "JanFebMarAprMayJunJulAugSepOctNovDec";
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  auto two_digits = [&out](int value) {
    out += static_cast<char>('0' + value / 10);
    out += static_cast<char>('0' + value % 10);
  };
  out += days.substr(static_cast<std::size_t>(tm.tm_wday) * 3, 3);
  out += ", ";
  two_digits(tm.tm_mday);
  out += ' ';
  out += months.substr(static_cast<std::size_t>(tm.tm_mon) * 3, 3);
  out += ' ';
  out += std::to_string(tm.tm_year + 1900);
  out += ' ';
  two_digits(tm.tm_hour);
  out += ':';
  two_digits(tm.tm_min);
  out += ':';
  two_digits(tm.tm_sec);
  out += " +0000";
}

constexpr std::size_t max_logged_sender_domains = 8;

// Appends `name` to the comma-separated `list` unless it is there already (whole names only: "partner" must
// not hide behind an earlier "partner-contoso") or the list holds `limit` names ("..." then marks what was
// left out).
void add_to_list(std::string& list, const std::string& name, std::size_t limit) {
  if (("," + list + ",").find("," + name + ",") != std::string::npos) return;
  const auto names =
      list.empty() ? 0 : static_cast<std::size_t>(std::count(list.begin(), list.end(), ',')) + 1;
  if (list.ends_with(",...")) return;
  if (names >= limit) {
    list += ",...";
    return;
  }
  list += (list.empty() ? "" : ",") + name;
}

std::string new_session_id() {
  thread_local std::mt19937_64 random{std::random_device{}()};
  char buffer[17];
  std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(random()));
  return buffer;
}

}  // namespace

class RelaySession : public std::enable_shared_from_this<RelaySession> {
 public:
  RelaySession(tcp::socket socket, const tcp::endpoint& peer, std::shared_ptr<const Runtime> runtime,
               const config::Listener& listener, SessionRegistry& registry)
      : runtime_(std::move(runtime)),
        config_(*runtime_->config),
        listener_(listener),
        registry_(registry),
        telemetry_(registry.telemetry()),
        deadlines_(socket.get_executor(),
                   [this] {
                     client_.cancel();
                     if (upstream_) upstream_->cancel();
                   }),
        client_(std::move(socket), deadlines_),
        session_(server_options()),
        client_address_(peer.address()),
        client_port_(peer.port()),
        client_bytes_(mapped_bytes(client_address_)),
        connector_certain_at_mail_(connector_certain_at_mail()) {}

  // The first thing run() does: the counters, the watchdog (no I/O).
  void begin();
  asio::awaitable<void> run();
  // The completion of run() with an exception: logs, counts and releases what the session held.
  void crashed(std::exception_ptr error);

  // Thread-safe: executed on the session's event loop.
  void notify_drain() {
    asio::post(client_.socket().get_executor(), [self = shared_from_this()] {
      if (self->idle_) self->client_.cancel();
    });
  }
  void force_close() {
    asio::post(client_.socket().get_executor(), [self = shared_from_this()] {
      self->forced_ = true;
      self->client_.close();
      if (self->upstream_) self->upstream_->force_close();
    });
  }

 private:
  proto::ServerSession::Options server_options() const {
    proto::ServerSession::Options options;
    options.hostname = config_.hostname;
    options.starttls_available = listener_.tls.has_value();
    options.max_message_size = config_.limits.max_message_size;
    options.max_recipients = config_.limits.max_recipients;
    options.max_bad_commands = config_.limits.max_bad_commands;
    options.max_junk_commands = config_.limits.max_junk_commands;
    return options;
  }
  static SteadyClock::time_point in(SteadyClock::duration timeout) { return Deadlines::in(timeout); }

  asio::awaitable<bool> open();  // PROXY header, limits, greet pause, banner: false when the session ends there
  asio::awaitable<void> finish();
  void release();  // the session's end, without I/O: closes, counts, frees its slots and logs; once only
  asio::awaitable<bool> read_proxy_header();
  asio::awaitable<bool> greet_pause();
  // The next command line; `idle`: the session waits for its next command (see run()).
  enum class Input { line, idle, closed };
  asio::awaitable<Input> next_line(std::string& line, bool readable);
  asio::awaitable<void> read_failed(const boost::system::error_code& ec);  // a command wait ended in error
  asio::awaitable<void> perform(const proto::ServerSession::Action& action);
  // The replies in client_out_, in two steps: flush_now() sends what the socket takes at once, without a coroutine,
  // and is true when nothing is left (nearly always); when it is false, flush() is awaited for the rest.
  bool flush_now();
  asio::awaitable<bool> flush();
  asio::awaitable<void> say_goodbye(std::string_view reply, std::string_view result);
  // 421 4.3.2 "Service shutting down" (RFC 5321 3.8): a drain's goodbye, result=shutdown.
  asio::awaitable<void> say_shutting_down();
  asio::awaitable<void> start_tls();
  asio::awaitable<void> close_client();  // close_notify on TLS (bounded by the goodbye deadline), then close

  // The transaction: proto::RelayTransaction decides, this performs its steps. next_step() accounts for what the
  // engine reports (refusals, a delivered message) and returns what it wants done next, without I/O: Step::idle
  // (nearly every other command) then needs no coroutine. `settle`: every reply owed to the client is due now
  // (command order). drive() performs steps, from `step`, until the engine is idle.
  using Step = proto::RelayTransaction::Step;
  Step next_step(bool settle);
  asio::awaitable<void> drive(Step step);
  void start_transaction();
  void begin_mail();
  void forward_rcpt();
  asio::awaitable<std::optional<std::string>> open_route();
  asio::awaitable<void> relay_message();
  void route_chosen();

  // A recipient's route: its connector (with the recipient domain known) and upstream.
  struct Route {
    const config::Connector* connector = nullptr;  // null: unmatched ("internet")
    const config::Upstream* upstream = nullptr;
    std::string domain;  // mx upstreams: the recipient domain (another domain is another route)
  };
  Route route_for(std::string_view recipient_domain) const;
  bool connector_certain_at_mail() const;

  void count_reject(std::string_view reason);
  std::string received_header() const;
  proto::TlsVersion counted_version() const;

  std::shared_ptr<const Runtime> runtime_;
  const config::Config& config_;
  const config::Listener& listener_;
  SessionRegistry& registry_;
  Telemetry& telemetry_;
  std::string id_ = new_session_id();
  Deadlines deadlines_;
  Link client_;
  proto::ServerSession session_;
  proto::CommandFramer framer_;
  std::string client_out_;
  // Made at the first MAIL (start_transaction()) and kept for the session (the upstream connection is reused):
  // a session that never starts a transaction does not carry them (issue #16: RSS per idle session).
  std::unique_ptr<UpstreamLeg> upstream_;
  std::unique_ptr<proto::RelayTransaction> transaction_;

  ReadBuffer client_in_;
  asio::ip::address client_address_;  // accept()'s peer, or the PROXY header's source
  std::uint16_t client_port_ = 0;
  std::array<std::uint8_t, 16> client_bytes_{};
  bool address_admitted_ = false;
  bool session_admitted_ = false;  // holds one of max_sessions (SessionRegistry::admit_session)

  SteadyClock::time_point started_ = SteadyClock::now();
  SteadyClock::time_point command_deadline_;
  bool command_clock_running_ = false;
  std::uint32_t commands_ = 0;  // complete command lines received (the first one gets timeouts.greeting)
  bool finished_ = false;
  bool counted_open_ = false;  // telemetry_.session_opened() was called: release() owes the session_closed()
  bool idle_ = false;
  bool close_ = false;
  bool forced_ = false;  // force_close(): a stop closed the session, whatever it was waiting for
  bool proxy_checked_ = false;
  // The first line was held back for the PROXY check (may_be_proxy_header): what came behind it while it
  // waited is no pipelining of the client's.
  bool first_line_held_ = false;

  Route opening_;              // Step::open_upstream's: the opening RCPT's route, or the transaction's
  std::string sender_domain_;  // of the transaction's MAIL FROM
  std::string connector_name_;  // of the current transaction
  proto::TlsVersion message_version_ = proto::TlsVersion::none;  // counted for the message in DATA
  std::string connectors_seen_;
  std::string sender_domains_seen_;
  const bool connector_certain_at_mail_;  // of this session's configuration and listener: computed once
  std::string result_ = "disconnected";
  std::uint32_t messages_ = 0;
  std::uint32_t rejects_ = 0;
  std::uint64_t message_bytes_ = 0;  // of the message in DATA
};

// ---- the session ----------------------------------------------------------------------------------------

void RelaySession::begin() {
  // TCP_NODELAY comes with the socket (Server's open_acceptor and accept loop).
  failpoint("session.begin");  // before the session counts itself open: release() must not count it closed
  telemetry_.session_opened(listener_.name);
  counted_open_ = true;
  deadlines_.start(shared_from_this());
}

asio::awaitable<void> RelaySession::run() {
  // An idle session (waiting for its next command, no transaction open) is parked here, at the top of its only
  // coroutine, waiting for readability without a buffer: what it costs then is this frame, the wait and the
  // session's own state (issue #16: RSS per idle session). Everything deeper has returned.
  auto self = shared_from_this();
  begin();  // inside the coroutine: an exception there ends the session through crashed(), as any other does
  if (co_await open()) {
    std::string line;
    bool readable = false;
    while (!close_) {
      const Input input = co_await next_line(line, readable);
      readable = false;
      if (input == Input::closed) break;
      if (input == Input::idle) {
        error_code ec;
        idle_ = true;
        co_await client_.socket().async_wait(tcp::socket::wait_read, asio::redirect_error(asio::use_awaitable, ec));
        idle_ = false;
        deadlines_.disarm(ec);
        if (ec) {
          co_await read_failed(ec);
          break;
        }
        readable = true;
        continue;
      }
      failpoint("session.command");
      // What the client sent behind this line and is read already (RFC 2920 pipelining; no system call: a
      // client's pipelined group nearly always comes in one read).
      const bool held = std::exchange(first_line_held_, false);
      co_await perform(session_.on_line(line, !held && (!client_in_.empty() || client_.buffered())));
    }
  }
  co_await finish();
}

asio::awaitable<bool> RelaySession::open() {
  const bool proxy_trusted =
      std::any_of(listener_.proxy_trusted.begin(), listener_.proxy_trusted.end(),
                  [&](const config::Cidr& cidr) { return cidr.contains(client_bytes_); });
  if (proxy_trusted && !co_await read_proxy_header()) co_return false;

  // Taken from the accept queue by a drain (Server's take_queued), or accepted just before it: no banner, as
  // Postfix's postscreen greets with 421 when it cannot serve.
  if (registry_.draining()) {
    co_await say_shutting_down();
    co_return false;
  }
  if (!registry_.admit_session(config_.limits.max_sessions)) {
    count_reject("session_limit");
    co_await say_goodbye(proto::format_reply(421, "4.7.0", config_.hostname + " Error: too many connections"),
                         "session_limit");
    co_return false;
  }
  session_admitted_ = true;
  if (!registry_.admit_address(client_bytes_, config_.limits.max_sessions_per_ip)) {
    count_reject("ip_limit");
    co_await say_goodbye(
        proto::format_reply(421, "4.7.0",
                            config_.hostname + " Error: too many connections from your address"),
        "ip_limit");
    co_return false;
  }
  address_admitted_ = true;

  if (config_.limits.greet_pause.count() > 0 && !co_await greet_pause()) co_return false;

  client_out_ += session_.banner();
  co_return true;
}

asio::awaitable<void> RelaySession::finish() {
  // What is left for the client (the closing reply: 221, a 421, behind the replies it pipelined for) gets the
  // goodbye limit, as say_goodbye() does: a client that reads no more holds its slots no longer than that,
  // and the session's result stays what it ended with (no timeout of the client's: it may well have gone).
  if (!flush_now()) {
    error_code ec;
    co_await client_.write(client_out_, in(goodbye_timeout), ec);
    client_out_.clear();
  }
  if (upstream_) co_await upstream_->close(!transaction_->upstream_in_transaction());
  co_await close_client();
  release();
}

void RelaySession::crashed(std::exception_ptr error) {
  // An exception escaped the session: nothing of it may leak (registry and per-IP slots, sessions_active).
  telemetry_.internal_error("session");
  log_event(LogLevel::error, "internal_error",
            {{"id", id_}, {"component", "session"}, {"error", exception_text(error)}});
  result_ = "internal_error";
  if (upstream_) upstream_->drop();
  release();
}

void RelaySession::release() {
  if (finished_) return;
  client_.close();
  finished_ = true;
  deadlines_.stop();

  const double seconds = std::chrono::duration<double>(SteadyClock::now() - started_).count();
  telemetry_.leg_finished(listener_.name, Leg::client, client_.tls().version);
  // Only a session that counted itself open (begin() may throw before it does): sessions_active never goes
  // below 0.
  if (std::exchange(counted_open_, false)) telemetry_.session_closed(listener_.name, seconds);
  if (address_admitted_) registry_.release_address(client_bytes_);
  if (session_admitted_) registry_.release_session();
  registry_.remove(this);

  const std::string client = endpoint_text(client_address_, client_port_);
  log_event(LogLevel::info, "session",
            {{"id", id_},
             {"client", client},
             {"listener", listener_.name},
             // After a STARTTLS without a new EHLO (a failed handshake, say), the name given before it.
             {"helo", session_.helo_name().empty() ? session_.helo_before_tls() : session_.helo_name()},
             {"sni", client_.tls().sni},
             {"tls", proto::to_string(client_.tls().version)},
             {"cipher", client_.tls().cipher},
             {"connector", connectors_seen_},
             {"sender_domains", sender_domains_seen_},
             {"upstream", upstream_ ? std::string_view(upstream_->summary()) : std::string_view()},
             {"messages", messages_},
             {"rejects", rejects_},
             {"result", result_},
             {"duration", seconds}});
}

asio::awaitable<bool> RelaySession::read_proxy_header() {
  const auto deadline = in(proxy_header_timeout);
  for (;;) {
    auto parsed = proto::parse_proxy_header(client_in_.view());
    if (parsed.status == proto::ProxyStatus::complete) {
      client_in_.consume(parsed.consumed);
      if (!parsed.header.local) {
        error_code ec;
        auto address = asio::ip::make_address(parsed.header.source_address, ec);
        if (ec) {
          count_reject("proxy_invalid");
          result_ = "proxy_invalid";
          co_return false;
        }
        client_address_ = address;
        client_port_ = parsed.header.source_port;
        client_bytes_ = mapped_bytes(address);
      }
      proxy_checked_ = true;
      co_return true;
    }
    if (parsed.status == proto::ProxyStatus::invalid) {
      count_reject("proxy_invalid");
      log_limited(LogLevel::warn, "proxy_invalid", {{"id", id_}, {"error", parsed.error}});
      result_ = "proxy_invalid";
      co_return false;
    }
    // A session begun at the drain (taken from the accept queue, Server's take_queued) was never notified
    // (notify_drain reached only those before it): what the proxy has sent is read, the rest not waited for.
    if (registry_.draining() && client_.quiet()) {
      co_await say_shutting_down();
      co_return false;
    }
    error_code ec;
    // Idle as one that waits for its next command (notify_drain): a drain that begins while the trusted proxy
    // has not sent the header yet tells it 421 4.3.2 at once (relayed to its client). It held the drain for
    // the header's 5 s, then was closed without a word and counted as the peer's proxy_timeout.
    idle_ = true;
    co_await client_.read_some(client_in_, proto::max_proxy_header - client_in_.size(), deadline, ec);
    idle_ = false;
    if (ec && forced_) {
      result_ = "shutdown";  // a stop cut the header short: no truncation of the peer's
      co_return false;
    }
    if (ec == asio::error::operation_aborted && registry_.draining()) {
      co_await say_shutting_down();
      co_return false;
    }
    if (ec) {
      const bool timed_out = ec == asio::error::timed_out;
      if (!timed_out && client_in_.empty()) {
        // Gone without a byte (a balancer's TCP health check): no header was begun, so none was truncated.
        result_ = "disconnected";
        co_return false;
      }
      count_reject(timed_out ? "proxy_timeout" : "proxy_truncated");
      result_ = timed_out ? "proxy_timeout" : "proxy_truncated";
      co_return false;
    }
  }
}

asio::awaitable<bool> RelaySession::greet_pause() {
  // RFC 5321 §4.3.1: the client must wait for the banner. Anything sent before it is a spambot tell.
  // Bytes read behind a PROXY header (a proxy forwards the client's first bytes right after it) are such input
  // already.
  if (client_in_.empty()) {
    error_code ec;
    // Idle as one that waits for its next command (notify_drain): a drain that begins during the pause tells
    // the client 421 at once, as open() tells those taken from the accept queue. It waited for the rest of
    // the pause (up to 5 minutes, past drain_timeout) and then got a banner it could not use, and the 421
    // after it.
    idle_ = true;
    co_await deadlines_.wait_readable(client_.socket(), in(config_.limits.greet_pause), ec);
    idle_ = false;
    if (forced_) {
      result_ = "shutdown";  // a stop closed the session during the pause: not the client's leaving
      co_return false;
    }
    if ((ec == asio::error::operation_aborted || ec == asio::error::timed_out) && registry_.draining()) {
      co_await say_shutting_down();
      co_return false;
    }
    if (ec == asio::error::timed_out) co_return true;
    // Readable: input, or a client that hung up without a word, with an end of stream or a reset (a
    // balancer's health check resets): not an early talker, just gone.
    char byte = 0;
    const bool talked =
        !ec && ::recv(client_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
    if (!talked) {
      result_ = "disconnected";
      co_return false;
    }
  }
  count_reject("early_talker");
  co_await say_goodbye(
      proto::format_reply(554, "5.5.0", config_.hostname + " Error: SMTP protocol synchronization"),
      "early_talker");
  co_return false;
}

asio::awaitable<RelaySession::Input> RelaySession::next_line(std::string& line, bool readable) {
  for (;;) {
    if (!proxy_checked_ && !client_in_.empty()) {
      if (proto::looks_like_proxy_header(client_in_.view())) {
        count_reject("proxy_untrusted");
        co_await say_goodbye(
            proto::format_reply(554, "5.7.0", "PROXY protocol not accepted from this address"),
            "proxy_untrusted");
        co_return Input::closed;
      }
      // The first octets of a header, in a read of their own, are no command yet ("\r\n" would be framed as
      // an empty line, "PROXY ..." as an unknown verb, and the session go on): wait until there is enough to
      // tell.
      proxy_checked_ = !proto::may_be_proxy_header(client_in_.view());
      if (!proxy_checked_) first_line_held_ = true;
    }
    auto event = proxy_checked_ ? framer_.next(client_in_.view()) : proto::CommandFramer::Event{};
    if (event.kind == proto::CommandFramer::Kind::line) {
      line.assign(event.line);
      client_in_.consume(event.consumed);
      command_clock_running_ = false;
      ++commands_;
      co_return Input::line;
    }
    client_in_.consume(event.consumed);
    if (event.kind != proto::CommandFramer::Kind::need_more) {
      command_clock_running_ = false;
      first_line_held_ = false;
      co_await perform(session_.on_framing_error(event.kind));
      if (close_) co_return Input::closed;
      continue;
    }
    if (const Step step = next_step(true); step != Step::idle) co_await drive(step);
    if (close_) co_return Input::closed;  // a 421 of the transaction's (finish() flushes it)
    if (!flush_now()) {
      if (!co_await flush()) co_return Input::closed;
    }
    const bool idle = session_.state() == proto::ServerSession::State::need_helo ||
                      session_.state() == proto::ServerSession::State::ready;
    if (idle && registry_.draining()) {
      co_await say_shutting_down();
      co_return Input::closed;
    }
    // The whole command must arrive within the timeout: partial lines do not restart the clock (slowloris).
    if (!command_clock_running_) {
      command_deadline_ =
          SteadyClock::now() + (commands_ == 0 ? config_.timeouts.greeting : config_.timeouts.command);
      command_clock_running_ = true;
    }
    if (idle && !readable && !client_.buffered()) {  // an idle session keeps no buffers and waits in run()
      client_in_.release_if_empty();
      client_.release_idle_buffers();
      if (upstream_) upstream_->release_idle_buffers();
      deadlines_.arm(command_deadline_);
      co_return Input::idle;
    }
    error_code ec;
    if (readable) {  // after the idle wait in run(): the bytes are there, nearly always
      readable = false;
      if (client_.read_now(client_in_, command_read_chunk, ec) > 0) continue;
      if (ec == asio::error::would_block) ec = {};  // TLS, or a spurious wakeup: wait below
    }
    if (!ec) {
      // Idle here too (TLS: the rest of a record that began to arrive): a drain must reach this wait as well.
      idle_ = idle;
      co_await client_.read_some(client_in_, command_read_chunk, command_deadline_, ec);
      idle_ = false;
    }
    if (ec) {
      co_await read_failed(ec);
      co_return Input::closed;
    }
  }
}

asio::awaitable<void> RelaySession::read_failed(const error_code& ec) {
  if (forced_) {
    result_ =
        "shutdown";  // a stop closed the session (the socket is gone): the daemon's doing, not the client's
  } else if (ec == asio::error::timed_out) {
    count_reject("timeout");
    co_await say_goodbye(proto::format_reply(421, "4.4.2", config_.hostname + " Error: timeout exceeded"),
                         "timeout");
  } else if (ec == asio::error::operation_aborted && registry_.draining()) {
    co_await say_shutting_down();
  } else {
    result_ = "disconnected";
  }
}

asio::awaitable<void> RelaySession::perform(const proto::ServerSession::Action& action) {
  using Kind = proto::ServerSession::ActionKind;
  if (action.kind != Kind::begin_mail && action.kind != Kind::forward_rcpt && action.kind != Kind::begin_data) {
    if (const Step step = next_step(true); step != Step::idle) co_await drive(step);  // replies in command order
    if (close_) co_return;  // a 421 of the transaction's ended the session there: nothing is said after it
  }
  if (!action.reject_reason.empty()) count_reject(action.reject_reason);
  switch (action.kind) {
    case Kind::reply:
      client_out_ += action.reply;
      break;
    case Kind::close:
      client_out_ += action.reply;
      close_ = true;
      result_ = action.reject_reason.empty() ? "quit" : std::string(action.reject_reason);
      break;
    case Kind::reset:
      client_out_ += action.reply;
      if (transaction_) transaction_->reset();
      break;
    case Kind::start_tls:
      client_out_ += action.reply;
      co_await start_tls();
      break;
    case Kind::begin_mail:
      begin_mail();
      break;
    case Kind::forward_rcpt:
      forward_rcpt();
      break;
    case Kind::begin_data:
      transaction_->data();
      break;
  }
  if (const Step step = next_step(false); step != Step::idle) co_await drive(step);
}

bool RelaySession::flush_now() {
  if (client_out_.empty()) return true;
  error_code ec;
  const std::size_t sent = client_.write_now(client_out_, ec);
  if (!ec && sent == client_out_.size()) {
    client_out_.clear();
    return true;
  }
  if (!ec) client_out_.erase(0, sent);  // flush() sends the rest (and meets an error again itself)
  return false;
}

asio::awaitable<bool> RelaySession::flush() {
  error_code ec;
  co_await client_.write(client_out_, in(config_.timeouts.command), ec);
  client_out_.clear();
  if (ec) {
    // A client that reads no reply within the timeout is as slow as one that sends no command: counted alike
    // (no 421 can reach it). A stop that closed the session (force_close()) is neither its timeout nor its
    // leaving.
    if (ec == asio::error::timed_out && !forced_) count_reject("timeout");
    result_ = forced_ ? "shutdown" : ec == asio::error::timed_out ? "timeout" : "disconnected";
    close_ = true;
    co_return false;
  }
  co_return true;
}

asio::awaitable<void> RelaySession::say_shutting_down() {
  co_await say_goodbye(proto::format_reply(421, "4.3.2", config_.hostname + " Service shutting down"),
                       "shutdown");
}

asio::awaitable<void> RelaySession::say_goodbye(std::string_view reply, std::string_view result) {
  client_out_ += reply;
  error_code ec;
  co_await client_.write(client_out_, in(goodbye_timeout), ec);
  client_out_.clear();
  result_ = result;
  close_ = true;
}

asio::awaitable<void> RelaySession::close_client() {
  if (client_.tls_active()) {
    error_code ec;
    co_await client_.shutdown_tls(in(goodbye_timeout), ec);
  }
  client_.close();
}

void RelaySession::count_reject(std::string_view reason) {
  ++rejects_;
  telemetry_.rejected(listener_.name, reason);
  const std::string client = address_text(client_address_);
  log_limited(LogLevel::info, "reject",
              {{"id", id_}, {"client", client}, {"listener", listener_.name}, {"reason", reason}});
}

// ---- STARTTLS on the client leg -------------------------------------------------------------------------

asio::awaitable<void> RelaySession::start_tls() {
  if (!flush_now()) {
    if (!co_await flush()) co_return;
  }
  if (!client_in_.empty()) {
    // CVE-2011-0411 class: plaintext sent behind STARTTLS must never be executed inside TLS.
    count_reject("starttls_pipelining");
    client_in_.clear();
  }
  const ServerTls* tls = runtime_->server_tls(listener_.name);
  error_code ec;
  co_await client_.handshake(tls->context(), nullptr, in(config_.timeouts.tls_handshake), ec);
  if (ec && forced_) {
    // A stop (drain_timeout passed) ended the handshake: the daemon's own doing, no failure of the client's.
    result_ = "shutdown";
    close_ = true;
    co_return;
  }
  if (ec) {
    const std::string reason = handshake_failure_label(ec);
    telemetry_.tls_handshake_failed(listener_.name, Leg::client, reason);
    // Attributed with what is known before the handshake (issue #18): listener, client address, the EHLO name
    // given before STARTTLS; and the version the client offered, so a min_version refusal names who to call.
    MatchInput known;
    known.listener = listener_.name;
    known.direction = listener_.direction;
    known.client_address = client_bytes_;
    known.ehlo = session_.helo_before_tls();
    const config::Connector* matched = match_connector(config_, known);
    const std::string connector(matched ? std::string_view(matched->name) : internet_connector);
    const std::string_view offered = client_.offered_tls();
    const std::string client = address_text(client_address_);
    telemetry_.handshake_refused(listener_.name, connector, listener_.direction, client, known.ehlo, offered);
    add_to_list(connectors_seen_, connector, std::numeric_limits<std::size_t>::max());
    log_limited(LogLevel::info, "tls_failed",
                {{"id", id_}, {"client", client}, {"listener", listener_.name}, {"leg", "client"}, {"reason", reason},
                 {"helo", known.ehlo},
                 {"connector", connector}, {"offered", offered}});
    result_ = "tls_failed";
    close_ = true;
    co_return;
  }
  session_.on_tls_started();
  framer_ = proto::CommandFramer();
}

// ---- transactions ---------------------------------------------------------------------------------------

RelaySession::Route RelaySession::route_for(std::string_view recipient_domain) const {
  MatchInput input;
  input.listener = listener_.name;
  input.direction = listener_.direction;
  input.client_address = client_bytes_;
  input.sni = client_.tls().sni;
  input.ehlo = session_.helo_name();
  input.sender_domain = sender_domain_;
  input.recipient_domain = recipient_domain;
  Route route;
  route.connector = match_connector(config_, input);
  const std::string& upstream =
      route.connector && !route.connector->upstream.empty() ? route.connector->upstream : listener_.upstream;
  route.upstream = config_.find_upstream(upstream);
  if (route.upstream->mx) route.domain = std::string(recipient_domain);
  return route;
}

bool RelaySession::connector_certain_at_mail() const {
  // Where no connector this listener can match looks at recipient domains, MAIL already decides it.
  return std::none_of(config_.connectors.begin(), config_.connectors.end(), [&](const config::Connector& c) {
    return c.direction == listener_.direction && !c.match.recipient_domains.empty() &&
           (c.match.listeners.empty() || std::find(c.match.listeners.begin(), c.match.listeners.end(),
                                                   listener_.name) != c.match.listeners.end());
  });
}

void RelaySession::start_transaction() {
  if (transaction_) return;
  upstream_ = std::make_unique<UpstreamLeg>(
      UpstreamLeg::Session{*runtime_, telemetry_, deadlines_, id_, listener_.name, &registry_.mta_sts()},
      client_.socket().get_executor());
  transaction_ = std::make_unique<proto::RelayTransaction>(session_, client_out_);
}

void RelaySession::begin_mail() {
  // INTERFACE rule 6: MAIL is answered here, after mailflowd's own checks (syntax and SIZE in ServerSession,
  // forced TLS where the connector is already certain); it goes upstream with the first RCPT, when the route
  // is known.
  start_transaction();
  sender_domain_ = proto::address_domain(session_.last_command().address);
  bool tls_missing = false;
  if (!session_.tls_active() && connector_certain_at_mail_) {
    const Route route = route_for("");
    tls_missing = route.connector && route.connector->require_tls;
  }
  transaction_->mail(session_.last_command(), tls_missing);
}

void RelaySession::forward_rcpt() {
  const std::string domain = proto::address_domain(session_.last_command().address);
  const Route chosen = route_for(domain);
  proto::RelayRoute route;
  route.connector = chosen.connector ? chosen.connector->name : std::string(internet_connector);
  route.path = chosen.upstream->name + "/" + chosen.domain;
  route.require_tls = chosen.connector && chosen.connector->require_tls;
  // Used if this recipient opens the transaction's route. Once the transaction has one, it stays what is
  // opened (a replay reopens it), whatever route a later recipient (refused with 452) would have had.
  if (!transaction_->route()) opening_ = chosen;
  transaction_->rcpt(session_.last_command().argument, domain, route, session_.tls_active());
}

proto::RelayTransaction::Step RelaySession::next_step(bool settle) {
  if (!transaction_) return Step::idle;
  if (settle) transaction_->flush();
  if (const auto recipients = transaction_->take_delivered()) {
    // The one place a message is counted: the upstream took responsibility for it.
    ++messages_;
    // The far side: the client for inbound mail; the MX host and the recipients' domains for outbound.
    const bool out = listener_.direction == config::Direction::outbound;
    const std::string address = out ? upstream_->address() : address_text(client_address_);
    const std::span<const std::string> domains =
        out ? std::span<const std::string>(transaction_->accepted_domains())
            : std::span<const std::string>(&sender_domain_, sender_domain_.empty() ? 0 : 1);
    telemetry_.message_delivered(
        connector_name_, listener_.direction, message_version_, message_bytes_, *recipients,
        Remote{address, out ? upstream_->host() : session_.helo_name(),
               out ? upstream_->cipher() : std::string_view(client_.tls().cipher), domains,
               out ? upstream_->policy() : std::string_view()});
  }
  const Step step = transaction_->next();
  // After next(), which may give local refusals too (and the 421 of the max_bad_commands-th).
  for (const auto reason : transaction_->take_rejects()) count_reject(reason);
  if (transaction_->closing() && !close_) {
    // The upstream's 421 is the client's (RFC 5321 3.8), or a refusal was its max_bad_commands-th: its
    // session ends once the 421 is flushed.
    close_ = true;
    result_ = transaction_->closing_reason();
  }
  return step;
}

asio::awaitable<void> RelaySession::drive(Step step) {
  for (; step != Step::idle; step = next_step(false)) {
    switch (step) {
      case Step::idle:
        break;
      case Step::open_upstream: {
        const UpstreamLeg::Client client{address_text(client_address_), client_port_, session_.helo_name(),
                                         session_.esmtp()};
        bool reused = false;
        auto refusal = co_await upstream_->open(*opening_.upstream, opening_.domain, client,
                                               transaction_->route_to_open().connector,
                                               !transaction_->upstream_in_transaction(), reused);
        if (refusal) {
          // Its reason is counted by the engine, for every recipient that this refusal answers.
          transaction_->on_opened(std::move(refusal->reply), reused, {}, refusal->reason);
          break;
        }
        transaction_->on_opened(std::nullopt, reused, upstream_->extensions());
        route_chosen();
        break;
      }
      case Step::reset_upstream:
        transaction_->on_reset(co_await upstream_->reset());
        break;
      case Step::write_upstream: {
        const std::string_view out = transaction_->upstream_output();
        const std::size_t sent = upstream_->write_now(out);  // nearly always all of it: no coroutine
        bool written = sent == out.size();
        if (!written) written = co_await upstream_->write(out.substr(sent), in(config_.timeouts.command));
        transaction_->on_written(written, upstream_->closed_idle());
        break;
      }
      case Step::read_reply: {
        const bool data_end = transaction_->reply_wait() == proto::RelayTransaction::ReplyWait::data_end;
        auto reply = co_await upstream_->read_reply(
            in(data_end ? config_.timeouts.data_end : config_.timeouts.command));
        if (reply && reply->code == 421) upstream_->closing();
        if (!transaction_->on_reply(std::move(reply), upstream_->closed_idle(), upstream_->unread()))
          upstream_->fail("protocol");
        break;
      }
      case Step::send_message:
        co_await relay_message();
        break;
    }
  }
}

void RelaySession::route_chosen() {
  connector_name_ = transaction_->route()->connector;
  add_to_list(connectors_seen_, connector_name_, std::numeric_limits<std::size_t>::max());
  // The envelope sender's domain (never its local part), so that traffic that lands in "internet" is known by
  // more than its address and HELO; "<>" for bounces. Bounded: a session cannot grow the line without end.
  add_to_list(sender_domains_seen_, sender_domain_.empty() ? "<>" : sender_domain_, max_logged_sender_domains);
}

std::string RelaySession::received_header() const {
  // RFC 5321 §4.4 trace field; the TLS comment follows common MTA practice (RFC 8314 §4.3 suggests it).
  // Built in one allocation (issue #16: allocations per message).
  const std::string address = address_literal(client_address_);
  const bool tls = session_.tls_active();
  const char* protocol = session_.esmtp() ? (tls ? "ESMTPS" : "ESMTP") : "SMTP";
  std::string header;
  header.reserve(512);
  header += "Received: from ";
  header += session_.helo_name().empty() ? address : session_.helo_name();
  header += " ([";
  header += address;
  header += "])\r\n";
  if (tls) {
    header += "\t(using ";
    header += proto::to_string(client_.tls().version);
    header += " with cipher ";
    header += client_.tls().cipher;
    header += ")\r\n";
  }
  header += "\tby ";
  header += config_.hostname;
  header += " (mailflowd) with ";
  header += protocol;
  header += " id ";
  header += id_;
  header += ";\r\n\t";
  append_rfc5322_date(header);
  header += "\r\n";
  return header;
}

proto::TlsVersion RelaySession::counted_version() const {
  // The external leg decides: the client's for inbound listeners, the upstream's for outbound ones.
  if (listener_.direction == config::Direction::outbound) return upstream_->tls_version();
  return client_.tls().version;
}

asio::awaitable<void> RelaySession::relay_message() {
  bool told = flush_now();  // the client's 354
  if (!told) told = co_await flush();
  if (!told) {
    co_await upstream_->close(false);
    transaction_->on_message_aborted();
    co_return;
  }
  proto::DataFilter filter(
      {config_.limits.max_message_size, config_.limits.max_line, config_.limits.bare_newline});
  const bool reject_bare_newline = config_.limits.bare_newline == proto::BareNewlinePolicy::reject;
  message_version_ = counted_version();
  std::string out = received_header();
  proto::TraceHopCounter hops;  // the client's message's own Received: fields (ours is not fed to it)
  bool upstream_ok = true;      // false once the upstream was dropped (violation or failure)
  std::size_t block_bytes = 0;
  auto block_deadline = in(config_.timeouts.data_block);
  for (;;) {
    if (!client_in_.empty()) {
      const std::size_t before = out.size();
      const std::size_t consumed = filter.feed(client_in_.view(), out);
      client_in_.consume(consumed);
      block_bytes += consumed;
      if (!hops.headers_done()) hops.feed(std::string_view(out).substr(before));
    }
    const bool too_many_hops = hops.hops() > config_.limits.max_hops;
    const bool violation = filter.too_big() || filter.line_too_long() ||
                           (reject_bare_newline && filter.bare_newline_seen()) || too_many_hops;
    if (violation && upstream_ok) {
      // Closing without the terminator is the only way to abort DATA: the upstream discards the message.
      co_await upstream_->close(false);
      upstream_ok = false;
    }
    if (upstream_ok && !out.empty() && (out.size() >= data_block_size || filter.done())) {
      // The upstream gets as long for a block as the client does.
      const std::size_t sent = upstream_->write_now(out);  // nearly always the whole block: no coroutine
      bool written = sent == out.size();
      if (!written)
        written = co_await upstream_->write(std::string_view(out).substr(sent), in(config_.timeouts.data_block));
      if (!written) {
        upstream_ok = false;
        // The client is not to blame for the time the upstream took: its block starts over. It may finish the
        // message (and hear 451) but gets no more time than any block.
        block_deadline = in(config_.timeouts.data_block);
        block_bytes = 0;
      }
      out.clear();
    }
    if (!upstream_ok) out.clear();
    if (filter.done()) break;
    if (block_bytes >= data_block_size) {
      block_deadline = in(config_.timeouts.data_block);
      block_bytes = 0;
    }
    error_code ec;
    co_await client_.read_some(client_in_, data_read_chunk, block_deadline, ec);
    if (ec) {
      // The client went away (or stalled) mid-message: nothing may be delivered.
      co_await upstream_->close(false);
      transaction_->on_message_aborted();
      if (ec == asio::error::timed_out) {
        count_reject("timeout");
        co_await say_goodbye(proto::format_reply(421, "4.4.2", config_.hostname + " Error: timeout exceeded"),
                             "timeout");
      } else {
        result_ = forced_ ? "shutdown" : "disconnected_in_data";  // a stop cut it, or the client went
        close_ = true;
      }
      co_return;
    }
  }
  if (filter.bare_newline_seen() && !reject_bare_newline) count_reject("bare_newline_normalized");
  message_bytes_ = filter.message_bytes();
  std::optional<std::string> refusal;  // the message's reply when it does not reach the upstream whole
  if (filter.too_big()) {
    count_reject("message_too_big");
    refusal = proto::format_reply(552, "5.3.4", "Message size exceeds fixed maximum message size");
  } else if (filter.line_too_long()) {
    count_reject("data_line_too_long");
    refusal = proto::format_reply(554, "5.6.0", "Message line too long");
  } else if (reject_bare_newline && filter.bare_newline_seen()) {
    count_reject("bare_newline");
    refusal = proto::format_reply(550, "5.5.2", "Message contains bare CR or LF characters");
  } else if (hops.hops() > config_.limits.max_hops) {
    // A mail loop (RFC 5321 6.3): refused, as Postfix's hopcount_limit does.
    count_reject("too_many_hops");
    refusal = proto::format_reply(
        554, "5.4.6", "Too many hops (" + std::to_string(hops.hops()) + " Received: headers): mail loop?");
  } else if (!upstream_ok) {
    refusal = std::string(proto::RelayTransaction::upstream_lost_reply);
  }
  transaction_->on_message_end(std::move(refusal));
}

// ---- loop scope -----------------------------------------------------------------------------------------

namespace {
thread_local LoopScope::Resources* current_loop = nullptr;
}

LoopScope::LoopScope() : previous_(current_loop) { current_loop = &resources_; }

LoopScope::~LoopScope() {
  current_loop = previous_;
  resources_.resolver.reset();  // before the event loop it belongs to goes away
  resources_.hosts_resolver.reset();
}

LoopScope::Resources* LoopScope::current() { return current_loop; }

// ---- registry -------------------------------------------------------------------------------------------

SessionRegistry::SessionRegistry(Telemetry& telemetry)
    : telemetry_(telemetry), mta_sts_(std::make_unique<MtaStsCache>()) {}

SessionRegistry::~SessionRegistry() = default;

bool SessionRegistry::admit_session(std::size_t limit) {
  std::lock_guard lock(mutex_);
  if (admitted_ >= limit) return false;
  ++admitted_;
  return true;
}

void SessionRegistry::release_session() {
  std::lock_guard lock(mutex_);
  --admitted_;
}

bool SessionRegistry::admit_address(const std::array<std::uint8_t, 16>& address, std::uint32_t limit) {
  std::lock_guard lock(mutex_);
  auto& count = per_address_[address];
  if (count >= limit) {
    if (count == 0) per_address_.erase(address);
    return false;
  }
  ++count;
  return true;
}

void SessionRegistry::release_address(const std::array<std::uint8_t, 16>& address) {
  std::lock_guard lock(mutex_);
  auto it = per_address_.find(address);
  if (it != per_address_.end() && --it->second == 0) per_address_.erase(it);
}

void SessionRegistry::add(const std::shared_ptr<RelaySession>& session) {
  std::lock_guard lock(mutex_);
  sessions_.emplace(session.get(), session);
  peak_ = std::max(peak_, sessions_.size());
}

std::size_t SessionRegistry::take_peak() {
  std::lock_guard lock(mutex_);
  return std::exchange(peak_, sessions_.size());
}

void SessionRegistry::remove(RelaySession* session) {
  std::lock_guard lock(mutex_);
  sessions_.erase(session);
}

std::size_t SessionRegistry::active() const {
  std::lock_guard lock(mutex_);
  return sessions_.size();
}

bool SessionRegistry::draining() const {
  std::lock_guard lock(mutex_);
  return draining_;
}

void SessionRegistry::begin_drain() {
  std::vector<std::shared_ptr<RelaySession>> sessions;
  {
    std::lock_guard lock(mutex_);
    draining_ = true;
    for (const auto& [key, weak] : sessions_)
      if (auto s = weak.lock()) sessions.push_back(std::move(s));
  }
  for (auto& session : sessions) session->notify_drain();
}

void SessionRegistry::close_all() {
  std::vector<std::shared_ptr<RelaySession>> sessions;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [key, weak] : sessions_)
      if (auto s = weak.lock()) sessions.push_back(std::move(s));
  }
  for (auto& session : sessions) session->force_close();
}

void start_relay_session(tcp::socket socket, const tcp::endpoint& peer,
                         std::shared_ptr<const Runtime> runtime, const config::Listener& listener,
                         SessionRegistry& registry) {
  auto executor = socket.get_executor();
  auto session =
      std::make_shared<RelaySession>(std::move(socket), peer, std::move(runtime), listener, registry);
  registry.add(session);
  asio::co_spawn(executor, session->run(), [session](std::exception_ptr error) {
    if (error) session->crashed(error);
  });
}

}  // namespace mailflow
