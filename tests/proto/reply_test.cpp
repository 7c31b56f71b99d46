#include "proto/reply.hpp"

#include <doctest/doctest.h>

#include <string>
#include <string_view>
#include <vector>

#include "split_helpers.hpp"

using namespace mailflow::proto;
using mailflow::test::printable;
using mailflow::test::splits_of;

namespace {

// What a reader loop sees: each complete reply as "CODE|line|line", or "invalid", and whatever stays unread.
struct ReaderResult {
  std::vector<std::string> replies;
  std::string rest;
  bool operator==(const ReaderResult&) const = default;
};

std::string describe(const Reply& r) {
  std::string s = std::to_string(r.code);
  for (const auto& l : r.lines) s += "|" + l;
  return s;
}

ReaderResult read_replies(const std::vector<std::string>& chunks) {
  ReaderResult out;
  std::string buf;
  for (const auto& chunk : chunks) {
    buf += chunk;
    while (true) {
      ReplyParseResult r = parse_reply(buf);
      if (r.status == ReplyStatus::incomplete) break;
      if (r.status == ReplyStatus::invalid) {
        CHECK_FALSE(r.error.empty());
        out.replies.push_back("invalid");
        out.rest = "<stopped>";
        return out;
      }
      REQUIRE(r.consumed > 0);
      REQUIRE(r.consumed <= buf.size());
      out.replies.push_back(describe(r.reply));
      buf.erase(0, r.consumed);
    }
  }
  out.rest = buf;
  return out;
}

void check_every_split(const std::string& input, const ReaderResult& expected) {
  for (const auto& chunks : splits_of(input)) {
    INFO("input: " << printable(input) << " pieces: " << chunks.size() << " first: " << printable(chunks[0]));
    CHECK(read_replies(chunks) == expected);
  }
}

}  // namespace

