#include "proto/data_filter.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "split_helpers.hpp"

using namespace mailflow::proto;
using mailflow::test::double_splits_of;
using mailflow::test::printable;
using mailflow::test::splits_of;

namespace {

struct Filtered {
  std::string out;
  std::size_t consumed = 0;  // bytes of the whole input taken by the filter
  bool done = false;
  bool too_big = false;
  bool line_too_long = false;
  bool bare_newline = false;
  std::uint64_t bytes = 0;
  bool operator==(const Filtered&) const = default;
};

doctest::String describe(const Filtered& f) {
  return (printable(f.out) + " consumed=" + std::to_string(f.consumed) + " done=" + std::to_string(f.done) +
          " too_big=" + std::to_string(f.too_big) + " long=" + std::to_string(f.line_too_long) +
          " bare=" + std::to_string(f.bare_newline) + " bytes=" + std::to_string(f.bytes))
      .c_str();
}

Filtered run(const std::vector<std::string>& chunks, DataFilter::Limits limits = {}) {
  DataFilter filter(limits);
  Filtered f;
  for (const auto& chunk : chunks) {
    if (filter.done()) break;
    const std::size_t n = filter.feed(chunk, f.out);
    REQUIRE(n <= chunk.size());
    if (!filter.done()) REQUIRE(n == chunk.size());
    f.consumed += n;
  }
  f.done = filter.done();
  f.too_big = filter.too_big();
  f.line_too_long = filter.line_too_long();
  f.bare_newline = filter.bare_newline_seen();
  f.bytes = filter.message_bytes();
  return f;
}

// What the upstream is guaranteed: CRLF line endings only, and no end-of-data before the real one.
void check_wire_safe(const std::string& out, bool done) {
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (out[i] == '\r') {
      REQUIRE_MESSAGE((i + 1 < out.size() && out[i + 1] == '\n'), "bare CR at ", i, " in ", printable(out));
    }
    if (out[i] == '\n')
      REQUIRE_MESSAGE((i > 0 && out[i - 1] == '\r'), "bare LF at ", i, " in ", printable(out));
  }
  std::size_t term = out.find("\r\n.\r\n");
  const bool starts_with_dot_line = out.rfind(".\r\n", 0) == 0;
  if (done) {
    // The only terminator is the final one.
    if (starts_with_dot_line) {
      CHECK(out == ".\r\n");
    } else {
      CHECK(term == out.size() - 5);
    }
  } else {
    CHECK(term == std::string::npos);
    CHECK_FALSE(starts_with_dot_line);
  }
}

Filtered check_every_split(const std::string& input, DataFilter::Limits limits = {}) {
  const Filtered whole = run({input}, limits);
  check_wire_safe(whole.out, whole.done);
  for (const auto& chunks : splits_of(input)) {
    INFO("input: " << printable(input) << " first piece: " << printable(chunks[0]) << " of "
                   << chunks.size());
    const Filtered f = run(chunks, limits);
    CHECK_MESSAGE(f == whole, describe(f), " vs whole ", describe(whole));
  }
  if (input.size() <= 60) {
    for (const auto& chunks : double_splits_of(input)) {
      INFO("input: " << printable(input) << " pieces: " << printable(chunks[0]) << " | "
                     << printable(chunks[1]));
      CHECK(run(chunks, limits) == whole);
    }
  }
  return whole;
}

}  // namespace

TEST_CASE("DataFilter: a plain message passes unchanged and ends at CRLF.CRLF") {
  const std::string msg = "Subject: hi\r\n\r\nbody line\r\n.\r\n";
  const Filtered f = check_every_split(msg + "QUIT\r\n");
  CHECK(f.done);
  CHECK(f.out == msg);
  CHECK(f.consumed == msg.size());
  CHECK_FALSE(f.bare_newline);
  CHECK_FALSE(f.too_big);
  CHECK_FALSE(f.line_too_long);
  CHECK(f.bytes == std::string("Subject: hi\r\n\r\nbody line\r\n").size());
}

TEST_CASE("DataFilter: an empty message") {
  const Filtered f = check_every_split(".\r\nMAIL FROM:<>\r\n");
  CHECK(f.done);
  CHECK(f.out == ".\r\n");
  CHECK(f.consumed == 3);
  CHECK(f.bytes == 0);
}

TEST_CASE("DataFilter: dot-stuffing is preserved exactly") {
  const std::string msg = "..leading dot\r\n...\r\n..\r\n.x\r\nmid.dle\r\n. \r\n.\r\n";
  const Filtered f = check_every_split(msg);
  CHECK(f.done);
  CHECK(f.out == msg);
  // Unstuffed content: ".leading dot", "..", ".", "x", "mid.dle", " ".
  CHECK(f.bytes == (12 + 2) + (2 + 2) + (1 + 2) + (1 + 2) + (7 + 2) + (1 + 2));
}

