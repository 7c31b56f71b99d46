// The TLS-RPT store (daemon/tlsrpt.hpp): merging sessions, its bounds, persistence with corrupt-file handling,
// gzip, and mailflow_outbound_policy_total exported with zeros.
#include <doctest/doctest.h>

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "daemon/state_file.hpp"
#include "daemon/telemetry.hpp"
#include "daemon/tlsrpt.hpp"

#include <fmt/format.h>

namespace {

using namespace mailflow;
using proto::tlsrpt::FailureKey;
using proto::tlsrpt::PolicyKey;
using proto::tlsrpt::PolicyType;
using proto::tlsrpt::ResultType;

const PolicyKey kSts{PolicyType::sts, {"version: STSv1", "mode: enforce", "mx: *.example.net", "max_age: 86400"},
                     {"*.example.net"}};

TlsRptSession ok(std::string domain) { return {std::move(domain), {"mailto:tlsrpt@example.net"}, kSts, std::nullopt}; }
TlsRptSession bad(std::string domain, ResultType result, std::string mx = "mx1.example.net") {
  return {std::move(domain), {"mailto:tlsrpt@example.net"}, kSts,
          FailureKey{result, "192.0.2.1", std::move(mx), "198.51.100.7", "detail 100%, ok"}};
}

std::string gunzip(const std::string& data) {
  z_stream stream{};
  REQUIRE(inflateInit2(&stream, 15 + 16) == Z_OK);
  std::string out(1 << 20, '\0');
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  stream.avail_in = static_cast<uInt>(data.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  CHECK(inflate(&stream, Z_FINISH) == Z_STREAM_END);
  out.resize(stream.total_out);
  inflateEnd(&stream);
  return out;
}

struct TempDir {
  std::filesystem::path path;
  TempDir() : path(std::filesystem::temp_directory_path() / ("mailflow-tlsrpt-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

TEST_CASE("tlsrpt store: sessions merge per day, domain and policy - failures per detail") {
  TlsRptStore store;
  store.record("2026-01-02", ok("example.net"));
  store.record("2026-01-02", ok("example.net"));
  store.record("2026-01-02", bad("example.net", ResultType::certificate_expired));
  store.record("2026-01-02", bad("example.net", ResultType::certificate_expired));
  store.record("2026-01-02", bad("example.net", ResultType::starttls_not_supported, "mx2.example.net"));
  store.record("2026-01-02", TlsRptSession{"example.net", {}, PolicyKey{}, std::nullopt});
  store.record("2026-01-03", ok("example.net"));
  store.record("2026-01-02", ok("a.example"));
  const auto day = store.day("2026-01-02");
  REQUIRE(day.size() == 2);
  CHECK(day[0].domain == "a.example");
  CHECK(day[1].domain == "example.net");
  CHECK(day[1].rua == std::vector<std::string>{"mailto:tlsrpt@example.net"});
  REQUIRE(day[1].policies.size() == 2);
  const auto& sts = day[1].policies.at(kSts);
  CHECK(sts.successful == 2);
  CHECK(sts.failed == 3);
  REQUIRE(sts.failures.size() == 2);
  CHECK(sts.failures.begin()->second + std::next(sts.failures.begin())->second == 3);
  CHECK(day[1].policies.at(PolicyKey{}).successful == 1);
  CHECK(store.day("2026-01-03").size() == 1);
  CHECK(store.day("2026-01-04").empty());
  store.forget("2026-01-02", "a.example");
  CHECK(store.day("2026-01-02").size() == 1);
}

TEST_CASE("tlsrpt store: a domain whose policy changes at each session stays bounded - every session counts") {
  TlsRptStore store;
  const std::size_t bound = TlsRptLimits{}.max_policies;
  for (int i = 0; i < 1000; ++i) {
    const std::string mx = "mx" + std::to_string(i) + ".example.net";
    const PolicyKey key{
        PolicyType::sts, {"version: STSv1", "mode: enforce", "mx: " + mx, std::string(4000, 'x')}, {mx}};
    store.record("2026-01-02",
                 TlsRptSession{"example.net", {"mailto:tlsrpt@example.net"}, key, std::nullopt});
  }
  const auto day = store.find("2026-01-02", "example.net");
  REQUIRE(day.has_value());
  CHECK(day->policies.size() == bound + 1);
  std::uint64_t sessions = 0;
  for (const auto& [key, counts] : day->policies) sessions += counts.successful;
  CHECK(sessions == 1000);
  CHECK(day->policies.at(PolicyKey{PolicyType::sts, {}, {}}).successful == 1000 - bound);
  CHECK(store.serialize().size() < 200 * 1000);  // not 1000 policies of 4 KB
}

TEST_CASE("tlsrpt store: the policies' text stays bounded across domains - every session counts") {
  // Any domain a relayed mail goes to can publish a 64 KiB MTA-STS policy (or a TLSA RRset of that size,
  // twice that as hex): one session per domain, 10,000 domains a day, kept 16 days. Each domain within its 20
  // policies, the text of all of them together must still stay far below what tlsrpt.state may hold (256 MiB,
  // a larger file is moved aside at start with every unsent report).
  TlsRptStore store;
  const std::size_t bound = TlsRptLimits{}.max_policy_text;
  const std::string big(64 * 1024 - 64, 'x');
  const int domains = static_cast<int>(bound / big.size()) + 200;
  for (int i = 0; i < domains; ++i) {
    const std::string domain = "d" + std::to_string(i) + ".example.net";
    const PolicyKey key{
        PolicyType::sts, {"version: STSv1", "mode: enforce", "mx: mx." + domain, big}, {"mx." + domain}};
    store.record("2026-01-02", TlsRptSession{domain, {"mailto:tlsrpt@example.net"}, key, std::nullopt});
  }
  const auto text = store.serialize();
  CHECK(text.size() < bound + bound / 8);
  const auto days = store.day("2026-01-02");
  REQUIRE(days.size() == static_cast<std::size_t>(domains));
  // Every session still counts; the last domains' under their policy type without its text.
  std::uint64_t sessions = 0;
  for (const auto& day : days)
    for (const auto& [key, counts] : day.policies) sessions += counts.successful;
  CHECK(sessions == static_cast<std::uint64_t>(domains));
  const auto late = store.find("2026-01-02", "d" + std::to_string(domains - 1) + ".example.net");
  REQUIRE(late.has_value());
  CHECK(late->policies.at(PolicyKey{PolicyType::sts, {}, {}}).successful == 1);
  // A store loaded from that file counts what it holds: a further policy goes without its text there too.
  TlsRptStore loaded;
  std::string error;
  REQUIRE(loaded.deserialize(text, error));
  const PolicyKey more{
      PolicyType::sts, {"version: STSv1", "mode: enforce", "mx: mx.more.example", big}, {"mx.more.example"}};
  loaded.record("2026-01-02",
                TlsRptSession{"more.example", {"mailto:tlsrpt@example.net"}, more, std::nullopt});
  CHECK(loaded.find("2026-01-02", "more.example")->policies.contains(PolicyKey{PolicyType::sts, {}, {}}));
  // Sent and forgotten, a report gives its text back: the next day's first policy is kept with its text.
  for (const auto& day : days) store.forget(day.date, day.domain);
  const PolicyKey next{
      PolicyType::sts, {"version: STSv1", "mode: enforce", "mx: mx.next.example", big}, {"mx.next.example"}};
  store.record("2026-01-03",
               TlsRptSession{"next.example", {"mailto:tlsrpt@example.net"}, next, std::nullopt});
  CHECK(store.find("2026-01-03", "next.example")->policies.contains(next));
}

TEST_CASE("tlsrpt store: a failure's reason text is bounded - its session still counts") {
  // The reason of an MTA-STS fetch failure quotes what the domain's policy host said (a Content-Type of up to
  // the 16 KiB head bound), different at every fetch if it likes: 100 details a policy, each that long.
  TlsRptStore store;
  const std::size_t bound = TlsRptLimits{}.max_failure_reason;
  for (int i = 0; i < 100; ++i) {
    TlsRptSession session = bad("example.net", ResultType::sts_policy_fetch_error);
    session.failure->failure_reason_code =
        "Content-Type is not text/plain: \"" + std::to_string(i) + std::string(16 * 1024, 'x') + "\"";
    store.record("2026-01-02", session);
  }
  const auto day = store.find("2026-01-02", "example.net");
  REQUIRE(day.has_value());
  const auto& counts = day->policies.at(kSts);
  CHECK(counts.failed == 100);
  CHECK(counts.failures.size() == 100);  // still told apart by what they begin with
  for (const auto& [failure, count] : counts.failures) {
    CHECK(failure.failure_reason_code.size() <= bound);
    CHECK(failure.failure_reason_code.starts_with("Content-Type is not text/plain: \""));
  }
  CHECK(store.serialize().size() < 100 * (bound + 200));
}

TEST_CASE("tlsrpt store: the rua of a day and domain, as recorded") {
  TlsRptStore store;
  store.record("2026-01-02", ok("b.example"));
  store.record("2026-01-03", ok("a.example"));
  store.record("2026-01-03", ok("c.example"));
  CHECK(store.rua("2026-01-03", "c.example") == std::vector<std::string>{"mailto:tlsrpt@example.net"});
  CHECK(store.rua("2026-01-02", "b.example") == std::vector<std::string>{"mailto:tlsrpt@example.net"});
  CHECK(store.rua("2026-01-03", "b.example").empty());  // another day's
  CHECK(store.rua("2026-01-04", "c.example").empty());
  CHECK(store.rua("2026-01-01", "a.example").empty());
}

TEST_CASE("tlsrpt store: bounded in domains per day, failure details and days") {
  TlsRptStore store(TlsRptLimits{2, 1, 2});
  store.record("2026-01-01", ok("a.example"));
  store.record("2026-01-01", ok("b.example"));
  store.record("2026-01-01", ok("c.example"));  // third domain of the day: dropped
  CHECK(store.day("2026-01-01").size() == 2);
  CHECK(store.dropped_domains() == 1);
  store.record("2026-01-01", bad("a.example", ResultType::certificate_expired));
  store.record("2026-01-01", bad("a.example", ResultType::validation_failure));  // detail over the bound
  const auto a = store.find("2026-01-01", "a.example");
  REQUIRE(a.has_value());
  CHECK(a->policies.at(kSts).failed == 2);
  CHECK(a->policies.at(kSts).failures.size() == 1);
  CHECK(a->policies.at(kSts).failures_dropped == 1);
  store.record("2026-01-02", ok("a.example"));
  store.record("2026-01-03", ok("a.example"));  // a third day: the oldest goes
  CHECK(store.day("2026-01-01").empty());
  CHECK(store.day("2026-01-02").size() == 1);
}

TEST_CASE("tlsrpt store: an unsent report outlives the longest tlsrpt.retry_for") {
  // retry_for is at most 14d from the first try, on the day after the report's date: until then the report
  // must stay in the store, although a session is recorded every day.
  TlsRptStore store;
  const auto date = [](int day) { return fmt::format("2026-01-{:02}", day); };
  store.record(date(1), ok("example.net"));
  for (int day = 2; day <= 16; ++day) store.record(date(day), ok("other.example"));
  CHECK(store.find(date(1), "example.net").has_value());
  store.record(date(17), ok("other.example"));  // given up by now: it may go
  CHECK_FALSE(store.find(date(1), "example.net").has_value());
}

TEST_CASE("tlsrpt store: saved and loaded exactly - a corrupt file is moved aside") {
  TempDir dir;
  TlsRptStore store;
  store.record("2026-01-02", ok("example.net"));
  store.record("2026-01-02", bad("example.net", ResultType::sts_webpki_invalid));
  store.record("2026-01-02", TlsRptSession{"x.example", {"https://r.example/v1?a=b,c"}, PolicyKey{}, std::nullopt});
  std::string error;
  const auto file = store.state_file();
  REQUIRE(mailflow::write_state_file(dir.path.string(), file.name, file.text, error));
  TlsRptStore loaded;
  REQUIRE(loaded.load(dir.path.string(), 1000, error));
  CHECK(error.empty());
  CHECK(loaded.serialize() == store.serialize());
  CHECK(loaded.day("2026-01-02").at(1).rua == std::vector<std::string>{"https://r.example/v1?a=b,c"});

  for (const std::string& corrupt : std::vector<std::string>{
           "garbage\n", "mailflowd-tlsrpt 1\nday 2026-13 x -\n", "mailflowd-tlsrpt 1\npolicy sts - - 1 0 0\n",
           "mailflowd-tlsrpt 1\nday 2026-01-01 x -\npolicy sts - - 1 0 0\nfailure nope - - - - 1\n",
           std::string("mailflowd-tlsrpt 1\nday 2026-01-01 x\0 -\n", 38),
           // A repeated policy or failure (never written) would replace the first's counts.
           "mailflowd-tlsrpt 1\nday 2026-01-01 x -\npolicy sts - - 1 0 0\npolicy sts - - 5 0 0\n",
           "mailflowd-tlsrpt 1\nday 2026-01-01 x -\npolicy sts - - 0 2 0\n"
           "failure sts-webpki-invalid - - - - 1\nfailure sts-webpki-invalid - - - - 1\n"}) {
    CAPTURE(corrupt);
    std::ofstream(dir.path / "tlsrpt.state", std::ios::binary) << corrupt;
    TlsRptStore again;
    again.record("2026-01-01", ok("kept.example"));
    REQUIRE(again.load(dir.path.string(), 1234, error));
    CHECK(error.find("tlsrpt.state is unusable") != std::string::npos);
    CHECK(std::filesystem::exists(dir.path / "tlsrpt.state.corrupt-1234"));
    CHECK_FALSE(std::filesystem::exists(dir.path / "tlsrpt.state"));
    CHECK(again.day("2026-01-01").size() == 1);  // what it had is kept
    std::filesystem::remove(dir.path / "tlsrpt.state.corrupt-1234");
  }
}

TEST_CASE("gzip: a round trip through zlib's inflate") {
  TlsRptStore store;
  store.record("2026-01-02", bad("example.net", ResultType::certificate_expired));
  const std::string json =
      proto::tlsrpt::render_json(*store.find("2026-01-02", "example.net"), {"Org", "postmaster@example.org", "example.org"});
  const std::string packed = gzip(json);
  CHECK(static_cast<unsigned char>(packed[0]) == 0x1f);
  CHECK(static_cast<unsigned char>(packed[1]) == 0x8b);
  CHECK(gunzip(packed) == json);
  CHECK(gunzip(gzip("")).empty());
}

TEST_CASE("mailflow_outbound_policy_total: every outbound connector x policy x result from the start") {
  const auto loaded = config::load_config_string(R"(hostname: mx1.example.org
listeners:
  - {name: out, address: "127.0.0.1:2587", direction: outbound, upstream: internet}
upstreams:
  - {name: internet, mx: true}
connectors:
  - {name: partner, type: partner, direction: outbound, upstream: internet}
)", "t.yaml");
  REQUIRE(loaded.config);
  Telemetry telemetry;
  telemetry.configure(*loaded.config);
  std::string metrics = telemetry.metrics_text();
  CHECK(metrics.find("# TYPE mailflow_outbound_policy_total counter") != std::string::npos);
  for (const std::string connector : {"partner", "internet"}) {
    for (const std::string policy : {"dane", "mta-sts", "none"}) {
      for (const std::string result : {"success", "sts-policy-fetch-error", "tlsa-invalid", "starttls-not-supported"}) {
        const std::string line = "mailflow_outbound_policy_total{connector=\"" + connector + "\",policy=\"" + policy +
                                 "\",result=\"" + result + "\"} 0\n";
        CHECK_MESSAGE(metrics.find(line) != std::string::npos, line);
      }
    }
  }
  telemetry.outbound_policy("partner", "mta-sts", "sts-policy-fetch-error");
  CHECK(telemetry.metrics_text().find("mailflow_outbound_policy_total{connector=\"partner\",policy=\"mta-sts\","
                                      "result=\"sts-policy-fetch-error\"} 1\n") != std::string::npos);
  CHECK(telemetry.tlsrpt().submitter().submitter == "mx1.example.org");
}

}  // namespace

TEST_CASE("tlsrpt store: a file cut at any byte is never loaded as valid") {
  // A restore that ran out of disk, a copy cut short: whatever the file lost (a digit of a count, a policy's
  // last field, whole lines: a day's failures, the last days), it must be moved aside, never loaded with the
  // rest silently changed.
  TempDir dir;
  TlsRptStore store;
  store.record("2026-01-02", ok("example.net"));
  store.record("2026-01-03", ok("example.org"));
  for (int i = 0; i < 12; ++i) store.record("2026-01-02", bad("example.net", ResultType::sts_webpki_invalid));
  const std::string whole = store.serialize();
  REQUIRE(whole.back() == '\n');
  for (std::size_t cut = 0; cut < whole.size(); ++cut) {
    CAPTURE(whole.substr(0, cut));
    std::ofstream(dir.path / "tlsrpt.state", std::ios::binary | std::ios::trunc) << whole.substr(0, cut);
    TlsRptStore loaded;
    std::string error;
    REQUIRE(loaded.load(dir.path.string(), 42, error));
    CHECK(error.find("tlsrpt.state is unusable") != std::string::npos);
    CHECK(std::filesystem::exists(dir.path / "tlsrpt.state.corrupt-42"));
    CHECK(loaded.day("2026-01-02").empty());
    CHECK(loaded.day("2026-01-03").empty());
    std::filesystem::remove(dir.path / "tlsrpt.state.corrupt-42");
  }
  // Format 1, written before the end line, is still read.
  REQUIRE(whole.starts_with("mailflowd-tlsrpt 2\n"));
  REQUIRE(whole.ends_with("\nend\n"));
  std::ofstream(dir.path / "tlsrpt.state", std::ios::binary | std::ios::trunc)
      << "mailflowd-tlsrpt 1" << whole.substr(whole.find('\n'), whole.size() - whole.find('\n') - 4);
  TlsRptStore v1;
  std::string error;
  REQUIRE(v1.load(dir.path.string(), 42, error));
  CHECK(error.empty());
  CHECK(v1.serialize() == whole);
}
