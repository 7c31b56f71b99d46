#include "daemon/link.hpp"

#include "daemon/deadlines.hpp"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <boost/asio/error.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <climits>
#include <cstring>

namespace mailflow {

namespace asio = boost::asio;
using boost::system::error_code;

namespace {

auto with(error_code& ec) { return asio::redirect_error(asio::use_awaitable, ec); }

constexpr std::size_t flush_threshold = 64 * 1024;
constexpr std::size_t keep_capacity = 4096;         // larger buffers are released once empty
constexpr std::size_t max_record_read = 17 * 1024;  // one TLS record and its header

void release_if_large(std::string& buffer) {
  if (buffer.empty() && buffer.capacity() > keep_capacity) std::string().swap(buffer);
}

void release_if_large(ReadBuffer& buffer) {
  if (buffer.capacity() > keep_capacity) buffer.release_if_empty();
}

}  // namespace

// The BIO between OpenSSL and the Link's buffers.
struct LinkBio {
  static Link* link(BIO* bio) { return static_cast<Link*>(BIO_get_data(bio)); }

  static int write(BIO* bio, const char* data, int length) {
    BIO_clear_retry_flags(bio);
    link(bio)->cipher_out_.append(data, static_cast<std::size_t>(length));
    return length;
  }

  static int read(BIO* bio, char* out, int length) {
    BIO_clear_retry_flags(bio);
    ReadBuffer& in = link(bio)->cipher_in_;
    if (in.empty()) {
      BIO_set_retry_read(bio);
      return -1;
    }
    const std::size_t n = std::min<std::size_t>(in.size(), static_cast<std::size_t>(length));
    std::memcpy(out, in.view().data(), n);
    in.consume(n);
    release_if_large(in);
    return static_cast<int>(n);
  }

  static long ctrl(BIO*, int command, long, void*) { return command == BIO_CTRL_FLUSH ? 1 : 0; }

  static int create(BIO* bio) {
    BIO_set_init(bio, 1);
    return 1;
  }

  static BIO_METHOD* method() {
    static BIO_METHOD* const instance = [] {
      BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "mailflowd-link");
      BIO_meth_set_write(m, &LinkBio::write);
      BIO_meth_set_read(m, &LinkBio::read);
      BIO_meth_set_ctrl(m, &LinkBio::ctrl);
      BIO_meth_set_create(m, &LinkBio::create);
      return m;
    }();
    return instance;
  }
};

Link::Link(asio::ip::tcp::socket socket, Deadlines& deadlines) : socket_(std::move(socket)), deadlines_(deadlines) {
  // Reads after a readiness wait must never block a thread of the pool, even on a spurious wakeup.
  error_code ignored;
  socket_.non_blocking(true, ignored);
}

Link::~Link() {
  if (ssl_ != nullptr) SSL_free(ssl_);
}

error_code Link::tls_error(int result) {
  const int reason = SSL_get_error(ssl_, result);
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (reason == SSL_ERROR_ZERO_RETURN) return asio::error::eof;
  if (code == 0) return asio::ssl::error::stream_truncated;  // the peer vanished without close_notify
  return {static_cast<int>(code), asio::error::get_ssl_category()};
}

asio::awaitable<void> Link::fill_cipher(error_code& ec) {
  const std::size_t n =
      co_await socket_.async_read_some(asio::buffer(cipher_in_.prepare(max_record_read), max_record_read), with(ec));
  cipher_in_.commit(n);
}

std::size_t Link::read_now(ReadBuffer& buffer, std::size_t max, error_code& ec) {
  if (ssl_ != nullptr) {
    ec = asio::error::would_block;
    return 0;
  }
  const std::size_t n = socket_.read_some(asio::buffer(buffer.prepare(max), max), ec);  // the socket is non-blocking
  if (ec == asio::error::try_again) ec = asio::error::would_block;
  if (!ec) buffer.commit(n);
  return ec ? 0 : n;
}

void Link::release_idle_buffers() {
  cipher_in_.release_if_empty();
  if (cipher_out_.empty()) std::string().swap(cipher_out_);
}

bool Link::buffered() const {
  return ssl_ != nullptr && (SSL_pending(ssl_) > 0 || SSL_has_pending(ssl_) == 1 || !cipher_in_.empty());
}

bool Link::quiet() {
  if (buffered()) return false;
  char byte = 0;
  error_code ec;
  socket_.receive(asio::buffer(&byte, 1), asio::socket_base::message_peek, ec);  // the socket is non-blocking
  return ec == asio::error::would_block || ec == asio::error::try_again;
}

std::size_t Link::write_now(std::string_view data, error_code& ec) {
  if (ssl_ != nullptr || data.empty()) return 0;
  return send_now(data, ec);
}

std::size_t Link::send_now(std::string_view data, error_code& ec) {
  const std::size_t sent = socket_.write_some(asio::buffer(data), ec);  // the socket is non-blocking
  if (ec == asio::error::would_block || ec == asio::error::try_again) {
    ec = {};
    return 0;
  }
  return ec ? 0 : sent;
}

