#pragma once
// One HTTPS request of mailflowd's own (the MTA-STS policy fetch, the TLS-RPT report POST): connect to the
// given addresses in turn, TLS1.2+ handshake with the certificate verified against a CA file for the
// request's host (SNI sent; an IP literal is checked as an IP address), write the request, read the final
// answer (1xx interim answers passed over) with its head and body bounded, shut down; every step within one
// deadline. No redirects are followed: a 3xx is an answer like any other. Failures are values (a step and a
// kind) that each caller words in its own vocabulary (RFC 8460 result types, TLS-RPT delivery results). Beast
// and OpenSSL stay in https_client.cpp.
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/address.hpp>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mailflow {

// Ends a request in flight from outside, on the request's executor (a stop of the daemon): the step under way
// fails at once (operation_aborted) and no further step is taken; a request given one already aborted fails
// before it connects.
struct HttpsAbort {
  void abort() {
    aborted = true;
    if (cancel) cancel();
  }
  bool aborted = false;
  std::function<void()> cancel;  // set by https_request while its connection is in use
};

struct HttpsRequest {
  std::string method = "GET";  // "GET" or "POST"
  std::string host;            // the name the certificate must be valid for, sent as SNI; or an IP literal
  std::string authority;       // the Host: header; empty: host
  std::string target = "/";
  std::vector<std::pair<std::string, std::string>> headers;  // after Host, User-Agent and Connection: close
  std::string body;
  std::string ca_file;  // PEM CA file; empty: the system trust store
  // Where to connect, tried in order (the next one only when a connect fails): `addresses` on `port`; none
  // given: `connect_host` (empty: host) and `port` looked up with the system's resolver (getaddrinfo).
  std::vector<boost::asio::ip::address> addresses;
  std::string connect_host;
  std::string port = "443";
  std::shared_ptr<HttpsAbort> abort;  // optional: lets the caller end the request where it is
  // The final answer's status line and headers are all the caller needs (a report's POST): its body is not
  // read, so a peer that stalls after its status does not hold the request until the deadline.
  bool head_only = false;
};

// Loads `ca_file` as https_request does (empty: the system trust store): "" when it loads, else why not. The
// start, a reload and --check-config refuse a CA file that every request would then fail on.
std::string ca_file_problem(const std::string& ca_file);

struct HttpsLimits {
  std::chrono::steady_clock::time_point deadline;  // for every step together
  std::size_t max_header_bytes = 16 * 1024;
  std::size_t max_body_bytes = 64 * 1024;
};

struct HttpsResponse {
  // Where the request stopped (done: a complete answer was read).
  enum class Step { ca_file, resolve, connect, handshake, write, read, done };
  enum class Error {
    none,
    failed,               // `error` says why
    timed_out,            // the deadline ended the step
    certificate_invalid,  // the handshake failed because the certificate did not verify; `error`: OpenSSL's
                          // why
    body_too_large,       // the head was read (status is set), the body is over max_body_bytes
  };
  Step step = Step::done;
  Error error = Error::none;
  std::string error_text;  // the library's words for the failure ("Connection refused", ...)
  // The failure is this host's own, none of the peer's: the CA file could not be loaded, or the socket could
  // not be made or connected for want of descriptors, memory or ephemeral ports (local_shortage.hpp).
  bool local = false;
  std::string address;     // the address of the last connection attempt ("" before any)
  bool head = false;       // the answer's status line and headers were read (also when its body then failed)
  unsigned status = 0;     // with head
  std::string content_type;
  std::string body;

  bool ok() const { return error == Error::none; }
};

boost::asio::awaitable<HttpsResponse> https_request(boost::asio::any_io_executor executor,
                                                    HttpsRequest request, HttpsLimits limits);

}  // namespace mailflow
