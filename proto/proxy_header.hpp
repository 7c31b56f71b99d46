#pragma once
// HAProxy PROXY protocol v1 (text) and v2 (binary) headers, as sent by load balancers in front of relays.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mailflow::proto {

struct ProxyHeader {
  int version = 0;     // 1 or 2
  bool local = false;  // v2 LOCAL command or v1 "UNKNOWN": no address information, use the socket's
  std::string source_address;       // textual IPv4 ("192.0.2.1") or IPv6 ("2001:db8::1")
  std::uint16_t source_port = 0;
  std::string destination_address;
  std::uint16_t destination_port = 0;
};

enum class ProxyStatus { incomplete, complete, invalid };

struct ProxyParseResult {
  ProxyStatus status = ProxyStatus::incomplete;
  std::size_t consumed = 0;  // complete only: header length (TLVs included)
  ProxyHeader header;
  std::string error;  // invalid only
};

// Largest header accepted: v1 is at most 107 octets; v2 is limited to 16 + 512 octets (anything longer is
// "oversized" and invalid). Input that cannot become a valid header is invalid at once (not incomplete).
inline constexpr std::size_t max_proxy_header = 16 + 512;

ProxyParseResult parse_proxy_header(std::string_view input);

// True when `input` starts with the v1 ("PROXY ") or v2 signature, or with a prefix of either that is long
// enough to tell (used to refuse headers from untrusted peers).
bool looks_like_proxy_header(std::string_view input);
// True when `input` is too short for looks_like_proxy_header() to tell but is a prefix of either signature:
// the first octets of a header that arrived in a read of their own (a client may split its writes anywhere).
bool may_be_proxy_header(std::string_view input);

}  // namespace mailflow::proto
