#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include "daemon/http_server.hpp"

#include <crypt.h>
#include <doctest/doctest.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "daemon/telemetry.hpp"
#include "tests/daemon/test_certificate.hpp"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using mailflow::config::Direction;

struct Reply {
  int status = 0;
  std::string content_type;
  std::string www_authenticate;
  std::string nosniff;  // X-Content-Type-Options
  std::string body;
};

std::string base64(std::string_view in) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8) |
                       static_cast<unsigned char>(in[i + 2]);
    for (int shift : {18, 12, 6, 0}) out += kAlphabet[(v >> shift) & 63];
  }
  if (i + 1 == in.size()) {
    const unsigned v = static_cast<unsigned char>(in[i]) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

Reply request(unsigned short port, const std::string& target, http::verb method = http::verb::get,
              const std::string& authorization = {}) {
  asio::io_context io;
  tcp::socket socket(io);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  http::request<http::string_body> req{method, target, 11};
  req.set(http::field::host, "127.0.0.1");
  if (!authorization.empty()) req.set(http::field::authorization, authorization);
  req.prepare_payload();
  http::write(socket, req);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(socket, buffer, res);
  Reply reply;
  reply.status = static_cast<int>(res.result_int());
  reply.content_type = std::string(res[http::field::content_type]);
  reply.www_authenticate = std::string(res[http::field::www_authenticate]);
  reply.nosniff = std::string(res["X-Content-Type-Options"]);
  reply.body = res.body();
  return reply;
}

// mailflow_http_rejects_total{reason} in the telemetry's /metrics text (-1 when absent); defined below.
double http_rejects(mailflow::Telemetry& telemetry, const std::string& reason);

// A running HttpServer on 127.0.0.1:<ephemeral> (it runs its own I/O thread).
struct Fixture {
  explicit Fixture(std::optional<mailflow::config::BasicAuth> auth = std::nullopt,
                   std::optional<mailflow::config::CertificatePair> tls = std::nullopt) {
    mailflow::config::Config config;
    mailflow::config::Listener in;
    in.name = "inbound";
    config.listeners.push_back(in);
    telemetry.configure(config);
    telemetry.message_delivered("internet", Direction::inbound, mailflow::proto::TlsVersion::tls10, 100, 1);

    mailflow::config::Http http;
    http.address = {"127.0.0.1", 0, "127.0.0.1:0"};
    http.basic_auth = std::move(auth);
    http.tls = std::move(tls);
    server = std::make_unique<mailflow::HttpServer>(http, telemetry, [this] { return ready.load(); });
    server->start();
  }
  ~Fixture() {
    server.reset();  // stop + join: the HTTP thread ends once the acceptor and every connection are closed
  }

  mailflow::Telemetry telemetry;
  std::atomic<bool> ready{false};
  std::unique_ptr<mailflow::HttpServer> server;
};

std::string make_hash(const char* password) {
  char salt[CRYPT_GENSALT_OUTPUT_SIZE];
  REQUIRE(crypt_gensalt_rn("$2b$", 4, nullptr, 0, salt, sizeof salt) != nullptr);
  crypt_data data{};
  const char* hash = crypt_rn(password, salt, &data, sizeof data);
  REQUIRE(hash != nullptr);
  return hash;
}

// A throw-away self-signed certificate for 127.0.0.1, written as PEM files into `dir`.
mailflow::config::CertificatePair make_certificate(const std::filesystem::path& dir) {
  const auto certificate = mailflow::test::make_test_certificate();
  mailflow::config::CertificatePair pair{(dir / "http.pem").string(), (dir / "http.key").string()};
  std::ofstream(pair.cert) << certificate.cert_pem;
  std::ofstream(pair.key) << certificate.key_pem;
  return pair;
}

}  // namespace

TEST_CASE("http: metrics, health, readiness") {
  Fixture f;
  REQUIRE(f.server->port() != 0);

  const auto metrics = request(f.server->port(), "/metrics");
  CHECK(metrics.status == 200);
  CHECK(metrics.content_type.rfind("text/plain; version=0.0.4", 0) == 0);
  CHECK(metrics.body.find(
            "mailflow_messages_total{connector=\"internet\",direction=\"inbound\",tls_version=\"TLS1.0\"} 1\n") !=
        std::string::npos);
  CHECK(metrics.body.find("process_start_time_seconds ") != std::string::npos);

  const auto health = request(f.server->port(), "/healthz");
  CHECK(health.status == 200);
  CHECK(health.body == "ok");

  CHECK(request(f.server->port(), "/readyz").status == 503);
  f.ready = true;
  CHECK(request(f.server->port(), "/readyz").status == 200);
}

