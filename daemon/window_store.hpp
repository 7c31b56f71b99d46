#pragma once
// Rolling per-connector message counts in hourly buckets: a plain class, no I/O, no locking, clock passed in.
// Buckets are keyed by absolute UTC hour, so a clock that jumps backwards or forwards neither loses nor
// double-counts: a jump back lands in an older bucket still inside the window, a jump forward rolls old
// buckets off exactly as time would.
#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "proto/tls_version.hpp"

namespace mailflow {

using TlsCounts = std::array<std::uint64_t, 5>;  // indexed by proto::TlsVersion

class WindowStore {
 public:
  using TimePoint = std::chrono::system_clock::time_point;

  explicit WindowStore(std::chrono::hours window = std::chrono::hours(24 * 7));

  void set_window(std::chrono::hours window);  // reload: shrinking drops what falls outside at next prune
  std::chrono::hours window() const { return window_; }

  void add(std::string_view connector, config::Direction direction, proto::TlsVersion version, TimePoint now,
           std::uint64_t messages = 1);

  // Sum over the buckets within the window ending at `now` (the current hour and the window-1 before it).
  TlsCounts window_totals(std::string_view connector, config::Direction direction, TimePoint now) const;
  // Sum over one UTC day (only buckets still inside the window ending at `now`).
  TlsCounts day_totals(std::string_view connector, config::Direction direction, std::chrono::sys_days day,
                       TimePoint now) const;

  struct Key {
    std::string connector;
    config::Direction direction;
    auto operator<=>(const Key&) const = default;
  };
  std::vector<Key> keys() const;  // every (connector, direction) with history, sorted

  void prune(TimePoint now);  // drop buckets that rolled off

  // Text serialization for state_dir: versioned header, one line per non-empty bucket.
  std::string serialize() const;
  // Replaces the content; false (content unchanged) with `error` on a corrupt or foreign input.
  bool deserialize(std::string_view text, std::string& error);

 private:
  std::chrono::hours window_;
  std::map<Key, std::map<std::int64_t, TlsCounts>, std::less<>> buckets_;  // key -> hour since epoch -> counts
};

}  // namespace mailflow
