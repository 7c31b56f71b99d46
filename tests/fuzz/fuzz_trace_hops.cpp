// The Received: counter (limits.max_hops): however the message's bytes are cut into reads, it counts the
// header lines that begin with "Received:" (any case) before the first empty line, as a plain line-by-line
// count over the whole message does, and says whether that empty line has come.
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/trace_hops.hpp"

namespace {

struct Count {
  std::size_t hops = 0;
  bool done = false;
};

Count reference(std::string_view wire) {
  Count count;
  while (true) {
    if (wire.empty()) return count;
    const auto lf = wire.find('\n');
    // An unfinished line counts as soon as it shows its "Received:" (it can only end as a header line).
    const auto line = wire.substr(0, lf);
    wire.remove_prefix(lf == std::string_view::npos ? wire.size() : lf + 1);
    if (lf != std::string_view::npos && (line.empty() || line == "\r")) {
      count.done = true;
      return count;
    }
    constexpr std::string_view received = "received:";
    if (line.size() >= received.size() &&
        std::equal(received.begin(), received.end(), line.begin(),
                   [](char r, char c) { return r == std::tolower(static_cast<unsigned char>(c)); }))
      ++count.hops;
  }
}

Count fed(std::string_view wire, std::size_t chunk) {
  mailflow::proto::TraceHopCounter counter;
  while (!wire.empty()) {
    const auto n = std::min(chunk, wire.size());
    counter.feed(wire.substr(0, n));
    wire.remove_prefix(n);
  }
  return {counter.hops(), counter.headers_done()};
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view wire(reinterpret_cast<const char*>(data) + 1, size - 1);
  const Count expected = reference(wire);
  for (const std::size_t chunk : {wire.size() + 1, std::size_t{1}, std::size_t{1} + data[0] % 13}) {
    const Count got = fed(wire, chunk);
    FUZZ_CHECK(got.hops == expected.hops);
    FUZZ_CHECK(got.done == expected.done);
  }
  return 0;
}
