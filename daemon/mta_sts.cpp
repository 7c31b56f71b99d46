// MTA-STS fetch, cache and checks; see mta_sts.hpp.
#include "daemon/mta_sts.hpp"

#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include <algorithm>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cctype>
#include <sstream>

#include "daemon/resolver.hpp"
#include "daemon/state_file.hpp"

namespace mailflow {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using proto::tlsrpt::ResultType;

namespace {

constexpr std::string_view kCacheFile = "mta-sts.state";
constexpr std::string_view kCacheHeader = "mailflowd-mta-sts 1";
constexpr std::size_t kMaxCacheFileBytes = 64u << 20;

std::string lower(std::string_view text) {
  std::string out(text);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

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
  const std::string host = "mta-sts." + lower(domain);
  const auto deadline = std::chrono::steady_clock::now() + settings.fetch_timeout;
  const auto remaining = [&] {
    return std::max(std::chrono::steady_clock::duration::zero(), deadline - std::chrono::steady_clock::now());
  };
  std::string connect_host = host;
  std::string connect_port = "443";
  if (!settings.connect_to.empty()) {
    const auto colon = settings.connect_to.rfind(':');
    connect_host = settings.connect_to.substr(0, colon);
    connect_port = colon == std::string::npos ? "443" : settings.connect_to.substr(colon + 1);
    if (connect_host.starts_with('[') && connect_host.ends_with(']'))
      connect_host = connect_host.substr(1, connect_host.size() - 2);
  }

  net::ssl::context context(net::ssl::context::tls_client);
  beast::error_code ec;
  context.set_verify_mode(net::ssl::verify_peer);
  if (settings.ca_file.empty()) context.set_default_verify_paths(ec);
  else context.load_verify_file(settings.ca_file, ec);
  if (ec) co_return failed(Status::fetch_error, "cannot load CA certificates: " + ec.message());
  // RFC 8461 3.3: the policy host's certificate must be valid for mta-sts.<domain> and TLS 1.2 or later.
  SSL_CTX_set_min_proto_version(context.native_handle(), TLS1_2_VERSION);

  beast::ssl_stream<beast::tcp_stream> stream(executor, context);
  SSL_set_tlsext_host_name(stream.native_handle(), host.c_str());
  SSL_set1_host(stream.native_handle(), host.c_str());  // checked by OpenSSL during the handshake
  const auto with = [&](std::string_view what) { return std::string(what) + " " + host + ": "; };

  std::vector<tcp::endpoint> endpoints;
  if (resolver != nullptr && settings.connect_to.empty()) {
    // The daemon's own DNS (dns.servers, dns.timeout), as for the MX hosts.
    const AddressResult addresses = co_await resolver->resolve_addresses(host);
    for (const auto& address : addresses.addresses) endpoints.emplace_back(address, 443);
    if (endpoints.empty())
      co_return failed(Status::fetch_error,
                       with("cannot resolve") + (addresses.detail.empty() ? "no address" : addresses.detail));
  } else {
    tcp::resolver system(executor);
    // The name lookup has no timeout of its own in Asio (getaddrinfo); a timer closing the resolver bounds it.
    net::steady_timer guard(executor, remaining());
    guard.async_wait([&system](const beast::error_code& e) {
      if (!e) system.cancel();
    });
    const auto results =
        co_await system.async_resolve(connect_host, connect_port, net::redirect_error(net::use_awaitable, ec));
    guard.cancel();
    if (ec) co_return failed(Status::fetch_error, with("cannot resolve") + ec.message());
    for (const auto& entry : results) endpoints.push_back(entry.endpoint());
  }

  beast::get_lowest_layer(stream).expires_after(remaining());
  co_await beast::get_lowest_layer(stream).async_connect(endpoints, net::redirect_error(net::use_awaitable, ec));
  if (ec == beast::error::timeout) co_return failed(Status::fetch_error, with("timed out connecting to"));
  if (ec) co_return failed(Status::fetch_error, with("cannot connect to") + ec.message());

  beast::get_lowest_layer(stream).expires_after(remaining());
  co_await stream.async_handshake(net::ssl::stream_base::client, net::redirect_error(net::use_awaitable, ec));
  if (ec) {
    const long verify = SSL_get_verify_result(stream.native_handle());
    if (ec != beast::error::timeout && verify != X509_V_OK) {
      co_return failed(Status::webpki_invalid,
                       with("certificate of") + X509_verify_cert_error_string(verify));
    }
    if (ec == beast::error::timeout) co_return failed(Status::fetch_error, with("timed out in the TLS handshake with"));
    co_return failed(Status::fetch_error, with("TLS handshake failed with") + ec.message());
  }

  http::request<http::empty_body> request{http::verb::get, "/.well-known/mta-sts.txt", 11};
  request.set(http::field::host, host);
  request.set(http::field::user_agent, "mailflowd");
  request.set(http::field::connection, "close");
  beast::get_lowest_layer(stream).expires_after(remaining());
  co_await http::async_write(stream, request, net::redirect_error(net::use_awaitable, ec));
  if (ec == beast::error::timeout) co_return failed(Status::fetch_error, with("timed out sending to"));
  if (ec) co_return failed(Status::fetch_error, with("cannot send the request to") + ec.message());

  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.header_limit(16 * 1024);
  parser.body_limit(proto::mta_sts::max_policy_bytes);
  beast::get_lowest_layer(stream).expires_after(remaining());
  co_await http::async_read(stream, buffer, parser, net::redirect_error(net::use_awaitable, ec));
  if (ec && !(ec == net::ssl::error::stream_truncated && parser.is_done())) {
    if (ec == http::error::body_limit)
      co_return failed(Status::fetch_error, "policy larger than 64 KiB from " + host);
    if (ec == beast::error::timeout) co_return failed(Status::fetch_error, with("timed out reading the policy from"));
    co_return failed(Status::fetch_error, with("no valid HTTP answer from") + ec.message());
  }
  beast::get_lowest_layer(stream).socket().shutdown(tcp::socket::shutdown_both, ec);

  const auto& response = parser.get();
  // RFC 8461 3.3: HTTP redirects must not be followed; anything but 200 is a failed fetch.
  if (response.result_int() != 200) {
    std::string detail = host + " answered " + std::to_string(response.result_int());
    if (response.result_int() / 100 == 3) detail += " (redirects are not followed)";
    co_return failed(Status::fetch_error, detail);
  }
  const std::string content_type = lower(std::string(response[http::field::content_type]));
  std::string_view media = content_type;
  media = media.substr(0, media.find(';'));
  while (!media.empty() && media.back() == ' ') media.remove_suffix(1);
  if (media != "text/plain") {
    co_return failed(Status::fetch_error,
                     "Content-Type from " + host + " is not text/plain: \"" + content_type + "\"");
  }
  std::string error;
  auto policy = proto::mta_sts::parse_policy(response.body(), error);
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

void MtaStsCache::set_max_policies(std::size_t max_policies) {
  std::lock_guard lock(mutex_);
  max_policies_ = max_policies;
}

std::size_t MtaStsCache::size() const {
  std::lock_guard lock(mutex_);
  return policies_.size();
}

// One line per domain: domain TAB id TAB fetched_at TAB expires_at, then TAB and each policy line (policy lines
// are printable ASCII without tabs: parse_policy checked them; they are parsed again on load).
std::string MtaStsCache::serialize() const {
  std::lock_guard lock(mutex_);
  std::string out = std::string(kCacheHeader) + "\n";
  for (const auto& [domain, cached] : policies_) {
    out += domain + "\t" + cached.id + "\t" + std::to_string(cached.fetched_at) + "\t" +
           std::to_string(cached.expires_at);
    for (const auto& line : cached.policy.lines) out += "\t" + line;
    out += "\n";
  }
  return out;
}

bool MtaStsCache::deserialize(std::string_view text, std::int64_t now, std::string& error) {
  std::map<std::string, CachedPolicy, std::less<>> loaded;
  std::istringstream in{std::string(text)};
  std::string line;
  if (!std::getline(in, line) || line != kCacheHeader) {
    error = "not a mailflowd MTA-STS cache (first line)";
    return false;
  }
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
    if (cached.expires_at > now) loaded[fields[0]] = std::move(cached);
  }
  std::lock_guard lock(mutex_);
  policies_ = std::move(loaded);
  return true;
}

bool MtaStsCache::save(const std::string& state_dir, std::string& error) const {
  return write_state_file(state_dir, kCacheFile, serialize(), error);
}

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
  domain = lower(domain);
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
  if (txt.outcome != DnsOutcome::success) {
    // No record (or DNS trouble): a cached policy stays in force until it expires (section 5.1).
    if (cached) use(*cached, true);
    state.detail = "_mta-sts." + domain + ": " + std::string(to_string(txt.outcome));
    co_return state;
  }
  const auto record = proto::mta_sts::parse_txt_records(txt.records);
  if (record.status != proto::mta_sts::TxtLookup::Status::policy) {
    if (cached) use(*cached, true);
    if (record.status == proto::mta_sts::TxtLookup::Status::invalid) {
      state.failure = ResultType::sts_policy_invalid;
      state.detail = record.error;
    }
    co_return state;
  }
  if (cached && cached->id == record.id) {
    use(*cached, true);
    co_return state;
  }
  auto fetched = co_await fetch_policy(co_await net::this_coro::executor, domain, settings, &resolver);
  if (fetched.status == PolicyFetch::Status::ok) {
    CachedPolicy fresh{record.id, *fetched.policy, now, now + fetched.policy->max_age};
    cache.store(domain, fresh, now);
    use(fresh, false);
    co_return state;
  }
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
