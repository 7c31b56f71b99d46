// parse_reply on arbitrary upstream bytes: never crashes, never reads past the input, consistent under
// truncation, and format_reply(parse(x)) parses back to the same reply (up to the writer's bound on lines).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/reply.hpp"

using namespace mailflow::proto;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const ReplyParseResult r = parse_reply(input);
  if (r.status == ReplyStatus::complete) {
    FUZZ_CHECK(r.consumed > 0 && r.consumed <= size);
    FUZZ_CHECK(!r.reply.lines.empty() && r.reply.lines.size() <= 100);
    FUZZ_CHECK(r.reply.code >= 0 && r.reply.code <= 999);
    // Any shorter prefix is still incomplete; the same reply comes out with trailing bytes cut off.
    FUZZ_CHECK(parse_reply(input.substr(0, r.consumed - 1)).status == ReplyStatus::incomplete);
    const ReplyParseResult exact = parse_reply(input.substr(0, r.consumed));
    FUZZ_CHECK(exact.status == ReplyStatus::complete && exact.consumed == r.consumed);
    // Round trip through the writer: always one clean reply with the same code, of the same lines up to the
    // writer's bound (10 lines of 512 octets, RFC 5321 4.5.3.1.5: the first 9 and the last).
    const std::string wire = format_reply(r.reply);
    const ReplyParseResult again = parse_reply(wire);
    FUZZ_CHECK(again.status == ReplyStatus::complete);
    FUZZ_CHECK(again.consumed == wire.size());
    FUZZ_CHECK(again.reply.code == r.reply.code);
    FUZZ_CHECK(again.reply.lines.size() == std::min<std::size_t>(r.reply.lines.size(), 10));
    for (const auto& line : again.reply.lines) FUZZ_CHECK(line.size() <= 512 - 6);
  } else if (r.status == ReplyStatus::invalid) {
    FUZZ_CHECK(!r.error.empty());
  } else {
    // Incomplete: every prefix is incomplete too (nothing is decided on bytes that are not there yet).
    FUZZ_CHECK(size < 2048 * 100 + 2048);
    if (size > 0) FUZZ_CHECK(parse_reply(input.substr(0, size / 2)).status == ReplyStatus::incomplete);
  }
  return 0;
}
