#pragma once
// Splits the command stream into lines (RFC 5321 §4.5.3.1.4: 512 octets including CRLF).
#include <cstddef>
#include <string_view>

namespace mailflow::proto {

class CommandFramer {
 public:
  enum class Kind {
    need_more,    // no complete line yet (consumed may be > 0 while the tail of an over-long line is discarded)
    line,         // `line` holds a command, CRLF removed
    too_long,     // a line longer than the limit: reported once, the rest of it is discarded up to its LF
    bad_newline,  // a CRLF line that contains a bare CR: reported once for the whole line
    bare_lf,      // a line that ends in a bare LF: where the client thinks the line ends is unknowable (it may
                  // go on to the next CRLF), so the session answers once and closes (Postfix's
                  // smtpd_forbid_bare_newline): its tail never gets a reply of its own
    too_long_bare_lf,  // the over-long line reported as too_long ended in a bare LF: the same, except that the
                       // line has had its one reply already, so the session closes without another
  };
  struct Event {
    Kind kind = Kind::need_more;
    std::string_view line;     // Kind::line only; points into the caller's input
    std::size_t consumed = 0;  // bytes of input the caller must drop before the next call
  };

  explicit CommandFramer(std::size_t max_line = 512) : max_line_(max_line) {}

  // Looks at the unread input; returns one event. Call again after dropping `consumed` bytes.
  Event next(std::string_view input);

  // True while the tail of an over-long line is being discarded.
  bool discarding() const { return discarding_; }

 private:
  std::size_t max_line_;
  bool discarding_ = false;
  bool discarded_cr_ = false;  // the last byte discarded was a CR (the LF that ends the line may follow it)
};

}  // namespace mailflow::proto
