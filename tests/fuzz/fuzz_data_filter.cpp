// DataFilter property fuzz: whatever the client sends, the upstream gets CRLF-only lines, no end-of-data
// before the real one, the same bytes however the input is cut, and the end exactly where the client's
// first CRLF.CRLF is.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/data_filter.hpp"

using namespace mailflow::proto;

namespace {
struct Run {
  std::string out;
  std::size_t consumed = 0;
  bool done = false, too_big = false, too_long = false, bare = false;
  std::uint64_t bytes = 0;
  bool operator==(const Run&) const = default;
};

Run run(std::string_view input, const DataFilter::Limits& limits, std::size_t piece) {
  DataFilter f(limits);
  Run r;
  std::size_t pos = 0;
  while (pos < input.size() && !f.done()) {
    const std::size_t n = piece == 0 ? input.size() : std::min(piece, input.size() - pos);
    const std::size_t used = f.feed(input.substr(pos, n), r.out);
    FUZZ_CHECK(used <= n);
    FUZZ_CHECK(used == n || f.done());
    r.consumed += used;
    pos += n;
  }
  r.done = f.done();
  r.too_big = f.too_big();
  r.too_long = f.line_too_long();
  r.bare = f.bare_newline_seen();
  r.bytes = f.message_bytes();
  return r;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 3) return 0;
  DataFilter::Limits limits;
  limits.max_line = 3 + data[0] % 80;
  limits.max_message_size = data[1] % 2 ? 64 + data[1] : 36700160;
  limits.bare_newline = data[2] % 2 ? BareNewlinePolicy::reject : BareNewlinePolicy::normalize;
  const std::size_t piece = 1 + data[2] / 2 % 32;
  const std::string_view input(reinterpret_cast<const char*>(data + 3), size - 3);

  const Run whole = run(input, limits, 0);
  const std::string& out = whole.out;
  // No bare CR or LF on the wire.
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (out[i] == '\r') FUZZ_CHECK(i + 1 < out.size() && out[i + 1] == '\n');
    if (out[i] == '\n') FUZZ_CHECK(i > 0 && out[i - 1] == '\r');
  }
  // No "\r\n.\r\n" except as the final terminator (and no leading ".\r\n" unless it is the whole message).
  const std::size_t term = out.find("\r\n.\r\n");
  if (whole.done) {
    FUZZ_CHECK(out == ".\r\n" || term == out.size() - 5);
  } else {
    FUZZ_CHECK(term == std::string::npos);
    FUZZ_CHECK(out.rfind(".\r\n", 0) != 0);
  }
  // The end is exactly the client's first CRLF.CRLF (or a "." first line).
  std::size_t expected_end = std::string_view::npos;
  if (input.rfind(".\r\n", 0) == 0) {
    expected_end = 3;
  } else if (const std::size_t at = input.find("\r\n.\r\n"); at != std::string_view::npos) {
    expected_end = at + 5;
  }
  FUZZ_CHECK(whole.done == (expected_end != std::string_view::npos));
  FUZZ_CHECK(whole.consumed == (whole.done ? expected_end : input.size()));
  // Bare newlines are noticed exactly when the consumed part had a CR not followed by LF or an LF without CR.
  const std::string_view used = input.substr(0, whole.consumed);
  bool bare = false;
  for (std::size_t i = 0; i < used.size(); ++i) {
    if (used[i] == '\n' && (i == 0 || used[i - 1] != '\r')) bare = true;
    if (used[i] == '\r' && i + 1 < used.size() && used[i + 1] != '\n') bare = true;
  }
  if (whole.done) FUZZ_CHECK(whole.bare == bare);
  FUZZ_CHECK(whole.too_big == (whole.bytes > limits.max_message_size));

  // Cut into pieces, byte by byte: identical.
  FUZZ_CHECK(run(input, limits, piece) == whole);
  if (input.size() <= 4096) FUZZ_CHECK(run(input, limits, 1) == whole);
  return 0;
}
