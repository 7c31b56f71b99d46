// WindowStore: hourly buckets keyed by absolute UTC hour, exact roll-off, clock jumps, persistence format.
#include "daemon/window_store.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

template <>
struct doctest::StringMaker<mailflow::TlsCounts> {
  static String convert(const mailflow::TlsCounts& c) {
    std::string text = "{";
    for (std::size_t i = 0; i < c.size(); ++i) {
      if (i != 0) text += ", ";
      text += std::to_string(c[i]);
    }
    text += "}";
    return text.c_str();
  }
};

namespace {

using namespace std::chrono;
using namespace std::string_literals;
using mailflow::TlsCounts;
using mailflow::WindowStore;
using mailflow::config::Direction;
using mailflow::proto::TlsVersion;

constexpr auto in = Direction::inbound;
constexpr auto out = Direction::outbound;

// The fake clock: explicit UTC instants.
WindowStore::TimePoint at(year_month_day day, int hour, int minute = 0, int second = 0) {
  return sys_days{day} + hours(hour) + minutes(minute) + seconds(second);
}
constexpr year_month_day nov(unsigned d) { return year{2026} / November / day{d}; }

std::uint64_t total(const TlsCounts& c) { return c[0] + c[1] + c[2] + c[3] + c[4]; }

}  // namespace

TEST_CASE("window totals add up per TLS version, connector and direction") {
  WindowStore store;  // 7 days
  const auto now = at(nov(25), 10, 30);
  store.add("partner-contoso", in, TlsVersion::tls10, now);
  store.add("partner-contoso", in, TlsVersion::tls12, now, 3);
  store.add("partner-contoso", out, TlsVersion::none, now);
  store.add("internet", in, TlsVersion::tls13, now - hours(30), 2);

  CHECK(store.window_totals("partner-contoso", in, now) == TlsCounts{0, 1, 0, 3, 0});
  CHECK(store.window_totals("partner-contoso", out, now) == TlsCounts{1, 0, 0, 0, 0});
  CHECK(store.window_totals("internet", in, now) == TlsCounts{0, 0, 0, 0, 2});
  CHECK(store.window_totals("internet", out, now) == TlsCounts{});
  CHECK(store.window_totals("nobody", in, now) == TlsCounts{});
}

TEST_CASE("a message rolls off exactly when its hour leaves the window") {
  WindowStore store(hours(24 * 7));
  store.add("c", in, TlsVersion::tls12, at(nov(18), 10, 30));  // counted in the 10:00 bucket of Nov 18

  CHECK(total(store.window_totals("c", in, at(nov(18), 10, 0))) == 1);
  CHECK(total(store.window_totals("c", in, at(nov(25), 9, 59, 59))) == 1);  // 167 hours later: still inside
  CHECK(total(store.window_totals("c", in, at(nov(25), 10, 0))) == 0);      // 168 hours: rolled off
  // Pruning drops what is a window before the newest data: exactly that bucket and nothing newer.
  store.add("c", in, TlsVersion::tls13, at(nov(18), 11, 0));
  store.add("d", in, TlsVersion::tls13, at(nov(25), 10, 0));
  store.prune(at(nov(25), 10, 0));
  CHECK(store.window_totals("c", in, at(nov(25), 10, 0)) == TlsCounts{0, 0, 0, 0, 1});
  CHECK(store.window_totals("c", in, at(nov(18), 11, 0)) == TlsCounts{0, 0, 0, 0, 1});  // 10:00 is gone
  store.add("d", in, TlsVersion::tls13, at(nov(25), 11, 0));
  store.prune(at(nov(25), 11, 0));
  CHECK(store.keys().size() == 1);
}

