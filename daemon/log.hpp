#pragma once
// Structured log events on top of spdlog: "event key=value ..." in text format, one JSON object per line in
// json format. Everything the daemon logs goes through log_event so both formats stay well-formed.
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "config/config.hpp"

namespace mailflow {

enum class LogLevel { debug, info, warn, error };

using LogField = std::pair<std::string_view, std::string_view>;

// Applies level and format; may be called again on reload.
void setup_logging(const config::Log& log);

void log_event(LogLevel level, std::string_view event, std::initializer_list<LogField> fields);

// For refusals and other things a hostile peer can trigger at will: at most `burst` lines per second per
// event; the number of suppressed lines is reported in the next line that gets through.
void log_limited(LogLevel level, std::string_view event, std::initializer_list<LogField> fields);

}  // namespace mailflow
