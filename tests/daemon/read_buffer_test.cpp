#include <doctest/doctest.h>

#include <cstring>
#include <string>

#include "daemon/read_buffer.hpp"

using mailflow::ReadBuffer;

namespace {

void put(ReadBuffer& buffer, const std::string& bytes, std::size_t room) {
  std::memcpy(buffer.prepare(room), bytes.data(), bytes.size());
  buffer.commit(bytes.size());
}

}  // namespace

TEST_CASE("ReadBuffer: receive, consume in pieces, keep the unconsumed tail") {
  ReadBuffer buffer;
  CHECK(buffer.empty());
  CHECK(buffer.capacity() == 0);
  put(buffer, "MAIL FROM:<a@b>\r\nRCPT", 4096);
  CHECK(buffer.capacity() == 4096);
  CHECK(buffer.view() == "MAIL FROM:<a@b>\r\nRCPT");
  buffer.consume(17);
  CHECK(buffer.view() == "RCPT");
  put(buffer, " TO:<c@d>\r\n", 4096);  // the rest of a line that arrived in two reads
  CHECK(buffer.view() == "RCPT TO:<c@d>\r\n");
  buffer.consume(buffer.size());
  CHECK(buffer.empty());
  CHECK(buffer.view().empty());
}

TEST_CASE("ReadBuffer: room is made by moving the data to the front before growing") {
  ReadBuffer buffer;
  put(buffer, std::string(3000, 'a') + "tail", 4096);
  buffer.consume(3000);
  // 4 bytes left at offset 3000: 4000 more do not fit behind them, but fit once the tail moves to the front.
  char* room = buffer.prepare(4000);
  CHECK(buffer.capacity() == 4096);
  CHECK(buffer.view() == "tail");
  CHECK(room == buffer.view().data() + 4);
}

TEST_CASE("ReadBuffer: growing keeps the unconsumed data and doubles the storage") {
  ReadBuffer buffer;
  put(buffer, "0123456789", 16);
  buffer.consume(2);
  buffer.prepare(100);
  CHECK(buffer.capacity() == 128);  // 16 -> 32 -> 64 -> 128 >= 8 + 100
  CHECK(buffer.view() == "23456789");
  buffer.append(std::string(100, 'x'));
  CHECK(buffer.size() == 108);
  CHECK(buffer.view().substr(0, 8) == "23456789");
  CHECK(buffer.view().substr(8) == std::string(100, 'x'));
}

TEST_CASE("ReadBuffer: storage is released only when nothing is buffered") {
  ReadBuffer buffer;
  buffer.append("QUIT\r\n");
  buffer.release_if_empty();
  CHECK(buffer.view() == "QUIT\r\n");  // pipelined bytes survive an idle moment
  CHECK(buffer.capacity() > 0);
  buffer.consume(6);
  buffer.release_if_empty();
  CHECK(buffer.capacity() == 0);
  buffer.append("x");  // usable again afterwards
  CHECK(buffer.view() == "x");
  buffer.clear();
  CHECK(buffer.empty());
}
