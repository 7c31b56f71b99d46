#include "proto/mta_sts.hpp"
#include "proto/ascii.hpp"

#include <algorithm>
#include <charconv>
#include <utility>

namespace mailflow::proto::mta_sts {
namespace {

// sts-ext-name / sts-policy-ext-name: (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
bool valid_ext_name(std::string_view name) {
  if (name.empty() || name.size() > 32 || !is_alnum(name[0])) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return is_alnum(c) || c == '_' || c == '-' || c == '.'; });
}

// RFC 5321 Domain: sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str]; at most 253 octets.
bool valid_domain(std::string_view domain) {
  if (domain.empty() || domain.size() > 253) return false;
  std::size_t start = 0;
  while (true) {
    const auto dot = domain.find('.', start);
    const auto label = domain.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (label.empty() || label.size() > 63 || !is_alnum(label.front()) || !is_alnum(label.back())) return false;
    if (!std::all_of(label.begin(), label.end(), [](char c) { return is_alnum(c) || c == '-'; })) return false;
    if (dot == std::string_view::npos) return true;
    start = dot + 1;
  }
}

// One record that begins with "v=STSv1": the rest of section 3.1's grammar.
TxtLookup parse_one_txt(std::string_view record) {
  TxtLookup out;
  out.status = TxtLookup::Status::invalid;
  constexpr std::string_view version = "v=STSv1";
  std::string_view rest = record.substr(version.size());
  bool have_id = false;
  // 1*(*WSP ";" *WSP sts-field) [";"]
  while (!rest.empty()) {
    rest = trim_wsp(rest);  // *WSP before ";" (trailing WSP after the last field is tolerated, as resolvers do)
    if (rest.empty()) break;
    if (rest.front() != ';') {
      out.error = "expected ';' in the _mta-sts record";
      return out;
    }
    rest.remove_prefix(1);
    while (!rest.empty() && is_wsp(rest.front())) rest.remove_prefix(1);
    if (rest.empty()) break;  // the optional final ";"
    std::size_t end = 0;
    while (end < rest.size() && rest[end] != ';' && !is_wsp(rest[end])) ++end;
    const std::string_view field = rest.substr(0, end);
    rest.remove_prefix(end);
    const auto eq = field.find('=');
    if (eq == std::string_view::npos) {
      out.error = "field without '=' in the _mta-sts record";
      return out;
    }
    const auto name = field.substr(0, eq);
    const auto value = field.substr(eq + 1);
    if (name == "id") {
      if (have_id) continue;  // RFC 8461 3.2: of a field given again, all but the first are ignored
      if (value.empty() || value.size() > 32 || !std::all_of(value.begin(), value.end(), is_alnum)) {
        out.error = "id must be 1 to 32 letters and digits";
        return out;
      }
      have_id = true;
      out.id = std::string(value);
      continue;
    }
    // sts-extension: an unknown field is ignored, but it must be well formed.
    const bool value_ok = !value.empty() && std::all_of(value.begin(), value.end(), [](char c) {
      const auto u = static_cast<unsigned char>(c);
      return u >= 0x21 && u <= 0x7e && c != '=' && c != ';';
    });
    if (!valid_ext_name(name) || !value_ok) {
      out.error = "malformed field in the _mta-sts record";
      return out;
    }
  }
  if (!have_id) {
    out.error = "no id in the _mta-sts record";
    return out;
  }
  out.status = TxtLookup::Status::policy;
  out.error.clear();
  return out;
}

}  // namespace

std::string_view to_string(Mode mode) {
  switch (mode) {
    case Mode::enforce:
      return "enforce";
    case Mode::testing:
      return "testing";
    case Mode::none:
      return "none";
  }
  return "none";
}

TxtLookup parse_txt_records(const std::vector<std::string>& records) {
  const std::string_view version = "v=STSv1";
  const std::string* found = nullptr;
  std::size_t count = 0;
  for (const auto& record : records) {
    // "begin with v=STSv1;": the version, then *WSP ";" (or the end: a record that is only the version is then
    // found invalid for its missing id, not discarded).
    if (!std::string_view(record).starts_with(version)) continue;
    const auto after = trim_wsp(std::string_view(record).substr(version.size()));
    if (!after.empty() && after.front() != ';') continue;
    ++count;
    found = &record;
  }
  if (count == 0) return {};
  if (count > 1) {
    return TxtLookup{TxtLookup::Status::invalid, "", std::to_string(count) + " v=STSv1 records (exactly one allowed)"};
  }
  return parse_one_txt(*found);
}

