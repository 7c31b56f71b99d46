#pragma once
// SMTP replies (RFC 5321 §4.2): parsing what an upstream says, writing what we say.
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto {

struct Reply {
  int code = 0;
  std::vector<std::string> lines;  // text of each line, after "NNN-" / "NNN " (may be empty)

  bool positive() const { return code >= 200 && code < 300; }
  bool transient() const { return code >= 400 && code < 500; }
  bool permanent() const { return code >= 500 && code < 600; }
};

// Writes one reply in wire form: "250-first\r\n250 last\r\n". Empty `lines` writes "CODE \r\n". At most
// 10 lines (the first 9 and the last) of at most 512 octets (RFC 5321 4.5.3.1.5), so that what an upstream
// says is relayed in a bounded size; control bytes in the text are written as spaces.
std::string format_reply(const Reply& reply);
// The same from lines that are there already, without a Reply to build (a session's EHLO reply: issue #16).
std::string format_reply(int code, std::span<const std::string_view> lines);
// Single-line convenience: format_reply(250, "2.0.0", "Ok") == "250 2.0.0 Ok\r\n"; empty enhanced code omitted.
std::string format_reply(int code, std::string_view enhanced, std::string_view text);

enum class ReplyStatus { incomplete, complete, invalid };

struct ReplyParseResult {
  ReplyStatus status = ReplyStatus::incomplete;
  std::size_t consumed = 0;  // bytes of input that made up the reply (complete only)
  Reply reply;               // complete only
  std::string error;         // invalid only
};

// Parses the first complete reply at the start of `input` (the caller keeps unread bytes and calls again).
// Lines end in CRLF (a bare LF is tolerated from upstreams). Limits: 2048 octets per line, 100 lines.
// Invalid: a line that does not start with three digits and ' ', '-' or CRLF, a code whose first digit is not
// 2..5 (RFC 5321 4.2.1), codes that change between lines of one reply, or a limit exceeded.
ReplyParseResult parse_reply(std::string_view input);

}  // namespace mailflow::proto
