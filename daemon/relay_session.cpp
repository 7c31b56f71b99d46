#include "daemon/relay_session.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <random>

#include "daemon/connector_match.hpp"
#include "daemon/failpoint.hpp"
#include "daemon/link.hpp"
#include "daemon/log.hpp"
#include "daemon/mx_route.hpp"
#include "daemon/resolver.hpp"
#include "daemon/telemetry.hpp"
#include "proto/client_session.hpp"
#include "proto/data_filter.hpp"
#include "proto/line_framer.hpp"
#include "proto/proxy_header.hpp"
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

constexpr auto use_awaitable = asio::use_awaitable;
auto with(error_code& ec) { return asio::redirect_error(use_awaitable, ec); }

std::array<std::uint8_t, 16> mapped_bytes(const asio::ip::address& address) {
  if (address.is_v4()) return asio::ip::make_address_v6(asio::ip::v4_mapped, address.to_v4()).to_bytes();
  return address.to_v6().to_bytes();
}

std::string address_text(const asio::ip::address& address) {
  if (address.is_v6() && address.to_v6().is_v4_mapped())
    return asio::ip::make_address_v4(asio::ip::v4_mapped, address.to_v6()).to_string();
  return address.to_string();
}

// RFC 5321 §4.1.3 address literal body: "192.0.2.1" or "IPv6:2001:db8::1".
std::string address_literal(const asio::ip::address& address) {
  const std::string text = address_text(address);
  return text.find(':') == std::string::npos ? text : "IPv6:" + text;
}

// "192.0.2.1:25" or "[2001:db8::1]:25".
std::string endpoint_text(const asio::ip::address& address, std::uint16_t port) {
  const std::string text = address_text(address);
  return (text.find(':') == std::string::npos ? text : "[" + text + "]") + ":" + std::to_string(port);
}

std::string rfc5322_date() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buffer[64];
  std::strftime(buffer, sizeof buffer, "%a, %d %b %Y %H:%M:%S +0000", &tm);
  return buffer;
}

std::string handshake_failure_label(const error_code& ec, bool timed_out) {
  const bool eof = ec == asio::error::eof || ec == asio::ssl::error::stream_truncated;
  const unsigned long ssl_error = ec.category() == asio::error::get_ssl_category() ? ec.value() : 0;
  return handshake_failure_reason(ssl_error, timed_out, eof);
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

struct Upstream {
  const config::Upstream* config = nullptr;
  std::string domain;  // mx upstreams: the recipient domain whose MX host this is
  std::string host;    // mx upstreams: the MX host connected to
  std::unique_ptr<Link> link;
  ReadBuffer in;
  bool in_transaction = false;
  bool pipelining = false;  // advertised: queued commands go out in one write
};

const char* const upstream_lost_reply = "451 4.4.2 Upstream connection lost, try again later\r\n";
const char* const upstream_unavailable_reply = "451 4.4.1 Upstream unavailable, try again later\r\n";

}  // namespace

