#pragma once
// TLS-RPT (RFC 8460) aggregates: per UTC day x policy domain x policy, the successful and failed session
// counts and failure details, fed by the MX walk (one record() per outbound session to a domain that
// publishes _smtp._tls), kept in state_dir/tlsrpt.state until sent, rendered by proto/tlsrpt.hpp.
// Thread-safe. Bounded: max_domains per day (further domains are dropped and counted), max_policies per
// domain and day and max_policy_text bytes of policy text in all (further policies count under their type
// without their text), max_failure_details per policy (further details only raise the counts), max_days kept.
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "daemon/state_file.hpp"
#include "proto/tlsrpt.hpp"

namespace mailflow {

struct TlsRptLimits {
  std::size_t max_domains_per_day = 10000;
  std::size_t max_failure_details = 100;  // per policy and day
  // Dates kept; unsent reports of older dates are dropped (and logged). tlsrpt.retry_for is at most 14d from
  // the first try, the day after the report's date: it is given up (and counted) before its date leaves the
  // store.
  int max_days = 16;
  // Per domain and day. A domain can change its policy at every fetch (a new MTA-STS id, 64 KiB each time):
  // the sessions under further policies count under their policy type without the policy's text.
  std::size_t max_policies = 20;
  // The policy strings and MX patterns of every policy in the store, all days and domains together. Each of
  // them is the domain's to choose (a 64 KiB MTA-STS policy, a TLSA RRset of that size, twice as much as
  // hex), so 10,000 domains a day within max_policies could hold gigabytes, and tlsrpt.state past its 256 MiB
  // bound is moved aside at start with every unsent report. Sessions under a policy past it count under its
  // type without the text, as past max_policies; a report sent (or dropped) gives its text back.
  std::size_t max_policy_text = 32u << 20;
  // Octets of a failure's reason text (failure-reason-code) kept, the rest cut off. An MTA-STS fetch failure
  // quotes what the domain's policy host said (a Content-Type of up to 16 KiB), different at each fetch if it
  // likes: max_failure_details of them per policy.
  std::size_t max_failure_reason = 256;
};

// One outbound session's result, as the MX walk knows it.
struct TlsRptSession {
  std::string domain;             // the policy domain (recipient domain)
  std::vector<std::string> rua;   // from its _smtp._tls record
  proto::tlsrpt::PolicyKey policy;
  std::optional<proto::tlsrpt::FailureKey> failure;  // absent: a successful session
};

class TlsRptStore {
 public:
  explicit TlsRptStore(TlsRptLimits limits = {}) : limits_(limits) {}

  // `date` is the UTC day "YYYY-MM-DD" the session ended on.
  void record(const std::string& date, const TlsRptSession& session);
  // Every domain of that day, sorted by domain (an empty vector for an unknown day).
  std::vector<proto::tlsrpt::DomainDay> day(std::string_view date) const;
  std::optional<proto::tlsrpt::DomainDay> find(std::string_view date, std::string_view domain) const;
  // The rua addresses recorded for that day and domain (empty: none, or not in the store): where a session
  // goes when the domain's _smtp._tls record cannot be had right now (SERVFAIL, a timeout).
  std::vector<std::string> rua(std::string_view date, std::string_view domain) const;
  // The reports to send: (date, domain) of every domain with rua addresses on a day before `date` (finished UTC
  // days), oldest first.
  std::vector<std::pair<std::string, std::string>> reports_before(std::string_view date) const;
  // Sent (or given up): removed.
  void forget(std::string_view date, std::string_view domain);
  // Sessions not recorded for max_domains_per_day since the start: mailflow_tlsrpt_sessions_dropped_total.
  std::uint64_t dropped_domains() const;
  // Who reports (config tlsrpt.*): set at start and reload by Telemetry::configure.
  void set_submitter(proto::tlsrpt::Submitter submitter);
  proto::tlsrpt::Submitter submitter() const;

  std::string serialize() const;
  bool deserialize(std::string_view text, std::string& error);  // false: corrupt (the store is unchanged)
  StateFile state_file() const;  // its name in state_dir and serialize(), for the StateWriter (atomic save)
  // A corrupt file is moved aside (true, error says so); false when the file cannot be read.
  bool load(const std::string& state_dir, std::int64_t unix_now, std::string& error);

 private:
  mutable std::mutex mutex_;
  TlsRptLimits limits_;
  std::vector<proto::tlsrpt::DomainDay> days_;  // sorted by (date, domain)
  std::uint64_t dropped_domains_ = 0;
  std::string full_date_;  // the last date whose domains hit max_domains_per_day (logged once)
  std::size_t policy_text_ = 0;  // the bytes max_policy_text bounds, as held now
  std::string text_full_date_;   // the last date a policy went without its text for max_policy_text (logged)
  proto::tlsrpt::Submitter submitter_;
};

// GET /api/v1/tlsrpt?date=D: {"date": D, "reports": [{"domain": ..., "rua": [...], "report": <RFC 8460 JSON>}]}
// for every domain of that day, sorted by domain.
std::string render_tlsrpt_day(const TlsRptStore& store, std::string_view date);

// gzip (RFC 1952) of `data`, as the report's attachment and POST body (zlib).
std::string gzip(std::string_view data);

}  // namespace mailflow
