#pragma once
// Writes the files of state_dir on a thread of its own, so that a slow disk (an fsync on a busy HDD or a
// network volume takes 10-500 ms, several per save) and the serialization of a large state never stall an
// event loop: the minute's save used to freeze every session of loop 0 for as long as it took.
// Jobs run one at a time in the order they were handed in, so two writes of one file never overlap and a
// newer text is never overwritten by an older one (the TLS-RPT sender relies on tlsrpt.state being written
// before its ledger). A file that cannot be written is logged (state_save_failed) and counted
// (mailflow_state_errors_total{reason="save_failed"}); the job's other files are still written.
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "daemon/state_file.hpp"

namespace mailflow {

class Telemetry;

class StateWriter {
 public:
  // Runs on the writer thread: serializes what is thread-safe to read there (Telemetry, the MTA-STS cache) or
  // returns texts serialized by the caller.
  using Files = std::function<std::vector<StateFile>()>;
  // Runs on the writer thread after the job: true when every file was written.
  using Done = std::function<void(bool saved)>;

  StateWriter(std::string state_dir, Telemetry& telemetry);
  ~StateWriter();  // finishes the jobs handed in, then joins the thread
  StateWriter(const StateWriter&) = delete;
  StateWriter& operator=(const StateWriter&) = delete;

  void write(Files files, Done done = {});
  // The lock on state_dir (taken after the writer is made): each job first keeps it (StateDirLock::keep), and
  // writes nothing where it was lost to another process.
  void guard(StateDirLock& lock);
  // Blocks until every job handed in so far is done (the final save at stop).
  void wait();

 private:
  struct Job {
    Files files;
    Done done;
  };
  void run();
  bool write_files(const Files& files, StateDirLock* state_dir_lock);

  const std::string state_dir_;
  Telemetry& telemetry_;
  StateDirLock* lock_ = nullptr;  // under mutex_ when set; read by the writer thread after a job is taken
  std::mutex mutex_;
  std::condition_variable wake_;  // a job arrived, or stop
  std::condition_variable idle_;  // the queue ran empty
  std::deque<Job> jobs_;
  bool running_job_ = false;
  bool stop_ = false;
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace mailflow
