#include "daemon/exposition.hpp"

#include <charconv>
#include <cmath>
#include <limits>

namespace mailflow::exposition {

void append_label(std::string& out, std::string_view name, std::string_view value) {
  out.append(name);
  out.append("=\"");
  for (const char c : value) {
    switch (c) {
      case '\\': out.append("\\\\"); break;
      case '"': out.append("\\\""); break;
      case '\n': out.append("\\n"); break;
      default: out.push_back(c);
    }
  }
  out.push_back('"');
}

std::string label(std::string_view name, std::string_view value) {
  std::string out;
  append_label(out, name, value);
  return out;
}

void append_header(std::string& out, std::string_view name, std::string_view help, std::string_view type) {
  out.append("# HELP ");
  out.append(name);
  out.push_back(' ');
  for (const char c : help) {
    switch (c) {
      case '\\': out.append("\\\\"); break;
      case '\n': out.append("\\n"); break;
      default: out.push_back(c);
    }
  }
  out.append("\n# TYPE ");
  out.append(name);
  out.push_back(' ');
  out.append(type);
  out.push_back('\n');
}

void append_value(std::string& out, std::uint64_t value) {
  char buffer[std::numeric_limits<std::uint64_t>::digits10 + 2];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, result.ptr);
}

void append_value(std::string& out, std::int64_t value) {
  char buffer[std::numeric_limits<std::int64_t>::digits10 + 3];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, result.ptr);
}

void append_value(std::string& out, double value) {
  if (std::isnan(value)) {
    out.append("NaN");
    return;
  }
  if (std::isinf(value)) {
    out.append(value < 0 ? "-Inf" : "+Inf");
    return;
  }
  // Whole numbers (counts, fds, bytes, thresholds like min_messages) as integers: "100", not "1e+02".
  constexpr double kExactInteger = 9007199254740992.0;  // 2^53
  if (value == std::trunc(value) && std::fabs(value) < kExactInteger) {
    append_value(out, static_cast<std::int64_t>(value));
    return;
  }
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, result.ptr);
}

}  // namespace mailflow::exposition
