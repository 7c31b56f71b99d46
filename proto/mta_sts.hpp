#pragma once
// MTA-STS (RFC 8461), the pure parts: the _mta-sts TXT record (section 3.1), the policy file (section 3.2) and
// MX host matching (section 4.1). No I/O; daemon/mta_sts.hpp fetches, caches and applies policies.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto::mta_sts {

// RFC 8461 3.2: a policy's max_age is at most 31557600 seconds (about a year); a larger one is taken as this.
inline constexpr std::uint32_t max_max_age = 31557600;
// RFC 8461 3.3: senders may bound the policy file; 64 KiB is what the RFC suggests.
inline constexpr std::size_t max_policy_bytes = 64 * 1024;

// What the TXT records at _mta-sts.<domain> say.
struct TxtLookup {
  enum class Status {
    none,     // no record starts with "v=STSv1" (the domain has no MTA-STS)
    policy,   // exactly one: `id` is the policy's version
    invalid,  // more than one, or the one is not valid per section 3.1 (treated as none, reported as invalid)
  };
  Status status = Status::none;
  std::string id;     // 1..32 letters and digits
  std::string error;  // invalid: why
};

// Section 3.1: records that do not begin with "v=STSv1;" are discarded; the rest must be exactly one record
// that is syntactically valid (sts-text-record: v=STSv1 first, id=1*32(ALPHA/DIGIT), extensions
// name=value; an id given again is ignored, as section 3.2 has it).
TxtLookup parse_txt_records(const std::vector<std::string>& records);

enum class Mode { enforce, testing, none };
std::string_view to_string(Mode mode);  // "enforce", "testing", "none"

struct Policy {
  Mode mode = Mode::none;
  std::vector<std::string> mx;  // lower-case patterns: "mx1.example.net" or "*.example.net"
  std::uint32_t max_age = 0;    // seconds, 0..max_max_age
  // The policy as TLS-RPT reports it (RFC 8460 4.3 policy-string): its fields in file order, one per line,
  // "key: value", unknown fields left out.
  std::vector<std::string> lines;

  bool operator==(const Policy&) const = default;
};

// Section 3.2: "key: value" lines separated by LF or CRLF; version STSv1, mode and max_age required, mx at
// least once unless mode is none; unknown keys ignored; a version, mode or max_age given again is ignored
// (the first counts); an invalid value of a known key, a line that is not key: value, a control byte or a
// body over max_policy_bytes make the whole policy invalid (nullopt, `error` says why). An extension's value
// may be UTF-8.
std::optional<Policy> parse_policy(std::string_view body, std::string& error);

// Section 4.1: `host` (an MX host name, any case, trailing dot allowed) matches `pattern` when equal, or when
// the pattern is "*.rest" and host is exactly one label followed by ".rest".
bool mx_matches(std::string_view pattern, std::string_view host);
// True when some mx pattern of the policy matches `host`.
bool policy_lists(const Policy& policy, std::string_view host);

}  // namespace mailflow::proto::mta_sts
