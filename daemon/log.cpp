#include "daemon/log.hpp"

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <syslog.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "daemon/report.hpp"  // json_escape

namespace mailflow {
namespace {

std::atomic<bool> json_format{false};

bool needs_quotes(std::string_view v) {
  if (v.empty()) return true;
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || static_cast<unsigned char>(c) < 0x20) return true;
  }
  return false;
}

std::string render(std::string_view event, std::initializer_list<LogField> fields, std::uint64_t suppressed) {
  std::string line;
  line.reserve(256);
  if (json_format) {
    line += "\"event\":\"";
    line += json_escape(event);
    line += '"';
    for (const auto& field : fields) {
      line += ",\"";
      line += field.key();
      line += "\":";
      if (field.numeric()) {
        line += field.value();
      } else {
        line += '"';
        line += json_escape(field.value());
        line += '"';
      }
    }
    if (suppressed) line += ",\"suppressed\":" + std::to_string(suppressed);
  } else {
    line += event;
    for (const auto& field : fields) {
      line += ' ';
      line += field.key();
      line += '=';
      const std::string_view value = field.value();
      if (!field.numeric() && needs_quotes(value)) {
        line += '"';
        line += json_escape(value);
        line += '"';
      } else {
        line += value;
      }
    }
    if (suppressed) line += " suppressed=" + std::to_string(suppressed);
  }
  return line;
}

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::debug:
      return spdlog::level::debug;
    case LogLevel::info:
      return spdlog::level::info;
    case LogLevel::warn:
      return spdlog::level::warn;
    case LogLevel::error:
      return spdlog::level::err;
  }
  return spdlog::level::info;
}

// Where lines go. One sink for the life of the process, switched in place on reload: replacing spdlog's default
// logger while other threads log through it is not safe.
enum class Destination { standard_error, journal, syslog };

class OutputSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void set_destination(Destination destination) {
    std::lock_guard lock(mutex_);
    if (destination == Destination::syslog && destination_ != Destination::syslog) {
      ::openlog("mailflowd", LOG_PID | LOG_NDELAY, LOG_MAIL);
    } else if (destination != Destination::syslog && destination_ == Destination::syslog) {
      ::closelog();
    }
    destination_ = destination;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t formatted;
    formatter_->format(msg, formatted);
    std::string_view line(formatted.data(), formatted.size());
    switch (destination_) {
      case Destination::syslog: {
        while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
        ::syslog(syslog_priority(msg.level), "%.*s", static_cast<int>(line.size()), line.data());
        return;
      }
      case Destination::journal: {
        const std::string_view prefix = journal_prefix(msg.level);
        std::fwrite(prefix.data(), 1, prefix.size(), stderr);
        break;
      }
      case Destination::standard_error:
        break;
    }
    std::fwrite(line.data(), 1, line.size(), stderr);
  }
  void flush_() override { std::fflush(stderr); }

 private:
  Destination destination_ = Destination::standard_error;

  // sd-daemon(3): journald reads a "<N>" prefix of each line as its syslog priority.
  static std::string_view journal_prefix(spdlog::level::level_enum level) {
    switch (level) {
      case spdlog::level::trace:
      case spdlog::level::debug:
        return SD_DEBUG;
      case spdlog::level::info:
        return SD_INFO;
      case spdlog::level::warn:
        return SD_WARNING;
      case spdlog::level::err:
        return SD_ERR;
      case spdlog::level::critical:
        return SD_CRIT;
      default:
        return SD_INFO;
    }
  }
  static int syslog_priority(spdlog::level::level_enum level) {
    switch (level) {
      case spdlog::level::trace:
      case spdlog::level::debug:
        return LOG_DEBUG;
      case spdlog::level::info:
        return LOG_INFO;
      case spdlog::level::warn:
        return LOG_WARNING;
      case spdlog::level::err:
        return LOG_ERR;
      case spdlog::level::critical:
        return LOG_CRIT;
      default:
        return LOG_INFO;
    }
  }
};

struct RateLimit {
  std::int64_t second = 0;
  unsigned lines = 0;
  std::uint64_t suppressed = 0;
};
std::mutex limit_mutex;
std::unordered_map<std::string, RateLimit> limits;
constexpr unsigned burst = 10;

}  // namespace

bool stderr_is_journal() {
  const char* stream = std::getenv("JOURNAL_STREAM");
  if (stream == nullptr) return false;
  unsigned long long device = 0;
  unsigned long long inode = 0;
  if (std::sscanf(stream, "%llu:%llu", &device, &inode) != 2) return false;
  struct stat info {};
  if (::fstat(STDERR_FILENO, &info) != 0) return false;
  return static_cast<unsigned long long>(info.st_dev) == device && static_cast<unsigned long long>(info.st_ino) == inode;
}

void setup_logging(const config::Log& log) {
  static std::shared_ptr<OutputSink> sink;
  if (!sink) {
    sink = std::make_shared<OutputSink>();
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("mailflowd", sink));
  }
  Destination destination = Destination::standard_error;
  if (log.output == config::LogOutput::syslog) {
    destination = Destination::syslog;
  } else if (stderr_is_journal()) {
    destination = Destination::journal;
  }
  sink->set_destination(destination);
  json_format = log.format == config::LogFormat::json;
  // The journal and syslog stamp each line themselves; a timestamp of our own would only be noise there.
  const bool own_time = destination == Destination::standard_error;
  if (json_format) {
    spdlog::set_pattern(own_time ? R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l",%v})" : R"({"level":"%l",%v})",
                        spdlog::pattern_time_type::utc);
  } else {
    spdlog::set_pattern(own_time ? "%Y-%m-%dT%H:%M:%S.%eZ %l %v" : "%l %v", spdlog::pattern_time_type::utc);
  }
  spdlog::set_level(spdlog::level::from_str(log.level));
  spdlog::flush_on(spdlog::level::info);
}

void log_event(LogLevel level, std::string_view event, std::initializer_list<LogField> fields) {
  auto lvl = to_spdlog(level);
  if (!spdlog::should_log(lvl)) return;
  spdlog::log(lvl, "{}", render(event, fields, 0));
}

void log_limited(LogLevel level, std::string_view event, std::initializer_list<LogField> fields) {
  auto lvl = to_spdlog(level);
  if (!spdlog::should_log(lvl)) return;
  std::uint64_t suppressed = 0;
  {
    auto now =
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count();
    std::lock_guard lock(limit_mutex);
    // Per event and reason: a flood of one refusal must not silence the others.
    std::string key(event);
    for (const LogField& field : fields) {
      if (field.key() == "reason") {
        key += '/';
        key += field.value();
      }
    }
    auto& limit = limits[key];
    if (limit.second != now) {
      limit.second = now;
      limit.lines = 0;
    }
    if (++limit.lines > burst) {
      ++limit.suppressed;
      return;
    }
    suppressed = std::exchange(limit.suppressed, 0);
  }
  spdlog::log(lvl, "{}", render(event, fields, suppressed));
}

std::string exception_text(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
  }
  return "unknown";
}

}  // namespace mailflow