TEST_CASE("a clock that jumps backwards neither loses nor double-counts") {
  WindowStore store;
  const auto t = at(nov(25), 10, 15);
  store.add("c", in, TlsVersion::tls12, t);
  store.add("c", in, TlsVersion::tls10, t - hours(3));  // NTP stepped the clock back three hours
  store.add("c", in, TlsVersion::tls10, t - hours(3));
  // The window ends at the earlier hour: the later bucket is not inside until prune() (at every scrape and
  // report) moves it into the current hour, so that the message stays in the window, counted once.
  CHECK(store.window_totals("c", in, t - hours(3)) == TlsCounts{0, 2, 0, 0, 0});
  store.prune(t - hours(3));  // must not drop the "future" bucket
  CHECK(store.window_totals("c", in, t - hours(3)) == TlsCounts{0, 2, 0, 1, 0});
  // Back at the real time everything is there, each message once.
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 2, 0, 1, 0});
  store.add("c", in, TlsVersion::tls12, t);
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 2, 0, 2, 0});
  // Inserting between existing buckets keeps the order (serialization sorted by hour).
  store.add("c", in, TlsVersion::none, t - hours(1));
  CHECK(store.serialize() ==
        "mailflowd-windows 2\n"
        "498775 c inbound 0 2 0 1 0\n"
        "498777 c inbound 1 0 0 0 0\n"
        "498778 c inbound 0 0 0 1 0\n"
        "end\n");
}

TEST_CASE("a clock that jumps forwards rolls off as time would, and back again counts nothing twice") {
  WindowStore store;
  const auto t = at(nov(25), 10);
  store.add("c", in, TlsVersion::tls12, t);
  store.add("c", in, TlsVersion::tls13, t + hours(48));  // clock jumped two days ahead
  CHECK(store.window_totals("c", in, t + hours(48)) == TlsCounts{0, 0, 0, 1, 1});
  // The clock is corrected: the bucket from the "future" counts in the current hour from the next prune on,
  // nothing is lost.
  store.add("c", in, TlsVersion::tls12, t + hours(1));
  CHECK(store.window_totals("c", in, t + hours(1)) == TlsCounts{0, 0, 0, 2, 0});
  store.prune(t + hours(1));
  CHECK(store.window_totals("c", in, t + hours(1)) == TlsCounts{0, 0, 0, 2, 1});
  CHECK(store.window_totals("c", in, t + hours(48)) == TlsCounts{0, 0, 0, 2, 1});
  // A jump far ahead (beyond the window) rolls everything before it out of the window; a prune then deletes
  // nothing (the newest data is the measure), a message counted then does.
  CHECK(store.window_totals("c", in, t + hours(24 * 30)) == TlsCounts{});
  store.prune(t + hours(24 * 30));
  CHECK(store.window_totals("c", in, t + hours(1)) == TlsCounts{0, 0, 0, 2, 1});
  store.add("c", in, TlsVersion::none, t + hours(24 * 30));
  CHECK(store.window_totals("c", in, t + hours(24 * 30)) == TlsCounts{1, 0, 0, 0, 0});
}

TEST_CASE(
    "a clock far behind (an RTC reset at boot) neither moves nor drops the history: corrected, it is back") {
  WindowStore store;  // 7 days
  const auto t = at(nov(25), 10);
  store.add("c", in, TlsVersion::tls12, t - hours(50));
  store.add("c", in, TlsVersion::tls13, t);
  const auto behind = t - hours(24 * 365);
  store.prune(behind);  // a window or more ahead: left as they are, unseen
  CHECK(store.window_totals("c", in, behind) == TlsCounts{});
  store.add("c", in, TlsVersion::none, behind);  // a message counted meanwhile: at the wrong hour
  CHECK(store.window_totals("c", in, behind) == TlsCounts{1, 0, 0, 0, 0});
  store.prune(behind);
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 0, 0, 1, 1});
  store.prune(t);  // corrected: the history is there; the hour long gone leaves with the next prune
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 0, 0, 1, 1});
  CHECK(store.serialize() ==
        "mailflowd-windows 2\n"
        "498728 c inbound 0 0 0 1 0\n"
        "498778 c inbound 0 0 0 0 1\n"
        "end\n");
}

TEST_CASE("90-day window keeps 90 days and not an hour more") {
  WindowStore store(hours(24 * 90));
  const auto t0 = at(nov(1), 0);
  store.add("c", out, TlsVersion::tls11, t0);
  store.add("c", out, TlsVersion::tls12, t0 + hours(24 * 45));
  CHECK(total(store.window_totals("c", out, t0 + hours(24 * 90 - 1))) == 2);
  CHECK(store.window_totals("c", out, t0 + hours(24 * 90)) == TlsCounts{0, 0, 0, 1, 0});
  CHECK(store.window() == hours(24 * 90));
}

