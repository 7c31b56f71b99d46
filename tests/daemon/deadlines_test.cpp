#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <optional>

#include "daemon/deadlines.hpp"
#include "daemon/link.hpp"
#include "daemon/read_buffer.hpp"

// The session's watchdog (a plain timer wait since it stopped being a coroutine) with real Link operations on
// a loopback connection: each operation's own deadline and no other ends it.

namespace asio = boost::asio;
using asio::ip::tcp;
using mailflow::Deadlines;
using mailflow::Link;
using mailflow::ReadBuffer;
using namespace std::chrono_literals;

namespace {

struct Pair {
  asio::io_context io;
  tcp::socket near{io};  // becomes the Link's
  tcp::socket far{io};   // the peer

  Pair() {
    tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
    near.connect(acceptor.local_endpoint());
    far = acceptor.accept();
  }
};

// The peer writes `text` after `delay`.
void peer_writes(Pair& pair, std::chrono::milliseconds delay, const char* text) {
  auto timer = std::make_shared<asio::steady_timer>(pair.io, delay);
  timer->async_wait([&pair, timer, text](const boost::system::error_code&) {
    asio::write(pair.far, asio::buffer(std::string_view(text)));
  });
}

struct Read {
  boost::system::error_code ec;
  std::size_t bytes = 0;
  Deadlines::Clock::duration took{};
};

}  // namespace

TEST_CASE("Deadlines: a read past its deadline times out, and a deadline that passed is not the next one's") {
  Pair pair;
  auto keep_alive = std::make_shared<int>(0);
  std::optional<Link> link;
  Deadlines deadlines(pair.io.get_executor(), [&] { link->cancel(); });
  link.emplace(std::move(pair.near), deadlines);
  deadlines.start(keep_alive);
  Read first, second, third;
  peer_writes(pair, 0ms, "a");    // the first read gets it at once, long before its deadline (300 ms)
  peer_writes(pair, 500ms, "b");  // the second one waits past the first's deadline, within its own (2 s)
  asio::co_spawn(
      pair.io,
      [&]() -> asio::awaitable<void> {
        ReadBuffer buffer;
        auto start = Deadlines::Clock::now();
        first.bytes = co_await link->read_some(buffer, 100, Deadlines::in(300ms), first.ec);
        start = Deadlines::Clock::now();
        second.bytes = co_await link->read_some(buffer, 100, Deadlines::in(2s), second.ec);
        second.took = Deadlines::Clock::now() - start;
        start = Deadlines::Clock::now();  // nothing more comes: this one times out, at its own deadline
        third.bytes = co_await link->read_some(buffer, 100, Deadlines::in(200ms), third.ec);
        third.took = Deadlines::Clock::now() - start;
        deadlines.stop();
      },
      asio::detached);
  pair.io.run_for(10s);
  CHECK_FALSE(first.ec);
  CHECK(first.bytes == 1);
  // The first read's deadline (300 ms) passed while this one waited: it is not this one's.
  CHECK_FALSE(second.ec);
  CHECK(second.bytes == 1);
  CHECK(second.took >= 400ms);
  CHECK(third.ec == asio::error::timed_out);
  CHECK(third.took >= 190ms);
  CHECK(third.took < 1500ms);
}

TEST_CASE("Deadlines: a deadline earlier than the one the watchdog waits for fires on time") {
  Pair pair;
  auto keep_alive = std::make_shared<int>(0);
  std::weak_ptr<int> watched = keep_alive;
  std::optional<Link> link;
  Deadlines deadlines(pair.io.get_executor(), [&] { link->cancel(); });
  link.emplace(std::move(pair.near), deadlines);
  deadlines.start(std::move(keep_alive));
  Read late, early;
  peer_writes(pair, 0ms, "a");
  asio::co_spawn(
      pair.io,
      [&]() -> asio::awaitable<void> {
        ReadBuffer buffer;
        late.bytes = co_await link->read_some(buffer, 100, Deadlines::in(30s), late.ec);  // done at once
        const auto start = Deadlines::Clock::now();
        early.bytes = co_await link->read_some(buffer, 100, Deadlines::in(100ms), early.ec);
        early.took = Deadlines::Clock::now() - start;
        deadlines.stop();
      },
      asio::detached);
  pair.io.run_for(10s);
  CHECK_FALSE(late.ec);
  CHECK(early.ec == asio::error::timed_out);
  CHECK(early.took < 1s);    // not the 30 s the watchdog was set for
  CHECK(pair.io.stopped());  // stop() ended the watchdog: nothing left to run
  CHECK(watched.expired());  // and it let go of what it kept alive
}
