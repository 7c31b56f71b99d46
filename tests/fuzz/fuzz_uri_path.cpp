// HTTP request paths and query parameters percent-decoded (proto/uri_path.hpp). A normalized path decodes
// only unreserved characters: it holds exactly as many '/', '?', '#' and NUL bytes as the path as sent
// (no escape becomes a separator or a NUL), is never longer, means the same decoded, and normalizing it again
// changes nothing. A path is refused exactly when its escapes are bad or one is %00. percent_decode decodes
// what every byte encoded as %XX gives back, byte for byte, and refuses what normalized_path refuses for a
// bad escape. Without its dot segments (RFC 3986 5.2.4) a path is never longer, has no "." or ".." segment
// left, keeps its leading '/', holds no '?', '#', '%' or NUL the path did not, is left alone when it had no
// dot segment, and removing them again changes nothing.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/uri_path.hpp"

namespace {

std::size_t count(std::string_view text, char c) {
  return static_cast<std::size_t>(std::count(text.begin(), text.end(), c));
}

bool has_dot_segment(std::string_view path) {
  for (std::size_t start = 0; start <= path.size();) {
    const auto end = std::min(path.find('/', start), path.size());
    const auto segment = path.substr(start, end - start);
    if (segment == "." || segment == "..") return true;
    start = end + 1;
  }
  return false;
}

void check_dot_segments(std::string_view path) {
  const std::string out = mailflow::proto::without_dot_segments(path);
  FUZZ_CHECK(out.size() <= path.size());
  FUZZ_CHECK(!has_dot_segment(out));
  if (path.starts_with('/')) FUZZ_CHECK(out.starts_with('/'));
  for (const char c : {'?', '#', '%', '\0'}) FUZZ_CHECK(count(out, c) <= count(path, c));
  if (!has_dot_segment(path)) FUZZ_CHECK(out == path);
  FUZZ_CHECK(mailflow::proto::without_dot_segments(out) == out);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view path(reinterpret_cast<const char*>(data), size);
  std::string decoded;
  const bool decodes = mailflow::proto::percent_decode(path, decoded);
  const auto normalized = mailflow::proto::normalized_path(path);
  const bool has_nul_escape = decodes && count(decoded, '\0') > count(path, '\0');
  FUZZ_CHECK(normalized.has_value() == (decodes && !has_nul_escape));
  if (normalized) {
    FUZZ_CHECK(normalized->size() <= path.size());
    for (const char c : {'/', '?', '#', '\0'}) FUZZ_CHECK(count(*normalized, c) == count(path, c));
    std::string again;
    FUZZ_CHECK(mailflow::proto::percent_decode(*normalized, again));
    FUZZ_CHECK(again == decoded);
    FUZZ_CHECK(mailflow::proto::normalized_path(*normalized) == normalized);
    check_dot_segments(*normalized);
  }
  check_dot_segments(path);
  // Every byte escaped: decoded back to the input, and normalized to a path that percent-decodes to it too.
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string encoded;
  for (const char c : path) {
    const auto byte = static_cast<unsigned char>(c);
    encoded += '%';
    encoded += kHex[byte >> 4];
    encoded += kHex[byte & 15];
  }
  std::string round_trip = "keep:";
  FUZZ_CHECK(mailflow::proto::percent_decode(encoded, round_trip));
  FUZZ_CHECK(round_trip == "keep:" + std::string(path));
  return 0;
}