TEST_CASE("shrinking the window on reload drops what falls outside and growing shows what was not pruned") {
  WindowStore store(hours(24 * 7));
  const auto t = at(nov(25), 10);
  store.add("c", in, TlsVersion::tls12, t - hours(24 * 3));
  store.add("c", in, TlsVersion::tls13, t);
  store.set_window(hours(24));
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 0, 0, 0, 1});
  store.set_window(hours(24 * 7));
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 0, 0, 1, 1});
  store.set_window(hours(24));
  store.prune(t);
  store.set_window(hours(24 * 7));
  CHECK(store.window_totals("c", in, t) == TlsCounts{0, 0, 0, 0, 1});
}

TEST_CASE("day totals cover one UTC day, clipped to the window") {
  WindowStore store(hours(24 * 7));
  store.add("c", in, TlsVersion::tls12, at(nov(24), 0, 0));
  store.add("c", in, TlsVersion::tls12, at(nov(24), 23, 59, 59));
  store.add("c", in, TlsVersion::tls10, at(nov(25), 0, 0));
  store.add("c", in, TlsVersion::none, at(nov(18), 10));  // rolled off at now
  store.add("c", in, TlsVersion::none, at(nov(18), 11));  // first hour of the window
  const auto now = at(nov(25), 10, 5);
  CHECK(store.day_totals("c", in, sys_days{nov(24)}, now) == TlsCounts{0, 0, 0, 2, 0});
  CHECK(store.day_totals("c", in, sys_days{nov(25)}, now) == TlsCounts{0, 1, 0, 0, 0});
  CHECK(store.day_totals("c", in, sys_days{nov(18)}, now) == TlsCounts{1, 0, 0, 0, 0});
  CHECK(store.day_totals("c", out, sys_days{nov(24)}, now) == TlsCounts{});
}

TEST_CASE("keys lists every connector with history, including removed ones, until it rolls off") {
  WindowStore store(hours(24));
  const auto t = at(nov(25), 10);
  store.add("zeta", out, TlsVersion::tls12, t);
  store.add("alpha", in, TlsVersion::tls12, t - hours(20));
  store.add("alpha", out, TlsVersion::tls12, t);
  const auto keys = store.keys();
  REQUIRE(keys.size() == 3);
  CHECK(keys[0].connector == "alpha");
  CHECK(keys[0].direction == in);
  CHECK(keys[1].connector == "alpha");
  CHECK(keys[1].direction == out);
  CHECK(keys[2].connector == "zeta");
  // Five hours later alpha/inbound's only bucket has rolled off: gone from keys(now) even before a prune.
  CHECK(store.keys(t + hours(5)).size() == 2);
  CHECK(store.keys().size() == 3);
  store.prune(t + hours(5));  // nothing newer than t: a prune keeps it
  CHECK(store.keys().size() == 3);
  store.add("zeta", out, TlsVersion::tls12, t + hours(5));
  store.prune(t + hours(5));
  CHECK(store.keys().size() == 2);
}

TEST_CASE("serialize writes the versioned format and deserialize reads it back") {
  WindowStore store;
  const auto t = at(nov(25), 10);
  store.add("partner-contoso", in, TlsVersion::tls10, t, 7);
  store.add("partner-contoso", in, TlsVersion::tls13, t, 18446744073709551606ull);  // all counts: 2^64 - 1
  store.add("internet", out, TlsVersion::none, t - hours(2));
  store.add("odd name%x", in, TlsVersion::tls12, t);  // survives although it cannot be a label value
  const std::string text = store.serialize();
  CHECK(text ==
        "mailflowd-windows 2\n"
        "498776 internet outbound 1 0 0 0 0\n"
        "498778 odd%20name%25x inbound 0 0 0 1 0\n"
        "498778 partner-contoso inbound 0 7 0 0 18446744073709551606\n"
        "end\n");

  WindowStore copy(hours(24 * 30));
  std::string error;
  REQUIRE(copy.deserialize(text, error));
  CHECK(copy.serialize() == text);
  CHECK(copy.window_totals("odd name%x", in, t) == TlsCounts{0, 0, 0, 1, 0});
  CHECK(copy.window() == hours(24 * 30));  // the window comes from the config, not the file

  // Header and end only: a valid, empty store.
  REQUIRE(copy.deserialize("mailflowd-windows 2\nend\n", error));
  CHECK(copy.keys().empty());
}

