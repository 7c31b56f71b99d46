#pragma once
// process_* metrics the way the Prometheus Go client exports them, read from /proc/self (Linux only).
#include <optional>

namespace mailflow {

struct ProcessStats {
  double cpu_seconds = 0;         // process_cpu_seconds_total (user + system)
  double resident_bytes = 0;      // process_resident_memory_bytes
  double virtual_bytes = 0;       // process_virtual_memory_bytes
  double open_fds = 0;            // process_open_fds
  double max_fds = 0;             // process_max_fds (soft RLIMIT_NOFILE)
  double start_time_seconds = 0;  // process_start_time_seconds (unix time)
};

// Empty when /proc/self/stat cannot be read or parsed.
std::optional<ProcessStats> read_process_stats();

}  // namespace mailflow
