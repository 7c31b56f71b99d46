// See state_text.hpp.
#include "daemon/state_text.hpp"

#include <algorithm>
#include <chrono>

namespace mailflow::state_text {

std::string encode(std::string_view text) {
  std::string out;
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f || c == '%' || c == ',') {
      static constexpr char hex[] = "0123456789ABCDEF";
      out += '%';
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  return out.empty() ? "-" : out;  // "-": the empty string (a field is never empty)
}

std::optional<std::string> decode(std::string_view text) {
  if (text == "-") return std::string();
  if (text.empty()) return std::nullopt;  // encode() writes "-" for the empty string: two spaces are no field
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto u = static_cast<unsigned char>(text[i]);
    if (u <= 0x20 || u >= 0x7f || text[i] == ',') return std::nullopt;  // encode() never leaves these
    if (text[i] != '%') {
      out += text[i];
      continue;
    }
    if (i + 2 >= text.size()) return std::nullopt;
    const auto digit = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    const int hi = digit(text[i + 1]);
    const int lo = digit(text[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

std::string encode_list(const std::vector<std::string>& items) {
  if (items.empty()) return "-";
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + encode(items[i]);
  return out;
}

std::optional<std::vector<std::string>> decode_list(std::string_view text) {
  std::vector<std::string> out;
  if (text == "-") return out;
  std::size_t start = 0;
  while (true) {
    const auto comma = text.find(',', start);
    auto item =
        decode(text.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
    if (!item) return std::nullopt;
    out.push_back(std::move(*item));
    if (comma == std::string_view::npos) return out;
    start = comma + 1;
  }
}

std::vector<std::string_view> split_spaces(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  while (start <= line.size()) {
    const auto space = line.find(' ', start);
    out.push_back(
        line.substr(start, space == std::string_view::npos ? std::string_view::npos : space - start));
    if (space == std::string_view::npos) break;
    start = space + 1;
  }
  return out;
}

std::optional<std::uint64_t> number(std::string_view text) {
  if (text.empty() || text.size() > 19 ||
      !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  return std::stoull(std::string(text));
}

bool valid_date(std::string_view date) {
  const auto digits = [&](std::size_t at, std::size_t count) {
    unsigned value = 0;
    for (std::size_t i = at; i < at + count; ++i) {
      if (date[i] < '0' || date[i] > '9') return -1;
      value = value * 10 + static_cast<unsigned>(date[i] - '0');
    }
    return static_cast<int>(value);
  };
  if (date.size() != 10 || date[4] != '-' || date[7] != '-') return false;
  const int year = digits(0, 4), month = digits(5, 2), day = digits(8, 2);
  if (year < 0 || month < 0 || day < 0) return false;
  return std::chrono::year_month_day(std::chrono::year(year),
                                     std::chrono::month(static_cast<unsigned>(month)),
                                     std::chrono::day(static_cast<unsigned>(day)))
      .ok();
}

std::optional<std::string_view> before_end_line(std::string_view text) {
  const std::string_view body = text.substr(0, text.size() - std::min(text.size(), end_line.size()));
  if (!text.ends_with(end_line) || (!body.empty() && !body.ends_with('\n'))) return std::nullopt;
  return body;
}

}  // namespace mailflow::state_text
