// PROXY v1/v2: never crashes; a complete header is never longer than allowed, every prefix of it is
// incomplete, and trailing bytes do not change it.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/proxy_header.hpp"

using namespace mailflow::proto;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const ProxyParseResult r = parse_proxy_header(input);
  if (r.status == ProxyStatus::complete) {
    FUZZ_CHECK(r.consumed > 0 && r.consumed <= size && r.consumed <= max_proxy_header);
    FUZZ_CHECK(r.header.version == 1 || r.header.version == 2);
    FUZZ_CHECK(looks_like_proxy_header(input));
    if (!r.header.local) {
      FUZZ_CHECK(!r.header.source_address.empty() && !r.header.destination_address.empty());
    }
    for (std::size_t i = 0; i < r.consumed; ++i) {
      FUZZ_CHECK(parse_proxy_header(input.substr(0, i)).status == ProxyStatus::incomplete);
    }
    const ProxyParseResult exact = parse_proxy_header(input.substr(0, r.consumed));
    FUZZ_CHECK(exact.status == ProxyStatus::complete && exact.consumed == r.consumed);
    FUZZ_CHECK(exact.header.source_address == r.header.source_address);
    FUZZ_CHECK(exact.header.source_port == r.header.source_port);
  } else if (r.status == ProxyStatus::invalid) {
    FUZZ_CHECK(!r.error.empty());
  } else {
    FUZZ_CHECK(size < max_proxy_header);
  }
  return 0;
}
