#include "daemon/deadlines.hpp"

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace mailflow {

namespace asio = boost::asio;

Deadlines::Deadlines(const asio::any_io_executor& executor, std::function<void()> on_expiry)
    : timer_(executor), on_expiry_(std::move(on_expiry)) {}

asio::awaitable<void> Deadlines::watch(std::shared_ptr<void> /*keep_alive*/) {
  // The parameter is bound when the coroutine is created, not when it first runs (by then a short session
  // may be gone).
  while (!stopped_) {
    timer_.expires_at(deadline_);
    error_code ec;
    co_await timer_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (stopped_) break;
    if (deadline_ <= Clock::now()) {
      // The wait in flight took too long: cancel everything it could be; the next wait arms its own deadline.
      timed_out_ = true;
      deadline_ = Clock::time_point::max();
      on_expiry_();
    }
  }
}

void Deadlines::stop() {
  stopped_ = true;
  timer_.cancel();
}

void Deadlines::arm(Clock::time_point deadline) {
  timed_out_ = false;
  deadline_ = deadline;
  if (deadline_ < timer_.expiry()) timer_.cancel();  // wake the watchdog so that it re-arms earlier
}

void Deadlines::disarm(error_code& ec) {
  if (std::exchange(timed_out_, false)) ec = asio::error::timed_out;
}

asio::awaitable<void> Deadlines::read(Link& link, ReadBuffer& buffer, std::size_t max, Clock::time_point deadline,
                                      error_code& ec, Link::Wait wait) {
  arm(deadline);
  co_await link.read_some(buffer, max, ec, wait);
  disarm(ec);
}

asio::awaitable<void> Deadlines::write(Link& link, std::string_view data, Clock::time_point deadline,
                                       error_code& ec) {
  arm(deadline);
  co_await link.write(data, ec);
  disarm(ec);
}

asio::awaitable<void> Deadlines::handshake(Link& link, SSL_CTX* context, const Link::Peer* peer,
                                           Clock::time_point deadline, error_code& ec) {
  arm(deadline);
  co_await link.handshake(context, peer, ec);
  disarm(ec);
}

asio::awaitable<void> Deadlines::connect(Link& link, const asio::ip::tcp::endpoint& endpoint,
                                         Clock::time_point deadline, error_code& ec) {
  arm(deadline);
  co_await link.connect(endpoint, ec);
  disarm(ec);
}

asio::awaitable<void> Deadlines::wait_readable(asio::ip::tcp::socket& socket, Clock::time_point deadline,
                                               error_code& ec) {
  arm(deadline);
  co_await socket.async_wait(asio::ip::tcp::socket::wait_read, asio::redirect_error(asio::use_awaitable, ec));
  disarm(ec);
}

}  // namespace mailflow
