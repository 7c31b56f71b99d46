#include "proto/tls_version.hpp"

#include <doctest/doctest.h>

using namespace mailflow::proto;

TEST_CASE("tls_version: label values round-trip") {
  CHECK(to_string(TlsVersion::none) == "none");
  CHECK(to_string(TlsVersion::tls10) == "TLS1.0");
  CHECK(to_string(TlsVersion::tls11) == "TLS1.1");
  CHECK(to_string(TlsVersion::tls12) == "TLS1.2");
  CHECK(to_string(TlsVersion::tls13) == "TLS1.3");
  for (TlsVersion v : all_tls_versions) {
    REQUIRE(parse_tls_version(to_string(v)).has_value());
    CHECK(*parse_tls_version(to_string(v)) == v);
  }
}

TEST_CASE("tls_version: OpenSSL spellings and case are accepted, junk is not") {
  CHECK(parse_tls_version("TLSv1") == TlsVersion::tls10);
  CHECK(parse_tls_version("TLSv1.0") == TlsVersion::tls10);
  CHECK(parse_tls_version("TLSv1.2") == TlsVersion::tls12);
  CHECK(parse_tls_version("TLSv1.3") == TlsVersion::tls13);
  CHECK(parse_tls_version("tls1.1") == TlsVersion::tls11);
  CHECK_FALSE(parse_tls_version("").has_value());
  CHECK_FALSE(parse_tls_version("SSLv3").has_value());
  CHECK_FALSE(parse_tls_version("TLS1.4").has_value());
  CHECK_FALSE(parse_tls_version("TLS1.2 ").has_value());
}
