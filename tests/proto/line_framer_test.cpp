#include "proto/line_framer.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "split_helpers.hpp"

using namespace mailflow::proto;
using mailflow::test::double_splits_of;
using mailflow::test::printable;
using mailflow::test::splits_of;

namespace {

struct Framed {
  std::vector<std::string> events;  // "L:<line>", "TOO_LONG", "BAD_NL", "BARE_LF", "TOO_LONG_BARE_LF"
  std::string rest;                 // unread bytes (a partial line)
  bool operator==(const Framed&) const = default;
};

Framed frame(const std::vector<std::string>& chunks, std::size_t max_line = 512) {
  CommandFramer framer(max_line);
  Framed out;
  std::string buf;
  for (const auto& chunk : chunks) {
    buf += chunk;
    while (true) {
      const CommandFramer::Event ev = framer.next(buf);
      REQUIRE(ev.consumed <= buf.size());
      switch (ev.kind) {
        case CommandFramer::Kind::line:
          out.events.push_back("L:" + std::string(ev.line));
          break;
        case CommandFramer::Kind::too_long:
          out.events.push_back("TOO_LONG");
          break;
        case CommandFramer::Kind::bad_newline:
          out.events.push_back("BAD_NL");
          break;
        case CommandFramer::Kind::bare_lf:
          out.events.push_back("BARE_LF");
          break;
        case CommandFramer::Kind::too_long_bare_lf:
          out.events.push_back("TOO_LONG_BARE_LF");
          break;
        case CommandFramer::Kind::need_more:
          break;
      }
      buf.erase(0, ev.consumed);
      if (ev.kind == CommandFramer::Kind::need_more) break;
      REQUIRE(ev.consumed > 0);
    }
  }
  // While discarding, the unread tail is consumed already: report what the framer holds on to.
  out.rest = buf;
  return out;
}

void check_every_split(const std::string& input, const Framed& expected, std::size_t max_line = 512) {
  for (const auto& chunks : splits_of(input)) {
    INFO("input: " << printable(input) << " first piece: " << printable(chunks[0]) << " of "
                   << chunks.size());
    CHECK(frame(chunks, max_line) == expected);
  }
  if (input.size() <= 80) {
    for (const auto& chunks : double_splits_of(input)) {
      INFO("input: " << printable(input) << " pieces: " << printable(chunks[0]) << " | "
                     << printable(chunks[1]));
      CHECK(frame(chunks, max_line) == expected);
    }
  }
}

}  // namespace

TEST_CASE("CommandFramer: pipelined lines") {
  check_every_split("EHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n",
                    {{"L:EHLO a", "L:MAIL FROM:<a@b.c>", "L:RCPT TO:<d@e.f>", "L:DATA"}, ""});
  check_every_split("\r\nNOOP\r\nQUI", {{"L:", "L:NOOP"}, "QUI"});
}

TEST_CASE("CommandFramer: 512 octets including CRLF is the limit") {
  const std::string exact = std::string(510, 'a') + "\r\n";
  const std::string over = std::string(511, 'a') + "\r\n";
  CHECK(frame({exact}) == Framed{{"L:" + std::string(510, 'a')}, ""});
  CHECK(frame({over}) == Framed{{"TOO_LONG"}, ""});
  check_every_split(exact + "NOOP\r\n", {{"L:" + std::string(510, 'a'), "L:NOOP"}, ""});
  check_every_split(over + "NOOP\r\n", {{"TOO_LONG", "L:NOOP"}, ""});
  // A line of exactly 511 octets plus a bare CR waiting for its LF is already too long.
  CHECK(frame({std::string(511, 'a') + "\r"}) == Framed{{"TOO_LONG"}, ""});
  CHECK(frame({std::string(510, 'a') + "\r"}) == Framed{{}, std::string(510, 'a') + "\r"});
}

