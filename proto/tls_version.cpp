#include "proto/tls_version.hpp"

#include <cctype>

namespace mailflow::proto {

std::string_view to_string(TlsVersion version) {
  switch (version) {
    case TlsVersion::none:
      return "none";
    case TlsVersion::tls10:
      return "TLS1.0";
    case TlsVersion::tls11:
      return "TLS1.1";
    case TlsVersion::tls12:
      return "TLS1.2";
    case TlsVersion::tls13:
      return "TLS1.3";
  }
  return "none";
}

namespace {
bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  }
  return true;
}
}  // namespace

// Accepts the label values case-insensitively, and OpenSSL's SSL_get_version() spelling ("TLSv1.2") so the
// daemon can feed that in directly.
std::optional<TlsVersion> parse_tls_version(std::string_view text) {
  struct Name {
    std::string_view label;
    std::string_view openssl;
    TlsVersion version;
  };
  static constexpr Name names[] = {
      {"none", "none", TlsVersion::none},       {"TLS1.0", "TLSv1", TlsVersion::tls10},
      {"TLS1.1", "TLSv1.1", TlsVersion::tls11}, {"TLS1.2", "TLSv1.2", TlsVersion::tls12},
      {"TLS1.3", "TLSv1.3", TlsVersion::tls13},
  };
  for (const auto& name : names) {
    if (iequals(text, name.label) || iequals(text, name.openssl)) return name.version;
  }
  if (iequals(text, "TLSv1.0")) return TlsVersion::tls10;
  return std::nullopt;
}

}  // namespace mailflow::proto
