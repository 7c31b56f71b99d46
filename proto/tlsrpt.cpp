#include "proto/tlsrpt.hpp"

#include "proto/ascii.hpp"
#include "proto/json.hpp"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <set>

namespace mailflow::proto::tlsrpt {
namespace {

bool starts_with_nocase(std::string_view text, std::string_view prefix) {
  if (text.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(text[i])) != prefix[i]) return false;
  }
  return true;
}

// A URI as section 3 allows it: printable ASCII without spaces, commas or semicolons (a comma inside a mailto:
// address is written %2C).
bool valid_uri(std::string_view uri) {
  return !uri.empty() && std::all_of(uri.begin(), uri.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 0x20 && u < 0x7f && c != ',' && c != ';';
  });
}

}  // namespace

std::string rua_destination(std::string_view uri) {
  const auto colon = uri.find(':');
  const std::string scheme = ascii_lower(uri.substr(0, colon + 1));
  std::string_view rest = uri.substr(colon + 1);
  if (scheme == "mailto:") {
    rest = rest.substr(0, rest.find('?'));
    const auto at = rest.rfind('@');
    std::string domain = ascii_lower(rest.substr(at + 1));
    if (domain.ends_with('.')) domain.pop_back();
    return scheme + std::string(rest.substr(0, at + 1)) + domain;
  }
  if (rest.starts_with("//")) rest.remove_prefix(2);
  const auto path = std::min(rest.find_first_of("/?#"), rest.size());
  std::string authority = ascii_lower(rest.substr(0, path));
  const auto bracket = authority.rfind(']');
  const auto port = authority.rfind(':');
  const std::size_t host_end =
      port != std::string::npos && (bracket == std::string::npos || port > bracket) ? port : authority.size();
  if (host_end > 0 && authority[host_end - 1] == '.') authority.erase(host_end - 1, 1);
  return scheme + "//" + authority + std::string(rest.substr(path));
}

namespace {

TxtLookup parse_one(std::string_view rest) {
  TxtLookup out;
  out.status = TxtLookup::Status::invalid;
  bool have_rua = false;
  std::vector<std::string> ignored;
  // Fields separated by *WSP ";" *WSP; the final ";" is optional.
  std::size_t start = 0;
  std::vector<std::string_view> fields;
  while (start <= rest.size()) {
    const auto semi = rest.find(';', start);
    fields.push_back(trim_wsp(rest.substr(start, semi == std::string_view::npos ? std::string_view::npos : semi - start)));
    if (semi == std::string_view::npos) break;
    start = semi + 1;
  }
  // fields[0] is what followed the version before the first ';': must be empty.
  if (fields.empty() || !fields[0].empty()) {
    out.error = "expected ';' after v=TLSRPTv1";
    return out;
  }
  if (fields.size() > 1 && fields.back().empty()) fields.pop_back();  // the optional final ';'
  for (std::size_t i = 1; i < fields.size(); ++i) {
    const auto field = fields[i];
    const auto eq = field.find('=');
    if (field.empty() || eq == std::string_view::npos) {
      out.error = "malformed field in the _smtp._tls record";
      return out;
    }
    const auto name = field.substr(0, eq);
    const auto value = field.substr(eq + 1);
    if (name == "rua") {
      if (have_rua) {
        out.error = "more than one rua in the _smtp._tls record";
        return out;
      }
      have_rua = true;
      std::vector<std::string> kept;  // the rua_destination() of each of out.rua
      std::set<std::string> left_out;
      std::size_t at = 0;
      while (at <= value.size()) {
        const auto comma = value.find(',', at);
        const auto uri = trim_wsp(value.substr(at, comma == std::string_view::npos ? std::string_view::npos : comma - at));
        if (!valid_uri(uri)) {
          out.error = "malformed rua URI in the _smtp._tls record";
          return out;
        }
        // Other schemes: ignored (section 3: only mailto and https are defined). A URI listed twice, or
        // spelled otherwise (rua_destination()), is one destination: the report goes there once.
        const bool mailto =
            starts_with_nocase(uri, "mailto:") && uri.size() > 7 && uri.find('@') != std::string_view::npos;
        const bool usable = mailto || (starts_with_nocase(uri, "https://") && uri.size() > 8);
        std::string named = usable ? rua_destination(uri) : std::string();
        if (usable && std::find(kept.begin(), kept.end(), named) == kept.end()) {
          if (out.rua.size() < max_rua) {
            out.rua.emplace_back(uri);
            kept.push_back(std::move(named));
          } else if (left_out.insert(std::move(named)).second) {  // past the bound too, each one once
            ++out.rua_left_out;
          }
        }
        if (comma == std::string_view::npos) break;
        at = comma + 1;
      }
      continue;
    }
    const bool name_ok = !name.empty() && name.size() <= 32 && is_alnum(name[0]) &&
                         std::all_of(name.begin(), name.end(),
                                     [](char c) { return is_alnum(c) || c == '_' || c == '-' || c == '.'; });
    const bool value_ok = !value.empty() && std::all_of(value.begin(), value.end(), [](char c) {
      const auto u = static_cast<unsigned char>(c);
      return u >= 0x21 && u <= 0x7e && c != '=' && c != ';';
    });
    if (!name_ok || !value_ok) {
      out.error = "malformed field in the _smtp._tls record";
      return out;
    }
  }
  if (!have_rua) {
    out.error = "no rua in the _smtp._tls record";
    return out;
  }
  if (out.rua.empty()) {
    out.error = "no mailto: or https: rua in the _smtp._tls record";
    return out;
  }
  out.status = TxtLookup::Status::report;
  return out;
}

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
std::int64_t days_from_civil(int y, unsigned m, unsigned d) {
  y -= m <= 2 ? 1 : 0;
  const int era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return static_cast<std::int64_t>(era) * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

std::int64_t day_start_unix(std::string_view date) {
  int y = 1970;
  unsigned m = 1;
  unsigned d = 1;
  if (date.size() == 10) std::sscanf(std::string(date).c_str(), "%d-%u-%u", &y, &m, &d);
  return days_from_civil(y, m, d) * 86400;
}

std::string json_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", \"" : "\"") + json_escape(items[i]) + "\"";
  return out + "]";
}

}  // namespace