TEST_CASE("CommandFramer: an over-long line gets one event, never a second one for its tail") {
  const std::string huge = std::string(5000, 'x') + "\r\nNOOP\r\n";
  check_every_split(huge, {{"TOO_LONG", "L:NOOP"}, ""});
  // The tail may contain bare CRs, NULs and more over-long stretches: still one event.
  const std::string nasty = std::string(600, 'x') + "\r" + std::string(600, '\0') + "\r\nQUIT\r\n";
  check_every_split(nasty, {{"TOO_LONG", "L:QUIT"}, ""});
  // Two over-long lines are two events (the first one ended by a bare LF says so as well).
  check_every_split(std::string(600, 'x') + "\n" + std::string(600, 'y') + "\r\n",
                    {{"TOO_LONG", "TOO_LONG_BARE_LF", "TOO_LONG"}, ""});
  // Small limit, for the double-split sweep.
  check_every_split("abcdefghij\r\nok\r\n", {{"TOO_LONG", "L:ok"}, ""}, 8);
  check_every_split("abcdef\r\nok\r\n", {{"L:abcdef", "L:ok"}, ""}, 8);
  check_every_split("abcdefg\r\nok\r\n", {{"TOO_LONG", "L:ok"}, ""}, 8);
}

TEST_CASE("CommandFramer: an over-long line ended by a bare LF says so, however the input is split") {
  // The client may think the line goes on to the next CRLF: what follows the LF is no command of its own.
  check_every_split(std::string(20, 'x') + "\nNOOP\r\nQUIT\r\n",
                    {{"TOO_LONG", "TOO_LONG_BARE_LF", "L:NOOP", "L:QUIT"}, ""}, 8);
  check_every_split(std::string(20, 'x') + "\r\nQUIT\r\n", {{"TOO_LONG", "L:QUIT"}, ""}, 8);
  // A CR discarded at the end of one read and the LF at the start of the next are a CRLF.
  CHECK(frame({std::string(20, 'x') + "\r", "\nQUIT\r\n"}, 8) == Framed{{"TOO_LONG", "L:QUIT"}, ""});
  CHECK(frame({std::string(20, 'x'), "\nQUIT\r\n"}, 8) ==
        Framed{{"TOO_LONG", "TOO_LONG_BARE_LF", "L:QUIT"}, ""});
  CHECK(frame({std::string(20, 'x') + "\r", "yy", "\nQUIT\r\n"}, 8) ==
        Framed{{"TOO_LONG", "TOO_LONG_BARE_LF", "L:QUIT"}, ""});
}

TEST_CASE("CommandFramer: a discarding framer still needs more until the LF") {
  CommandFramer framer(8);
  auto ev = framer.next("abcdefghijk");
  CHECK(ev.kind == CommandFramer::Kind::too_long);
  CHECK(ev.consumed == 11);
  CHECK(framer.discarding());
  ev = framer.next("zzz");
  CHECK(ev.kind == CommandFramer::Kind::need_more);
  CHECK(ev.consumed == 3);
  ev = framer.next("z\r\nNOOP\r\n");
  CHECK(ev.kind == CommandFramer::Kind::line);
  CHECK(ev.line == "NOOP");
  CHECK(ev.consumed == 9);
  CHECK_FALSE(framer.discarding());
}

TEST_CASE("CommandFramer: bare LF and bare CR") {
  check_every_split("NOOP\nNOOP\r\n", {{"BARE_LF", "L:NOOP"}, ""});
  check_every_split("\nNOOP\r\n", {{"BARE_LF", "L:NOOP"}, ""});
  check_every_split("MAIL FROM:<a@b.c>\rRCPT TO:<x@y.z>\r\nQUIT\r\n", {{"BAD_NL", "L:QUIT"}, ""});
  check_every_split("NOOP\r\r\n", {{"BAD_NL"}, ""});
  check_every_split("\r\r\r\n\r\n", {{"BAD_NL", "L:"}, ""});
  // A CR at the end of what has arrived may still become a CRLF.
  CHECK(frame({"NOOP\r"}) == Framed{{}, "NOOP\r"});
}