TEST_CASE("http: report endpoints and the days parameter") {
  Fixture f;
  const auto port = f.server->port();
  const auto json = request(port, "/api/v1/report?days=3");
  CHECK(json.status == 200);
  CHECK(json.content_type == "application/json");
  CHECK(json.body.find("\"rows\"") != std::string::npos);

  const auto csv = request(port, "/api/v1/report.csv");
  CHECK(csv.status == 200);
  CHECK(csv.content_type.rfind("text/csv", 0) == 0);
  CHECK(csv.body.rfind("date,connector,direction,type,forced_tls,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,"
                       "tls13_pct",
                       0) == 0);

  CHECK(request(port, "/api/v1/report.txt?days=7").status == 200);
  const auto page = request(port, "/");
  CHECK(page.status == 200);
  CHECK(page.content_type.rfind("text/html", 0) == 0);

  for (const char* bad : {"/api/v1/report?days=abc", "/api/v1/report?days=0", "/api/v1/report?days=8",
                          "/api/v1/report?days=-1", "/api/v1/report?days=", "/api/v1/report?days=3x",
                          "/api/v1/report.csv?days=99999999999999999999", "/?days=1.5"}) {
    CAPTURE(bad);
    const auto reply = request(port, bad);
    CHECK(reply.status == 400);
    CHECK(reply.body.find("days must be an integer from 1 to 7") != std::string::npos);
  }
}

TEST_CASE("http: unknown path 404, non-GET 405") {
  Fixture f;
  CHECK(request(f.server->port(), "/nope").status == 404);
  CHECK(request(f.server->port(), "/metrics/extra").status == 404);
  CHECK(request(f.server->port(), "/metrics", http::verb::post).status == 405);
  CHECK(request(f.server->port(), "/healthz", http::verb::delete_).status == 405);
}

TEST_CASE("http: basic auth with a crypt(3) hash guards everything but /healthz and /readyz") {
  const std::string hash = make_hash("s3cret");
  Fixture f(mailflow::config::BasicAuth{"prom", hash});
  const auto port = f.server->port();

  const auto missing = request(port, "/metrics");
  CHECK(missing.status == 401);
  CHECK(missing.www_authenticate.rfind("Basic realm=", 0) == 0);
  CHECK(request(port, "/metrics", http::verb::get, "Basic " + base64("prom:wrong")).status == 401);
  CHECK(request(port, "/metrics", http::verb::get, "Basic " + base64("other:s3cret")).status == 401);
  CHECK(request(port, "/metrics", http::verb::get, "Basic !!notbase64").status == 401);
  CHECK(request(port, "/metrics", http::verb::get, "Bearer " + base64("prom:s3cret")).status == 401);
  CHECK(request(port, "/api/v1/report", http::verb::get).status == 401);
  CHECK(request(port, "/nope", http::verb::get).status == 401);

  CHECK(request(port, "/metrics", http::verb::get, "Basic " + base64("prom:s3cret")).status == 200);
  CHECK(request(port, "/metrics", http::verb::get, "basic " + base64("prom:s3cret")).status == 200);  // cached path
  CHECK(request(port, "/api/v1/report", http::verb::get, "Basic " + base64("prom:s3cret")).status == 200);
  CHECK(request(port, "/healthz").status == 200);
  CHECK(request(port, "/readyz").status == 503);  // not ready in this fixture, and no 401
}

TEST_CASE("http: start() on an address in use throws a clear error") {
  Fixture f;
  mailflow::Telemetry telemetry;
  mailflow::config::Http http;
  http.address = {"127.0.0.1", f.server->port(), "127.0.0.1:" + std::to_string(f.server->port())};
  mailflow::HttpServer second(http, telemetry, [] { return true; });
  try {
    second.start();
    FAIL("start() must throw");
  } catch (const std::system_error& e) {
    CHECK(std::string(e.what()).find("127.0.0.1:" + std::to_string(f.server->port())) != std::string::npos);
    CHECK(e.code() == std::errc::address_in_use);
  }
}

TEST_CASE("http: stop() closes idle keep-alive connections") {
  auto f = std::make_unique<Fixture>();
  asio::io_context io;
  tcp::socket socket(io);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), f->server->port()));
  http::request<http::string_body> req{http::verb::get, "/healthz", 11};
  req.set(http::field::host, "127.0.0.1");
  http::write(socket, req);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(socket, buffer, res);
  CHECK(res.keep_alive());

  const auto started = std::chrono::steady_clock::now();
  f.reset();  // stop + join: would hang for the idle timeout if the connection stayed open
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
  beast::error_code ec;
  char byte;
  socket.read_some(asio::buffer(&byte, 1), ec);
  CHECK(ec);  // EOF or reset
}

