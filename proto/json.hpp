#pragma once
// JSON string text (RFC 8259 §7), for every JSON mailflowd writes: the report, the log, TLS-RPT.
#include <string>
#include <string_view>

namespace mailflow::proto {

// `text` as the inside of a JSON string (without the quotes): '"' and '\' escaped, control characters and DEL as
// \n, \r, \t, \b, \f or \u00XX; well-formed UTF-8 passes unchanged, any other byte becomes U+FFFD (\ufffd), so
// the result is valid JSON whatever the bytes (a peer's, a DNS name's).
std::string json_escape(std::string_view text);

}  // namespace mailflow::proto
