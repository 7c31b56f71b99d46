#pragma once
// The drill-down behind each connector: per connector x direction x UTC day two bounded heavy-hitters tables,
// "remotes" (client addresses inbound, MX host addresses outbound; telemetry.top_remotes) and "domains"
// (destination domains, outbound; telemetry.top_domains). Days that leave telemetry.window are dropped.
// Plus the verified reverse names of inbound addresses (a bounded cache with a TTL) and the addresses still
// waiting for one. A plain class: no I/O, no locking, times passed in.
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "config/config.hpp"
#include "daemon/heavy_hitters.hpp"

namespace mailflow {

enum class RemoteTable { remotes, domains };
std::string_view to_string(RemoteTable table);  // "remotes", "domains"

class RemoteStore {
 public:
  using TimePoint = std::chrono::system_clock::time_point;

  struct Limits {
    std::size_t top_remotes = 100;
    std::size_t top_domains = 50;
    bool remotes = true;  // telemetry.remotes: false keeps no remotes tables (domains stay)
    std::chrono::hours window{24 * 7};
  };
  void set_limits(const Limits& limits);  // reload; turning remotes off drops the remotes tables at once
  const Limits& limits() const { return limits_; }

  // Adds to today's (UTC, from `now`) table; observation.time is set from `now`. A remotes observation is
  // ignored while remotes are off. A table made under a smaller limit grows to the current one first.
  void add(std::string_view connector, config::Direction direction, RemoteTable table,
           HeavyHitters::Observation observation, TimePoint now);

  // The days first..last (UTC, inclusive) merged, capped at the table's current limit.
  HeavyHitters merged(std::string_view connector, config::Direction direction, RemoteTable table,
                      std::chrono::sys_days first, std::chrono::sys_days last) const;

  // Days less than a window after today (a clock stepped back) merge into today (those further ahead stay,
  // unseen: a clock far behind); days that left the window are dropped, the window ending at `now` or at the
  // end of the newest day up to today when that is earlier (a clock far ahead drops nothing).
  void prune(TimePoint now);

  // Verified reverse names (PTR, forward-confirmed). name(): the cached name ("" = looked up, none), nullopt
  // when unknown or expired. Addresses of inbound remotes without a cached name queue for a lookup (bounded).
  std::optional<std::string> name(std::string_view address, TimePoint now) const;
  void set_name(std::string_view address, std::string_view name, TimePoint now, std::chrono::seconds ttl);
  std::vector<std::string> take_pending(std::size_t most);
  static constexpr std::size_t kMaxNames = 10'000;
  static constexpr std::size_t kMaxPending = 1'000;

  struct Key {
    std::string connector;
    config::Direction direction;
    RemoteTable table;
    std::int64_t day;  // days since the epoch (UTC)
    auto operator<=>(const Key&) const = default;
  };
  // Copies into `into` at most `most` tables, those after `after` (from the first when nullopt); returns the
  // last key copied, nullopt when none was left. As WindowStore::copy_to: a save copies in steps under a
  // lock. Only what serialize() writes is copied (not the reverse names).
  std::optional<Key> copy_to(RemoteStore& into, const std::optional<Key>& after, std::size_t most) const;

  std::string serialize() const;
  bool deserialize(std::string_view text, std::string& error);  // content unchanged on error

 private:
  std::size_t capacity(RemoteTable table) const;
  void queue_lookup(std::string_view address, TimePoint now);

  Limits limits_;
  std::map<Key, HeavyHitters> tables_;

  struct Name {
    std::string name;
    TimePoint expires;
  };
  std::unordered_map<std::string, Name> names_;
  std::deque<std::string> name_order_;  // insertion order: the oldest is dropped first when full
  std::deque<std::string> pending_;
  std::set<std::string, std::less<>> pending_set_;
};

}  // namespace mailflow
