#include "daemon/state_writer.hpp"

#include <doctest/doctest.h>

#include <unistd.h>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>

#include "daemon/telemetry.hpp"

namespace {

using mailflow::StateFile;
using mailflow::StateWriter;
using mailflow::Telemetry;

std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("mailflow-state-writer-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::string read(const std::filesystem::path& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), {}};
}

double save_failures(Telemetry& telemetry) {
  const std::string text = telemetry.metrics_text();
  const std::string series = R"(mailflow_state_errors_total{reason="save_failed"} )";
  const auto at = text.find(series);
  REQUIRE(at != std::string::npos);
  return std::stod(text.substr(at + series.size()));
}

}  // namespace

TEST_CASE("state writer: jobs are written in order off the caller's thread, wait() returns when all are") {
  const auto dir = fresh_dir("order");
  Telemetry telemetry;
  StateWriter writer(dir.string(), telemetry);
  const auto caller = std::this_thread::get_id();
  std::atomic<bool> other_thread{false};
  std::atomic<bool> first_release{false};
  // The first job holds the writer until released: the caller is not blocked meanwhile.
  writer.write([&] {
    other_thread = std::this_thread::get_id() != caller;
    while (!first_release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return std::vector<StateFile>{{"a.state", "old"}};
  });
  writer.write([] { return std::vector<StateFile>{{"a.state", "new"}, {"b.state", "b"}}; });
  CHECK_FALSE(std::filesystem::exists(dir / "a.state"));
  first_release = true;
  writer.wait();
  CHECK(other_thread);
  CHECK(read(dir / "a.state") == "new");  // the later job's text, never overwritten by the earlier one
  CHECK(read(dir / "b.state") == "b");
  std::filesystem::remove_all(dir);
}

TEST_CASE("state writer: a file that cannot be written is counted, the job's others are written") {
  const auto dir = fresh_dir("failure");
  std::filesystem::create_directory(dir / "bad.state.tmp");  // in the way of the temporary file
  Telemetry telemetry;
  std::atomic<int> done_calls{0};
  std::atomic<bool> saved{true};
  {
    StateWriter writer(dir.string(), telemetry);
    writer.write(
        [] {
          return std::vector<StateFile>{{"bad.state", "x"}, {"good.state", "y"}};
        },
        [&](bool all) {
          saved = all;
          ++done_calls;
        });
    writer.wait();
    CHECK(done_calls == 1);
    CHECK_FALSE(saved);
    CHECK(save_failures(telemetry) == 1.0);
    CHECK(read(dir / "good.state") == "y");
    // A job that throws (out of memory while serializing) is counted too; the thread goes on.
    writer.write([]() -> std::vector<StateFile> { throw std::runtime_error("no memory"); });
    writer.write([] { return std::vector<StateFile>{{"after.state", "z"}}; });
  }  // the destructor writes what was handed in before it joins
  CHECK(save_failures(telemetry) == 2.0);
  CHECK(read(dir / "after.state") == "z");
  std::filesystem::remove_all(dir);
}

TEST_CASE("state files: two moved aside in the same second are both kept") {
  const auto dir = fresh_dir("aside");
  for (const char* text : {"first", "second", "third"}) {
    std::ofstream(dir / "x.state") << text;
    CHECK(mailflow::move_state_file_aside(dir.string(), "x.state", 1000).starts_with("moved to "));
  }
  CHECK_FALSE(std::filesystem::exists(dir / "x.state"));
  CHECK(read(dir / "x.state.corrupt-1000") == "first");
  CHECK(read(dir / "x.state.corrupt-1000-2") == "second");
  CHECK(read(dir / "x.state.corrupt-1000-3") == "third");
  std::filesystem::remove_all(dir);
}

TEST_CASE("state files: at most 5 moved aside are kept per name, the newest, and the removed ones are said") {
  const auto dir = fresh_dir("aside-bound");
  // Six earlier ones (one a second in the same second), another file's, one "from the future" (a clock set
  // back: the file moved aside now is kept whatever the others' times say) and a name of another pattern.
  for (const char* name :
       {"x.state.corrupt-100", "x.state.corrupt-101", "x.state.corrupt-102", "x.state.corrupt-102-2",
        "x.state.corrupt-103", "x.state.corrupt-5000", "y.state.corrupt-50", "x.state.corrupt-notes"})
    std::ofstream(dir / name) << name;
  std::ofstream(dir / "x.state") << "bad";
  const std::string said = mailflow::move_state_file_aside(dir.string(), "x.state", 1000);
  CHECK(said == "moved to " + (dir / "x.state.corrupt-1000").string() +
                    " (removed the oldest moved aside before: x.state.corrupt-100, x.state.corrupt-101)");
  CHECK(read(dir / "x.state.corrupt-1000") == "bad");
  for (const char* kept : {"x.state.corrupt-102", "x.state.corrupt-102-2", "x.state.corrupt-103",
                           "x.state.corrupt-5000", "y.state.corrupt-50", "x.state.corrupt-notes"})
    CHECK_MESSAGE(read(dir / kept) == kept, kept);
  CHECK_FALSE(std::filesystem::exists(dir / "x.state.corrupt-100"));
  CHECK_FALSE(std::filesystem::exists(dir / "x.state.corrupt-101"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("state_dir lock: one holder at a time, named by its pid, free again once released") {
  const auto dir = fresh_dir("lock") / "made";  // a missing state_dir is made, as at start
  {
    const mailflow::StateDirLock held(dir.string());
    CHECK(read(dir / "mailflowd.lock") == std::to_string(::getpid()) + "\n");
    try {
      const mailflow::StateDirLock second(dir.string());  // another open file: refused even in one process
      FAIL("a second lock on the same state_dir was taken");
    } catch (const mailflow::StateDirLock::InUse& e) {
      CHECK(std::string(e.what()).find("is in use by another mailflowd process (pid " +
                                       std::to_string(::getpid()) + ",") != std::string::npos);
    }
  }
  CHECK_NOTHROW(mailflow::StateDirLock(dir.string()));
  std::filesystem::remove_all(dir.parent_path());
}

TEST_CASE(
    "state_dir lock: kept while its file is there, taken again after state_dir was deleted, lost to "
    "another") {
  const auto dir = fresh_dir("keep") / "state";
  mailflow::StateDirLock held(dir.string());
  std::string error;
  CHECK(held.keep(error) == mailflow::StateDirLock::Kept::held);
  std::filesystem::remove_all(dir);  // an operator's rm -rf while running: made again with the lock on it
  CHECK(held.keep(error) == mailflow::StateDirLock::Kept::taken_again);
  CHECK_THROWS_AS(mailflow::StateDirLock(dir.string()), mailflow::StateDirLock::InUse);
  CHECK(held.keep(error) == mailflow::StateDirLock::Kept::held);
  std::filesystem::remove_all(dir);
  {
    const mailflow::StateDirLock other(dir.string());  // another process took the new state_dir first
    CHECK(held.keep(error) == mailflow::StateDirLock::Kept::lost);
    CHECK(error.find("is in use by another mailflowd process") != std::string::npos);
  }
  std::filesystem::remove_all(dir.parent_path());
}