TxtLookup parse_txt_records(const std::vector<std::string>& records) {
  constexpr std::string_view version = "v=TLSRPTv1";
  const std::string* found = nullptr;
  std::size_t count = 0;
  for (const auto& record : records) {
    if (!std::string_view(record).starts_with(version)) continue;
    const auto after = trim_wsp(std::string_view(record).substr(version.size()));
    if (!after.empty() && after.front() != ';') continue;  // "v=TLSRPTv10": another version
    ++count;
    found = &record;
  }
  if (count == 0) return {};
  if (count > 1) {
    return TxtLookup{TxtLookup::Status::invalid, {}, 0,
                     std::to_string(count) + " v=TLSRPTv1 records (exactly one allowed)"};
  }
  return parse_one(std::string_view(*found).substr(version.size()));
}

std::string_view to_string(PolicyType type) {
  switch (type) {
    case PolicyType::sts:
      return "sts";
    case PolicyType::tlsa:
      return "tlsa";
    case PolicyType::no_policy_found:
      return "no-policy-found";
  }
  return "no-policy-found";
}

std::optional<PolicyType> parse_policy_type(std::string_view text) {
  for (const auto type : all_policy_types) {
    if (to_string(type) == text) return type;
  }
  return std::nullopt;
}

std::string_view to_string(ResultType type) {
  switch (type) {
    case ResultType::starttls_not_supported:
      return "starttls-not-supported";
    case ResultType::certificate_host_mismatch:
      return "certificate-host-mismatch";
    case ResultType::certificate_expired:
      return "certificate-expired";
    case ResultType::certificate_not_trusted:
      return "certificate-not-trusted";
    case ResultType::validation_failure:
      return "validation-failure";
    case ResultType::tlsa_invalid:
      return "tlsa-invalid";
    case ResultType::dnssec_invalid:
      return "dnssec-invalid";
    case ResultType::dane_required:
      return "dane-required";
    case ResultType::sts_policy_fetch_error:
      return "sts-policy-fetch-error";
    case ResultType::sts_policy_invalid:
      return "sts-policy-invalid";
    case ResultType::sts_webpki_invalid:
      return "sts-webpki-invalid";
  }
  return "validation-failure";
}

std::optional<ResultType> parse_result_type(std::string_view text) {
  for (const auto type : all_result_types) {
    if (to_string(type) == text) return type;
  }
  return std::nullopt;
}

std::string report_id(const DomainDay& day, const Submitter& submitter) {
  return day.date + "." + day.domain + "@" + submitter.submitter;
}

