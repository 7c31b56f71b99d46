// MTA-STS fetch, cache and checks; see mta_sts.hpp.
#include "daemon/mta_sts.hpp"

#include <algorithm>
#include <boost/asio/this_coro.hpp>
#include <cctype>

#include "daemon/https_client.hpp"
#include "daemon/resolver.hpp"
#include "proto/ascii.hpp"

namespace mailflow {

namespace net = boost::asio;
using proto::tlsrpt::ResultType;

namespace {

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
    case PolicyFetch::Status::local_error:
      return "local_error";
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
    // No socket for the lookup (DnsOutcome::local_resources): the relay's own failure, as for the fetch's.
    if (request.addresses.empty())
      co_return failed(addresses.local_failure() ? Status::local_error : Status::fetch_error,
                       with("cannot resolve") + (addresses.detail.empty() ? "no address" : addresses.detail));
  }

  auto response = co_await https_request(executor, std::move(request), limits);
  // The relay's own failure (its CA file, no socket): said in the step's words, but none of the domain's.
  const Status failure = response.local ? Status::local_error : Status::fetch_error;
  // A failed step: fetch_error, in the words of the step (and the library's, unless the deadline ended it).
  const auto step_failed = [&](std::string_view timed_out, std::string_view failed_to) {
    return failed(failure, response.error == Error::timed_out ? std::string(timed_out) + " " + host
                                                              : with(failed_to) + response.error_text);
  };
  switch (response.step) {
    case Step::ca_file:
      co_return failed(failure, "cannot load CA certificates: " + response.error_text);
    case Step::resolve:
      co_return failed(failure, with("cannot resolve") + response.error_text);
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
  state.txt = txt.outcome;
  state.txt_detail = txt.detail;
  if (txt.outcome == DnsOutcome::local_resources) {
    // No socket for the query: nothing is known of the domain's record, which other failures take as none
    // (section 5). As for a fetch that failed so: a cached policy stays in force, without one the MX walk
    // waits rather than deliver as though the domain published none.
    state.local_failure = true;
    state.detail = "_mta-sts." + domain + ": " + txt.detail;
    if (cached) use(*cached, true);
    co_return state;
  }
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
    cache.store(domain, fresh);
    use(fresh, false);
    co_return state;
  }
  if (cached) use(*cached, true);  // section 5.1: a failed refresh keeps the unexpired policy
  state.detail = fetched.detail;
  if (fetched.status == PolicyFetch::Status::local_error) {
    // The relay could not make the request (its CA file, no descriptor for the socket): nothing the domain
    // did or failed to do, so nothing for its TLS report, and the next message tries again.
    state.local_failure = true;
    co_return state;
  }
  cache.fetch_failed(domain, id, now);
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
