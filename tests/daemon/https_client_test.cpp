// The HTTPS client of the MTA-STS fetch and the TLS-RPT POST against a real TLS server on loopback (a
// throw-away certificate for IP 127.0.0.1, which is also the CA file): the answer and the request as sent,
// and each failure as the typed step/error the callers word for themselves - a body over the limit, a
// certificate for another name or from another CA, a server that never answers (the deadline), refused
// addresses.
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include "daemon/https_client.hpp"

#include <doctest/doctest.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "tests/daemon/test_certificate.hpp"

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using mailflow::HttpsLimits;
using mailflow::HttpsRequest;
using mailflow::HttpsResponse;
using Step = HttpsResponse::Step;
using Error = HttpsResponse::Error;

// What the server does with its one connection (answer_then_silent: the answer, then nothing, held open).
enum class Peer { answer, silent_tcp, silent_tls, answer_then_silent };

std::string write_file(const std::string& name, const std::string& text) {
  const auto path =
      std::filesystem::temp_directory_path() / ("mailflow-https-" + std::to_string(::getpid()) + "-" + name);
  std::ofstream(path) << text;
  return path.string();
}

const mailflow::test::TestCertificate& certificate() {
  static const auto made = mailflow::test::make_test_certificate();
  return made;
}

struct Server {
  asio::io_context& io;
  asio::ssl::context tls{asio::ssl::context::tls_server};
  tcp::acceptor acceptor{io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)};
  std::string request;  // what arrived: head and body

  explicit Server(asio::io_context& context) : io(context) {
    tls.use_certificate_chain(asio::buffer(certificate().cert_pem));
    tls.use_private_key(asio::buffer(certificate().key_pem), asio::ssl::context::pem);
  }
  std::string port() const { return std::to_string(acceptor.local_endpoint().port()); }

  asio::awaitable<void> serve(Peer peer, std::string answer) {
    boost::system::error_code ec;
    auto socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    asio::steady_timer hold(io, std::chrono::seconds(30));  // until the test stops the io_context
    if (peer == Peer::silent_tcp) {                         // holds the connection, never a byte of TLS
      co_await hold.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      co_return;
    }
    asio::ssl::stream<tcp::socket> stream(std::move(socket), tls);
    co_await stream.async_handshake(asio::ssl::stream_base::server,
                                    asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    const auto head = co_await asio::async_read_until(stream, asio::dynamic_buffer(request), "\r\n\r\n",
                                                      asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    const auto length_at = request.find("Content-Length: ");
    if (length_at != std::string::npos) {
      const std::size_t length = std::stoul(request.substr(length_at + 16));
      if (request.size() < head + length)
        co_await asio::async_read(stream, asio::dynamic_buffer(request),
                                  asio::transfer_exactly(head + length - request.size()),
                                  asio::redirect_error(asio::use_awaitable, ec));
    }
    if (peer == Peer::silent_tls) {  // took the request, never answers
      co_await hold.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      co_return;
    }
    co_await asio::async_write(stream, asio::buffer(answer), asio::redirect_error(asio::use_awaitable, ec));
    if (peer == Peer::answer_then_silent) {
      co_await hold.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      co_return;
    }
    co_await stream.async_shutdown(asio::redirect_error(asio::use_awaitable, ec));
  }
};

struct Outcome {
  HttpsResponse response;
  std::chrono::steady_clock::duration took{};
};

// One request against a server doing `peer`; `limits.deadline` is set from `timeout`; `abort_after`: the
// request's abort() that long after its start.
Outcome exchange(HttpsRequest request, Peer peer, std::string answer = {}, HttpsLimits limits = {},
                 std::chrono::milliseconds timeout = std::chrono::seconds(5), std::string* seen = nullptr,
                 std::chrono::milliseconds abort_after = {}) {
  asio::io_context io;
  asio::steady_timer abort_timer(io, abort_after);
  if (abort_after.count() > 0) abort_timer.async_wait([abort = request.abort](auto) { abort->abort(); });
  Server server(io);
  if (request.ca_file.empty()) request.ca_file = write_file("ca.pem", certificate().cert_pem);
  if (request.port.empty() || request.port == "443") request.port = server.port();
  asio::co_spawn(io, server.serve(peer, std::move(answer)), asio::detached);
  Outcome out;
  const auto started = std::chrono::steady_clock::now();
  limits.deadline = started + timeout;
  std::exception_ptr failure;
  asio::co_spawn(io, mailflow::https_request(io.get_executor(), std::move(request), limits),
                 [&](std::exception_ptr e, HttpsResponse response) {
                   failure = e;
                   out.response = std::move(response);
                   out.took = std::chrono::steady_clock::now() - started;
                   io.stop();
                 });
  io.run();
  if (failure) std::rethrow_exception(failure);
  if (seen != nullptr) *seen = server.request;
  return out;
}

HttpsRequest to_loopback(std::string host = "127.0.0.1") {
  HttpsRequest request;
  request.host = std::move(host);
  request.addresses = {asio::ip::make_address("127.0.0.1")};
  return request;
}

constexpr std::string_view kOk =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";

}  // namespace