std::string render_json(const DomainDay& day, const Submitter& submitter) {
  std::string out = "{\"organization-name\": \"" + json_escape(submitter.organization_name) + "\",\n";
  out += " \"date-range\": {\"start-datetime\": \"" + day.date + "T00:00:00Z\", \"end-datetime\": \"" + day.date +
         "T23:59:59Z\"},\n";
  out += " \"contact-info\": \"" + json_escape(submitter.contact_info) + "\",\n";
  out += " \"report-id\": \"" + json_escape(report_id(day, submitter)) + "\",\n";
  out += " \"policies\": [";
  bool first_policy = true;
  for (const auto& [key, counts] : day.policies) {
    out += first_policy ? "\n" : ",\n";
    first_policy = false;
    out += "  {\"policy\": {\"policy-type\": \"" + std::string(to_string(key.type)) + "\"";
    if (key.type != PolicyType::no_policy_found) out += ", \"policy-string\": " + json_list(key.strings);
    out += ", \"policy-domain\": \"" + json_escape(day.domain) + "\"";
    if (key.type == PolicyType::sts) out += ", \"mx-host\": " + json_list(key.mx_hosts);
    out += "},\n   \"summary\": {\"total-successful-session-count\": " + std::to_string(counts.successful) +
           ", \"total-failure-session-count\": " + std::to_string(counts.failed) + "}";
    if (!counts.failures.empty()) {
      out += ",\n   \"failure-details\": [";
      bool first = true;
      for (const auto& [failure, count] : counts.failures) {
        out += first ? "\n" : ",\n";
        first = false;
        out += "    {\"result-type\": \"" + std::string(to_string(failure.result)) + "\"";
        if (!failure.sending_mta_ip.empty())
          out += ", \"sending-mta-ip\": \"" + json_escape(failure.sending_mta_ip) + "\"";
        if (!failure.receiving_mx_hostname.empty())
          out += ", \"receiving-mx-hostname\": \"" + json_escape(failure.receiving_mx_hostname) + "\"";
        if (!failure.receiving_ip.empty()) out += ", \"receiving-ip\": \"" + json_escape(failure.receiving_ip) + "\"";
        out += ", \"failed-session-count\": " + std::to_string(count);
        if (!failure.failure_reason_code.empty())
          out += ", \"failure-reason-code\": \"" + json_escape(failure.failure_reason_code) + "\"";
        out += "}";
      }
      out += "]";
    }
    out += "}";
  }
  out += first_policy ? "]}\n" : "\n ]}\n";
  return out;
}

std::string base64(std::string_view in) {
  static constexpr char table[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  const auto byte = [&](std::size_t at) { return static_cast<unsigned>(static_cast<unsigned char>(in[at])); };
  for (; i + 2 < in.size(); i += 3) {
    const unsigned v = byte(i) << 16 | byte(i + 1) << 8 | byte(i + 2);
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += table[(v >> 6) & 63];
    out += table[v & 63];
  }
  if (i + 1 == in.size()) {
    const unsigned v = byte(i) << 16;
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    const unsigned v = byte(i) << 16 | byte(i + 1) << 8;
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += table[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::string render_mail(const DomainDay& day, const Submitter& submitter, std::string_view gzipped,
                        const MailParts& parts) {
  const std::string id = report_id(day, submitter);
  const auto start = day_start_unix(day.date);
  const std::string file_name = submitter.submitter + "!" + day.domain + "!" + std::to_string(start) + "!" +
                                std::to_string(start + 86399) + ".json.gz";
  std::string out;
  const auto header = [&](std::string_view name, const std::string& value) {
    out += std::string(name) + ": " + value + "\r\n";
  };
  header("From", "<" + parts.from + ">");
  header("To", "<" + parts.to + ">");
  header("Date", parts.date_header);
  // RFC 8460 5.3's Subject on one line, unless that would pass RFC 5322 2.1.1's 998 octets (two names of up
  // to 253 octets and a Report-ID that holds both again): then folded before "Submitter:" and "Report-ID:",
  // which unfolds to the same text.
  const std::string subject_parts[] = {"Report Domain: " + day.domain, "Submitter: " + submitter.submitter,
                                       "Report-ID: <" + id + ">"};
  const bool fold = std::string_view("Subject: ").size() + subject_parts[0].size() + subject_parts[1].size() +
                        subject_parts[2].size() + 2 >
                    998;
  const std::string separator = fold ? "\r\n " : " ";
  header("Subject", subject_parts[0] + separator + subject_parts[1] + separator + subject_parts[2]);
  header("TLS-Report-Domain", day.domain);
  header("TLS-Report-Submitter", submitter.submitter);
  header("Message-ID", "<" + parts.message_id + ">");
  header("MIME-Version", "1.0");
  header("Content-Type", "multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"" + parts.boundary + "\"");
  out += "\r\n";
  out += "This is a multipart message in MIME format.\r\n\r\n";
  out += "--" + parts.boundary + "\r\n";
  out += "Content-Type: text/plain; charset=\"us-ascii\"\r\n\r\n";
  // 66 octets of text and date around the three names (max_organization_name says why this must fit).
  static_assert(66 + max_organization_name + 253 + 253 <= 998);
  out += "This is an aggregate TLS report from " + submitter.organization_name + " (" + submitter.submitter +
         ") for " + day.domain + " on " + day.date + " (UTC).\r\n\r\n";
  out += "--" + parts.boundary + "\r\n";
  out += "Content-Type: application/tlsrpt+gzip\r\n";
  out += "Content-Transfer-Encoding: base64\r\n";
  out += "Content-Disposition: attachment;\r\n\tfilename=\"" + file_name + "\"\r\n\r\n";
  const std::string encoded = base64(gzipped);
  for (std::size_t at = 0; at < encoded.size(); at += 76) out += encoded.substr(at, 76) + "\r\n";
  out += "\r\n--" + parts.boundary + "--\r\n";
  return out;
}

std::vector<std::pair<std::string, std::string>> https_post_headers(std::size_t body_size) {
  return {{"Content-Type", "application/tlsrpt+gzip"}, {"Content-Length", std::to_string(body_size)}};
}

}  // namespace mailflow::proto::tlsrpt
