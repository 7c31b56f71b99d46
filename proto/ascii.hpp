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

}  // namespace mailflow::proto
