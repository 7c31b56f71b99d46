#pragma once
// SMTP TLS Reporting (RFC 8460), the pure parts: the _smtp._tls TXT record (section 3), the aggregate of one
// UTC day x policy domain (section 4's model), its JSON report (section 4.4) and the report mail (section
// 5.3). No I/O, no clock: the store in daemon/tlsrpt.hpp feeds these.
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto::tlsrpt {

// The destinations one record may name: the rest are left out. Any domain a relayed mail goes to publishes
// the record, and each rua is a report mail (or POST) a day to wherever it says: a record of a thousand
// addresses must not make mailflowd a mailer of a thousand reports a day, nor hold each run for a thousand
// tries.
inline constexpr std::size_t max_rua = 10;

struct TxtLookup {
  enum class Status {
    none,     // no record starts with "v=TLSRPTv1" (the domain asks for no reports)
    report,   // exactly one, with at least one usable rua
    invalid,  // more than one, malformed, or no mailto:/https: rua (treated as none)
  };
  Status status = Status::none;
  std::vector<std::string> rua;  // "mailto:..." and "https://..." URIs in record order, each destination once
  std::size_t rua_left_out = 0;  // usable URIs after the first max_rua
  std::string error;
};

// What a mailto: or https: rua URI names, to tell two spellings of one destination apart (the record keeps
// one): the scheme, and the mail domain or the host without case and without the root's final dot; a mailto:
// query (not used) left out. The local part and the path keep their case (RFC 5321 2.4, RFC 3986 6.2.2.1).
std::string rua_destination(std::string_view uri);

// Section 3: records that do not begin with "v=TLSRPTv1" are discarded; exactly one must remain, of the form
// v=TLSRPTv1; rua=URI[,URI...] [; ext=value]...; URIs other than mailto: and https: are ignored.
TxtLookup parse_txt_records(const std::vector<std::string>& records);

enum class PolicyType { sts, tlsa, no_policy_found };
inline constexpr std::array<PolicyType, 3> all_policy_types{PolicyType::sts, PolicyType::tlsa,
                                                            PolicyType::no_policy_found};
std::string_view to_string(PolicyType type);  // "sts", "tlsa", "no-policy-found"
std::optional<PolicyType> parse_policy_type(std::string_view text);

// Section 4.3's result types.
enum class ResultType {
  starttls_not_supported,
  certificate_host_mismatch,
  certificate_expired,
  certificate_not_trusted,
  validation_failure,
  tlsa_invalid,
  dnssec_invalid,
  dane_required,
  sts_policy_fetch_error,
  sts_policy_invalid,
  sts_webpki_invalid,
};
inline constexpr std::array<ResultType, 11> all_result_types{
    ResultType::starttls_not_supported, ResultType::certificate_host_mismatch, ResultType::certificate_expired,
    ResultType::certificate_not_trusted, ResultType::validation_failure,       ResultType::tlsa_invalid,
    ResultType::dnssec_invalid,          ResultType::dane_required,            ResultType::sts_policy_fetch_error,
    ResultType::sts_policy_invalid,      ResultType::sts_webpki_invalid};
std::string_view to_string(ResultType type);  // "starttls-not-supported", ...
std::optional<ResultType> parse_result_type(std::string_view text);

// The policy a session was delivered under (section 4.3 "policy"): one report section each.
struct PolicyKey {
  PolicyType type = PolicyType::no_policy_found;
  std::vector<std::string> strings;   // policy-string: the STS policy's lines, or the TLSA records
  std::vector<std::string> mx_hosts;  // mx-host: the STS policy's mx patterns (sts only)
  auto operator<=>(const PolicyKey&) const = default;
};

// One failure-details entry (section 4.3), without its count.
struct FailureKey {
  ResultType result = ResultType::validation_failure;
  std::string sending_mta_ip;
  std::string receiving_mx_hostname;
  std::string receiving_ip;
  std::string failure_reason_code;  // optional free text ("" = absent)
  auto operator<=>(const FailureKey&) const = default;
};

struct PolicyCounts {
  std::uint64_t successful = 0;
  std::uint64_t failed = 0;
  std::map<FailureKey, std::uint64_t> failures;  // failed-session-count by detail
  std::uint64_t failures_dropped = 0;            // failed sessions whose detail did not fit the bound
};

// Everything about one policy domain for one UTC day.
struct DomainDay {
  std::string date;    // "YYYY-MM-DD" (UTC)
  std::string domain;  // the policy domain (the recipient domain), lower-case
  std::vector<std::string> rua;  // where the report goes (the latest TXT record seen)
  std::map<PolicyKey, PolicyCounts> policies;
};

// The longest organization_name that a report mail can carry: render_mail() puts it into the text line
// "This is an aggregate TLS report from NAME (SUBMITTER) for DOMAIN on DATE (UTC).", and with a submitter and
// a domain of up to 253 octets each a longer name could break RFC 5322's limit of 998 octets per line (2.1.1):
// receivers refuse such a mail, every report would bounce. config refuses a longer
// tlsrpt.organization_name.
inline constexpr std::size_t max_organization_name = 256;

// What the report says about its sender (config `tlsrpt`).
struct Submitter {
  std::string organization_name;
  std::string contact_info;
  std::string submitter;  // the domain of the reporting system (TLS-Report-Submitter)
};

// "<date>.<domain>@<submitter>": unique per day, domain and sender, as section 4.4 asks, and an RFC 5322 msg-id
// (dot-atom-text "@" domain, no ':'), as the Subject's Report-ID must be (section 5.3).
std::string report_id(const DomainDay& day, const Submitter& submitter);

// Section 4.4 JSON: organization-name, date-range (start-datetime, end-datetime: the whole UTC day),
// contact-info, report-id, policies[] (policy{policy-type, policy-string, policy-domain, mx-host},
// summary{total-successful-session-count, total-failure-session-count}, failure-details[]).
std::string render_json(const DomainDay& day, const Submitter& submitter);

// Section 5.3: the report mail, CRLF lines, 7bit: From, To, Date, Subject "Report Domain: D Submitter: S
// Report-ID: <ID>", TLS-Report-Domain, TLS-Report-Submitter, Message-ID, MIME-Version, multipart/report;
// report-type="tlsrpt" with a text/plain part and the application/tlsrpt+gzip attachment (base64, 76-column
// lines), file name "<submitter>!<domain>!<start>!<end>.json.gz" (section 5.1, unix seconds, no unique-id).
// `date_header` is an RFC 5322 date; `gzipped` the compressed JSON; `boundary` must not occur in the parts.
struct MailParts {
  std::string from;  // "tlsrpt-noreply@mx1.example.org"
  std::string to;    // the mailto: rua's address
  std::string date_header;
  std::string message_id;  // without <>
  std::string boundary;
};
std::string render_mail(const DomainDay& day, const Submitter& submitter, std::string_view gzipped,
                        const MailParts& parts);

// Section 5.3 for https: rua: the POST's headers (Content-Type application/tlsrpt+gzip), body = gzipped JSON.
std::vector<std::pair<std::string, std::string>> https_post_headers(std::size_t body_size);

std::string base64(std::string_view in);

}  // namespace mailflow::proto::tlsrpt
