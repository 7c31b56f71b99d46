#pragma once
// One SMTP session relayed client -> mailflowd -> upstream, as one coroutine on one event loop.
#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/ip/tcp.hpp>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "config/config.hpp"
#include "daemon/runtime.hpp"

namespace mailflow {

class MtaStsCache;
class Telemetry;
class RelaySession;

// What all sessions share: telemetry, the MTA-STS policies, per-IP accounting and the drain signal.
// Thread-safe.
class SessionRegistry {
 public:
  explicit SessionRegistry(Telemetry& telemetry);
  ~SessionRegistry();

  Telemetry& telemetry() { return telemetry_; }
  // The MTA-STS policies fetched for recipient domains (persisted by the server in state_dir/mta-sts.state).
  MtaStsCache& mta_sts() { return *mta_sts_; }

  // A session slot of max_sessions (after PROXY): false when `limit` sessions hold one already. Taken and
  // counted under one lock, so that exactly `limit` are served: active() counts every accepted connection,
  // those being refused and those still sending their PROXY header included.
  bool admit_session(std::size_t limit);
  void release_session();
  // Per client address (after PROXY): false when the address already has `limit` sessions.
  bool admit_address(const std::array<std::uint8_t, 16>& address, std::uint32_t limit);
  void release_address(const std::array<std::uint8_t, 16>& address);

  void add(const std::shared_ptr<RelaySession>& session);
  void remove(RelaySession* session);
  std::size_t active() const;
  // The most sessions open at once since the last call (which starts the next period at the current count).
  std::size_t take_peak();

  bool draining() const;
  // Idle sessions answer 421 and close; busy ones finish their transaction first.
  void begin_drain();
  // Drain timeout expired: close whatever is left.
  void close_all();

 private:
  Telemetry& telemetry_;
  std::unique_ptr<MtaStsCache> mta_sts_;
  mutable std::mutex mutex_;
  bool draining_ = false;
  std::size_t peak_ = 0;
  std::size_t admitted_ = 0;
  // Sessions per client address (IPv4 mapped into IPv6). Keyed by the bytes themselves: a 16-byte string key
  // is one past the short-string buffer, an allocation at every admission and release (issue #16).
  std::map<std::array<std::uint8_t, 16>, std::uint32_t> per_address_;
  std::unordered_map<RelaySession*, std::weak_ptr<RelaySession>> sessions_;
};

class Resolver;

// What the sessions of one event loop share, for as long as the loop runs: create one on the thread that runs
// the loop, around io_context::run (it is the thread's "current" loop until destroyed, before the loop is).
class LoopScope {
 public:
  struct Resources {
    std::shared_ptr<Resolver> resolver;  // DNS for mx upstreams (one ub_ctx per loop)
    ResolverSettings resolver_settings;  // the newest settings a session asked with (loop_resolver)
    // /etc/hosts, then DNS: fixed upstreams' host names (Runtime::hosts_resolver), a ub_ctx of its own
    std::shared_ptr<Resolver> hosts_resolver;
    ResolverSettings hosts_resolver_settings;
  };
  LoopScope();
  ~LoopScope();
  LoopScope(const LoopScope&) = delete;
  LoopScope& operator=(const LoopScope&) = delete;
  static Resources* current();  // null outside a LoopScope

 private:
  Resources resources_;
  Resources* previous_;
};

// Starts the session coroutine on the socket's executor (the event loop the session was accepted onto);
// `peer` is the client's address as accept() gave it. The session keeps `runtime` for its whole life, so a
// reload never changes the rules under a running transaction.
void start_relay_session(boost::asio::ip::tcp::socket socket, const boost::asio::ip::tcp::endpoint& peer,
                         std::shared_ptr<const Runtime> runtime, const config::Listener& listener,
                         SessionRegistry& registry);

}  // namespace mailflow
