#include "daemon/tlsrpt.hpp"

#include <zlib.h>

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "daemon/log.hpp"
#include "daemon/state_file.hpp"
#include "daemon/state_text.hpp"
#include "proto/json.hpp"

namespace mailflow {
namespace {

using proto::tlsrpt::DomainDay;
using proto::tlsrpt::FailureKey;
using proto::tlsrpt::PolicyKey;
using state_text::decode;
using state_text::decode_list;
using state_text::encode;
using state_text::encode_list;
using state_text::number;
using state_text::split_spaces;
using state_text::valid_date;

constexpr std::string_view kStateFile = "tlsrpt.state";
constexpr std::string_view kHeader = "mailflowd-tlsrpt 2";
// Version 1 had no end line and is still read as it was: a cut at a line end cannot be told there.
constexpr std::string_view kHeaderV1 = "mailflowd-tlsrpt 1";
constexpr std::size_t kMaxStateBytes = 256u << 20;

bool before(const DomainDay& day, std::string_view date, std::string_view domain) {
  return day.date < date || (day.date == date && day.domain < domain);
}

// What TlsRptLimits::max_policy_text counts of a policy, and of a day.
std::size_t text_size(const PolicyKey& key) {
  std::size_t size = 0;
  for (const auto& line : key.strings) size += line.size();
  for (const auto& mx : key.mx_hosts) size += mx.size();
  return size;
}

std::size_t text_size(const DomainDay& day) {
  std::size_t size = 0;
  for (const auto& [key, counts] : day.policies) size += text_size(key);
  return size;
}

}  // namespace

void TlsRptStore::record(const std::string& date, const TlsRptSession& session) {
  std::lock_guard lock(mutex_);
  // days_ is sorted by (date, domain): the date's entries are one run, found by binary search. Every relayed
  // session to a domain with a TLS-RPT record comes here, under the store's one mutex: a pass over the whole
  // store (up to max_days x max_domains_per_day entries) per session, as there was, cost a busy relay most of
  // a millisecond each.
  const auto first =
      std::partition_point(days_.begin(), days_.end(), [&](const DomainDay& d) { return d.date < date; });
  const auto last =
      std::partition_point(first, days_.end(), [&](const DomainDay& d) { return d.date == date; });
  auto it = std::partition_point(first, last, [&](const DomainDay& d) { return d.domain < session.domain; });
  const bool new_date = first == last;
  if (it == last || it->domain != session.domain) {
    if (static_cast<std::size_t>(last - first) >= limits_.max_domains_per_day) {
      ++dropped_domains_;
      if (full_date_ != date) {  // once a day: the domains of that day past the bound get no report
        full_date_ = date;
        log_event(LogLevel::warn, "tlsrpt_store_full",
                  {{"date", date}, {"domains", limits_.max_domains_per_day}, {"dropped", session.domain}});
      }
      return;
    }
    DomainDay fresh;
    fresh.date = date;
    fresh.domain = session.domain;
    it = days_.insert(it, std::move(fresh));
  }
  if (!session.rua.empty()) it->rua = session.rua;
  auto policy = it->policies.find(session.policy);
  if (policy == it->policies.end()) {
    const std::size_t text = text_size(session.policy);
    const bool text_full = policy_text_ + text > limits_.max_policy_text;
    if (text_full && text_full_date_ != date) {  // once a day: that day's further policies go without text
      text_full_date_ = date;
      log_event(
          LogLevel::warn, "tlsrpt_policy_text_full",
          {{"date", date}, {"policy_text_bytes", limits_.max_policy_text}, {"without_text", session.domain}});
    }
    const bool full = it->policies.size() >= limits_.max_policies || text_full;
    policy = it->policies.try_emplace(full ? PolicyKey{session.policy.type, {}, {}} : session.policy).first;
    if (!full) policy_text_ += text;
  }
  auto& counts = policy->second;
  if (!session.failure) {
    ++counts.successful;
  } else {
    ++counts.failed;
    FailureKey failure = *session.failure;
    if (failure.failure_reason_code.size() > limits_.max_failure_reason)
      failure.failure_reason_code.resize(limits_.max_failure_reason);
    auto detail = counts.failures.find(failure);
    if (detail != counts.failures.end()) ++detail->second;
    else if (counts.failures.size() < limits_.max_failure_details)
      counts.failures.emplace(std::move(failure), 1);
    else ++counts.failures_dropped;
  }
  // Old days go: the store keeps max_days distinct dates, whose number only a new date changes.
  if (!new_date) return;
  std::vector<std::string> dates;
  for (const auto& day : days_) {
    if (dates.empty() || dates.back() != day.date) dates.push_back(day.date);
  }
  if (dates.size() > static_cast<std::size_t>(limits_.max_days)) {
    const std::string& keep_from = dates[dates.size() - static_cast<std::size_t>(limits_.max_days)];
    // A report still unsent at its date's end here was never given up (retry_for ends earlier, unless the
    // daemon was stopped for longer than that): said, not silently gone.
    const auto unsent = std::count_if(days_.begin(), days_.end(), [&](const DomainDay& day) {
      return day.date < keep_from && !day.rua.empty();
    });
    if (unsent > 0)
      log_event(
          LogLevel::warn, "tlsrpt_reports_dropped",
          {{"before", keep_from}, {"reports", static_cast<std::uint64_t>(unsent)}, {"reason", "too_old"}});
    std::erase_if(days_, [&](const DomainDay& day) {
      if (day.date >= keep_from) return false;
      policy_text_ -= text_size(day);
      return true;
    });
  }
}

std::vector<DomainDay> TlsRptStore::day(std::string_view date) const {
  std::lock_guard lock(mutex_);
  std::vector<DomainDay> out;
  for (const auto& day : days_) {
    if (day.date == date) out.push_back(day);
  }
  return out;
}

std::optional<DomainDay> TlsRptStore::find(std::string_view date, std::string_view domain) const {
  std::lock_guard lock(mutex_);
  for (const auto& day : days_) {
    if (day.date == date && day.domain == domain) return day;
  }
  return std::nullopt;
}

std::vector<std::string> TlsRptStore::rua(std::string_view date, std::string_view domain) const {
  std::lock_guard lock(mutex_);
  // Asked once per route whose _smtp._tls lookup failed: a DNS outage asks it for every session.
  const auto it = std::partition_point(days_.begin(), days_.end(),
                                       [&](const DomainDay& day) { return before(day, date, domain); });
  if (it == days_.end() || it->date != date || it->domain != domain) return {};
  return it->rua;
}

std::vector<std::pair<std::string, std::string>> TlsRptStore::reports_before(std::string_view date) const {
  std::lock_guard lock(mutex_);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& day : days_) {
    if (day.date >= date) break;  // days_ is sorted by date
    if (!day.rua.empty()) out.emplace_back(day.date, day.domain);
  }
  return out;
}

