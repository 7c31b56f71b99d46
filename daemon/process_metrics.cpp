#include "daemon/process_metrics.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <charconv>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

namespace mailflow {
namespace {

std::string read_file(const char* path) {
  std::ifstream in(path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// Boot time in unix seconds ("btime" of /proc/stat); 0 when unknown.
double boot_time_seconds() {
  std::istringstream in(read_file("/proc/stat"));
  std::string key;
  while (in >> key) {
    if (key == "btime") {
      double value = 0;
      in >> value;
      return value;
    }
    in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return 0;
}

double open_fd_count() {
  std::error_code ec;
  double count = 0;
  for (std::filesystem::directory_iterator it("/proc/self/fd", ec), end; !ec && it != end; it.increment(ec)) {
    ++count;
  }
  return count;
}

}  // namespace

std::optional<ProcessStats> read_process_stats() {
  const std::string stat = read_file("/proc/self/stat");
  // The command name (field 2) is in parentheses and may contain spaces: fields are counted after the last ')'.
  const auto paren = stat.rfind(')');
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream in(stat.substr(paren + 1));
  std::vector<std::string> fields;  // fields[0] is field 3 (state)
  for (std::string field; in >> field;) fields.push_back(field);
  if (fields.size() < 22) return std::nullopt;
  auto number = [&](std::size_t field_no) {
    double value = 0;
    const std::string& text = fields[field_no - 3];
    std::from_chars(text.data(), text.data() + text.size(), value);
    return value;
  };
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page_size = static_cast<double>(sysconf(_SC_PAGESIZE));

  ProcessStats stats;
  stats.cpu_seconds = (number(14) + number(15)) / ticks;  // utime + stime
  stats.start_time_seconds = boot_time_seconds() + number(22) / ticks;
  stats.virtual_bytes = number(23);
  stats.resident_bytes = number(24) * page_size;
  stats.open_fds = open_fd_count();
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    stats.max_fds = limit.rlim_cur == RLIM_INFINITY ? -1 : static_cast<double>(limit.rlim_cur);
  }
  return stats;
}

}  // namespace mailflow