TEST_CASE("https_request: the answer's status, Content-Type and body, and the request as it was sent") {
  auto request = to_loopback();
  request.method = "POST";
  request.authority = "reports.example.net:8443";
  request.target = "/v1/tlsrpt";
  request.headers = {{"Content-Type", "application/tlsrpt+gzip"}, {"Content-Length", "4"}};
  request.body = "gzip";
  std::string seen;
  const auto [response, took] =
      exchange(request, Peer::answer, std::string(kOk), {}, std::chrono::seconds(5), &seen);
  CHECK(response.ok());
  CHECK(response.step == Step::done);
  CHECK(response.head);
  CHECK(response.status == 200);
  CHECK(response.content_type == "text/plain");
  CHECK(response.body == "hello");
  CHECK(response.address == "127.0.0.1");
  CHECK(seen.starts_with("POST /v1/tlsrpt HTTP/1.1\r\n"));
  CHECK(seen.find("Host: reports.example.net:8443\r\n") != std::string::npos);
  CHECK(seen.find("User-Agent: mailflowd\r\n") != std::string::npos);
  CHECK(seen.find("Connection: close\r\n") != std::string::npos);
  CHECK(seen.find("Content-Type: application/tlsrpt+gzip\r\n") != std::string::npos);
  CHECK(seen.ends_with("\r\n\r\ngzip"));
}

TEST_CASE("https_request: abort() ends the step in flight at once, and no further step is taken") {
  // In the handshake (a peer that never speaks TLS), waiting for the answer (one that took the request).
  for (const auto& [peer, step] :
       {std::pair{Peer::silent_tcp, Step::handshake}, std::pair{Peer::silent_tls, Step::read}}) {
    auto request = to_loopback();
    request.abort = std::make_shared<mailflow::HttpsAbort>();
    const auto abort = request.abort;
    const auto [response, took] =
        exchange(request, peer, {}, {}, std::chrono::seconds(5), nullptr, std::chrono::milliseconds(200));
    CHECK(response.error == Error::failed);
    CHECK(response.step == step);
    CHECK(took < std::chrono::seconds(2));  // not the deadline's 5 s
    CHECK(!abort->cancel);                  // no longer points into the finished request
  }
  // Aborted before it began: no connection at all.
  auto request = to_loopback();
  request.abort = std::make_shared<mailflow::HttpsAbort>();
  request.abort->abort();
  const auto [response, took] = exchange(request, Peer::answer, std::string(kOk));
  CHECK(response.step == Step::connect);
  CHECK(!response.head);
}

TEST_CASE("https_request: a redirect is an answer like any other, never followed") {
  const auto [response, took] =
      exchange(to_loopback(), Peer::answer,
               "HTTP/1.1 301 Moved\r\nLocation: https://elsewhere.example/\r\nContent-Length: 0\r\n\r\n");
  CHECK(response.ok());
  CHECK(response.status == 301);
}

TEST_CASE("https_request: a body over max_body_bytes is body_too_large, with the head read") {
  HttpsLimits limits;
  limits.max_body_bytes = 4;
  const auto [response, took] = exchange(to_loopback(), Peer::answer, std::string(kOk), limits);
  CHECK(response.error == Error::body_too_large);
  CHECK(response.step == Step::read);
  CHECK(response.head);
  CHECK(response.status == 200);
  CHECK(response.body.empty());
}

TEST_CASE("https_request: a chunked body is limited as sent, a trailer section that never ends included") {
  // Beast buffers a trailer section (or a chunk extension) until it is whole: a policy host could send one
  // without end, and the daemon kept every byte that came before the deadline.
  std::string answer =
      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n";
  for (int i = 0; i < 200000; ++i) answer += "X-Trailer: y\r\n";  // 2.8 MB, and no end
  const auto [response, took] = exchange(to_loopback(), Peer::answer, answer);
  CHECK(response.error == Error::body_too_large);
  CHECK(response.step == Step::read);
  CHECK(took < std::chrono::seconds(2));
}

