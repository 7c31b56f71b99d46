#include "proto/line_framer.hpp"

#include <cstring>

namespace mailflow::proto {

namespace {
std::size_t find_lf(std::string_view s, std::size_t from, std::size_t limit) {
  if (from >= limit) return std::string_view::npos;
  const void* p = std::memchr(s.data() + from, '\n', limit - from);
  return p ? static_cast<std::size_t>(static_cast<const char*>(p) - s.data()) : std::string_view::npos;
}
}  // namespace

CommandFramer::Event CommandFramer::next(std::string_view input) {
  Event ev;
  std::size_t start = 0;
  if (discarding_) {
    const std::size_t lf = find_lf(input, 0, input.size());
    if (lf == std::string_view::npos) {
      if (!input.empty()) discarded_cr_ = input.back() == '\r';
      ev.consumed = input.size();
      return ev;
    }
    discarding_ = false;
    if (!(lf > 0 ? input[lf - 1] == '\r' : discarded_cr_)) {
      // What follows the bare LF may still be the over-long line to the client: never a command of its own.
      ev.kind = Kind::too_long_bare_lf;
      ev.consumed = lf + 1;
      return ev;
    }
    // Go on with the next line in the same call: a caller that stops at need_more must not leave a complete
    // pipelined command unanswered until more bytes arrive.
    start = lf + 1;
  }
  const std::string_view rest = input.substr(start);
  const std::size_t window = rest.size() < max_line_ ? rest.size() : max_line_;
  const std::size_t lf = find_lf(rest, 0, window);
  if (lf == std::string_view::npos) {
    if (rest.size() < max_line_) {
      ev.consumed = start;  // need more (after the discarded tail, if any)
      return ev;
    }
    // Even if the LF came next, the line would be over the limit: report now, discard the rest up to its LF
    // (the LF itself is left to the next call, which tells a CRLF from a bare LF however the input was split).
    ev.kind = Kind::too_long;
    discarding_ = true;
    const std::size_t tail_lf = find_lf(rest, window, rest.size());
    const std::size_t discarded = tail_lf == std::string_view::npos ? rest.size() : tail_lf;
    discarded_cr_ = rest[discarded - 1] == '\r';
    ev.consumed = start + discarded;
    return ev;
  }
  ev.consumed = start + lf + 1;
  if (lf == 0 || rest[lf - 1] != '\r') {
    ev.kind = Kind::bare_lf;
    return ev;
  }
  const std::string_view line = rest.substr(0, lf - 1);
  if (std::memchr(line.data(), '\r', line.size()) != nullptr) {
    ev.kind = Kind::bad_newline;
    return ev;
  }
  ev.kind = Kind::line;
  ev.line = line;
  return ev;
}

}  // namespace mailflow::proto
