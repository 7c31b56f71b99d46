// The MTA-STS cache (bound, expiry, persistence) and check_mx, the verdict the MX walk applies per host.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "daemon/mta_sts.hpp"
#include "daemon/state_file.hpp"

namespace {

using namespace mailflow;
using proto::tlsrpt::ResultType;

proto::mta_sts::Policy policy(proto::mta_sts::Mode mode, std::uint32_t max_age = 86400) {
  std::string error;
  const std::string text = "version: STSv1\nmode: " + std::string(proto::mta_sts::to_string(mode)) +
                           "\nmx: mx1.example.net\nmx: *.backup.example.net\nmax_age: " + std::to_string(max_age) + "\n";
  auto parsed = proto::mta_sts::parse_policy(text, error);
  REQUIRE(parsed.has_value());
  return *parsed;
}

TEST_CASE("mta-sts cache: unexpired policies only, bounded by dropping the soonest to expire") {
  MtaStsCache cache(2);
  cache.store("a.example", {"1", policy(proto::mta_sts::Mode::enforce), 100, 200});
  cache.store("b.example", {"1", policy(proto::mta_sts::Mode::testing), 100, 500});
  CHECK(cache.find("a.example", 150).has_value());
  CHECK_FALSE(cache.find("a.example", 200).has_value());  // expired at max_age
  cache.store("c.example", {"2", policy(proto::mta_sts::Mode::enforce), 100, 400});
  CHECK(cache.size() == 2);
  CHECK_FALSE(cache.find("a.example", 150).has_value());  // expired soonest: dropped
  CHECK(cache.find("b.example", 150).has_value());
  CHECK(cache.find("c.example", 150)->id == "2");
}

TEST_CASE("mta-sts cache: a failed fetch is not tried again for the same domain and id within five minutes") {
  MtaStsCache cache(2);
  CHECK(cache.fetch_due("a.example", "1", 1000));  // nothing cached, nothing failed
  cache.fetch_failed("a.example", "1", 1000);
  CHECK_FALSE(cache.fetch_due("a.example", "1", 1000));
  CHECK_FALSE(cache.fetch_due("a.example", "1", 1000 + mta_sts_fetch_retry_after - 1));
  CHECK(cache.fetch_due("a.example", "1", 1000 + mta_sts_fetch_retry_after));
  CHECK(cache.fetch_due("a.example", "2", 1001));  // a new id is fetched at once
  CHECK(cache.fetch_due("b.example", "1", 1001));  // per domain
  // Bounded like the policies (max_policies): the oldest failure goes first.
  cache.fetch_failed("b.example", "1", 1001);
  cache.fetch_failed("c.example", "1", 1002);
  CHECK(cache.fetch_due("a.example", "1", 1003));
  CHECK_FALSE(cache.fetch_due("b.example", "1", 1003));
  CHECK_FALSE(cache.fetch_due("c.example", "1", 1003));
  // A policy fetched for the id afterwards is used, and the failure forgotten.
  cache.store("c.example", {"1", policy(proto::mta_sts::Mode::enforce), 1010, 1010 + 7 * 86400});
  CHECK_FALSE(cache.fetch_due("c.example", "1", 1011));
  CHECK(cache.fetch_due("c.example", "2", 1011));
}

TEST_CASE("mta-sts cache: a failure recorded is kept when every failure came in the same second") {
  MtaStsCache cache(2);
  cache.fetch_failed("b.example", "1", 1000);
  cache.fetch_failed("c.example", "1", 1000);
  // a.example sorts first and failed in the same second as the others: it is the one just recorded.
  cache.fetch_failed("a.example", "1", 1000);
  CHECK_FALSE(cache.fetch_due("a.example", "1", 1001));
}

TEST_CASE(
    "mta-sts cache: a file with more policies than max_policies, or a lower bound at reload, keeps those "
    "that expire last") {
  MtaStsCache big(4);
  for (int i = 0; i < 4; ++i)
    big.store(std::string(1, static_cast<char>('a' + i)) + ".example",
              {"1", policy(proto::mta_sts::Mode::enforce), 100, 1000 + i});
  const std::string text = big.serialize();
  MtaStsCache cache(2);  // the bound before the load, as a test of its own; the daemon sets it after (below)
  std::string error;
  REQUIRE(cache.deserialize(text, 100, error));
  CHECK(cache.size() == 2);
  CHECK(cache.find("c.example", 100).has_value());
  CHECK(cache.find("d.example", 100).has_value());
  MtaStsCache later(100);  // loaded first, bounded after (start: load, then mta_sts.max_policies)
  REQUIRE(later.deserialize(text, 100, error));
  CHECK(later.size() == 4);
  later.set_max_policies(3);
  CHECK(later.size() == 3);
  CHECK_FALSE(later.find("a.example", 100).has_value());
}

TEST_CASE(
    "mta-sts cache: a cached policy is refreshed after a day, or half its max_age where that is shorter") {
  MtaStsCache cache;
  const std::int64_t week = 7 * 86400;
  cache.store("week.example", {"1", policy(proto::mta_sts::Mode::enforce, week), 1000, 1000 + week});
  CHECK_FALSE(cache.fetch_due("week.example", "1", 1000 + mta_sts_refresh_after - 1));
  CHECK(cache.fetch_due("week.example", "1", 1000 + mta_sts_refresh_after));
  // The refresh failed: the policy stays in force, and the next try is five minutes later.
  const std::int64_t failed_at = 1000 + mta_sts_refresh_after;
  cache.fetch_failed("week.example", "1", failed_at);
  CHECK(cache.find("week.example", failed_at + 1).has_value());
  CHECK_FALSE(cache.fetch_due("week.example", "1", failed_at + mta_sts_fetch_retry_after - 1));
  CHECK(cache.fetch_due("week.example", "1", failed_at + mta_sts_fetch_retry_after));
  cache.store("hour.example", {"1", policy(proto::mta_sts::Mode::enforce, 3600), 1000, 4600});
  CHECK_FALSE(cache.fetch_due("hour.example", "1", 1000 + 1799));
  CHECK(cache.fetch_due("hour.example", "1", 1000 + 1800));
}

TEST_CASE(
    "mta-sts cache: saved and loaded - entries expired before the newest fetch are not loaded - corrupt file "
    "moved aside") {
  const auto dir = std::filesystem::temp_directory_path() / ("mailflow-mta-sts-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  MtaStsCache cache;
  cache.store("a.example", {"id1", policy(proto::mta_sts::Mode::enforce), 100, 1000});
  cache.store("b.example", {"id2", policy(proto::mta_sts::Mode::testing), 100, 300});
  cache.store("c.example", {"id3", policy(proto::mta_sts::Mode::testing), 400, 450});
  std::string error;
  const auto file = cache.state_file();
  REQUIRE(mailflow::write_state_file(dir.string(), file.name, file.text, error));
  MtaStsCache loaded;
  REQUIRE(loaded.load(dir.string(), 500, error));
  CHECK(error.empty());
  CHECK(loaded.size() == 2);  // b expired before the newest fetch (400): not loaded
  CHECK_FALSE(loaded.find("b.example", 500).has_value());
  CHECK_FALSE(loaded.find("c.example", 500).has_value());  // loaded, expired at 500: not used
  const auto a = loaded.find("a.example", 500);
  REQUIRE(a.has_value());
  CHECK(a->policy == policy(proto::mta_sts::Mode::enforce));
  CHECK(a->id == "id1");
  std::ofstream(dir / "mta-sts.state") << "mailflowd-mta-sts 1\na.example\tid\t1\t2\tversion: STSv9\n";
  MtaStsCache corrupt;
  REQUIRE(corrupt.load(dir.string(), 77, error));
  CHECK(error.find("invalid policy") != std::string::npos);
  CHECK(std::filesystem::exists(dir / "mta-sts.state.corrupt-77"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("mta-sts cache: a clock far ahead at start drops no cached policy: corrected, they are in force") {
  MtaStsCache cache;
  cache.store("a.example", {"id1", policy(proto::mta_sts::Mode::enforce), 1000, 1000 + 86400});
  const std::int64_t year_ahead = 2000 + 365 * 86400;
  std::string error;
  MtaStsCache booted;  // loaded under the wrong clock, and saved under it
  REQUIRE(booted.deserialize(cache.serialize(), year_ahead, error));
  CHECK_FALSE(booted.find("a.example", year_ahead).has_value());  // expired at that time: not used
  MtaStsCache corrected;
  REQUIRE(corrected.deserialize(booted.serialize(), 2000, error));
  const auto a = corrected.find("a.example", 2000);
  REQUIRE(a.has_value());
  CHECK(a->policy.mode == proto::mta_sts::Mode::enforce);
  CHECK(booted.find("a.example", 2000).has_value());  // the same process, once NTP stepped the clock back
}

TEST_CASE("mta-sts cache: a fetch under a clock far ahead at the bound drops one policy, not every one") {
  // A busy relay's cache is at mta_sts.max_policies: the fetch stored while the clock is a year ahead (a VM
  // before NTP steps it) dropped every policy expired at that time, all of them, and the next save made it
  // for good: once the clock was corrected each domain in enforce mode waited for a fetch an attacker may
  // block (RFC 8461 section 10.2), as the load did before it measured expiry from the newest fetch.
  MtaStsCache cache(2);
  cache.store("a.example", {"1", policy(proto::mta_sts::Mode::enforce), 1000, 1000 + 86400});
  cache.store("b.example", {"1", policy(proto::mta_sts::Mode::enforce), 1000, 1000 + 2 * 86400});
  const std::int64_t year_ahead = 2000 + 365 * 86400;
  cache.store("c.example", {"1", policy(proto::mta_sts::Mode::enforce), year_ahead, year_ahead + 86400});
  CHECK(cache.size() == 2);
  CHECK(cache.find("c.example", year_ahead).has_value());
  CHECK_FALSE(cache.find("a.example", 2000).has_value());  // the one that expires soonest made room
  std::string error;
  MtaStsCache corrected(2);
  REQUIRE(corrected.deserialize(cache.serialize(), 2000, error));
  const auto b = corrected.find("b.example", 2000);
  REQUIRE(b.has_value());
  CHECK(b->policy.mode == proto::mta_sts::Mode::enforce);
}

TEST_CASE("mta-sts cache: a fetch or a failure made under a clock since stepped back holds nothing back") {
  // Made while the clock was ahead, they lie in the future once NTP corrected it: their age is unknown. A
  // failed fetch a day "ahead" kept the domain from being fetched for that day, each message going without
  // its policy and without a report; a policy fetched a day "ahead" was never refreshed for as long.
  MtaStsCache cache;
  const std::int64_t day_ahead = 1000 + 86400;
  cache.fetch_failed("failed.example", "1", day_ahead);
  CHECK(cache.fetch_due("failed.example", "1", 1000));
  cache.fetch_failed("failed.example", "1", 1000);  // failed again at the right time: five minutes as ever
  CHECK_FALSE(cache.fetch_due("failed.example", "1", 1000 + mta_sts_fetch_retry_after - 1));
  cache.store("ahead.example", {"1", policy(proto::mta_sts::Mode::enforce), day_ahead, day_ahead + 86400});
  CHECK(cache.find("ahead.example", 1000).has_value());  // still in force meanwhile
  CHECK(cache.fetch_due("ahead.example", "1", 1000));    // and refreshed at the next message
  cache.store("ahead.example", {"1", policy(proto::mta_sts::Mode::enforce), 1000, 1000 + 86400});
  CHECK_FALSE(cache.fetch_due("ahead.example", "1", 1001));
}

TEST_CASE("mta-sts cache: a file cut at any byte is never loaded as valid") {
  // "mx: mx1.example.net" cut to "mx: mx1.exam" would be a valid policy that refuses the real MX; a cut at a
  // line end would drop the last domains' enforced policies without a word (the downgrade the cache exists
  // for).
  const auto dir =
      std::filesystem::temp_directory_path() / ("mailflow-mta-sts-cut-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  MtaStsCache cache;
  cache.store("a.example", {"id1", policy(proto::mta_sts::Mode::enforce), 100, 1000});
  cache.store("b.example", {"id2", policy(proto::mta_sts::Mode::enforce), 100, 1000});
  const std::string whole = cache.serialize();
  REQUIRE(whole.back() == '\n');
  for (std::size_t cut = 0; cut < whole.size(); ++cut) {
    CAPTURE(whole.substr(0, cut));
    std::ofstream(dir / "mta-sts.state", std::ios::binary | std::ios::trunc) << whole.substr(0, cut);
    MtaStsCache loaded;
    std::string error;
    REQUIRE(loaded.load(dir.string(), 500, error));
    CHECK(error.find("mta-sts.state is unusable") != std::string::npos);
    CHECK(std::filesystem::exists(dir / "mta-sts.state.corrupt-500"));
    CHECK(loaded.size() == 0);
    std::filesystem::remove(dir / "mta-sts.state.corrupt-500");
  }
  // Format 1, written before the end line, is still read.
  REQUIRE(whole.starts_with("mailflowd-mta-sts 2\n"));
  REQUIRE(whole.ends_with("\nend\n"));
  std::ofstream(dir / "mta-sts.state", std::ios::binary | std::ios::trunc)
      << "mailflowd-mta-sts 1" << whole.substr(whole.find('\n'), whole.size() - whole.find('\n') - 4);
  MtaStsCache v1;
  std::string error;
  REQUIRE(v1.load(dir.string(), 500, error));
  CHECK(error.empty());
  CHECK(v1.size() == 2);
  std::filesystem::remove_all(dir);
}

TEST_CASE("mta-sts cache: a file with times it never writes, or a domain twice, is refused whole") {
  const std::string policy_lines = "\tversion: STSv1\tmode: enforce\tmx: mx1.example.net\tmax_age: 86400\n";
  const auto file = [&](const std::string& lines) { return "mailflowd-mta-sts 2\n" + lines + "end\n"; };
  const std::string good = "a.example\tid1\t100\t86500" + policy_lines;
  for (const std::string& bad : {
           // fetch_due's refresh time (expires_at - fetched_at) overflowed on these: undefined behaviour.
           std::string("a.example\tid1\t-9223372036854775808\t9223372036854775807") + policy_lines,
           std::string("a.example\tid1\t-1\t1000") + policy_lines,   // fetched before 1970
           std::string("a.example\tid1\t1000\t999") + policy_lines,  // expired before it was fetched
           good + good,  // the second would silently replace the first
       }) {
    CAPTURE(bad);
    MtaStsCache cache;
    cache.store("held.example", {"h", policy(proto::mta_sts::Mode::testing), 100, 900});
    const std::string held = cache.serialize();
    std::string error;
    CHECK_FALSE(cache.deserialize(file(bad), 500, error));
    CHECK(error.starts_with("line "));
    CHECK(cache.serialize() == held);
  }
  MtaStsCache cache;
  std::string error;
  REQUIRE(cache.deserialize(file(good), 500, error));
  CHECK(cache.find("a.example", 86499).has_value());
  // Kept for longer than its max_age (a hand-edited file, a year-long cache): it expires at max_age, as
  // stored.
  REQUIRE(cache.deserialize(file("a.example\tid1\t100\t9999999999" + policy_lines), 500, error));
  CHECK(cache.find("a.example", 86499).has_value());
  CHECK_FALSE(cache.find("a.example", 86500).has_value());
  CHECK(cache.serialize() == file(good));
}

TEST_CASE("check_mx: listed, TLS1.2+, valid certificate - enforce refuses, testing reports, none ignores") {
  PolicyState enforce;
  enforce.mode = PolicyState::Mode::enforce;
  enforce.policy = policy(proto::mta_sts::Mode::enforce);
  const MxTls good{true, proto::TlsVersion::tls13, true, ResultType::certificate_not_trusted};
  CHECK(mx_listed(enforce, "MX1.example.net."));
  CHECK(mx_listed(enforce, "a.backup.example.net"));
  CHECK_FALSE(mx_listed(enforce, "mx2.example.net"));
  auto v = check_mx(enforce, "mx1.example.net", good);
  CHECK(v.usable);
  CHECK_FALSE(v.failure.has_value());
  v = check_mx(enforce, "mx2.example.net", good);
  CHECK_FALSE(v.usable);
  CHECK(v.failure == ResultType::validation_failure);
  v = check_mx(enforce, "mx1.example.net", MxTls{});
  CHECK_FALSE(v.usable);
  CHECK(v.failure == ResultType::starttls_not_supported);
  v = check_mx(enforce, "mx1.example.net", MxTls{true, proto::TlsVersion::tls11, true, {}});
  CHECK_FALSE(v.usable);
  CHECK(v.reason == "TLS below 1.2");
  v = check_mx(enforce, "mx1.example.net", MxTls{true, proto::TlsVersion::tls12, false, ResultType::certificate_expired});
  CHECK_FALSE(v.usable);
  CHECK(v.failure == ResultType::certificate_expired);

  PolicyState testing = enforce;
  testing.mode = PolicyState::Mode::testing;
  v = check_mx(testing, "mx2.example.net", MxTls{});
  CHECK(v.usable);
  CHECK(v.failure == ResultType::validation_failure);

  PolicyState none;
  CHECK(mx_listed(none, "anything.example"));
  v = check_mx(none, "anything.example", MxTls{});
  CHECK(v.usable);
  CHECK_FALSE(v.failure.has_value());
}

}  // namespace
