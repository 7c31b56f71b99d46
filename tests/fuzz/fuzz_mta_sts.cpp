// MTA-STS (RFC 8461) parsing, from what a domain publishes (hostile or broken): the first byte picks the
// parser, the rest is its input.
// - policy file: refused with a reason, or a policy whose reported lines, written back as a file, parse to
// the
//   same policy; LF and CRLF line ends mean the same; every mx pattern matches the host names it names (any
//   case, a trailing dot) and, as "*.rest", exactly one label more.
// - _mta-sts TXT records (NUL-separated): a policy has a 1..32 letter/digit id and means what the canonical
//   record with that id means; the order of the records and records of other kinds do not change the result.
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "proto/ascii.hpp"
#include "proto/mta_sts.hpp"

namespace sts = mailflow::proto::mta_sts;

namespace {

std::string upper(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

void check_policy(std::string_view body) {
  std::string error;
  const auto policy = sts::parse_policy(body, error);
  if (body.find('\r') == std::string_view::npos) {
    std::string crlf;
    for (const char c : body) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
    if (crlf.size() <= sts::max_policy_bytes) {
      std::string crlf_error;
      FUZZ_CHECK(sts::parse_policy(crlf, crlf_error) == policy);
    }
  }
  if (!policy) {
    FUZZ_CHECK(!error.empty());
    return;
  }
  FUZZ_CHECK(error.empty());
  FUZZ_CHECK(policy->max_age <= sts::max_max_age);
  FUZZ_CHECK(policy->mode == sts::Mode::none || !policy->mx.empty());
  std::string written;
  for (const auto& line : policy->lines) written += line + "\n";
  const auto again = sts::parse_policy(written, error);
  FUZZ_CHECK(again.has_value());
  FUZZ_CHECK(*again == *policy);
  for (const auto& pattern : policy->mx) {
    FUZZ_CHECK(pattern == mailflow::proto::ascii_lower(pattern));
    if (pattern.starts_with("*.")) {
      const std::string rest = pattern.substr(2);
      FUZZ_CHECK(sts::mx_matches(pattern, "mx." + rest));
      FUZZ_CHECK(sts::mx_matches(pattern, upper("mx." + rest) + "."));
      FUZZ_CHECK(!sts::mx_matches(pattern, rest));
      FUZZ_CHECK(!sts::mx_matches(pattern, "a.b." + rest));
    } else {
      FUZZ_CHECK(sts::mx_matches(pattern, pattern));
      FUZZ_CHECK(sts::mx_matches(pattern, upper(pattern) + "."));
      FUZZ_CHECK(!sts::mx_matches(pattern, "mx." + pattern));
    }
    FUZZ_CHECK(sts::policy_lists(*policy, pattern.starts_with("*.") ? "mx" + pattern.substr(1) : pattern));
  }
}

void check_txt(std::string_view input) {
  const std::vector<std::string> records = nul_separated_records(input);
  const auto lookup = sts::parse_txt_records(records);
  switch (lookup.status) {
    case sts::TxtLookup::Status::none:
      FUZZ_CHECK(lookup.id.empty());
      break;
    case sts::TxtLookup::Status::invalid:
      FUZZ_CHECK(!lookup.error.empty());
      break;
    case sts::TxtLookup::Status::policy: {
      FUZZ_CHECK(lookup.error.empty());
      FUZZ_CHECK(!lookup.id.empty() && lookup.id.size() <= 32);
      FUZZ_CHECK(std::all_of(lookup.id.begin(), lookup.id.end(),
                             [](char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; }));
      const auto canonical = sts::parse_txt_records({"v=STSv1; id=" + lookup.id + ";"});
      FUZZ_CHECK(canonical.status == sts::TxtLookup::Status::policy && canonical.id == lookup.id);
      break;
    }
  }
  auto reordered = records;
  std::reverse(reordered.begin(), reordered.end());
  reordered.push_back("v=spf1 -all");
  const auto again = sts::parse_txt_records(reordered);
  FUZZ_CHECK(again.status == lookup.status);
  FUZZ_CHECK(again.id == lookup.id);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0)
    check_policy(input);
  else
    check_txt(input);
  return 0;
}
