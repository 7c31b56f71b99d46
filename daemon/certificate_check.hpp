#pragma once
// Every certificate and key of a configuration, loaded the way the daemon loads them (ServerTls): what
// `--check-config` reports (ExecReload relies on it). Start and reload log the same warnings and set
// mailflow_certificate_expiry_timestamp_seconds from what they loaded (served_certificates).
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "daemon/telemetry.hpp"  // CertificateExpiry
#include "daemon/tls.hpp"        // CertificateInfo

namespace mailflow {

struct Runtime;

// Certificates that expire sooner than this are a warning.
inline constexpr std::chrono::hours certificate_warning_period{24 * 14};

struct CertificateFindings {
  std::vector<config::ConfigError> errors;    // a certificate or key that cannot be loaded, a key of another cert
  std::vector<config::ConfigError> warnings;  // expired, or expiring within certificate_warning_period
  std::vector<CertificateExpiry> expiries;    // of every certificate that loaded
};

// Loads each {cert, key} pair of every listener and of http.tls (as the HTTP server does) on its own, so that
// every problem is reported, the ca_file of every upstream with tls: verify, the Web PKI trust store
// (mta_sts.ca_file) where an upstream has mta_sts on, tlsrpt.ca_file while tlsrpt.send is true, and the dns
// settings as a resolver takes them (positions from config.positions).
CertificateFindings check_certificates(const config::Config& config, std::chrono::system_clock::time_point now);

// The certificates that `runtime`'s listeners serve and `http`, http.tls's as the HTTP server loaded it:
// their notAfter and the warnings check_certificates gives for them, at the same file:line:col. Reads no
// file: a file replaced after the start or reload read it (a renewal while a reload runs) is not what is
// served, and the gauge and the warnings are of what is served. No errors: what did not load is not served.
CertificateFindings served_certificates(const Runtime& runtime, const std::optional<CertificateInfo>& http,
                                        std::chrono::system_clock::time_point now);

}  // namespace mailflow
