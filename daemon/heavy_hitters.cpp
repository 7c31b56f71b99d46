#include "daemon/heavy_hitters.hpp"

#include <algorithm>
#include <charconv>
#include <limits>
#include <map>

namespace mailflow {

namespace {

constexpr std::size_t kVersions = proto::all_tls_versions.size();

bool needs_escape(unsigned char c) { return c <= 0x20 || c >= 0x7f || c == '%' || c == ',' || c == ':'; }

template <class Number>
bool parse_number(std::string_view text, Number& out) {
  if (text.empty()) return false;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && ptr == text.data() + text.size();
}

template <class Number>
void append_number(std::string& out, Number value) {
  char buffer[24];
  const auto [ptr, ec] = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, ptr);
}

// Splits on single spaces; false when there are not exactly `expected` fields.
bool split(std::string_view line, std::span<std::string_view> fields) {
  std::size_t count = 0;
  while (true) {
    if (count == fields.size()) return false;
    const auto space = line.find(' ');
    fields[count++] = line.substr(0, space);
    if (fields[count - 1].empty()) return false;
    if (space == std::string_view::npos) break;
    line.remove_prefix(space + 1);
  }
  return count == fields.size();
}

void append_stats(std::string& out, const HeavyHitters::Stats& stats) {
  append_number(out, stats.refused);
  out += ' ';
  append_number(out, stats.first_seen);
  out += ' ';
  append_number(out, stats.last_seen);
  for (const auto count : stats.messages) {
    out += ' ';
    append_number(out, count);
  }
}

// fields: refused first last c0..c4
bool parse_stats(std::span<const std::string_view> fields, HeavyHitters::Stats& stats) {
  if (!parse_number(fields[0], stats.refused) || !parse_number(fields[1], stats.first_seen) ||
      !parse_number(fields[2], stats.last_seen))
    return false;
  for (std::size_t i = 0; i < kVersions; ++i)
    if (!parse_number(fields[3 + i], stats.messages[i])) return false;
  return stats.first_seen <= stats.last_seen;
}

void remember_domain(std::vector<std::string>& domains, std::string_view domain) {
  if (domain.empty()) return;
  const auto it = std::find(domains.begin(), domains.end(), domain);
  if (it != domains.end()) domains.erase(it);
  domains.insert(domains.begin(), std::string(domain));
  if (domains.size() > HeavyHitters::kMaxDomains) domains.resize(HeavyHitters::kMaxDomains);
}

void count_cipher(std::vector<HeavyHitters::Cipher>& ciphers, std::string_view name, std::uint64_t count) {
  if (name.empty() || count == 0) return;
  for (auto& cipher : ciphers) {
    if (cipher.name == name) {
      cipher.count += count;
      return;
    }
  }
  if (ciphers.size() < HeavyHitters::kMaxCiphers) {
    ciphers.push_back({std::string(name), count});
    return;
  }
  // Full: the least counted makes room (space-saving in miniature: the newcomer inherits its count).
  auto smallest = std::min_element(ciphers.begin(), ciphers.end(),
                                   [](const auto& a, const auto& b) { return a.count < b.count; });
  smallest->name = std::string(name);
  smallest->count += count;
}

}  // namespace

void append_field(std::string& out, std::string_view text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  if (text.empty()) {
    out += '-';
    return;
  }
  if (text == "-") {
    out += "%2D";
    return;
  }
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (needs_escape(c)) {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += ch;
    }
  }
}

bool parse_field(std::string_view field, std::string& out) {
  out.clear();
  if (field == "-") return true;
  for (std::size_t i = 0; i < field.size(); ++i) {
    const auto c = static_cast<unsigned char>(field[i]);
    if (c == '%') {
      if (i + 2 >= field.size()) return false;
      unsigned value = 0;
      const auto [ptr, ec] = std::from_chars(field.data() + i + 1, field.data() + i + 3, value, 16);
      if (ec != std::errc() || ptr != field.data() + i + 3) return false;
      out += static_cast<char>(value);
      i += 2;
    } else if (needs_escape(c)) {
      return false;
    } else {
      out += static_cast<char>(c);
    }
  }
  return true;
}

std::uint64_t HeavyHitters::Stats::weight() const {
  std::uint64_t total = refused;
  for (const auto count : messages) total += count;
  return total;
}

