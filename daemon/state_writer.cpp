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
    lock.unlock();
    const bool saved = write_files(job.files);
    if (job.done) job.done(saved);
    lock.lock();
    running_job_ = false;
    if (jobs_.empty()) idle_.notify_all();
  }
}

bool StateWriter::write_files(const Files& files) {
  const auto failed = [this](const std::string& error) {
    telemetry_.state_error("save_failed");
    log_limited(LogLevel::error, "state_save_failed", {{"error", error}});
  };
  bool saved = true;
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
