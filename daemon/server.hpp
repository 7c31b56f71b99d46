#pragma once
// The running daemon: listeners, sessions, HTTP, signals (SIGHUP reload, SIGTERM/SIGINT/SIGQUIT drain), state
// persistence and systemd notification, on one event loop (thread) per usable CPU.
#include <memory>
#include <string>

#include "config/config.hpp"

namespace mailflow {

class SignalThread;

class Server {
 public:
  // `config` is the validated startup configuration loaded from `config_path` (reloads read that path again).
  // `signals` takes the signals from before the server exists: run() has them posted to its loop once it is
  // about to run, the destructor no longer.
  Server(std::string config_path, std::shared_ptr<const config::Config> config, SignalThread& signals);
  ~Server();

  // Starts everything and blocks until a SIGTERM/SIGINT/SIGQUIT drain finished (a second signal cuts the
  // drain short). Startup problems (unbindable address, unreadable certificate, unwritable state_dir) throw
  // std::runtime_error with a clear message. Returns the process exit code.
  int run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mailflow