TEST_CASE("deserialize refuses foreign or corrupt input and leaves the store untouched") {
  WindowStore store;
  const auto t = at(nov(25), 10);
  store.add("c", in, TlsVersion::tls12, t, 5);
  const std::string before = store.serialize();

  const char* bad[] = {
      "",
      "\n",
      "mailflowd-windows 1",         // no newline after the header
      "mailflowd-windows 3\nend\n",  // future version
      "mailflowd-windows 2\n",       // no end line
      "mailflowd-windows 2\nend\nend\n",
      "mailflowd-windows 2\n498778 c inbound 1 2 3 4 5\nend \n",
      "MAILFLOWD-WINDOWS 1\n",
      "{\"rows\": []}\n",
      "mailflowd-windows 1\n498778 c inbound 1 2 3 4 5",      // truncated: last line has no newline
      "mailflowd-windows 1\n498778 c inbound 1 2 3 4\n",      // too few counts
      "mailflowd-windows 1\n498778 c inbound 1 2 3 4 5 6\n",  // too many
      "mailflowd-windows 1\n498778 c sideways 1 2 3 4 5\n",
      "mailflowd-windows 1\n-5 c inbound 1 2 3 4 5\n",
      "mailflowd-windows 1\nabc c inbound 1 2 3 4 5\n",
      "mailflowd-windows 1\n498778 c inbound 1 2 x 4 5\n",
      "mailflowd-windows 1\n498778 c inbound 1 2 -3 4 5\n",
      "mailflowd-windows 1\n498778 c inbound 1 2 18446744073709551616 4 5\n",  // overflow
      "mailflowd-windows 1\n498778 c inbound 1 2 3 4 5 \n",                    // trailing space
      "mailflowd-windows 1\n498778  c inbound 1 2 3 4 5\n",                    // double space
      "mailflowd-windows 1\n498778 c\tx inbound 1 2 3 4 5\n",
      "mailflowd-windows 1\n498778 c%2 inbound 1 2 3 4 5\n",  // broken escape
      "mailflowd-windows 1\n498778 c%zz inbound 1 2 3 4 5\n",
      "mailflowd-windows 1\n\n",                                                        // empty line
      "mailflowd-windows 1\r\n498778 c inbound 1 2 3 4 5\r\n",                          // CRLF
      "mailflowd-windows 1\n498778 c inbound 1 2 3 4 5\n498778 c inbound 1 0 0 0 0\n",  // duplicate bucket
      // Counts whose sum does not fit in 64 bits: a window total (one key's hours, or a direction's keys, as
      // the report's in_transit row adds them) would wrap to a small number.
      "mailflowd-windows 1\n498778 c inbound 18446744073709551615 0 0 0 0\n498779 c inbound 2 0 0 0 0\n",
      "mailflowd-windows 1\n498778 a inbound 18446744073709551615 0 0 0 0\n498778 b inbound 2 0 0 0 0\n",
      "mailflowd-windows 1\n498778 c inbound 9223372036854775808 9223372036854775808 0 0 0\n",
  };
  for (const char* input : bad) {
    CAPTURE(input);
    std::string error;
    CHECK_FALSE(store.deserialize(input, error));
    CHECK_FALSE(error.empty());
    CHECK(store.serialize() == before);
  }
  // Embedded NUL bytes are data, not a terminator.
  std::string error;
  CHECK_FALSE(store.deserialize("mailflowd-windows 1\n498778 c\0 inbound 1 2 3 4 5\n"s, error));
  CHECK(store.serialize() == before);
}

