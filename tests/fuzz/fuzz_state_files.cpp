// The state files read back from state_dir (a crash, a full disk, an editor or an attacker may have changed
// them): the first byte picks the parser (windows.state, remotes.state, tlsrpt.state, tlsrpt-ledger.state,
// mta-sts.state), the rest is the file. A file is either refused whole (the store keeps what it had) or
// loaded, and what loaded serializes to a file that loads to the same thing
// (serialize(load(serialize(x))) == serialize(x)). Where our own files never repeat or leave out a line, a
// loaded file loses none of its lines either (a repeated entry is refused, not merged over the first). The
// MTA-STS policies loaded are then looked up as the MX walk does (find, fetch_due, a failed fetch), so that
// the times a file holds are used, not only read back.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "daemon/mta_sts_cache.hpp"
#include "daemon/remote_store.hpp"
#include "daemon/tlsrpt.hpp"
#include "daemon/tlsrpt_ledger.hpp"
#include "daemon/window_store.hpp"
#include "fuzz_check.hpp"

namespace {

// The lines that hold entries: all but the end line that version 2 files end in (version 1 files, still read,
// have none, and are saved as version 2).
std::size_t lines(std::string_view text) {
  const auto n = static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
  return text.ends_with("\nend\n") ? n - 1 : n;
}

// `Store` has serialize() and deserialize(text, error); `fill` gives it something to hold before the load.
template <class Store, class Fill>
void check_store(std::string_view file, Fill fill, bool keeps_lines) {
  Store store;
  fill(store);
  const std::string held = store.serialize();
  std::string error;
  if (!store.deserialize(file, error)) {
    FUZZ_CHECK(!error.empty());
    FUZZ_CHECK(store.serialize() == held);  // refused whole: nothing of the file was taken
    return;
  }
  const std::string saved = store.serialize();
  if (keeps_lines) FUZZ_CHECK(lines(saved) == lines(file));
  Store reloaded;
  fill(reloaded);
  error.clear();
  FUZZ_CHECK(reloaded.deserialize(saved, error));
  FUZZ_CHECK(reloaded.serialize() == saved);
}

// The MTA-STS cache: deserialize takes the time (entries expired by then are dropped, not refused).
void check_mta_sts(std::string_view file) {
  constexpr std::int64_t now = 1'780'000'000;  // 2026
  const auto fill = [](mailflow::MtaStsCache& cache) {
    std::string error;
    auto policy = mailflow::proto::mta_sts::parse_policy(
        "version: STSv1\nmode: enforce\nmx: mx.held.example\n"
        "max_age: 86400\n",
        error);
    cache.store("held.example", {"held1", *policy, now - 10, now + 86390});
  };
  mailflow::MtaStsCache cache;
  fill(cache);
  const std::string held = cache.serialize();
  std::string error;
  if (!cache.deserialize(file, now, error)) {
    FUZZ_CHECK(!error.empty());
    FUZZ_CHECK(cache.serialize() == held);
    return;
  }
  const std::string saved = cache.serialize();
  mailflow::MtaStsCache reloaded;
  error.clear();
  FUZZ_CHECK(reloaded.deserialize(saved, now, error));
  FUZZ_CHECK(reloaded.serialize() == saved);
  // Every entry loaded is unexpired at now, or at the newest fetch in the file where that is earlier (a clock
  // far ahead drops none); find() gives it exactly while it is unexpired; the walk's questions have an answer
  // at any time.
  struct Entry {
    std::string domain;
    std::string id;
    std::int64_t fetched_at;
    std::int64_t expires_at;
  };
  std::vector<Entry> entries;
  std::int64_t newest_fetch = std::numeric_limits<std::int64_t>::min();
  for (std::size_t at = saved.find('\n') + 1; at < saved.size();) {
    const std::size_t end = saved.find('\n', at);
    const std::string line = saved.substr(at, end - at);
    at = end + 1;
    if (line == "end") break;
    std::vector<std::string> fields;  // domain, id, fetched_at, expires_at, policy lines
    for (std::size_t from = 0; fields.size() < 4;) {
      const std::size_t tab = line.find('\t', from);
      fields.push_back(line.substr(from, tab - from));
      if (tab == std::string::npos) break;
      from = tab + 1;
    }
    FUZZ_CHECK(fields.size() == 4);
    entries.push_back({fields[0], fields[1], std::stoll(fields[2]), std::stoll(fields[3])});
    newest_fetch = std::max(newest_fetch, entries.back().fetched_at);
  }
  for (const Entry& entry : entries) {
    FUZZ_CHECK(entry.expires_at > std::min(now, newest_fetch));
    const auto found = cache.find(entry.domain, now);
    FUZZ_CHECK(found.has_value() == (entry.expires_at > now));
    for (const std::int64_t when : {now, entry.fetched_at, entry.expires_at - 1, entry.expires_at}) {
      (void)cache.fetch_due(entry.domain, entry.id, when);
      FUZZ_CHECK(cache.find(entry.domain, when).has_value() == (entry.expires_at > when));
    }
    cache.fetch_failed(entry.domain, entry.id, now);
    FUZZ_CHECK(!cache.fetch_due(entry.domain, entry.id, now));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view file(reinterpret_cast<const char*>(data) + 1, size - 1);
  const auto now = std::chrono::system_clock::time_point(std::chrono::hours(493'000));  // 2026
  const auto held = std::string("held");
  switch (data[0] % 5) {
    case 0:
      check_store<mailflow::WindowStore>(
          file,
          [&](mailflow::WindowStore& store) {
            store.add(held, mailflow::config::Direction::inbound, mailflow::proto::TlsVersion::tls12, now);
          },
          false);  // version 1 files and zero counts (never written) are read
      break;
    case 1:
      check_store<mailflow::RemoteStore>(
          file,
          [&](mailflow::RemoteStore& store) {
            mailflow::HeavyHitters::Observation observation;
            observation.key = "192.0.2.1";
            store.add(held, mailflow::config::Direction::inbound, mailflow::RemoteTable::remotes, observation,
                      now);
          },
          false);  // version 1 files are read
      break;
    case 2:
      check_store<mailflow::TlsRptStore>(
          file,
          [&](mailflow::TlsRptStore& store) {
            mailflow::TlsRptSession session;
            session.domain = "held.example";
            session.rua = {"mailto:tlsrpt@held.example"};
            store.record("2026-11-25", session);
          },
          true);
      break;
    case 3: {
      std::string error;
      const auto ledger = mailflow::TlsRptLedger::parse(file, error);
      if (!ledger) {
        FUZZ_CHECK(!error.empty());
        break;
      }
      const std::string saved = ledger->serialize();
      FUZZ_CHECK(lines(saved) == lines(file));
      const auto reloaded = mailflow::TlsRptLedger::parse(saved, error);
      FUZZ_CHECK(reloaded.has_value());
      FUZZ_CHECK(reloaded->serialize() == saved);
      break;
    }
    case 4:
      check_mta_sts(file);
      break;
  }
  return 0;
}
