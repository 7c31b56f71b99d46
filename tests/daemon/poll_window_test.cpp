#include <doctest/doctest.h>

#include <chrono>

#include "daemon/poll_window.hpp"

using mailflow::PollWindow;
using std::chrono::microseconds;

TEST_CASE("PollWindow: a fresh loop sleeps at once") { CHECK(PollWindow().current() == microseconds(0)); }

TEST_CASE("PollWindow: short gaps grow the window up to the maximum, never beyond") {
  PollWindow window;
  window.slept(microseconds(30));
  CHECK(window.current() == PollWindow::first);
  window.slept(microseconds(30));
  CHECK(window.current() == 2 * PollWindow::first);
  for (int i = 0; i < 20; ++i) window.slept(microseconds(60));
  CHECK(window.current() == PollWindow::max);
}

TEST_CASE("PollWindow: long gaps halve it to nothing (a quiet relay polls no more)") {
  PollWindow window;
  for (int i = 0; i < 20; ++i) window.slept(microseconds(10));
  REQUIRE(window.current() == PollWindow::max);
  window.slept(std::chrono::milliseconds(2));
  CHECK(window.current() == PollWindow::max / 2);
  int steps = 1;
  while (window.current() > microseconds(0) && steps < 100) {
    window.slept(std::chrono::seconds(1));
    ++steps;
  }
  CHECK(window.current() == microseconds(0));
  CHECK(steps <= 6);              // 100 -> 50 -> 25 -> 12.5 -> 6.25 -> 3.125 (< first) -> 0
  window.slept(PollWindow::max);  // a gap of exactly the maximum cannot be caught: no growth
  CHECK(window.current() == microseconds(0));
}
