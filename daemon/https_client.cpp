// One HTTPS request; see https_client.hpp.
#include "daemon/https_client.hpp"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <charconv>
#include <cstdint>
#include <memory>
#include <optional>

#include "daemon/local_shortage.hpp"

namespace mailflow {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using Step = HttpsResponse::Step;
using Error = HttpsResponse::Error;

namespace {

// The one way a request's trust store is loaded (also ca_file_problem).
void load_trust_store(net::ssl::context& context, const std::string& ca_file, beast::error_code& ec) {
  if (ca_file.empty())
    context.set_default_verify_paths(ec);
  else
    context.load_verify_file(ca_file, ec);
}

HttpsResponse failed(Step step, Error error, std::string text = {}) {
  HttpsResponse out;
  out.step = step;
  out.error = error;
  out.error_text = std::move(text);
  return out;
}

}  // namespace

std::string ca_file_problem(const std::string& ca_file) {
  net::ssl::context context(net::ssl::context::tls_client);
  beast::error_code ec;
  load_trust_store(context, ca_file, ec);
  if (!ec) return {};
  return "cannot load " + (ca_file.empty() ? std::string("the system trust store") : ca_file) + ": " +
         ec.message();
}

net::awaitable<HttpsResponse> https_request(net::any_io_executor executor, HttpsRequest request,
                                            HttpsLimits limits) {
  const auto remaining = [&] {
    return std::max(std::chrono::steady_clock::duration::zero(),
                    limits.deadline - std::chrono::steady_clock::now());
  };
  // A failed step: timed out when the deadline ended it, else in the library's words.
  const auto step_failed = [](Step step, const beast::error_code& ec) {
    auto out = failed(step, ec == beast::error::timeout ? Error::timed_out : Error::failed, ec.message());
    out.local = local_shortage(ec);
    return out;
  };

  net::ssl::context context(net::ssl::context::tls_client);
  beast::error_code ec;
  context.set_verify_mode(net::ssl::verify_peer);
  load_trust_store(context, request.ca_file, ec);
  if (ec) {
    // A file that could not be opened or read: OpenSSL queues the system's errno ("asio.ssl error"
    // otherwise).
    const auto code = static_cast<unsigned long>(ec.value());
    if (ec.category() == net::error::get_ssl_category() && ERR_GET_LIB(code) == ERR_LIB_SYS)
      ec = beast::error_code(ERR_GET_REASON(code), boost::system::system_category());
    // The relay's own file (out of descriptors, or changed since it was checked at the start): none of the
    // peer's.
    auto out = failed(Step::ca_file, Error::failed, ec.message());
    out.local = true;
    co_return out;
  }
  SSL_CTX_set_min_proto_version(context.native_handle(), TLS1_2_VERSION);

  beast::ssl_stream<beast::tcp_stream> stream(executor, context);
  // HttpsAbort::abort() closes the connection, which ends the step in flight; each step checks it first too
  // (one that completed just before it was still to be resumed, and its next step would have waited until the
  // deadline). Closed, not cancelled: a cancel that came between two reads or writes of a composed operation
  // (the TLS handshake's ClientHello written, its read not yet begun) cancelled nothing, and the handshake
  // waited for https_timeout (the drain gave up on it after 5 s; 1 run in 6).
  const std::shared_ptr<HttpsAbort> abort = request.abort;
  const auto aborted = [&abort] { return abort && abort->aborted; };
  struct Unregister {
    HttpsAbort* abort;
    ~Unregister() {
      if (abort) abort->cancel = nullptr;
    }
  } unregister{abort.get()};
  if (abort) abort->cancel = [&stream] { beast::get_lowest_layer(stream).close(); };
  beast::error_code not_ip;
  net::ip::make_address(request.host, not_ip);
  if (!not_ip) {  // an IP literal: no SNI (RFC 6066 3), the certificate must name the address
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(stream.native_handle()), request.host.c_str());
  } else {
    SSL_set_tlsext_host_name(stream.native_handle(), request.host.c_str());
    SSL_set1_host(stream.native_handle(), request.host.c_str());  // checked by OpenSSL during the handshake
    // Only the DNS names of the subjectAltName count (RFC 8461 3.3, RFC 6125 DNS-IDs), a '*' only as the
    // whole left-most label: OpenSSL would otherwise take a subject CN where there is no DNS name
    // ("mta-sts.<domain>" alone in the CN) and a partial wildcard ("mta-*.example.net").
    SSL_set_hostflags(stream.native_handle(),
                      X509_CHECK_FLAG_NEVER_CHECK_SUBJECT | X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  }

  std::vector<tcp::endpoint> endpoints;
  if (!request.addresses.empty()) {
    unsigned short port = 0;
    const auto* end = request.port.data() + request.port.size();
    const auto [ptr, error] = std::from_chars(request.port.data(), end, port);
    if (error != std::errc() || ptr != end || port == 0)
      co_return failed(Step::resolve, Error::failed, "bad port \"" + request.port + "\"");
    for (const auto& address : request.addresses) endpoints.emplace_back(address, port);
  } else {
    // The name lookup has no timeout of its own in Asio (getaddrinfo); a timer cancelling the resolver bounds
    // it. The timer's handler may run after this frame is gone (it expired just as the lookup completed, and the
    // lookup failed): it holds what it touches.
    struct Lookup {
      explicit Lookup(const net::any_io_executor& executor) : resolver(executor) {}
      tcp::resolver resolver;
      bool expired = false;
    };
    const auto lookup = std::make_shared<Lookup>(executor);
    net::steady_timer guard(executor, remaining());
    guard.async_wait([lookup](const beast::error_code& e) {
      if (e) return;
      lookup->expired = true;
      lookup->resolver.cancel();
    });
    const auto results = co_await lookup->resolver.async_resolve(
        request.connect_host.empty() ? request.host : request.connect_host, request.port,
        net::redirect_error(net::use_awaitable, ec));
    guard.cancel();
    if (ec) {
      if (lookup->expired) co_return failed(Step::resolve, Error::timed_out, ec.message());
      co_return step_failed(Step::resolve, ec);
    }
    for (const auto& entry : results) endpoints.push_back(entry.endpoint());
  }

  // In turn until one connects; the response names the address tried last. The socket is opened here, not by
  // a range connect: Asio's reports a socket it could not open (EMFILE) as operation_aborted, which would
  // hide the relay's own shortage behind what looks like the peer's failure. Past the deadline no next
  // address is tried.
  std::string address;
  auto& connection = beast::get_lowest_layer(stream);
  ec = net::error::not_found;  // no address at all, as a range connect says it
  for (const auto& endpoint : endpoints) {
    if (aborted()) {
      ec = net::error::operation_aborted;
      break;
    }
    address = endpoint.address().to_string();
    beast::error_code ignored;
    connection.socket().close(ignored);
    connection.socket().open(endpoint.protocol(), ec);
    if (ec && local_shortage(ec)) break;  // none for the next address either
    if (ec) continue;                     // this family not supported here (an IPv6 address without IPv6)
    connection.expires_after(remaining());
    co_await connection.async_connect(endpoint, net::redirect_error(net::use_awaitable, ec));
    if (!ec || ec == beast::error::timeout) break;
  }
  const auto with_address = [&address](HttpsResponse out) {
    out.address = address;
    return out;
  };
  if (ec) co_return with_address(step_failed(Step::connect, ec));
  const auto abort_error = [&](Step step) {
    return with_address(step_failed(step, net::error::operation_aborted));
  };

  if (aborted()) co_return abort_error(Step::handshake);

  beast::get_lowest_layer(stream).expires_after(remaining());
  co_await stream.async_handshake(net::ssl::stream_base::client, net::redirect_error(net::use_awaitable, ec));
  if (ec) {
    const long verify = SSL_get_verify_result(stream.native_handle());
    if (ec != beast::error::timeout && verify != X509_V_OK)
      co_return with_address(
          failed(Step::handshake, Error::certificate_invalid, X509_verify_cert_error_string(verify)));
    co_return with_address(step_failed(Step::handshake, ec));
  }

  http::request<http::string_body> message{http::string_to_verb(request.method), request.target, 11};
  message.set(http::field::host, request.authority.empty() ? request.host : request.authority);
  message.set(http::field::user_agent, "mailflowd");
  message.set(http::field::connection, "close");
  for (const auto& [name, value] : request.headers) message.set(name, value);
  message.body() = std::move(request.body);
  if (aborted()) co_return abort_error(Step::write);
  beast::get_lowest_layer(stream).expires_after(remaining());
  co_await http::async_write(stream, message, net::redirect_error(net::use_awaitable, ec));
  if (ec) co_return with_address(step_failed(Step::write, ec));

  // Bounded: Beast keeps a chunk extension or a trailer section here until it is whole (the body limit does
  // not count them), and a read into a full buffer fails with buffer_overflow instead of growing it.
  beast::flat_buffer buffer(limits.max_header_bytes + limits.max_body_bytes);
  std::optional<http::response_parser<http::string_body>> parser;
  if (aborted()) co_return abort_error(Step::read);
  beast::get_lowest_layer(stream).expires_after(remaining());
  // The head first: Beast 1.74's async_read parses eagerly, and a Content-Length over the body limit that
  // arrives in one read with the head then passes unchecked (the check's error is overwritten). An interim
  // answer (1xx: 100 Continue, 103 Early Hints), asked for or not, is not the answer: the final one follows
  // (RFC 9110 15.2; 101 would switch protocols, which is never asked for, so it is final here).
  for (;;) {
    parser.emplace();
    parser->header_limit(static_cast<std::uint32_t>(limits.max_header_bytes));
    parser->body_limit(limits.max_body_bytes);
    co_await http::async_read_header(stream, buffer, *parser, net::redirect_error(net::use_awaitable, ec));
    const unsigned status = parser->get().result_int();
    if (ec || status / 100 != 1 || status == 101) break;
  }
  if (!ec && !request.head_only)
    co_await http::async_read(stream, buffer, *parser, net::redirect_error(net::use_awaitable, ec));
  // A peer that closes without close_notify after a complete answer has said all it had to say.
  if (ec == net::ssl::error::stream_truncated && parser->is_done()) ec = {};
  HttpsResponse out;
  if (ec) {
    out = step_failed(Step::read, ec);
    if (ec == http::error::body_limit || ec == http::error::buffer_overflow)
      out.error = Error::body_too_large;
  }
  out.address = address;
  if (parser->is_header_done()) {
    const auto& response = parser->get();
    out.head = true;
    out.status = response.result_int();
    out.content_type = std::string(response[http::field::content_type]);
    if (!ec) out.body = std::move(parser->get().body());
    beast::error_code ignored;
    beast::get_lowest_layer(stream).socket().shutdown(tcp::socket::shutdown_both, ignored);
  }
  co_return out;
}

}  // namespace mailflow
