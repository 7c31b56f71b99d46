// The state files read back from state_dir (a crash, a full disk, an editor or an attacker may have changed
// them): the first byte picks the parser (windows.state, remotes.state, tlsrpt.state, tlsrpt-ledger.state),
// the rest is the file. (The MTA-STS policy cache, daemon/mta_sts.cpp, is not here: that file needs Asio,
// which the clang of the fuzz preset does not build with Boost 1.74.) A file is either refused whole (the
// store keeps what it had) or loaded, and what loaded serializes to a file that loads to the same thing
// (serialize(load(serialize(x))) == serialize(x)). Where our own files never repeat or leave out a line, a
// loaded file loses none of its lines either (a repeated entry is refused, not merged over the first).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view file(reinterpret_cast<const char*>(data) + 1, size - 1);
  const auto now = std::chrono::system_clock::time_point(std::chrono::hours(493'000));  // 2026
  const auto held = std::string("held");
  switch (data[0] % 4) {
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
  }
  return 0;
}
