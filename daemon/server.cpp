#include "daemon/server.hpp"

#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <fcntl.h>
#include <fmt/format.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <ctime>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "daemon/accept_error.hpp"
#include "daemon/certificate_check.hpp"
#include "daemon/failpoint.hpp"
#include "daemon/http_server.hpp"
#include "daemon/log.hpp"
#include "daemon/mta_sts.hpp"
#include "daemon/poll_window.hpp"
#include "daemon/relay_session.hpp"
#include "daemon/resolver.hpp"
#include "daemon/runtime.hpp"
#include "daemon/signal_thread.hpp"
#include "daemon/state_file.hpp"
#include "daemon/state_writer.hpp"
#include "daemon/telemetry.hpp"
#include "daemon/tlsrpt_sender.hpp"

namespace mailflow {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;

namespace {

constexpr auto state_save_interval = std::chrono::seconds(60);
// After limits.drain_timeout: how long the sessions still open get to close, and a TLS-RPT mail in flight to
// end; then the time allowed for saving the windows, in what the stop asks systemd to wait for.
constexpr auto drain_close_wait = std::chrono::seconds(5);
constexpr auto drain_tlsrpt_wait = std::chrono::seconds(5);
constexpr auto drain_save_allowance = std::chrono::seconds(20);
constexpr auto memory_check_interval = std::chrono::seconds(2);
// Reverse names of the drill-down's inbound addresses: looked up here, off every session's path, a batch at a
// time; each answer is cached (RemoteStore) for a while, a failure for less.
constexpr auto name_interval = std::chrono::seconds(1);
constexpr std::size_t name_batch = 64;
constexpr auto name_ttl = std::chrono::hours(6);
constexpr auto name_failure_ttl = std::chrono::minutes(5);
constexpr std::size_t memory_trim_sessions = 100;
// How long a SIGHUP waits before its reload begins, the event loop running on: a SIGTERM or SIGINT that comes
// meanwhile (sent with it) stops the daemon and the reload is not made (settle_and_reload()).
constexpr auto reload_settle = std::chrono::milliseconds(50);

tcp::endpoint listen_endpoint(const config::Endpoint& address) {
  error_code ec;
  auto ip = asio::ip::make_address(address.host, ec);
  if (ec) throw std::runtime_error("listener address " + address.text + " is not an IP address");
  return {ip, address.port};
}

// One directory however it is written: the same path, or paths to one existing directory (a trailing "/", a
// symbolic link).
bool same_directory(const std::string& a, const std::string& b) {
  std::error_code ec;
  return a == b || std::filesystem::equivalent(a, b, ec);
}

// "127.0.0.1:25", "[::]:25": an endpoint as a listener's address is written.
std::string endpoint_text(const tcp::endpoint& endpoint) {
  const std::string ip = endpoint.address().to_string();
  const std::string port = std::to_string(endpoint.port());
  return endpoint.address().is_v6() ? "[" + ip + "]:" + port : ip + ":" + port;
}

// Sockets handed over by systemd socket activation (LISTEN_FDS): the listening TCP ones by local endpoint.
// The others (a unix or UDP socket, a connection passed by Accept=yes) no listener can take: `unusable` says
// what each is, for the log.
std::map<tcp::endpoint, int> inherited_sockets(std::vector<std::string>& unusable) {
  std::map<tcp::endpoint, int> sockets;
  const int count = sd_listen_fds(1);
  for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + count; ++fd) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&storage), &length) != 0) {
      unusable.push_back("fd " + std::to_string(fd) + " (not a socket)");
      continue;
    }
    if (storage.ss_family == AF_UNIX) {
      // `storage` is zeroed, larger than sockaddr_un: a path ends in NUL, an abstract name starts with one.
      const char* path = reinterpret_cast<const sockaddr_un*>(&storage)->sun_path;
      unusable.push_back(std::string(*path != '\0' ? path : "(abstract)") + " (unix socket)");
      continue;
    }
    if (storage.ss_family != AF_INET && storage.ss_family != AF_INET6) {
      unusable.push_back("fd " + std::to_string(fd) + " (address family " +
                         std::to_string(storage.ss_family) + ")");
      continue;
    }
    tcp::endpoint endpoint;
    std::memcpy(endpoint.data(), &storage, length);
    endpoint.resize(length);
    if (sd_is_socket_inet(fd, 0, SOCK_STREAM, 1, 0) <= 0) {
      unusable.push_back(endpoint_text(endpoint) + " (not a listening TCP socket)");
      continue;
    }
    sockets.emplace(endpoint, fd);
  }
  return sockets;
}

// Whether a listening IPv6 socket takes IPv6 clients only (IPV6_V6ONLY).
bool v6_only(int fd) {
  int on = 0;
  socklen_t length = sizeof on;
  return getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, &length) == 0 && on != 0;
}