TEST_CASE("DataFilter: SMTP smuggling variants never end the message") {
  struct Case {
    const char* name;
    std::string input;
    std::string expected_out;  // before the real terminator is appended
  };
  const std::vector<Case> cases = {
      {"<LF>.<LF>", "a\n.\nMAIL FROM:<evil@x.example>\r\n", "a\r\n..\r\nMAIL FROM:<evil@x.example>\r\n"},
      {"<CR>.<CR>", "a\r.\rMAIL FROM:<evil@x.example>\r\n", "a . MAIL FROM:<evil@x.example>\r\n"},
      {"<LF>.<CR><LF>", "a\n.\r\nMAIL FROM:<evil@x.example>\r\n",
       "a\r\n..\r\nMAIL FROM:<evil@x.example>\r\n"},
      {"<CR><LF>.<LF>", "a\r\n.\nMAIL FROM:<evil@x.example>\r\n",
       "a\r\n..\r\nMAIL FROM:<evil@x.example>\r\n"},
      {"<CR><LF>.<CR>", "a\r\n.\rMAIL FROM:<evil@x.example>\r\n", "a\r\n. MAIL FROM:<evil@x.example>\r\n"},
      {"<CR>.<CR><LF>", "a\r.\r\nMAIL FROM:<evil@x.example>\r\n", "a .\r\nMAIL FROM:<evil@x.example>\r\n"},
      {"leading <LF>.<LF>", "\n.\nX\r\n", "\r\n..\r\nX\r\n"},
      {"first line .<LF>", ".\nX\r\n", "..\r\nX\r\n"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    for (auto policy : {BareNewlinePolicy::normalize, BareNewlinePolicy::reject}) {
      DataFilter::Limits limits;
      limits.bare_newline = policy;
      const Filtered open = check_every_split(c.input, limits);
      CHECK_FALSE(open.done);
      CHECK(open.bare_newline);
      CHECK(open.out == c.expected_out);
      // Only a real CRLF.CRLF ends it, and everything after the fake one is still the same message.
      const Filtered closed = check_every_split(c.input + ".\r\nRSET\r\n", limits);
      CHECK(closed.done);
      CHECK(closed.out == c.expected_out + ".\r\n");
      CHECK(closed.consumed == c.input.size() + 3);
      CHECK(closed.bare_newline);
    }
  }
}

TEST_CASE("DataFilter: bare LF becomes CRLF, bare CR a space, CR LF split over feeds is one CRLF") {
  const std::string input = "one\ntwo\rthree\r\r\nfour\r\r\r\n\n.\r\n";
  const Filtered f = check_every_split(input);
  // "\n.\r\n": the '.' line follows a bare-LF line, so it is not the terminator: it goes out stuffed.
  CHECK_FALSE(f.done);
  CHECK(f.bare_newline);
  CHECK(f.out == "one\r\ntwo three \r\nfour  \r\n\r\n..\r\n");
  const Filtered ended = check_every_split(input + ".\r\n");
  CHECK(ended.done);
  CHECK(ended.out == f.out + ".\r\n");

  const Filtered g = run({"x\r", "\n.\r", "\n"});
  CHECK(g.done);
  CHECK(g.out == "x\r\n.\r\n");
  CHECK_FALSE(g.bare_newline);
}

TEST_CASE("DataFilter: runs of plain CRLF lines broken by every kind of line") {
  // Plain CRLF lines are copied in runs; each other kind of line ends a run and the next run starts after it.
  DataFilter::Limits limits;
  limits.max_line = 12;  // including CRLF
  const std::string input =
      "a1\r\na2\r\n..dot\r\nb1\r\nbare lf\nc1\r\nbare\rcr\r\nd1\r\n\r\nd2\r\nlong line!!!\r\ne1\r\n.\r\nX";
  const Filtered f = check_every_split(input, limits);
  CHECK(f.done);
  CHECK(f.out ==
        "a1\r\na2\r\n..dot\r\nb1\r\nbare lf\r\nc1\r\nbare cr\r\nd1\r\n\r\nd2\r\nlong line!!!\r\ne1\r\n.\r\n");
  CHECK(f.consumed == input.size() - 1);
  CHECK(f.bare_newline);
  CHECK(f.line_too_long);                  // "long line!!!" is 12 octets + CRLF
  CHECK(f.bytes == f.out.size() - 1 - 3);  // less the stuffing dot and the terminator
}

TEST_CASE("DataFilter: a message that only ends after a fake terminator") {
  // The fake end "\n.\n" is followed by a real one later; nothing after the fake one becomes a second
  // message.
  const std::string input = "hello\n.\nDATA\r\nsecond\r\n.\r\nQUIT\r\n";
  const Filtered f = check_every_split(input);
  CHECK(f.done);
  CHECK(f.out == "hello\r\n..\r\nDATA\r\nsecond\r\n.\r\n");
  CHECK(f.consumed == input.size() - 6);
}

TEST_CASE("DataFilter: message size counts unstuffed content") {
  DataFilter::Limits limits;
  limits.max_message_size = 10;
  // "12345678\r\n" is exactly 10 octets: not too big.
  Filtered f = check_every_split("12345678\r\n.\r\n", limits);
  CHECK(f.done);
  CHECK(f.bytes == 10);
  CHECK_FALSE(f.too_big);
  // The stuffing dot does not count: "..2345678" unstuffs to 8 octets + CRLF.
  f = check_every_split("..2345678\r\n.\r\n", limits);
  CHECK(f.bytes == 10);
  CHECK_FALSE(f.too_big);
  f = check_every_split("123456789\r\n.\r\n", limits);
  CHECK(f.bytes == 11);
  CHECK(f.too_big);
  CHECK(f.done);  // too big, still read to its end
  CHECK(f.out == "123456789\r\n.\r\n");
}

TEST_CASE("DataFilter: over-long lines are flagged but streamed") {
  DataFilter::Limits limits;
  limits.max_line = 10;  // including CRLF
  Filtered f = check_every_split("12345678\r\n.\r\n", limits);
  CHECK_FALSE(f.line_too_long);
  f = check_every_split("..2345678\r\n.\r\n", limits);  // stuffing dot not counted
  CHECK_FALSE(f.line_too_long);
  f = check_every_split("123456789\r\n.\r\n", limits);
  CHECK(f.line_too_long);
  CHECK(f.done);
  CHECK(f.out == "123456789\r\n.\r\n");

  // A huge line: never buffered, every byte comes out as it goes in.
  DataFilter big({});
  std::string out;
  const std::string chunk(64 * 1024, 'a');
  for (int i = 0; i < 16; ++i) {
    out.clear();
    CHECK(big.feed(chunk, out) == chunk.size());
    CHECK(out == chunk);
  }
  CHECK(big.line_too_long());
  CHECK_FALSE(big.done());
}

TEST_CASE("DataFilter: reject policy still reads to the end and says so") {
  DataFilter::Limits limits;
  limits.bare_newline = BareNewlinePolicy::reject;
  const Filtered f = check_every_split("a\nb\r\n.\r\nNOOP\r\n", limits);
  CHECK(f.done);
  CHECK(f.bare_newline);
  CHECK(f.consumed == 8);
  const Filtered clean = check_every_split("a\r\nb\r\n.\r\n", limits);
  CHECK_FALSE(clean.bare_newline);
}

TEST_CASE("DataFilter: after the end nothing more is taken") {
  DataFilter filter({});
  std::string out;
  CHECK(filter.feed(".\r\nNOOP\r\n", out) == 3);
  CHECK(filter.done());
  CHECK(filter.feed("more", out) == 0);
  CHECK(out == ".\r\n");
}

TEST_CASE("DataFilter: all short inputs over a small alphabet are wire-safe and split-invariant") {
  // Exhaustive over {'a', '.', '\r', '\n'} up to 7 bytes: 21844 inputs, each whole and byte by byte.
  const char alphabet[] = {'a', '.', '\r', '\n'};
  std::string input;
  std::size_t checked = 0;
  for (std::size_t len = 1; len <= 7; ++len) {
    std::size_t combos = 1;
    for (std::size_t i = 0; i < len; ++i) combos *= 4;
    for (std::size_t n = 0; n < combos; ++n) {
      input.clear();
      std::size_t k = n;
      for (std::size_t i = 0; i < len; ++i, k /= 4) input.push_back(alphabet[k % 4]);
      const Filtered whole = run({input});
      std::vector<std::string> bytes;
      for (char c : input) bytes.emplace_back(1, c);
      const Filtered split = run(bytes);
      if (!(split == whole)) {
        FAIL("split mismatch for ", printable(input), ": ", describe(split), " vs ", describe(whole));
      }
      check_wire_safe(whole.out, whole.done);
      // The terminator is recognized exactly when the input has CRLF.CRLF at a line start (or starts with
      // it).
      const bool has_end = input.rfind(".\r\n", 0) == 0 || input.find("\r\n.\r\n") != std::string::npos;
      if (has_end != whole.done) FAIL("terminator mismatch for ", printable(input));
      ++checked;
    }
  }
  CHECK(checked == 21844);
}

TEST_CASE("DataFilter: an endless line is too big as soon as it passes the limit") {
  DataFilter::Limits limits;
  limits.max_message_size = 100;
  limits.max_line = 1000;
  DataFilter f(limits);
  std::string out;
  f.feed(std::string(100, 'a'), out);
  CHECK_FALSE(f.too_big());
  CHECK(f.message_bytes() == 100);
  f.feed("a", out);
  CHECK(f.too_big());
  CHECK_FALSE(f.line_too_long());
  CHECK(f.message_bytes() == 101);
}
