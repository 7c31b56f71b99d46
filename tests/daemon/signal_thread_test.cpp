#include "daemon/signal_thread.hpp"

#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <thread>

namespace {

// Sends `signal` to this process and waits until the signal thread has taken it (no longer pending): the next
// one of the same number is then a delivery of its own, not merged with it by the kernel.
bool send_and_wait_taken(int signal) {
  ::kill(::getpid(), signal);
  for (int i = 0; i < 2000; ++i) {
    sigset_t pending;
    sigpending(&pending);
    if (!sigismember(&pending, signal)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

}  // namespace

TEST_CASE("signal thread: stop signals count one each while the loop is held, two at most, SIGHUPs merge") {
  mailflow::SignalThread signals;
  boost::asio::io_context io;  // not run until the end: a loop held by a reload
  int stops = 0;
  int reloads = 0;
  signals.attach(io, {[&stops] { ++stops; }, [&reloads] { ++reloads; }});

  // Read from a signalfd by the loop itself, the second SIGTERM merged with the first (one pending of each).
  CHECK(send_and_wait_taken(SIGTERM));
  CHECK(send_and_wait_taken(SIGINT));
  CHECK(send_and_wait_taken(SIGQUIT));  // a third: nothing left to do, not posted
  for (int i = 0; i < 3; ++i) CHECK(send_and_wait_taken(SIGHUP));
  io.poll();
  CHECK(stops == 2);
  CHECK(reloads == 1);  // merged until the reload begins

  signals.reload_taken();
  CHECK(send_and_wait_taken(SIGHUP));
  io.restart();
  io.poll();
  CHECK(reloads == 2);

  signals.detach();  // the loop is about to go: nothing more is posted to it
  CHECK(send_and_wait_taken(SIGTERM));
  signals.reload_taken();
  CHECK(send_and_wait_taken(SIGHUP));
  io.restart();
  io.poll();
  CHECK(stops == 2);
  CHECK(reloads == 2);
}
