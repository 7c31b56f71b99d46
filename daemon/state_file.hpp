#pragma once
// Files in state_dir, written (by the StateWriter, daemon/state_writer.hpp) and read the same way: written
// whole to a temporary file, fsynced, renamed over the old one and the directory fsynced, so that a crash
// leaves the old or the new file, never half of one; a file that cannot be parsed is moved aside
// (NAME.corrupt-<unix time>[-N]) so that the evidence is kept and the daemon starts empty.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace mailflow {

// One state file's name (in state_dir) and its whole text, serialized and waiting to be written.
struct StateFile {
  std::string name;
  std::string text;
};

// Writes state_dir/name atomically (state_dir made again when it was deleted). False + error ("cannot write
// ...: reason") on any failure; the old file is then unchanged.
bool write_state_file(const std::string& state_dir, std::string_view name, std::string_view text,
                      std::string& error);

enum class StateRead { read, absent, too_big, failed };
// Reads state_dir/name (at most max_bytes). absent: no such file (a first start). failed: error says why;
// also for anything but a regular file (a directory, a device, a FIFO, whose open waited for a writer
// forever).
StateRead read_state_file(const std::string& state_dir, std::string_view name, std::size_t max_bytes,
                          std::string& text, std::string& error);

// state_dir belongs to one process at a time: an exclusive flock(2) on state_dir/mailflowd.lock, which holds
// the holder's pid. The daemon holds it for its life (reloads included: state_dir does not change without a
// restart), `mailflowd mta-sts --state` while it runs. Two daemons on one state_dir (two configurations both
// on /var/lib/mailflowd) overwrote each other's files, wrote into one NAME.tmp at once, and the daemon's next
// save overwrote what the CLI had written.
class StateDirLock {
 public:
  struct InUse : std::runtime_error {
    using std::runtime_error::runtime_error;
  };
  // Takes it, making state_dir where it is missing; throws InUse naming state_dir and the holder's pid when
  // another process holds it (never waits), std::runtime_error on other failures.
  explicit StateDirLock(const std::string& state_dir);
  ~StateDirLock();  // released
  StateDirLock(const StateDirLock&) = delete;
  StateDirLock& operator=(const StateDirLock&) = delete;

  enum class Kept { held, taken_again, lost };
  // Before files are written: whether state_dir/mailflowd.lock is still the file this lock holds. When
  // state_dir (or the lock file) was deleted while running, the lock held is on a file nobody else can open,
  // so another process could take the new one: it is taken again (state_dir made again), taken_again. lost,
  // with `error`, when another process has it or it cannot be taken: nothing may be written then.
  Kept keep(std::string& error);

 private:
  std::string state_dir_;
  int fd_ = -1;
};

// At most this many files moved aside are kept per state file: the one moved aside now and the newest others.
inline constexpr std::size_t max_kept_aside = 5;

// Renames state_dir/name to name.corrupt-<unix_time> (name.corrupt-<unix_time>-2, -3, ... where that one is
// taken: never over an earlier one), then removes the oldest earlier ones beyond max_kept_aside; returns the
// text for the log ("moved to ..." and the names removed, or why not).
std::string move_state_file_aside(const std::string& state_dir, std::string_view name,
                                  std::int64_t unix_time);

}  // namespace mailflow