std::string_view HeavyHitters::Entry::cipher() const {
  const Cipher* best = nullptr;
  for (const auto& c : ciphers)
    if (best == nullptr || c.count > best->count) best = &c;
  return best == nullptr ? std::string_view{} : std::string_view(best->name);
}

HeavyHitters::HeavyHitters(std::size_t capacity) : capacity_(std::max<std::size_t>(1, capacity)) {}

void HeavyHitters::add_stats(Stats& into, const Stats& from) {
  if (from.weight() == 0 && from.first_seen == 0) return;
  for (std::size_t i = 0; i < kVersions; ++i) into.messages[i] += from.messages[i];
  into.refused += from.refused;
  if (from.first_seen != 0 && (into.first_seen == 0 || from.first_seen < into.first_seen))
    into.first_seen = from.first_seen;
  into.last_seen = std::max(into.last_seen, from.last_seen);
}

void HeavyHitters::merge_entry(Entry& into, const Entry& from) {
  // The newer side's name and domains come first.
  const bool from_newer = from.stats.last_seen >= into.stats.last_seen;
  if (from_newer && !from.name.empty()) into.name = from.name;
  if (into.name.empty()) into.name = from.name;
  if (from_newer) {
    for (auto it = from.domains.rbegin(); it != from.domains.rend(); ++it) remember_domain(into.domains, *it);
  } else {
    for (const auto& domain : from.domains)
      if (into.domains.size() < kMaxDomains && std::find(into.domains.begin(), into.domains.end(), domain) ==
                                                   into.domains.end())
        into.domains.push_back(domain);
  }
  for (const auto& cipher : from.ciphers) count_cipher(into.ciphers, cipher.name, cipher.count);
  if (from.refused_version && (from_newer || !into.refused_version)) into.refused_version = from.refused_version;
  if (!from.policy.empty() && (from_newer || into.policy.empty())) into.policy = from.policy;
  add_stats(into.stats, from.stats);
  into.error += from.error;
}

void HeavyHitters::add(const Observation& observation) {
  auto it = index_.find(std::string(observation.key));
  std::size_t slot;
  if (it != index_.end()) {
    slot = it->second;
    by_estimate_.erase({entries_[slot].estimate(), slot});
  } else if (entries_.size() < capacity_) {
    slot = entries_.size();
    Entry entry;
    entry.key = std::string(observation.key);
    entry.error = untracked_bound_;  // it may have been seen and dropped before (a smaller table, a merge)
    entries_.push_back(std::move(entry));
    index_.emplace(entries_.back().key, slot);
  } else {
    // Space-saving: the smallest estimate makes room; its counts go to "other", its estimate becomes the
    // newcomer's error (the newcomer may have been that heavy already, uncounted).
    const auto smallest = *by_estimate_.begin();
    by_estimate_.erase(by_estimate_.begin());
    slot = smallest.second;
    Entry& evicted = entries_[slot];
    add_stats(other_, evicted.stats);
    untracked_bound_ = std::max(untracked_bound_, smallest.first);
    index_.erase(evicted.key);
    evicted = Entry{};
    evicted.key = std::string(observation.key);
    evicted.error = untracked_bound_;
    index_.emplace(evicted.key, slot);
  }

  Entry& entry = entries_[slot];
  Stats& stats = entry.stats;
  if (stats.first_seen == 0 || observation.time < stats.first_seen) stats.first_seen = observation.time;
  stats.last_seen = std::max(stats.last_seen, observation.time);
  if (observation.version) {
    ++stats.messages[static_cast<std::size_t>(*observation.version)];
    count_cipher(entry.ciphers, observation.cipher, 1);
  } else {
    ++stats.refused;
    if (observation.offered) entry.refused_version = observation.offered;
  }
  if (!observation.name.empty()) entry.name = std::string(observation.name);
  if (!observation.policy.empty()) entry.policy = std::string(observation.policy);
  for (auto d = observation.domains.rbegin(); d != observation.domains.rend(); ++d) remember_domain(entry.domains, *d);
  by_estimate_.emplace(entry.estimate(), slot);
}

