// JSON string text (RFC 8259 §7): whatever the bytes, the result is a valid JSON string body.
#include <doctest/doctest.h>

#include <string>

#include "proto/json.hpp"

namespace {

using mailflow::proto::json_escape;

TEST_CASE("json_escape: quotes, backslashes and control characters") {
  CHECK(json_escape("a\"b\\c\n\x01") == "a\\\"b\\\\c\\n\\u0001");
  CHECK(json_escape("\r\t\b\f\x1f\x7f") == "\\r\\t\\b\\f\\u001f\\u007f");
  CHECK(json_escape(std::string("nul\0here", 8)) == "nul\\u0000here");
  CHECK(json_escape("") == "");
}

TEST_CASE("json_escape: well-formed UTF-8 passes unchanged, anything else becomes U+FFFD") {
  CHECK(json_escape("Soci\xc3\xa9t\xc3\xa9") == "Soci\xc3\xa9t\xc3\xa9");                  // 2 bytes
  CHECK(json_escape("\xe2\x82\xac \xf0\x9f\x93\xa7") == "\xe2\x82\xac \xf0\x9f\x93\xa7");  // 3 and 4 bytes
  CHECK(json_escape("\xc3") == "\\ufffd");                    // truncated at the end
  CHECK(json_escape("\xc3(") == "\\ufffd(");                  // a lead byte without its continuation
  CHECK(json_escape("\x80") == "\\ufffd");                    // a lone continuation byte
  CHECK(json_escape("\xc0\xaf") == "\\ufffd\\ufffd");         // overlong '/'
  CHECK(json_escape("\xe0\x80\xaf") == "\\ufffd\\ufffd\\ufffd");  // overlong, 3 bytes
  CHECK(json_escape("\xed\xa0\x80") == "\\ufffd\\ufffd\\ufffd");  // a UTF-16 surrogate
  CHECK(json_escape("\xf4\x90\x80\x80") == "\\ufffd\\ufffd\\ufffd\\ufffd");  // above U+10FFFF
  CHECK(json_escape("\xff\xfe") == "\\ufffd\\ufffd");
}

}  // namespace
