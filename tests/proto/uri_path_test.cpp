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

TEST_CASE("without_dot_segments: RFC 3986 5.2.4, its examples and the paths of the HTTP API") {
  // RFC 3986 5.2.4's two examples.
  CHECK(without_dot_segments("/a/b/c/./../../g") == "/a/g");
  CHECK(without_dot_segments("mid/content=5/../6") == "mid/6");
  CHECK(without_dot_segments("/api/v1/../../metrics") == "/metrics");
  CHECK(without_dot_segments("/./metrics") == "/metrics");
  CHECK(without_dot_segments("/api/./v1/report.csv") == "/api/v1/report.csv");
  CHECK(without_dot_segments("/../metrics") == "/metrics");  // above the root: dropped
  CHECK(without_dot_segments("/../../..") == "/");
  CHECK(without_dot_segments("/healthz/../metrics") == "/metrics");
  CHECK(without_dot_segments("/api/v1/..") == "/api/");
  CHECK(without_dot_segments("/api/v1/.") == "/api/v1/");
  // Not dot segments: kept as they are.
  CHECK(without_dot_segments("/metrics") == "/metrics");
  CHECK(without_dot_segments("/") == "/");
  CHECK(without_dot_segments("") == "");
  CHECK(without_dot_segments("/.metrics/..x/...") == "/.metrics/..x/...");
  CHECK(without_dot_segments("/api%2F..%2Fmetrics") == "/api%2F..%2Fmetrics");
  CHECK(without_dot_segments("//metrics") == "//metrics");
  // As the server applies it, after normalized_path: an escaped dot is a dot.
  CHECK(without_dot_segments(normalized_path("/api/%2E%2E/metrics").value()) == "/metrics");
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