void HeavyHitters::rebuild_index() {
  index_.clear();
  by_estimate_.clear();
  for (std::size_t slot = 0; slot < entries_.size(); ++slot) {
    index_.emplace(entries_[slot].key, slot);
    by_estimate_.emplace(entries_[slot].estimate(), slot);
  }
}

void HeavyHitters::merge(const HeavyHitters& other) {
  // A key tracked on one side only may have had up to the other side's untracked bound there.
  std::map<std::string, Entry> merged;
  for (const auto& entry : entries_) {
    Entry copy = entry;
    copy.error += other.untracked_bound_;
    merged.emplace(copy.key, std::move(copy));
  }
  for (const auto& entry : other.entries_) {
    auto found = merged.find(entry.key);
    if (found == merged.end()) {
      Entry copy = entry;
      copy.error += untracked_bound_;
      merged.emplace(copy.key, std::move(copy));
    } else {
      found->second.error -= other.untracked_bound_;  // it is tracked there: no guess needed
      merge_entry(found->second, entry);
    }
  }
  std::vector<Entry> all;
  all.reserve(merged.size());
  for (auto& [key, entry] : merged) all.push_back(std::move(entry));
  // Keep the heaviest `capacity` (ties by key, so that a merge is deterministic).
  std::sort(all.begin(), all.end(), [](const Entry& a, const Entry& b) {
    return a.estimate() != b.estimate() ? a.estimate() > b.estimate() : a.key < b.key;
  });
  std::uint64_t bound = untracked_bound_ + other.untracked_bound_;
  add_stats(other_, other.other_);
  for (std::size_t i = capacity_; i < all.size(); ++i) {
    add_stats(other_, all[i].stats);
    bound = std::max(bound, all[i].estimate());
  }
  if (all.size() > capacity_) all.resize(capacity_);
  untracked_bound_ = bound;
  entries_ = std::move(all);
  rebuild_index();
}

std::uint64_t HeavyHitters::total_weight() const {
  std::uint64_t total = other_.weight();
  for (const auto& entry : entries_) total += entry.stats.weight();
  return total;
}

std::vector<const HeavyHitters::Entry*> HeavyHitters::entries() const {
  std::vector<const Entry*> out;
  out.reserve(entries_.size());
  for (const auto& entry : entries_) out.push_back(&entry);
  std::sort(out.begin(), out.end(), [](const Entry* a, const Entry* b) {
    return a->estimate() != b->estimate() ? a->estimate() > b->estimate() : a->key < b->key;
  });
  return out;
}

// Format, one line each, fields separated by one space:
//   O capacity untracked_bound refused first last c0 c1 c2 c3 c4
//   E key name error refused first last c0 c1 c2 c3 c4 refused_version domains ciphers policy
// refused_version: "-" or 0..4 (proto::TlsVersion); domains: "-" or d1,d2; ciphers: "-" or name:count,...;
// policy: "-" or its name
void HeavyHitters::serialize(std::string& out) const {
  out += "O ";
  append_number(out, capacity_);
  out += ' ';
  append_number(out, untracked_bound_);
  out += ' ';
  append_stats(out, other_);
  out += '\n';
  for (const Entry* entry : entries()) {
    out += "E ";
    append_field(out, entry->key);
    out += ' ';
    append_field(out, entry->name);
    out += ' ';
    append_number(out, entry->error);
    out += ' ';
    append_stats(out, entry->stats);
    out += ' ';
    if (entry->refused_version)
      append_number(out, static_cast<unsigned>(*entry->refused_version));
    else
      out += '-';
    out += ' ';
    if (entry->domains.empty()) out += '-';
    for (std::size_t i = 0; i < entry->domains.size(); ++i) {
      if (i != 0) out += ',';
      append_field(out, entry->domains[i]);
    }
    out += ' ';
    if (entry->ciphers.empty()) out += '-';
    for (std::size_t i = 0; i < entry->ciphers.size(); ++i) {
      if (i != 0) out += ',';
      append_field(out, entry->ciphers[i].name);
      out += ':';
      append_number(out, entry->ciphers[i].count);
    }
    out += ' ';
    if (entry->policy.empty())
      out += '-';
    else
      append_field(out, entry->policy);
    out += '\n';
  }
}