TEST_CASE("a file cut at any byte, a line end included, is never loaded as valid") {
  WindowStore store;
  const auto t = at(nov(25), 10);
  store.add("a", in, TlsVersion::tls12, t - hours(1), 3);
  store.add("a", in, TlsVersion::tls10, t);
  store.add("b", out, TlsVersion::none, t, 2);
  const std::string text = store.serialize();
  for (std::size_t cut = 0; cut < text.size(); ++cut) {
    CAPTURE(cut);
    WindowStore loaded;
    std::string error;
    CHECK_FALSE(loaded.deserialize(std::string_view(text).substr(0, cut), error));
  }
  WindowStore loaded;
  std::string error;
  REQUIRE(loaded.deserialize(text, error));
  CHECK(loaded.serialize() == text);
  CHECK_FALSE(loaded.deserialize(text + "498778 c inbound 1 0 0 0 0\n", error));  // nothing after the end

  // A file of the previous version (no end line) still loads: it cannot tell a cut at a line end.
  REQUIRE(loaded.deserialize("mailflowd-windows 1\n498778 c inbound 0 0 0 4 0\n", error));
  CHECK(loaded.window_totals("c", in, t) == TlsCounts{0, 0, 0, 4, 0});
}

TEST_CASE("copy_to copies a few keys at a time, each key whole, and resumes after the last one") {
  WindowStore store(hours(48));
  const auto t = at(nov(25), 10);
  for (const char* name : {"a", "b", "c", "d", "e"}) {
    store.add(name, in, TlsVersion::tls12, t - hours(1));
    store.add(name, out, TlsVersion::tls13, t);
  }
  WindowStore copy;
  auto last = store.copy_to(copy, std::nullopt, 3);
  REQUIRE(last);
  CHECK(last->connector == "b");
  CHECK(last->direction == in);
  CHECK(copy.window() == hours(48));
  CHECK(copy.keys().size() == 3);
  // Meanwhile a message for a key already copied (the next save has it) and one for a key still to come.
  store.add("a", in, TlsVersion::none, t);
  store.add("d", in, TlsVersion::none, t);
  while (last) last = store.copy_to(copy, last, 3);
  CHECK(copy.keys().size() == 10);
  CHECK(copy.window_totals("a", in, t) == TlsCounts{0, 0, 0, 1, 0});
  CHECK(copy.window_totals("d", in, t) == TlsCounts{1, 0, 0, 1, 0});
  CHECK(copy.window_totals("e", out, t) == TlsCounts{0, 0, 0, 0, 1});
  // Copied again from the start: the same text as the store.
  WindowStore again;
  for (std::optional<WindowStore::Key> after; (after = store.copy_to(again, after, 4));) {
  }
  CHECK(again.serialize() == store.serialize());
}

TEST_CASE("1,000 connectors x 2 directions x 7 days of hourly buckets stay fast") {
  WindowStore store;
  const auto start = at(nov(18), 11);
  const auto now = start + hours(7 * 24 - 1);
  std::vector<std::string> names;
  for (int i = 0; i < 1000; ++i) names.push_back("partner-" + std::to_string(i));

  const auto begin = steady_clock::now();
  // Time moves forward hour by hour, every connector gets mail every hour, as in production.
  for (int h = 0; h < 7 * 24; ++h)
    for (const auto& name : names) {
      store.add(name, in, TlsVersion::tls12, start + hours(h), 2);
      store.add(name, out, TlsVersion::tls10, start + hours(h));
    }
  std::uint64_t sum = 0;
  for (const auto& key : store.keys()) sum += total(store.window_totals(key.connector, key.direction, now));
  CHECK(sum == 1000ull * 7 * 24 * 3);
  const std::string text = store.serialize();
  WindowStore copy;
  std::string error;
  REQUIRE(copy.deserialize(text, error));
  CHECK(copy.window_totals("partner-999", out, now) == TlsCounts{0, 168, 0, 0, 0});
  // One more hour: the oldest hour rolls off everywhere.
  CHECK(copy.window_totals("partner-0", in, now + hours(1)) == TlsCounts{0, 0, 0, 167 * 2, 0});
  const auto elapsed = duration_cast<milliseconds>(steady_clock::now() - begin);
  MESSAGE("1,000 connectors: adds, sums, serialize and deserialize took " << elapsed.count() << " ms");
  CHECK(elapsed <
        seconds(20));  // coarse guard against quadratic behaviour; Debug/ASan on a loaded 2-core box
}
