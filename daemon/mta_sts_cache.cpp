// The MTA-STS policy cache and its file; see mta_sts_cache.hpp.
#include "daemon/mta_sts_cache.hpp"

#include <algorithm>
#include <limits>
#include <set>
#include <sstream>
#include <vector>

#include "daemon/state_text.hpp"

namespace mailflow {

namespace {

constexpr std::string_view kCacheFile = "mta-sts.state";
constexpr std::string_view kCacheHeader = "mailflowd-mta-sts 2";
// Version 1 had no end line and is still read as it was: a cut at a line end cannot be told there.
constexpr std::string_view kCacheHeaderV1 = "mailflowd-mta-sts 1";
constexpr std::size_t kMaxCacheFileBytes = 64u << 20;

}  // namespace

std::optional<CachedPolicy> MtaStsCache::find(std::string_view domain, std::int64_t now) const {
  std::lock_guard lock(mutex_);
  const auto it = policies_.find(domain);
  if (it == policies_.end() || it->second.expires_at <= now) return std::nullopt;
  return it->second;
}

void MtaStsCache::store(const std::string& domain, CachedPolicy policy) {
  std::lock_guard lock(mutex_);
  failed_fetches_.erase(domain);
  policies_[domain] = std::move(policy);
  // Bounded: the ones that expire soonest go (expired ones first), only as many as the bound needs. Not every
  // one expired at the current time: at the bound (a busy relay's cache always is) a fetch under a clock far
  // ahead (a VM before NTP steps it) dropped them all, for good at the next save, the downgrade that the
  // load's rule (deserialize) keeps away (RFC 8461 section 10.2).
  trim_locked();
}

void MtaStsCache::trim_locked() {
  if (policies_.size() <= max_policies_) return;
  // The ones that expire soonest go, however many: sorted once, not searched for one by one.
  std::vector<decltype(policies_)::iterator> all;
  for (auto it = policies_.begin(); it != policies_.end(); ++it) all.push_back(it);
  const auto drop = all.begin() + static_cast<std::ptrdiff_t>(all.size() - max_policies_);
  std::nth_element(all.begin(), drop, all.end(),
                   [](const auto& a, const auto& b) { return a->second.expires_at < b->second.expires_at; });
  for (auto it = all.begin(); it != drop; ++it) policies_.erase(*it);
}

bool MtaStsCache::fetch_due(std::string_view domain, std::string_view id, std::int64_t now) const {
  std::lock_guard lock(mutex_);
  const auto cached = policies_.find(domain);
  if (cached != policies_.end() && cached->second.id == id && cached->second.expires_at > now) {
    const CachedPolicy& policy = cached->second;
    const auto refresh_at =
        policy.fetched_at + std::min(mta_sts_refresh_after, (policy.expires_at - policy.fetched_at) / 2);
    // Fetched "after now": under a clock that was ahead and has been stepped back since (NTP correcting a
    // VM's boot clock). Its age is unknown, so it is refreshed now rather than once the clock has caught up.
    if (now < refresh_at && policy.fetched_at <= now) return false;
  }
  // The same for a failure: one recorded a day ahead kept the domain unfetched for that day, each message
  // going on without its policy and without a report.
  const auto failed = failed_fetches_.find(domain);
  return failed == failed_fetches_.end() || failed->second.id != id || failed->second.at > now ||
         now - failed->second.at >= mta_sts_fetch_retry_after;
}

void MtaStsCache::fetch_failed(const std::string& domain, const std::string& id, std::int64_t now) {
  std::lock_guard lock(mutex_);
  failed_fetches_[domain] = {id, now};
  if (failed_fetches_.size() <= max_policies_) return;
  // Bounded as the policies are: the ones that no longer hold anything back go first, then the oldest, never
  // the one just recorded (many failures in the same second: it could be the "oldest", and its domain would
  // be fetched again for the next message).
  std::erase_if(failed_fetches_, [&](const auto& entry) {
    return entry.second.at > now || now - entry.second.at >= mta_sts_fetch_retry_after;
  });
  while (failed_fetches_.size() > max_policies_) {
    auto oldest = failed_fetches_.end();
    for (auto it = failed_fetches_.begin(); it != failed_fetches_.end(); ++it) {
      if (it->first != domain && (oldest == failed_fetches_.end() || it->second.at < oldest->second.at))
        oldest = it;
    }
    if (oldest == failed_fetches_.end()) break;  // only this one is left
    failed_fetches_.erase(oldest);
  }
}

void MtaStsCache::set_max_policies(std::size_t max_policies) {
  std::lock_guard lock(mutex_);
  max_policies_ = max_policies;
  trim_locked();  // a lower bound at reload, and a file loaded at start before the bound was set
}

std::size_t MtaStsCache::size() const {
  std::lock_guard lock(mutex_);
  return policies_.size();
}

// One line per domain: domain TAB id TAB fetched_at TAB expires_at, then TAB and each policy line (policy
// lines are printable ASCII without tabs: parse_policy checked them; they are parsed again on load); "end".
std::string MtaStsCache::serialize() const {
  std::lock_guard lock(mutex_);
  std::string out = std::string(kCacheHeader) + "\n";
  for (const auto& [domain, cached] : policies_) {
    out += domain + "\t" + cached.id + "\t" + std::to_string(cached.fetched_at) + "\t" +
           std::to_string(cached.expires_at);
    for (const auto& line : cached.policy.lines) out += "\t" + line;
    out += "\n";
  }
  return out += state_text::end_line;
}

bool MtaStsCache::deserialize(std::string_view text, std::int64_t now, std::string& error) {
  // Every line ends in a newline: a file cut inside its last line ("mx: mx1.exam") is not loaded.
  if (!text.empty() && text.back() != '\n') {
    error = "truncated (no newline at the end)";
    return false;
  }
  const std::string_view header = text.substr(0, text.find('\n'));
  if (header != kCacheHeader && header != kCacheHeaderV1) {
    error = "not a mailflowd MTA-STS cache (first line)";
    return false;
  }
  if (header == kCacheHeader) {
    const auto before_end = state_text::before_end_line(text);
    if (!before_end) {
      error = "truncated (no end line)";
      return false;
    }
    text = *before_end;
  }
  std::map<std::string, CachedPolicy, std::less<>> loaded;
  std::set<std::string, std::less<>> seen;
  std::istringstream in{std::string(text)};
  std::string line;
  std::getline(in, line);  // the header
  int number = 1;
  while (std::getline(in, line)) {
    ++number;
    std::vector<std::string> fields;
    std::size_t start = 0;
    for (;;) {
      const auto tab = line.find('\t', start);
      fields.push_back(line.substr(start, tab == std::string::npos ? std::string::npos : tab - start));
      if (tab == std::string::npos) break;
      start = tab + 1;
    }
    const auto bad = [&](std::string_view why) {
      error = "line " + std::to_string(number) + ": " + std::string(why);
      return false;
    };
    if (fields.size() < 5 || fields[0].empty()) return bad("too few fields");
    CachedPolicy cached;
    cached.id = fields[1];
    try {
      std::size_t used = 0;
      cached.fetched_at = std::stoll(fields[2], &used);
      if (used != fields[2].size()) return bad("bad fetch time");
      cached.expires_at = std::stoll(fields[3], &used);
      if (used != fields[3].size()) return bad("bad expiry time");
    } catch (const std::exception&) {
      return bad("bad time");
    }
    // Times store() never writes: the refresh time (fetch_due: expires_at - fetched_at) would overflow.
    if (cached.fetched_at < 0 || cached.expires_at < cached.fetched_at) return bad("bad times");
    std::string body;
    for (std::size_t i = 4; i < fields.size(); ++i) body += fields[i] + "\n";
    std::string why;
    auto policy = proto::mta_sts::parse_policy(body, why);
    if (!policy) return bad("invalid policy: " + why);
    cached.policy = std::move(*policy);
    // Never longer than its max_age (RFC 8461 5.1), as store() keeps it: a hand-edited expiry is cut back.
    if (cached.expires_at - cached.fetched_at > std::int64_t{cached.policy.max_age})
      cached.expires_at = cached.fetched_at + cached.policy.max_age;
    // Each domain once, as written: a second line would silently replace the first.
    if (!seen.insert(fields[0]).second) return bad("domain " + fields[0] + " again");
    loaded[fields[0]] = std::move(cached);
  }
  // Expired is measured from the newest fetch in the file, or from `now` where that is earlier, never from a
  // clock ahead of every fetch: a clock far ahead at boot (before NTP steps it) dropped every cached policy,
  // for good at the next save, and each domain in enforce mode was without its policy after the clock was
  // corrected until a fetch got through (RFC 8461 section 10.2: the cache is what defeats a blocked fetch).
  // Find() still uses only what is unexpired at its `now`.
  std::int64_t newest_fetch = std::numeric_limits<std::int64_t>::min();
  for (const auto& [domain, cached] : loaded) newest_fetch = std::max(newest_fetch, cached.fetched_at);
  const std::int64_t expired_at = std::min(now, newest_fetch);
  std::erase_if(loaded, [&](const auto& entry) { return entry.second.expires_at <= expired_at; });
  std::lock_guard lock(mutex_);
  policies_ = std::move(loaded);
  trim_locked();  // a file written under a larger mta_sts.max_policies
  return true;
}

StateFile MtaStsCache::state_file() const { return {std::string(kCacheFile), serialize()}; }

bool MtaStsCache::load(const std::string& state_dir, std::int64_t now, std::string& error) {
  std::string text;
  error.clear();
  const auto read = read_state_file(state_dir, kCacheFile, kMaxCacheFileBytes, text, error);
  if (read == StateRead::absent) return true;
  if (read == StateRead::failed) return false;
  std::string why = error;
  if (read == StateRead::read && deserialize(text, now, why)) {
    error.clear();
    return true;
  }
  error = std::string(kCacheFile) + " is unusable (" + why + "); " +
          move_state_file_aside(state_dir, kCacheFile, now) + ", starting with an empty MTA-STS cache";
  return true;
}

}  // namespace mailflow
