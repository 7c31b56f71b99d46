#pragma once
// A session's deadlines. Every wait of a session (client and upstream leg alike) has its own absolute deadline,
// armed right before it (as Beast's expires_after): each Link operation takes one (Armed), other waits arm and
// disarm. One watchdog timer per session cancels whatever is in flight when the deadline passes, and the wait
// then reports asio::error::timed_out, so no caller depends on a flag. Deadlines are absolute so that a whole
// command line or DATA block shares one however many reads it takes.
#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>


namespace mailflow {

class Deadlines {
 public:
  using Clock = std::chrono::steady_clock;
  using error_code = boost::system::error_code;

  // `on_expiry` cancels everything the session may be waiting on (its sockets, a name lookup).
  Deadlines(const boost::asio::any_io_executor& executor, std::function<void()> on_expiry);

  static Clock::time_point in(Clock::duration timeout) { return Clock::now() + timeout; }

  // Starts the watchdog: a plain timer wait, no coroutine (a parked idle session costs only its handler).
  // `keep_alive` holds the session (and so this object) until stop().
  void start(std::shared_ptr<void> keep_alive);
  void stop();  // the session is over: the watchdog ends

  boost::asio::awaitable<void> wait_readable(boost::asio::ip::tcp::socket& socket, Clock::time_point deadline,
                                             error_code& ec);
  // For waits of other kinds (a name lookup): arm before, disarm after.
  void arm(Clock::time_point deadline);
  void disarm(error_code& ec);  // a deadline that fired becomes ec = timed_out

  // arm() for the wait of its scope, disarm() at the scope's end (a Link operation: its co_return).
  class Armed {
   public:
    Armed(Deadlines& deadlines, Clock::time_point deadline, error_code& ec) : deadlines_(deadlines), ec_(ec) {
      deadlines_.arm(deadline);
    }
    ~Armed() { deadlines_.disarm(ec_); }
    Armed(const Armed&) = delete;
    Armed& operator=(const Armed&) = delete;

   private:
    Deadlines& deadlines_;
    error_code& ec_;
  };

 private:
  void wait(std::shared_ptr<void> keep_alive);

  boost::asio::steady_timer timer_;
  std::function<void()> on_expiry_;
  Clock::time_point deadline_ = Clock::time_point::max();
  bool timed_out_ = false;
  bool stopped_ = false;
};

}  // namespace mailflow