class RelaySession : public std::enable_shared_from_this<RelaySession> {
 public:
  RelaySession(tcp::socket socket, std::shared_ptr<const Runtime> runtime, const config::Listener& listener,
               SessionRegistry& registry)
      : runtime_(std::move(runtime)),
        config_(*runtime_->config),
        listener_(listener),
        registry_(registry),
        telemetry_(registry.telemetry()),
        client_(std::move(socket)),
        timer_(client_.socket().get_executor()),
        session_(server_options()),
        id_(new_session_id()),
        connector_certain_at_mail_(connector_certain_at_mail()) {}

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
      self->client_.close();
      if (self->upstream_.link) self->upstream_.link->close();
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
    return options;
  }

  // ---- waits. Every wait of the session goes through one of these, with its own deadline, armed right
  // before it (as Beast's expires_after): the watchdog cancels whatever is in flight when it passes, and the
  // wait then reports asio::error::timed_out, so no caller depends on a flag. Deadlines are absolute so that
  // a whole command line or DATA block shares one however many reads it takes.
  static SteadyClock::time_point in(SteadyClock::duration timeout) { return SteadyClock::now() + timeout; }
  asio::awaitable<void> read(Link& link, ReadBuffer& buffer, std::size_t max,
                             SteadyClock::time_point deadline, error_code& ec,
                             Link::Wait wait = Link::Wait::busy);
  asio::awaitable<void> write(Link& link, std::string_view data, SteadyClock::time_point deadline,
                              error_code& ec);
  asio::awaitable<void> handshake(Link& link, SSL_CTX* context, bool server, const std::string& peer_name,
                                  bool verify, SteadyClock::time_point deadline, error_code& ec,
                                  const std::vector<std::string>& verify_names = {});
  asio::awaitable<void> connect(Link& link, const tcp::endpoint& endpoint, SteadyClock::time_point deadline,
                                error_code& ec);
  asio::awaitable<void> wait_readable(SteadyClock::time_point deadline, error_code& ec);
  // Sends close_notify on a TLS link (bounded by the goodbye deadline) and closes it.
  asio::awaitable<void> close_link(Link& link);
  void arm(SteadyClock::time_point deadline);
  void disarm(error_code& ec);  // after a wait: a deadline that fired becomes ec = timed_out
  asio::awaitable<void> watchdog(std::shared_ptr<RelaySession> self);

  asio::awaitable<void> serve();
  asio::awaitable<void> finish();
  void release();  // the session's end, without I/O: closes, counts, frees its slots and logs; once only
  asio::awaitable<bool> read_proxy_header();
  asio::awaitable<bool> greet_pause();
  asio::awaitable<bool> next_line(std::string& line);
  asio::awaitable<void> perform(const proto::ServerSession::Action& action);
  asio::awaitable<bool> flush();
  asio::awaitable<void> say_goodbye(std::string_view reply, std::string_view result);
  asio::awaitable<void> start_tls();
  enum class Pending { mail, rcpt, data };
  void queue_upstream(Pending kind, std::string line);
  asio::awaitable<bool> resolve_pending();
  asio::awaitable<void> begin_mail();
  asio::awaitable<void> forward_rcpt();
  asio::awaitable<void> relay_data();

  // The transaction's route, fixed at its first accepted RCPT (INTERFACE rule 4): later RCPTs must share it.
  struct Route {
    const config::Connector* connector = nullptr;  // null: unmatched ("internet")
    const config::Upstream* upstream = nullptr;
    std::string domain;  // mx upstreams: the recipient domain (another domain is another route)
  };
  // The route of a recipient: its connector (with the recipient domain known) and upstream.
  Route route_for(std::string_view recipient_domain) const;
  bool connector_certain_at_mail() const;
  // Connected (or reused) for `route`; otherwise the reply the RCPT gets, CRLF included.
  asio::awaitable<std::optional<std::string>> ensure_upstream(const Route& route);
  // Opens one connection (connect, banner, EHLO, STARTTLS per policy, XCLIENT): false with `reason` set.
  asio::awaitable<bool> open_upstream(const config::Upstream& upstream, const tcp::endpoint& endpoint,
                                      const std::string& tls_name, SteadyClock::time_point connect_deadline,
                                      std::string& reason);
  asio::awaitable<std::optional<proto::Reply>> upstream_command(std::string_view line);
  // `deadline` covers the whole reply, however many reads it takes.
  asio::awaitable<std::optional<proto::Reply>> read_upstream_reply(SteadyClock::time_point deadline);
  asio::awaitable<void> reset_upstream_transaction();
  asio::awaitable<void> close_upstream(bool polite);
  void upstream_failed(std::string_view reason);
  void drop_upstream();  // close the upstream leg and count it

  void count_reject(std::string_view reason);
  std::string received_header() const;
  proto::TlsVersion counted_version() const;

  std::shared_ptr<const Runtime> runtime_;
  const config::Config& config_;
  const config::Listener& listener_;
  SessionRegistry& registry_;
  Telemetry& telemetry_;
  Link client_;
  asio::steady_timer timer_;
  std::optional<tcp::resolver> resolver_;  // an upstream host name being looked up (the watchdog cancels it)
  proto::ServerSession session_;
  proto::CommandFramer framer_;
  Upstream upstream_;
  std::string upstream_out_;     // commands queued for the upstream, sent by resolve_pending()
  std::deque<Pending> pending_;  // their replies, still to be read and relayed

  std::string id_;
  ReadBuffer client_in_;
  std::string client_out_;
  asio::ip::address client_address_;
  std::uint16_t client_port_ = 0;
  std::array<std::uint8_t, 16> client_bytes_{};
  bool address_admitted_ = false;

  SteadyClock::time_point started_ = SteadyClock::now();
  SteadyClock::time_point deadline_ = SteadyClock::time_point::max();
  SteadyClock::time_point command_deadline_;
  bool command_clock_running_ = false;
  std::uint32_t commands_ = 0;  // complete command lines received (the first one gets timeouts.greeting)
  bool timed_out_ = false;
  bool finished_ = false;
  bool idle_ = false;
  bool close_ = false;
  bool proxy_checked_ = false;

  std::optional<Route> route_;
  std::string sender_domain_;  // of the transaction's MAIL FROM
  std::string mail_line_;      // "MAIL FROM:<...> ...\r\n", answered locally, sent with the first RCPT
  std::optional<proto::Reply>
      mail_refusal_;  // the upstream refused MAIL: every RCPT of the transaction hears it
  // Routes that could not be opened in this transaction ("upstream/domain" -> the reply): the next recipient
  // of a dead domain is answered at once instead of walking its MX hosts again.
  std::map<std::string, std::string, std::less<>> failed_routes_;
  std::string connector_name_;  // of the current transaction
  config::Direction direction_ = config::Direction::inbound;
  std::string connectors_seen_;
  std::string sender_domains_seen_;
  const bool connector_certain_at_mail_;  // of this session's configuration and listener: computed once
  std::string upstream_log_;  // "name/TLS1.2/cipher" of the last upstream leg, for the session line
  std::string result_ = "disconnected";
  std::uint32_t messages_ = 0;
  std::uint32_t rejects_ = 0;
};

// ---- deadlines -------------------------------------------------------------------------------------------

// The parameter keeps the session alive; it is bound when the coroutine is created, not when it first runs
// (by then a short session may be gone).
asio::awaitable<void> RelaySession::watchdog(std::shared_ptr<RelaySession> /*self*/) {
  while (!finished_) {
    timer_.expires_at(deadline_);
    error_code ec;
    co_await timer_.async_wait(with(ec));
    if (finished_) break;
    if (deadline_ <= SteadyClock::now()) {
      // The wait in flight took too long: cancel everything it could be (the client socket, the upstream's, a
      // connect or a name lookup); the next wait arms a deadline of its own.
      timed_out_ = true;
      deadline_ = SteadyClock::time_point::max();
      client_.cancel();
      if (upstream_.link) upstream_.link->cancel();
      if (resolver_) resolver_->cancel();
    }
  }
}

void RelaySession::arm(SteadyClock::time_point deadline) {
  timed_out_ = false;
  deadline_ = deadline;
  if (deadline_ < timer_.expiry()) timer_.cancel();  // wake the watchdog so that it re-arms earlier
}

void RelaySession::disarm(error_code& ec) {
  if (std::exchange(timed_out_, false)) ec = asio::error::timed_out;
}

asio::awaitable<void> RelaySession::read(Link& link, ReadBuffer& buffer, std::size_t max,
                                         SteadyClock::time_point deadline, error_code& ec, Link::Wait wait) {
  arm(deadline);
  co_await link.read_some(buffer, max, ec, wait);
  disarm(ec);
}

asio::awaitable<void> RelaySession::write(Link& link, std::string_view data, SteadyClock::time_point deadline,
                                          error_code& ec) {
  arm(deadline);
  co_await link.write(data, ec);
  disarm(ec);
}

asio::awaitable<void> RelaySession::handshake(Link& link, SSL_CTX* context, bool server,
                                              const std::string& peer_name, bool verify,
                                              SteadyClock::time_point deadline, error_code& ec,
                                              const std::vector<std::string>& verify_names) {
  arm(deadline);
  co_await link.handshake(context, server, peer_name, verify, ec, verify_names);
  disarm(ec);
}

