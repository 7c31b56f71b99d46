#pragma once
// One side of the relay: a TCP connection that can turn into TLS half-way (STARTTLS).
//
// TLS runs OpenSSL over a custom BIO that reads and writes this object's own buffers (sans-I/O, like
// proto/): no asio::ssl::stream, whose four 17 KiB buffers per connection would dominate an idle session's
// memory. A session that waits for its next command waits for readability without a buffer (RelaySession::run),
// so it owns no read buffer at all; SSL_MODE_RELEASE_BUFFERS lets OpenSSL drop its record buffers in between too.
#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "daemon/read_buffer.hpp"
#include "proto/dane.hpp"
#include "daemon/tls.hpp"

namespace mailflow {

class Deadlines;

// Every operation that waits takes its absolute deadline, watched by the session's Deadlines (deadlines.hpp):
// past it, the operation ends with asio::error::timed_out.
class Link {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  Link(boost::asio::ip::tcp::socket socket, Deadlines& deadlines);
  ~Link();
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  boost::asio::ip::tcp::socket& socket() { return socket_; }
  const TlsInfo& tls() const { return tls_info_; }
  bool tls_active() const { return ssl_ != nullptr; }
  // Client side, after handshake(): the peer's certificate is valid for host name `name` (RFC 8461 4.2: a DNS
  // name of its subjectAltName, never the subject CN; a '*' only as the whole left-most label), whatever
  // reference names the handshake checked.
  bool certificate_matches(const std::string& name) const;
  // Client side, after handshake(): the MTA-STS verdict on the peer's chain (ClientTls::webpki_verdict);
  // tls().verify_error without TLS (or without a ClientTls).
  long webpki_verdict(const ClientTls* tls) const;
  // Server side, after handshake(): the highest version the client offered (offered_tls_version()), also when
  // the handshake failed; "no_hello" before any handshake.
  std::string_view offered_tls() const;

  // Appends at most `max` bytes of application data to `buffer`. Errors: asio::error::eof on a clean close,
  // an SSL-category code (the OpenSSL error) on a TLS failure, operation_aborted after cancel().
  boost::asio::awaitable<std::size_t> read_some(ReadBuffer& buffer, std::size_t max, TimePoint deadline,
                                                boost::system::error_code& ec);
  // What is there already, without waiting (plaintext only): appends at most `max` bytes to `buffer` and returns how
  // many; 0 with ec = would_block when there is nothing (or with TLS): await read_some() then. Right after a
  // readiness wait the bytes are there, and then the read needs no coroutine frame or Asio operation (issue #16).
  std::size_t read_now(ReadBuffer& buffer, std::size_t max, boost::system::error_code& ec);
  // TLS input received and not yet read (in OpenSSL or the cipher buffer): a readiness wait would not see it.
  bool buffered() const;
  // A connection kept between transactions: true while the peer has neither closed it nor sent anything
  // unasked (one non-blocking peek, no wait). False: it is gone or said goodbye (an idle timeout's 421).
  bool quiet();
  // Between commands: gives back the TLS buffers' storage that holds nothing (an idle session keeps none).
  void release_idle_buffers();
  boost::asio::awaitable<void> write(std::string_view data, TimePoint deadline, boost::system::error_code& ec);
  // What the socket takes at once, without waiting: the bytes sent (plaintext only; with TLS nothing is sent and
  // 0 returned). The caller awaits write() for the rest, if any. A reply, a command or a DATA block nearly always
  // fits the send buffer, and then no coroutine frame is made for the write (issue #16: allocations per message).
  std::size_t write_now(std::string_view data, boost::system::error_code& ec);

  // Upstream side: connects the (not yet open) socket to `endpoint`; cancel() aborts it.
  boost::asio::awaitable<void> connect(const boost::asio::ip::tcp::endpoint& endpoint, TimePoint deadline,
                                       boost::system::error_code& ec);

  // An orderly end of TLS: sends close_notify (RFC 8446 6.1) without waiting for the peer's, so a strict peer
  // sees no truncation and the session stays resumable. No-op without TLS.
  boost::asio::awaitable<void> shutdown_tls(TimePoint deadline, boost::system::error_code& ec);

  // The client side of STARTTLS: whom the certificate is checked against, and how.
  struct Peer {
    std::string name;   // SNI (unless an IP address), and the reference name of the checks below
    bool verify = false;  // the certificate must chain to the context's CA file and match `name` (or verify_names)
    // Any of these instead of `name` ("*.example.com": any name one label below example.com).
    std::vector<std::string> verify_names;
    // Without `verify`: `name` is still the reference name, so that the recorded verdict (TlsInfo::verify_error)
    // covers it (MTA-STS asks for it without failing the handshake).
    bool record_name = false;
    // The certificate must match one of these usable TLSA records (RFC 7672: DANE-EE without name checks,
    // DANE-TA with `name`, the TLSA base domain); the context needs SSL_CTX_dane_enable.
    const std::vector<proto::TlsaRecord>* dane = nullptr;
    // With `dane`: names a DANE-TA certificate may carry instead of `name` (RFC 7672 3.2.2: the MX host name and
    // its CNAME expansion are both reference identifiers); entries equal to `name` are ignored.
    const std::vector<std::string>* dane_names = nullptr;
  };
  // STARTTLS: the server side (`peer` null) or the client side.
  boost::asio::awaitable<void> handshake(SSL_CTX* context, const Peer* peer, TimePoint deadline,
                                         boost::system::error_code& ec);

  void cancel();
  void close();

 private:
  friend struct LinkBio;
  boost::asio::awaitable<void> fill_cipher(boost::system::error_code& ec);
  boost::asio::awaitable<void> send_all(std::string_view data, boost::system::error_code& ec);
  std::size_t send_now(std::string_view data, boost::system::error_code& ec);
  boost::asio::awaitable<void> flush_cipher(boost::system::error_code& ec);
  boost::system::error_code tls_error(int result);

  boost::asio::ip::tcp::socket socket_;
  Deadlines& deadlines_;
  SSL* ssl_ = nullptr;
  ReadBuffer cipher_in_;    // received TLS records not yet consumed by OpenSSL
  std::string cipher_out_;  // TLS records OpenSSL produced, not yet sent
  TlsInfo tls_info_;
};

// "192.0.2.1" or "2001:db8::1" (an IPv4-mapped IPv6 address as IPv4).
std::string address_text(const boost::asio::ip::address& address);
// "192.0.2.1:25" or "[2001:db8::1]:25".
std::string endpoint_text(const boost::asio::ip::address& address, std::uint16_t port);
// Why a handshake failed, as a reason of mailflow_tls_handshake_failures_total (tls.hpp handshake_failure_reason).
std::string handshake_failure_label(const boost::system::error_code& ec);

}  // namespace mailflow