// How many event loops (threads) relay sessions: performance.event_loops, or with "auto" one per CPU this
// process may run on (taskset/cgroup cpusets), not per CPU online: two threads sharing one CPU only add
// hand-offs.
unsigned event_loops(const config::Performance& performance) {
  if (performance.event_loops > 0) return performance.event_loops;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Thrown by the handler that a reload posts to every event loop when it turns busy polling on (kick_loop): it
// leaves io.run() (Asio lets a handler's exception through run(), which may then be called again without
// restart()), and run_loop() reads the setting again. An io.stop() instead could be lost in the restart()
// after it, and with it the stop at exit.
struct BusyPollOn {};

// Runs one event loop until it is stopped; with `busy_poll`, it polls for a PollWindow before it sleeps.
// Without it the loop is one io.run() for as long as it stays off: Asio recycles a handler's memory (a
// coroutine frame, an operation) through a structure that run() keeps for the thread and run_one() or poll()
// make anew for each call, so a run_one() per handler gave every one of those blocks back to malloc (issue
// #16: 57.7 -> 50.5 allocations per relayed message, -2 % instructions; docs/performance.md, "Low-load
// latency").
void run_loop(asio::io_context& io, const std::atomic<bool>& busy_poll) {
  using Clock = std::chrono::steady_clock;
  const LoopScope scope;  // this loop's resolver, released before the loop is destroyed
  PollWindow window;
  for (;;) {
    try {
      if (!busy_poll.load(std::memory_order_relaxed)) {
        io.run();
        return;
      }
      if (io.poll() > 0) continue;
      if (io.stopped()) return;
      const auto idle_since = Clock::now();
      bool caught = false;
      while (!caught && Clock::now() - idle_since < window.current()) caught = io.poll() > 0;
      if (caught) continue;
      if (io.run_one() == 0) return;
      window.slept(Clock::now() - idle_since);
    } catch (const BusyPollOn&) {
      log_event(LogLevel::debug, "busy_poll_applied", {{"busy_poll", busy_poll.load() ? "true" : "false"}});
    }
  }
}

// A reload turned busy polling on: a loop inside io.run() (polling off) reads it again (run_loop). Polling
// loops read it before every event anyway, and the kick only makes them read it once more.
void kick_loop(asio::io_context& io) {
  asio::post(io, [] { throw BusyPollOn{}; });
}

void check_state_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw std::runtime_error("state_dir " + dir + ": " + ec.message());
  const std::string probe = dir + "/.write-test";
  // open(2) and write(2) themselves, for their errno: "Read-only file system" (ProtectSystem=strict: the unit
  // needs ReadWritePaths=) and "Permission denied" (the directory is not the service user's) ask for
  // different fixes, and the message said neither.
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw std::runtime_error("state_dir " + dir + " is not writable: " + std::strerror(errno));
  const bool written = ::write(fd, "ok", 2) == 2;
  const int write_errno = errno;
  ::close(fd);
  std::filesystem::remove(probe, ec);
  if (!written)
    throw std::runtime_error("state_dir " + dir + " is not writable: " +
                             (write_errno != 0 ? std::strerror(write_errno) : "short write"));
}

}  // namespace

struct Server::Impl {
  struct Acceptor {
    std::string name;
    std::string address;     // as written
    tcp::endpoint endpoint;  // what it listens on: "[::1]:25" and "[0::1]:25" are one
    tcp::acceptor acceptor;
    // The socket came from systemd (LISTEN_FDS), at this endpoint: handed back when retired, never closed.
    std::optional<tcp::endpoint> inherited;
    // What its connections start under: the configuration it listens for (set by swap_listeners), its
    // listener in it. A listener that a reload removed keeps the one its clients connected to.
    std::shared_ptr<const Runtime> runtime;
    const config::Listener* listener = nullptr;
    // Each session sets TCP_NODELAY: a socket from systemd that lacked it (open_acceptor()).
    bool nodelay_per_session = false;
  };

  using WorkGuard = asio::executor_work_guard<asio::io_context::executor_type>;

  std::string config_path;
  // performance.event_loops event loops, each run by one thread (nginx's worker model, in threads). `io` is
  // the first: listeners, signals and its share of the sessions (HTTP has a thread of its own, see
  // http_server.hpp). A session lives on one loop from
  // accept to close, so its handlers never run concurrently and need no strand; loops share only thread-safe
  // state (registry, telemetry, the runtime snapshot). The workers are declared first so that they outlive
  // `io`: an accept still pending in `io` at exit holds a socket that belongs to a worker.
  std::vector<std::unique_ptr<asio::io_context>> workers;  // the other loops
  std::vector<WorkGuard> worker_guards;                    // keep them running while they have no session
  asio::io_context io{1};
  // Takes the signals as they come and posts them to `io` once run() attaches (stop_signal(),
  // reload_signal()); SIGQUIT stops as SIGTERM does: Postfix's master takes it as a request to terminate
  // (master_sig.c) and nginx as its graceful stop (Debian's nginx.service stops it with QUIT).
  SignalThread& signals;
  asio::steady_timer reload_settle_timer{io};  // a SIGHUP's wait before its reload (settle_and_reload())
  std::size_t next_loop = 0;
  Telemetry telemetry;
  SessionRegistry registry{telemetry};
  std::unique_ptr<HttpServer> http;
  std::unique_ptr<TlsRptSender> tlsrpt_sender;  // sends TLS-RPT reports while tlsrpt.send is true
  // From systemd, but not listening TCP sockets: no listener can take them (inherited_sockets).
  std::vector<std::string> unusable_sockets;
  std::map<tcp::endpoint, int> inherited = inherited_sockets(unusable_sockets);

  mutable std::mutex runtime_mutex;
  std::shared_ptr<const Runtime> runtime;
  // The configuration the process started with: what a reload cannot change (http.address, state_dir,
  // performance.event_loops) keeps its value from here until a restart.
  std::shared_ptr<const config::Config> started;
  std::vector<std::shared_ptr<Acceptor>> acceptors;  // touched only from startup and the first loop
  std::atomic<bool> stopping{false};                 // read by /readyz on any thread
  std::atomic<bool> busy_poll{true};                 // performance.busy_poll, read by every loop
  std::atomic<bool> save_in_flight{false};           // the minute's save is queued or being written
  // state_dir is this process's from before its files are read until exit (after the last save).
  std::unique_ptr<StateDirLock> state_dir_lock;
  // Writes state_dir's files off the event loops. Declared last: its jobs touch the members above (telemetry,
  // the MTA-STS cache, the sender's ledger flag, save_in_flight), so it is destroyed, and joined, first.
  std::unique_ptr<StateWriter> state_writer;

