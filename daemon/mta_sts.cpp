// MTA-STS fetch, cache and checks; see mta_sts.hpp.
#include "daemon/mta_sts.hpp"

#include <algorithm>
#include <boost/asio/this_coro.hpp>
#include <cctype>
#include <limits>
#include <sstream>

#include "daemon/https_client.hpp"
#include "daemon/resolver.hpp"
#include "daemon/state_file.hpp"
#include "daemon/state_text.hpp"
#include "proto/ascii.hpp"

namespace mailflow {

namespace net = boost::asio;
using proto::tlsrpt::ResultType;

namespace {

constexpr std::string_view kCacheFile = "mta-sts.state";
constexpr std::string_view kCacheHeader = "mailflowd-mta-sts 2";
// Version 1 had no end line and is still read as it was: a cut at a line end cannot be told there.
constexpr std::string_view kCacheHeaderV1 = "mailflowd-mta-sts 1";
constexpr std::size_t kMaxCacheFileBytes = 64u << 20;

PolicyFetch failed(PolicyFetch::Status status, std::string detail) {
  PolicyFetch out;
  out.status = status;
  out.detail = std::move(detail);
  return out;
}

}  // namespace

std::string_view to_string(PolicyFetch::Status status) {
  switch (status) {
    case PolicyFetch::Status::ok:
      return "ok";
    case PolicyFetch::Status::fetch_error:
      return "fetch_error";
    case PolicyFetch::Status::invalid:
      return "invalid";
    case PolicyFetch::Status::webpki_invalid:
      return "webpki_invalid";
  }
  return "fetch_error";
}

std::string_view to_string(PolicyState::Mode mode) {
  switch (mode) {
    case PolicyState::Mode::none:
      return "none";
    case PolicyState::Mode::testing:
      return "testing";
    case PolicyState::Mode::enforce:
      return "enforce";
  }
  return "none";
}

net::awaitable<PolicyFetch> fetch_policy(net::any_io_executor executor, std::string domain,
                                         const MtaStsSettings& settings, Resolver* resolver) {
  using Status = PolicyFetch::Status;
  using Step = HttpsResponse::Step;
  using Error = HttpsResponse::Error;
  const std::string host = "mta-sts." + proto::ascii_lower(domain);
  HttpsLimits limits;
  limits.deadline = std::min(std::chrono::steady_clock::now() + settings.fetch_timeout, settings.not_after);
  limits.max_body_bytes = proto::mta_sts::max_policy_bytes;
  HttpsRequest request;
  request.host = host;  // RFC 8461 3.3: the certificate must be valid for mta-sts.<domain>
  request.target = "/.well-known/mta-sts.txt";
  request.ca_file = settings.ca_file;
  if (!settings.connect_to.empty()) {
    const auto colon = settings.connect_to.rfind(':');
    request.connect_host = settings.connect_to.substr(0, colon);
    if (colon != std::string::npos) request.port = settings.connect_to.substr(colon + 1);
    if (request.connect_host.starts_with('[') && request.connect_host.ends_with(']'))
      request.connect_host = request.connect_host.substr(1, request.connect_host.size() - 2);
  }
  const auto with = [&](std::string_view what) { return std::string(what) + " " + host + ": "; };

  if (resolver != nullptr && settings.connect_to.empty()) {
    // The daemon's own DNS (dns.servers, dns.timeout), as for the MX hosts; else the system's (getaddrinfo).
    const AddressResult addresses = co_await resolver->resolve_addresses(host);
    request.addresses = addresses.addresses;
    if (request.addresses.empty())
      co_return failed(Status::fetch_error,
                       with("cannot resolve") + (addresses.detail.empty() ? "no address" : addresses.detail));
  }

  auto response = co_await https_request(executor, std::move(request), limits);
  // A failed step: fetch_error, in the words of the step (and the library's, unless the deadline ended it).
  const auto step_failed = [&](std::string_view timed_out, std::string_view failed_to) {
    return failed(Status::fetch_error, response.error == Error::timed_out
                                           ? std::string(timed_out) + " " + host
                                           : with(failed_to) + response.error_text);
  };
  switch (response.step) {
    case Step::ca_file:
      co_return failed(Status::fetch_error, "cannot load CA certificates: " + response.error_text);
    case Step::resolve:
      co_return failed(Status::fetch_error, with("cannot resolve") + response.error_text);
    case Step::connect:
      co_return step_failed("timed out connecting to", "cannot connect to");
    case Step::handshake:
      if (response.error == Error::certificate_invalid)
        co_return failed(Status::webpki_invalid, with("certificate of") + response.error_text);
      co_return step_failed("timed out in the TLS handshake with", "TLS handshake failed with");
    case Step::write:
      co_return step_failed("timed out sending to", "cannot send the request to");
    case Step::read:
      if (response.error == Error::body_too_large)
        co_return failed(Status::fetch_error, "policy larger than 64 KiB from " + host);
      co_return step_failed("timed out reading the policy from", "no valid HTTP answer from");
    case Step::done:
      break;
  }

  // RFC 8461 3.3: HTTP redirects must not be followed; anything but 200 is a failed fetch.
  if (response.status != 200) {
    std::string detail = host + " answered " + std::to_string(response.status);
    if (response.status / 100 == 3) detail += " (redirects are not followed)";
    co_return failed(Status::fetch_error, detail);
  }
  const std::string content_type = proto::ascii_lower(response.content_type);
  std::string_view media = content_type;
  media = media.substr(0, media.find(';'));
  while (!media.empty() && media.back() == ' ') media.remove_suffix(1);
  if (media != "text/plain") {
    co_return failed(Status::fetch_error,
                     "Content-Type from " + host + " is not text/plain: \"" + content_type + "\"");
  }
  std::string error;
  auto policy = proto::mta_sts::parse_policy(response.body, error);
  if (!policy) co_return failed(Status::invalid, with("invalid policy from") + error);
  PolicyFetch out;
  out.status = Status::ok;
  out.policy = std::move(policy);
  co_return out;
}

// --------------------------------------------------------------------------------------------------------------
std::optional<CachedPolicy> MtaStsCache::find(std::string_view domain, std::int64_t now) const {
  std::lock_guard lock(mutex_);
  const auto it = policies_.find(domain);
  if (it == policies_.end() || it->second.expires_at <= now) return std::nullopt;
  return it->second;
}

void MtaStsCache::store(const std::string& domain, CachedPolicy policy, std::int64_t now) {
  std::lock_guard lock(mutex_);
  failed_fetches_.erase(domain);
  policies_[domain] = std::move(policy);
  // Bounded: expired entries go first, then the ones that expire soonest.
  if (policies_.size() <= max_policies_) return;
  std::erase_if(policies_, [&](const auto& entry) { return entry.second.expires_at <= now; });
  while (policies_.size() > max_policies_) {
    const auto soonest = std::min_element(policies_.begin(), policies_.end(), [](const auto& a, const auto& b) {
      return a.second.expires_at < b.second.expires_at;
    });
    policies_.erase(soonest);
  }
}

bool MtaStsCache::fetch_due(std::string_view domain, std::string_view id, std::int64_t now) const {
  std::lock_guard lock(mutex_);
  const auto cached = policies_.find(domain);
  if (cached != policies_.end() && cached->second.id == id && cached->second.expires_at > now) {
    const CachedPolicy& policy = cached->second;
    const auto refresh_at =
        policy.fetched_at + std::min(mta_sts_refresh_after, (policy.expires_at - policy.fetched_at) / 2);
    if (now < refresh_at) return false;
  }
  const auto failed = failed_fetches_.find(domain);
  return failed == failed_fetches_.end() || failed->second.id != id ||
         now - failed->second.at >= mta_sts_fetch_retry_after;
}

void MtaStsCache::fetch_failed(const std::string& domain, const std::string& id, std::int64_t now) {
  std::lock_guard lock(mutex_);
  failed_fetches_[domain] = {id, now};
  if (failed_fetches_.size() <= max_policies_) return;
  // Bounded as the policies are: the ones that no longer hold anything back go first, then the oldest.
  std::erase_if(failed_fetches_,
                [&](const auto& entry) { return now - entry.second.at >= mta_sts_fetch_retry_after; });
  while (failed_fetches_.size() > max_policies_) {
    failed_fetches_.erase(
        std::min_element(failed_fetches_.begin(), failed_fetches_.end(),
                         [](const auto& a, const auto& b) { return a.second.at < b.second.at; }));
  }
}

void MtaStsCache::set_max_policies(std::size_t max_policies) {
  std::lock_guard lock(mutex_);
  max_policies_ = max_policies;
}

std::size_t MtaStsCache::size() const {
  std::lock_guard lock(mutex_);
  return policies_.size();
}

// One line per domain: domain TAB id TAB fetched_at TAB expires_at, then TAB and each policy line (policy
// lines are printable ASCII without tabs: parse_policy checked them; they are parsed again on load); "end".
std::string MtaStsCache::serialize() const {
  std::lock_guard lock(mutex_);
  std::string out = std::string(kCacheHeader) + "\n";
  for (const auto& [domain, cached] : policies_) {
    out += domain + "\t" + cached.id + "\t" + std::to_string(cached.fetched_at) + "\t" +
           std::to_string(cached.expires_at);
    for (const auto& line : cached.policy.lines) out += "\t" + line;
    out += "\n";
  }
  return out += state_text::end_line;
}

bool MtaStsCache::deserialize(std::string_view text, std::int64_t now, std::string& error) {
  // Every line ends in a newline: a file cut inside its last line ("mx: mx1.exam") is not loaded.
  if (!text.empty() && text.back() != '\n') {
    error = "truncated (no newline at the end)";
    return false;
  }
  const std::string_view header = text.substr(0, text.find('\n'));
  if (header != kCacheHeader && header != kCacheHeaderV1) {
    error = "not a mailflowd MTA-STS cache (first line)";
    return false;
  }
  if (header == kCacheHeader) {
    const auto before_end = state_text::before_end_line(text);
    if (!before_end) {
      error = "truncated (no end line)";
      return false;
    }
    text = *before_end;
  }
  std::map<std::string, CachedPolicy, std::less<>> loaded;
  std::istringstream in{std::string(text)};
  std::string line;
  std::getline(in, line);  // the header
  int number = 1;
  while (std::getline(in, line)) {
    ++number;
    std::vector<std::string> fields;
    std::size_t start = 0;
    for (;;) {
      const auto tab = line.find('\t', start);
      fields.push_back(line.substr(start, tab == std::string::npos ? std::string::npos : tab - start));
      if (tab == std::string::npos) break;
      start = tab + 1;
    }
    const auto bad = [&](std::string_view why) {
      error = "line " + std::to_string(number) + ": " + std::string(why);
      return false;
    };
    if (fields.size() < 5 || fields[0].empty()) return bad("too few fields");
    CachedPolicy cached;
    cached.id = fields[1];
    try {
      std::size_t used = 0;
      cached.fetched_at = std::stoll(fields[2], &used);
      if (used != fields[2].size()) return bad("bad fetch time");
      cached.expires_at = std::stoll(fields[3], &used);
      if (used != fields[3].size()) return bad("bad expiry time");
    } catch (const std::exception&) {
      return bad("bad time");
    }
    std::string body;
    for (std::size_t i = 4; i < fields.size(); ++i) body += fields[i] + "\n";
    std::string why;
    auto policy = proto::mta_sts::parse_policy(body, why);
    if (!policy) return bad("invalid policy: " + why);
    cached.policy = std::move(*policy);
    loaded[fields[0]] = std::move(cached);
  }
  // Expired is measured from the newest fetch in the file, or from `now` where that is earlier, never from a
  // clock ahead of every fetch: a clock far ahead at boot (before NTP steps it) dropped every cached policy,
  // for good at the next save, and each domain in enforce mode was without its policy after the clock was
  // corrected until a fetch got through (RFC 8461 section 10.2: the cache is what defeats a blocked fetch).
  // Find() still uses only what is unexpired at its `now`.
  std::int64_t newest_fetch = std::numeric_limits<std::int64_t>::min();
  for (const auto& [domain, cached] : loaded) newest_fetch = std::max(newest_fetch, cached.fetched_at);
  const std::int64_t expired_at = std::min(now, newest_fetch);
  std::erase_if(loaded, [&](const auto& entry) { return entry.second.expires_at <= expired_at; });
  std::lock_guard lock(mutex_);
  policies_ = std::move(loaded);
  return true;
}

StateFile MtaStsCache::state_file() const { return {std::string(kCacheFile), serialize()}; }

bool MtaStsCache::load(const std::string& state_dir, std::int64_t now, std::string& error) {
  std::string text;
  error.clear();
  const auto read = read_state_file(state_dir, kCacheFile, kMaxCacheFileBytes, text, error);
  if (read == StateRead::absent) return true;
  if (read == StateRead::failed) return false;
  std::string why = error;
  if (read == StateRead::read && deserialize(text, now, why)) {
    error.clear();
    return true;
  }
  error = std::string(kCacheFile) + " is unusable (" + why + "); " +
          move_state_file_aside(state_dir, kCacheFile, now) + ", starting with an empty MTA-STS cache";
  return true;
}

// --------------------------------------------------------------------------------------------------------------
net::awaitable<PolicyState> lookup_policy(Resolver& resolver, MtaStsCache& cache, std::string domain,
                                          const MtaStsSettings& settings, std::int64_t now) {
  domain = proto::ascii_lower(domain);
  PolicyState state;
  const auto use = [&](const CachedPolicy& cached, bool from_cache) {
    state.policy = cached.policy;
    state.id = cached.id;
    state.from_cache = from_cache;
    switch (cached.policy.mode) {
      case proto::mta_sts::Mode::enforce:
        state.mode = PolicyState::Mode::enforce;
        break;
      case proto::mta_sts::Mode::testing:
        state.mode = PolicyState::Mode::testing;
        break;
      case proto::mta_sts::Mode::none:
        state.mode = PolicyState::Mode::none;
        break;
    }
  };
  const auto cached = cache.find(domain, now);
  const auto txt = co_await resolver.resolve_txt("_mta-sts." + domain);
  std::string id;  // the policy to fetch if it is due: the one the TXT record names
  if (txt.outcome != DnsOutcome::success) {
    state.detail = "_mta-sts." + domain + ": " + std::string(to_string(txt.outcome));
  } else {
    const auto record = proto::mta_sts::parse_txt_records(txt.records);
    if (record.status == proto::mta_sts::TxtLookup::Status::policy) id = record.id;
    if (record.status == proto::mta_sts::TxtLookup::Status::invalid) {
      state.failure = ResultType::sts_policy_invalid;
      state.detail = record.error;
    }
  }
  if (id.empty()) {
    // No record (or DNS trouble): a cached policy stays in force until it expires (section 5.1), and is
    // refreshed under its own id as below (an invalid record is reported instead).
    if (!cached) co_return state;
    use(*cached, true);
    if (state.failure) co_return state;
    id = cached->id;
  }
  if (!cache.fetch_due(domain, id, now)) {
    // Cached with this id and not due for its refresh; or a fetch for this id failed moments ago and was
    // reported then (RFC 8461 3.3: no further attempt within five minutes), so the mail goes on as after it.
    if (cached) use(*cached, true);
    co_return state;
  }
  auto fetched = co_await fetch_policy(co_await net::this_coro::executor, domain, settings, &resolver);
  if (fetched.status == PolicyFetch::Status::ok) {
    CachedPolicy fresh{id, *fetched.policy, now, now + fetched.policy->max_age};
    cache.store(domain, fresh, now);
    use(fresh, false);
    co_return state;
  }
  cache.fetch_failed(domain, id, now);
  if (cached) use(*cached, true);  // section 5.1: a failed refresh keeps the unexpired policy
  state.detail = fetched.detail;
  switch (fetched.status) {
    case PolicyFetch::Status::invalid:
      state.failure = ResultType::sts_policy_invalid;
      break;
    case PolicyFetch::Status::webpki_invalid:
      state.failure = ResultType::sts_webpki_invalid;
      break;
    default:
      state.failure = ResultType::sts_policy_fetch_error;
  }
  co_return state;
}

bool mx_listed(const PolicyState& state, std::string_view mx_host) {
  if (state.mode == PolicyState::Mode::none || !state.policy) return true;
  return proto::mta_sts::policy_lists(*state.policy, mx_host);
}

MxVerdict check_mx(const PolicyState& state, std::string_view mx_host, const MxTls& tls) {
  MxVerdict verdict;
  if (state.mode == PolicyState::Mode::none || !state.policy) return verdict;
  if (!proto::mta_sts::policy_lists(*state.policy, mx_host)) {
    verdict.failure = ResultType::validation_failure;
    verdict.reason = "MX host not listed in the MTA-STS policy";
  } else if (!tls.tls) {
    verdict.failure = ResultType::starttls_not_supported;
  } else if (tls.version < proto::TlsVersion::tls12) {
    verdict.failure = ResultType::validation_failure;
    verdict.reason = "TLS below 1.2";
  } else if (!tls.certificate_valid) {
    verdict.failure = tls.certificate_problem;
  }
  verdict.usable = !verdict.failure || state.mode != PolicyState::Mode::enforce;
  return verdict;
}

}  // namespace mailflow