asio::awaitable<void> Link::send_all(std::string_view data, error_code& ec) {
  // Straight from the coroutine when the socket takes it all at once (the common case: a reply, a command,
  // a block that fits the send buffer); only the rest goes through the reactor. Saves a trip through the
  // scheduler (and its epoll_wait) per send.
  const std::size_t sent = send_now(data, ec);
  if (ec || sent == data.size()) co_return;
  co_await asio::async_write(socket_, asio::buffer(data.substr(sent)), with(ec));
}

asio::awaitable<void> Link::flush_cipher(error_code& ec) {
  if (cipher_out_.empty()) co_return;
  co_await send_all(cipher_out_, ec);
  cipher_out_.clear();
  release_if_large(cipher_out_);
}

asio::awaitable<std::size_t> Link::read_some(ReadBuffer& buffer, std::size_t max, TimePoint deadline,
                                             error_code& ec) {
  const Deadlines::Armed armed(deadlines_, deadline, ec);
  if (ssl_ == nullptr) {
    const std::size_t n = co_await socket_.async_read_some(asio::buffer(buffer.prepare(max), max), with(ec));
    buffer.commit(n);
    co_return n;
  }
  // After SSL_ERROR_WANT_READ OpenSSL has drained our BIO and holds at most a partial record: it needs more
  // bytes from the network whatever SSL_has_pending() says.
  bool need_network = !buffered();
  for (;;) {
    if (need_network) {
      co_await fill_cipher(ec);
      if (ec) co_return 0;
    }
    need_network = true;
    const std::size_t room = std::min<std::size_t>(max, INT_MAX);
    ERR_clear_error();
    const int n = SSL_read(ssl_, buffer.prepare(room), static_cast<int>(room));
    if (n > 0) {
      buffer.commit(static_cast<std::size_t>(n));
      co_return static_cast<std::size_t>(n);
    }
    const int reason = SSL_get_error(ssl_, n);
    const error_code failure = reason == SSL_ERROR_WANT_READ ? error_code{} : tls_error(n);
    co_await flush_cipher(ec);  // e.g. TLS 1.3 session tickets or alerts produced while reading
    if (!ec) ec = failure;
    if (ec) co_return 0;
  }
}

asio::awaitable<void> Link::write(std::string_view data, TimePoint deadline, error_code& ec) {
  const Deadlines::Armed armed(deadlines_, deadline, ec);
  if (ssl_ == nullptr) {
    co_await send_all(data, ec);
    co_return;
  }
  while (!data.empty()) {
    const int chunk = static_cast<int>(std::min<std::size_t>(data.size(), flush_threshold));
    ERR_clear_error();
    const int n = SSL_write(ssl_, data.data(), chunk);
    if (n <= 0) {
      ec = tls_error(n);
      co_return;
    }
    data.remove_prefix(static_cast<std::size_t>(n));
    if (cipher_out_.size() >= flush_threshold) {
      co_await flush_cipher(ec);
      if (ec) co_return;
    }
  }
  co_await flush_cipher(ec);
}

bool Link::certificate_matches(const std::string& name) const {
  const X509* certificate = ssl_ == nullptr ? nullptr : SSL_get0_peer_certificate(ssl_);
  return certificate != nullptr &&
         X509_check_host(const_cast<X509*>(certificate), name.data(), name.size(),
                         X509_CHECK_FLAG_NEVER_CHECK_SUBJECT | X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS,
                         nullptr) == 1;
}

long Link::webpki_verdict(const ClientTls* tls) const {
  return ssl_ == nullptr || tls == nullptr ? tls_info_.verify_error : tls->webpki_verdict(ssl_);
}

std::string_view Link::offered_tls() const { return ssl_ == nullptr ? "no_hello" : offered_tls_version(ssl_); }

