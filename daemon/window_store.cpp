#include "daemon/window_store.hpp"

#include <algorithm>
#include <charconv>
#include <iterator>
#include <limits>

namespace mailflow {
namespace {

constexpr std::string_view kHeader = "mailflowd-windows 2";
// Version 1 had no end line and is still read as it was: a cut at a line end cannot be told there.
constexpr std::string_view kHeaderV1 = "mailflowd-windows 1";
constexpr std::string_view kEnd = "end";  // the last line: a file cut at a line end lacks it

std::int64_t hour_of(WindowStore::TimePoint t) {
  return std::chrono::floor<std::chrono::hours>(t).time_since_epoch().count();
}

std::string_view direction_name(config::Direction d) {
  return d == config::Direction::inbound ? "inbound" : "outbound";
}

// Connector names are label values ([a-z0-9_-]+ in practice); anything that would break the
// whitespace-separated line format is percent-encoded so that any name survives a round trip.
bool needs_escape(unsigned char c) { return c <= 0x20 || c >= 0x7f || c == '%'; }

void append_escaped(std::string& out, std::string_view name) {
  static constexpr char hex[] = "0123456789ABCDEF";
  for (const char ch : name) {
    const auto c = static_cast<unsigned char>(ch);
    if (needs_escape(c)) {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

bool unescape(std::string_view in, std::string& out) {
  out.clear();
  for (std::size_t i = 0; i < in.size(); ++i) {
    const auto c = static_cast<unsigned char>(in[i]);
    if (c == '%') {
      if (i + 2 >= in.size()) return false;
      const int hi = hex_value(in[i + 1]);
      const int lo = hex_value(in[i + 2]);
      if (hi < 0 || lo < 0) return false;
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else if (needs_escape(c)) {
      return false;
    } else {
      out += static_cast<char>(c);
    }
  }
  return !out.empty();
}

template <class T>
bool parse_number(std::string_view text, T& value) {
  if (text.empty() || text.size() > 20) return false;
  if (text.size() > 1 && text[0] == '0') return false;  // canonical form only
  const auto* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  return ec == std::errc() && ptr == end;
}

void add_counts(TlsCounts& into, const TlsCounts& from) {
  for (std::size_t i = 0; i < into.size(); ++i) into[i] += from[i];
}

bool is_zero(const TlsCounts& counts) {
  return std::all_of(counts.begin(), counts.end(), [](std::uint64_t c) { return c == 0; });
}

}  // namespace

WindowStore::WindowStore(std::chrono::hours window) : window_(std::max(window, std::chrono::hours(1))) {}

void WindowStore::set_window(std::chrono::hours window) { window_ = std::max(window, std::chrono::hours(1)); }

void WindowStore::add(std::string_view connector, config::Direction direction, proto::TlsVersion version,
                      TimePoint now, std::uint64_t messages) {
  if (messages == 0) return;
  const std::int64_t hour = hour_of(now);
  auto it = series_.find(KeyView{connector, direction});
  if (it == series_.end()) it = series_.emplace(Key{std::string(connector), direction}, Series{}).first;
  Series& series = it->second;
  const auto index = static_cast<std::size_t>(version);

  if (series.empty() || series.back().hour < hour) {
    // The common case: time moves forward. Drop what rolled off at the front so memory stays bounded
    // even if nobody calls prune().
    const std::int64_t first = hour - window_.count() + 1;
    if (!series.empty() && series.front().hour < first) {
      const auto keep = std::lower_bound(series.begin(), series.end(), first,
                                         [](const Bucket& b, std::int64_t h) { return b.hour < h; });
      series.erase(series.begin(), keep);
    }
    Bucket bucket{hour, {}};
    bucket.counts[index] = messages;
    series.push_back(bucket);
    return;
  }
  if (series.back().hour == hour) {
    series.back().counts[index] += messages;
    return;
  }
  // The clock went backwards: the message belongs to an older hour, which may or may not have a bucket.
  auto pos = std::lower_bound(series.begin(), series.end(), hour,
                              [](const Bucket& b, std::int64_t h) { return b.hour < h; });
  if (pos == series.end() || pos->hour != hour) pos = series.insert(pos, Bucket{hour, {}});
  pos->counts[index] += messages;
}

const WindowStore::Series* WindowStore::find(std::string_view connector, config::Direction direction) const {
  const auto it = series_.find(KeyView{connector, direction});
  return it == series_.end() ? nullptr : &it->second;
}

TlsCounts WindowStore::sum(const Series& series, std::int64_t first_hour, std::int64_t last_hour) const {
  TlsCounts total{};
  auto it = std::lower_bound(series.begin(), series.end(), first_hour,
                             [](const Bucket& b, std::int64_t h) { return b.hour < h; });
  for (; it != series.end() && it->hour <= last_hour; ++it) add_counts(total, it->counts);
  return total;
}

TlsCounts WindowStore::window_totals(std::string_view connector, config::Direction direction,
                                     TimePoint now) const {
  const Series* series = find(connector, direction);
  if (series == nullptr) return {};
  const std::int64_t last = hour_of(now);
  return sum(*series, last - window_.count() + 1, last);
}

TlsCounts WindowStore::day_totals(std::string_view connector, config::Direction direction,
                                  std::chrono::sys_days day, TimePoint now) const {
  const Series* series = find(connector, direction);
  if (series == nullptr) return {};
  const std::int64_t last = hour_of(now);
  const std::int64_t day_first =
      std::chrono::duration_cast<std::chrono::hours>(day.time_since_epoch()).count();
  return sum(*series, std::max(day_first, last - window_.count() + 1), std::min(day_first + 23, last));
}

std::vector<WindowStore::Key> WindowStore::keys() const {
  std::vector<Key> out;
  out.reserve(series_.size());
  for (const auto& [key, series] : series_)
    if (!series.empty()) out.push_back(key);
  return out;
}

std::vector<WindowStore::Key> WindowStore::keys(TimePoint now) const {
  std::vector<Key> out;
  const std::int64_t last = hour_of(now);
  const std::int64_t first = last - window_.count() + 1;
  for (const auto& [key, series] : series_) {
    const auto it = std::lower_bound(series.begin(), series.end(), first,
                                     [](const Bucket& b, std::int64_t h) { return b.hour < h; });
    if (it != series.end() && it->hour <= last) out.push_back(key);
  }
  return out;
}

std::optional<WindowStore::TimePoint> WindowStore::first_data(TimePoint now) const {
  const std::int64_t last = hour_of(now);
  const std::int64_t first = last - window_.count() + 1;
  std::optional<std::int64_t> earliest;
  for (const auto& [key, series] : series_) {
    const auto it = std::lower_bound(series.begin(), series.end(), first,
                                     [](const Bucket& b, std::int64_t h) { return b.hour < h; });
    for (auto b = it; b != series.end() && b->hour <= last; ++b) {
      if (is_zero(b->counts)) continue;
      if (!earliest || b->hour < *earliest) earliest = b->hour;
      break;
    }
  }
  if (!earliest) return std::nullopt;
  return TimePoint(std::chrono::hours(*earliest));
}

void WindowStore::prune(TimePoint now) {
  const std::int64_t now_hour = hour_of(now);
  const auto after = [](std::int64_t h, const Bucket& b) { return h < b.hour; };
  // Buckets less than a window after the current hour (the clock was stepped back since they were counted)
  // count in the current hour: each message stays counted once, and now, rather than vanishing from the
  // window until the clock has caught up with them. Those a window or more ahead are left as they are,
  // unseen: the clock may be far behind (an RTC reset at boot, before NTP steps it), and folding them would
  // move the whole history into an hour long gone.
  const std::int64_t fold_below = now_hour + window_.count();
  std::optional<std::int64_t> newest;  // the newest hour with data up to now
  for (auto& [key, series] : series_) {
    const auto later = std::upper_bound(series.begin(), series.end(), now_hour, after);
    const auto far = std::lower_bound(later, series.end(), fold_below,
                                      [](const Bucket& b, std::int64_t h) { return b.hour < h; });
    if (later != far) {
      TlsCounts folded{};
      for (auto it = later; it != far; ++it) add_counts(folded, it->counts);
      const auto at = series.erase(later, far);
      const bool has_now = at != series.begin() && std::prev(at)->hour == now_hour;
      const auto into = has_now ? std::prev(at) : series.insert(at, Bucket{now_hour, {}});
      add_counts(into->counts, folded);
    }
    const auto up_to_now = std::upper_bound(series.begin(), series.end(), now_hour, after);
    if (up_to_now != series.begin() && (!newest || std::prev(up_to_now)->hour > *newest))
      newest = std::prev(up_to_now)->hour;
  }
  if (!newest) return;
  // What rolled off is measured from the newest data up to now, not from the clock (as Prometheus's retention
  // is, from the newest block's end: tsdb BeyondTimeRetention): a clock far ahead (a VM's wrong clock at
  // boot, before NTP steps it) shows an empty window but deletes nothing, and the history is back when the
  // clock is corrected. The window shown always ends at `now`; what is kept beyond it is at most one window
  // per key.
  const std::int64_t first = *newest - window_.count() + 1;
  for (auto it = series_.begin(); it != series_.end();) {
    Series& series = it->second;
    const auto keep = std::lower_bound(series.begin(), series.end(), first,
                                       [](const Bucket& b, std::int64_t h) { return b.hour < h; });
    series.erase(series.begin(), keep);
    if (series.empty())
      it = series_.erase(it);
    else
      ++it;
  }
}

std::optional<WindowStore::Key> WindowStore::copy_to(WindowStore& into, const std::optional<Key>& after,
                                                     std::size_t most) const {
  into.window_ = window_;
  std::optional<Key> last;
  for (auto it = after ? series_.upper_bound(*after) : series_.begin(); it != series_.end() && most > 0;
       ++it, --most) {
    into.series_.insert_or_assign(it->first, it->second);
    last = it->first;
  }
  return last;
}

std::string WindowStore::serialize() const {
  std::string out;
  std::size_t buckets = 0;
  for (const auto& entry : series_) buckets += entry.second.size();
  out.reserve(kHeader.size() + 1 + buckets * 64);
  out += kHeader;
  out += '\n';
  char number[24];
  const auto append_number = [&](auto value) {
    const auto [ptr, ec] = std::to_chars(number, number + sizeof number, value);
    out.append(number, ptr);
  };
  std::string name;
  for (const auto& [key, series] : series_) {
    name.clear();
    append_escaped(name, key.connector);
    for (const Bucket& bucket : series) {
      if (is_zero(bucket.counts)) continue;
      append_number(bucket.hour);
      out += ' ';
      out += name;
      out += ' ';
      out += direction_name(key.direction);
      for (const std::uint64_t c : bucket.counts) {
        out += ' ';
        append_number(c);
      }
      out += '\n';
    }
  }
  out += kEnd;
  out += '\n';
  return out;
}

bool WindowStore::deserialize(std::string_view text, std::string& error) {
  std::map<Key, Series, KeyLess> parsed;
  std::size_t line_number = 1;
  const auto fail = [&](std::string_view why) {
    error = "line " + std::to_string(line_number) + ": " + std::string(why);
    return false;
  };

  const auto header_end = text.find('\n');
  const std::string_view header = text.substr(0, header_end);
  if (header_end == std::string_view::npos || (header != kHeader && header != kHeaderV1)) {
    error = "not a mailflowd windows file (expected header \"" + std::string(kHeader) + "\")";
    return false;
  }
  const bool needs_end = header == kHeader;
  bool ended = false;
  std::string_view rest = text.substr(header_end + 1);
  std::string connector;
  auto current = parsed.end();
  // Every count of the file added up: while it fits in 64 bits, so does any total taken over them (a key's
  // window, a direction's keys). Far beyond any real count; past it only a corrupt or forged file goes.
  std::uint64_t total = 0;
  while (!rest.empty()) {
    ++line_number;
    const auto eol = rest.find('\n');
    if (eol == std::string_view::npos) return fail("truncated (no newline at the end)");
    std::string_view line = rest.substr(0, eol);
    rest.remove_prefix(eol + 1);
    if (ended) return fail("a line after the end line");
    if (needs_end && line == kEnd) {
      ended = true;
      continue;
    }

    std::string_view fields[8];
    std::size_t count = 0;
    while (!line.empty()) {
      const auto space = line.find(' ');
      const std::string_view field = line.substr(0, space);
      if (field.empty()) return fail("empty field");
      if (count == 8) return fail("too many fields");
      fields[count++] = field;
      if (space == std::string_view::npos) break;
      line.remove_prefix(space + 1);
      if (line.empty()) return fail("trailing space");
    }
    if (count != 8) return fail("expected 8 fields: hour connector direction and 5 counts");

    std::int64_t hour = 0;
    if (!parse_number(fields[0], hour) || hour < 0) return fail("bad hour");
    if (!unescape(fields[1], connector)) return fail("bad connector name");
    config::Direction direction;
    if (fields[2] == "inbound")
      direction = config::Direction::inbound;
    else if (fields[2] == "outbound")
      direction = config::Direction::outbound;
    else
      return fail("bad direction");
    Bucket bucket{hour, {}};
    for (std::size_t i = 0; i < bucket.counts.size(); ++i) {
      if (!parse_number(fields[3 + i], bucket.counts[i])) return fail("bad count");
      if (bucket.counts[i] > std::numeric_limits<std::uint64_t>::max() - total)
        return fail("the counts add up to more than 64 bits hold");
      total += bucket.counts[i];
    }

    // Lines of one key come together in our own files: skip the lookup then.
    if (current == parsed.end() || current->first.direction != direction ||
        current->first.connector != connector) {
      current = parsed.find(KeyView{connector, direction});
      if (current == parsed.end()) current = parsed.emplace(Key{connector, direction}, Series{}).first;
    }
    if (!is_zero(bucket.counts)) current->second.push_back(bucket);
  }

  if (needs_end && !ended) return fail("truncated (no end line)");
  for (auto& [key, series] : parsed) {
    std::sort(series.begin(), series.end(), [](const Bucket& a, const Bucket& b) { return a.hour < b.hour; });
    for (std::size_t i = 1; i < series.size(); ++i)
      if (series[i].hour == series[i - 1].hour) {
        error = "duplicate bucket for " + key.connector + " " + std::string(direction_name(key.direction)) +
                " at hour " + std::to_string(series[i].hour);
        return false;
      }
  }
  std::erase_if(parsed, [](const auto& entry) { return entry.second.empty(); });
  series_ = std::move(parsed);
  return true;
}

}  // namespace mailflow
