#pragma once
// The bench message, shared by the load generator and the proto driver so that both measure the same bytes.
#include <cstddef>
#include <string>

namespace mailflow::bench {

// A message of exactly `size` octets of content (headers, body, CRLFs), then the terminator.
inline std::string make_message(std::size_t size) {
  std::string m =
      "From: bench@bench.example\r\nTo: sink@sink.example\r\nSubject: mailflowd bench\r\n"
      "Message-ID: <bench@bench.example>\r\n\r\n";
  const std::string line(76, 'x');
  while (m.size() + line.size() + 2 <= size) m += line + "\r\n";
  if (m.size() + 2 < size) m += std::string(size - m.size() - 2, 'y') + "\r\n";
  m += ".\r\n";
  return m;
}

}  // namespace mailflow::bench
