#pragma once
// Prometheus text exposition format 0.0.4, appended straight to a std::string. Telemetry keeps every
// series' label text rendered once (when the series is created), so writing a sample is a few appends and
// one integer conversion: no allocation per series, no intermediate metric objects.
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

namespace mailflow::exposition {

// `name="value"`, the value escaped as the format requires (backslash, double quote, line feed).
void append_label(std::string& out, std::string_view name, std::string_view value);
std::string label(std::string_view name, std::string_view value);

// "# HELP name help\n# TYPE name type\n"; the help text escaped (backslash, line feed).
void append_header(std::string& out, std::string_view name, std::string_view help, std::string_view type);

// Sample values: integers exactly; other doubles in the shortest text that reads back to the same double;
// NaN, +Inf, -Inf spelled as Prometheus does.
void append_value(std::string& out, std::uint64_t value);
void append_value(std::string& out, std::int64_t value);
void append_value(std::string& out, double value);

// `name{part,part,...} value\n`: each part is rendered label text (one or more `label="value"` joined by ','),
// empty parts are skipped, no braces when every part is empty.
template <class Value>
void append_sample(std::string& out, std::string_view name, std::initializer_list<std::string_view> parts,
                   Value value) {
  out.append(name);
  bool open = false;
  for (const std::string_view part : parts) {
    if (part.empty()) continue;
    out.push_back(open ? ',' : '{');
    open = true;
    out.append(part);
  }
  if (open) out.push_back('}');
  out.push_back(' ');
  append_value(out, value);
  out.push_back('\n');
}

}  // namespace mailflow::exposition
