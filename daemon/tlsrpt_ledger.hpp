#pragma once
// The retry bookkeeping of TLS-RPT sending (daemon/tlsrpt_sender.hpp), without I/O or clock: per UTC day and
// policy domain, which rua addresses already took the report (or refused it for good) and when the first try
// was. A report is done when every rua took it or refused it permanently; one that still fails temporarily
// `retry_for` after its first try is given up. No I/O here: serialize() and parse() give the text that the
// sender keeps in state_dir/tlsrpt-ledger.state, so that a restart neither sends a report again to a rua that
// took it nor restarts its retry_for. A report done with (sent, or given up) stays, with nothing left to try,
// as long as the store may hold its date (max_days): sessions the store records for that day after it was
// sent (the clock stepped back over midnight) never make a second report of one day. Bounded as the store:
// keep_only() drops what left the store and is older than that. Not thread-safe: one sender owns it.
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mailflow {

enum class TlsRptDelivery { success, temporary_failure, permanent_failure };
std::string_view to_string(TlsRptDelivery result);  // "success", "temporary_failure", "permanent_failure"

class TlsRptLedger {
 public:
  using Key = std::pair<std::string, std::string>;  // date, domain

  struct Verdict {
    enum class Kind { retry, done, gave_up };
    Kind kind = Kind::retry;
    // The rua given up now, never having taken the report: all those left (gave_up), or, where some of those
    // left were not tried in this run (retry), the others.
    std::vector<std::string> given_up;
  };

  // The addresses of `rua` still to try for this report (all of them the first time).
  std::vector<std::string> to_try(const Key& key, const std::vector<std::string>& rua) const;
  // One address of this report tried at unix time `now`: as soon as it is known, so that a stop or crash
  // while a later address of the same report is being tried does not lose that this one took it.
  void tried(const Key& key, const std::string& address, TlsRptDelivery result, std::int64_t now);
  // The report's try at unix time `now` is over (every address of to_try() was tried(), or is in `untried`:
  // not tried in this run): done, given up, or to be tried again. An address in `untried` is never given up
  // here, only at a try that asked it (its report is then tried again), though retry_for still counts from
  // the report's first try. Once done or given up, to_try() gives nothing for it until keep_only() drops it.
  Verdict verdict(const Key& key, const std::vector<std::string>& rua, std::int64_t now,
                  std::chrono::seconds retry_for, const std::set<std::string, std::less<>>& untried = {});
  // tried() for each of `outcomes`, then verdict().
  Verdict record(const Key& key, const std::vector<std::string>& rua,
                 const std::vector<std::pair<std::string, TlsRptDelivery>>& outcomes, std::int64_t now,
                 std::chrono::seconds retry_for);
  // Reports no longer in the store (sent, or dropped after max_days) whose date is before `oldest_date` (the
  // oldest day the store may still hold, "YYYY-MM-DD") are forgotten here too; returns how many.
  std::size_t keep_only(const std::vector<Key>& keys, std::string_view oldest_date);
  std::size_t size() const { return entries_.size(); }
  // The report has had its first try (and is being retried, or is done with).
  bool tried_before(const Key& key) const { return entries_.contains(key); }

  // The state file's text: a header line, then per report "report DATE DOMAIN FIRST_TRY FINISHED-RUA,...".
  std::string serialize() const;
  // The ledger serialize() wrote; nullopt + error ("line N: why") for anything else.
  static std::optional<TlsRptLedger> parse(std::string_view text, std::string& error);

 private:
  struct Entry {
    std::int64_t first_try = 0;
    std::set<std::string, std::less<>> finished;  // took it (success) or refused it for good
  };
  Entry& entry(const Key& key, std::int64_t now);  // made at the report's first try
  std::map<Key, Entry> entries_;
};

}  // namespace mailflow
