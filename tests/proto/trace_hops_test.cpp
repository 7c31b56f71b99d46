#include "proto/trace_hops.hpp"

#include <doctest/doctest.h>

#include "tests/proto/split_helpers.hpp"

using mailflow::proto::TraceHopCounter;

namespace {
TraceHopCounter counted(const std::vector<std::string>& chunks) {
  TraceHopCounter counter;
  for (const auto& chunk : chunks) counter.feed(chunk);
  return counter;
}
}  // namespace

TEST_CASE("TraceHopCounter: Received fields of the header section, whatever the split") {
  const std::string message =
      "Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
      "received: from c\r\n\tby d; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
      "RECEIVED:x\r\n"
      "X-Received: not a trace field\r\n"
      "Subject: Received: in a value\r\n"
      "\r\n"
      "Received: in the body is no hop\r\n";
  for (const auto& chunks : mailflow::test::splits_of(message)) {
    const auto counter = counted(chunks);
    CHECK(counter.hops() == 3);
    CHECK(counter.headers_done());
  }
}

TEST_CASE("TraceHopCounter: short lines, a message without body, no header end yet") {
  CHECK(counted({"A: b\r\nReceived: x\r\n\r\n"}).hops() == 1);
  auto open = counted({"Received: x\r\nRecei"});
  CHECK(open.hops() == 1);
  CHECK_FALSE(open.headers_done());
  open.feed("ved: y\r\n\r\n");
  CHECK(open.hops() == 2);
  CHECK(open.headers_done());
  CHECK(counted({"\r\nReceived: x\r\n"}).hops() == 0);  // no header section at all
}