asio::awaitable<void> RelaySession::connect(Link& link, const tcp::endpoint& endpoint,
                                            SteadyClock::time_point deadline, error_code& ec) {
  arm(deadline);
  co_await link.connect(endpoint, ec);
  disarm(ec);
}

asio::awaitable<void> RelaySession::wait_readable(SteadyClock::time_point deadline, error_code& ec) {
  arm(deadline);
  co_await client_.socket().async_wait(tcp::socket::wait_read, with(ec));
  disarm(ec);
}

asio::awaitable<void> RelaySession::close_link(Link& link) {
  if (link.tls_active()) {
    arm(in(goodbye_timeout));
    error_code ec;
    co_await link.shutdown_tls(ec);
    disarm(ec);
  }
  link.close();
}

// ---- the session ----------------------------------------------------------------------------------------

asio::awaitable<void> RelaySession::run() {
  auto self = shared_from_this();
  error_code ec;
  auto peer = client_.socket().remote_endpoint(ec);
  if (!ec) {
    client_address_ = peer.address();
    client_port_ = peer.port();
    client_bytes_ = mapped_bytes(client_address_);
  }
  client_.socket().set_option(tcp::no_delay(true), ec);
  telemetry_.session_opened(listener_.name);
  asio::co_spawn(client_.socket().get_executor(), watchdog(self), asio::detached);
  co_await serve();
  co_await finish();
}

asio::awaitable<void> RelaySession::serve() {
  const bool proxy_trusted =
      std::any_of(listener_.proxy_trusted.begin(), listener_.proxy_trusted.end(),
                  [&](const config::Cidr& cidr) { return cidr.contains(client_bytes_); });
  if (proxy_trusted && !co_await read_proxy_header()) co_return;

  if (registry_.active() > config_.limits.max_sessions) {
    count_reject("session_limit");
    co_await say_goodbye(proto::format_reply(421, "4.7.0", config_.hostname + " Error: too many connections"),
                         "session_limit");
    co_return;
  }
  if (!registry_.admit_address(client_bytes_, config_.limits.max_sessions_per_ip)) {
    count_reject("ip_limit");
    co_await say_goodbye(
        proto::format_reply(421, "4.7.0",
                            config_.hostname + " Error: too many connections from your address"),
        "ip_limit");
    co_return;
  }
  address_admitted_ = true;

  if (config_.limits.greet_pause.count() > 0 && !co_await greet_pause()) co_return;

  client_out_ += session_.banner();
  std::string line;
  while (!close_) {
    if (!co_await next_line(line)) co_return;
    failpoint("session.command");
    co_await perform(session_.on_line(line));
  }
}

asio::awaitable<void> RelaySession::finish() {
  if (!client_out_.empty()) co_await flush();
  co_await close_upstream(pending_.empty());
  pending_.clear();
  co_await close_link(client_);
  release();
}

void RelaySession::crashed(std::exception_ptr error) {
  // An exception escaped the session: nothing of it may leak (registry and per-IP slots, sessions_active).
  telemetry_.internal_error("session");
  log_event(LogLevel::error, "internal_error",
            {{"id", id_}, {"component", "session"}, {"error", exception_text(error)}});
  result_ = "internal_error";
  if (upstream_.link) drop_upstream();
  release();
}

void RelaySession::release() {
  if (finished_) return;
  client_.close();
  finished_ = true;
  timer_.cancel();

  const double seconds = std::chrono::duration<double>(SteadyClock::now() - started_).count();
  telemetry_.leg_finished(listener_.name, Leg::client, client_.tls().version);
  telemetry_.session_closed(listener_.name, seconds);
  if (address_admitted_) registry_.release_address(client_bytes_);
  registry_.remove(this);

  const std::string client = endpoint_text(client_address_, client_port_);
  const std::string duration = fmt::format("{:.3f}", seconds);
  log_event(LogLevel::info, "session",
            {{"id", id_},
             {"client", client},
             {"listener", listener_.name},
             {"helo", session_.helo_name()},
             {"sni", client_.tls().sni},
             {"tls", proto::to_string(client_.tls().version)},
             {"cipher", client_.tls().cipher},
             {"connector", connectors_seen_},
             {"sender_domains", sender_domains_seen_},
             {"upstream", upstream_log_},
             {"messages", messages_},
             {"rejects", rejects_},
             {"result", result_},
             {"duration", duration}});
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
    error_code ec;
    co_await read(client_, client_in_, proto::max_proxy_header - client_in_.size(), deadline, ec,
                  Link::Wait::idle);
    if (ec) {
      const bool timed_out = ec == asio::error::timed_out;
      count_reject(timed_out ? "proxy_timeout" : "proxy_truncated");
      result_ = timed_out ? "proxy_timeout" : "proxy_truncated";
      co_return false;
    }
  }
}

asio::awaitable<bool> RelaySession::greet_pause() {
  // RFC 5321 §4.3.1: the client must wait for the banner. Anything sent before it is a spambot tell.
  error_code ec;
  co_await wait_readable(in(config_.limits.greet_pause), ec);
  if (ec == asio::error::timed_out) co_return true;
  // Readable: input, or a client that hung up without a word (not an early talker, just gone).
  char byte = 0;
  const bool hung_up = !ec && ::recv(client_.socket().native_handle(), &byte, 1, MSG_PEEK) == 0;
  if (ec || hung_up) {
    result_ = "disconnected";
    co_return false;
  }
  count_reject("early_talker");
  co_await say_goodbye(
      proto::format_reply(554, "5.5.0", config_.hostname + " Error: SMTP protocol synchronization"),
      "early_talker");
  co_return false;
}