asio::awaitable<void> Link::handshake(SSL_CTX* context, const Peer* peer, TimePoint deadline, error_code& ec) {
  const Deadlines::Armed armed(deadlines_, deadline, ec);
  ssl_ = SSL_new(context);
  if (ssl_ == nullptr) {
    ec = {static_cast<int>(ERR_get_error()), asio::error::get_ssl_category()};
    co_return;
  }
  BIO* bio = BIO_new(LinkBio::method());
  BIO_set_data(bio, this);
  SSL_set_bio(ssl_, bio, bio);
  SSL_set_mode(ssl_, SSL_MODE_RELEASE_BUFFERS);
  if (peer == nullptr) {
    SSL_set_accept_state(ssl_);
  } else {
    SSL_set_connect_state(ssl_);
    const bool dane = peer->dane != nullptr && !peer->dane->empty();
    if (!peer->name.empty()) {
      error_code not_an_address;
      asio::ip::make_address(peer->name, not_an_address);
      if (not_an_address) SSL_set_tlsext_host_name(ssl_, peer->name.c_str());
      if (!dane && peer->verify_names.empty() && (peer->verify || peer->record_name))
        SSL_set1_host(ssl_, peer->name.c_str());
    }
    if (peer->verify && !peer->verify_names.empty()) {
      // OpenSSL matches a reference name that starts with a dot against the names below it; one label only.
      SSL_set_hostflags(ssl_, X509_CHECK_FLAG_SINGLE_LABEL_SUBDOMAINS);
      for (const auto& name : peer->verify_names) {
        const std::string reference = name.starts_with("*.") ? name.substr(1) : name;
        SSL_add1_host(ssl_, reference.c_str());
      }
    }
    if (dane) {
      if (SSL_dane_enable(ssl_, peer->name.c_str()) <= 0) {
        ec = {static_cast<int>(ERR_get_error()), asio::error::get_ssl_category()};
        co_return;
      }
      SSL_dane_set_flags(ssl_, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
      // After SSL_dane_enable, which makes `name` the one reference name.
      if (peer->dane_names != nullptr) {
        for (const auto& name : *peer->dane_names)
          if (name != peer->name) SSL_add1_host(ssl_, name.c_str());
      }
      for (const auto& record : *peer->dane) {
        SSL_dane_tlsa_add(ssl_, record.usage, record.selector, record.matching,
                          reinterpret_cast<const unsigned char*>(record.data.data()), record.data.size());
      }
      SSL_set_verify(ssl_, SSL_VERIFY_PEER, nullptr);
    }
  }
  for (;;) {
    ERR_clear_error();
    const int result = SSL_do_handshake(ssl_);
    const int reason = result == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_, result);
    error_code failure = result == 1 || reason == SSL_ERROR_WANT_READ ? error_code{} : tls_error(result);
    co_await flush_cipher(ec);  // our flight, or the alert that tells the peer why we gave up
    if (failure) ec = failure;
    if (ec) {
      // Why a certificate was refused (expired, another host's, untrusted), for the report of the failure.
      if (peer != nullptr) tls_info_.verify_error = SSL_get_verify_result(ssl_);
      co_return;
    }
    if (result == 1) break;
    co_await fill_cipher(ec);
    if (ec) co_return;
  }
  tls_info_ = tls_info(ssl_);
}

asio::awaitable<void> Link::connect(const asio::ip::tcp::endpoint& endpoint, TimePoint deadline, error_code& ec) {
  const Deadlines::Armed armed(deadlines_, deadline, ec);
  error_code ignored;
  socket_.close(ignored);  // a previous attempt's socket
  socket_.open(endpoint.protocol(), ec);
  if (ec) co_return;
  // Before the connect: Asio's async_connect makes the socket non-blocking itself (an ioctl) unless it is so
  // already, and setting it afterwards would be a second ioctl per upstream connection (issue #16).
  socket_.non_blocking(true, ignored);
  co_await socket_.async_connect(endpoint, with(ec));
  if (ec) co_return;
  socket_.set_option(asio::ip::tcp::no_delay(true), ignored);
}

asio::awaitable<void> Link::shutdown_tls(TimePoint deadline, error_code& ec) {
  if (ssl_ == nullptr || !SSL_is_init_finished(ssl_) || (SSL_get_shutdown(ssl_) & SSL_SENT_SHUTDOWN) != 0)
    co_return;
  const Deadlines::Armed armed(deadlines_, deadline, ec);
  ERR_clear_error();
  SSL_shutdown(ssl_);  // queues close_notify in cipher_out_ (our BIO never blocks a write)
  ERR_clear_error();
  co_await flush_cipher(ec);
}

void Link::cancel() {
  error_code ignored;
  socket_.cancel(ignored);
}

void Link::close() {
  error_code ignored;
  socket_.shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
}

std::string address_text(const asio::ip::address& address) {
  asio::ip::address_v4::bytes_type v4;
  if (address.is_v4()) {
    v4 = address.to_v4().to_bytes();
  } else if (address.to_v6().is_v4_mapped()) {
    v4 = asio::ip::make_address_v4(asio::ip::v4_mapped, address.to_v6()).to_bytes();
  } else {
    return address.to_string();
  }
  // IPv4 is formatted here: Asio's to_string() goes through inet_ntop(), i.e. sprintf(), about 2,000
  // instructions, and a relayed message needs the client's address twice (issue #16).
  char text[16];  // "255.255.255.255"
  char* end = text;
  for (std::size_t i = 0; i < v4.size(); ++i) {
    if (i > 0) *end++ = '.';
    end = std::to_chars(end, text + sizeof text, v4[i]).ptr;
  }
  return std::string(text, end);
}

std::string endpoint_text(const asio::ip::address& address, std::uint16_t port) {
  const std::string text = address_text(address);
  return (text.find(':') == std::string::npos ? text : "[" + text + "]") + ":" + std::to_string(port);
}

std::string handshake_failure_label(const error_code& ec) {
  const bool eof = ec == asio::error::eof || ec == asio::ssl::error::stream_truncated;
  const unsigned long ssl_error = ec.category() == asio::error::get_ssl_category() ? ec.value() : 0;
  return handshake_failure_reason(ssl_error, ec == asio::error::timed_out, eof);
}

}  // namespace mailflow
