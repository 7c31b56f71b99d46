#include "daemon/failpoint.hpp"

#ifdef MAILFLOW_FAILPOINTS
#include <atomic>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>

namespace mailflow {

namespace {

struct Point {
  std::uint64_t fire_at = 0;  // 0: never throws
  std::chrono::milliseconds delay{0};
  std::atomic<std::uint64_t> hits{0};
};

// Parsed once from the environment; the map itself is never modified afterwards, so lookups need no lock.
std::map<std::string, Point, std::less<>>& points() {
  static std::map<std::string, Point, std::less<>> parsed = [] {
    std::map<std::string, Point, std::less<>> out;
    const char* env = std::getenv("MAILFLOWD_FAILPOINTS");
    std::string_view rest = env ? env : "";
    while (!rest.empty()) {
      const std::size_t comma = rest.find(',');
      const std::string_view item = rest.substr(0, comma);
      rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
      const std::size_t equals = item.find('=');
      if (equals == std::string_view::npos) continue;
      const std::string value(item.substr(equals + 1));
      Point& point = out[std::string(item.substr(0, equals))];
      const auto number = std::strtoull(value.c_str(), nullptr, 10);
      if (value.ends_with("ms"))
        point.delay = std::chrono::milliseconds(number);
      else
        point.fire_at = number;
    }
    return out;
  }();
  return parsed;
}

}  // namespace

void failpoint(std::string_view name) {
  auto& all = points();
  auto it = all.find(name);
  if (it == all.end()) return;
  if (it->second.fire_at == 0) return;
  if (it->second.hits.fetch_add(1) + 1 == it->second.fire_at)
    throw std::runtime_error("failpoint " + std::string(name));
}

std::chrono::milliseconds failpoint_delay(std::string_view name) {
  const auto& all = points();
  const auto it = all.find(name);
  return it == all.end() ? std::chrono::milliseconds(0) : it->second.delay;
}

}  // namespace mailflow
#endif
