// HeavyHitters (space-saving, mergeable) and RemoteStore (per connector x direction x day tables, names):
// exact below the bound, the error bound above it against exact counts, merges, persistence, corrupt input.
#include "daemon/heavy_hitters.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "daemon/remote_store.hpp"

namespace {

using namespace std::chrono;
using mailflow::HeavyHitters;
using mailflow::RemoteStore;
using mailflow::RemoteTable;
using mailflow::config::Direction;
using mailflow::proto::TlsVersion;

HeavyHitters::Observation message(std::string_view key, TlsVersion version, std::int64_t time = 1000,
                                  std::string_view cipher = "") {
  HeavyHitters::Observation o;
  o.key = key;
  o.version = version;
  o.time = time;
  o.cipher = cipher;
  return o;
}

std::map<std::string, const HeavyHitters::Entry*> by_key(const HeavyHitters& table) {
  std::map<std::string, const HeavyHitters::Entry*> out;
  for (const auto* entry : table.entries()) out[entry->key] = entry;
  return out;
}

// A skewed stream (Zipf-like, s = 1.1) over `keys` keys, deterministic.
std::vector<std::string> skewed_stream(std::size_t length, std::size_t keys, unsigned seed) {
  std::vector<double> weights;
  for (std::size_t i = 1; i <= keys; ++i) weights.push_back(1.0 / std::pow(static_cast<double>(i), 1.1));
  std::discrete_distribution<std::size_t> pick(weights.begin(), weights.end());
  std::mt19937 random(seed);
  std::vector<std::string> out;
  for (std::size_t i = 0; i < length; ++i) out.push_back("198.51." + std::to_string(pick(random)));
  return out;
}

// The guarantees a reader of the report relies on, checked against the exact counts of the stream.
void check_bounds(const HeavyHitters& table, const std::map<std::string, std::uint64_t>& exact) {
  std::uint64_t total = 0;
  for (const auto& [key, count] : exact) total += count;
  CHECK(table.total_weight() == total);  // entries + other add up exactly
  CHECK(table.size() <= table.capacity());
  CHECK(table.error_bound() <= total / table.capacity());
  const auto tracked = by_key(table);
  for (const auto& [key, entry] : tracked) {
    const std::uint64_t truth = exact.at(key);
    CHECK(entry->stats.weight() <= truth);               // never counts more than was seen
    CHECK(truth <= entry->stats.weight() + entry->error);  // the error bounds what it missed
    CHECK(entry->error <= total / table.capacity());
  }
  for (const auto& [key, count] : exact) {
    if (!tracked.contains(key)) CHECK(count <= table.error_bound());
  }
}

TEST_CASE("heavy hitters: exact while the distinct keys fit") {
  HeavyHitters table(4);
  const std::string domains[] = {"contoso.com"};
  for (int i = 0; i < 5; ++i) table.add(message("203.0.113.7", TlsVersion::tls10, 100 + i, "AES128-SHA"));
  table.add(message("203.0.113.7", TlsVersion::tls12, 90, "ECDHE-RSA-AES256-GCM-SHA384"));
  auto named = message("203.0.113.8", TlsVersion::tls13, 200, "TLS_AES_256_GCM_SHA384");
  named.name = "mx2.contoso.com";
  named.domains = domains;
  table.add(named);
  HeavyHitters::Observation refused;
  refused.key = "203.0.113.9";
  refused.offered = TlsVersion::tls10;
  refused.time = 300;
  table.add(refused);
  table.add(message("203.0.113.10", TlsVersion::none));

  CHECK(table.exact());
  CHECK(table.error_bound() == 0);
  CHECK(table.other().weight() == 0);
  const auto entries = table.entries();
  REQUIRE(entries.size() == 4);
  CHECK(entries[0]->key == "203.0.113.7");  // heaviest first
  CHECK(entries[0]->stats.messages[1] == 5);
  CHECK(entries[0]->stats.messages[3] == 1);
  CHECK(entries[0]->stats.first_seen == 90);
  CHECK(entries[0]->stats.last_seen == 104);
  CHECK(entries[0]->cipher() == "AES128-SHA");
  const auto tracked = by_key(table);
  CHECK(tracked.at("203.0.113.8")->name == "mx2.contoso.com");
  CHECK(tracked.at("203.0.113.8")->domains == std::vector<std::string>{"contoso.com"});
  CHECK(tracked.at("203.0.113.9")->stats.refused == 1);
  CHECK(tracked.at("203.0.113.9")->stats.weight() == 1);
  CHECK(tracked.at("203.0.113.9")->refused_version == TlsVersion::tls10);
  for (const auto* e : entries) CHECK(e->error == 0);
}

TEST_CASE("heavy hitters: the error is bounded above the capacity (skewed stream, exact counts)") {
  HeavyHitters table(50);
  std::map<std::string, std::uint64_t> exact;
  for (const auto& key : skewed_stream(20'000, 2'000, 7)) {
    table.add(message(key, TlsVersion::tls12));
    ++exact[key];
  }
  CHECK_FALSE(table.exact());
  CHECK(table.size() == 50);
  check_bounds(table, exact);
  // The heavy hitters are found: every key above total / capacity is tracked, and the top 5 are the true top 5.
  const auto tracked = by_key(table);
  for (const auto& [key, count] : exact)
    if (count > 20'000 / 50) CHECK(tracked.contains(key));
  const auto entries = table.entries();
  for (int i = 0; i < 5; ++i) CHECK(entries[static_cast<std::size_t>(i)]->key == "198.51." + std::to_string(i));
}

TEST_CASE("heavy hitters: 1,000,000 distinct addresses stay in bounded memory") {
  HeavyHitters table(100);
  for (std::uint32_t i = 0; i < 1'000'000; ++i) {
    const std::string key = std::to_string(10 + (i >> 16)) + "." + std::to_string((i >> 8) & 255) + "." +
                            std::to_string(i & 255) + ".1";
    table.add(message(key, TlsVersion::tls13));
  }
  CHECK(table.size() == 100);
  CHECK(table.total_weight() == 1'000'000);
  CHECK(table.other().messages[4] + 100 == 1'000'000);  // each tracked one seen once, the rest in "other"
  CHECK(table.error_bound() <= 1'000'000 / 100);
  std::string text;
  table.serialize(text);
  CHECK(text.size() < 100 * 200);
}

TEST_CASE("heavy hitters: merging days keeps counts exact below the bound and bounded above it") {
  SUBCASE("exact") {
    HeavyHitters monday(10), tuesday(10);
    monday.add(message("a", TlsVersion::tls10, 100));
    monday.add(message("b", TlsVersion::tls12, 110));
    tuesday.add(message("a", TlsVersion::tls10, 200));
    tuesday.add(message("a", TlsVersion::tls13, 210));
    tuesday.add(message("c", TlsVersion::none, 220));
    HeavyHitters week(10);
    week.merge(monday);
    week.merge(tuesday);
    CHECK(week.exact());
    const auto tracked = by_key(week);
    REQUIRE(tracked.size() == 3);
    CHECK(tracked.at("a")->stats.messages[1] == 2);
    CHECK(tracked.at("a")->stats.messages[4] == 1);
    CHECK(tracked.at("a")->stats.first_seen == 100);
    CHECK(tracked.at("a")->stats.last_seen == 210);
    CHECK(tracked.at("c")->stats.messages[0] == 1);
    CHECK(week.entries()[0]->key == "a");
  }
  SUBCASE("over the capacity: a week of skewed days against the exact week") {
    std::map<std::string, std::uint64_t> exact;
    HeavyHitters week(40);
    for (unsigned day = 0; day < 7; ++day) {
      HeavyHitters table(40);
      for (const auto& key : skewed_stream(5'000, 1'500, 100 + day)) {
        table.add(message(key, TlsVersion::tls10));
        ++exact[key];
      }
      week.merge(table);
    }
    CHECK(week.size() == 40);
    check_bounds(week, exact);
    CHECK(week.entries()[0]->key == "198.51.0");
  }
  SUBCASE("days that each fit but together do not: the merged days are no longer exact") {
    // What operations.md says of the report: exact while the days it covers have no more distinct servers
    // together than the capacity, not merely each day.
    HeavyHitters monday(2), tuesday(2);
    monday.add(message("a", TlsVersion::tls12, 100));
    monday.add(message("b", TlsVersion::tls12, 110));
    tuesday.add(message("c", TlsVersion::tls10, 200));
    CHECK(monday.exact());
    CHECK(tuesday.exact());
    HeavyHitters week(2);
    week.merge(monday);
    week.merge(tuesday);
    CHECK_FALSE(week.exact());
    CHECK(week.size() == 2);
    CHECK(week.other().weight() == 1);
    CHECK(week.error_bound() == 1);
    CHECK(week.total_weight() == 3);
  }
  SUBCASE("a smaller capacity caps the merge; what is dropped lands in other") {
    HeavyHitters day(10);
    for (int i = 0; i < 6; ++i)
      for (int n = 0; n <= i; ++n) day.add(message("k" + std::to_string(i), TlsVersion::tls12));
    HeavyHitters small(3);
    small.merge(day);
    CHECK(small.size() == 3);
    CHECK(small.total_weight() == day.total_weight());
    CHECK(small.other().weight() == 1 + 2 + 3);
    CHECK(small.error_bound() == 3);
    CHECK(small.entries()[0]->key == "k5");
  }
}

TEST_CASE("heavy hitters: serialization round trip") {
  HeavyHitters table(3);
  const std::string domains[] = {"contoso.com", "odd,domain with space"};
  auto o = message("2001:db8::1", TlsVersion::tls11, 500, "ECDHE-RSA-AES128-SHA");
  o.name = "mx 1%.example";
  o.domains = domains;
  o.policy = "mta-sts";
  table.add(o);
  table.add(o);
  table.add(message("-", TlsVersion::tls13, 600));
  table.add(message("-", TlsVersion::tls13, 610));
  HeavyHitters::Observation refused;
  refused.key = "203.0.113.1";
  refused.offered = TlsVersion::tls10;
  refused.time = 700;
  table.add(refused);
  table.add(message("203.0.113.2", TlsVersion::tls12, 800));  // evicts: error and other are written too

  std::string text;
  table.serialize(text);
  std::vector<std::string_view> lines;
  for (std::string_view rest = text; !rest.empty();) {
    const auto eol = rest.find('\n');
    lines.push_back(rest.substr(0, eol));
    rest.remove_prefix(eol + 1);
  }
  HeavyHitters loaded;
  std::string error;
  REQUIRE(loaded.deserialize(lines, error));
  CHECK(loaded.capacity() == 3);
  CHECK(loaded.error_bound() == table.error_bound());
  CHECK(loaded.other().weight() == table.other().weight());
  std::string again;
  loaded.serialize(again);
  CHECK(again == text);
  const auto tracked = by_key(loaded);
  REQUIRE(tracked.contains("2001:db8::1"));
  CHECK(tracked.at("2001:db8::1")->name == "mx 1%.example");
  CHECK(tracked.at("2001:db8::1")->domains == std::vector<std::string>{"contoso.com", "odd,domain with space"});
  CHECK(tracked.at("2001:db8::1")->cipher() == "ECDHE-RSA-AES128-SHA");
  CHECK(tracked.at("2001:db8::1")->policy == "mta-sts");
}

TEST_CASE("heavy hitters: corrupt input is refused and leaves the table as it was") {
  HeavyHitters table(5);
  table.add(message("kept", TlsVersion::tls12));
  const std::vector<std::vector<std::string_view>> broken{
      {},
      {"X 5 0 0 0 0 0 0 0 0 0"},
      {"O 0 0 0 0 0 0 0 0 0 0"},                                  // capacity 0
      {"O 5 0 0 10 5 0 0 0 0 0"},                                 // first seen after last seen
      {"O 1 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - - -",  // more entries than the capacity
       "E b - 0 0 1 1 0 0 0 1 0 - - - -"},
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - - -", "E a - 0 0 1 1 0 0 0 1 0 - - - -"},  // duplicate
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 9 - - -"},     // bad version
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - x -"},     // cipher without count
      {"O 5 0 0 0 0 0 0 0 0 0", "E %zz - 0 0 1 1 0 0 0 1 0 - - - -"},   // bad escape
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - -"},     // a field short
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - - -  "},   // trailing spaces
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 -1 0 - - - -"},    // negative count
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - - %zz"},  // bad policy
  };
  for (const auto& lines : broken) {
    std::string error;
    CHECK_FALSE(table.deserialize(lines, error));
    CHECK_FALSE(error.empty());
    REQUIRE(table.size() == 1);
    CHECK(table.entries()[0]->key == "kept");
  }
}

TEST_CASE("remote store: a larger top_remotes (reload, or a restart with a state file) holds for the day already begun") {
  RemoteStore store;
  store.set_limits({.top_remotes = 1, .top_domains = 1, .remotes = true, .window = hours(24 * 7)});
  const auto now = sys_days(2026y / 11 / 20) + hours(10);
  auto add = [&](RemoteStore& into, std::string_view key) {
    into.add("partner", Direction::inbound, RemoteTable::remotes, message(key, TlsVersion::tls10), now);
  };
  add(store, "203.0.113.1");
  add(store, "203.0.113.2");  // over the limit of 1: the first goes to other
  const auto today = floor<days>(now);
  auto check_grown = [&](RemoteStore& grown) {
    grown.set_limits({.top_remotes = 10, .top_domains = 10, .remotes = true, .window = hours(24 * 7)});
    add(grown, "203.0.113.3");
    add(grown, "203.0.113.4");
    const auto day = grown.merged("partner", Direction::inbound, RemoteTable::remotes, today, today);
    CHECK(day.total_weight() == 4);
    // What was dropped before stays dropped (other, bound 1); the servers seen since are all listed.
    CHECK(day.size() == 3);
    CHECK(day.other().weight() == 1);
    CHECK(day.error_bound() == 1);
    const auto tracked = by_key(day);
    CHECK(tracked.count("203.0.113.3") == 1);
    CHECK(tracked.count("203.0.113.4") == 1);
  };
  SUBCASE("reload") { check_grown(store); }
  SUBCASE("restart: the day's table loaded from remotes.state") {
    RemoteStore loaded;
    std::string error;
    REQUIRE(loaded.deserialize(store.serialize(), error));
    check_grown(loaded);
  }
}

TEST_CASE("remote store: per day tables, merged over days, dropped when they leave the window") {
  RemoteStore store;
  store.set_limits({.top_remotes = 2, .top_domains = 5, .remotes = true, .window = hours(24 * 3)});
  const auto day0 = sys_days(2026y / 11 / 20) + hours(10);
  auto obs = [](std::string_view key) { return message(key, TlsVersion::tls10); };
  store.add("partner", Direction::inbound, RemoteTable::remotes, obs("203.0.113.7"), day0);
  store.add("partner", Direction::inbound, RemoteTable::remotes, obs("203.0.113.7"), day0 + hours(24));
  store.add("partner", Direction::inbound, RemoteTable::remotes, obs("203.0.113.8"), day0 + hours(24));
  store.add("partner", Direction::inbound, RemoteTable::remotes, obs("203.0.113.9"), day0 + hours(48));
  store.add("other", Direction::inbound, RemoteTable::remotes, obs("192.0.2.1"), day0);
  store.add("internet", Direction::outbound, RemoteTable::domains, obs("contoso.com"), day0);

  const auto first = floor<days>(day0);
  auto week = store.merged("partner", Direction::inbound, RemoteTable::remotes, first, first + days(2));
  CHECK(week.total_weight() == 4);
  CHECK(week.size() == 2);  // top_remotes = 2: the third is in other
  CHECK(week.entries()[0]->key == "203.0.113.7");
  CHECK(week.entries()[0]->stats.messages[1] == 2);
  CHECK(store.merged("partner", Direction::inbound, RemoteTable::remotes, first + days(1), first + days(1))
            .total_weight() == 2);
  CHECK(store.merged("internet", Direction::outbound, RemoteTable::domains, first, first).total_weight() == 1);

  // The window is measured from the newest data (never from a clock ahead of it): mail at the hour pruned at.
  store.add("late", Direction::inbound, RemoteTable::remotes, obs("198.51.100.1"), day0 + hours(84));
  store.prune(day0 + hours(84));  // 72 hours to 23:00 two days on: day0 has one hour left in the window
  CHECK(store.merged("other", Direction::inbound, RemoteTable::remotes, first, first).total_weight() == 1);
  store.prune(day0 + hours(85));  // now the window starts at the next day's 00:00
  CHECK(store.merged("partner", Direction::inbound, RemoteTable::remotes, first, first + days(3)).total_weight() == 3);
  CHECK(store.merged("other", Direction::inbound, RemoteTable::remotes, first, first + days(3)).empty());

  // Round trip, then a corrupt file leaves the content as it was.
  const std::string text = store.serialize();
  RemoteStore loaded;
  loaded.set_limits(store.limits());
  std::string error;
  REQUIRE(loaded.deserialize(text, error));
  CHECK(loaded.serialize() == text);
  CHECK_FALSE(loaded.deserialize(text.substr(0, text.size() - 1), error));
  CHECK_FALSE(loaded.deserialize("mailflowd-remotes 1\nT partner inbound remotes 20000 5\nO 2 0 0 0 0 0 0 0 0 0\n", error));
  CHECK_FALSE(loaded.deserialize("mailflowd-windows 1\n", error));
  CHECK(loaded.serialize() == text);

  // telemetry.remotes: false drops the remotes tables and stops collecting them; domains stay.
  loaded.set_limits({.top_remotes = 2, .top_domains = 5, .remotes = false, .window = hours(24 * 3)});
  CHECK(loaded.merged("partner", Direction::inbound, RemoteTable::remotes, first, first + days(3)).empty());
  loaded.add("partner", Direction::inbound, RemoteTable::remotes, obs("203.0.113.7"), day0 + hours(72));
  CHECK(loaded.merged("partner", Direction::inbound, RemoteTable::remotes, first, first + days(3)).empty());
}

TEST_CASE("remote store: a file cut at any byte, a line end included, is never loaded as valid") {
  RemoteStore store;
  const auto now = sys_days(2026y / 11 / 20) + hours(10);
  store.add("partner", Direction::inbound, RemoteTable::remotes, message("203.0.113.7", TlsVersion::tls10),
            now);
  store.add("partner", Direction::inbound, RemoteTable::remotes, message("203.0.113.8", TlsVersion::tls12),
            now);
  store.add("internet", Direction::outbound, RemoteTable::domains, message("contoso.com", TlsVersion::tls13),
            now);
  const std::string text = store.serialize();
  for (std::size_t cut = 0; cut < text.size(); ++cut) {
    CAPTURE(cut);
    RemoteStore loaded;
    std::string error;
    CHECK_FALSE(loaded.deserialize(std::string_view(text).substr(0, cut), error));
  }
  RemoteStore loaded;
  std::string error;
  REQUIRE(loaded.deserialize(text, error));
  CHECK(loaded.serialize() == text);

  // A file of the previous version (no end line) still loads.
  REQUIRE(
      loaded.deserialize("mailflowd-remotes 1\nT partner inbound remotes 20412 2\nO 2 0 0 0 0 0 0 0 0 0\n"
                         "E 203.0.113.7 - 0 0 5 5 0 1 0 0 0 - - - -\n",
                         error));
  CHECK(loaded
            .merged("partner", Direction::inbound, RemoteTable::remotes, sys_days(days(20412)),
                    sys_days(days(20412)))
            .total_weight() == 1);
}

TEST_CASE("remote store: counts that add up past 64 bits are refused (a merged report would wrap)") {
  RemoteStore store;
  std::string error;
  // Each table on its own fits; a report over both days would add 2^63 + 2^63 and show 0.
  CHECK_FALSE(
      store.deserialize("mailflowd-remotes 1\n"
                        "T partner inbound remotes 20412 2\nO 2 0 0 0 0 0 0 0 0 0\n"
                        "E 192.0.2.1 - 0 0 5 5 0 9223372036854775808 0 0 0 - - - -\n"
                        "T partner inbound remotes 20413 2\nO 2 0 0 0 0 0 0 0 0 0\n"
                        "E 192.0.2.1 - 0 0 5 5 0 9223372036854775808 0 0 0 - - - -\n",
                        error));
  CHECK_FALSE(error.empty());
  const std::vector<std::vector<std::string_view>> tables{
      {"O 5 0 0 0 0 18446744073709551615 0 0 0 0", "E a - 0 0 1 1 0 0 0 1 0 - - - -"},  // other + an entry
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 0 0 1 1 18446744073709551615 0 0 1 0 - - - -"},  // one entry's counts
      {"O 5 0 0 0 0 0 0 0 0 0", "E a - 18446744073709551615 0 1 1 0 0 0 1 0 - - - -"},  // weight + error
      {"O 5 18446744073709551615 0 0 0 0 0 0 0 1", "E a - 1 0 1 1 0 0 0 1 0 - - - -"},  // bound + counts
  };
  for (const auto& lines : tables) {
    HeavyHitters table;
    CHECK_FALSE(table.deserialize(lines, error));
  }
}

TEST_CASE("remote store: inbound addresses queue once for a reverse name, a cached name expires") {
  RemoteStore store;
  const auto now = sys_days(2026y / 11 / 20) + hours(10);
  store.add("partner", Direction::inbound, RemoteTable::remotes, message("203.0.113.7", TlsVersion::tls12), now);
  store.add("partner", Direction::inbound, RemoteTable::remotes, message("203.0.113.7", TlsVersion::tls12), now);
  store.add("internet", Direction::outbound, RemoteTable::remotes, message("192.0.2.25", TlsVersion::tls12), now);
  CHECK(store.take_pending(10) == std::vector<std::string>{"203.0.113.7"});
  CHECK(store.take_pending(10).empty());
  store.set_name("203.0.113.7", "mx2.contoso.com", now, seconds(3600));
  CHECK(store.name("203.0.113.7", now) == "mx2.contoso.com");
  store.add("partner", Direction::inbound, RemoteTable::remotes, message("203.0.113.7", TlsVersion::tls12), now);
  CHECK(store.take_pending(10).empty());  // cached: no second lookup
  CHECK_FALSE(store.name("203.0.113.7", now + seconds(3601)));
  store.add("partner", Direction::inbound, RemoteTable::remotes, message("203.0.113.7", TlsVersion::tls12),
            now + seconds(3601));
  CHECK(store.take_pending(10).size() == 1);  // expired: looked up again
}

}  // namespace