TEST_CASE("https_request: a certificate for another name or from another CA is certificate_invalid") {
  SUBCASE("a name the certificate does not carry (SNI sent, looked up with the system resolver)") {
    HttpsRequest request;
    request.host = "mta-sts.example.net";
    request.connect_host = "127.0.0.1";
    const auto [response, took] = exchange(request, Peer::answer, std::string(kOk));
    CHECK(response.error == Error::certificate_invalid);
    CHECK(response.step == Step::handshake);
    CHECK(response.error_text == "hostname mismatch");
    CHECK_FALSE(response.head);
  }
  SUBCASE("an IP address the certificate does not carry") {
    const auto [response, took] = exchange(to_loopback("127.0.0.9"), Peer::answer, std::string(kOk));
    CHECK(response.error == Error::certificate_invalid);
    CHECK(response.error_text == "IP address mismatch");
  }
  SUBCASE("the right name from a CA that is not trusted") {
    auto request = to_loopback();
    request.ca_file = write_file("other-ca.pem", mailflow::test::make_test_certificate().cert_pem);
    const auto [response, took] = exchange(request, Peer::answer, std::string(kOk));
    CHECK(response.error == Error::certificate_invalid);
    CHECK(response.step == Step::handshake);
  }
  SUBCASE("a CA file that cannot be read") {
    auto request = to_loopback();
    request.ca_file = "/nonexistent/ca.pem";
    const auto [response, took] = exchange(request, Peer::answer, std::string(kOk));
    CHECK(response.error == Error::failed);
    CHECK(response.step == Step::ca_file);
  }
}

TEST_CASE("https_request: a server that never answers is timed_out at its step, when the deadline ends") {
  using std::chrono::milliseconds;
  SUBCASE("connected, but no TLS handshake") {
    const auto [response, took] = exchange(to_loopback(), Peer::silent_tcp, {}, {}, milliseconds(300));
    CHECK(response.error == Error::timed_out);
    CHECK(response.step == Step::handshake);
    CHECK(took >= milliseconds(300));
    CHECK(took < milliseconds(2000));
  }
  SUBCASE("took the request, no answer") {
    const auto [response, took] = exchange(to_loopback(), Peer::silent_tls, {}, {}, milliseconds(300));
    CHECK(response.error == Error::timed_out);
    CHECK(response.step == Step::read);
    CHECK_FALSE(response.head);
    CHECK(took >= milliseconds(300));
    CHECK(took < milliseconds(2000));
  }
}

TEST_CASE(
    "https_request: addresses are tried in order, a refused one is skipped, all refused is a connect "
    "failure") {
  // The server listens on 127.0.0.1 only: the same port on 127.0.0.2 refuses.
  auto request = to_loopback();
  request.addresses = {asio::ip::make_address("127.0.0.2"), asio::ip::make_address("127.0.0.1")};
  const auto [response, took] = exchange(request, Peer::answer, std::string(kOk));
  CHECK(response.ok());
  CHECK(response.address == "127.0.0.1");

  request.addresses = {asio::ip::make_address("127.0.0.3"), asio::ip::make_address("127.0.0.2")};
  const auto [refused, took2] = exchange(request, Peer::answer, std::string(kOk));
  CHECK(refused.error == Error::failed);
  CHECK(refused.step == Step::connect);
  CHECK(refused.error_text == "Connection refused");
  CHECK(refused.address == "127.0.0.2");
}

TEST_CASE("https_request: head_only answers at the final head, a body that never comes does not hold it") {
  // 201 announcing a body of 100 octets, then nothing: read to its end, the request waits for the deadline.
  const std::string head = "HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n";
  const auto [stalled, took] =
      exchange(to_loopback(), Peer::answer_then_silent, head, {}, std::chrono::milliseconds(500));
  CHECK(stalled.error == Error::timed_out);
  CHECK(stalled.head);
  CHECK(took >= std::chrono::milliseconds(500));

  auto request = to_loopback();
  request.head_only = true;
  const auto [response, took2] = exchange(
      request, Peer::answer_then_silent, "HTTP/1.1 100 Continue\r\n\r\n" + head, {}, std::chrono::seconds(5));
  CHECK(response.ok());
  CHECK(response.head);
  CHECK(response.status == 201);  // the final answer's, not the interim one's
  CHECK(response.body.empty());
  CHECK(took2 < std::chrono::seconds(2));
}
