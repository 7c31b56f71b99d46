#include "daemon/tlsrpt_ledger.hpp"

#include <limits>

#include "daemon/state_text.hpp"

namespace mailflow {

std::string_view to_string(TlsRptDelivery result) {
  switch (result) {
    case TlsRptDelivery::success:
      return "success";
    case TlsRptDelivery::temporary_failure:
      return "temporary_failure";
    case TlsRptDelivery::permanent_failure:
      return "permanent_failure";
  }
  return "temporary_failure";
}

std::vector<std::string> TlsRptLedger::to_try(const Key& key, const std::vector<std::string>& rua) const {
  const auto it = entries_.find(key);
  if (it == entries_.end()) return rua;
  std::vector<std::string> out;
  for (const auto& address : rua) {
    if (!it->second.finished.contains(address)) out.push_back(address);
  }
  return out;
}

TlsRptLedger::Entry& TlsRptLedger::entry(const Key& key, std::int64_t now) {
  auto [it, fresh] = entries_.try_emplace(key);
  if (fresh) it->second.first_try = now;
  return it->second;
}

void TlsRptLedger::tried(const Key& key, const std::string& address, TlsRptDelivery result,
                         std::int64_t now) {
  Entry& tried = entry(key, now);
  if (result != TlsRptDelivery::temporary_failure) tried.finished.insert(address);
}

TlsRptLedger::Verdict TlsRptLedger::record(const Key& key, const std::vector<std::string>& rua,
                                           const std::vector<std::pair<std::string, TlsRptDelivery>>& outcomes,
                                           std::int64_t now, std::chrono::seconds retry_for) {
  for (const auto& [address, result] : outcomes) tried(key, address, result, now);
  return verdict(key, rua, now, retry_for);
}

TlsRptLedger::Verdict TlsRptLedger::verdict(const Key& key, const std::vector<std::string>& rua,
                                            std::int64_t now, std::chrono::seconds retry_for,
                                            const std::set<std::string, std::less<>>& untried) {
  Entry& entry = this->entry(key, now);
  Verdict verdict;
  std::vector<std::string> left;
  for (const auto& address : rua) {
    if (!entry.finished.contains(address)) left.push_back(address);
  }
  // A report done with stays here, every rua finished, until the store has forgotten it too (keep_only): were it
  // forgotten here first, a crash before the store's save would bring it back from the older state file, unknown
  // here, and it would go out again to every rua.
  if (left.empty()) {
    verdict.kind = Verdict::Kind::done;
  } else if (now - entry.first_try >= retry_for.count()) {
    for (auto& address : left) {
      if (untried.contains(address)) continue;
      entry.finished.insert(address);
      verdict.given_up.push_back(std::move(address));
    }
    if (verdict.given_up.size() == left.size()) verdict.kind = Verdict::Kind::gave_up;
  }
  return verdict;
}

std::size_t TlsRptLedger::keep_only(const std::vector<Key>& keys, std::string_view oldest_date) {
  const std::set<Key> kept(keys.begin(), keys.end());
  return std::erase_if(entries_, [&](const auto& entry) {
    return !kept.contains(entry.first) && std::string_view(entry.first.first) < oldest_date;
  });
}

namespace {
constexpr std::string_view kHeader = "mailflowd-tlsrpt-ledger 2";
// Version 1 had no end line and is still read as it was: a cut at a line end cannot be told there.
constexpr std::string_view kHeaderV1 = "mailflowd-tlsrpt-ledger 1";
}  // namespace

std::string TlsRptLedger::serialize() const {
  using state_text::encode;
  std::string out = std::string(kHeader) + "\n";
  for (const auto& [key, entry] : entries_) {
    out += "report " + key.first + " " + encode(key.second) + " " + std::to_string(entry.first_try) + " " +
           state_text::encode_list({entry.finished.begin(), entry.finished.end()}) + "\n";
  }
  return out += state_text::end_line;
}

std::optional<TlsRptLedger> TlsRptLedger::parse(std::string_view text, std::string& error) {
  TlsRptLedger ledger;
  std::size_t number_of_line = 0;
  bool header = false;
  while (!text.empty()) {
    const auto end = text.find('\n');
    if (end == std::string_view::npos) {
      error = "line " + std::to_string(number_of_line + 1) + ": no line end (a cut file)";
      return std::nullopt;
    }
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(end + 1);
    ++number_of_line;
    const auto bad = [&](std::string_view why) {
      error = "line " + std::to_string(number_of_line) + ": " + std::string(why);
      return std::nullopt;
    };
    if (!header) {
      if (line != kHeader && line != kHeaderV1) return bad("not a mailflowd TLS-RPT ledger");
      header = true;
      if (line == kHeader) {
        const auto before_end = state_text::before_end_line(text);
        if (!before_end) return bad("truncated (no end line)");
        text = *before_end;
      }
      continue;
    }
    const auto f = state_text::split_spaces(line);
    if (f.size() != 5 || f[0] != "report") return bad("unexpected line");
    const auto domain = state_text::decode(f[2]);
    const auto first_try = state_text::number(f[3]);
    const auto finished = state_text::decode_list(f[4]);
    if (!state_text::valid_date(f[1]) || !domain || domain->empty() || !first_try ||
        *first_try > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) || !finished)
      return bad("malformed report");
    Key key{std::string(f[1]), *domain};
    if (!ledger.entries_.empty() && !(ledger.entries_.rbegin()->first < key))
      return bad("reports out of order or repeated");
    ledger.entries_.emplace_hint(
        ledger.entries_.end(), std::move(key),
        Entry{static_cast<std::int64_t>(*first_try), {finished->begin(), finished->end()}});
  }
  if (!header) {
    error = "empty file";
    return std::nullopt;
  }
  return ledger;
}

}  // namespace mailflow