void TlsRptStore::forget(std::string_view date, std::string_view domain) {
  std::lock_guard lock(mutex_);
  std::erase_if(days_, [&](const DomainDay& day) {
    if (day.date != date || day.domain != domain) return false;
    policy_text_ -= text_size(day);
    return true;
  });
}

std::uint64_t TlsRptStore::dropped_domains() const {
  std::lock_guard lock(mutex_);
  return dropped_domains_;
}

// Lines: "day DATE DOMAIN RUA,..." then its "policy TYPE STRINGS MXHOSTS SUCCESSFUL FAILED DROPPED" lines,
// each followed by its "failure RESULT SENDING-IP MX-HOST RECEIVING-IP REASON COUNT" lines; "end".
std::string TlsRptStore::serialize() const {
  std::lock_guard lock(mutex_);
  std::string out = std::string(kHeader) + "\n";
  for (const auto& day : days_) {
    out += "day " + day.date + " " + encode(day.domain) + " " + encode_list(day.rua) + "\n";
    for (const auto& [key, counts] : day.policies) {
      out += "policy " + std::string(to_string(key.type)) + " " + encode_list(key.strings) + " " +
             encode_list(key.mx_hosts) + " " + std::to_string(counts.successful) + " " +
             std::to_string(counts.failed) + " " + std::to_string(counts.failures_dropped) + "\n";
      for (const auto& [failure, count] : counts.failures) {
        out += "failure " + std::string(to_string(failure.result)) + " " + encode(failure.sending_mta_ip) + " " +
               encode(failure.receiving_mx_hostname) + " " + encode(failure.receiving_ip) + " " +
               encode(failure.failure_reason_code) + " " + std::to_string(count) + "\n";
      }
    }
  }
  return out += state_text::end_line;
}

