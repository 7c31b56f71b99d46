// json_escape: for every input, '"' + output + '"' is one valid JSON string (RFC 8259 §7, checked by the
// small validator below, which also decodes it), and valid UTF-8 input decodes back to exactly the input; any
// other input decodes to the input with each byte that is not part of a well-formed UTF-8 sequence as U+FFFD.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/json.hpp"

namespace {

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

// Decodes one UTF-8 scalar at `text[i]` strictly (no overlongs, surrogates or values over U+10FFFF); the
// sequence's length, 0 when there is none. Written independently of proto/json.cpp's check.
std::size_t utf8_scalar(std::string_view text, std::size_t i, std::uint32_t& cp) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(text[i + k]); };
  const unsigned char lead = b(0);
  std::size_t length = 0;
  std::uint32_t min = 0;
  if (lead < 0x80) {
    cp = lead;
    return 1;
  }
  if ((lead & 0xe0) == 0xc0) {
    length = 2, cp = lead & 0x1f, min = 0x80;
  } else if ((lead & 0xf0) == 0xe0) {
    length = 3, cp = lead & 0x0f, min = 0x800;
  } else if ((lead & 0xf8) == 0xf0) {
    length = 4, cp = lead & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (text.size() - i < length) return 0;
  for (std::size_t k = 1; k < length; ++k) {
    if ((b(k) & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b(k) & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return length;
}

int hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The content of a JSON string literal `body` (without its quotes) decoded, or nullopt when it is not valid
// RFC 8259 string content (control characters, a bare '"', bad escapes, lone surrogates, invalid UTF-8).
std::optional<std::string> decode_json_string(std::string_view body) {
  std::string out;
  for (std::size_t i = 0; i < body.size();) {
    const auto c = static_cast<unsigned char>(body[i]);
    if (c < 0x20 || c == '"') return std::nullopt;
    if (c != '\\') {
      std::uint32_t cp = 0;
      const std::size_t length = utf8_scalar(body, i, cp);
      if (length == 0) return std::nullopt;
      out.append(body.substr(i, length));
      i += length;
      continue;
    }
    if (++i == body.size()) return std::nullopt;
    const char e = body[i++];
    switch (e) {
      case '"':
        out += '"';
        break;
      case '\\':
        out += '\\';
        break;
      case '/':
        out += '/';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'u': {
        const auto read4 = [&](std::uint32_t& v) {
          if (body.size() - i < 4) return false;
          v = 0;
          for (int k = 0; k < 4; ++k) {
            const int h = hex(body[i + k]);
            if (h < 0) return false;
            v = v * 16 + static_cast<std::uint32_t>(h);
          }
          i += 4;
          return true;
        };
        std::uint32_t cp = 0;
        if (!read4(cp)) return std::nullopt;
        if (cp >= 0xdc00 && cp <= 0xdfff) return std::nullopt;  // a lone low surrogate
        if (cp >= 0xd800 && cp <= 0xdbff) {
          std::uint32_t low = 0;
          if (body.substr(i, 2) != "\\u") return std::nullopt;
          i += 2;
          if (!read4(low) || low < 0xdc00 || low > 0xdfff) return std::nullopt;
          cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
        }
        append_utf8(out, cp);
        break;
      }
      default:
        return std::nullopt;
    }
  }
  return out;
}

// The input as a JSON string should carry it: well-formed UTF-8 sequences kept, every other byte U+FFFD.
std::string expected_text(std::string_view input) {
  std::string out;
  for (std::size_t i = 0; i < input.size();) {
    std::uint32_t cp = 0;
    const std::size_t length = utf8_scalar(input, i, cp);
    if (length == 0) {
      append_utf8(out, 0xfffd);
      ++i;
    } else {
      out.append(input.substr(i, length));
      i += length;
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::string escaped = mailflow::proto::json_escape(input);
  const auto decoded = decode_json_string(escaped);
  FUZZ_CHECK(decoded.has_value());
  FUZZ_CHECK(*decoded == expected_text(input));
  // Nothing a JSON parser or a log shipper could take for a line break or a control byte is left raw.
  for (const char c : escaped) FUZZ_CHECK(static_cast<unsigned char>(c) >= 0x20 && c != 0x7f);
  return 0;
}
