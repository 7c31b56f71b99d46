#pragma once
// The TLS version a connection leg was protected with; the unit every metric is split by.
#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace mailflow::proto {

enum class TlsVersion : std::uint8_t { none, tls10, tls11, tls12, tls13 };

inline constexpr std::array<TlsVersion, 5> all_tls_versions{TlsVersion::none, TlsVersion::tls10, TlsVersion::tls11,
                                                            TlsVersion::tls12, TlsVersion::tls13};

// "none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3" (the metric label values).
std::string_view to_string(TlsVersion version);
std::optional<TlsVersion> parse_tls_version(std::string_view text);

}  // namespace mailflow::proto
