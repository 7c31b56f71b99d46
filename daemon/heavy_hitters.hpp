#pragma once
// A bounded heavy-hitters table (space-saving, Metwally, Agrawal and El Abbadi 2005): the remote servers or
// destination domains behind a connector, at most `capacity` of them, the rest summed in one "other" row.
// A plain class: no I/O, no locking, times passed in (unix seconds).
//
// Exact while at most `capacity` distinct keys were seen. Above that, a new key takes the place of the entry
// with the smallest estimate; the evicted entry's counts move to "other" and the newcomer starts with
// `error` = that smallest estimate. So an entry's counts are what was seen while it was tracked (never more
// than the truth), its true weight is at most weight() + error, and every key not tracked has a true weight
// of at most error_bound() (the smallest estimate, <= total / capacity). Entries + other always add up to
// exactly what was added: the report's totals stay exact.
//
// Mergeable (Agarwal et al., "Mergeable summaries", 2012): merging two tables adds the estimates of common
// keys, charges a key missing from a full table that table's smallest estimate as error, and keeps the
// `capacity` largest; the bound stays total / capacity over the merged stream. Days merge into a window.
#include <array>
#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "daemon/window_store.hpp"  // TlsCounts
#include "proto/tls_version.hpp"

namespace mailflow {

class HeavyHitters {
 public:
  static constexpr std::size_t kMaxDomains = 4;  // domains kept per entry (the most recent distinct ones)
  static constexpr std::size_t kMaxCiphers = 3;  // ciphers counted per entry; the most seen is reported

  struct Cipher {
    std::string name;
    std::uint64_t count = 0;
  };

  // What is known of one remote (or domain), and of "other".
  struct Stats {
    TlsCounts messages{};     // delivered messages by proto::TlsVersion
    // Inbound remotes: handshakes refused (e.g. below a listener's min_version). Outbound domains: sessions that
    // failed the domain's DANE or MTA-STS policy.
    std::uint64_t refused = 0;
    std::int64_t first_seen = 0;  // unix seconds; 0 = never
    std::int64_t last_seen = 0;
    std::uint64_t weight() const;  // messages + refused: what the table ranks by
  };

  struct Entry {
    std::string key;   // address or domain
    std::string name;  // EHLO/HELO name (inbound), MX host name (outbound); the last one seen
    std::vector<std::string> domains;  // sender (inbound) or destination (outbound) domains, most recent first
    std::vector<Cipher> ciphers;       // at most kMaxCiphers
    std::optional<proto::TlsVersion> refused_version;  // the version the last refused handshake offered
    std::string policy;  // outbound: the policy of the last session ("dane", "mta-sts", "none"); "" unknown
    Stats stats;
    std::uint64_t error = 0;  // the key's true weight is at most stats.weight() + error
    std::uint64_t estimate() const { return stats.weight() + error; }
    std::string_view cipher() const;  // the most seen one ("" when none)
  };

  // What one message (or refused handshake) adds.
  struct Observation {
    std::string_view key;
    std::string_view name;
    std::string_view cipher;
    std::span<const std::string> domains;
    std::optional<proto::TlsVersion> version;  // a delivered message; nullopt: a refused handshake
    std::optional<proto::TlsVersion> offered;  // refused: the version the client offered, when known
    std::string_view policy;  // outbound: the policy that governed the session (with no version: it failed it)
    std::int64_t time = 0;                     // unix seconds
  };

  explicit HeavyHitters(std::size_t capacity = 100);

  std::size_t capacity() const { return capacity_; }
  void add(const Observation& observation);
  void merge(const HeavyHitters& other);  // keeps this table's capacity

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty() && other_.weight() == 0; }
  // Any key not tracked had a true weight of at most this; 0 while the table is exact (no key was dropped).
  std::uint64_t error_bound() const { return untracked_bound_; }
  bool exact() const { return untracked_bound_ == 0; }
  const Stats& other() const { return other_; }
  std::uint64_t total_weight() const;
  // Heaviest (largest estimate) first; ties by key, so renderings are stable.
  std::vector<const Entry*> entries() const;

  // One line per entry plus one "other" line, appended to `out` (see heavy_hitters.cpp for the format).
  void serialize(std::string& out) const;
  // Replaces the content from lines made by serialize (without their end of line); false with `error`
  // (content unchanged) on anything malformed.
  bool deserialize(std::span<const std::string_view> lines, std::string& error);

 private:
  static void add_stats(Stats& into, const Stats& from);
  static void merge_entry(Entry& into, const Entry& from);
  void rebuild_index();

  std::size_t capacity_;
  std::uint64_t untracked_bound_ = 0;  // the largest weight a key no longer (or never) tracked may have had
  std::vector<Entry> entries_;
  std::unordered_map<std::string, std::size_t> index_;          // key -> slot in entries_
  std::set<std::pair<std::uint64_t, std::size_t>> by_estimate_;  // (estimate, slot): the smallest first
  Stats other_;
};

// Escaping for the state files: a field never contains a space, newline, '%' or ','; "" is written as "-".
void append_field(std::string& out, std::string_view text);
bool parse_field(std::string_view field, std::string& out);

}  // namespace mailflow
