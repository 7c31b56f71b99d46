// HTTP request paths and query parameters percent-decoded (proto/uri_path.hpp).
#include "proto/uri_path.hpp"

#include <doctest/doctest.h>

#include <string>

namespace {

using namespace mailflow::proto;

TEST_CASE(
    "normalized_path: unreserved escapes decoded, others kept as written, bad escapes and %00 refused") {
  CHECK(normalized_path("/%6Detrics") == "/metrics");
  CHECK(normalized_path("/api/v1/report%2Ecsv") == "/api/v1/report.csv");
  CHECK(normalized_path("/api%2Fv1%2freport") == "/api%2Fv1%2freport");
  CHECK(normalized_path("/a%7E%41%3F%23") == "/a~A%3F%23");
  CHECK(normalized_path("") == "");
  CHECK_FALSE(normalized_path("/%00").has_value());
  CHECK_FALSE(normalized_path("/%4").has_value());
  CHECK_FALSE(normalized_path("/%").has_value());
  CHECK_FALSE(normalized_path("/%G1").has_value());
}

TEST_CASE("percent_decode: every escape decoded and appended, a bad one refused") {
  std::string out = "x";
  CHECK(percent_decode("d%61ys=%2F%00+", out));
  CHECK(out == std::string("xdays=/\0+", 9));
  out.clear();
  CHECK_FALSE(percent_decode("a%2", out));
  out.clear();
  CHECK_FALSE(percent_decode("%zz", out));
}

}  // namespace
