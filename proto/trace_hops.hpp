#pragma once
// Counts the Received: trace fields (RFC 5321 4.4) in a message's header section, as the message streams by,
// for the mail-loop limit (limits.max_hops, like Postfix's hopcount_limit). Pure: fed the wire-form bytes
// (CRLF lines, dot-stuffed) after the DATA filter; costs nothing once the header section has ended.
#include <cstddef>
#include <string>
#include <string_view>

namespace mailflow::proto {

class TraceHopCounter {
 public:
  void feed(std::string_view wire);
  std::size_t hops() const { return hops_; }
  bool headers_done() const { return done_; }

 private:
  std::string line_start_;  // the first bytes of the current line (enough to recognize "Received:")
  bool at_line_start_ = true;
  bool done_ = false;
  std::size_t hops_ = 0;
};

}  // namespace mailflow::proto
