#include "proto/reply.hpp"

#include <algorithm>
#include <cstring>

namespace mailflow::proto {

namespace {

constexpr std::size_t max_reply_line = 2048;  // octets including the line ending
constexpr std::size_t max_reply_lines = 100;
// What a written reply keeps: RFC 5321 4.5.3.1.5's 512 octets per line (code and CRLF included), and 10
// lines. An upstream's reply is relayed through here: at the read limits above, 100 pipelined RCPTs answered
// by a hostile MX piled up 20 MB in one session's output.
constexpr std::size_t max_written_text = 512 - 6;
constexpr std::size_t max_written_lines = 10;

void append_code(std::string& out, int code) {
  // Codes outside 000..999 cannot be written as three digits; clamp rather than emit garbage.
  if (code < 0 || code > 999) code = 451;
  out.push_back(static_cast<char>('0' + code / 100));
  out.push_back(static_cast<char>('0' + code / 10 % 10));
  out.push_back(static_cast<char>('0' + code % 10));
}

// Reply text is relayed from upstreams: a CR or LF inside it must never reach the wire as a line break, nor
// another control byte (a NUL, a terminal escape) reach the client at all (RFC 5321 4.2: HT and printable
// US-ASCII). 8-bit bytes stay: upstreams say UTF-8 text, and clients take it.
void append_text(std::string& out, std::string_view text) {
  const std::size_t start = out.size();
  out.append(text);
  for (std::size_t i = start; i < out.size(); ++i) {
    const auto c = static_cast<unsigned char>(out[i]);
    if ((c < 0x20 && c != '\t') || c == 0x7f) out[i] = ' ';
  }
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

namespace {

template <typename Line>
std::string format_lines(int code, std::span<const Line> lines) {
  const std::size_t total = lines.empty() ? 1 : lines.size();
  const std::size_t n = std::min(total, max_written_lines);
  // The first lines and the last one (where a reply usually ends with what to do about it).
  const auto text_of = [&](std::size_t i) -> std::string_view {
    std::string_view text = lines[i + 1 == n ? total - 1 : i];
    if (text.size() > max_written_text) {
      text = text.substr(0, max_written_text);
      // Not in the middle of a UTF-8 sequence: back to the start of the cut one.
      while (!text.empty() && (static_cast<unsigned char>(text.back()) & 0xc0) == 0x80) text.remove_suffix(1);
      if (!text.empty() && static_cast<unsigned char>(text.back()) >= 0xc0) text.remove_suffix(1);
    }
    return text;
  };
  std::size_t size = n * 6;  // "250-" and CRLF
  if (!lines.empty())
    for (std::size_t i = 0; i < n; ++i) size += text_of(i).size();
  std::string out;
  out.reserve(size);  // one allocation, not one per doubling
  for (std::size_t i = 0; i < n; ++i) {
    append_code(out, code);
    out.push_back(i + 1 == n ? ' ' : '-');
    if (!lines.empty()) append_text(out, text_of(i));
    out.append("\r\n");
  }
  return out;
}

}  // namespace

std::string format_reply(const Reply& reply) {
  return format_lines(reply.code, std::span<const std::string>(reply.lines));
}

std::string format_reply(int code, std::span<const std::string_view> lines) {
  return format_lines(code, lines);
}

std::string format_reply(int code, std::string_view enhanced, std::string_view text) {
  std::string out;
  out.reserve(6 + enhanced.size() + text.size());
  append_code(out, code);
  out.push_back(' ');
  if (!enhanced.empty()) {
    append_text(out, enhanced);
    out.push_back(' ');
  }
  append_text(out, text);
  out.append("\r\n");
  return out;
}

ReplyParseResult parse_reply(std::string_view input) {
  ReplyParseResult result;
  auto invalid = [&result](std::string error) {
    result = ReplyParseResult{};
    result.status = ReplyStatus::invalid;
    result.error = std::move(error);
    return result;
  };

  std::size_t pos = 0;
  int code = -1;
  std::vector<std::string> lines;
  while (true) {
    const std::string_view rest = input.substr(pos);
    // Reject what can never become a reply line as soon as the bytes are there (an upstream that talks
    // garbage without a newline must not keep us waiting for the limit).
    const std::size_t check = rest.size() < 4 ? rest.size() : 4;
    for (std::size_t i = 0; i < check; ++i) {
      const char c = rest[i];
      if (i == 0) {
        // RFC 5321 4.2.1: SMTP has no other first digits, and a client SHOULD treat one as a fatal error.
        if (c < '2' || c > '5') return invalid("reply code outside 2xx-5xx");
      } else if (i < 3) {
        if (!is_digit(c)) return invalid("reply line does not start with a three-digit code");
      } else if (c != ' ' && c != '-' && c != '\r' && c != '\n') {
        return invalid("bad separator after reply code");
      }
    }
    const std::size_t window = rest.size() < max_reply_line ? rest.size() : max_reply_line;
    const void* lf_ptr = window ? std::memchr(rest.data(), '\n', window) : nullptr;
    if (lf_ptr == nullptr) {
      if (rest.size() >= max_reply_line) return invalid("reply line too long");
      return result;  // incomplete
    }
    const std::size_t lf = static_cast<std::size_t>(static_cast<const char*>(lf_ptr) - rest.data());
    std::size_t end = lf;  // end of the text (exclusive)
    if (end > 0 && rest[end - 1] == '\r') --end;
    if (end < 3) return invalid("reply line too short");
    const int line_code = (rest[0] - '0') * 100 + (rest[1] - '0') * 10 + (rest[2] - '0');
    if (code >= 0 && line_code != code) return invalid("reply code changed between lines");
    code = line_code;
    bool last = true;
    std::string text;
    if (end > 3) {
      const char sep = rest[3];
      if (sep != ' ' && sep != '-') return invalid("bad separator after reply code");
      last = sep == ' ';
      text.assign(rest.substr(4, end - 4));
    }
    lines.push_back(std::move(text));
    pos += lf + 1;
    if (last) {
      result.status = ReplyStatus::complete;
      result.consumed = pos;
      result.reply.code = code;
      result.reply.lines = std::move(lines);
      return result;
    }
    if (lines.size() >= max_reply_lines) return invalid("reply has too many lines");
  }
}

}  // namespace mailflow::proto