TEST_CASE("http: HTTPS when http.tls is configured") {
  const auto dir = std::filesystem::temp_directory_path() / ("mailflow-http-tls-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  Fixture f(std::nullopt, make_certificate(dir));

  asio::io_context io;
  asio::ssl::context context(asio::ssl::context::tls_client);
  context.set_verify_mode(asio::ssl::verify_none);
  beast::ssl_stream<tcp::socket> stream(io, context);
  stream.next_layer().connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), f.server->port()));
  stream.handshake(asio::ssl::stream_base::client);
  http::request<http::string_body> req{http::verb::get, "/metrics", 11};
  req.set(http::field::host, "127.0.0.1");
  req.keep_alive(false);
  http::write(stream, req);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(stream, buffer, res);
  CHECK(res.result_int() == 200);
  CHECK(res.body().find("mailflow_build_info{") != std::string::npos);

  // Plain HTTP to the TLS port (a scraper set to http, not https) gets a 400 that says so, and is counted and
  // logged as a bad request. A connection closed without a byte (a TCP port check) is none.
  const Reply plain = request(f.server->port(), "/healthz");
  CHECK(plain.status == 400);
  CHECK(plain.body.find("plain HTTP request sent to the HTTPS port") != std::string::npos);
  CHECK(plain.nosniff == "nosniff");  // docs/security.md: every HTTP answer says it
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (http_rejects(f.telemetry, "bad_request") < 1.0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(http_rejects(f.telemetry, "bad_request") == 1.0);
  {
    tcp::socket probe(io);
    probe.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), f.server->port()));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(http_rejects(f.telemetry, "bad_request") == 1.0);
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "http: update() applies new basic auth, prepare() refuses a bad certificate and the old settings stay") {
  Fixture f;
  const auto port = f.server->port();
  CHECK(request(port, "/metrics").status == 200);

  mailflow::config::Http http;
  http.address = {"127.0.0.1", port, ""};
  http.basic_auth = mailflow::config::BasicAuth{"prom", make_hash("new")};
  f.server->update(mailflow::HttpServer::prepare(http));
  CHECK(request(port, "/metrics").status == 401);
  CHECK(request(port, "/metrics", http::verb::get, "Basic " + base64("prom:new")).status == 200);

  auto broken = http;
  broken.basic_auth.reset();
  broken.tls = mailflow::config::CertificatePair{"/nonexistent/cert.pem", "/nonexistent/key.pem"};
  CHECK_THROWS_AS(mailflow::HttpServer::prepare(broken), std::system_error);
  CHECK(request(port, "/metrics").status == 401);  // still the previous settings
}

namespace {

// Everything the server sends on a fresh connection from `source` after `data`, until it closes (or 3 s).
std::string send_raw(unsigned short port, const std::string& data, const char* source = "127.0.0.1") {
  asio::io_context io;
  tcp::socket socket(io);
  socket.open(tcp::v4());
  socket.bind(tcp::endpoint(asio::ip::make_address(source), 0));
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  asio::write(socket, asio::buffer(data));
  std::string out;
  char chunk[4096];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  socket.non_blocking(true);
  while (std::chrono::steady_clock::now() < deadline) {
    beast::error_code ec;
    const auto n = socket.read_some(asio::buffer(chunk), ec);
    if (ec == asio::error::would_block) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    if (ec) break;
    out.append(chunk, n);
  }
  return out;
}

double http_rejects(mailflow::Telemetry& telemetry, const std::string& reason) {
  const std::string text = telemetry.metrics_text();
  const std::string key = "mailflow_http_rejects_total{reason=\"" + reason + "\"} ";
  const auto at = text.find(key);
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + key.size()));
}

}  // namespace

TEST_CASE("http: every reject reason is exported from the start, zeros included") {
  mailflow::Telemetry telemetry;
  for (const auto reason : mailflow::all_http_rejects) {
    CAPTURE(mailflow::to_string(reason));
    CHECK(http_rejects(telemetry, std::string(mailflow::to_string(reason))) == 0.0);
  }
}

TEST_CASE("http: a Transfer-Encoding that does not end in chunked is 400 (RFC 9112 6.3)") {
  Fixture f;
  const auto port = f.server->port();
  for (const char* encoding : {"gzip", "chunked, gzip", "identity"}) {
    CAPTURE(encoding);
    const auto reply = send_raw(port, std::string("GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ") +
                                          encoding + "\r\n\r\n0\r\n\r\n");
    CHECK(reply.rfind("HTTP/1.1 400 ", 0) == 0);
  }
  CHECK(http_rejects(f.telemetry, "bad_request") == 3.0);
  const auto chunked =
      send_raw(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
                     "0\r\n\r\n");
  CHECK(chunked.rfind("HTTP/1.1 200 ", 0) == 0);
}

