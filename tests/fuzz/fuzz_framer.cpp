// CommandFramer: the events do not depend on how the stream is cut, lines never hold CR/LF, the limit holds,
// and an over-long line yields exactly one too_long event (and one more when a bare LF ends it).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "proto/line_framer.hpp"

using namespace mailflow::proto;

namespace {
std::vector<std::string> frame(std::string_view input, std::size_t max_line, std::size_t piece) {
  CommandFramer framer(max_line);
  std::vector<std::string> events;
  std::string buf;
  std::size_t pos = 0;
  while (pos < input.size()) {
    const std::size_t n = piece == 0 ? input.size() : std::min(piece, input.size() - pos);
    buf.append(input.substr(pos, n));
    pos += n;
    while (true) {
      const auto ev = framer.next(buf);
      FUZZ_CHECK(ev.consumed <= buf.size());
      if (ev.kind == CommandFramer::Kind::line) {
        FUZZ_CHECK(ev.line.find('\r') == std::string_view::npos &&
                   ev.line.find('\n') == std::string_view::npos);
        FUZZ_CHECK(ev.line.size() + 2 <= max_line);
        events.push_back("L" + std::string(ev.line));
      } else if (ev.kind == CommandFramer::Kind::too_long) {
        events.emplace_back("T");
      } else if (ev.kind == CommandFramer::Kind::bad_newline) {
        events.emplace_back("B");
      } else if (ev.kind == CommandFramer::Kind::bare_lf) {
        events.emplace_back("F");
      } else if (ev.kind == CommandFramer::Kind::too_long_bare_lf) {
        events.emplace_back("G");
      }
      buf.erase(0, ev.consumed);
      if (ev.kind == CommandFramer::Kind::need_more) break;
      FUZZ_CHECK(ev.consumed > 0);
    }
  }
  events.push_back("R" + std::string(framer.discarding() ? "" : buf));
  return events;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const std::size_t max_line = 3 + data[0] % 64;  // small limits reach the interesting paths quickly
  const std::size_t piece = 1 + data[1] % 16;
  const std::string_view input(reinterpret_cast<const char*>(data + 2), size - 2);
  const auto whole = frame(input, max_line, 0);
  FUZZ_CHECK(frame(input, max_line, piece) == whole);
  FUZZ_CHECK(frame(input, max_line, 1) == whole);
  // Events that end a line are at most one per LF; too_long ones one per over-long line (ended by an LF, or the
  // trailing one).
  std::size_t lfs = 0;
  for (char c : input) lfs += c == '\n';
  const auto too_long = static_cast<std::size_t>(std::count(whole.begin(), whole.end(), std::string("T")));
  FUZZ_CHECK(whole.size() - 1 - too_long <= lfs);
  FUZZ_CHECK(too_long <= lfs + 1);
  return 0;
}
