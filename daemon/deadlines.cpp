#include "daemon/deadlines.hpp"

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace mailflow {

namespace asio = boost::asio;

Deadlines::Deadlines(const asio::any_io_executor& executor, std::function<void()> on_expiry)
    : timer_(executor), on_expiry_(std::move(on_expiry)) {}

void Deadlines::start(std::shared_ptr<void> keep_alive) { wait(std::move(keep_alive)); }

void Deadlines::wait(std::shared_ptr<void> keep_alive) {
  timer_.expires_at(deadline_);
  timer_.async_wait([this, keep_alive = std::move(keep_alive)](const error_code&) mutable {
    if (stopped_) return;  // keep_alive goes with the handler
    if (deadline_ <= Clock::now()) {
      // The wait in flight took too long: cancel everything it could be; the next wait arms its own deadline.
      timed_out_ = true;
      deadline_ = Clock::time_point::max();
      on_expiry_();
    }
    wait(std::move(keep_alive));  // re-armed for the current deadline (arm() cancels to make it earlier)
  });
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

asio::awaitable<void> Deadlines::wait_readable(asio::ip::tcp::socket& socket, Clock::time_point deadline,
                                               error_code& ec) {
  arm(deadline);
  co_await socket.async_wait(asio::ip::tcp::socket::wait_read, asio::redirect_error(asio::use_awaitable, ec));
  disarm(ec);
}

}  // namespace mailflow
