#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include "daemon/http_server.hpp"

#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cctype>
#include <charconv>
#include <chrono>
#include <deque>
#include <functional>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "daemon/accept_error.hpp"
#include "daemon/cli_http.hpp"
#include "daemon/crypt_check.hpp"
#include "daemon/failpoint.hpp"
#include "daemon/log.hpp"
#include "daemon/report.hpp"
#include "daemon/state_text.hpp"
#include "daemon/telemetry.hpp"
#include "daemon/tls.hpp"
#include "daemon/tlsrpt.hpp"
#include "proto/ascii.hpp"
#include "proto/uri_path.hpp"

namespace mailflow {

// What may change on reload without rebinding. A connection keeps the TLS context it was accepted with (its
// handshake is done); basic_auth is the current one for every request, so that a reload that changes the
// password or sets basic_auth also applies to connections kept alive from before it.
struct HttpServer::Settings {
  std::optional<config::BasicAuth> basic_auth;
  std::shared_ptr<boost::asio::ssl::context> tls;  // null: plain HTTP
  std::string tls_cert;                            // the file `tls`'s certificate came from
};

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using SteadyClock = std::chrono::steady_clock;

using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

// A scrape or a report page is small and quick; anything slower is a stuck or hostile peer. The head deadline
// covers the whole request head (and, on a new connection, the TLS handshake): it runs from the accept, or
// from the end of the previous response on a kept-alive connection (so it is also the keep-alive idle limit),
// and trickling bytes does not extend it.
constexpr auto kHeadTimeout = std::chrono::seconds(5);
constexpr auto kBodyTimeout = std::chrono::seconds(5);
constexpr auto kWriteTimeout = std::chrono::seconds(30);
// A kept-alive connection takes new requests for this long from its accept, then its next answer says
// Connection: close (nginx's keepalive_time, 1 h there). Each answer must be taken within kWriteTimeout, but
// a client that takes each one in under kStalledWrite and asks again at once is never idle, never stalled,
// never timed out: it held its slot and a rendered answer (1.4 MB of /metrics with 400 connectors, 96 such
// clients 133 MB) for as long as it liked. A scraper asking more often than the 5 s keep-alive idle limit
// reconnects once in this while.
constexpr auto kKeepAliveTime = std::chrono::seconds(30);
constexpr auto kTlsCloseTimeout = std::chrono::seconds(5);  // close_notify
// Lingering close (nginx's lingering_close, lingering_time): after an answer that ends the connection, what
// the client still sends (the rest of a body over the limit) is read and dropped until it closes, for at most
// this long and this much; closed with it unread, the kernel would answer it with a reset and the client's
// send fail before it read the answer.
constexpr auto kLingerTime = std::chrono::seconds(5);
constexpr std::uint64_t kLingerBytes = 4 * 1024 * 1024;
// What an answer may leave queued and not yet sent before the write waits for the client (TCP_NOTSENT_LOWAT,
// as HTTP/2 servers set it): a write "completes" once the kernel has the bytes, so a client that pipelines
// requests and never reads had the next answer rendered until its send buffer (autotuned up to tcp_wmem's 4
// MiB) was full, some 150 renders of /metrics per connection, all on the one HTTP thread. Bytes in flight are
// not counted, so a fast reader is not slowed.
constexpr int kNotSentLowat = 16 * 1024;
// Prometheus, a probe and a browser need a few connections each; one address holding more is hostile. The
// total cap protects descriptors and memory.
constexpr std::size_t kMaxConnections = 256;
constexpr std::size_t kMaxConnectionsPerAddress = 16;
// At the total cap with no connection waiting for a request, one whose answer has gone untaken this long (its
// client reads nothing) is closed to make room rather than answering the newcomer 503 until its write
// deadline: a scrape of a few MiB is taken in well under a second.
constexpr auto kStalledWrite = std::chrono::seconds(5);
constexpr std::uint32_t kHeaderLimit = 8 * 1024;
// As sent (chunked: framing, extensions and trailers too); only GET and HEAD are served.
constexpr std::uint64_t kBodyLimit = 8 * 1024;
constexpr std::size_t kMaxCachedCredentials = 8;
// Password checks (bcrypt/yescrypt: up to half a second of CPU each) run on one low-priority thread of their
// own, never on an event loop; at most this many are queued or running, more get 503 at once.
constexpr std::size_t kMaxPendingChecks = 4;
// Per address: the first failures are free (typos), then each further failure doubles a wait, up to the
// maximum, during which uncached credentials from that address get 429 without a check.
constexpr unsigned kFreeFailures = 5;
constexpr auto kMaxBackoff = std::chrono::seconds(60);
constexpr auto kForgetFailures = std::chrono::minutes(10);
constexpr std::size_t kMaxFailureRecords = 4096;
// One more check slot, beyond kMaxPendingChecks, for an address that presented verified credentials within
// the last hour (Prometheus, after a reload changed the password and cleared the cache): guessers on any
// number of addresses can keep the 4 slots full, not this one.
constexpr auto kForgetLogins = std::chrono::hours(1);
constexpr std::size_t kMaxLoginRecords = 64;
constexpr int kDefaultDays = 7;

constexpr std::string_view kTextPlain = "text/plain; charset=utf-8";
constexpr std::string_view kMetricsType = "text/plain; version=0.0.4; charset=utf-8";  // /metrics only
// Sent without reading the request to a plain-HTTP connection over a cap: cheaper than a parser, kinder than
// silence (a client retries later instead of guessing).
constexpr std::string_view kBusyResponse =
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: 21\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Retry-After: 5\r\n"
    "Connection: close\r\n"
    "\r\n"
    "too many connections\n";

std::optional<std::string> decode_base64(std::string_view text) {
  auto value_of = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  while (!text.empty() && text.back() == '=') text.remove_suffix(1);
  if (text.size() % 4 == 1) return std::nullopt;
  std::string out;
  std::uint32_t bits = 0;
  int bit_count = 0;
  for (const char c : text) {
    const int v = value_of(c);
    if (v < 0) return std::nullopt;
    bits = (bits << 6) | static_cast<std::uint32_t>(v);
    bit_count += 6;
    if (bit_count >= 8) {
      bit_count -= 8;
      out.push_back(static_cast<char>((bits >> bit_count) & 0xff));
    }
  }
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

// The parameters in `names` of a query string, percent-decoded (RFC 3986 2.1: names too, so d%61ys is days;
// '+' is a '+'), "" for a bare `name`; others are left alone (Prometheus's `params:` may add its own).
// nullopt with `error` set when an escape is not % and two hex digits, or one of `names` comes twice:
// days=7&days=8 has no one meaning, and a last-wins answer would be the report of a period the client may not
// have meant.
using Query = std::map<std::string, std::string, std::less<>>;
std::optional<Query> parse_query(std::string_view text, std::initializer_list<std::string_view> names,
                                 std::string& error) {
  Query query;
  while (!text.empty()) {
    const auto amp = text.find('&');
    const std::string_view param = text.substr(0, amp);
    text = amp == std::string_view::npos ? std::string_view{} : text.substr(amp + 1);
    const auto eq = param.find('=');
    std::string name;
    std::string value;
    if (!proto::percent_decode(param.substr(0, eq), name) ||
        (eq != std::string_view::npos && !proto::percent_decode(param.substr(eq + 1), value))) {
      error = "bad %-escape in the query: a '%' must start %XX with two hex digits (RFC 3986 2.1)\n";
      return std::nullopt;
    }
    if (std::find(names.begin(), names.end(), name) == names.end()) continue;
    if (!query.emplace(name, std::move(value)).second) {
      error = name + " is given more than once in the query\n";
      return std::nullopt;
    }
  }
  return query;
}

// `days` from the query: default 7 (or the window when shorter), else an integer 1..max_days.
std::optional<int> parse_days(const Query& query, int max_days, std::string& error) {
  const auto value = query.find("days");
  if (value == query.end()) return std::min(kDefaultDays, max_days);
  const std::string& text = value->second;
  int days = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), days);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || days < 1 || days > max_days) {
    error = "days must be an integer from 1 to " + std::to_string(max_days) + " (the telemetry window)\n";
    return std::nullopt;
  }
  return days;
}