bool TlsRptStore::deserialize(std::string_view text, std::string& error) {
  // Every line ends in a newline: a file cut inside its last line (a count short of digits) is not loaded.
  if (!text.empty() && text.back() != '\n') {
    error = "truncated (no newline at the end)";
    return false;
  }
  const std::string_view header = text.substr(0, text.find('\n'));
  if (header != kHeader && header != kHeaderV1) {
    error = "not a mailflowd TLS-RPT store (first line)";
    return false;
  }
  if (header == kHeader) {
    const auto before_end = state_text::before_end_line(text);
    if (!before_end) {
      error = "truncated (no end line)";
      return false;
    }
    text = *before_end;
  }
  std::vector<DomainDay> loaded;
  std::istringstream in{std::string(text)};
  std::string line;
  std::getline(in, line);  // the header
  proto::tlsrpt::PolicyCounts* policy = nullptr;
  int number_of_line = 1;
  while (std::getline(in, line)) {
    ++number_of_line;
    const auto bad = [&](std::string_view why) {
      error = "line " + std::to_string(number_of_line) + ": " + std::string(why);
      return false;
    };
    const auto f = split_spaces(line);
    if (f[0] == "day" && f.size() == 4) {
      auto domain = decode(f[2]);
      auto rua = decode_list(f[3]);
      if (!valid_date(f[1]) || !domain || domain->empty() || !rua) return bad("malformed day");
      if (!loaded.empty() && !before(loaded.back(), f[1], *domain)) return bad("days out of order");
      loaded.push_back(DomainDay{std::string(f[1]), *domain, *rua, {}});
      policy = nullptr;
    } else if (f[0] == "policy" && f.size() == 7 && !loaded.empty()) {
      PolicyKey key;
      const auto type = proto::tlsrpt::parse_policy_type(f[1]);
      auto strings = decode_list(f[2]);
      auto mx = decode_list(f[3]);
      const auto ok = number(f[4]), failed = number(f[5]), dropped = number(f[6]);
      if (!type || !strings || !mx || !ok || !failed || !dropped) return bad("malformed policy");
      key = PolicyKey{*type, std::move(*strings), std::move(*mx)};
      // Our files list each policy of a day once: a repeated one would silently replace the first's counts.
      const auto [at, added] = loaded.back().policies.emplace(
          std::move(key), proto::tlsrpt::PolicyCounts{*ok, *failed, {}, *dropped});
      if (!added) return bad("repeated policy");
      policy = &at->second;
    } else if (f[0] == "failure" && f.size() == 7 && policy != nullptr) {
      const auto result = proto::tlsrpt::parse_result_type(f[1]);
      auto sending = decode(f[2]), mx = decode(f[3]), receiving = decode(f[4]), reason = decode(f[5]);
      const auto count = number(f[6]);
      if (!result || !sending || !mx || !receiving || !reason || !count) return bad("malformed failure");
      if (!policy->failures.emplace(FailureKey{*result, *sending, *mx, *receiving, *reason}, *count).second)
        return bad("repeated failure");
    } else {
      return bad("unexpected line");
    }
  }
  std::size_t policy_text = 0;
  for (const auto& day : loaded) policy_text += text_size(day);
  std::lock_guard lock(mutex_);
  days_ = std::move(loaded);
  policy_text_ =
      policy_text;  // a file written before the bound may hold more: then no further policy gets its text
  return true;
}

StateFile TlsRptStore::state_file() const { return {std::string(kStateFile), serialize()}; }

bool TlsRptStore::load(const std::string& state_dir, std::int64_t unix_now, std::string& error) {
  std::string text;
  error.clear();
  const auto read = read_state_file(state_dir, kStateFile, kMaxStateBytes, text, error);
  if (read == StateRead::absent) return true;
  if (read == StateRead::failed) return false;
  std::string why = error;
  if (read == StateRead::read && deserialize(text, why)) {
    error.clear();
    return true;
  }
  error = std::string(kStateFile) + " is unusable (" + why + "); " +
          move_state_file_aside(state_dir, kStateFile, unix_now) + ", starting with no TLS-RPT reports";
  return true;
}

void TlsRptStore::set_submitter(proto::tlsrpt::Submitter submitter) {
  std::lock_guard lock(mutex_);
  submitter_ = std::move(submitter);
}

proto::tlsrpt::Submitter TlsRptStore::submitter() const {
  std::lock_guard lock(mutex_);
  return submitter_;
}

std::string render_tlsrpt_day(const TlsRptStore& store, std::string_view date) {
  const auto submitter = store.submitter();
  std::string out = "{\"date\": \"" + proto::json_escape(date) + "\", \"reports\": [";
  bool first = true;
  for (const auto& day : store.day(date)) {
    out += first ? "\n" : ",\n";
    first = false;
    out += "{\"domain\": \"" + proto::json_escape(day.domain) + "\", \"rua\": [";
    for (std::size_t i = 0; i < day.rua.size(); ++i)
      out += (i ? ", \"" : "\"") + proto::json_escape(day.rua[i]) + "\"";
    out += "],\n \"report\": " + proto::tlsrpt::render_json(day, submitter) + "}";
  }
  out += first ? "]}\n" : "\n]}\n";
  return out;
}

std::string gzip(std::string_view data) {
  z_stream stream{};
  // windowBits 15 + 16: a gzip header and trailer instead of zlib's.
  if (deflateInit2(&stream, Z_BEST_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    throw std::runtime_error("gzip: deflateInit2 failed");
  std::string out(deflateBound(&stream, static_cast<uLong>(data.size())) + 32, '\0');
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  stream.avail_in = static_cast<uInt>(data.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&stream, Z_FINISH);
  out.resize(stream.total_out);
  deflateEnd(&stream);
  if (rc != Z_STREAM_END) throw std::runtime_error("gzip: deflate failed");
  return out;
}

}  // namespace mailflow
