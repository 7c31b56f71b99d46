#pragma once
// The MTA-STS policy cache (RFC 8461 3.3, 5.1): the policies fetched, per recipient domain, persisted in
// state_dir/mta-sts.state. No Asio here (the fetch and the lookup are daemon/mta_sts.hpp): it is one of the
// state stores (mailflow::state), and tests/fuzz loads its file as it loads the others.
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "daemon/state_file.hpp"
#include "proto/mta_sts.hpp"

namespace mailflow {

struct CachedPolicy {
  std::string id;  // the TXT record's id when fetched
  proto::mta_sts::Policy policy;
  std::int64_t fetched_at = 0;  // unix seconds
  std::int64_t expires_at = 0;  // fetched_at + max_age
};

// RFC 8461 3.3: after a failed fetch, the same domain and id are not fetched again for this many seconds.
inline constexpr std::int64_t mta_sts_fetch_retry_after = 300;
// RFC 8461 3.3: a cached policy is refreshed (fetched again, its id unchanged) once it is this many seconds
// old, or half its max_age where that is shorter, so that a fetch blocked at its expiry does not end it.
inline constexpr std::int64_t mta_sts_refresh_after = 86400;

// The policies fetched, per domain (thread-safe). Persisted as state_dir/mta-sts.state; the failed fetches
// are remembered in memory only.
class MtaStsCache {
 public:
  explicit MtaStsCache(std::size_t max_policies = 10000) : max_policies_(max_policies) {}
  void set_max_policies(std::size_t max_policies);  // mta_sts.max_policies, at start and reload (trims)
  std::optional<CachedPolicy> find(std::string_view domain, std::int64_t now) const;  // unexpired only
  // Forgets a failed fetch; at the bound, drops the policies that expire soonest (expired or not: expiry is
  // find()'s to judge at its own time, and a clock far ahead would make every one expired).
  void store(const std::string& domain, CachedPolicy policy);
  std::size_t size() const;
  // Whether the policy that the TXT record's `id` names is to be fetched: not when an unexpired policy with
  // that id is cached and not yet due for its refresh, nor within mta_sts_fetch_retry_after of a failed fetch
  // for the domain and id.
  bool fetch_due(std::string_view domain, std::string_view id, std::int64_t now) const;
  // A fetch for the domain and id failed (at most max_policies remembered; the oldest are dropped first).
  void fetch_failed(const std::string& domain, const std::string& id, std::int64_t now);

  std::string serialize() const;
  // False: corrupt. Drops the policies expired at `now` or at the newest fetch in the text, whichever is
  // earlier (a clock far ahead drops none: they are back when it is corrected).
  bool deserialize(std::string_view text, std::int64_t now, std::string& error);
  // Its name in state_dir and serialize(), for the StateWriter (atomic save); load moves a corrupt file aside
  // (returns true, error says so) and starts empty.
  StateFile state_file() const;
  bool load(const std::string& state_dir, std::int64_t now, std::string& error);

 private:
  void trim_locked();  // to max_policies_, dropping those that expire soonest (mutex_ held)

  mutable std::mutex mutex_;
  std::size_t max_policies_;
  std::map<std::string, CachedPolicy, std::less<>> policies_;
  struct FailedFetch {
    std::string id;
    std::int64_t at = 0;
  };
  std::map<std::string, FailedFetch, std::less<>> failed_fetches_;
};

}  // namespace mailflow
