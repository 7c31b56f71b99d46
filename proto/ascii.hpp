#pragma once
// ASCII case folding for what mail compares without case: domain and host names, policy keys, URI schemes.
#include <string>
#include <string_view>

namespace mailflow::proto {

// `text` with A-Z as a-z (other bytes unchanged).
std::string ascii_lower(std::string_view text);
// A DNS name as mailflowd compares names: lower-case, without the trailing dot ("MX1.Example.NET." ->
// "mx1.example.net").
std::string dns_name_key(std::string_view name);

// ABNF's ALPHA / DIGIT (whatever the locale).
constexpr bool is_alnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}
// ABNF's WSP: space or horizontal tab.
constexpr bool is_wsp(char c) { return c == ' ' || c == '\t'; }
// `text` without WSP at either end.
std::string_view trim_wsp(std::string_view text);

}  // namespace mailflow::proto