Response make_response(const Request& request, http::status status, std::string_view content_type,
                       std::string body) {
  Response response{status, request.version()};
  response.set(http::field::server, "mailflowd/" MAILFLOW_VERSION);
  response.set(http::field::content_type, beast::string_view(content_type.data(), content_type.size()));
  response.set(http::field::cache_control, "no-store");
  // No browser takes a text/plain or CSV answer (with names from the network in it) for HTML.
  response.set("X-Content-Type-Options", "nosniff");
  // The page has no script, loads nothing and has one <style>: a policy that allows no script at all, so that
  // markup which got past the escaping could not run an event handler.
  if (content_type.starts_with("text/html")) {
    response.set("Content-Security-Policy",
                 "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                 "frame-ancestors 'none'");
  }
  response.keep_alive(request.keep_alive());
  response.body() = std::move(body);
  response.prepare_payload();
  return response;
}

Response plain_response(const Request& request, http::status status, std::string body) {
  return make_response(request, status, kTextPlain, std::move(body));
}

using Settings = HttpServer::Settings;

// What the per-address caps and the password backoff count a client as: an IPv6 address by its /64, which
// one host or customer is given whole (RFC 6177; a host picks new addresses in it at will, RFC 8981), so
// that a client on a /64 is one client, not 2^64; IPv4 and IPv4-mapped addresses as they are.
asio::ip::address client_key(const asio::ip::address& peer) {
  if (!peer.is_v6() || peer.to_v6().is_v4_mapped()) return peer;
  auto bytes = peer.to_v6().to_bytes();
  std::fill(bytes.begin() + 8, bytes.end(), 0);
  return asio::ip::address_v6(bytes);
}

enum class AuthResult { ok, missing, wrong, busy, backoff, stopped };
struct AuthVerdict {
  AuthResult result;
  std::chrono::seconds retry_after{0};
};

using Digest = std::array<unsigned char, EVP_MAX_MD_SIZE>;

class Server : public std::enable_shared_from_this<Server> {
 public:
  Server(asio::io_context& io, asio::thread_pool& crypt, const config::Http& http, Telemetry& telemetry,
         std::function<bool()> ready)
      : io_(io), crypt_(crypt), http_(http), telemetry_(telemetry), ready_(std::move(ready)), acceptor_(io) {
    // The credentials cache keeps keyed digests, not plain SHA-256 of the password, so a memory dump does not
    // hand out something a GPU can brute-force quickly.
    if (RAND_bytes(cache_key_.data(), static_cast<int>(cache_key_.size())) != 1) {
      throw std::runtime_error("http: no random bytes for the credentials cache key");
    }
  }

  void start() {
    update(prepare(http_));
    const std::string host = http_.address.host.empty() ? "127.0.0.1" : http_.address.host;
    const std::string where = http_.address.text.empty() ? host + ":" + std::to_string(http_.address.port)
                                                         : http_.address.text;
    beast::error_code ec;
    tcp::resolver resolver(io_);
    const auto results = resolver.resolve(host, std::to_string(http_.address.port),
                                          tcp::resolver::numeric_service | tcp::resolver::passive, ec);
    if (ec || results.empty()) {
      throw std::system_error(ec, "http.address " + where + ": cannot resolve");
    }
    const tcp::endpoint endpoint = results.begin()->endpoint();
    auto check = [&](const char* what) {
      if (ec) throw std::system_error(ec, "http.address " + where + ": cannot " + what);
    };
    acceptor_.open(endpoint.protocol(), ec);
    check("open socket");
    acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    check("set SO_REUSEADDR");
    acceptor_.bind(endpoint, ec);
    check("bind");
    acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    check("listen");
    port_ = acceptor_.local_endpoint(ec).port();
    spawn_accept_loop();
  }

  // Any thread: stops accepting and closes every connection (on the HTTP thread).
  void stop() {
    std::vector<std::function<void()>> closers;
    {
      std::lock_guard lock(mutex_);
      stopped_ = true;
      for (const auto& [id, connection] : tracked_) closers.push_back(connection.close);
      // The checks still in line are not run: their requests' connections are closed below, and the exit
      // waited for each of them after the drain (4 guesses queued: 4 checks after "stopped", seconds each).
      for (auto* line : {&checks_ahead_, &checks_}) {
        for (auto& queued : *line) {
          asio::post(io_, [pending = queued.pending] {
            pending->dropped = true;
            pending->done.cancel();
          });
        }
        line->clear();
      }
    }
    asio::post(io_, [self = shared_from_this()] {
      beast::error_code ignored;
      self->acceptor_.close(ignored);
    });
    for (auto& close : closers) close();
  }

  unsigned short port() const { return port_; }

  std::optional<CertificateInfo> certificate() const {
    const auto current = settings();
    if (!current->tls) return std::nullopt;
    return certificate_info(current->tls->native_handle(), current->tls_cert);
  }

  // Throws when the certificate or key cannot be loaded.
  static std::shared_ptr<const Settings> prepare(const config::Http& http) {
    auto next = std::make_shared<Settings>();
    next->basic_auth = http.basic_auth;
    if (http.tls) {
      next->tls = load_tls(*http.tls);
      next->tls_cert = http.tls->cert;
    }
    return next;
  }

  // Any thread: basic auth and TLS certificate for connections accepted from now on.
  void update(std::shared_ptr<const Settings> next) {
    std::lock_guard lock(mutex_);
    // What was verified against the same user and hash stays verified: a reload for a renewed certificate
    // or a new connector cleared the cache, and Prometheus's next scrape had to win one of the few check
    // slots against whoever was guessing (4 addresses kept them full). The failure records stay with it.
    const bool same_auth = settings_->basic_auth == next->basic_auth;
    settings_ = next;
    if (!same_auth) {
      accepted_.clear();
      failures_.clear();
    }
  }

 private:
  // An exception that escaped an HTTP coroutine: logged and counted (mailflow_internal_errors_total
  // {component="http"}), never lost.
  void escaped(const std::exception_ptr& error) {
    telemetry_.internal_error("http");
    log_event(LogLevel::error, "internal_error", {{"component", "http"}, {"error", exception_text(error)}});
  }

  // The accept loop starts again (after a pause) when an exception ended it: /metrics never goes silent.
  void spawn_accept_loop(bool pause_first = false) {
    auto self = shared_from_this();
    asio::co_spawn(io_, self->accept_loop(pause_first), [self](const std::exception_ptr& error) {
      if (!error) return;
      self->escaped(error);
      bool stopped = false;
      {
        std::lock_guard lock(self->mutex_);
        stopped = self->stopped_;
      }
      if (!stopped && self->acceptor_.is_open()) self->spawn_accept_loop(true);
    });
  }

 public:
  // Also HttpServer::check_tls (--check-config): the one way http.tls is loaded.
  static std::shared_ptr<asio::ssl::context> load_tls(const config::CertificatePair& pair) {
    auto context = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_server);
    context->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                         asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 |
                         asio::ssl::context::no_tlsv1_1);
    beast::error_code ec;
    context->use_certificate_chain_file(pair.cert, ec);
    if (ec) throw std::system_error(ec, "http.tls: cannot load certificate " + pair.cert);
    try {
      use_private_key_file(context->native_handle(), pair.key, pair.cert);  // as the listeners load theirs
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("http.tls: ") + e.what());
    }
    return context;
  }

 private:
  std::shared_ptr<const Settings> settings() const {
    std::lock_guard lock(mutex_);
    return settings_;
  }

  // Every refusal is counted and logged (rate-limited: a hostile peer triggers them at will); `error` says more.
  void reject(HttpReject reason, const asio::ip::address& peer, std::string_view error = {}) {
    telemetry_.http_rejected(reason);
    if (error.empty()) {
      log_limited(LogLevel::warn, "http_reject", {{"reason", to_string(reason)}, {"client", peer.to_string()}});
    } else {
      log_limited(LogLevel::warn, "http_reject",
                  {{"reason", to_string(reason)}, {"client", peer.to_string()}, {"error", error}});
    }
  }

  // ------------------------------------------------------------------------------------------- connections
  // Counts the connection against the caps; the reason when it is over one. At the total cap, the connection
  // that has waited longest without a complete request (idle, trickling a head or body, lingering) is closed
  // to make room, as nginx reuses its idle connections when worker_connections run out: a peer on many
  // addresses that holds every connection idle locks no scrape out (each waits 5 s at most anyway). When none
  // waits, the one whose answer has gone untaken longest (kStalledWrite at least) is closed instead, and when
  // none of those either, the one open longest (each connection is open 30 s and one answer at most,
  // kKeepAliveTime; a newcomer is the last to go); only when every connection is already being closed does
  // the new one get the 503.
  // `evicted`: the address of the connection closed, `evicted_why`: which of the three it was.
  enum class Evicted { idle, stalled, oldest };
  std::optional<HttpReject> admit(const asio::ip::address& peer, std::optional<asio::ip::address>& evicted,
                                  Evicted& evicted_why) {
    std::lock_guard lock(mutex_);
    const auto key = client_key(peer);
    auto& from_peer = per_address_[key];
    if (from_peer >= kMaxConnectionsPerAddress) return HttpReject::address_limit;
    if (connections_ - evicting_ >= kMaxConnections) {
      auto longest = tracked_.end();
      for (auto it = tracked_.begin(); it != tracked_.end(); ++it) {
        if (!it->second.evicted && it->second.idle_since != SteadyClock::time_point::max() &&
            (longest == tracked_.end() || it->second.idle_since < longest->second.idle_since))
          longest = it;
      }
      evicted_why = Evicted::idle;
      if (longest == tracked_.end()) {
        // None waits: the answer written longest, if it has been written for kStalledWrite.
        evicted_why = Evicted::stalled;
        const auto stalled = SteadyClock::now() - kStalledWrite;
        for (auto it = tracked_.begin(); it != tracked_.end(); ++it) {
          if (!it->second.evicted && it->second.writing_since <= stalled &&
              (longest == tracked_.end() || it->second.writing_since < longest->second.writing_since))
            longest = it;
        }
      }
      if (longest == tracked_.end()) {
        // None stalled either: every connection is taking answers, each in under kStalledWrite (a client with
        // a small receive window that pipelines and reads slowly). Then the one open longest: 256 such
        // connections on 16 addresses held the cap, and 26 of 30 scrapes got 503 while they went on.
        evicted_why = Evicted::oldest;
        for (auto it = tracked_.begin(); it != tracked_.end(); ++it) {
          if (!it->second.evicted &&
              (longest == tracked_.end() || it->second.accepted < longest->second.accepted))
            longest = it;
        }
      }
      if (longest == tracked_.end()) {
        if (from_peer == 0) per_address_.erase(key);
        return HttpReject::connection_limit;
      }
      longest->second.evicted = true;
      ++evicting_;
      longest->second.close();
      evicted = longest->second.peer;
    }
    ++from_peer;
    ++connections_;
    return std::nullopt;
  }

  // A connection ends: its slot and its registration go.
  void release(const asio::ip::address& peer, std::optional<std::uint64_t> id) {
    std::lock_guard lock(mutex_);
    --connections_;
    if (auto it = per_address_.find(client_key(peer)); it != per_address_.end() && --it->second == 0)
      per_address_.erase(it);
    if (!id) return;
    if (auto it = tracked_.find(*id); it != tracked_.end()) {
      if (it->second.evicted) --evicting_;
      tracked_.erase(it);
    }
  }

  // Gives a connection's slot back when the session ends, however it ends.
  struct Slot {
    Slot(std::shared_ptr<Server> s, asio::ip::address a) : server(std::move(s)), peer(a) {}
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() { server->release(peer, id); }
    std::shared_ptr<Server> server;
    asio::ip::address peer;
    std::optional<std::uint64_t> id;  // once tracked
  };

  // The connection waits for (the rest of) a request, or lingers, since `since`; max(): it is being served.
  void waiting(const Slot& slot, SteadyClock::time_point since) {
    std::lock_guard lock(mutex_);
    if (auto it = tracked_.find(slot.id.value()); it != tracked_.end()) it->second.idle_since = since;
  }

  // The connection writes an answer since `since`; max(): it does not.
  void writing(const Slot& slot, SteadyClock::time_point since) {
    std::lock_guard lock(mutex_);
    if (auto it = tracked_.find(slot.id.value()); it != tracked_.end()) it->second.writing_since = since;
  }

  // Over a cap: a canned 503 for plain HTTP (TLS would need a handshake first), then close.
  void refuse(tcp::socket& socket, HttpReject reason, const asio::ip::address& peer, bool tls) {
    reject(reason, peer);
    beast::error_code ec;
    if (!tls) {
      socket.non_blocking(true, ec);
      // Read what already arrived, so that close() sends FIN, not RST (which could discard the 503 unread).
      std::array<char, 4096> discard;
      socket.read_some(asio::buffer(discard), ec);
      socket.write_some(asio::buffer(kBusyResponse.data(), kBusyResponse.size()), ec);
      socket.shutdown(tcp::socket::shutdown_send, ec);
    }
    socket.close(ec);
  }

  asio::awaitable<void> accept_loop(bool pause_first) {
    auto self = shared_from_this();
    asio::steady_timer backoff(io_);
    if (pause_first) {
      beast::error_code ignored;
      backoff.expires_after(std::chrono::milliseconds(100));
      co_await backoff.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
    }
    for (;;) {
      tcp::socket socket(io_);
      beast::error_code ec;
      co_await acceptor_.async_accept(socket, asio::redirect_error(asio::use_awaitable, ec));
      if (ec == asio::error::operation_aborted || !acceptor_.is_open()) co_return;
      if (ec && connection_error_on_accept(ec)) {
        // That one connection is gone (reset, unreachable): accept the next one at once.
        log_limited(LogLevel::info, "http_accept_dropped", {{"error", ec.message()}});
        continue;
      }
      if (ec) {
        // EMFILE and friends: the acceptor survives; count it, pause so a full fd table does not spin.
        telemetry_.http_rejected(HttpReject::accept_failed);
        log_limited(LogLevel::warn, "http_accept_failed", {{"error", ec.message()}});
        backoff.expires_after(std::chrono::milliseconds(100));
        co_await backoff.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      const auto head_deadline = SteadyClock::now() + kHeadTimeout;
      const auto peer = socket.remote_endpoint(ec).address();
      if (ec) continue;  // already gone
      auto settings = this->settings();
      std::optional<asio::ip::address> evicted;
      Evicted evicted_why = Evicted::idle;
      const auto refusal = admit(peer, evicted, evicted_why);
      if (evicted)
        reject(HttpReject::connection_limit, *evicted,
               evicted_why == Evicted::idle ? "closed to make room: idle longest at the cap"
               : evicted_why == Evicted::stalled
                   ? "closed to make room: its answer untaken longest at the cap"
                   : "closed to make room: open longest at the cap");
      if (refusal) {
        refuse(socket, *refusal, peer, settings->tls != nullptr);
        continue;
      }
      failpoint("http.accept");
      const int lowat = kNotSentLowat;
      (void)::setsockopt(socket.native_handle(), IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
      asio::co_spawn(io_, self->run_session(std::move(socket), peer, std::move(settings), head_deadline),
                     [self](const std::exception_ptr& error) {
                       if (error) self->escaped(error);
                     });
    }
  }

  // Registers a connection so that stop() and admit() can close it, waiting for its first request since
  // `accepted`; false when stopped.
  template <class Stream>
  bool track(const std::shared_ptr<Stream>& stream, Slot& slot, SteadyClock::time_point accepted) {
    std::lock_guard lock(mutex_);
    if (stopped_) return false;
    const std::uint64_t id = next_id_++;
    auto close = [weak = std::weak_ptr<Stream>(stream),
                  executor = beast::get_lowest_layer(*stream).get_executor()] {
      asio::post(executor, [weak] {
        if (auto s = weak.lock()) beast::get_lowest_layer(*s).close();
      });
    };
    tracked_.emplace(id, Tracked{std::move(close), slot.peer, accepted, accepted});
    slot.id = id;
    return true;
  }

  asio::awaitable<void> run_session(tcp::socket socket, asio::ip::address peer,
                                    std::shared_ptr<const Settings> settings, SteadyClock::time_point head_deadline) {
    Slot slot(shared_from_this(), peer);
    const auto accepted = head_deadline - kHeadTimeout;
    beast::error_code ec;
    if (settings->tls) {
      auto stream =
          std::make_shared<beast::ssl_stream<beast::tcp_stream>>(beast::tcp_stream(std::move(socket)), *settings->tls);
      if (!track(stream, slot, accepted)) co_return;
      beast::get_lowest_layer(*stream).expires_at(head_deadline);
      co_await stream->async_handshake(asio::ssl::stream_base::server, asio::redirect_error(asio::use_awaitable, ec));
      if (ec == beast::error::timeout) {
        reject(HttpReject::head_timeout, peer);
      } else if (ec && ec.category() == asio::error::get_ssl_category()) {
        // What OpenSSL refused (plain HTTP from a scraper set to http, not https; no common version) is a bad
        // request; a connection closed without a word (a TCP port check) is none.
        reject(HttpReject::bad_request, peer, "TLS handshake failed: " + ec.message());
        if (ERR_GET_REASON(ec.value()) == SSL_R_HTTP_REQUEST)
          co_await refuse_plain_http(get_lowest_layer(*stream));
      }
      if (!ec && co_await serve(*stream, slot, head_deadline)) {
        waiting(slot, SteadyClock::now());
        beast::get_lowest_layer(*stream).expires_after(kTlsCloseTimeout);
        co_await stream->async_shutdown(asio::redirect_error(asio::use_awaitable, ec));
        co_await linger(beast::get_lowest_layer(*stream));
      }
    } else {
      auto stream = std::make_shared<beast::tcp_stream>(std::move(socket));
      if (!track(stream, slot, accepted)) co_return;
      if (co_await serve(*stream, slot, head_deadline)) {
        waiting(slot, SteadyClock::now());
        co_await linger(*stream);
      }
    }
  }

  // The end of a connection whose last answer was written: FIN, then what the client still sends is dropped
  // until it closes (kLingerTime, kLingerBytes at most), so that the close resets nothing the client has yet
  // to read.
  static asio::awaitable<void> linger(beast::tcp_stream& stream) {
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream.expires_after(kLingerTime);
    std::array<char, 16384> discard;
    for (std::uint64_t dropped = 0; !ec && dropped < kLingerBytes;)
      dropped += co_await stream.async_read_some(asio::buffer(discard),
                                                 asio::redirect_error(asio::use_awaitable, ec));
  }

  // A request in plain HTTP on the HTTPS port (a scraper set to http, not https; OpenSSL sent no alert): a
  // 400 that says so, as nginx's, instead of a closed connection, then a lingering close.
  static asio::awaitable<void> refuse_plain_http(beast::tcp_stream& stream) {
    static constexpr std::string_view kBody = "plain HTTP request sent to the HTTPS port: use https://\n";
    static const std::string answer = fmt::format(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n"
        "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{}",
        kBody.size(), kBody);
    beast::error_code ec;
    stream.expires_after(kTlsCloseTimeout);
    co_await asio::async_write(stream, asio::buffer(answer), asio::redirect_error(asio::use_awaitable, ec));
    if (!ec) co_await linger(stream);
  }

  // Serves requests until the peer closes, asks to close, or an I/O error. True when a graceful close is due.
  template <class Stream>
  asio::awaitable<bool> serve(Stream& stream, const Slot& slot, SteadyClock::time_point head_deadline) {
    const asio::ip::address& peer = slot.peer;
    // Bounded: a parser that needs more holds what it has unparsed here (a chunk extension, the trailer
    // section are parsed only once whole), and a read into a full buffer fails with buffer_overflow.
    beast::flat_buffer buffer(kHeaderLimit + kBodyLimit);
    const auto keep_alive_until = head_deadline - kHeadTimeout + kKeepAliveTime;
    for (bool first = true;; first = false) {
      http::request_parser<http::string_body> parser;
      parser.header_limit(kHeaderLimit);
      parser.body_limit(kBodyLimit);
      beast::error_code ec;
      waiting(slot, head_deadline - kHeadTimeout);
      beast::get_lowest_layer(stream).expires_at(head_deadline);
      co_await http::async_read_header(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
      if (ec == http::error::end_of_stream) co_return true;
      if (ec == beast::error::timeout) {
        // Silence after a served request is an idle keep-alive connection, not a refusal.
        if (first || parser.got_some()) reject(HttpReject::head_timeout, peer);
        co_return false;
      }
      const char* bad = nullptr;  // what is wrong with a request that was read whole
      if (!ec) {
        // RFC 9112 6.3: a request whose Transfer-Encoding does not end in chunked has no knowable length.
        if (parser.get().find(http::field::transfer_encoding) != parser.get().end() && !parser.chunked()) {
          bad = "Transfer-Encoding must end in chunked (RFC 9112 6.3)";
        } else if (parser.get().version() == 11 && parser.get().count(http::field::host) != 1) {
          bad = "an HTTP/1.1 request needs one Host header (RFC 9112 3.2)";
        } else if (parser.get().count(http::field::authorization) > 1) {
          // Authorization is no list (RFC 9110 5.3, 11.6.2): which one counts has no answer, and a proxy in
          // front that checks the other one would disagree with us. nginx refuses it the same way.
          bad = "more than one Authorization header (RFC 9110 11.6.2)";
        } else {
          beast::get_lowest_layer(stream).expires_after(kBodyTimeout);
          // RFC 9110 10.1.1: a client that sent Expect: 100-continue waits for a 100 before it sends the body
          // (curl for 1 s, then it sends anyway; a client that waits longer met the body deadline, counted as
          // head_timeout). nginx sends it before it reads or discards a body; no route here reads one.
          const auto expect = parser.get()[http::field::expect];
          if (!parser.is_done() && parser.get().version() >= 11 &&
              iequals(std::string_view(expect.data(), expect.size()), "100-continue")) {
            static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
            co_await asio::async_write(stream, asio::buffer(kContinue.data(), kContinue.size()),
                                       asio::redirect_error(asio::use_awaitable, ec));
          }
          // The body as sent is limited, chunk framing, extensions and trailer fields included: Beast's
          // body_limit counts only the payload, and buffered a chunk extension or trailer section of any size
          // until it was whole (megabytes, parsed on this thread for seconds, past the deadline).
          for (std::uint64_t as_sent = 0; !ec && !parser.is_done();) {
            as_sent += co_await http::async_read_some(stream, buffer, parser,
                                                      asio::redirect_error(asio::use_awaitable, ec));
            if (ec == http::error::buffer_overflow || (!ec && as_sent > kBodyLimit))
              ec = http::error::body_limit;
          }
          if (ec == beast::error::timeout) {
            reject(HttpReject::head_timeout, peer);
            co_return false;
          }
        }
      }
      // A client that closed mid-request (the head or the body unfinished) sent nothing wrong, and there is
      // no one to read an answer: closed, not counted, as a TLS connection closed without a word.
      if (ec == http::error::partial_message) co_return false;
      if (ec && ec.category() != http::make_error_code(http::error::bad_target).category()) co_return false;
      waiting(slot, SteadyClock::time_point::max());  // a whole request (or a refused one): no longer idle
      Response response;
      if (ec || bad) {
        // What was wrong, in the status and in words: a browser sends every localhost cookie to this port too.
        reject(HttpReject::bad_request, peer);
        Request request;
        if (ec == http::error::header_limit) {
          response = plain_response(request, http::status::request_header_fields_too_large,
                                    fmt::format("request head over {} KiB\n", kHeaderLimit / 1024));
        } else if (ec == http::error::body_limit) {
          response = plain_response(request, http::status::payload_too_large,
                                    fmt::format("request body over {} KiB\n", kBodyLimit / 1024));
        } else if (bad) {
          response =
              plain_response(request, http::status::bad_request, fmt::format("bad request: {}\n", bad));
        } else {
          response = plain_response(request, http::status::bad_request, "bad request: " + ec.message() + "\n");
        }
        response.keep_alive(false);
      } else {
        response = co_await handle(parser.get(), peer);
        // A target the API refuses (a bad %-escape, a parameter given twice or out of range) is a bad request
        // too, counted as the unparsable ones are; the answer says why, and so does the log.
        if (response.result() == http::status::bad_request) {
          const std::string_view why = response.body();
          reject(HttpReject::bad_request, peer, why.substr(0, why.find('\n')));
        }
      }
      if (SteadyClock::now() >= keep_alive_until) response.keep_alive(false);
      // RFC 9110 9.3.2: a HEAD gets what a GET would get, Content-Length included, without the body (a
      // refused one too, where its start line was read).
      if (parser.get().method() == http::verb::head) {
        const auto length = response.body().size();
        response.body().clear();
        response.content_length(length);
      }
      beast::get_lowest_layer(stream).expires_after(kWriteTimeout);
      writing(slot, SteadyClock::now());
      co_await http::async_write(stream, response, asio::redirect_error(asio::use_awaitable, ec));
      writing(slot, SteadyClock::time_point::max());
      // The scrape's text, sent (or not): its buffer serves the next scrape. Two at once: the larger is kept.
      const auto type = response[http::field::content_type];
      if (std::string_view(type.data(), type.size()) == kMetricsType &&
          response.body().capacity() > metrics_buffer_.capacity()) {
        metrics_buffer_ = std::move(response.body());
      }
      if (ec == beast::error::timeout) reject(HttpReject::write_timeout, peer);  // a scrape lost: say so
      if (ec) co_return false;
      if (!response.keep_alive()) co_return true;
      head_deadline = SteadyClock::now() + kHeadTimeout;
    }
  }

  // The request target in origin form (path and query): RFC 9112 3.2.2 has servers take the absolute form
  // ("http://host/metrics") too.
  static std::string_view origin_form(const Request& request) {
    const std::string_view target(request.target().data(), request.target().size());
    for (const std::string_view scheme : {"http://", "https://"}) {
      if (proto::ascii_lower(target.substr(0, scheme.size())) == scheme) {
        const auto slash = target.find_first_of("/?", scheme.size());
        return slash == std::string_view::npos ? std::string_view("/") : target.substr(slash);
      }
    }
    return target;
  }

  asio::awaitable<Response> handle(const Request& request, const asio::ip::address& peer) {
    const std::string_view target = origin_form(request);
    const auto question = target.find('?');
    const std::string_view query =
        question == std::string_view::npos ? std::string_view{} : target.substr(question + 1);
    // One spelling of the path for the probes' exemption below and for the routes: /%68ealthz and
    // /api/../healthz are /healthz for both, /healthz/../metrics is /metrics for both.
    const auto normalized = proto::normalized_path(target.substr(0, question));
    if (!normalized) {
      co_return make_response(
          request, http::status::bad_request, kTextPlain,
          "bad %-escape in the path: a '%' must start %XX with two hex digits, and %00 is "
          "refused (RFC 3986 2.1)\n");
    }
    const std::string path = proto::without_dot_segments(*normalized);
    // The probes (the kubelet's, a load balancer's health check) send no credentials, and their answers say
    // nothing of the data: /readyz guarded made every pod unready, every relay "down", once basic_auth was set.
    const auto settings = this->settings();
    if (path != "/healthz" && path != "/readyz" && settings->basic_auth) {
      const AuthVerdict verdict = co_await authorize(request, settings, peer);
      switch (verdict.result) {
        case AuthResult::ok:
          break;
        case AuthResult::missing:
        case AuthResult::wrong: {
          reject(verdict.result == AuthResult::missing ? HttpReject::auth_missing : HttpReject::auth_failed, peer);
          auto response = plain_response(request, http::status::unauthorized, "unauthorized\n");
          response.set(http::field::www_authenticate, R"(Basic realm="mailflowd", charset="UTF-8")");
          co_return response;
        }
        case AuthResult::busy:
        case AuthResult::backoff: {
          const bool busy = verdict.result == AuthResult::busy;
          reject(busy ? HttpReject::auth_busy : HttpReject::auth_backoff, peer);
          auto response = busy ? plain_response(request, http::status::service_unavailable, "busy, retry later\n")
                               : plain_response(request, http::status::too_many_requests,
                                                "too many failed logins, retry later\n");
          response.set(http::field::retry_after, std::to_string(std::max<long long>(1, verdict.retry_after.count())));
          co_return response;
        }
        case AuthResult::stopped:
          // Its check was dropped by the stop, which closes the connection too: no refusal of the client's.
          co_return plain_response(request, http::status::service_unavailable, "shutting down\n");
      }
    }
    co_return respond(request, path, query);
  }

  Response respond(const Request& request, std::string_view path, std::string_view query) {
    try {
      return route(request, path, query);
    } catch (const std::exception& e) {
      // Logged and counted as every internal error is (a spdlog line of its own broke log.format: json).
      telemetry_.internal_error("http");
      log_event(LogLevel::error, "internal_error",
                {{"component", "http"},
                 {"target", std::string_view(request.target().data(), request.target().size())},
                 {"error", e.what()}});
      return make_response(request, http::status::internal_server_error, kTextPlain, "internal error\n");
    }
  }

  // `path` as proto::normalized_path and without_dot_segments give it, `query` as sent.
  Response route(const Request& request, std::string_view path, std::string_view query) {
    if (request.method() != http::verb::get && request.method() != http::verb::head) {
      auto response = make_response(request, http::status::method_not_allowed, kTextPlain, "method not allowed\n");
      response.set(http::field::allow, "GET, HEAD");
      return response;
    }
    if (path == "/metrics") {
      return make_response(request, http::status::ok, kMetricsType,
                           telemetry_.metrics_text(std::exchange(metrics_buffer_, {})));
    }
    if (path == "/healthz") return make_response(request, http::status::ok, kTextPlain, "ok");
    if (path == "/readyz") {
      return ready_ && ready_() ? make_response(request, http::status::ok, kTextPlain, "ok")
                                : make_response(request, http::status::service_unavailable, kTextPlain, "not ready");
    }

    if (path == "/api/v1/tlsrpt") return tlsrpt_response(request, query);

    using Render = std::string (*)(const Report&);
    struct ReportRoute {
      std::string_view path;
      std::string_view content_type;
      Render render;
      bool whole_window;  // the summary: the whole window, its drill-down (JSON) too; no days
    };
    static constexpr ReportRoute kReports[] = {
        {"/", "text/html; charset=utf-8", &render_html, false},
        {"/api/v1/report", "application/json", &render_json, false},
        {"/api/v1/report.csv", "text/csv; charset=utf-8", &render_csv, false},
        {"/api/v1/report.txt", kTextPlain, &render_table, false},
        {"/api/v1/connectors", "application/json", &render_summary_json, true},
        {"/api/v1/connectors.csv", "text/csv; charset=utf-8", &render_summary_csv, true},
        {"/api/v1/connectors.txt", kTextPlain, &render_summary_table, true},
    };
    // The drill-down (daemon/report_remotes.cpp): CSVs for scripts, aligned text for `mailflowd report
    // --connector NAME` / `--domains`.
    if (path == "/api/v1/remotes.csv" || path == "/api/v1/domains.csv" || path == "/api/v1/remotes.txt" ||
        path == "/api/v1/domains.txt") {
      std::string error;
      const auto params = parse_query(query, {"days", "connector"}, error);
      const auto days = params ? parse_days(*params, telemetry_.window_days(), error) : std::nullopt;
      if (days) error = connector_problem(*params, path == "/api/v1/remotes.txt");
      if (!days || !error.empty())
        return make_response(request, http::status::bad_request, kTextPlain, error);
      const Report report = telemetry_.report(*days);
      if (path == "/api/v1/domains.csv")
        return make_response(request, http::status::ok, "text/csv; charset=utf-8", render_domains_csv(report));
      if (path == "/api/v1/domains.txt")
        return make_response(request, http::status::ok, kTextPlain, render_domains_table(report));
      // remotes.txt is one connector's; remotes.csv every connector's, or with ?connector= that one's.
      const auto named = params->find("connector");
      const std::string connector = named == params->end() ? std::string() : named->second;
      const bool known_connector =
          std::any_of(report.connectors.begin(), report.connectors.end(),
                      [&](const ConnectorSummary& c) { return c.connector == connector; });
      if (named != params->end() && !known_connector) return no_such_connector(request, report, connector);
      if (path == "/api/v1/remotes.csv")
        return make_response(request, http::status::ok, "text/csv; charset=utf-8",
                             render_remotes_csv(report, connector));
      return make_response(request, http::status::ok, kTextPlain, render_remotes_table(report, connector));
    }
    for (const auto& route : kReports) {
      if (path != route.path) continue;
      std::string error;
      const int window_days = telemetry_.window_days();
      const auto params = parse_query(query, {"days", "connector"}, error);
      std::optional<int> days = window_days;
      if (!params) {
        days.reset();
      } else if (!route.whole_window) {
        days = parse_days(*params, window_days, error);
      } else if (params->contains("days")) {
        error = "the connector summary covers the whole telemetry window (" + std::to_string(window_days) +
                (window_days == 1 ? " day" : " days") + "): it takes no days\n";
        days.reset();
      }
      if (days) error = connector_problem(*params, false);
      if (!days || !error.empty())
        return make_response(request, http::status::bad_request, kTextPlain, error);
      failpoint("http.report");
      Report report = telemetry_.report(*days);
      // ?connector=NAME: that connector's report alone (`mailflowd report --connector NAME --format json`).
      if (const auto named = params->find("connector");
          named != params->end() && !keep_only_connector(report, named->second))
        return no_such_connector(request, report, named->second);
      return make_response(request, http::status::ok, route.content_type, route.render(report));
    }
    return make_response(request, http::status::not_found, kTextPlain, "not found\n");
  }

  // Why the query's connector= cannot name a connector ("" when it can): given empty (no configuration has a
  // connector named ""), or missing where the answer is one connector's. A 400 with its reason, as a bad
  // days= gets: a 404 'no connector ""' read as a report that lacks a connector.
  static std::string connector_problem(const Query& params, bool required) {
    const auto named = params.find("connector");
    if (named == params.end()) {
      return required ? "needs connector=NAME: the servers of one connector (/api/v1/remotes.csv has every "
                        "connector's)\n"
                      : std::string();
    }
    return named->second.empty() ? "connector is empty: needs connector=NAME, a connector's name\n"
                                 : std::string();
  }

  // 404 for a connector the report does not have, naming those it has.
  static Response no_such_connector(const Request& request, const Report& report,
                                    std::string_view connector) {
    std::string known;
    for (const auto& c : report.connectors)
      if (known.find(" " + c.connector + ",") == std::string::npos) known += " " + c.connector + ",";
    if (!known.empty()) known.pop_back();
    return make_response(
        request, http::status::not_found, kTextPlain,
        "no connector \"" + cli::shown(connector) + "\" in the report; connectors:" + known + "\n");
  }

  // GET /api/v1/tlsrpt?date=YYYY-MM-DD (default: today, UTC): every domain's TLS-RPT report of that day, JSON.
  // With &domain=D&format=gzip: that domain's report as it is sent (application/tlsrpt+gzip, RFC 8460 5.3).
  Response tlsrpt_response(const Request& request, std::string_view query) {
    std::string error;
    const auto params = parse_query(query, {"date", "domain", "format"}, error);
    if (!params) return make_response(request, http::status::bad_request, kTextPlain, error);
    auto param = [&](std::string_view name, std::string_view otherwise) {
      const auto it = params->find(name);
      return it == params->end() ? std::string(otherwise) : it->second;
    };
    std::string date = param("date", "");
    const std::string domain = proto::dns_name_key(param("domain", ""));  // the store's names are keys
    const std::string format = param("format", "json");
    if (date.empty()) {
      const auto today = std::chrono::floor<std::chrono::days>(std::chrono::system_clock::now());
      const std::chrono::year_month_day ymd{today};
      date = fmt::format("{:04}-{:02}-{:02}", static_cast<int>(ymd.year()), static_cast<unsigned>(ymd.month()),
                         static_cast<unsigned>(ymd.day()));
    }
    if (!state_text::valid_date(date))
      return make_response(request, http::status::bad_request, kTextPlain, "date must be YYYY-MM-DD\n");
    if (format == "json" && domain.empty()) {
      return make_response(request, http::status::ok, "application/json", render_tlsrpt_day(telemetry_.tlsrpt(), date));
    }
    if (format != "json" && format != "gzip") {
      return make_response(request, http::status::bad_request, kTextPlain, "format must be json or gzip\n");
    }
    if (domain.empty()) return make_response(request, http::status::bad_request, kTextPlain, "format=gzip needs domain\n");
    const auto day = telemetry_.tlsrpt().find(date, domain);
    if (!day) return make_response(request, http::status::not_found, kTextPlain, "no report for that date and domain\n");
    const std::string json = proto::tlsrpt::render_json(*day, telemetry_.tlsrpt().submitter());
    if (format == "json") return make_response(request, http::status::ok, "application/json", json);
    return make_response(request, http::status::ok, "application/tlsrpt+gzip", gzip(json));
  }

  // ---------------------------------------------------------------------------------------------------- auth
  // Order: a cached success answers at once (a scrape every few seconds never waits for a hash, nor for an
  // attacker's queue); then the address's backoff; then the bound on pending checks; only then a check.
  // `settings` (with basic_auth) is the snapshot the request is checked against.
  asio::awaitable<AuthVerdict> authorize(const Request& request, std::shared_ptr<const Settings> settings,
                                         const asio::ip::address& peer) {
    const config::BasicAuth& auth = *settings->basic_auth;
    const auto field = request.find(http::field::authorization);
    if (field == request.end()) co_return AuthVerdict{AuthResult::missing};
    std::string_view value(field->value().data(), field->value().size());
    constexpr std::string_view kScheme = "basic ";
    if (value.size() < kScheme.size() || !iequals(value.substr(0, kScheme.size()), kScheme)) {
      co_return AuthVerdict{AuthResult::missing};
    }
    value.remove_prefix(kScheme.size());
    while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    while (!value.empty() && value.back() == ' ') value.remove_suffix(1);
    auto credentials = decode_base64(value);
    if (!credentials || credentials->find(':') == std::string::npos) co_return AuthVerdict{AuthResult::missing};

    const Digest digest = keyed_digest(*credentials);
    bool reserved = false;  // the check holds the slot kept for an address that logged in recently
    bool known = false;     // that address: its check runs ahead of those queued for other addresses
    {
      std::lock_guard lock(mutex_);
      for (const auto& known : accepted_) {
        if (CRYPTO_memcmp(known.data(), digest.data(), digest.size()) == 0) {
          logged_in(peer);
          co_return AuthVerdict{AuthResult::ok};
        }
      }
      if (const auto wait = backoff_left(peer); wait.count() > 0) co_return AuthVerdict{AuthResult::backoff, wait};
      known = logged_in_recently(peer);
      if (pending_checks_ < kMaxPendingChecks) {
        ++pending_checks_;
      } else if (!reserved_check_busy_ && known) {
        reserved_check_busy_ = reserved = true;
      } else {
        co_return AuthVerdict{AuthResult::busy, std::chrono::seconds(1)};
      }
    }

    const auto colon = credentials->find(':');
    const std::string_view user = std::string_view(*credentials).substr(0, colon);
    const bool user_ok =
        user.size() == auth.user.size() && CRYPTO_memcmp(user.data(), auth.user.data(), user.size()) == 0;
    // A wrong user name has its password checked all the same, in the same line, and is refused after it, as
    // OpenSSH checks an unknown user's password against a fake entry (auth.c, fakepw()). A delay in its
    // place, as long as the last check took, told the user name apart: a password that crypt(3) refuses at
    // once (a NUL, 512 bytes or more) got the right user name's 401 at once and a wrong one's after that
    // delay, and set the delay to nothing for any password after it; four requests at once got a wrong user
    // name's 401s together, a wrong password's one check apart.
    const std::optional<bool> password_ok =
        co_await check_password(credentials->substr(colon + 1), auth.password_hash, known);
    const bool verified = user_ok && password_ok.value_or(false);
    OPENSSL_cleanse(credentials->data(), credentials->size());

    std::shared_ptr<const Settings> current;
    {
      std::lock_guard lock(mutex_);
      if (reserved)
        reserved_check_busy_ = false;
      else
        --pending_checks_;
      if (!password_ok) co_return AuthVerdict{AuthResult::stopped};
      if (settings_->basic_auth == settings->basic_auth) {
        if (!verified) {
          failed(peer);
          co_return AuthVerdict{AuthResult::wrong};
        }
        failures_.erase(client_key(peer));
        logged_in(peer);
        if (accepted_.size() >= kMaxCachedCredentials) accepted_.erase(accepted_.begin());
        accepted_.push_back(digest);
        co_return AuthVerdict{AuthResult::ok};
      }
      current = settings_;
    }
    // A reload changed basic_auth while the check waited or ran: its verdict is on the old user and hash, and
    // the answer goes out under the new ones (a password that a reload replaced was answered 200 once more,
    // after the reload), so the request is checked again as if it came now; nothing of the old verdict is
    // kept.
    if (!current->basic_auth) co_return AuthVerdict{AuthResult::ok};
    co_return co_await authorize(request, std::move(current), peer);
  }

  Digest keyed_digest(const std::string& credentials) const {
    Digest digest{};
    unsigned int length = 0;
    HMAC(EVP_sha256(), cache_key_.data(), static_cast<int>(cache_key_.size()),
         reinterpret_cast<const unsigned char*>(credentials.data()), credentials.size(), digest.data(), &length);
    return digest;
  }

  // The crypt(3) check on the password thread; this coroutine waits on a timer that the result cancels.
  // `ahead`: an address that logged in recently (Prometheus after a password change). Its check runs before
  // those queued for other addresses: with the slot kept for it but a place at the back of the line, it
  // waited for up to 4 guessers' checks, each up to half a second of CPU at nice 10 (seconds on a busy host:
  // its scrape timed out after 10 s once).
  // nullopt: not checked, the server stopped first (stop() drops the checks in line).
  asio::awaitable<std::optional<bool>> check_password(std::string password, const std::string& hash,
                                                      bool ahead) {
    auto pending = std::make_shared<PendingCheck>(io_);
    // `this`, not a shared_ptr: the run that calls it holds one, and a queued check that owned the server
    // would keep it alive from its own queue.
    auto check = [self = this, pending, password = std::move(password), hash]() mutable {
      const bool ok = password_matches(password, hash);
      OPENSSL_cleanse(password.data(), password.size());
      asio::post(self->io_, [pending, ok] {
        pending->ok = ok;
        pending->done.cancel();
      });
    };
    {
      std::lock_guard lock(mutex_);
      if (stopped_) co_return std::nullopt;
      (ahead ? checks_ahead_ : checks_).push_back(QueuedCheck{std::move(check), pending});
    }
    // One run per check queued; each takes the first in line when the password thread gets to it.
    asio::post(crypt_, [self = shared_from_this()] { self->run_next_check(); });
    beast::error_code ec;
    co_await pending->done.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (pending->dropped) co_return std::nullopt;
    co_return pending->ok;
  }

  // On the password thread.
  void run_next_check() {
    std::function<void()> check;
    {
      std::lock_guard lock(mutex_);
      auto& line = checks_ahead_.empty() ? checks_ : checks_ahead_;
      if (line.empty()) return;
      check = std::move(line.front().run);
      line.pop_front();
    }
    check();
  }

  // Callers hold mutex_.
  std::chrono::seconds backoff_left(const asio::ip::address& peer) {
    const auto it = failures_.find(client_key(peer));
    if (it == failures_.end()) return std::chrono::seconds(0);
    const auto now = SteadyClock::now();
    if (now - it->second.last > kForgetFailures) {
      failures_.erase(it);
      return std::chrono::seconds(0);
    }
    if (now >= it->second.blocked_until) return std::chrono::seconds(0);
    return std::chrono::ceil<std::chrono::seconds>(it->second.blocked_until - now);
  }

  // Callers hold mutex_.
  void logged_in(const asio::ip::address& peer) {
    if (logins_.size() >= kMaxLoginRecords && !logins_.contains(peer)) {
      logins_.erase(std::min_element(logins_.begin(), logins_.end(),
                                     [](const auto& a, const auto& b) { return a.second < b.second; }));
    }
    logins_[peer] = SteadyClock::now();
  }

  bool logged_in_recently(const asio::ip::address& peer) const {
    const auto it = logins_.find(peer);
    return it != logins_.end() && SteadyClock::now() - it->second < kForgetLogins;
  }

  void failed(const asio::ip::address& peer_address) {
    const auto peer = client_key(peer_address);
    const auto now = SteadyClock::now();
    if (failures_.size() >= kMaxFailureRecords && failures_.find(peer) == failures_.end()) {
      // Full (many addresses): forget the stalest record; the bound on pending checks still holds.
      auto stalest = std::min_element(failures_.begin(), failures_.end(),
                                      [](const auto& a, const auto& b) { return a.second.last < b.second.last; });
      failures_.erase(stalest);
    }
    auto& record = failures_[peer];
    ++record.count;
    record.last = now;
    if (record.count > kFreeFailures) {
      const unsigned doublings = std::min(record.count - kFreeFailures - 1, 6u);
      record.blocked_until = now + std::min<SteadyClock::duration>(std::chrono::seconds(1u << doublings), kMaxBackoff);
    }
  }

  // A password check's result, handed from the password thread to the request waiting on `done`.
  struct PendingCheck {
    explicit PendingCheck(asio::io_context& io) : done(io, asio::steady_timer::time_point::max()) {}
    asio::steady_timer done;
    bool ok = false;
    bool dropped = false;  // never run: stop() came first
  };
  struct QueuedCheck {
    std::function<void()> run;
    std::shared_ptr<PendingCheck> pending;
  };

  struct FailureRecord {
    unsigned count = 0;
    SteadyClock::time_point last;
    SteadyClock::time_point blocked_until;
  };

  asio::io_context& io_;      // the HTTP thread's own loop, never a relay loop
  asio::thread_pool& crypt_;  // password checks
  const config::Http http_;
  Telemetry& telemetry_;
  const std::function<bool()> ready_;
  tcp::acceptor acceptor_;
  std::atomic<unsigned short> port_{0};
  std::array<unsigned char, 32> cache_key_{};
  // The body of the last /metrics response, handed to the next scrape to write into (HTTP thread only): a
  // scrape of 1,000 connectors x 2 directions is ~10 MB, and a fresh allocation of it was mapped, faulted in
  // page by page and unmapped at each scrape. Kept while idle: its capacity, ~1.06 x the last scrape's size.
  std::string metrics_buffer_;

  mutable std::mutex mutex_;  // guards the members below (stop() and update() come from other threads)
  std::shared_ptr<const Settings> settings_ = std::make_shared<Settings>();
  bool stopped_ = false;
  std::uint64_t next_id_ = 0;
  struct Tracked {
    std::function<void()> close;
    asio::ip::address peer;
    // Since when it waits for a request (the accept, the end of the previous answer) or lingers; max() while
    // a request is served. The longest waiting is closed first at the cap.
    SteadyClock::time_point idle_since;
    SteadyClock::time_point accepted;  // the one open longest is closed at the cap when none waits or stalls
    SteadyClock::time_point writing_since =
        SteadyClock::time_point::max();  // an answer is being written since
    bool evicted = false;  // closed to make room, its slot not yet given back
  };
  std::map<std::uint64_t, Tracked> tracked_;
  std::size_t evicting_ = 0;  // connections closed to make room whose slots are not yet given back
  std::size_t connections_ = 0;
  std::map<asio::ip::address, std::size_t> per_address_;  // by client_key()
  std::vector<Digest> accepted_;
  std::size_t pending_checks_ = 0;
  bool reserved_check_busy_ = false;
  // Checks waiting for the password thread: those of addresses that logged in recently, then the others.
  std::deque<QueuedCheck> checks_ahead_;
  std::deque<QueuedCheck> checks_;
  std::map<asio::ip::address, SteadyClock::time_point> logins_;  // who presented verified credentials, when
  std::map<asio::ip::address, FailureRecord> failures_;          // by client_key()
};

}  // namespace

// The HTTP side has a thread (and loop) of its own, so that a scrape never waits behind relay sessions and
// relay sessions never wait behind HTTP; password checks have one more thread, at a lower priority.
struct HttpServer::Impl {
  Impl(const config::Http& http, Telemetry& telemetry, std::function<bool()> ready)
      : server(std::make_shared<Server>(io, crypt, http, telemetry, std::move(ready))) {
    asio::post(crypt, [] { (void)setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 10); });
  }

  asio::io_context io{1};
  asio::thread_pool crypt{1};
  std::shared_ptr<Server> server;
  std::thread thread;
};

HttpServer::HttpServer(const config::Http& http, Telemetry& telemetry, std::function<bool()> ready)
    : impl_(std::make_unique<Impl>(http, telemetry, std::move(ready))) {}

// stop() closes everything and drops the password checks in line; the HTTP thread's loop then runs out of
// work (the check running, at most one, finishes first) and the thread ends.
HttpServer::~HttpServer() {
  impl_->server->stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

void HttpServer::start() {
  impl_->server->start();
  impl_->thread = std::thread([this] { impl_->io.run(); });
}
void HttpServer::stop() { impl_->server->stop(); }
std::shared_ptr<const HttpServer::Settings> HttpServer::prepare(const config::Http& http) {
  return Server::prepare(http);
}
void HttpServer::update(std::shared_ptr<const Settings> next) { impl_->server->update(std::move(next)); }
void HttpServer::check_tls(const config::CertificatePair& pair) { Server::load_tls(pair); }
unsigned short HttpServer::port() const { return impl_->server->port(); }
std::optional<CertificateInfo> HttpServer::certificate() const { return impl_->server->certificate(); }

}  // namespace mailflow