asio::awaitable<bool> RelaySession::next_line(std::string& line) {
  for (;;) {
    if (!proxy_checked_ && !client_in_.empty()) {
      proxy_checked_ = true;
      if (proto::looks_like_proxy_header(client_in_.view())) {
        count_reject("proxy_untrusted");
        co_await say_goodbye(
            proto::format_reply(554, "5.7.0", "PROXY protocol not accepted from this address"),
            "proxy_untrusted");
        co_return false;
      }
    }
    auto event = framer_.next(client_in_.view());
    if (event.kind == proto::CommandFramer::Kind::line) {
      line.assign(event.line);
      client_in_.consume(event.consumed);
      command_clock_running_ = false;
      ++commands_;
      co_return true;
    }
    client_in_.consume(event.consumed);
    if (event.kind != proto::CommandFramer::Kind::need_more) {
      command_clock_running_ = false;
      co_await perform(session_.on_framing_error(event.kind));
      if (close_) co_return false;
      continue;
    }
    co_await resolve_pending();
    if (!co_await flush()) co_return false;
    const bool idle = session_.state() == proto::ServerSession::State::need_helo ||
                      session_.state() == proto::ServerSession::State::ready;
    if (idle && registry_.draining()) {
      co_await say_goodbye(proto::format_reply(421, "4.3.2", config_.hostname + " Service shutting down"),
                           "shutdown");
      co_return false;
    }
    idle_ = idle;
    if (idle) {  // an idle session keeps no buffers
      client_in_.release_if_empty();
      upstream_.in.release_if_empty();
    }
    // The whole command must arrive within the timeout: partial lines do not restart the clock (slowloris).
    if (!command_clock_running_) {
      command_deadline_ =
          SteadyClock::now() + (commands_ == 0 ? config_.timeouts.greeting : config_.timeouts.command);
      command_clock_running_ = true;
    }
    error_code ec;
    co_await read(client_, client_in_, command_read_chunk, command_deadline_, ec,
                  idle ? Link::Wait::idle : Link::Wait::busy);
    idle_ = false;
    if (ec) {
      if (ec == asio::error::timed_out) {
        count_reject("timeout");
        co_await say_goodbye(proto::format_reply(421, "4.4.2", config_.hostname + " Error: timeout exceeded"),
                             "timeout");
      } else if (ec == asio::error::operation_aborted && registry_.draining()) {
        co_await say_goodbye(proto::format_reply(421, "4.3.2", config_.hostname + " Service shutting down"),
                             "shutdown");
      } else {
        result_ = "disconnected";
      }
      co_return false;
    }
  }
}

asio::awaitable<void> RelaySession::perform(const proto::ServerSession::Action& action) {
  using Kind = proto::ServerSession::ActionKind;
  if (action.kind != Kind::begin_mail && action.kind != Kind::forward_rcpt &&
      action.kind != Kind::begin_data) {
    co_await resolve_pending();  // replies go out in command order
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
      co_await reset_upstream_transaction();
      break;
    case Kind::start_tls:
      client_out_ += action.reply;
      co_await start_tls();
      break;
    case Kind::begin_mail:
      co_await begin_mail();
      break;
    case Kind::forward_rcpt:
      co_await forward_rcpt();
      break;
    case Kind::begin_data:
      co_await relay_data();
      break;
  }
}

asio::awaitable<bool> RelaySession::flush() {
  if (client_out_.empty()) co_return true;
  error_code ec;
  co_await write(client_, client_out_, in(config_.timeouts.command), ec);
  client_out_.clear();
  if (ec) {
    result_ = ec == asio::error::timed_out ? "timeout" : "disconnected";
    close_ = true;
    co_return false;
  }
  co_return true;
}