bool HeavyHitters::deserialize(std::span<const std::string_view> lines, std::string& error) {
  const auto fail = [&](std::size_t line, std::string_view why) {
    error = "table line " + std::to_string(line + 1) + ": " + std::string(why);
    return false;
  };
  if (lines.empty()) return fail(0, "missing \"O\" line");
  std::array<std::string_view, 11> head;
  std::size_t capacity = 0;
  std::uint64_t bound = 0;
  Stats other;
  if (!split(lines[0], head) || head[0] != "O") return fail(0, "expected \"O\" and 10 fields");
  if (!parse_number(head[1], capacity) || capacity == 0 || capacity > 1'000'000) return fail(0, "bad capacity");
  if (!parse_number(head[2], bound)) return fail(0, "bad bound");
  if (!parse_stats(std::span(head).subspan(3), other)) return fail(0, "bad counts");
  if (lines.size() - 1 > capacity) return fail(0, "more entries than the capacity");
  // Every count, error and bound of the table added up must fit in 64 bits: then so does any sum a merge or a
  // report takes (the remote store checks the same over all its tables). Only a corrupt or forged file
  // exceeds it.
  std::uint64_t sum = 0;
  const auto add = [&sum](std::uint64_t value) {
    if (value > std::numeric_limits<std::uint64_t>::max() - sum) return false;
    sum += value;
    return true;
  };
  const auto add_counts = [&add](const Stats& stats) {
    return add(stats.refused) && std::all_of(stats.messages.begin(), stats.messages.end(), add);
  };
  constexpr std::string_view kTooLarge = "the counts add up to more than 64 bits hold";
  if (!add(bound) || !add_counts(other)) return fail(0, kTooLarge);

  std::vector<Entry> entries;
  std::map<std::string, bool, std::less<>> seen;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    std::array<std::string_view, 16> f;
    if (!split(lines[i], f) || f[0] != "E") return fail(i, "expected \"E\" and 15 fields");
    Entry entry;
    if (!parse_field(f[1], entry.key) || entry.key.empty()) return fail(i, "bad key");
    if (!seen.emplace(entry.key, true).second) return fail(i, "duplicate key");
    if (!parse_field(f[2], entry.name)) return fail(i, "bad name");
    if (!parse_number(f[3], entry.error)) return fail(i, "bad error");
    if (!parse_stats(std::span(f).subspan(4, 8), entry.stats)) return fail(i, "bad counts");
    if (!add(entry.error) || !add_counts(entry.stats)) return fail(i, kTooLarge);
    if (f[12] != "-") {
      unsigned version = 0;
      if (!parse_number(f[12], version) || version >= kVersions) return fail(i, "bad refused version");
      entry.refused_version = static_cast<proto::TlsVersion>(version);
    }
    if (f[13] != "-") {
      std::string_view rest = f[13];
      while (true) {
        const auto comma = rest.find(',');
        std::string domain;
        if (!parse_field(rest.substr(0, comma), domain) || domain.empty()) return fail(i, "bad domain");
        entry.domains.push_back(std::move(domain));
        if (entry.domains.size() > kMaxDomains) return fail(i, "too many domains");
        if (comma == std::string_view::npos) break;
        rest.remove_prefix(comma + 1);
      }
    }
    if (f[14] != "-") {
      std::string_view rest = f[14];
      while (true) {
        const auto comma = rest.find(',');
        const std::string_view item = rest.substr(0, comma);
        const auto colon = item.rfind(':');
        Cipher cipher;
        if (colon == std::string_view::npos || !parse_field(item.substr(0, colon), cipher.name) ||
            cipher.name.empty() || !parse_number(item.substr(colon + 1), cipher.count))
          return fail(i, "bad cipher");
        if (!add(cipher.count)) return fail(i, kTooLarge);
        entry.ciphers.push_back(std::move(cipher));
        if (entry.ciphers.size() > kMaxCiphers) return fail(i, "too many ciphers");
        if (comma == std::string_view::npos) break;
        rest.remove_prefix(comma + 1);
      }
    }
    if (f[15] != "-" && (!parse_field(f[15], entry.policy) || entry.policy.empty())) return fail(i, "bad policy");
    entries.push_back(std::move(entry));
  }
  capacity_ = capacity;
  untracked_bound_ = bound;
  other_ = other;
  entries_ = std::move(entries);
  rebuild_index();
  return true;
}

}  // namespace mailflow
