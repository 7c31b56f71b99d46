#pragma once
// HTTP request paths and query parameters as the HTTP server matches them (RFC 3986 percent-encoding),
// without I/O: daemon/http_server takes them from the request; the decoding is here, where the fuzz targets
// reach it.
#include <optional>
#include <string>
#include <string_view>

namespace mailflow::proto {

// `in` with every %XX decoded, appended to `out`; false where a '%' does not start % and two hex digits (RFC
// 3986 2.1).
bool percent_decode(std::string_view in, std::string& out);

// The request path as the routes are matched against it (RFC 3986 6.2.2): a percent-encoded unreserved
// character is that character (2.3: /%6Detrics is /metrics, /api/v1/report%2Ecsv is report.csv); any other
// escape stays as written, so that /api%2Fv1%2Freport, whose %2F is data and no separator (2.2), is no path
// of ours (404). nginx decodes %2F too (ngx_http_parse_complex_uri); the RFC's rule is the stricter one, and
// either way no escape reaches a path the plain spelling would not. nullopt for a '%' that is not % and two
// hex digits (2.1) and for %00, which nginx refuses as well: 400.
std::optional<std::string> normalized_path(std::string_view path);

// `path` with its dot segments removed as RFC 3986 5.2.4 (remove_dot_segments) does, the last step of its
// normalization (6.2.2.3): /api/v1/../../metrics and /./metrics are /metrics, as curl sends them and nginx
// matches them; a ".." above the root is dropped (/../metrics is /metrics). Applied after normalized_path, so
// that %2E%2E is a dot segment too and %2F is never a separator.
std::string without_dot_segments(std::string_view path);

}  // namespace mailflow::proto
