#include "proto/proxy_header.hpp"

#include <arpa/inet.h>  // inet_pton/inet_ntop: pure conversions, no I/O

#include <array>
#include <cstring>

namespace mailflow::proto {

namespace {

constexpr std::string_view v1_prefix = "PROXY ";
constexpr std::size_t v1_max = 107;  // including CRLF
constexpr std::array<unsigned char, 12> v2_signature = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                                        0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
constexpr std::size_t v2_fixed = 16;
constexpr std::size_t v2_max_body = max_proxy_header - v2_fixed;

ProxyParseResult invalid(std::string error) {
  ProxyParseResult r;
  r.status = ProxyStatus::invalid;
  r.error = std::move(error);
  return r;
}

bool is_prefix_of(std::string_view input, std::string_view whole) {
  const std::size_t n = input.size() < whole.size() ? input.size() : whole.size();
  return input.substr(0, n) == whole.substr(0, n);
}

std::string_view signature_view() {
  return {reinterpret_cast<const char*>(v2_signature.data()), v2_signature.size()};
}

bool parse_port(std::string_view s, std::uint16_t& port) {
  if (s.empty() || s.size() > 5) return false;
  if (s.size() > 1 && s[0] == '0') return false;  // the spec forbids leading zeros
  unsigned value = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value > 65535) return false;
  port = static_cast<std::uint16_t>(value);
  return true;
}

// Strict textual address -> canonical textual form (so "::FFFF:1.2.3.4" and friends come out one way).
bool canonical_address(std::string_view text, int family, std::string& out) {
  if (text.empty() || text.size() > 45) return false;
  // inet_pton stops at a NUL: "2001:db8::2\0\0junk" must not pass as "2001:db8::2".
  for (char c : text) {
    const bool ok =
        (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == '.' || c == ':';
    if (!ok) return false;
  }
  char buf[64];
  std::memcpy(buf, text.data(), text.size());
  buf[text.size()] = '\0';
  unsigned char bin[16];
  if (inet_pton(family, buf, bin) != 1) return false;
  char str[INET6_ADDRSTRLEN];
  if (inet_ntop(family, bin, str, sizeof str) == nullptr) return false;
  out = str;
  return true;
}

std::string binary_address(const unsigned char* bytes, int family) {
  char str[INET6_ADDRSTRLEN];
  if (inet_ntop(family, bytes, str, sizeof str) == nullptr) return {};
  return str;
}

// Can this incomplete v1 line (no LF yet) still become a valid header?
bool v1_viable_prefix(std::string_view line) {
  std::string_view rest = line.substr(v1_prefix.size());
  if (!rest.empty() && rest.back() == '\r') rest.remove_suffix(1);  // the CR of the coming CRLF
  const std::size_t sp = rest.find(' ');
  const std::string_view proto = rest.substr(0, sp);
  const bool proto_done = sp != std::string_view::npos;
  for (std::string_view known : {"TCP4", "TCP6", "UNKNOWN"}) {
    if (proto_done ? proto == known : is_prefix_of(proto, known) && proto.size() <= known.size()) {
      if (known == "UNKNOWN") return true;  // anything may follow UNKNOWN up to CRLF
      // TCP4/TCP6: "src dst sport dport" in hex digits, '.', ':' and single spaces; a CR only at the very
      // end.
      int spaces = 0;
      for (std::size_t i = 0; i < line.size(); ++i) {
        const char c = line[i];
        if (c == '\r') {
          if (i + 1 != line.size()) return false;
          continue;
        }
        if (i < v1_prefix.size()) continue;
        if (c == ' ') {
          if (++spaces > 5) return false;
          continue;
        }
        const bool ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
                        c == '.' || c == ':' || (i < v1_prefix.size() + 4);
        if (!ok) return false;
      }
      return true;
    }
  }
  return false;
}

ProxyParseResult parse_v1(std::string_view input) {
  const std::size_t window = input.size() < v1_max ? input.size() : v1_max;
  const void* lf_ptr = std::memchr(input.data(), '\n', window);
  if (lf_ptr == nullptr) {
    if (input.size() >= v1_max) return invalid("PROXY v1 header too long");
    if (!v1_viable_prefix(input)) return invalid("malformed PROXY v1 header");
    return {};
  }
  const auto lf = static_cast<std::size_t>(static_cast<const char*>(lf_ptr) - input.data());
  if (lf == 0 || input[lf - 1] != '\r') return invalid("PROXY v1 header not terminated by CRLF");
  const std::string_view line = input.substr(0, lf - 1);
  ProxyParseResult r;
  r.header.version = 1;
  r.consumed = lf + 1;
  std::string_view rest = line.substr(v1_prefix.size());
  if (rest == "UNKNOWN" || rest.substr(0, 8) == "UNKNOWN ") {
    r.status = ProxyStatus::complete;
    r.header.local = true;
    return r;
  }
  std::string_view fields[5];
  for (std::size_t i = 0; i < 5; ++i) {
    const std::size_t sp = rest.find(' ');
    if ((i < 4) == (sp == std::string_view::npos)) return invalid("malformed PROXY v1 header");
    fields[i] = rest.substr(0, sp);
    rest = i < 4 ? rest.substr(sp + 1) : std::string_view{};
  }
  int family = 0;
  if (fields[0] == "TCP4") {
    family = AF_INET;
  } else if (fields[0] == "TCP6") {
    family = AF_INET6;
  } else {
    return invalid("unknown PROXY v1 protocol");
  }
  if (!canonical_address(fields[1], family, r.header.source_address) ||
      !canonical_address(fields[2], family, r.header.destination_address)) {
    return invalid("bad address in PROXY v1 header");
  }
  if (!parse_port(fields[3], r.header.source_port) || !parse_port(fields[4], r.header.destination_port)) {
    return invalid("bad port in PROXY v1 header");
  }
  r.status = ProxyStatus::complete;
  return r;
}

ProxyParseResult parse_v2(std::string_view input) {
  if (input.size() < v2_fixed) {
    // Validate what is there: version/command and family bytes can be rejected before the rest arrives.
    if (input.size() > 12 && (static_cast<unsigned char>(input[12]) & 0xF0) != 0x20) {
      return invalid("unsupported PROXY v2 version");
    }
    return {};
  }
  const auto* b = reinterpret_cast<const unsigned char*>(input.data());
  const unsigned version = b[12] >> 4;
  const unsigned command = b[12] & 0x0F;
  const unsigned family = b[13] >> 4;
  const unsigned transport = b[13] & 0x0F;
  const std::size_t length = (static_cast<std::size_t>(b[14]) << 8) | b[15];
  if (version != 2) return invalid("unsupported PROXY v2 version");
  if (command > 1) return invalid("unsupported PROXY v2 command");
  if (length > v2_max_body) return invalid("PROXY v2 header oversized");
  if (family > 3 || transport > 2) return invalid("unsupported PROXY v2 address family");
  if (input.size() < v2_fixed + length) return {};

  ProxyParseResult r;
  r.header.version = 2;
  r.consumed = v2_fixed + length;
  const unsigned char* body = b + v2_fixed;
  std::size_t addr_len = 0;
  if (command == 0 || family == 0 || family == 3) {
    // LOCAL (health checks), AF_UNSPEC and AF_UNIX carry no usable client address: use the socket's.
    r.header.local = true;
    if (command == 1 && family == 3) {
      addr_len = 216;
      if (length < addr_len) return invalid("PROXY v2 address block truncated");
    }
  } else {
    if (transport == 2) return invalid("PROXY v2 datagram transport is not SMTP");
    if (family == 1) {
      addr_len = 12;
      if (length < addr_len) return invalid("PROXY v2 address block truncated");
      r.header.source_address = binary_address(body, AF_INET);
      r.header.destination_address = binary_address(body + 4, AF_INET);
      r.header.source_port = static_cast<std::uint16_t>((body[8] << 8) | body[9]);
      r.header.destination_port = static_cast<std::uint16_t>((body[10] << 8) | body[11]);
    } else {
      addr_len = 36;
      if (length < addr_len) return invalid("PROXY v2 address block truncated");
      r.header.source_address = binary_address(body, AF_INET6);
      r.header.destination_address = binary_address(body + 16, AF_INET6);
      r.header.source_port = static_cast<std::uint16_t>((body[32] << 8) | body[33]);
      r.header.destination_port = static_cast<std::uint16_t>((body[34] << 8) | body[35]);
    }
  }
  // TLVs (ALPN, authority, SSL info, ...) are skipped, but their framing must hold together.
  if (command == 1) {
    std::size_t pos = addr_len;
    while (pos < length) {
      if (length - pos < 3) return invalid("PROXY v2 TLV truncated");
      const std::size_t tlv_len = (static_cast<std::size_t>(body[pos + 1]) << 8) | body[pos + 2];
      if (length - pos - 3 < tlv_len) return invalid("PROXY v2 TLV truncated");
      pos += 3 + tlv_len;
    }
  }
  r.status = ProxyStatus::complete;
  return r;
}

}  // namespace

ProxyParseResult parse_proxy_header(std::string_view input) {
  if (input.empty()) return {};
  if (input.front() == 'P') {
    if (!is_prefix_of(input, v1_prefix)) return invalid("not a PROXY header");
    if (input.size() < v1_prefix.size()) return {};
    return parse_v1(input);
  }
  if (!is_prefix_of(input, signature_view())) return invalid("not a PROXY header");
  return parse_v2(input);
}

namespace {
// Five octets tell: "PROXY" is no SMTP verb, and "\r\n\r\n\0" is no SMTP client's first line.
constexpr std::size_t proxy_header_telling = 5;
}  // namespace

bool looks_like_proxy_header(std::string_view input) {
  if (input.size() < proxy_header_telling) return false;
  return is_prefix_of(input, v1_prefix) || is_prefix_of(input, signature_view());
}

bool may_be_proxy_header(std::string_view input) {
  if (input.empty() || input.size() >= proxy_header_telling) return false;
  return is_prefix_of(input, v1_prefix) || is_prefix_of(input, signature_view());
}

}  // namespace mailflow::proto
