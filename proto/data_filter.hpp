#pragma once
// The DATA phase (RFC 5321 §4.1.1.4, §4.5.2): turns what a client sends after "354" into what the upstream
// gets, streaming, never buffering a whole message. Only <CRLF>.<CRLF> ends a message (SMTP smuggling,
// CVE-2023-51764): bare LF / bare CR never end a line that could be a terminator.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mailflow::proto {

enum class BareNewlinePolicy {
  normalize,  // bare LF -> CRLF, bare CR -> ' ', output lines dot-stuffed again (Postfix 3.9+ "normalize")
  reject,     // the message is refused (550 5.5.2) after its end
};

class DataFilter {
 public:
  struct Limits {
    std::uint64_t max_message_size = 36700160;  // content octets (unstuffed, CRLF counted)
    std::size_t max_line = 1000;                // octets per text line including CRLF
    BareNewlinePolicy bare_newline = BareNewlinePolicy::normalize;
  };

  explicit DataFilter(Limits limits) : limits_(limits) {}

  // Consumes client bytes and appends wire-ready bytes for the upstream to `out`: CRLF line endings only,
  // ordinary dot-stuffing preserved exactly (a line starting with '.' passes through unchanged), a line that is
  // exactly "." but is not the terminator (it follows a bare LF, or ends in one) goes out as ".." so it can
  // never end the message upstream, and the final ".\r\n" when the terminator is seen. bare_newline_seen() is
  // set under both policies (normalize also normalizes under `reject`; the caller refuses the message). Stops right after the terminator: returns the
  // number of bytes of `input` consumed (the rest belongs to the next command).
  std::size_t feed(std::string_view input, std::string& out);

  bool done() const { return done_; }
  bool too_big() const { return too_big_; }
  bool line_too_long() const { return line_too_long_; }
  bool bare_newline_seen() const { return bare_newline_seen_; }
  std::uint64_t message_bytes() const { return message_bytes_; }  // content octets so far

 private:
  Limits limits_;
  // Implementation state (the implementer may change these freely).
  int state_ = 0;
  std::size_t line_length_ = 0;
  std::uint64_t message_bytes_ = 0;
  bool done_ = false;
  bool too_big_ = false;
  bool line_too_long_ = false;
  bool bare_newline_seen_ = false;
  bool prev_line_crlf_ = true;  // the line before the current one ended in CRLF (true before the first)
};

}  // namespace mailflow::proto
