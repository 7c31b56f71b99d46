#include "daemon/tlsrpt_ledger.hpp"


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

TlsRptLedger::Verdict TlsRptLedger::record(const Key& key, const std::vector<std::string>& rua,
                                           const std::vector<std::pair<std::string, TlsRptDelivery>>& outcomes,
                                           std::int64_t now, std::chrono::seconds retry_for) {
  auto [it, fresh] = entries_.try_emplace(key);
  if (fresh) it->second.first_try = now;
  Entry& entry = it->second;
  for (const auto& [address, result] : outcomes) {
    if (result != TlsRptDelivery::temporary_failure) entry.finished.insert(address);
  }
  Verdict verdict;
  std::vector<std::string> left;
  for (const auto& address : rua) {
    if (!entry.finished.contains(address)) left.push_back(address);
  }
  if (left.empty()) {
    verdict.kind = Verdict::Kind::done;
    entries_.erase(it);
  } else if (now - entry.first_try >= retry_for.count()) {
    verdict.kind = Verdict::Kind::gave_up;
    verdict.given_up = std::move(left);
    entries_.erase(it);
  }
  return verdict;
}

void TlsRptLedger::keep_only(const std::vector<Key>& keys) {
  const std::set<Key> kept(keys.begin(), keys.end());
  std::erase_if(entries_, [&](const auto& entry) { return !kept.contains(entry.first); });
}

}  // namespace mailflow