asio::awaitable<void> RelaySession::say_goodbye(std::string_view reply, std::string_view result) {
  client_out_ += reply;
  error_code ec;
  co_await write(client_, client_out_, in(goodbye_timeout), ec);
  client_out_.clear();
  result_ = result;
  close_ = true;
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
  if (!co_await flush()) co_return;
  if (!client_in_.empty()) {
    // CVE-2011-0411 class: plaintext sent behind STARTTLS must never be executed inside TLS.
    count_reject("starttls_pipelining");
    client_in_.clear();
  }
  const ServerTls* tls = runtime_->server_tls(listener_.name);
  error_code ec;
  co_await handshake(client_, tls->context(), true, {}, false, in(config_.timeouts.tls_handshake), ec);
  if (ec) {
    const bool timed_out = ec == asio::error::timed_out;
    const std::string reason = handshake_failure_label(ec, timed_out);
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
    telemetry_.tls_handshake_refused(listener_.name, connector, offered);
    add_to_list(connectors_seen_, connector, std::numeric_limits<std::size_t>::max());
    const std::string client = address_text(client_address_);
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

asio::awaitable<void> RelaySession::begin_mail() {
  // INTERFACE rule 6: MAIL is answered here, after mailflowd's own checks (syntax and SIZE in ServerSession,
  // forced TLS where the connector is already certain); it goes upstream with the first RCPT, when the route
  // is known.
  co_await resolve_pending();  // replies go out in command order
  route_.reset();
  mail_refusal_.reset();
  failed_routes_.clear();
  mail_line_ = "MAIL " + session_.last_command().argument + "\r\n";
  sender_domain_ = proto::address_domain(session_.last_command().address);
  if (!session_.tls_active() && connector_certain_at_mail_) {
    const Route route = route_for("");
    if (route.connector && route.connector->require_tls) {
      count_reject("tls_required");
      client_out_ += proto::format_reply(530, "5.7.0", "Must issue a STARTTLS command first");
      session_.on_mail_reply(530);
      co_return;
    }
  }
  client_out_ += proto::format_reply(250, "2.1.0", "Ok");
  session_.on_mail_reply(250);
}

asio::awaitable<void> RelaySession::forward_rcpt() {
  const std::string rcpt_line = "RCPT " + session_.last_command().argument + "\r\n";
  const std::string domain = proto::address_domain(session_.last_command().address);
  const Route route = route_for(domain);
  const std::string connector_name =
      route.connector ? route.connector->name : std::string(internet_connector);
  // `reply` is in wire form ("452 4.5.3 ...\r\n").
  auto refuse = [&](std::string reply, std::string_view reason) -> asio::awaitable<void> {
    co_await resolve_pending();  // replies go out in command order
    if (!reason.empty()) count_reject(reason);
    session_.on_rcpt_reply(std::atoi(reply.c_str()));
    client_out_ += reply;
  };
  if (route_) {
    const bool same_path = route_->upstream == route.upstream && route_->domain == route.domain;
    if (!same_path || route_->connector != route.connector) {
      // RFC 5321 4.5.3.1.10: the client sends this recipient again, in a transaction of its own.
      const std::string why =
          same_path ? "belongs to connector " + connector_name : "is delivered by another route";
      co_await refuse(
          proto::format_reply(452, "4.5.3", "Recipient " + why + ": send it in a separate transaction"),
          "recipient_route");
      co_return;
    }
    if (mail_refusal_) {
      co_await refuse(proto::format_reply(*mail_refusal_), "");
      co_return;
    }
    queue_upstream(Pending::rcpt, rcpt_line);
    if (!upstream_.pipelining) co_await resolve_pending();
    co_return;
  }
  // The first recipient: it chooses the connector and the route of the transaction.
  if (route.connector && route.connector->require_tls && !session_.tls_active()) {
    co_await refuse(proto::format_reply(530, "5.7.0", "Must issue a STARTTLS command first"), "tls_required");
    co_return;
  }
  co_await resolve_pending();
  const std::string route_key = route.upstream->name + "/" + route.domain;
  if (auto failed = failed_routes_.find(route_key); failed != failed_routes_.end()) {
    co_await refuse(failed->second, "");
    co_return;
  }
  if (auto failure = co_await ensure_upstream(route)) {
    failed_routes_.emplace(route_key, *failure);
    co_await refuse(*failure, "");
    co_return;
  }
  if (upstream_.in_transaction) co_await reset_upstream_transaction();  // all RCPTs of the last one refused
  if (!upstream_.link) {
    co_await refuse(upstream_lost_reply, "");
    co_return;
  }
  route_ = route;
  connector_name_ = connector_name;
  direction_ = listener_.direction;
  add_to_list(connectors_seen_, connector_name_, std::numeric_limits<std::size_t>::max());
  // The envelope sender's domain (never its local part), so that traffic that lands in "internet" is known by
  // more than its address and HELO; "<>" for bounces. Bounded: a session cannot grow the line without end.
  add_to_list(sender_domains_seen_, sender_domain_.empty() ? "<>" : sender_domain_,
              max_logged_sender_domains);
  queue_upstream(Pending::mail, mail_line_);
  if (!upstream_.pipelining) {
    co_await resolve_pending();
    if (mail_refusal_) {
      co_await refuse(proto::format_reply(*mail_refusal_), "");
      co_return;
    }
  }
  queue_upstream(Pending::rcpt, rcpt_line);
  if (!upstream_.pipelining) co_await resolve_pending();
}

void RelaySession::queue_upstream(Pending kind, std::string line) {
  upstream_out_ += line;
  pending_.push_back(kind);
}

asio::awaitable<bool> RelaySession::resolve_pending() {
  // RFC 2920: what the client pipelined goes upstream in one write; the replies come back in order and are
  // relayed in order. Returns true when the last command was DATA and the upstream said 354.
  bool go_ahead = false;
  if (pending_.empty()) co_return go_ahead;
  bool lost = upstream_.link == nullptr;
  if (!lost) {
    error_code ec;
    co_await write(*upstream_.link, upstream_out_, in(config_.timeouts.command), ec);
    if (ec) {
      upstream_failed(ec == asio::error::timed_out ? "timeout" : "connection_lost");
      lost = true;
    }
  }
  upstream_out_.clear();
  while (!pending_.empty()) {
    const Pending kind = pending_.front();
    pending_.pop_front();
    std::optional<proto::Reply> reply;
    if (!lost) reply = co_await read_upstream_reply(in(config_.timeouts.command));
    if (!reply) {
      lost = true;
      if (kind == Pending::mail) continue;  // the client had its local 250; its RCPT hears the 451
      client_out_ += upstream_lost_reply;
      if (kind == Pending::rcpt) session_.on_rcpt_reply(451);
      continue;
    }
    switch (kind) {
      case Pending::mail:
        // Answered locally already; a refusal becomes the reply to this transaction's RCPTs.
        upstream_.in_transaction = reply->positive();
        if (!reply->positive()) mail_refusal_ = std::move(*reply);
        break;
      case Pending::rcpt:
        if (mail_refusal_) reply = *mail_refusal_;
        client_out_ += proto::format_reply(*reply);
        session_.on_rcpt_reply(reply->code);
        break;
      case Pending::data:
        client_out_ += proto::format_reply(*reply);
        if (reply->code == 354) {
          go_ahead = true;
        } else {
          co_await reset_upstream_transaction();
          session_.on_data_finished();
        }
        break;
    }
  }
  if (lost) session_.on_transaction_aborted();
  co_return go_ahead;
}

std::string RelaySession::received_header() const {
  // RFC 5321 §4.4 trace field; the TLS comment follows common MTA practice (RFC 8314 §4.3 suggests it).
  const std::string address = address_literal(client_address_);
  const bool tls = session_.tls_active();
  const char* protocol = session_.esmtp() ? (tls ? "ESMTPS" : "ESMTP") : "SMTP";
  std::string header = "Received: from " + (session_.helo_name().empty() ? address : session_.helo_name()) +
                       " ([" + address + "])\r\n";
  if (tls) {
    header += "\t(using " + std::string(proto::to_string(client_.tls().version)) + " with cipher " +
              client_.tls().cipher + ")\r\n";
  }
  header += "\tby " + config_.hostname + " (mailflowd) with " + protocol + " id " + id_ + ";\r\n\t" +
            rfc5322_date() + "\r\n";
  return header;
}

proto::TlsVersion RelaySession::counted_version() const {
  // The external leg decides: the client's for inbound listeners, the upstream's for outbound ones.
  if (direction_ == config::Direction::outbound)
    return upstream_.link ? upstream_.link->tls().version : proto::TlsVersion::none;
  return client_.tls().version;
}

asio::awaitable<void> RelaySession::relay_data() {
  queue_upstream(Pending::data, "DATA\r\n");
  if (!co_await resolve_pending()) co_return;
  if (!co_await flush()) {
    co_await close_upstream(false);
    session_.on_transaction_aborted();
    co_return;
  }

  proto::DataFilter filter(
      {config_.limits.max_message_size, config_.limits.max_line, config_.limits.bare_newline});
  const bool reject_bare_newline = config_.limits.bare_newline == proto::BareNewlinePolicy::reject;
  const proto::TlsVersion version_at_start = counted_version();
  std::string out = received_header();
  proto::TraceHopCounter hops;  // the client's message's own Received: fields (ours is not fed to it)
  bool upstream_ok = true;      // false once the upstream was dropped (violation or failure)
  bool upstream_lost = false;
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
      co_await close_upstream(false);
      upstream_ok = false;
    }
    if (upstream_ok && !out.empty() && (out.size() >= data_block_size || filter.done())) {
      // The upstream gets as long for a block as the client does.
      error_code ec;
      co_await write(*upstream_.link, out, in(config_.timeouts.data_block), ec);
      if (ec) {
        upstream_failed(ec == asio::error::timed_out ? "timeout" : "connection_lost");
        upstream_ok = false;
        upstream_lost = true;
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
    co_await read(client_, client_in_, data_read_chunk, block_deadline, ec);
    if (ec) {
      // The client went away (or stalled) mid-message: nothing may be delivered.
      const bool timed_out = ec == asio::error::timed_out;
      co_await close_upstream(false);
      session_.on_transaction_aborted();
      if (timed_out) {
        count_reject("timeout");
        co_await say_goodbye(proto::format_reply(421, "4.4.2", config_.hostname + " Error: timeout exceeded"),
                             "timeout");
      } else {
        result_ = "disconnected_in_data";
        close_ = true;
      }
      co_return;
    }
  }
  const std::uint32_t recipients = session_.accepted_recipients();
  session_.on_data_finished();
  if (filter.bare_newline_seen() && !reject_bare_newline) count_reject("bare_newline_normalized");

  if (filter.too_big()) {
    count_reject("message_too_big");
    client_out_ += proto::format_reply(552, "5.3.4", "Message size exceeds fixed maximum message size");
  } else if (filter.line_too_long()) {
    count_reject("data_line_too_long");
    client_out_ += proto::format_reply(554, "5.6.0", "Message line too long");
  } else if (reject_bare_newline && filter.bare_newline_seen()) {
    count_reject("bare_newline");
    client_out_ += proto::format_reply(550, "5.5.2", "Message contains bare CR or LF characters");
  } else if (hops.hops() > config_.limits.max_hops) {
    // A mail loop (RFC 5321 6.3): refused, as Postfix's hopcount_limit does.
    count_reject("too_many_hops");
    client_out_ += proto::format_reply(
        554, "5.4.6", "Too many hops (" + std::to_string(hops.hops()) + " Received: headers): mail loop?");
  } else if (upstream_lost || !upstream_ok) {
    client_out_ += upstream_lost_reply;
  } else {
    auto final_reply = co_await read_upstream_reply(in(config_.timeouts.data_end));
    if (!final_reply) {
      client_out_ += upstream_lost_reply;
    } else {
      client_out_ += proto::format_reply(*final_reply);
      upstream_.in_transaction = false;
      if (final_reply->positive()) {
        // The one place a message is counted: the upstream took responsibility for it.
        ++messages_;
        telemetry_.message_delivered(connector_name_, direction_, version_at_start, filter.message_bytes(),
                                     recipients);
      }
    }
  }
}

// ---- the upstream leg -----------------------------------------------------------------------------------

void RelaySession::upstream_failed(std::string_view reason) {
  const std::string name = upstream_.config ? upstream_.config->name : "";
  telemetry_.upstream_error(name, reason);
  log_limited(LogLevel::warn, "upstream_error", {{"id", id_}, {"upstream", name}, {"reason", reason}});
  drop_upstream();
}

void RelaySession::drop_upstream() {
  if (upstream_.link) {
    upstream_.link->close();
    const TlsInfo& tls = upstream_.link->tls();
    telemetry_.leg_finished(listener_.name, Leg::upstream, tls.version);
    upstream_log_ = upstream_.config->name + "/" + std::string(proto::to_string(tls.version)) +
                    (tls.cipher.empty() ? "" : "/" + tls.cipher);
    upstream_.link.reset();
  }
  upstream_.in.clear();
  upstream_.in.release_if_empty();
  upstream_.in_transaction = false;
}

asio::awaitable<std::optional<proto::Reply>> RelaySession::read_upstream_reply(
    SteadyClock::time_point deadline) {
  for (;;) {
    auto parsed = proto::parse_reply(upstream_.in.view());
    if (parsed.status == proto::ReplyStatus::complete) {
      upstream_.in.consume(parsed.consumed);
      co_return std::move(parsed.reply);
    }
    if (parsed.status == proto::ReplyStatus::invalid) {
      upstream_failed("protocol");
      co_return std::nullopt;
    }
    error_code ec;
    co_await read(*upstream_.link, upstream_.in, command_read_chunk, deadline, ec);
    if (ec) {
      upstream_failed(ec == asio::error::timed_out ? "timeout" : "connection_lost");
      co_return std::nullopt;
    }
  }
}

asio::awaitable<std::optional<proto::Reply>> RelaySession::upstream_command(std::string_view line) {
  if (!upstream_.link) co_return std::nullopt;
  error_code ec;
  co_await write(*upstream_.link, line, in(config_.timeouts.command), ec);
  if (ec) {
    upstream_failed(ec == asio::error::timed_out ? "timeout" : "connection_lost");
    co_return std::nullopt;
  }
  co_return co_await read_upstream_reply(in(config_.timeouts.command));
}

asio::awaitable<void> RelaySession::reset_upstream_transaction() {
  if (!upstream_.link || !upstream_.in_transaction) co_return;
  auto reply = co_await upstream_command("RSET\r\n");
  if (reply && !reply->positive()) upstream_failed("rset_rejected");
  upstream_.in_transaction = false;
}

asio::awaitable<void> RelaySession::close_upstream(bool polite) {
  if (!upstream_.link) co_return;
  if (polite && !upstream_.in_transaction) {
    const auto deadline = in(goodbye_timeout);
    error_code ec;
    co_await write(*upstream_.link, "QUIT\r\n", deadline, ec);
    if (!ec) {
      ReadBuffer ignored;
      co_await read(*upstream_.link, ignored, 512, deadline, ec);
    }
    if (!ec) co_await close_link(*upstream_.link);
  }
  drop_upstream();
}

namespace {

// One Resolver per event loop, i.e. per thread (daemon/resolver.hpp), held by the loop's LoopScope: made on
// first use, and again when a reload changed `dns`. Sessions hold it (shared) while they use it, so a
// replaced one lives until they are done. Outside a LoopScope (no loop of the server's) each call makes its
// own.
std::shared_ptr<Resolver> loop_resolver(const asio::any_io_executor& executor, const config::Dns& dns,
                                        Telemetry& telemetry) {
  std::string key = std::to_string(dns.timeout.count()) + " " + dns.trust_anchor_file;
  for (const auto& server : dns.servers) key += " " + server.text;
  LoopScope::Resources* loop = LoopScope::current();
  if (loop == nullptr) return std::make_shared<Resolver>(executor, dns, &telemetry);
  if (!loop->resolver || key != loop->resolver_key) {
    loop->resolver = std::make_shared<Resolver>(executor, dns, &telemetry);
    loop->resolver_key = std::move(key);
  }
  return loop->resolver;
}

}  // namespace

asio::awaitable<std::optional<std::string>> RelaySession::ensure_upstream(const Route& route) {
  const config::Upstream& upstream = *route.upstream;
  // A connection is reused for the next transaction that routes the same way (same upstream, same domain).
  if (upstream_.link && upstream_.config == &upstream && upstream_.domain == route.domain)
    co_return std::nullopt;
  co_await close_upstream(true);
  upstream_.config = &upstream;
  upstream_.domain = route.domain;
  upstream_.host.clear();
  std::string reason = "no address";

  if (!upstream.mx) {
    // timeouts.upstream_connect bounds the lookup, every connect attempt and the banner together.
    const auto connect_deadline = in(config_.timeouts.upstream_connect);
    error_code ec;
    std::vector<tcp::endpoint> endpoints;
    if (auto address = asio::ip::make_address(upstream.address.host, ec); !ec) {
      endpoints.emplace_back(address, upstream.address.port);
    } else {
      ec = {};
      resolver_.emplace(client_.socket().get_executor());
      arm(connect_deadline);
      auto results = co_await resolver_->async_resolve(upstream.address.host,
                                                       std::to_string(upstream.address.port), with(ec));
      disarm(ec);
      resolver_.reset();
      for (const auto& entry : results) endpoints.push_back(entry.endpoint());
      if (ec) {
        const bool timed_out = ec == asio::error::timed_out;
        reason = timed_out ? "connect_timeout" : "connect_failed";
        telemetry_.upstream_error(upstream.name, timed_out ? "connect_timeout" : "connect_failed");
        log_limited(LogLevel::warn, "upstream_error",
                    {{"id", id_}, {"upstream", upstream.name}, {"reason", reason}, {"error", ec.message()}});
      }
    }
    for (const auto& endpoint : endpoints) {
      if (co_await open_upstream(upstream, endpoint, upstream.address.host, connect_deadline, reason))
        co_return std::nullopt;
      if (reason == "connect_timeout") break;  // the deadline is spent
    }
    co_return std::string(upstream_unavailable_reply);
  }

  // Delivery to the recipient domain's MX hosts (RFC 5321 section 5): in order, each host and address in
  // turn, each attempt with timeouts.upstream_connect of its own.
  std::shared_ptr<Resolver> resolver;
  try {
    resolver = loop_resolver(client_.socket().get_executor(), config_.dns, telemetry_);
  } catch (const std::exception& e) {
    log_limited(LogLevel::error, "dns_unavailable", {{"id", id_}, {"error", e.what()}});
    co_return proto::format_reply(451, "4.4.3", "DNS resolver unavailable, try again later");
  }
  const MxRoute mx =
      co_await resolve_mx_route(*resolver, *runtime_->own_listeners, route.domain, upstream.port);
  if (mx.result != MxRoute::Result::deliver) {
    // mailflowd's own refusal of the recipient (null MX, no such domain, a loop, DNS trouble): counted as
    // such.
    count_reject(to_string(mx.result));
    log_limited(LogLevel::info, "mx_route",
                {{"id", id_},
                 {"upstream", upstream.name},
                 {"domain", route.domain},
                 {"result", to_string(mx.result)}});
    co_return mx.reply + "\r\n";
  }
  for (const auto& attempt : mx.attempts) {
    const bool connected = co_await open_upstream(upstream, attempt.endpoint, attempt.host,
                                                  in(config_.timeouts.upstream_connect), reason);
    telemetry_.mx_attempt(upstream.name, connected ? "success" : reason);
    if (connected) {
      upstream_.host = attempt.host;
      co_return std::nullopt;
    }
  }
  co_return proto::format_reply(
      451, "4.4.1",
      "No mail host of " + route.domain + " could be used (last: " + reason + "), try again later");
}

asio::awaitable<bool> RelaySession::open_upstream(const config::Upstream& upstream,
                                                  const tcp::endpoint& endpoint, const std::string& tls_name,
                                                  SteadyClock::time_point connect_deadline,
                                                  std::string& reason) {
  upstream_.link = std::make_unique<Link>(tcp::socket(client_.socket().get_executor()));
  upstream_.in.clear();
  error_code ec;
  co_await connect(*upstream_.link, endpoint, connect_deadline, ec);
  if (ec) {
    upstream_.link.reset();  // never connected: no upstream leg to count
    const bool timed_out = ec == asio::error::timed_out;
    reason = timed_out ? "connect_timeout" : "connect_failed";
    telemetry_.upstream_error(upstream.name, timed_out ? "connect_timeout" : "connect_failed");
    log_limited(LogLevel::warn, "upstream_error",
                {{"id", id_},
                 {"upstream", upstream.name},
                 {"address", endpoint_text(endpoint.address(), endpoint.port())},
                 {"reason", reason},
                 {"error", ec.message()}});
    co_return false;
  }

  proto::ClientSession::Options options;
  options.ehlo_name = config_.hostname;
  options.tls = upstream.tls == config::UpstreamTls::none            ? proto::UpstreamTlsPolicy::none
                : upstream.tls == config::UpstreamTls::opportunistic ? proto::UpstreamTlsPolicy::opportunistic
                                                                     : proto::UpstreamTlsPolicy::required;
  options.xclient_allowed = upstream.xclient;
  options.client_address = address_text(client_address_);
  options.client_port = client_port_;
  options.client_helo = session_.helo_name();
  options.client_esmtp = session_.esmtp();
  proto::ClientSession engine(options);

  using Kind = proto::ClientSession::ActionKind;
  auto action = engine.start();
  bool first_reply = true;
  reason = "failed";
  for (;;) {
    switch (action.kind) {
      case Kind::send: {
        error_code write_error;
        co_await write(*upstream_.link, action.data, in(config_.timeouts.command), write_error);
        if (write_error) {
          upstream_failed(write_error == asio::error::timed_out ? "timeout" : "connection_lost");
          co_return false;
        }
        [[fallthrough]];
      }
      case Kind::read_reply: {
        // Connecting includes the banner: an upstream that accepts and never greets is
        // "connect_timeout"-slow.
        auto reply =
            co_await read_upstream_reply(first_reply ? connect_deadline : in(config_.timeouts.command));
        if (!reply) {
          if (first_reply) reason = "connect_timeout";
          co_return false;
        }
        first_reply = false;
        action = engine.on_reply(*reply);
        break;
      }
      case Kind::start_tls: {
        if (!upstream_.in.empty()) {
          // The upstream leg gets the same CVE-2011-0411 treatment: nothing sent before TLS is trusted after
          // it.
          upstream_failed("starttls_pipelining");
          co_return false;
        }
        const ClientTls* tls = runtime_->client_tls(upstream.name);
        error_code hs;
        co_await handshake(*upstream_.link, tls->context(), false, tls_name, tls->verify(),
                           in(config_.timeouts.tls_handshake), hs, tls->verify_names());
        if (hs) {
          const bool timed_out = hs == asio::error::timed_out;
          const std::string label = handshake_failure_label(hs, timed_out);
          telemetry_.tls_handshake_failed(listener_.name, Leg::upstream, label);
          log_limited(LogLevel::warn, "tls_failed",
                      {{"id", id_}, {"upstream", upstream.name}, {"leg", "upstream"}, {"reason", label}});
          upstream_failed("tls_failed");
          // A certificate that `verify` refuses is the policy's doing; anything else is a failed handshake.
          reason = label == "certificate_verify_failed" ? "tls_policy" : "tls_failed";
          co_return false;
        }
        if (upstream.min_version && upstream_.link->tls().version < *upstream.min_version) {
          // upstreams[].min_version: this host negotiated less; the next one is tried.
          log_limited(
              LogLevel::warn, "tls_below_minimum",
              {{"id", id_},
               {"upstream", upstream.name},
               {"address", endpoint_text(endpoint.address(), endpoint.port())},
               {"tls", proto::to_string(upstream_.link->tls().version)},
               {"reason", "below min_version " + std::string(proto::to_string(*upstream.min_version))}});
          upstream_failed("tls_policy");
          reason = "tls_policy";
          co_return false;
        }
        action = engine.on_tls_started();
        break;
      }
      case Kind::ready:
        upstream_.pipelining = engine.pipelining();
        co_return true;
      case Kind::fail: {
        const std::string said = action.reply.lines.empty() ? "" : action.reply.lines.front();
        log_limited(LogLevel::warn, "upstream_refused",
                    {{"id", id_}, {"upstream", upstream.name}, {"reason", action.reason}, {"reply", said}});
        upstream_failed(action.reason);
        reason = action.reason == "greeting_rejected" ? "banner_rejected"
                 : action.reason == "starttls_unavailable" || action.reason == "starttls_rejected"
                     ? "tls_policy"
                     : "failed";
        co_return false;
      }
    }
  }
}

// ---- loop scope -----------------------------------------------------------------------------------------

namespace {
thread_local LoopScope::Resources* current_loop = nullptr;
}

LoopScope::LoopScope() : previous_(current_loop) { current_loop = &resources_; }

LoopScope::~LoopScope() {
  current_loop = previous_;
  resources_.resolver.reset();  // before the event loop it belongs to goes away
}

LoopScope::Resources* LoopScope::current() { return current_loop; }

// ---- registry -------------------------------------------------------------------------------------------

bool SessionRegistry::admit_address(const std::array<std::uint8_t, 16>& address, std::uint32_t limit) {
  std::lock_guard lock(mutex_);
  auto& count = per_address_[std::string(address.begin(), address.end())];
  if (count >= limit) {
    if (count == 0) per_address_.erase(std::string(address.begin(), address.end()));
    return false;
  }
  ++count;
  return true;
}

void SessionRegistry::release_address(const std::array<std::uint8_t, 16>& address) {
  std::lock_guard lock(mutex_);
  auto it = per_address_.find(std::string(address.begin(), address.end()));
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

void start_relay_session(tcp::socket socket, std::shared_ptr<const Runtime> runtime,
                         const config::Listener& listener, SessionRegistry& registry) {
  auto executor = socket.get_executor();
  auto session = std::make_shared<RelaySession>(std::move(socket), std::move(runtime), listener, registry);
  registry.add(session);
  asio::co_spawn(executor, session->run(), [session](std::exception_ptr error) {
    if (error) session->crashed(error);
  });
}

}  // namespace mailflow
