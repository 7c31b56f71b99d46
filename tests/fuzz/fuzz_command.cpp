// parse_command on arbitrary lines: never crashes; accepted commands satisfy what the session relies on.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/command.hpp"

using namespace mailflow::proto;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  const ParsedCommand p = parse_command(line);
  if (p.error != CommandError::none) {
    FUZZ_CHECK(!p.message.empty());
    return 0;
  }
  const Command& c = p.command;
  FUZZ_CHECK(c.verb != Verb::unknown);
  for (char ch : line) {
    const auto b = static_cast<unsigned char>(ch);
    FUZZ_CHECK(b == '\t' || (b >= 0x20 && b < 0x7f));  // accepted commands are printable ASCII
  }
  if (c.verb == Verb::ehlo || c.verb == Verb::helo) FUZZ_CHECK(!c.domain.empty());
  if (c.verb == Verb::rcpt) FUZZ_CHECK(!c.address.empty());
  if (c.verb == Verb::mail || c.verb == Verb::rcpt) {
    FUZZ_CHECK(c.address.find('<') == std::string::npos || c.address.front() == '"');
    const std::string domain = address_domain(c.address);
    for (char ch : domain) FUZZ_CHECK(!(ch >= 'A' && ch <= 'Z'));
    // The address re-parses to itself when written back in canonical form.
    const std::string again = (c.verb == Verb::mail ? "MAIL FROM:<" : "RCPT TO:<") + c.address + ">";
    const ParsedCommand q = parse_command(again);
    FUZZ_CHECK(q.error == CommandError::none);
    FUZZ_CHECK(q.command.address == c.address);
  }
  return 0;
}
