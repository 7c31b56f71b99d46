#pragma once
// Feeding helpers: every streaming parser must give the same result however its input is cut into pieces
// (Beast's habit: split at every byte boundary, and byte by byte).
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::test {

// All ways of cutting `input` that the tests try: whole, every single split point, byte by byte.
inline std::vector<std::vector<std::string>> splits_of(std::string_view input) {
  std::vector<std::vector<std::string>> out;
  out.push_back({std::string(input)});
  for (std::size_t i = 1; i < input.size(); ++i) {
    out.push_back({std::string(input.substr(0, i)), std::string(input.substr(i))});
  }
  std::vector<std::string> bytes;
  for (char c : input) bytes.emplace_back(1, c);
  out.push_back(bytes);
  return out;
}

// Also every pair of split points for short inputs (three pieces): catches state carried over two calls.
inline std::vector<std::vector<std::string>> double_splits_of(std::string_view input) {
  std::vector<std::vector<std::string>> out;
  for (std::size_t i = 1; i < input.size(); ++i) {
    for (std::size_t j = i + 1; j < input.size(); ++j) {
      out.push_back({std::string(input.substr(0, i)), std::string(input.substr(i, j - i)),
                     std::string(input.substr(j))});
    }
  }
  return out;
}

inline std::string printable(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '\r') {
      out += "\\r";
    } else if (c == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[static_cast<unsigned char>(c) >> 4];
      out += hex[static_cast<unsigned char>(c) & 15];
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace mailflow::test
