#pragma once
// SIGHUP, SIGTERM, SIGINT and SIGQUIT, taken by a thread of their own from the first line of run_daemon() to
// its return: blocked in every thread (each one the daemon starts inherits the mask), read from a signalfd by
// this one as they come, however busy the event loops are.
#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/io_context.hpp>

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>

namespace mailflow {

class SignalThread {
 public:
  // Blocks the signals in the calling thread and starts the thread that takes them. Throws std::system_error
  // when the signalfd, the eventfd or the thread cannot be made.
  SignalThread();
  // Stops the thread and joins it; the signals stay blocked (one that comes now waits, pending, until exit).
  ~SignalThread();
  SignalThread(const SignalThread&) = delete;
  SignalThread& operator=(const SignalThread&) = delete;

  struct Handlers {
    std::function<void()> stop;    // a SIGTERM, SIGINT or SIGQUIT: the first, and the second (see deliver())
    std::function<void()> reload;  // a SIGHUP while none is waiting for its reload (see reload_taken())
  };

  // The daemon runs: from now on the signals are posted to `io` as `handlers` (each its own handler, in the
  // order the signals came). Until then a stop signal ends the start-up (exit 0), and a SIGHUP is kept for
  // this call, which posts its reload.
  void attach(boost::asio::io_context& io, Handlers handlers);
  // `io` is about to go: the signals that come now are ignored (the drain, if any, is over).
  void detach();
  // The reload that the SIGHUPs so far asked for begins: one that comes now asks for one more. SIGHUPs that
  // come before are merged into the one posted (Postfix's master_gotsighup flag), however many.
  void reload_taken() { reload_pending_ = false; }

 private:
  void run();
  void deliver(int signal);

  int signal_fd_ = -1;
  int wake_fd_ = -1;  // an eventfd: the destructor's word to stop
  std::mutex mutex_;  // phase_, io_, handlers_, stops_
  enum class Phase { starting, running, finished } phase_ = Phase::starting;
  boost::asio::io_context* io_ = nullptr;
  Handlers handlers_;
  unsigned stops_ = 0;  // stop signals taken while running
  std::atomic<bool> reload_pending_{false};
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace mailflow
