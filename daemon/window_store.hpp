#pragma once
// Rolling per-connector message counts in hourly buckets: a plain class, no I/O, no locking, clock passed in.
// Buckets are keyed by absolute UTC hour, so a clock that jumps backwards or forwards neither loses nor
// double-counts: a jump back lands in an older bucket still inside the window (and prune() moves the buckets
// then less than a window in the future into the current hour), a jump forward rolls old buckets out of the
// window shown exactly as time would, but prune() deletes them only once newer data is a window ahead of
// them.
#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
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

  void set_window(std::chrono::hours window);  // shrinking drops what falls outside at the next prune()
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
  // Only keys with at least one message inside the window ending at `now` (the report uses this, so a
  // removed connector disappears exactly when its last message rolls off, pruned or not).
  std::vector<Key> keys(TimePoint now) const;

  // The start of the earliest hour with a message inside the window ending at `now`, over every key; nullopt
  // when the window is empty. The report prints no days before it (the daemon, or its state, did not exist).
  std::optional<TimePoint> first_data(TimePoint now) const;

  // Buckets less than a window after the hour of `now` (a clock stepped back) move into that hour (those
  // further ahead stay, unseen: a clock far behind); then the buckets more than a window before the newest
  // one up to `now` are dropped (measured from the data, so a clock far ahead drops nothing).
  void prune(TimePoint now);

  // Copies into `into` the history of at most `most` keys, those after `after` (from the first key when
  // nullopt), and this store's window; returns the last key copied, nullopt when none was left. A save copies
  // the store in such steps under Telemetry's lock, so that a session never waits for the copy of all of it.
  std::optional<Key> copy_to(WindowStore& into, const std::optional<Key>& after, std::size_t most) const;

  // Text serialization for state_dir: versioned header, one line per non-empty bucket, "end" (a file cut at a
  // line end is refused; version 1, written before the end line, is still read).
  std::string serialize() const;
  // Replaces the content; false (content unchanged) with `error` on a corrupt or foreign input.
  bool deserialize(std::string_view text, std::string& error);

 private:
  struct Bucket {
    std::int64_t hour = 0;  // hours since the epoch (UTC)
    TlsCounts counts{};
  };
  // Per key a vector sorted by hour: appends at the back in the common case, prunes at the front, binary
  // search for sums; compact for sparse connectors (only hours with mail use memory), unlike a full ring.
  using Series = std::vector<Bucket>;
  struct KeyLess {
    using is_transparent = void;
    template <class A, class B>
    bool operator()(const A& a, const B& b) const {
      const int c = std::string_view(a.connector).compare(std::string_view(b.connector));
      return c < 0 || (c == 0 && a.direction < b.direction);
    }
  };
  struct KeyView {
    std::string_view connector;
    config::Direction direction;
  };

  const Series* find(std::string_view connector, config::Direction direction) const;
  TlsCounts sum(const Series& series, std::int64_t first_hour, std::int64_t last_hour) const;

  std::chrono::hours window_;
  std::map<Key, Series, KeyLess> series_;
};

}  // namespace mailflow
