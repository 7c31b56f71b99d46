#include "daemon/state_writer.hpp"

#include <exception>

#include "daemon/log.hpp"
#include "daemon/telemetry.hpp"

namespace mailflow {

StateWriter::StateWriter(std::string state_dir, Telemetry& telemetry)
    : state_dir_(std::move(state_dir)), telemetry_(telemetry), thread_([this] { run(); }) {}

StateWriter::~StateWriter() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void StateWriter::write(Files files, Done done) {
  {
    std::lock_guard lock(mutex_);
    jobs_.push_back({std::move(files), std::move(done)});
  }
  wake_.notify_one();
}

void StateWriter::guard(StateDirLock& lock) {
  std::lock_guard hold(mutex_);
  lock_ = &lock;
}

void StateWriter::wait() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [this] { return jobs_.empty() && !running_job_; });
}

void StateWriter::run() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
    if (jobs_.empty()) return;  // stop_, and nothing left to write
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    running_job_ = true;
    StateDirLock* const state_dir_lock = lock_;
    lock.unlock();
    const bool saved = write_files(job.files, state_dir_lock);
    if (job.done) job.done(saved);
    lock.lock();
    running_job_ = false;
    if (jobs_.empty()) idle_.notify_all();
  }
}

bool StateWriter::write_files(const Files& files, StateDirLock* state_dir_lock) {
  const auto failed = [this](const std::string& error) {
    telemetry_.state_error("save_failed");
    log_limited(LogLevel::error, "state_save_failed", {{"error", error}});
  };
  bool saved = true;
  if (state_dir_lock != nullptr) {
    // state_dir deleted while running (an operator's rm -rf, a clean-up job): the files below would make it
    // again, and a second daemon (or `mailflowd mta-sts --state`) could take the new one meanwhile or after.
    std::string error;
    const auto kept = state_dir_lock->keep(error);
    if (kept == StateDirLock::Kept::lost) {
      failed(error);
      return false;
    }
    if (kept == StateDirLock::Kept::taken_again)
      log_event(LogLevel::warn, "state_dir_locked_again", {{"state_dir", state_dir_}});
  }
  try {
    // Each file on its own: one that cannot be written (the biggest, on a nearly full disk) does not keep the
    // others from being saved.
    for (const auto& file : files()) {
      std::string error;
      if (!write_state_file(state_dir_, file.name, file.text, error)) {
        failed(error);
        saved = false;
      }
    }
  } catch (const std::exception& e) {  // out of memory while serializing: this save is lost, not the thread
    failed(e.what());
    saved = false;
  }
  return saved;
}

}  // namespace mailflow
