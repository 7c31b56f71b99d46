#include "proto/data_filter.hpp"

#include <cstring>

namespace mailflow::proto {

// States of the line machine (stored in state_):
//   start   - at the beginning of a line, nothing of it written yet
//   dot     - line start, a '.' seen and held back (it may be the terminator)
//   dot_cr  - ".\r" held back at line start
//   mid     - inside a line, content already written
//   cr      - inside a line, a CR held back (CRLF or bare CR: decided by the next byte, maybe in the next
//   feed)
// prev_line_crlf_ says whether the line before the current one ended in a real CRLF (true at the very start):
// only then can a "." line followed by CRLF be the terminator.
namespace {
enum State : int { start = 0, dot = 1, dot_cr = 2, mid = 3, cr = 4 };
}

std::size_t DataFilter::feed(std::string_view input, std::string& out) {
  if (done_) return 0;
  const char* const begin = input.data();
  const char* const end = begin + input.size();
  const char* p = begin;
  const char* next_lf = nullptr;  // cached position of the next LF at or after p (nullptr: unknown)
  bool no_more_lf = false;
  out.reserve(out.size() + input.size() + input.size() / 16 + 8);

  auto content = [this](std::size_t n) {
    // Unstuffed content octets of the current line (the leading stuffing dot is never counted).
    // Counted as it streams, so that a single endless line is too big (and too long) as soon as it is.
    line_length_ += n;
    message_bytes_ += n;
    if (line_length_ + 2 > limits_.max_line) line_too_long_ = true;
    if (message_bytes_ > limits_.max_message_size) too_big_ = true;
  };
  // A line ended: its CRLF (written by the caller) counted, the next line begins.
  auto line_ended = [this](bool real_crlf) {
    message_bytes_ += 2;
    if (message_bytes_ > limits_.max_message_size) too_big_ = true;
    line_length_ = 0;
    prev_line_crlf_ = real_crlf;
    if (!real_crlf) bare_newline_seen_ = true;
  };
  auto end_line = [&out, &line_ended, this](bool real_crlf) {
    out.append("\r\n", 2);
    line_ended(real_crlf);
    state_ = start;
  };
  // Updates next_lf for the current p (one memchr per LF, not per call).
  auto find_lf = [&p, &next_lf, &no_more_lf, end]() {
    if (!no_more_lf && (next_lf == nullptr || next_lf < p)) {
      next_lf = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(end - p)));
      if (next_lf == nullptr) no_more_lf = true;
    }
  };
  auto bare_cr = [this, &out, &content]() {
    out.push_back(' ');
    content(1);
    bare_newline_seen_ = true;
  };

  while (p < end) {
    switch (state_) {
      case start:
        if (*p == '.') {
          state_ = dot;
          ++p;
          continue;
        }
        state_ = mid;
        continue;  // the same byte, handled as inside a line
      case dot: {
        const char c = *p;
        if (c == '\r') {
          state_ = dot_cr;
          ++p;
          continue;
        }
        if (c == '\n') {
          // ".<LF>" is never a terminator: the line "." goes out stuffed so it cannot become one upstream.
          out.append("..", 2);
          content(1);
          ++p;
          end_line(false);
          continue;
        }
        out.push_back('.');  // the client's stuffing dot (or an unstuffed '.' line): passed through unchanged
        state_ = mid;
        continue;
      }
      case dot_cr: {
        const char c = *p;
        if (c == '\n') {
          ++p;
          if (prev_line_crlf_) {
            out.append(".\r\n", 3);
            done_ = true;
            state_ = start;
            return static_cast<std::size_t>(p - begin);
          }
          out.append("..", 2);
          content(1);
          end_line(true);
          continue;
        }
        out.push_back('.');  // ". " - the CR was bare
        bare_cr();
        state_ = mid;
        continue;
      }
      case cr: {
        const char c = *p;
        if (c == '\n') {
          ++p;
          end_line(true);
          continue;
        }
        bare_cr();
        if (c == '\r') {
          ++p;  // a new CR held back
          continue;
        }
        state_ = mid;
        continue;
      }
      case mid:
      default: {
        // Fast path, most of any message: whole lines that end in CRLF and hold no other CR go out unchanged.
        // They are only counted here, and copied in one append when the run of them ends.
        const char* const run = p;
        for (;;) {
          find_lf();
          if (no_more_lf || next_lf == p || next_lf[-1] != '\r') break;
          const char* const line_cr = next_lf - 1;
          if (std::memchr(p, '\r', static_cast<std::size_t>(line_cr - p)) != nullptr) break;
          content(static_cast<std::size_t>(line_cr - p));
          line_ended(true);
          p = next_lf + 1;
          if (p == end || *p == '.') {  // a line starting with '.' goes through the state machine
            state_ = start;
            break;
          }
        }
        if (p != run) out.append(run, static_cast<std::size_t>(p - run));
        if (state_ == start) continue;
        // Slow path: copy everything up to the next CR or LF in one append.
        find_lf();
        const char* stop = no_more_lf ? end : next_lf;
        const void* cr_ptr = std::memchr(p, '\r', static_cast<std::size_t>(stop - p));
        if (cr_ptr != nullptr) stop = static_cast<const char*>(cr_ptr);
        const auto n = static_cast<std::size_t>(stop - p);
        if (n > 0) {
          out.append(p, n);
          content(n);
          p = stop;
        }
        if (p == end) break;
        if (*p == '\r') {
          state_ = cr;
          ++p;
        } else {  // bare LF
          ++p;
          end_line(false);
        }
        continue;
      }
    }
  }
  return input.size();
}

}  // namespace mailflow::proto
