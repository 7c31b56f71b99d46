#pragma once
// How long an event loop polls for its next event before it goes to sleep (performance.busy_poll).
//
// Sleeping is not free on a virtual machine: the vCPU halts, and whoever sends the relay the next byte
// pays for an interrupt to wake it (tens of microseconds; HAProxy's "busy-polling" exists for the same
// reason). Polling is not free either, so the window adapts like the kernel's haltpoll governor: it grows
// while the gaps between events are shorter than the maximum (polling would have caught the next one) and
// halves towards nothing when they are longer, so a quiet relay sleeps at once.
#include <algorithm>
#include <chrono>

namespace mailflow {

class PollWindow {
 public:
  using Duration = std::chrono::nanoseconds;
  static constexpr Duration max = std::chrono::microseconds(100);
  static constexpr Duration first = std::chrono::microseconds(5);

  Duration current() const { return window_; }

  // The loop slept after polling for current(); `gap` is the whole idle time until the event came.
  void slept(Duration gap) {
    if (gap < max)
      window_ = std::min(std::max(window_ * 2, first), max);
    else
      window_ = window_ > first ? window_ / 2 : Duration::zero();
  }

 private:
  Duration window_{0};
};

}  // namespace mailflow
