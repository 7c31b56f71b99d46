#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include "daemon/http_server.hpp"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include <array>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <charconv>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "daemon/crypt_check.hpp"
#include "daemon/report.hpp"
#include "daemon/telemetry.hpp"

namespace mailflow {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

// A scrape or a report page is small and quick; anything slower is a stuck or hostile peer.
constexpr auto kReadTimeout = std::chrono::seconds(30);  // also the keep-alive idle limit
constexpr auto kWriteTimeout = std::chrono::seconds(30);
constexpr auto kTlsTimeout = std::chrono::seconds(10);  // handshake and close_notify
constexpr std::size_t kMaxConnections = 256;
constexpr std::uint32_t kHeaderLimit = 8 * 1024;
constexpr std::uint64_t kBodyLimit = 8 * 1024;  // only GET is served
constexpr std::size_t kMaxCachedCredentials = 8;
constexpr int kDefaultDays = 7;

constexpr std::string_view kTextPlain = "text/plain; charset=utf-8";

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

// `days` from the query string: default 7 (or the window when shorter), else an integer 1..max_days.
std::optional<int> parse_days(std::string_view query, int max_days, std::string& error) {
  std::optional<std::string_view> value;
  while (!query.empty()) {
    const auto amp = query.find('&');
    const std::string_view param = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    const auto eq = param.find('=');
    if (param.substr(0, eq) == "days") value = eq == std::string_view::npos ? std::string_view{} : param.substr(eq + 1);
  }
  if (!value) return std::min(kDefaultDays, max_days);
  int days = 0;
  const auto [end, ec] = std::from_chars(value->data(), value->data() + value->size(), days);
  if (value->empty() || ec != std::errc{} || end != value->data() + value->size() || days < 1 || days > max_days) {
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
  response.keep_alive(request.keep_alive());
  response.body() = std::move(body);
  response.prepare_payload();
  return response;
}

// What may change on reload without rebinding. A connection keeps the snapshot it was accepted with.
struct Settings {
  std::optional<config::BasicAuth> basic_auth;
  std::shared_ptr<asio::ssl::context> tls;  // null: plain HTTP
};

class Server : public std::enable_shared_from_this<Server> {
 public:
  Server(asio::io_context& io, const config::Http& http, Telemetry& telemetry, std::function<bool()> ready)
      : io_(io), http_(http), telemetry_(telemetry), ready_(std::move(ready)), acceptor_(asio::make_strand(io)) {}

  void start() {
    update(http_);
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
    asio::co_spawn(acceptor_.get_executor(), shared_from_this()->accept_loop(), log_exception);
  }

  void stop() {
    std::map<std::uint64_t, std::function<void()>> closers;
    {
      std::lock_guard lock(mutex_);
      stopped_ = true;
      closers.swap(closers_);
    }
    asio::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->acceptor_.close(ignored);
    });
    for (auto& [id, close] : closers) close();
  }

  unsigned short port() const { return port_; }

  // Basic auth and TLS certificate for connections accepted from now on; throws (keeping the old ones) when
  // the certificate or key cannot be loaded.
  void update(const config::Http& http) {
    auto next = std::make_shared<Settings>();
    next->basic_auth = http.basic_auth;
    if (http.tls) next->tls = load_tls(*http.tls);
    std::lock_guard lock(mutex_);
    settings_ = std::move(next);
    accepted_.clear();
  }

