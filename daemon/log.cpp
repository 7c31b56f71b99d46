#include "daemon/log.hpp"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
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
    for (const auto& [key, value] : fields) {
      line += ",\"";
      line += key;
      line += "\":\"";
      line += json_escape(value);
      line += '"';
    }
    if (suppressed) line += ",\"suppressed\":\"" + std::to_string(suppressed) + '"';
  } else {
    line += event;
    for (const auto& [key, value] : fields) {
      line += ' ';
      line += key;
      line += '=';
      if (needs_quotes(value)) {
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

struct RateLimit {
  std::int64_t second = 0;
  unsigned lines = 0;
  std::uint64_t suppressed = 0;
};
std::mutex limit_mutex;
std::unordered_map<std::string, RateLimit> limits;
constexpr unsigned burst = 10;

}  // namespace

void setup_logging(const config::Log& log) {
  static bool initialized = false;
  if (!initialized) {
    auto logger =
        std::make_shared<spdlog::logger>("mailflowd", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    spdlog::set_default_logger(logger);
    initialized = true;
  }
  json_format = log.format == config::LogFormat::json;
  if (json_format) {
    spdlog::set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l",%v})",
                        spdlog::pattern_time_type::utc);
  } else {
    spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %l %v", spdlog::pattern_time_type::utc);
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
    auto& limit = limits[std::string(event)];
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

}  // namespace mailflow