TEST_CASE("format_reply writes wire form") {
  CHECK(format_reply(250, "2.0.0", "Ok") == "250 2.0.0 Ok\r\n");
  CHECK(format_reply(220, "", "mx ESMTP") == "220 mx ESMTP\r\n");
  Reply r{250, {"mx1.example.org", "PIPELINING", "SIZE 10"}};
  CHECK(format_reply(r) == "250-mx1.example.org\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
  CHECK(format_reply(Reply{354, {}}) == "354 \r\n");
}

TEST_CASE("format_reply never lets text break a line") {
  CHECK(format_reply(550, "5.7.1", "evil\r\n250 ok") == "550 5.7.1 evil  250 ok\r\n");
  CHECK(format_reply(Reply{451, {"a\nb", "c\rd"}}) == "451-a b\r\n451 c d\r\n");
  // Nor carry other control bytes (RFC 5321 4.2: reply text is HT and printable US-ASCII): an upstream's NUL
  // or terminal escape never reaches the client. HT and 8-bit text (UTF-8 from upstreams) stay.
  CHECK(format_reply(Reply{550, {std::string("bad \0\x1b[31m\x7f\tuser \xc3\xa4", 19)}}) ==
        "550 bad   [31m \tuser \xc3\xa4\r\n");
}

TEST_CASE("format_reply writes at most 10 lines of 512 octets") {
  // What a hostile upstream can make parse_reply take (100 lines of 2 KiB) is relayed in 10 lines of 512
  // octets (RFC 5321 4.5.3.1.5): the first 9 and the last.
  Reply big{550, {}};
  for (int i = 0; i < 100; ++i) big.lines.push_back(std::to_string(i) + " " + std::string(2000, 'x'));
  const std::string wire = format_reply(big);
  std::vector<std::string> lines;
  for (std::size_t at = 0; at < wire.size();) {
    const auto end = wire.find("\r\n", at);
    REQUIRE(end != std::string::npos);
    lines.push_back(wire.substr(at, end + 2 - at));
    at = end + 2;
  }
  REQUIRE(lines.size() == 10);
  for (const auto& line : lines) CHECK(line.size() == 512);
  CHECK(lines[0].starts_with("550-0 xxx"));
  CHECK(lines[8].starts_with("550-8 xxx"));
  CHECK(lines[9].starts_with("550 99 xxx"));
  // A cut never splits a UTF-8 sequence.
  const std::string cut = format_reply(Reply{550, {std::string(505, 'a') + "\xc3\xa4"}});
  CHECK(cut == "550 " + std::string(505, 'a') + "\r\n");
  // Ten lines or fewer, each short: as they were.
  Reply ten{250, {}};
  for (int i = 0; i < 10; ++i) ten.lines.push_back("line " + std::to_string(i));
  CHECK(parse_reply(format_reply(ten)).reply.lines == ten.lines);
}

TEST_CASE("format_reply from views writes what it writes from a Reply") {
  Reply big{550, {"a\r\nb", "", std::string(600, 'y')}};
  for (int i = 0; i < 20; ++i) big.lines.push_back(std::to_string(i) + " " + std::string(700, 'x'));
  for (std::size_t n = 0; n <= big.lines.size(); ++n) {
    const Reply part{big.code, std::vector<std::string>(big.lines.begin(), big.lines.begin() + n)};
    const std::vector<std::string_view> views(part.lines.begin(), part.lines.end());
    CHECK(format_reply(part.code, views) == format_reply(part));
  }
}

TEST_CASE("format_reply and parse_reply agree") {
  Reply r{250, {"mx", "PIPELINING", "", "8BITMIME"}};
  const std::string wire = format_reply(r);
  auto parsed = parse_reply(wire);
  REQUIRE(parsed.status == ReplyStatus::complete);
  CHECK(parsed.consumed == wire.size());
  CHECK(parsed.reply.code == 250);
  CHECK(parsed.reply.lines == r.lines);
}

TEST_CASE("parse_reply: complete replies at every split") {
  check_every_split("220 mx ESMTP\r\n", {{"220|mx ESMTP"}, ""});
  check_every_split("250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n", {{"250|mx|PIPELINING|SIZE 100"}, ""});
  check_every_split("250\r\n", {{"250|"}, ""});
  check_every_split("250-\r\n250 \r\n", {{"250||"}, ""});
  // Bare LF is tolerated from upstreams.
  check_every_split("250-a\n250 b\n", {{"250|a|b"}, ""});
  // Pipelined replies come out one by one; a partial one stays unread.
  check_every_split("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n25",
                    {{"250|2.1.0 Ok", "250|2.1.5 Ok", "354|End data"}, "25"});
  // A CR inside the text stays text (format_reply cleans it when relayed).
  check_every_split("250 a\rb\r\n", {{"250|a\rb"}, ""});
}

TEST_CASE("parse_reply: invalid input at every split") {
  check_every_split("hello\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("25x ok\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("250_ok\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("25\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("250-a\r\n251 b\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("250 ok\r\nxyz\r\n", {{"250|ok", "invalid"}, "<stopped>"});
  check_every_split("250\r0\r\n", {{"invalid"}, "<stopped>"});
  // RFC 5321 4.2.1: first digits other than 2..5 are out of range (fatal for the client), also behind a
  // valid reply.
  check_every_split("650 6.0.0 odd\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("199 wait\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("000\r\n", {{"invalid"}, "<stopped>"});
  check_every_split("250 ok\r\n999 odd\r\n", {{"250|ok", "invalid"}, "<stopped>"});
}

TEST_CASE("parse_reply: garbage is refused before a newline arrives") {
  CHECK(parse_reply("H").status == ReplyStatus::invalid);
  CHECK(parse_reply("2").status == ReplyStatus::incomplete);
  CHECK(parse_reply("6").status == ReplyStatus::invalid);
  CHECK(parse_reply("250").status == ReplyStatus::incomplete);
  CHECK(parse_reply("250x").status == ReplyStatus::invalid);
  CHECK(parse_reply("").status == ReplyStatus::incomplete);
}

TEST_CASE("parse_reply: limits") {
  // 2048 octets per line including CRLF is the limit.
  std::string ok = "250 " + std::string(2048 - 6, 'a') + "\r\n";
  REQUIRE(ok.size() == 2048);
  CHECK(parse_reply(ok).status == ReplyStatus::complete);
  std::string too_long = "250 " + std::string(2048 - 5, 'a') + "\r\n";
  CHECK(parse_reply(too_long).status == ReplyStatus::invalid);
  // Without a newline: incomplete until the line can no longer fit.
  CHECK(parse_reply(std::string_view(too_long).substr(0, 2047)).status == ReplyStatus::incomplete);
  CHECK(parse_reply(std::string_view(too_long).substr(0, 2048)).status == ReplyStatus::invalid);

  std::string hundred;
  for (int i = 0; i < 99; ++i) hundred += "250-x\r\n";
  CHECK(parse_reply(hundred + "250 x\r\n").status == ReplyStatus::complete);
  CHECK(parse_reply(hundred + "250 x\r\n").reply.lines.size() == 100);
  CHECK(parse_reply(hundred + "250-x\r\n250 x\r\n").status == ReplyStatus::invalid);
  CHECK(parse_reply(hundred + "250-x\r\n").status == ReplyStatus::invalid);
}

TEST_CASE("Reply classification") {
  CHECK(Reply{250, {}}.positive());
  CHECK(Reply{421, {}}.transient());
  CHECK(Reply{554, {}}.permanent());
  CHECK_FALSE(Reply{354, {}}.positive());
}
