#include "proto/trace_hops.hpp"

#include <cctype>

namespace mailflow::proto {

namespace {
constexpr std::string_view kReceived = "received:";

bool is_received(std::string_view start) {
  if (start.size() < kReceived.size()) return false;
  for (std::size_t i = 0; i < kReceived.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(start[i])) != kReceived[i]) return false;
  }
  return true;
}
}  // namespace

void TraceHopCounter::feed(std::string_view wire) {
  for (std::size_t i = 0; i < wire.size() && !done_; ++i) {
    const char c = wire[i];
    if (c == '\n') {
      // "\r\n" alone (or a line that was just "\r") ends the header section.
      if (line_start_ == "\r" || line_start_.empty()) done_ = true;
      line_start_.clear();
      at_line_start_ = true;
      continue;
    }
    if (at_line_start_ && line_start_.size() < kReceived.size()) {
      line_start_.push_back(c);
      if (line_start_.size() == kReceived.size()) {
        if (is_received(line_start_)) ++hops_;
        at_line_start_ = false;  // the rest of the line does not matter
      }
    }
  }
}

}  // namespace mailflow::proto
