#pragma once
// Structured log events on top of spdlog: "event key=value ..." in text format, one JSON object per line in
// json format. Everything the daemon logs goes through log_event so both formats stay well-formed.
// Output (log.output): standard error, with sd-daemon "<N>" priority prefixes and no timestamp when standard
// error is the systemd journal (JOURNAL_STREAM), or syslog(3).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "config/config.hpp"

namespace mailflow {

enum class LogLevel { debug, info, warn, error };

// One key=value of an event. Text values are written as strings; integers as numbers (unquoted in JSON, so
// that `"messages":1` can be summed by a log shipper), so pass counts as integers, not std::to_string.
class LogField {
 public:
  LogField(std::string_view key, std::string_view text) : key_(key), text_(text) {}
  LogField(std::string_view key, const std::string& text) : key_(key), text_(text) {}
  LogField(std::string_view key, const char* text) : key_(key), text_(text) {}
  template <std::integral Int>
    requires(!std::same_as<Int, bool> && !std::same_as<Int, char>)
  LogField(std::string_view key, Int value) : key_(key), numeric_(true) {
    // Rendered here: the field lives only as long as the log_event call, and this costs no allocation.
    char* end = digits_ + sizeof digits_;
    char* p = end;
    bool negative = false;
    std::uint64_t magnitude = 0;
    if constexpr (std::is_signed_v<Int>) {
      negative = value < 0;
      // -(v + 1) + 1: no overflow for the smallest value.
      magnitude = negative ? static_cast<std::uint64_t>(-(static_cast<std::int64_t>(value) + 1)) + 1
                           : static_cast<std::uint64_t>(value);
    } else {
      magnitude = value;
    }
    do {
      *--p = static_cast<char>('0' + magnitude % 10);
      magnitude /= 10;
    } while (magnitude != 0);
    if (negative) *--p = '-';
    length_ = static_cast<std::uint8_t>(end - p);
    std::copy(p, end, digits_);
  }
  // A measured quantity (a session's duration in seconds): a number with three decimals, "0.115", unquoted in
  // JSON as the integers are. A value that is no finite number, or too large for the field, is the text
  // "out_of_range".
  template <std::floating_point Float>
  LogField(std::string_view key, Float value) : key_(key) {
    // to_chars: a decimal point whatever the locale says.
    const auto [end, error] = std::to_chars(digits_, digits_ + sizeof digits_, static_cast<double>(value),
                                            std::chars_format::fixed, 3);
    numeric_ = std::isfinite(value) && error == std::errc();
    if (numeric_) {
      length_ = static_cast<std::uint8_t>(end - digits_);
    } else {
      text_ = "out_of_range";
    }
  }
  LogField(const LogField& other) : key_(other.key_), text_(other.text_), numeric_(other.numeric_), length_(other.length_) {
    std::copy(other.digits_, other.digits_ + length_, digits_);
  }
  LogField& operator=(const LogField&) = delete;

  std::string_view key() const { return key_; }
  bool numeric() const { return numeric_; }
  // The text, or the number's decimal digits.
  std::string_view value() const { return numeric_ ? std::string_view(digits_, length_) : text_; }

 private:
  std::string_view key_;
  std::string_view text_;
  bool numeric_ = false;
  std::uint8_t length_ = 0;
  char digits_[24] = {};
};

// Applies level, format and output; may be called again on reload.
void setup_logging(const config::Log& log);

void log_event(LogLevel level, std::string_view event, std::initializer_list<LogField> fields);

// For refusals and other things a hostile peer can trigger at will: at most `burst` lines per second per event
// and `reason` field (so a flood of one refusal does not hide another); the number of suppressed lines is
// reported in the next line of the same event and reason that gets through.
void log_limited(LogLevel level, std::string_view event, std::initializer_list<LogField> fields);

// What an exception that escaped a coroutine says (what(), or "unknown"), for its internal_error line.
std::string exception_text(const std::exception_ptr& error);

// True when standard error is the systemd journal: JOURNAL_STREAM ("DEV:INODE") names stderr's device and
// inode (systemd sets it for the service's stdout/stderr; a redirected stderr no longer matches).
bool stderr_is_journal();

}  // namespace mailflow