TEST_CASE("http: connections over the per-address cap get a quick 503, other addresses are served") {
  Fixture f;
  const auto port = f.server->port();
  asio::io_context io;
  std::vector<tcp::socket> held;
  for (int i = 0; i < 16; ++i) {
    held.emplace_back(io);
    held.back().connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // all accepted
  const auto started = std::chrono::steady_clock::now();
  const auto refused = send_raw(port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1");
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(2));
  CHECK(refused.rfind("HTTP/1.1 503 ", 0) == 0);
  CHECK(refused.find("Connection: close\r\n") != std::string::npos);
  CHECK(refused.find("\r\nX-Content-Type-Options: nosniff\r\n") != std::string::npos);  // as every answer
  const auto other = send_raw(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "127.0.0.2");
  CHECK(other.rfind("HTTP/1.1 200 ", 0) == 0);
  CHECK(http_rejects(f.telemetry, "address_limit") == 1.0);

  held.pop_back();  // closing one frees its slot
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const auto again = send_raw(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "127.0.0.1");
  CHECK(again.rfind("HTTP/1.1 200 ", 0) == 0);
}

TEST_CASE("http: a request head must be complete within its deadline, trickling does not extend it") {
  Fixture f;
  asio::io_context io;
  tcp::socket socket(io);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), f.server->port()));
  asio::write(socket, asio::buffer(std::string_view("GET /healthz HTTP/1.1\r\nHost: x\r\n")));
  const auto started = std::chrono::steady_clock::now();
  beast::error_code ec;
  while (!ec && std::chrono::steady_clock::now() - started < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    asio::write(socket, asio::buffer(std::string_view("X")), ec);  // a header name that never ends
  }
  const auto closed_after = std::chrono::steady_clock::now() - started;
  CHECK(ec);
  CHECK(closed_after >= std::chrono::milliseconds(4500));
  CHECK(closed_after < std::chrono::seconds(7));
  CHECK(http_rejects(f.telemetry, "head_timeout") == 1.0);
}

TEST_CASE("http: the connector summary is the whole window, its servers too, and takes no days") {
  // A 30-day window with a server seen 20 days ago and one seen today: the summary (whole window) lists both.
  std::atomic<std::int64_t> offset_hours{-20 * 24};
  const auto now = std::chrono::system_clock::now();
  mailflow::Telemetry telemetry([&] { return now + std::chrono::hours(offset_hours.load()); });
  mailflow::config::Config config;
  mailflow::config::Listener in;
  in.name = "inbound";
  config.listeners.push_back(in);
  config.telemetry.window = std::chrono::hours(24 * 30);
  telemetry.configure(config);
  telemetry.message_delivered("internet", Direction::inbound, mailflow::proto::TlsVersion::tls10, 100, 1,
                              {.address = "192.0.2.1", .name = "old.example", .cipher = {}, .domains = {},
                               .policy = {}});
  offset_hours = 0;
  telemetry.message_delivered("internet", Direction::inbound, mailflow::proto::TlsVersion::tls13, 100, 1,
                              {.address = "192.0.2.2", .name = "new.example", .cipher = {}, .domains = {},
                               .policy = {}});
  mailflow::config::Http http;
  http.address = {"127.0.0.1", 0, "127.0.0.1:0"};
  mailflow::HttpServer server(http, telemetry, [] { return true; });
  server.start();

  const auto summary = request(server.port(), "/api/v1/connectors");
  CHECK(summary.status == 200);
  CHECK(summary.body.find("\"messages\": 2") != std::string::npos);
  CHECK(summary.body.find("\"address\": \"192.0.2.2\"") != std::string::npos);
  CHECK(summary.body.find("\"address\": \"192.0.2.1\"") != std::string::npos);  // 20 days ago, in the window
  // The report's drill-down is that of its days (default 7).
  const auto report = request(server.port(), "/api/v1/report");
  CHECK(report.status == 200);
  CHECK(report.body.find("\"address\": \"192.0.2.1\"") == std::string::npos);
  // days does not apply to the whole window (mailflowd report refuses --summary --days too).
  for (const char* target : {"/api/v1/connectors?days=3", "/api/v1/connectors.csv?days=3",
                             "/api/v1/connectors.txt?days=30"}) {
    CAPTURE(target);
    const auto reply = request(server.port(), target);
    CHECK(reply.status == 400);
    CHECK(reply.body.find("whole telemetry window") != std::string::npos);
  }
}