  Impl(std::string path, std::shared_ptr<const config::Config> config, SignalThread& signal_thread)
      : config_path(std::move(path)), signals(signal_thread) {
    runtime = Runtime::build(std::move(config));
    started = runtime->config;
    state_writer = std::make_unique<StateWriter>(started->state_dir, telemetry);
    const unsigned loops = event_loops(started->performance);
    for (unsigned i = 1; i < loops; ++i) {
      workers.push_back(std::make_unique<asio::io_context>(1));
      worker_guards.push_back(asio::make_work_guard(*workers.back()));
    }
  }

  // First: no signal is posted to `io` once it begins to go.
  ~Impl() { signals.detach(); }

  // Round robin over the loops: where the next session lives.
  asio::io_context& session_loop() {
    const std::size_t loop = next_loop++ % (workers.size() + 1);
    return loop == 0 ? io : *workers[loop - 1];
  }

  void stop_loops() {
    for (auto& guard : worker_guards) guard.reset();
    for (auto& worker : workers) worker->stop();
    io.stop();
  }

  std::shared_ptr<const Runtime> current() const {
    std::lock_guard lock(runtime_mutex);
    return runtime;
  }

  std::shared_ptr<Acceptor> open_acceptor(const config::Listener& listener) {
    auto endpoint = listen_endpoint(listener.address);
    auto result = std::make_shared<Acceptor>(Acceptor{
        listener.name, listener.address.text, endpoint, tcp::acceptor(io), std::nullopt, {}, nullptr, false});
    auto& acceptor = result->acceptor;
    if (auto it = inherited.find(endpoint); it != inherited.end()) {
      // A "[::]" listener takes IPv6 clients only, as the one bound here (below): the checks for an upstream
      // or MX host that is mailflowd itself count on it (an IPv4 address on its port is another server). A
      // socket that systemd bound without BindIPv6Only=ipv6-only takes IPv4 clients too, so such an upstream
      // would get every RCPT back, session inside session. Refused before it is taken: systemd keeps it.
      if (endpoint.address().is_v6() && endpoint.address().is_unspecified() && !v6_only(it->second))
        throw std::runtime_error(
            "listener " + listener.name + ": the socket systemd passed for " + endpoint_text(endpoint) +
            " takes IPv4 clients too (IPV6_V6ONLY off: BindIPv6Only=both, or default "
            "with net.ipv6.bindv6only=0), where a \"[::]\" listener takes IPv6 only: set "
            "BindIPv6Only=ipv6-only in the socket unit, as mailflowd.socket does, and "
            "give IPv4 a ListenStream= and a listener of its own (\"0.0.0.0:PORT\")");
      acceptor.assign(endpoint.protocol(), it->second);
      result->inherited = endpoint;
      // Linux gives a connection its listening socket's TCP_NODELAY as its handshake completes: one that
      // systemd set (NoDelay=yes, as mailflowd.socket has) every connection queued on the socket has too,
      // those from before mailflowd started included, and no session sets it again. systemd sets it right
      // after listen(), before any service of the socket starts. Without it (systemd-socket-activate, a unit
      // of an operator's own), the connections that queued have none, and each session sets it (issue #16).
      int nodelay = 0;
      socklen_t length = sizeof nodelay;
      result->nodelay_per_session =
          getsockopt(it->second, IPPROTO_TCP, TCP_NODELAY, &nodelay, &length) != 0 || nodelay == 0;
      inherited.erase(it);
      return result;
    }
    error_code ec;
    acceptor.open(endpoint.protocol(), ec);
    if (!ec) {
      // Sessions reply in small writes, each of which must leave at once (Nagle's algorithm would hold a
      // reply back for the client's delayed ACK). Linux gives a connection the listening socket's TCP_NODELAY
      // as it completes its handshake, so it is set here, once, instead of with a setsockopt() per session
      // (issue #16). Set before listen(): no connection can come before it.
      error_code ignored;  // as a session's own setsockopt() was: no reason to refuse the listener
      acceptor.set_option(tcp::no_delay(true), ignored);
    }
    if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec && endpoint.protocol() == tcp::v6()) acceptor.set_option(asio::ip::v6_only(true), ec);
    if (!ec) acceptor.bind(endpoint, ec);
    if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      const std::string why = ec == asio::error::address_in_use && on_started_http(endpoint)
                                  ? "the HTTP server still listens on " + started->http.address.text +
                                        " (http.address changes need a restart)"
                                  : ec.message();
      throw std::runtime_error("listener " + listener.name + ": cannot listen on " + listener.address.text +
                               ": " + why);
    }
    return result;
  }

  // Whether `endpoint` takes the port the HTTP server listens on (it keeps the address it started with until
  // a restart, so a reload that moves http.address and puts a listener on the old one cannot open that one).
  bool on_started_http(const tcp::endpoint& endpoint) const {
    if (!started) return false;
    const tcp::endpoint http_endpoint = listen_endpoint(started->http.address);
    return endpoint.port() == http_endpoint.port() &&
           (endpoint.address() == http_endpoint.address() || endpoint.address().is_unspecified() ||
            http_endpoint.address().is_unspecified());
  }

  // A completion handler for co_spawn: an exception that escapes a coroutine of the server is logged and
  // counted (mailflow_internal_errors_total{component}), never lost; `then` runs after it (e.g. a restart).
  auto on_escape(std::string_view component, std::function<void()> then = {}) {
    return [this, component, then = std::move(then)](std::exception_ptr error) {
      if (!error) return;
      telemetry.internal_error(component);
      log_event(LogLevel::error, "internal_error",
                {{"component", component}, {"error", exception_text(error)}});
      if (then) then();
    };
  }

  // Runs a coroutine of the server's own for the life of the process: one that an exception ended is started
  // again (the periodic state save must not stop silently).
  void keep_running(std::string_view component, std::function<asio::awaitable<void>()> make) {
    asio::co_spawn(io, make(), on_escape(component, [this, component, make] {
                     if (!stopping) keep_running(component, make);
                   }));
  }

  // An accept loop that an exception ended starts again (after a pause, in case the cause persists) as long
  // as its listener is open: a listener never stops silently.
  void spawn_accept_loop(std::shared_ptr<Acceptor> entry, bool pause_first = false) {
    asio::co_spawn(io, accept_loop(entry, pause_first), on_escape("accept", [this, entry] {
                     if (entry->acceptor.is_open() && !stopping) spawn_accept_loop(entry, true);
                   }));
  }

  asio::awaitable<void> accept_loop(std::shared_ptr<Acceptor> entry, bool pause_first) {
    if (pause_first) {
      asio::steady_timer pause(io, std::chrono::milliseconds(100));
      error_code ignored;
      co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
    }
    for (;;) {
      error_code ec;
      tcp::endpoint peer;  // from accept() itself: no getpeername() per session (issue #16)
      tcp::socket socket = co_await entry->acceptor.async_accept(
          session_loop(), peer, asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (!entry->acceptor.is_open() || ec == asio::error::operation_aborted) co_return;
        if (connection_error_on_accept(ec)) {
          // That one connection is gone (reset, unreachable): nothing was refused and the next one is taken
          // at once, as nginx does after ECONNABORTED.
          log_limited(LogLevel::info, "accept_dropped", {{"listener", entry->name}, {"error", ec.message()}});
          continue;
        }
        // Out of descriptors (EMFILE, ENFILE) or memory, or refused by a security module: the connection
        // stays in the listen queue. Log and count each failed try, then breathe before the next one (nginx
        // pauses accepting on EMFILE too): Asio would retry at once, and a full descriptor table would spin
        // this loop at 100 % CPU.
        telemetry.rejected(entry->name, "accept_failed");
        log_limited(LogLevel::error, "accept_error", {{"listener", entry->name}, {"error", ec.message()}});
        asio::steady_timer pause(io, std::chrono::milliseconds(100));
        co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      // A connection accepted before a reload that removed the listener (the reload ran on this loop between
      // the accept and this line) is served as the ones still queued then were (take_queued).
      failpoint("accept");
      // A socket systemd passed without TCP_NODELAY (a unit without NoDelay=yes, which mailflowd.socket has)
      // may have queued connections before mailflowd started: they have the option the socket had then.
      if (entry->nodelay_per_session) socket.set_option(tcp::no_delay(true), ec);
      start_relay_session(std::move(socket), peer, entry->runtime, *entry->listener, registry);
    }
  }

  struct PlannedListener {
    std::shared_ptr<Acceptor> acceptor;
    std::string name;  // a listener renamed on the same address keeps its socket and takes the new name
    std::string address;  // as now written
  };

  // Opens listeners of `config` whose address is not open yet (an open address is kept, whatever the listener
  // is now called or however the address is written); returns the new set. Throws before changing anything
  // that is running.
  std::vector<PlannedListener> reconcile_listeners(const config::Config& config) {
    std::vector<PlannedListener> next;
    try {
      for (const auto& listener : config.listeners) {
        const tcp::endpoint endpoint = listen_endpoint(listener.address);
        auto kept = std::find_if(acceptors.begin(), acceptors.end(),
                                 [&](const auto& a) { return a->endpoint == endpoint; });
        if (kept == acceptors.end()) refuse_beside_running(listener, endpoint);
        next.push_back({kept != acceptors.end() ? *kept : open_acceptor(listener), listener.name,
                        listener.address.text});
      }
    } catch (...) {
      discard(next);
      throw;
    }
    return next;
  }

  // A running socket on the wildcard of the new address's family, or on an address of that family where the
  // new one is the wildcard, same port: Linux refuses the new one while the old one listens, and the old one
  // is closed only once the reload has succeeded (what it opened must not cost a running listener). Said
  // plainly rather than as "Address already in use": mailflowd's own listener is in the way, and a restart
  // applies it.
  void refuse_beside_running(const config::Listener& listener, const tcp::endpoint& endpoint) const {
    if (inherited.count(endpoint) > 0) return;  // systemd holds that socket already: it is taken, not bound
    for (const auto& running : acceptors) {
      const tcp::endpoint& other = running->endpoint;
      if (other.port() != endpoint.port() || other.protocol() != endpoint.protocol()) continue;
      if (!other.address().is_unspecified() && !endpoint.address().is_unspecified()) continue;
      throw std::runtime_error(
          "listener " + listener.name + ": " + listener.address.text +
          " cannot listen beside the running listener " + running->name + " on " + running->address +
          " (a wildcard address takes the port on every address of its "
          "family) and that one closes only after a reload succeeds: a restart applies this "
          "change");
    }
  }

  // A plan that is not applied (the reload was refused): what it opened is retired, so that a socket it took
  // from systemd goes back to `inherited` instead of being closed with the plan.
  void discard(const std::vector<PlannedListener>& next) {
    for (const auto& planned : next)
      if (std::find(acceptors.begin(), acceptors.end(), planned.acceptor) == acceptors.end())
        retire(*planned.acceptor);
  }

  // A listener that no longer is: its socket is closed, or, when systemd passed it, handed back to
  // `inherited` (systemd keeps it listening whatever this process does: closing our copy would only leave its
  // clients unanswered, unnamed). A later reload that brings the listener back takes it again. Pending
  // accepts end.
  void retire(Acceptor& entry) {
    error_code ec;
    if (!entry.inherited) {
      entry.acceptor.close(ec);
      return;
    }
    const int fd = entry.acceptor.release(ec);
    if (!ec) inherited.emplace(*entry.inherited, fd);
    entry.inherited.reset();
  }

  // Sockets from systemd that no listener's address equals are never accepted on: their clients would wait
  // for a banner until they give up, and nothing else would say so. Said (and set in mailflow_sockets_unused,
  // for an alert: the log line comes once) at start and after each reload.
  void log_unused_sockets() {
    telemetry.sockets_unused(inherited.size() + unusable_sockets.size());
    for (const auto& socket : inherited)
      log_event(LogLevel::error, "socket_unused",
                {{"address", endpoint_text(socket.first)},
                 {"reason",
                  "socket activation passed it, but no listener has this address; its connections are "
                  "never answered (ListenStream= of mailflowd.socket must equal a listener address)"}});
    for (const auto& socket : unusable_sockets)
      log_event(
          LogLevel::error, "socket_unused",
          {{"address", socket},
           {"reason",
            "socket activation passed it, but a listener takes only a listening TCP socket (ListenStream= "
            "with an IP address and port, Accept=no); its connections are never answered"}});
  }

  // The clients that had connected to a listener that is about to close (the kernel's accept queue: they were
  // answered SYN-ACK while it listened) get their sessions, under the configuration they connected to: a
  // listener that a reload removed serves them; at a drain (registry draining) each is told 421 4.3.2 at once
  // (RelaySession::open). Closing the socket with them queued reset them, unanswered, with no log line or
  // count. Bounded by the queue's length: what connects meanwhile is taken too, up to that. Returns how many.
  std::size_t take_queued(Acceptor& entry) {
    std::size_t taken = 0;
    error_code ec;
    entry.acceptor.non_blocking(true, ec);
    for (int tries = 0; !ec && tries < asio::socket_base::max_listen_connections; ++tries) {
      tcp::endpoint peer;
      tcp::socket socket = entry.acceptor.accept(session_loop(), peer, ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) break;
      if (ec && connection_error_on_accept(ec)) {
        ec.clear();  // that one connection is gone, as in accept_loop
        continue;
      }
      if (ec) {
        // Out of descriptors or memory: the others are reset when the socket closes, as they were.
        telemetry.rejected(entry.name, "accept_failed");
        log_limited(LogLevel::error, "accept_error", {{"listener", entry.name}, {"error", ec.message()}});
        break;
      }
      start_relay_session(std::move(socket), peer, entry.runtime, *entry.listener, registry);
      ++taken;
    }
    return taken;
  }

  // `next` in force under `next_runtime`, the runtime now current.
  void swap_listeners(std::vector<PlannedListener> next, const std::shared_ptr<const Runtime>& next_runtime) {
    std::vector<std::shared_ptr<Acceptor>> kept;
    for (auto& planned : next) {
      planned.acceptor->name = planned.name;  // accept loops run on this thread too: no race
      planned.acceptor->address = planned.address;
      planned.acceptor->runtime = next_runtime;
      planned.acceptor->listener = next_runtime->config->find_listener(planned.name);
      kept.push_back(planned.acceptor);
    }
    for (auto& old : acceptors) {
      if (std::find(kept.begin(), kept.end(), old) != kept.end()) continue;
      if (!old->inherited) {  // systemd's socket stays open, its queue with it
        const std::size_t queued = take_queued(*old);
        log_event(LogLevel::info, "listener_removed",
                  {{"listener", old->name}, {"address", old->address}, {"queued_sessions", queued}});
      }
      retire(*old);
    }
    for (auto& entry : kept) {
      if (std::find(acceptors.begin(), acceptors.end(), entry) == acceptors.end()) spawn_accept_loop(entry);
    }
    acceptors = std::move(kept);
  }

  void notify_status() {
    const std::string status =
        fmt::format("STATUS={} sessions, {} messages relayed", registry.active(), telemetry.messages_total());
    sd_notify(0, status.c_str());
  }

  // Hands the state to the writer thread: Telemetry's files and the MTA-STS cache are serialized there (both
  // are thread-safe), the TLS-RPT ledger here (it lives on this loop). `done` runs on the writer thread.
  void save_state(StateWriter::Done done = {}) {
    state_writer->write(
        [this] {
          auto files = telemetry.state_files();
          files.push_back(registry.mta_sts().state_file());
          return files;
        },
        std::move(done));
    // Saved after each run already; here what a run cut short by the stop had recorded (or a failed save).
    if (tlsrpt_sender) tlsrpt_sender->save_ledger();
  }

  // The save at stop, after the sessions ended: after any save still being written, and finished before exit.
  // Then the TLS-RPT ledger forgets the reports that tlsrpt.state, now written, no longer holds: a run's own
  // "forget once the store is saved" step is posted to this loop, which does not run again.
  void save_state_now() {
    bool saved = false;  // set on the writer thread before wait() returns (it waits for the job's `done`)
    save_state([&saved](bool ok) { saved = ok; });
    state_writer->wait();
    if (tlsrpt_sender && saved) {
      tlsrpt_sender->forget_reports_saved_gone(std::time(nullptr));
      state_writer->wait();
    }
  }

  // The minute's save. One still being written (a slow disk) is not queued again: this minute is skipped, the
  // next one saves the newer state.
  void save_state_periodically() {
    if (save_in_flight.exchange(true)) {
      telemetry.state_error("save_skipped");
      log_limited(LogLevel::warn, "state_save_skipped",
                  {{"reason", "the previous save is still being written"}});
      return;
    }
    save_state([this](bool) { save_in_flight = false; });
  }

  // At start and after a reload: certificates that expired or expire soon are logged (as --check-config
  // prints them), and mailflow_certificate_expiry_timestamp_seconds gets the notAfter of each, as `next` and
  // the HTTP server loaded them (a file read again here may have been replaced meanwhile).
  void apply_certificates(const Runtime& next) {
    const auto findings = served_certificates(next, http->certificate(), std::chrono::system_clock::now());
    for (const auto& warning : findings.warnings)
      log_event(LogLevel::warn, "config_warning", {{"warning", warning.to_string()}});
    telemetry.certificates_loaded(findings.expiries);
  }

  // The settings of `next` that differ from what the process started with and only a restart applies,
  // compared as what they mean, not as written: "[::1]:9725" and "[0::1]:9725" are one address,
  // "/var/lib/mailflowd" and "/var/lib/mailflowd/" one directory.
  std::vector<const char*> restart_only_changes(const config::Config& next) const {
    std::vector<const char*> changed;
    if (listen_endpoint(next.http.address) != listen_endpoint(started->http.address))
      changed.push_back("http.address");
    if (!same_directory(next.state_dir, started->state_dir)) changed.push_back("state_dir");
    if (next.performance.event_loops != started->performance.event_loops)
      changed.push_back("performance.event_loops");
    return changed;
  }

  void reload() {
    sd_notify(0, "RELOADING=1");
    log_event(LogLevel::info, "reload", {{"config", config_path}});
    // The tests' slow reload (a configuration of many CA bundles on a busy host takes seconds).
    if (const auto delay = failpoint_delay("reload"); delay.count() > 0) std::this_thread::sleep_for(delay);
    auto loaded = config::load_config_file(config_path);
    if (!loaded.errors.empty()) {
      for (const auto& error : loaded.errors)
        log_event(LogLevel::error, "config_error", {{"error", error.to_string()}});
      log_event(LogLevel::error, "reload_refused",
                {{"reason", "invalid configuration, keeping the running one"}});
      telemetry.config_reloaded(false);
      sd_notify(0, "READY=1");
      return;
    }
    // Everything that can refuse the reload first, changing nothing that runs; then all of it is applied,
    // where nothing fails. A reload refused half way (the HTTP settings in force, the rest not) would run
    // what mailflow_config_last_reload_successful and MailflowConfigReloadFailed say is not in force.
    std::shared_ptr<const Runtime> next_runtime;
    std::shared_ptr<const HttpServer::Settings> next_http;
    std::vector<const char*> restart_only;
    std::vector<PlannedListener> next_acceptors;
    try {
      next_runtime = Runtime::build(loaded.config);
      next_http = HttpServer::prepare(loaded.config->http);  // basic auth and certificate
      restart_only = restart_only_changes(*loaded.config);
      next_acceptors = reconcile_listeners(*loaded.config);  // last: opens sockets, closed again if refused
      failpoint("reload.apply");  // the tests' refusal after every step that can refuse
    } catch (const std::exception& e) {
      discard(next_acceptors);
      log_event(LogLevel::error, "reload_refused", {{"reason", e.what()}});
      telemetry.config_reloaded(false);
      sd_notify(0, "READY=1");
      return;
    }
    http->update(std::move(next_http));
    for (const char* setting : restart_only)
      log_event(LogLevel::warn, "reload_partial",
                {{"reason", std::string(setting) + " changes need a restart"}});
    {
      std::lock_guard lock(runtime_mutex);
      runtime = next_runtime;
    }
    swap_listeners(std::move(next_acceptors), next_runtime);
    setup_logging(loaded.config->log);
    log_unused_sockets();
    if (!busy_poll.exchange(loaded.config->performance.busy_poll) && busy_poll) {
      kick_loop(io);
      for (auto& worker : workers) kick_loop(*worker);
    }
    telemetry.configure(*loaded.config);
    registry.mta_sts().set_max_policies(loaded.config->mta_sts.max_policies);
    tlsrpt_sender->reconfigured();
    for (const auto& warning : loaded.warnings)
      log_event(LogLevel::warn, "config_warning", {{"warning", warning.to_string()}});
    apply_certificates(*next_runtime);
    next_runtime->log_problems();
    telemetry.config_reloaded(true);
    log_event(
        LogLevel::info, "reloaded",
        {{"listeners", loaded.config->listeners.size()}, {"connectors", loaded.config->connectors.size()}});
    sd_notify(0, "READY=1");
  }

  asio::awaitable<void> drain() {
    const auto timeout = current()->config->limits.drain_timeout;
    // The unit's TimeoutStopSec=60s holds the default drain_timeout (30s); a longer one would end in
    // systemd's SIGKILL before the windows are saved. The stop may take the drain, the waits after it
    // (closing what is left, a TLS-RPT mail in flight: 5 s each) and the save: systemd waits that long from
    // now (sd_notify(3); it never shortens TimeoutStopSec).
    const auto stop_budget = timeout + drain_close_wait + drain_tlsrpt_wait + drain_save_allowance;
    sd_notify(0, fmt::format("STOPPING=1\nEXTEND_TIMEOUT_USEC={}",
                             std::chrono::duration_cast<std::chrono::microseconds>(stop_budget).count())
                     .c_str());
    // First: the sessions taken from the accept queues below start draining, told 421 4.3.2 at once, as RFC
    // 5321 section 3.8 asks of a server that shuts down; closing the listening sockets with them queued reset
    // them, unanswered, unlogged and uncounted. A socket from systemd keeps its queue for the next start.
    registry.begin_drain();
    std::size_t queued = 0;
    for (auto& entry : acceptors) {
      if (!entry->inherited) queued += take_queued(*entry);
      error_code ec;
      entry->acceptor.close(ec);
    }
    log_event(
        LogLevel::info, "draining",
        {{"sessions", registry.active()}, {"queued_sessions", queued}, {"timeout_ms", timeout.count()}});
    asio::steady_timer tick(io);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (registry.active() > 0 && std::chrono::steady_clock::now() < deadline) {
      tick.expires_after(std::chrono::milliseconds(20));
      co_await tick.async_wait(asio::use_awaitable);
    }
    if (registry.active() > 0) {
      log_event(LogLevel::warn, "drain_timeout", {{"sessions", registry.active()}});
      registry.close_all();
      const auto hard_deadline = std::chrono::steady_clock::now() + drain_close_wait;
      while (registry.active() > 0 && std::chrono::steady_clock::now() < hard_deadline) {
        tick.expires_after(std::chrono::milliseconds(20));
        co_await tick.async_wait(asio::use_awaitable);
      }
    }
    if (tlsrpt_sender && tlsrpt_sender->running()) {
      // A TLS-RPT report mail in flight is closed too, and says so (result=shutdown) before the loop stops.
      tlsrpt_sender->stop();
      const auto until = std::chrono::steady_clock::now() + drain_tlsrpt_wait;
      while (tlsrpt_sender->running() && std::chrono::steady_clock::now() < until) {
        tick.expires_after(std::chrono::milliseconds(20));
        co_await tick.async_wait(asio::use_awaitable);
      }
    }
    http->stop();
    save_state_now();
    log_event(LogLevel::info, "stopped", {{"messages", telemetry.messages_total()}});
    stop_loops();
  }

  // SIGTERM, SIGINT, SIGQUIT: a drain; a second one while draining cuts it short (SignalThread posts the
  // first two: whatever comes after them has nothing left to do).
  void stop_signal() {
    if (stopping) {
      // A second one while draining: the operator does not want to wait.
      log_event(LogLevel::warn, "drain_cut_short", {{"sessions", registry.active()}});
      registry.close_all();
      return;
    }
    // Set here, not when drain() begins: a reload whose SIGHUP came with this signal is not made
    // (settle_and_reload()).
    stopping = true;
    reload_settle_timer.cancel();  // a SIGHUP waiting to reload says reload_ignored now
    // A drain that failed still saves the windows and exits (with sessions cut short) rather than hang.
    asio::co_spawn(io, drain(), on_escape("drain", [this] {
                     registry.close_all();
                     save_state_now();
                     stop_loops();
                   }));
  }

  // SIGHUP: a reload. SignalThread posts one at a time: the next once this one has begun (reload_taken()).
  void reload_signal() { asio::co_spawn(io, settle_and_reload(), on_escape("signals")); }

  asio::awaitable<void> settle_and_reload() {
    if (!stopping) {
      // A SIGTERM/SIGINT sent with this SIGHUP goes first: the loop runs on for reload_settle before the
      // reload begins, and stop_signal() ends the wait when it comes. Without it (`kill -HUP; kill -TERM` to
      // an idle daemon) the reload began on the turn of the loop after the SIGHUP's, before the SIGTERM was
      // taken, and ran whole (seconds with many CA bundles) before the drain. Postfix's master acts on
      // SIGTERM in its signal handler, before anything else.
      reload_settle_timer.expires_after(reload_settle);
      error_code cancelled;  // by stop_signal(): the stop has come
      co_await reload_settle_timer.async_wait(asio::redirect_error(asio::use_awaitable, cancelled));
      // A SIGTERM posted in the turn of the loop that ended the wait runs in the next one. Not after one
      // taken already: the drain of an idle daemon may be over (the loop stopped) before a turn to come.
      if (!stopping) co_await asio::post(io, asio::use_awaitable);
    }
    if (stopping) {
      // Said once: the SIGHUPs' flag stays set (no reload_taken()), so the ones after it post nothing. A
      // deploy hook in a loop during a drain wrote a line per signal, 300 for 300.
      log_event(LogLevel::warn, "reload_ignored",
                {{"reason", "the daemon is stopping (draining its sessions)"}});
      co_return;
    }
    // The reload runs here, on the loop that accepts: a burst (a deploy hook per renewed certificate) made as
    // many full reloads, one after another, with the accepts and this loop's sessions waiting. The SIGHUPs
    // that came so far are this reload's, which reads the file after them; those that come while it runs make
    // one more, as Postfix's master reloads once for any number of SIGHUPs behind its master_gotsighup flag.
    signals.reload_taken();
    reload();
  }

  // main() keeps up to 16 MiB of free heap (M_TRIM_THRESHOLD) so that steady traffic does not page-fault its
  // buffers back in; but after a burst (thousands of sessions, each with TLS state) glibc keeps every freed
  // arena page and RSS never falls. When the session count has fallen to half of its peak, by at least
  // memory_trim_sessions, the memory goes back to the system: steady load never trims. The sessions left then
  // hold blocks all over the heap, and the pages around them stay (84 of 1000 TLS sessions kept 8 MiB): the
  // memory goes back again each time the count falls below what it was at the last trim.
  asio::awaitable<void> give_back_memory() {
    asio::steady_timer timer(io);
    std::size_t peak = 0;
    std::optional<std::size_t> trimmed_at;  // the session count at the last trim
    for (;;) {
      timer.expires_after(memory_check_interval);
      co_await timer.async_wait(asio::use_awaitable);
      if (stopping) co_return;
      const std::size_t active = registry.active();
      peak = std::max(peak, registry.take_peak());
      const bool burst_over = peak >= active + memory_trim_sessions && active <= peak / 2;
      if (burst_over || (trimmed_at && active < *trimmed_at)) {
        malloc_trim(0);
        log_event(LogLevel::info, "memory_trimmed", {{"sessions", active}, {"peak", peak}});
        peak = active;
        trimmed_at = active;
      }
    }
  }

  asio::awaitable<void> name_remotes() {
    asio::steady_timer timer(io);
    std::shared_ptr<Resolver> resolver;
    std::string resolver_key;
    for (;;) {
      timer.expires_after(name_interval);
      co_await timer.async_wait(asio::use_awaitable);
      if (stopping) co_return;
      const auto addresses = telemetry.addresses_to_name(name_batch);
      if (addresses.empty()) continue;
      const auto snapshot = current();  // kept: a reload may replace the current one meanwhile
      if (!resolver || snapshot->resolver->key != resolver_key || resolver->spoiled()) {
        try {
          resolver = std::make_shared<Resolver>(io.get_executor(), *snapshot->resolver, &telemetry);
          resolver_key = snapshot->resolver->key;
        } catch (const std::exception& e) {
          log_event(LogLevel::warn, "dns_unavailable", {{"purpose", "reverse names"}, {"error", e.what()}});
          for (const auto& address : addresses) telemetry.remote_named(address, "", name_failure_ttl);
          continue;
        }
      }
      for (const auto& text : addresses) {
        error_code ec;
        const auto address = asio::ip::make_address(text, ec);
        if (ec) {
          telemetry.remote_named(text, "", name_ttl);
          continue;
        }
        bool failed = false;
        const std::string name = co_await resolver->verified_name(address, failed);
        telemetry.remote_named(text, name, failed && name.empty() ? name_failure_ttl : name_ttl);
        if (stopping) co_return;
      }
    }
  }

  asio::awaitable<void> periodic() {
    asio::steady_timer timer(io);
    // The tests' shorter period (Debug builds: MAILFLOWD_FAILPOINTS=state.save_interval=Nms).
    const auto test_interval = failpoint_delay("state.save_interval");
    for (;;) {
      timer.expires_after(test_interval.count() > 0 ? test_interval : state_save_interval);
      co_await timer.async_wait(asio::use_awaitable);
      if (stopping) co_return;
      save_state_periodically();
      notify_status();
    }
  }
};