std::optional<Policy> parse_policy(std::string_view body, std::string& error) {
  error.clear();
  if (body.size() > max_policy_bytes) {
    error = "policy larger than " + std::to_string(max_policy_bytes) + " bytes";
    return std::nullopt;
  }
  Policy policy;
  bool have_version = false;
  bool have_mode = false;
  bool have_max_age = false;
  std::size_t line_number = 0;
  while (!body.empty()) {
    const auto lf = body.find('\n');
    std::string_view line = body.substr(0, lf);
    body.remove_prefix(lf == std::string_view::npos ? body.size() : lf + 1);
    ++line_number;
    if (line.ends_with('\r')) line.remove_suffix(1);
    const auto where = " (line " + std::to_string(line_number) + ")";
    if (line.empty()) {
      // A final line terminator is allowed; an empty line in between is not a key/value pair.
      if (body.empty()) break;
      error = "empty line" + where;
      return std::nullopt;
    }
    // No control bytes. Bytes over 0x7e are allowed: an extension's value may be UTF-8 (sts-policy-vchar);
    // the known keys' own checks refuse them in their values.
    for (const char c : line) {
      const auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && c != '\t') || u == 0x7f) {
        error = "a control byte" + where;
        return std::nullopt;
      }
    }
    const auto colon = line.find(':');
    if (colon == std::string_view::npos) {
      error = "not a \"key: value\" line" + where;
      return std::nullopt;
    }
    const auto key = line.substr(0, colon);
    const auto value = trim_wsp(line.substr(colon + 1));
    if (!valid_ext_name(key)) {
      error = "malformed key" + where;
      return std::nullopt;
    }
    // RFC 8461 3.2: of a field other than mx given again, all but the first are ignored (not policy strings).
    const auto again = [](bool& seen) { return std::exchange(seen, true); };
    if (key == "version") {
      if (again(have_version)) continue;
      if (value != "STSv1") {
        error = "version must be STSv1" + where;
        return std::nullopt;
      }
    } else if (key == "mode") {
      if (again(have_mode)) continue;
      if (value == "enforce") policy.mode = Mode::enforce;
      else if (value == "testing") policy.mode = Mode::testing;
      else if (value == "none") policy.mode = Mode::none;
      else {
        error = "mode must be enforce, testing or none" + where;
        return std::nullopt;
      }
    } else if (key == "max_age") {
      if (again(have_max_age)) continue;
      std::uint64_t seconds = 0;
      const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), seconds);
      if (value.empty() || value.size() > 10 || ec != std::errc() || ptr != value.data() + value.size()) {
        error = "max_age must be 1 to 10 digits (seconds)" + where;
        return std::nullopt;
      }
      // RFC 8461 3.2: "max value is 31557600". A larger one is taken as the longest (as mox and
      // postfix-mta-sts-resolver take it): refusing the policy would leave the domain unprotected.
      policy.max_age = static_cast<std::uint32_t>(std::min<std::uint64_t>(seconds, max_max_age));
    } else if (key == "mx") {
      const std::string pattern = ascii_lower(value);
      const std::string_view domain = std::string_view(pattern).starts_with("*.")
                                          ? std::string_view(pattern).substr(2)
                                          : std::string_view(pattern);
      if (!valid_domain(domain)) {
        error = "mx must be a host name or *.domain" + where;
        return std::nullopt;
      }
      policy.mx.push_back(pattern);
    } else {
      continue;  // an extension: ignored, and left out of the policy strings
    }
    policy.lines.push_back(std::string(key) + ": " + std::string(value));
  }
  if (!have_version || !have_mode || !have_max_age) {
    error = std::string("missing ") + (!have_version ? "version" : !have_mode ? "mode" : "max_age");
    return std::nullopt;
  }
  if (policy.mx.empty() && policy.mode != Mode::none) {
    error = "no mx in a policy whose mode is " + std::string(to_string(policy.mode));
    return std::nullopt;
  }
  error.clear();
  return policy;
}

bool mx_matches(std::string_view pattern, std::string_view host) {
  if (host.ends_with('.')) host.remove_suffix(1);
  const std::string name = ascii_lower(host);
  if (pattern.starts_with("*.")) {
    const auto suffix = pattern.substr(1);  // ".example.net"
    // Exactly one label before the suffix: "mx1.example.net" matches, "a.b.example.net" and "example.net" do not.
    if (name.size() <= suffix.size() || !std::string_view(name).ends_with(suffix)) return false;
    const auto label = std::string_view(name).substr(0, name.size() - suffix.size());
    return label.find('.') == std::string_view::npos;
  }
  return name == pattern;
}

bool policy_lists(const Policy& policy, std::string_view host) {
  return std::any_of(policy.mx.begin(), policy.mx.end(),
                     [&](const std::string& pattern) { return mx_matches(pattern, host); });
}

}  // namespace mailflow::proto::mta_sts
