#include "daemon/remote_store.hpp"

#include <algorithm>
#include <charconv>
#include <limits>
#include <utility>
#include <vector>

namespace mailflow {

namespace {

constexpr std::string_view kHeader = "mailflowd-remotes 2";
// Version 1 had no end line and is still read as it was: a cut at a table's end cannot be told there.
constexpr std::string_view kHeaderV1 = "mailflowd-remotes 1";
constexpr std::string_view kEnd = "end";  // the last line: a file cut at a line end lacks it

std::int64_t day_of(RemoteStore::TimePoint t) {
  return std::chrono::floor<std::chrono::days>(t).time_since_epoch().count();
}

std::int64_t unix_seconds(RemoteStore::TimePoint t) {
  return std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
}

template <class Number>
bool parse_number(std::string_view text, Number& out) {
  if (text.empty()) return false;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && ptr == text.data() + text.size();
}

}  // namespace

std::string_view to_string(RemoteTable table) { return table == RemoteTable::remotes ? "remotes" : "domains"; }

void RemoteStore::set_limits(const Limits& limits) {
  limits_ = limits;
  if (!limits_.remotes) std::erase_if(tables_, [](const auto& entry) { return entry.first.table == RemoteTable::remotes; });
  if (!limits_.remotes) {
    names_.clear();
    name_order_.clear();
    pending_.clear();
    pending_set_.clear();
  }
}

std::size_t RemoteStore::capacity(RemoteTable table) const {
  return table == RemoteTable::remotes ? limits_.top_remotes : limits_.top_domains;
}

void RemoteStore::add(std::string_view connector, config::Direction direction, RemoteTable table,
                      HeavyHitters::Observation observation, TimePoint now) {
  if (table == RemoteTable::remotes && !limits_.remotes) return;
  if (observation.key.empty()) return;
  observation.time = unix_seconds(now);
  Key key{std::string(connector), direction, table, day_of(now)};
  auto it = tables_.find(key);
  if (it == tables_.end()) it = tables_.emplace(std::move(key), HeavyHitters(capacity(table))).first;
  if (it->second.capacity() < capacity(table)) {
    // A larger limit (a reload, or a state file written under a smaller one) holds for the day already begun
    // too: what was dropped stays in "other", the servers seen from now on get the room.
    HeavyHitters grown(capacity(table));
    grown.merge(it->second);
    it->second = std::move(grown);
  }
  it->second.add(observation);
  if (table == RemoteTable::remotes && direction == config::Direction::inbound) queue_lookup(observation.key, now);
}

HeavyHitters RemoteStore::merged(std::string_view connector, config::Direction direction, RemoteTable table,
                                 std::chrono::sys_days first, std::chrono::sys_days last) const {
  HeavyHitters out(capacity(table));
  const Key from{std::string(connector), direction, table, first.time_since_epoch().count()};
  for (auto it = tables_.lower_bound(from); it != tables_.end(); ++it) {
    const Key& key = it->first;
    if (key.connector != connector || key.direction != direction || key.table != table ||
        key.day > last.time_since_epoch().count())
      break;
    out.merge(it->second);
  }
  return out;
}

void RemoteStore::prune(TimePoint now) {
  // As WindowStore::prune: the tables of days less than a window after today (the clock was stepped back
  // since) count as today's, those further ahead stay unseen (a clock far behind), and what rolled off is
  // measured from the newest data up to now, never from a clock ahead of it.
  const std::int64_t today = day_of(now);
  const std::int64_t fold_below = today + (limits_.window.count() + 23) / 24;
  std::vector<std::pair<Key, HeavyHitters>> later;
  for (auto it = tables_.begin(); it != tables_.end();) {
    if (it->first.day <= today || it->first.day >= fold_below) {
      ++it;
      continue;
    }
    later.emplace_back(it->first, std::move(it->second));
    it = tables_.erase(it);
  }
  for (auto& [key, table] : later) {
    Key into = key;
    into.day = today;
    auto it = tables_.find(into);
    if (it == tables_.end()) it = tables_.emplace(into, HeavyHitters(capacity(into.table))).first;
    it->second.merge(table);
  }
  std::optional<std::int64_t> newest;
  for (const auto& entry : tables_)
    if (entry.first.day <= today && (!newest || entry.first.day > *newest)) newest = entry.first.day;
  if (!newest) return;
  // A day stays while any of its hours is inside the window (as WindowStore's day_totals sees it) that ends
  // at `now`, or at the newest day's last hour when that is earlier.
  const auto end = std::min(std::chrono::floor<std::chrono::hours>(now),
                            std::chrono::floor<std::chrono::hours>(TimePoint(std::chrono::days(*newest + 1)) -
                                                                   std::chrono::hours(1)));
  const std::int64_t first_day = day_of(TimePoint(end - limits_.window + std::chrono::hours(1)));
  std::erase_if(tables_, [&](const auto& entry) { return entry.first.day < first_day; });
}

std::optional<std::string> RemoteStore::name(std::string_view address, TimePoint now) const {
  const auto it = names_.find(std::string(address));
  if (it == names_.end() || it->second.expires <= now) return std::nullopt;
  return it->second.name;
}

void RemoteStore::set_name(std::string_view address, std::string_view name, TimePoint now, std::chrono::seconds ttl) {
  if (!limits_.remotes) return;
  auto [it, inserted] = names_.try_emplace(std::string(address));
  it->second = {std::string(name), now + ttl};
  if (!inserted) return;
  name_order_.push_back(it->first);
  while (names_.size() > kMaxNames) {
    names_.erase(name_order_.front());
    name_order_.pop_front();
  }
}

void RemoteStore::queue_lookup(std::string_view address, TimePoint now) {
  if (name(address, now)) return;
  if (pending_.size() >= kMaxPending || pending_set_.contains(address)) return;
  pending_set_.emplace(address);
  pending_.emplace_back(address);
}

std::vector<std::string> RemoteStore::take_pending(std::size_t most) {
  std::vector<std::string> out;
  while (!pending_.empty() && out.size() < most) {
    pending_set_.erase(pending_.front());
    out.push_back(std::move(pending_.front()));
    pending_.pop_front();
  }
  return out;
}

std::optional<RemoteStore::Key> RemoteStore::copy_to(RemoteStore& into, const std::optional<Key>& after,
                                                     std::size_t most) const {
  std::optional<Key> last;
  for (auto it = after ? tables_.upper_bound(*after) : tables_.begin(); it != tables_.end() && most > 0;
       ++it, --most) {
    into.tables_.insert_or_assign(it->first, it->second);
    last = it->first;
  }
  return last;
}

// Header line, then per table: "T connector direction table day count" and `count` lines of the table; "end".
std::string RemoteStore::serialize() const {
  std::string out(kHeader);
  out += '\n';
  std::string body;
  for (const auto& [key, table] : tables_) {
    body.clear();
    table.serialize(body);
    out += "T ";
    append_field(out, key.connector);
    out += ' ';
    out += config::to_string(key.direction);
    out += ' ';
    out += to_string(key.table);
    out += ' ';
    out += std::to_string(key.day);
    out += ' ';
    out += std::to_string(std::count(body.begin(), body.end(), '\n'));
    out += '\n';
    out += body;
  }
  out += kEnd;
  out += '\n';
  return out;
}

bool RemoteStore::deserialize(std::string_view text, std::string& error) {
  std::vector<std::string_view> lines;
  while (!text.empty()) {
    const auto eol = text.find('\n');
    if (eol == std::string_view::npos) {
      error = "truncated (no newline at the end)";
      return false;
    }
    lines.push_back(text.substr(0, eol));
    text.remove_prefix(eol + 1);
  }
  if (lines.empty() || (lines[0] != kHeader && lines[0] != kHeaderV1)) {
    error = "not a mailflowd remotes file (expected header \"" + std::string(kHeader) + "\")";
    return false;
  }
  if (lines[0] == kHeader) {
    if (lines.size() < 2 || lines.back() != kEnd) {
      error = "truncated (no end line)";
      return false;
    }
    lines.pop_back();
  }
  std::map<Key, HeavyHitters> parsed;
  // Counts, errors and bounds over every table (HeavyHitters::deserialize checks each table's): while they
  // fit in 64 bits, so do the weights of a report that merges any of the days.
  std::uint64_t sum = 0;
  std::size_t at = 1;
  while (at < lines.size()) {
    const auto fail = [&](std::string_view why) {
      error = "line " + std::to_string(at + 1) + ": " + std::string(why);
      return false;
    };
    std::string_view fields[6];
    std::size_t count = 0;
    std::string_view line = lines[at];
    while (count < 6) {
      const auto space = line.find(' ');
      fields[count++] = line.substr(0, space);
      if (space == std::string_view::npos) break;
      line.remove_prefix(space + 1);
    }
    if (count != 6 || fields[0] != "T" || line.find(' ') != std::string_view::npos)
      return fail("expected \"T connector direction table day lines\"");
    Key key;
    if (!parse_field(fields[1], key.connector) || key.connector.empty()) return fail("bad connector");
    if (fields[2] == "inbound")
      key.direction = config::Direction::inbound;
    else if (fields[2] == "outbound")
      key.direction = config::Direction::outbound;
    else
      return fail("bad direction");
    if (fields[3] == "remotes")
      key.table = RemoteTable::remotes;
    else if (fields[3] == "domains")
      key.table = RemoteTable::domains;
    else
      return fail("bad table");
    std::size_t body = 0;
    if (!parse_number(fields[4], key.day) || key.day < 0) return fail("bad day");
    if (!parse_number(fields[5], body) || body == 0 || body > lines.size() - at - 1) return fail("bad line count");
    HeavyHitters table;
    std::string table_error;
    if (!table.deserialize(std::span(lines).subspan(at + 1, body), table_error)) return fail(table_error);
    std::uint64_t table_sum = table.total_weight() + table.error_bound();  // fits: the table checked its sum
    for (const auto* entry : table.entries()) table_sum += entry->error;
    if (table_sum > std::numeric_limits<std::uint64_t>::max() - sum)
      return fail("the counts add up to more than 64 bits hold");
    sum += table_sum;
    if (!parsed.emplace(std::move(key), std::move(table)).second) return fail("duplicate table");
    at += 1 + body;
  }
  tables_ = std::move(parsed);
  if (!limits_.remotes) std::erase_if(tables_, [](const auto& entry) { return entry.first.table == RemoteTable::remotes; });
  return true;
}

}  // namespace mailflow