Server::Server(std::string config_path, std::shared_ptr<const config::Config> config, SignalThread& signals)
    : impl_(std::make_unique<Impl>(std::move(config_path), std::move(config), signals)) {}

Server::~Server() = default;

int Server::run() {
  Impl& s = *impl_;
  const auto snapshot = s.current();
  const config::Config& config = *snapshot->config;

  // A slow start (a large state_dir, a slow disk) for the tests of signals that come meanwhile.
  if (const auto delay = failpoint_delay("startup"); delay.count() > 0) std::this_thread::sleep_for(delay);
  check_state_dir(config.state_dir);
  s.state_dir_lock = std::make_unique<StateDirLock>(config.state_dir);
  s.state_writer->guard(*s.state_dir_lock);
  s.telemetry.configure(config);  // first: the window and limits that load_state follows
  std::string error;
  if (!s.telemetry.load_state(config.state_dir, error))
    throw std::runtime_error("state_dir " + config.state_dir + ": " + error);
  if (!error.empty()) log_event(LogLevel::warn, "state_discarded", {{"reason", error}});
  error.clear();
  if (!s.registry.mta_sts().load(config.state_dir, std::time(nullptr), error))
    throw std::runtime_error("state_dir " + config.state_dir + ": " + error);
  if (!error.empty()) {
    s.telemetry.state_error("corrupt");
    log_event(LogLevel::warn, "state_discarded", {{"reason", error}});
  }
  s.tlsrpt_sender = std::make_unique<TlsRptSender>(
      s.io.get_executor(), s.telemetry, [&s] { return s.current(); }, config.state_dir, *s.state_writer);
  if (!s.tlsrpt_sender->load_ledger(std::time(nullptr), error))
    throw std::runtime_error("state_dir " + config.state_dir + ": " + error);
  if (!error.empty()) {
    s.telemetry.state_error("corrupt");
    log_event(LogLevel::warn, "state_discarded", {{"reason", error}});
  }
  s.registry.mta_sts().set_max_policies(config.mta_sts.max_policies);
  s.busy_poll = config.performance.busy_poll;

  s.swap_listeners(s.reconcile_listeners(config), snapshot);
  s.log_unused_sockets();  // kept open: a reload that adds the listener still takes it
  snapshot->log_problems();  // said before /healthz answers, as Runtime::build said it
  s.http = std::make_unique<HttpServer>(config.http, s.telemetry, [&s] { return !s.stopping; });
  s.http->start();
  s.apply_certificates(*snapshot);  // what the listeners' contexts and the HTTP server loaded
  s.keep_running("periodic", [&s] { return s.periodic(); });
  s.keep_running("periodic", [&s] { return s.give_back_memory(); });
  s.keep_running("periodic", [&s] { return s.name_remotes(); });
  s.keep_running("periodic", [&s] { return s.tlsrpt_sender->run(s.stopping); });

  std::string listeners;
  for (const auto& l : config.listeners)
    listeners += (listeners.empty() ? "" : ",") + l.name + "=" + l.address.text;
  // From here on a stop signal drains (the loop runs it first thing); before, it ended the start-up.
  s.signals.attach(s.io, {[&s] { s.stop_signal(); }, [&s] { s.reload_signal(); }});
  log_event(LogLevel::info, "started",
            {{"version", MAILFLOW_VERSION}, {"listeners", listeners}, {"http", config.http.address.text}});
  sd_notify(0, "READY=1");
  s.notify_status();

  std::vector<std::thread> pool;
  for (auto& worker : s.workers) pool.emplace_back([&s, &worker] { run_loop(*worker, s.busy_poll); });
  run_loop(s.io, s.busy_poll);
  for (auto& thread : pool) thread.join();
  return 0;
}

}  // namespace mailflow