 private:
  static void log_exception(const std::exception_ptr& error) {
    if (!error) return;
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      spdlog::error("http: connection failed: {}", e.what());
    } catch (...) {
      spdlog::error("http: connection failed with an unknown exception");
    }
  }

  static std::shared_ptr<asio::ssl::context> load_tls(const config::CertificatePair& pair) {
    auto context = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_server);
    context->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                         asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 |
                         asio::ssl::context::no_tlsv1_1);
    beast::error_code ec;
    context->use_certificate_chain_file(pair.cert, ec);
    if (ec) throw std::system_error(ec, "http.tls: cannot load certificate " + pair.cert);
    context->use_private_key_file(pair.key, asio::ssl::context::pem, ec);
    if (ec) throw std::system_error(ec, "http.tls: cannot load key " + pair.key);
    return context;
  }

  std::shared_ptr<const Settings> settings() const {
    std::lock_guard lock(mutex_);
    return settings_;
  }

  asio::awaitable<void> accept_loop() {
    auto self = shared_from_this();
    asio::steady_timer backoff(acceptor_.get_executor());
    for (;;) {
      tcp::socket socket(asio::make_strand(io_));
      beast::error_code ec;
      co_await acceptor_.async_accept(socket, asio::redirect_error(asio::use_awaitable, ec));
      if (ec == asio::error::operation_aborted || !acceptor_.is_open()) co_return;
      if (ec) {
        // EMFILE and friends: the acceptor survives; pause so a full fd table does not spin the CPU.
        spdlog::warn("http: accept failed: {}", ec.message());
        backoff.expires_after(std::chrono::milliseconds(100));
        co_await backoff.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      const auto executor = socket.get_executor();
      asio::co_spawn(executor, self->run_session(std::move(socket)), log_exception);
    }
  }

  // Registers a connection so that stop() can close it; nullopt when stopped or full.
  template <class Stream>
  std::optional<std::uint64_t> track(const std::shared_ptr<Stream>& stream) {
    std::lock_guard lock(mutex_);
    if (stopped_ || closers_.size() >= kMaxConnections) return std::nullopt;
    const std::uint64_t id = next_id_++;
    closers_.emplace(id, [weak = std::weak_ptr<Stream>(stream), executor = beast::get_lowest_layer(*stream).get_executor()] {
      asio::post(executor, [weak] {
        if (auto s = weak.lock()) beast::get_lowest_layer(*s).close();
      });
    });
    return id;
  }

  void untrack(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    closers_.erase(id);
  }

  asio::awaitable<void> run_session(tcp::socket socket) {
    auto self = shared_from_this();
    const auto settings = this->settings();
    beast::error_code ec;
    if (settings->tls) {
      auto stream =
          std::make_shared<beast::ssl_stream<beast::tcp_stream>>(beast::tcp_stream(std::move(socket)), *settings->tls);
      const auto id = track(stream);
      if (!id) co_return;
      beast::get_lowest_layer(*stream).expires_after(kTlsTimeout);
      co_await stream->async_handshake(asio::ssl::stream_base::server, asio::redirect_error(asio::use_awaitable, ec));
      if (!ec && co_await serve(*stream, *settings)) {
        beast::get_lowest_layer(*stream).expires_after(kTlsTimeout);
        co_await stream->async_shutdown(asio::redirect_error(asio::use_awaitable, ec));
      }
      untrack(*id);
    } else {
      auto stream = std::make_shared<beast::tcp_stream>(std::move(socket));
      const auto id = track(stream);
      if (!id) co_return;
      if (co_await serve(*stream, *settings)) stream->socket().shutdown(tcp::socket::shutdown_send, ec);
      untrack(*id);
    }
  }

  // Serves requests until the peer closes, asks to close, or an I/O error. True when a graceful close is due.
  template <class Stream>
  asio::awaitable<bool> serve(Stream& stream, const Settings& settings) {
    beast::flat_buffer buffer;
    for (;;) {
      http::request_parser<http::string_body> parser;
      parser.header_limit(kHeaderLimit);
      parser.body_limit(kBodyLimit);
      beast::error_code ec;
      beast::get_lowest_layer(stream).expires_after(kReadTimeout);
      co_await http::async_read(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
      if (ec == http::error::end_of_stream) co_return true;
      Response response;
      if (ec) {
        if (ec.category() != http::make_error_code(http::error::bad_target).category()) co_return false;
        Request bad;
        response = make_response(bad, http::status::bad_request, kTextPlain, "bad request\n");
        response.keep_alive(false);
      } else {
        response = respond(parser.get(), settings);
      }
      beast::get_lowest_layer(stream).expires_after(kWriteTimeout);
      co_await http::async_write(stream, response, asio::redirect_error(asio::use_awaitable, ec));
      if (ec) co_return false;
      if (!response.keep_alive()) co_return true;
    }
  }

  Response respond(const Request& request, const Settings& settings) {
    try {
      return route(request, settings);
    } catch (const std::exception& e) {
      spdlog::error("http: {} failed: {}", std::string_view(request.target().data(), request.target().size()), e.what());
      return make_response(request, http::status::internal_server_error, kTextPlain, "internal error\n");
    }
  }

  Response route(const Request& request, const Settings& settings) {
    const std::string_view target(request.target().data(), request.target().size());
    const auto question = target.find('?');
    const std::string_view path = target.substr(0, question);
    const std::string_view query = question == std::string_view::npos ? std::string_view{} : target.substr(question + 1);

    if (path != "/healthz" && !authorized(request, settings)) {
      auto response = make_response(request, http::status::unauthorized, kTextPlain, "unauthorized\n");
      response.set(http::field::www_authenticate, R"(Basic realm="mailflowd", charset="UTF-8")");
      return response;
    }
    if (request.method() != http::verb::get) {
      auto response = make_response(request, http::status::method_not_allowed, kTextPlain, "method not allowed\n");
      response.set(http::field::allow, "GET");
      return response;
    }
    if (path == "/metrics") {
      return make_response(request, http::status::ok, "text/plain; version=0.0.4; charset=utf-8",
                           telemetry_.metrics_text());
    }
    if (path == "/healthz") return make_response(request, http::status::ok, kTextPlain, "ok");
    if (path == "/readyz") {
      return ready_ && ready_() ? make_response(request, http::status::ok, kTextPlain, "ok")
                                : make_response(request, http::status::service_unavailable, kTextPlain, "not ready");
    }

    using Render = std::string (*)(const Report&);
    struct ReportRoute {
      std::string_view path;
      std::string_view content_type;
      Render render;
    };
    static constexpr ReportRoute kReports[] = {
        {"/", "text/html; charset=utf-8", &render_html},
        {"/api/v1/report", "application/json", &render_json},
        {"/api/v1/report.csv", "text/csv; charset=utf-8", &render_csv},
        {"/api/v1/report.txt", kTextPlain, &render_table},
    };
    for (const auto& route : kReports) {
      if (path != route.path) continue;
      std::string error;
      const auto days = parse_days(query, telemetry_.window_days(), error);
      if (!days) return make_response(request, http::status::bad_request, kTextPlain, error);
      return make_response(request, http::status::ok, route.content_type, route.render(telemetry_.report(*days)));
    }
    return make_response(request, http::status::not_found, kTextPlain, "not found\n");
  }

  bool authorized(const Request& request, const Settings& settings) {
    if (!settings.basic_auth) return true;
    const auto field = request.find(http::field::authorization);
    if (field == request.end()) return false;
    std::string_view value(field->value().data(), field->value().size());
    constexpr std::string_view kScheme = "basic ";
    if (value.size() < kScheme.size() || !iequals(value.substr(0, kScheme.size()), kScheme)) return false;
    value.remove_prefix(kScheme.size());
    while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    while (!value.empty() && value.back() == ' ') value.remove_suffix(1);
    const auto credentials = decode_base64(value);
    if (!credentials) return false;
    const auto colon = credentials->find(':');
    if (colon == std::string::npos) return false;

    // bcrypt/yescrypt cost tens of milliseconds on the I/O thread: remember digests of credentials that
    // passed, so a scrape every few seconds does not pay it each time.
    std::array<unsigned char, SHA256_DIGEST_LENGTH> digest{};
    SHA256(reinterpret_cast<const unsigned char*>(credentials->data()), credentials->size(), digest.data());
    {
      std::lock_guard lock(mutex_);
      for (const auto& known : accepted_) {
        if (CRYPTO_memcmp(known.data(), digest.data(), digest.size()) == 0) return true;
      }
    }
    const std::string_view user = std::string_view(*credentials).substr(0, colon);
    const std::string_view password = std::string_view(*credentials).substr(colon + 1);
    const std::string& expected_user = settings.basic_auth->user;
    const bool user_ok =
        user.size() == expected_user.size() && CRYPTO_memcmp(user.data(), expected_user.data(), user.size()) == 0;
    // Run even when the user is wrong, so the timing does not tell which half failed.
    const bool password_ok = password_matches(password, settings.basic_auth->password_hash);
    if (!user_ok || !password_ok) return false;
    std::lock_guard lock(mutex_);
    if (accepted_.size() >= kMaxCachedCredentials) accepted_.erase(accepted_.begin());
    accepted_.push_back(digest);
    return true;
  }

  asio::io_context& io_;
  const config::Http http_;
  Telemetry& telemetry_;
  const std::function<bool()> ready_;
  tcp::acceptor acceptor_;
  std::atomic<unsigned short> port_{0};

  mutable std::mutex mutex_;  // guards the members below
  std::shared_ptr<const Settings> settings_ = std::make_shared<Settings>();
  bool stopped_ = false;
  std::uint64_t next_id_ = 0;
  std::map<std::uint64_t, std::function<void()>> closers_;
  std::vector<std::array<unsigned char, SHA256_DIGEST_LENGTH>> accepted_;
};

}  // namespace

struct HttpServer::Impl {
  std::shared_ptr<Server> server;
};

HttpServer::HttpServer(boost::asio::io_context& io, const config::Http& http, Telemetry& telemetry,
                       std::function<bool()> ready)
    : impl_(std::make_unique<Impl>(Impl{std::make_shared<Server>(io, http, telemetry, std::move(ready))})) {}

// Connections still draining hold the Server alive; they only touch their own stream once stop() ran.
HttpServer::~HttpServer() { impl_->server->stop(); }

void HttpServer::start() { impl_->server->start(); }
void HttpServer::stop() { impl_->server->stop(); }
void HttpServer::update(const config::Http& http) { impl_->server->update(http); }
unsigned short HttpServer::port() const { return impl_->server->port(); }

}  // namespace mailflow
