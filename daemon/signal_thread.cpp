#include "daemon/signal_thread.hpp"

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <boost/asio/post.hpp>

#include <cerrno>
#include <cstdint>
#include <system_error>

#include "daemon/log.hpp"

namespace mailflow {

namespace {

sigset_t handled_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int signal : {SIGHUP, SIGTERM, SIGINT, SIGQUIT}) sigaddset(&set, signal);
  return set;
}

const char* signal_name(int signal) {
  switch (signal) {
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    case SIGQUIT:
      return "SIGQUIT";
    default:
      return "SIGHUP";
  }
}

}  // namespace

// Why a thread: the kernel keeps one of each blocked signal pending, however many are sent, until it is read.
// An event loop that read the signalfd itself took nothing while it was held (a reload of seconds), so a
// second SIGTERM sent meanwhile merged with the first and the drain it was to cut short ran on to
// drain_timeout; and a start-up that hung (a configuration file that is a FIFO nobody writes, a state_dir on
// a hung mount) could only be ended with SIGKILL, as nobody read the signals before the loop ran. Asio's own
// handler counted each delivery, but into a pipe only the loop empties, which a flood filled (the SIGTERM
// after it was lost). This thread does nothing but wait, so it takes each signal as it comes.
SignalThread::SignalThread() {
  const sigset_t set = handled_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal_fd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (signal_fd_ < 0) throw std::system_error(errno, std::generic_category(), "signalfd");
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    const int error = errno;
    ::close(signal_fd_);
    throw std::system_error(error, std::generic_category(), "eventfd");
  }
  try {
    thread_ = std::thread([this] { run(); });
  } catch (...) {
    ::close(signal_fd_);
    ::close(wake_fd_);
    throw;
  }
}

SignalThread::~SignalThread() {
  const std::uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
  thread_.join();
  ::close(signal_fd_);
  ::close(wake_fd_);
}

void SignalThread::attach(boost::asio::io_context& io, Handlers handlers) {
  std::lock_guard lock(mutex_);
  io_ = &io;
  handlers_ = std::move(handlers);
  phase_ = Phase::running;
  if (reload_pending_) boost::asio::post(io, handlers_.reload);  // a SIGHUP that came while it started
}

void SignalThread::detach() {
  std::lock_guard lock(mutex_);
  phase_ = Phase::finished;
  io_ = nullptr;
  handlers_ = {};
}

void SignalThread::run() {
  pollfd fds[2] = {{signal_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  for (;;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      log_event(LogLevel::error, "internal_error", {{"component", "signals"}, {"error", "poll failed"}});
      return;
    }
    if (fds[1].revents != 0) return;
    signalfd_siginfo infos[16];
    ssize_t got;
    while ((got = ::read(signal_fd_, infos, sizeof infos)) > 0)
      for (ssize_t i = 0; i < got / static_cast<ssize_t>(sizeof infos[0]); ++i)
        deliver(static_cast<int>(infos[i].ssi_signo));
  }
}

void SignalThread::deliver(int signal) {
  std::lock_guard lock(mutex_);
  if (signal == SIGHUP) {
    if (!reload_pending_.exchange(true) && phase_ == Phase::running)
      boost::asio::post(*io_, handlers_.reload);
    return;
  }
  switch (phase_) {
    case Phase::starting:
      // Nothing is accepted yet and the windows on disk are as the last stop saved them: nothing to drain or
      // save, and whatever the start-up waits for (a file, a disk) is not waited for. _exit: the main thread
      // is still in the middle of it, and exit()'s destructors would run under it.
      log_event(LogLevel::info, "startup_stopped", {{"signal", signal_name(signal)}});
      ::_exit(0);
    case Phase::running:
      // The first starts the drain, the second cuts it short; the ones after it have nothing left to do, and
      // are not posted: a kill loop during a reload would queue a handler each.
      if (++stops_ <= 2) boost::asio::post(*io_, handlers_.stop);
      return;
    case Phase::finished:
      return;  // the drain is over and the state saved: the process is on its way out
  }
}

}  // namespace mailflow
