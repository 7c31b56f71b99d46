#include "daemon/upstream_leg.hpp"

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <ctime>
#include <exception>
#include <map>

#include "daemon/local_shortage.hpp"
#include "daemon/log.hpp"
#include "daemon/mta_sts.hpp"
#include "daemon/mx_route.hpp"
#include "daemon/relay_session.hpp"
#include "daemon/resolver.hpp"
#include "daemon/runtime.hpp"
#include "daemon/telemetry.hpp"
#include "daemon/tls.hpp"
#include "daemon/tlsrpt.hpp"
#include "proto/client_session.hpp"

namespace mailflow {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;

namespace {

constexpr std::size_t reply_read_chunk = 4096;
constexpr auto goodbye_timeout = std::chrono::seconds(5);

const std::string upstream_unavailable_reply = std::string(upstream_unavailable_text) + "\r\n";

auto in(Deadlines::Clock::duration timeout) { return Deadlines::in(timeout); }

// The reason a lookup or connect that failed with `ec` counts under. local_resources: this host could not
// make or connect the socket (local_shortage.hpp), which says nothing about the upstream, so that
// MailflowUpstreamDown, which counts every other reason, does not page for an upstream that is fine while the
// relay itself is short.
std::string_view connect_failure_reason(const error_code& ec) {
  if (ec == asio::error::timed_out) return "connect_timeout";
  if (local_shortage(ec)) return "local_resources";
  return "connect_failed";
}

// One Resolver per event loop, i.e. per thread (daemon/resolver.hpp), held by the loop's LoopScope: made on
// first use, and again when a reload changed `dns`, the trust anchor file's content or the hosts file's
// (the settings' key), or when one of its lookups could not be sent (Resolver::spoiled(): its cache holds the
// SERVFAIL that libunbound answered then; the new context's first lookups cost a round trip each). It follows
// the newest settings (their generation): a session that began before a reload looks up with the reload's
// settings too, as the docs say ("applies to lookups from the reload on"). Before, a session asking with the
// settings of its own start replaced the loop's resolver, and the next new session replaced it back: while
// sessions from before a reload that changed `dns` were still open, every other lookup made a new libunbound
// context (a worker thread, an empty cache). Sessions hold it (shared) while they use it, so a replaced one
// lives until they are done. Outside a LoopScope (no loop of the server's) each call makes its own. Settings
// with a hosts file (Runtime::hosts_resolver, fixed upstreams' names) have a Resolver of their own, so that
// the hosts file's names never answer the MX walk's, DANE's or MTA-STS's lookups.
std::shared_ptr<Resolver> loop_resolver(const asio::any_io_executor& executor,
                                        const ResolverSettings& settings, Telemetry& telemetry) {
  LoopScope::Resources* loop = LoopScope::current();
  if (loop == nullptr) return std::make_shared<Resolver>(executor, settings, &telemetry);
  const bool hosts = !settings.hosts_file.empty();
  std::shared_ptr<Resolver>& resolver = hosts ? loop->hosts_resolver : loop->resolver;
  ResolverSettings& newest = hosts ? loop->hosts_resolver_settings : loop->resolver_settings;
  const bool newer = settings.generation > newest.generation;
  // A session from before a reload asks the host names of its own configuration's fixed upstreams: the newest
  // settings answer from /etc/hosts only the names of theirs (with_hosts_file), so a reload that renamed or
  // removed an upstream had its earlier sessions' lookups of the old name go to DNS (451 4.4.1 for a name
  // only the file has, or another address where DNS knows the name). Such a lookup gets a context of its own.
  if (hosts && resolver && !newer && settings.key != newest.key &&
      !std::includes(newest.hosts_names.begin(), newest.hosts_names.end(), settings.hosts_names.begin(),
                     settings.hosts_names.end()))
    return std::make_shared<Resolver>(executor, settings, &telemetry);
  if (!resolver || (newer && settings.key != newest.key) || resolver->spoiled()) {
    const ResolverSettings& use = !resolver || newer ? settings : newest;
    resolver = std::make_shared<Resolver>(executor, use, &telemetry);
    if (&use != &newest) newest = use;
  } else if (newer) {
    newest.generation = settings.generation;  // same key: the context is kept
  }
  return resolver;
}

std::string utc_date() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buffer[16];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%d", &tm);
  return buffer;
}

// Where `domain` wants its TLS reports (RFC 8460 3: the _smtp._tls TXT record); empty: nowhere.
asio::awaitable<std::vector<std::string>> report_addresses(Resolver& resolver, const TlsRptStore& store,
                                                           const std::string& domain) {
  const TxtResult txt = co_await resolver.resolve_txt("_smtp._tls." + domain);
  if (is_temporary(txt.outcome)) {
    // The record cannot be had now (SERVFAIL, a timeout): the domain said where its reports go when this
    // day's earlier sessions were recorded, and it did not say otherwise since. Without that, every session
    // to it during a DNS outage (often the sessions that fail) was missing from its report, which counted
    // only those of the lookups that happened to succeed. No record of the day: nothing is known, nothing
    // recorded.
    auto known = store.rua(utc_date(), domain);
    log_limited(LogLevel::warn, "tlsrpt_record",
                {{"domain", domain},
                 {"rua", known.size()},
                 {"reason", "_smtp._tls lookup failed (" + std::string(to_string(txt.outcome)) + "): " +
                                (known.empty() ? "no rua recorded for the domain today, session not recorded"
                                               : "the rua recorded for the domain today are used")}});
    co_return known;
  }
  if (txt.outcome != DnsOutcome::success) co_return std::vector<std::string>{};
  auto lookup = proto::tlsrpt::parse_txt_records(txt.records);
  if (lookup.status != proto::tlsrpt::TxtLookup::Status::report) co_return std::vector<std::string>{};
  if (lookup.rua_left_out > 0)
    log_limited(LogLevel::warn, "tlsrpt_record",
                {{"domain", domain},
                 {"rua", lookup.rua.size()},
                 {"left_out", lookup.rua_left_out},
                 {"reason", "more rua than a report goes to (the first " + std::to_string(lookup.rua.size()) +
                                " are kept)"}});
  co_return std::move(lookup.rua);
}

// RFC 8460 4.3 policy-string of a TLSA policy: "3 1 1 <hex>" per record of the RRset (4.1: "with each RR
// entry of the RR set listed"), as published: under a secure RRset of unusable records TLS is still mandatory
// (RFC 7672 2.2), and that policy is those records; only the usable ones would name none at all.
std::vector<std::string> tlsa_strings(const std::vector<proto::TlsaRecord>& records) {
  std::vector<std::string> out;
  for (const auto& record : records) {
    std::string text = std::to_string(record.usage) + " " + std::to_string(record.selector) + " " +
                       std::to_string(record.matching) + " ";
    static constexpr char kHex[] = "0123456789abcdef";
    for (const unsigned char c : record.data) {
      text += kHex[c >> 4];
      text += kHex[c & 15];
    }
    out.push_back(std::move(text));
  }
  return out;
}

// A certificate the Web PKI checks refused, as TLS-RPT names it (RFC 8460 4.3.2.2); nullopt when it is valid.
std::optional<proto::tlsrpt::ResultType> certificate_problem(long verify_error) {
  switch (certificate_verdict(verify_error)) {
    case CertificateVerdict::valid:
      return std::nullopt;
    case CertificateVerdict::expired:
      return proto::tlsrpt::ResultType::certificate_expired;
    case CertificateVerdict::host_mismatch:
      return proto::tlsrpt::ResultType::certificate_host_mismatch;
    case CertificateVerdict::not_trusted:
      break;
  }
  return proto::tlsrpt::ResultType::certificate_not_trusted;
}

// A certificate DANE refused, as TLS-RPT names it: a DANE-TA(2) chain whose anchor matched a TLSA record can
// still fail on the name (the TLSA base domain, RFC 7672 3.2.2) or on its dates (3.1.2); RFC 8460 4.3's
// certificate-host-mismatch covers "the constraints specified in the MTA-STS or DANE policy", and
// certificate-expired any certificate. tlsa-invalid is left for what it says: no record of the RRset matched
// (OpenSSL's X509_V_ERR_DANE_NO_MATCH). Any other check a matched chain fails (a leaf not valid yet, a bad
// signature below the anchor) has no result type of its own: validation-failure, not tlsa-invalid, which
// would send the domain's administrator to TLSA records that are right.
proto::tlsrpt::ResultType dane_problem(long verify_error) {
  if (dane_no_match(verify_error)) return proto::tlsrpt::ResultType::tlsa_invalid;
  switch (certificate_verdict(verify_error)) {
    case CertificateVerdict::expired:
      return proto::tlsrpt::ResultType::certificate_expired;
    case CertificateVerdict::host_mismatch:
      return proto::tlsrpt::ResultType::certificate_host_mismatch;
    case CertificateVerdict::valid:
    case CertificateVerdict::not_trusted:
      break;
  }
  return proto::tlsrpt::ResultType::validation_failure;
}

// Why an MTA-STS policy kept an MX host from being used (its `mta_sts` line).
void log_mta_sts_refusal(const std::string& id, const std::string& host, PolicyState::Mode mode,
                         proto::tlsrpt::ResultType result, std::string_view reason) {
  log_limited(LogLevel::warn, "mta_sts",
              {{"id", id},
               {"host", host},
               {"mode", to_string(mode)},
               {"result", proto::tlsrpt::to_string(result)},
               {"reason", reason}});
}

}  // namespace

UpstreamLeg::UpstreamLeg(Session session, asio::any_io_executor executor)
    : session_(session), executor_(std::move(executor)), config_(*session.runtime.config) {}

UpstreamLeg::~UpstreamLeg() = default;

proto::TlsVersion UpstreamLeg::tls_version() const {
  return link_ ? link_->tls().version : proto::TlsVersion::none;
}

std::string_view UpstreamLeg::cipher() const { return link_ ? std::string_view(link_->tls().cipher) : ""; }

std::string UpstreamLeg::address() const {
  // The address connect_to() connected to, not getpeername(): a system call per delivered message on an
  // outbound listener (issue #16), which fails (ENOTCONN) once the upstream has reset the connection after
  // its reply.
  return link_ ? address_text(peer_address_) : std::string();
}

void UpstreamLeg::cancel() {
  if (link_) link_->cancel();
  if (name_lookup_) name_lookup_->cancel();
  // The open's deadline passed during a lookup: the open is over, so are its lookups (a connect attempt's own
  // deadline leaves them alone: the next MX host's lookups still follow).
  if (open_expired())
    if (const auto dns = dns_.lock()) dns->cancel();
}

template <typename T>
asio::awaitable<T> UpstreamLeg::within_open(asio::awaitable<T> lookup) {
  session_.deadlines.arm(open_deadline_);
  T result = co_await std::move(lookup);
  error_code ignored;  // the caller asks open_expired()
  session_.deadlines.disarm(ignored);
  co_return result;
}

std::optional<UpstreamLeg::Refusal> UpstreamLeg::open_over(const config::Upstream& upstream,
                                                           const std::string& domain,
                                                           std::string_view stage) {
  if (closed_) return Refusal{upstream_unavailable_reply, {}};  // force_close() while it waited
  if (open_expired()) return open_timed_out(upstream, domain, stage);
  return std::nullopt;
}

UpstreamLeg::Refusal UpstreamLeg::open_timed_out(const config::Upstream& upstream, const std::string& domain,
                                                 std::string_view stage) {
  timed_out_ = true;
  session_.telemetry.upstream_error(upstream.name, "open_timeout");
  log_limited(LogLevel::warn, "upstream_error",
              {{"id", session_.id},
               {"upstream", upstream.name},
               {"reason", "open_timeout"},
               {"domain", domain},
               {"at", stage},
               {"timeout", config::format_duration(config_.timeouts.upstream_open)}});
  // RFC 3463 X.4.2 (bad connection) is the network status whose definition names a time-out; X.4.1 would say
  // that no host answered, which is not always so (a host that stalls after its banner does answer).
  const std::string what = upstream.mx ? "the mail hosts of " + domain : std::string("the upstream");
  return Refusal{proto::format_reply(451, "4.4.2", "Timed out connecting to " + what + ", try again later"),
                 {}};
}

void UpstreamLeg::force_close() {
  closed_ = true;
  if (link_) link_->close();
  if (name_lookup_) name_lookup_->cancel();
  if (const auto dns = dns_.lock()) dns->cancel();
}

void UpstreamLeg::release_idle_buffers() {
  in_.release_if_empty();
  if (link_) link_->release_idle_buffers();
}

void UpstreamLeg::fail(std::string_view reason) {
  const std::string name = upstream_ ? upstream_->name : "";
  session_.telemetry.upstream_error(name, reason);
  // Which address failed: a fixed upstream's host name and an MX walk may have several.
  log_limited(LogLevel::warn, "upstream_error",
              {{"id", session_.id}, {"upstream", name}, {"address", link_ ? peer_ : ""}, {"reason", reason}});
  drop();
}

void UpstreamLeg::drop() {
  if (link_) {
    link_->close();
    const TlsInfo& tls = link_->tls();
    session_.telemetry.leg_finished(session_.listener, Leg::upstream, tls.version);
    summary_ = upstream_->name + "/" + std::string(proto::to_string(tls.version)) +
               (tls.cipher.empty() ? "" : "/" + tls.cipher) + (dane_authenticated_ ? "/dane" : "");
    link_.reset();
  }
  in_.clear();
  in_.release_if_empty();
}

void UpstreamLeg::lost(const error_code& ec, std::string_view stage) {
  timed_out_ = !closed_ && ec == asio::error::timed_out;
  if (closed_) {
    drop();  // force_close() (a stop) ended the wait: the daemon's own doing, no failure of the upstream's
    return;
  }
  if (ec == asio::error::timed_out) {
    if (open_expired()) {
      drop();  // the open's own deadline, not this step's: open_timed_out() counts it
      return;
    }
    fail("timeout");  // a slow upstream is no closed one
    return;
  }
  if (!kept_unanswered_) {
    fail("connection_lost");
    return;
  }
  // The peek in open() found the kept connection open, but the upstream closed it since (or the close was
  // still on its way): the same idle close, found one step later.
  log_event(LogLevel::debug, "upstream_closed_idle",
            {{"id", session_.id}, {"upstream", upstream_->name}, {"at", stage}, {"error", ec.message()}});
  closed_idle_ = true;
  drop();
}

void UpstreamLeg::closing() { lost(asio::error::eof, "421"); }

std::size_t UpstreamLeg::write_now(std::string_view data) {
  if (!link_) return 0;
  error_code ec;
  const std::size_t sent = link_->write_now(data, ec);
  if (ec) lost(ec, "write");
  return ec ? 0 : sent;
}

asio::awaitable<bool> UpstreamLeg::write(std::string_view data, TimePoint deadline) {
  if (!link_) co_return false;
  error_code ec;
  co_await link_->write(data, deadline, ec);  // sends what the socket takes at once itself, then waits
  if (ec) {
    lost(ec, "write");
    co_return false;
  }
  co_return true;
}

asio::awaitable<std::optional<proto::Reply>> UpstreamLeg::read_reply(TimePoint deadline) {
  for (;;) {
    if (!link_) co_return std::nullopt;
    auto parsed = proto::parse_reply(in_.view());
    if (parsed.status == proto::ReplyStatus::complete) {
      in_.consume(parsed.consumed);
      if (parsed.reply.code != 421) kept_unanswered_ = false;  // a 421 is no answer but a goodbye: closing()
      co_return std::move(parsed.reply);
    }
    if (parsed.status == proto::ReplyStatus::invalid) {
      fail("protocol");
      co_return std::nullopt;
    }
    error_code ec;
    co_await link_->read_some(in_, reply_read_chunk, deadline, ec);
    if (ec) {
      lost(ec, "reply");
      co_return std::nullopt;
    }
  }
}

asio::awaitable<bool> UpstreamLeg::reset() {
  if (!co_await write("RSET\r\n", in(config_.timeouts.command))) co_return false;
  const auto reply = co_await read_reply(in(config_.timeouts.command));
  if (!reply) co_return false;
  if (reply->code == 421) {
    closing();  // the upstream closes the channel, as at any other command: no refusal of RSET
    co_return false;
  }
  if (!reply->positive()) {
    fail("rset_rejected");
    co_return false;
  }
  co_return true;
}

asio::awaitable<void> UpstreamLeg::close(bool polite) {
  if (!link_) co_return;
  if (polite) {
    const auto deadline = open_bounded(goodbye_timeout);
    error_code ec;
    co_await link_->write("QUIT\r\n", deadline, ec);
    if (!ec) {
      ReadBuffer ignored;
      co_await link_->read_some(ignored, 512, deadline, ec);
    }
    if (!ec && link_->tls_active()) {
      // close_notify (bounded by the goodbye deadline), so a strict peer sees no truncation.
      co_await link_->shutdown_tls(open_bounded(goodbye_timeout), ec);
    }
  }
  drop();
}

asio::awaitable<std::optional<UpstreamLeg::Refusal>> UpstreamLeg::open(const config::Upstream& upstream,
                                                                       const std::string& domain,
                                                                       const Client& client,
                                                                       std::string_view connector, bool polite,
                                                                       bool& reused) {
  // A connection is reused for the next transaction that routes the same way (same upstream, same domain) and
  // speaks for the same client (its HELO name may have changed with a new EHLO/HELO).
  reused = link_ && upstream_ == &upstream && domain_ == domain && client_helo_ == client.helo &&
           client_esmtp_ == client.esmtp;
  closed_idle_ = false;
  timed_out_ = false;
  if (reused && (!in_.empty() || !link_->quiet())) {
    // The upstream closed it meanwhile (Postfix does after smtpd_timeout, 10 s under stress): no error of the
    // upstream's, and no reason to refuse the transaction; it gets a new connection.
    log_event(LogLevel::debug, "upstream_closed_idle",
              {{"id", session_.id}, {"upstream", upstream_->name}, {"at", "peek"}});
    drop();
    reused = false;
  }
  kept_unanswered_ = reused;
  if (reused) co_return std::nullopt;
  open_deadline_ = in(config_.timeouts.upstream_open);
  struct OpenEnds {
    TimePoint& deadline;
    ~OpenEnds() { deadline = TimePoint::max(); }
  } open_ends{open_deadline_};
  co_await close(polite);
  if (closed_) co_return Refusal{upstream_unavailable_reply, {}};
  upstream_ = &upstream;
  domain_ = upstream.mx ? domain : std::string();
  client_helo_ = client.helo;
  client_esmtp_ = client.esmtp;
  host_.clear();
  policy_ = "none";
  if (upstream.mx) co_return co_await open_mx(upstream, domain, client, connector);
  co_return co_await open_fixed(upstream, client, connector);
}

std::shared_ptr<Resolver> UpstreamLeg::resolver(const ResolverSettings& settings, std::string& error) {
  try {
    auto dns = Resolver::share(loop_resolver(executor_, settings, session_.telemetry));
    dns_ = dns;
    return dns;
  } catch (const std::exception& e) {
    // The settings were checked at the start or reload: what fails here is the relay's own (the libunbound
    // context's socketpair or resolv.conf at the descriptor limit, memory), none of the upstream's or the
    // domain's.
    error = e.what();
    return nullptr;
  }
}

UpstreamLeg::Refusal UpstreamLeg::dns_unavailable(const config::Upstream& upstream, const std::string& domain,
                                                  std::string_view error) {
  session_.telemetry.upstream_error(upstream.name, "local_resources");
  log_limited(LogLevel::error, "dns_unavailable",
              {{"id", session_.id},
               {"upstream", upstream.name},
               {"domain", domain},
               {"reason", "local_resources"},
               {"error", error}});
  return Refusal{std::string(dns_unavailable_reply) + "\r\n", {}};
}

asio::awaitable<proto::DanePlan> UpstreamLeg::plan_dane(Resolver& resolver, const config::Upstream& upstream,
                                                        const std::string& host, const std::string& canonical,
                                                        std::uint16_t port, bool secure,
                                                        std::string& local_error) {
  if (upstream.tls != config::UpstreamTls::dane) co_return proto::DanePlan{};
  if (!secure) co_return proto::plan_dane(false, nullptr);
  // RFC 7672 2.2.3: the TLSA base domain is the host name's CNAME expansion when it is an alias (a secure address
  // answer is secure all along the chain), and the host name itself when the expansion publishes no TLSA records.
  std::vector<std::string> bases;
  if (!canonical.empty()) bases.push_back(canonical);
  bases.push_back(host);
  proto::DanePlan plan;
  std::string detail;
  for (const auto& base : bases) {
    TlsaResult tlsa = co_await resolver.resolve_tlsa("_" + std::to_string(port) + "._tcp." + base);
    std::vector<proto::TlsaRecord> rrset = tlsa.answer.records;  // as published, for the TLS report
    // A full certificate or key that is none is a malformed record, so unusable (RFC 7672 3.1): left out
    // before the plan, or OpenSSL would leave it out of the handshake, which with no record left checks the
    // Web PKI.
    std::erase_if(tlsa.answer.records,
                  [](const proto::TlsaRecord& record) { return !tlsa_data_loads(record); });
    if (tlsa.outcome == DnsOutcome::local_resources) {
      // No socket for the query: the host's records are unknown, not unlearnable (RFC 7672 2.2 would have the
      // host skipped, and TLS-RPT report it as the domain's dnssec-invalid).
      local_error = tlsa.detail;
      co_return proto::DanePlan{};
    }
    plan = proto::plan_dane(true, &tlsa.answer);
    detail = tlsa.detail;
    if (plan.kind == proto::DanePlan::Kind::none) continue;  // none there: the next name (a failure is not)
    plan.rrset = std::move(rrset);
    plan.names = bases;  // RFC 7672 3.2.2: the base domain first, the other name also a reference identifier
    if (base != plan.names.front()) std::swap(plan.names.front(), plan.names.back());
    break;
  }
  if (plan.kind == proto::DanePlan::Kind::skip) {
    log_limited(LogLevel::warn, "dane",
                {{"id", session_.id},
                 {"upstream", upstream.name},
                 {"host", host},
                 {"tlsa_base", plan.names.front()},
                 {"plan", to_string(plan.kind)},
                 {"reason", plan.why},
                 {"error", detail}});
  }
  co_return plan;
}

asio::awaitable<std::optional<UpstreamLeg::Refusal>> UpstreamLeg::open_fixed(const config::Upstream& upstream,
                                                                             const Client& client,
                                                                             std::string_view connector) {
  // timeouts.upstream_connect bounds the lookup, and each address's connect attempt with its banner on its
  // own, as in the MX walk and as Postfix gives each attempt its smtp_connect_timeout: an address that
  // black-holes (a broken IPv6 route, a dead host among several A records) leaves the next one its time.
  // timeouts.upstream_open bounds all of the open. The MX walk's bounds hold here too, as Postfix's
  // smtp_mx_address_limit and smtp_mx_session_limit hold for every destination (smtp_connect.c): a name with
  // many dead addresses would otherwise hold the client's RCPT until upstream_open.
  // A name written with the root's final dot is asked as written (proto::search_names); everything else (the
  // TLS server name and the name verified, TLSA base domain, logs) takes it without the dot, as a name in an
  // MX record comes (RFC 6066 3: no trailing dot in SNI).
  const std::string& written = upstream.address.host;
  const std::string host =
      written.size() > 1 && written.ends_with('.') ? written.substr(0, written.size() - 1) : written;
  const std::uint16_t port = upstream.address.port;
  std::string reason = "no address";
  proto::DanePlan dane;
  error_code ec;
  std::vector<tcp::endpoint> endpoints;
  if (auto address = asio::ip::make_address(written, ec); !ec) {
    endpoints.emplace_back(address, port);
  } else {
    // Through the event loop's libunbound, as the MX hosts' addresses: each lookup runs beside the others and
    // is given up at its deadline. (Asio's async_resolve ran getaddrinfo on one thread per event loop, each
    // lookup after the one before, none cut short: while the name servers were silent every session's lookup
    // waited for those queued before it, a name in /etc/hosts too, and sessions outlived their clients.)
    // Under tls: dane DNS only: DANE needs to know whether the addresses are DNSSEC-validated, which no hosts
    // file says. Otherwise /etc/hosts first, then DNS, as getaddrinfo did ("files dns"): an admin's name for
    // the mail store keeps working (Postfix needs smtp_host_lookup = dns, native for it, which asks the hosts
    // file after DNS). The MX walk asks DNS only, as Postfix's default smtp_host_lookup = dns.
    const bool dane_dns = upstream.tls == config::UpstreamTls::dane;
    const ResolverSettings& settings =
        upstream_name_settings(upstream, *session_.runtime.resolver, *session_.runtime.hosts_resolver);
    std::string dns_error;
    const auto dns = resolver(settings, dns_error);
    if (!dns) co_return dns_unavailable(upstream, {}, dns_error);
    name_lookup_ = dns;
    ec = {};  // make_address's
    // Under /etc/resolv.conf's search list as getaddrinfo was (a short name such as "mailstore", which a
    // Kubernetes pod's search list completes): each name in turn until one has addresses, all within
    // upstream_connect (its deadline gives up the lookup in flight and every later one: cancel()).
    session_.deadlines.arm(open_bounded(config_.timeouts.upstream_connect));
    std::vector<std::string> asked;
    const AddressResult addresses = co_await resolve_upstream_name(*dns, settings, written, asked);
    session_.deadlines.disarm(ec);
    name_lookup_.reset();
    if (closed_) co_return Refusal{upstream_unavailable_reply, {}};
    if (ec == asio::error::timed_out && open_expired()) co_return open_timed_out(upstream, {}, "dns");
    // No socket for the lookup: the relay's own failure, not the upstream's connect_failed.
    if (!ec && addresses.local_failure()) co_return dns_unavailable(upstream, {}, addresses.detail);
    if (!ec)
      for (const auto& address : addresses.addresses) endpoints.emplace_back(address, port);
    if (endpoints.empty()) {
      // As getaddrinfo's failures counted: timeouts.upstream_connect passed (connect_timeout), or the name
      // has no address or its lookup failed, dns.timeout included (connect_failed).
      session_.telemetry.upstream_error(upstream.name, ec ? "connect_timeout" : "connect_failed");
      reason = ec ? "connect_timeout" : "connect_failed";
      timed_out_ = static_cast<bool>(ec);
      const std::string error = ec ? "no address within timeouts.upstream_connect " +
                                         config::format_duration(config_.timeouts.upstream_connect)
                                   : addresses.detail;
      log_limited(LogLevel::warn, "upstream_error",
                  {{"id", session_.id},
                   {"upstream", upstream.name},
                   {"host", host},
                   {"reason", reason},
                   {"error", error}});
    } else if (dane_dns) {
      dane = co_await within_open(
          plan_dane(*dns, upstream, host, addresses.canonical, port, addresses.secure, dns_error));
      if (auto over = open_over(upstream, {}, "dns")) co_return over;
      if (!dns_error.empty()) co_return dns_unavailable(upstream, {}, dns_error);
    }
  }
  // Under tls: dane every TLS session is counted under the policy that governed it, as in the MX walk (there is
  // no recipient domain's policy here, so no TLS report and no domain's drill-down).
  const std::string_view policy = dane.kind == proto::DanePlan::Kind::none ? "none" : "dane";
  std::string_view limit = endpoints.size() > mx_address_limit ? "addresses" : "";
  if (endpoints.size() > mx_address_limit) endpoints.resize(mx_address_limit);
  greeted_sessions_ = 0;
  std::size_t tried = 0;
  bool hung = false;  // an address tried held its attempt until a deadline (timed_out())
  for (const auto& endpoint : endpoints) {
    if (closed_) break;  // force_close() while connecting: no next address
    ++tried;
    // Our side of this attempt's connection, once made (RFC 8460 4.3): a skipped address has none.
    local_address_.clear();
    std::optional<proto::tlsrpt::FailureKey> failure;
    bool connected = false;
    bool tls_session = false;
    if (dane.kind == proto::DanePlan::Kind::skip) {
      reason = "tls_policy";  // RFC 7672 2.2: a host whose TLSA records cannot be learned is not used
      failure = failure_key(proto::tlsrpt::ResultType::dnssec_invalid, host, endpoint, std::string(dane.why));
      // A fixed upstream has no MX attempts to count it: its errors are what says that it cannot be used.
      session_.telemetry.upstream_error(upstream.name, reason);
    } else {
      connected =
          co_await connect_to(upstream, endpoint, host, open_bounded(config_.timeouts.upstream_connect),
                              client, dane, nullptr, reason);
      tls_session = tls_session_;
      if (tls_failure_) failure = failure_key(*tls_failure_, host, endpoint, tls_failure_reason_);
    }
    hung = hung || timed_out_;
    if (upstream.tls == config::UpstreamTls::dane && (connected || tls_session || failure))
      report_session(connector, policy, {}, {}, {}, std::move(failure));
    if (connected) {
      timed_out_ = hung;  // the address that took it came after one that hung: the next open waits again
      host_ = host;
      policy_ = policy;
      co_return std::nullopt;
    }
    // The open's deadline passed during this attempt (a TLS session it got as far as is reported above).
    if (!closed_ && open_expired()) co_return open_timed_out(upstream, {}, "connect");
    if (greeted_sessions_ >= mx_session_limit && tried < endpoints.size()) {
      limit = "sessions";
      break;
    }
  }
  if (!limit.empty() && !closed_) {
    log_limited(LogLevel::info, "mx_limit",
                {{"id", session_.id},
                 {"upstream", upstream.name},
                 {"host", host},
                 {"limit", limit},
                 {"addresses", tried},
                 {"sessions", greeted_sessions_}});
  }
  timed_out_ = hung;
  co_return Refusal{upstream_unavailable_reply, {}};
}

proto::tlsrpt::FailureKey UpstreamLeg::failure_key(proto::tlsrpt::ResultType type, const std::string& host,
                                                   const tcp::endpoint& endpoint, std::string why) const {
  return proto::tlsrpt::FailureKey{type, local_address_, host, address_text(endpoint.address()), std::move(why)};
}

void UpstreamLeg::report_session(std::string_view connector, std::string_view policy, const std::string& domain,
                                 const std::vector<std::string>& rua, const proto::tlsrpt::PolicyKey& key,
                                 std::optional<proto::tlsrpt::FailureKey> failure) {
  if (connector.empty()) return;  // mailflowd's own deliveries (TLS reports) are no mail flow
  session_.telemetry.outbound_policy(connector, policy,
                                     failure ? proto::tlsrpt::to_string(failure->result) : "success", domain);
  if (!rua.empty())
    session_.telemetry.tlsrpt().record(utc_date(), TlsRptSession{domain, rua, key, std::move(failure)});
}

asio::awaitable<std::optional<UpstreamLeg::Refusal>> UpstreamLeg::open_mx(const config::Upstream& upstream,
                                                                          const std::string& domain,
                                                                          const Client& client,
                                                                          std::string_view connector) {
  // Delivery to the recipient domain's MX hosts (RFC 5321 section 5): in order, each host and address in
  // turn, each attempt with timeouts.upstream_connect of its own, all of it within timeouts.upstream_open:
  // the client waits for its RCPT reply meanwhile, and gives up after 5 minutes (RFC 5321 4.5.3.2.2
  // and 4.5.3.2.3), so a few hosts that never answer must not keep the later ones from being tried in time,
  // nor hold it past that.
  std::string dns_error;
  const auto resolver = this->resolver(*session_.runtime.resolver, dns_error);
  if (!resolver) co_return dns_unavailable(upstream, domain, dns_error);
  const MxRoute mx = co_await within_open(
      resolve_mx_route(*resolver, *session_.runtime.own_listeners, domain, upstream.port));
  if (auto over = open_over(upstream, domain, "dns")) co_return over;  // before a given-up lookup's verdict
  // No socket for the lookups: the relay's own failure, not the domain's dns_failure.
  if (mx.result == MxRoute::Result::local_resources)
    co_return dns_unavailable(upstream, domain, mx.local_error);
  if (mx.result != MxRoute::Result::deliver) {
    // A lookup waited until dns.timeout (shorter than upstream_open, else open_over() said so): the next
    // open to the domain waits as long again (libunbound keeps no record of a query that got no answer). A
    // SERVFAIL or NXDOMAIN answers at once.
    timed_out_ = mx.timed_out();
    // mailflowd's own refusal of the recipient (null MX, no such domain, a loop, DNS trouble).
    log_limited(LogLevel::info, "mx_route",
                {{"id", session_.id}, {"upstream", upstream.name}, {"domain", domain}, {"result", to_string(mx.result)}});
    co_return Refusal{mx.reply + "\r\n", to_string(mx.result)};
  }

  // What the domain publishes, once per route: its MTA-STS policy (RFC 8461) and where it wants TLS reports
  // (RFC 8460). Every TLS session to its MX hosts is counted under the policy that governed it.
  PolicyState sts;
  if (upstream.mta_sts != config::MtaStsMode::off && session_.mta_sts != nullptr) {
    MtaStsSettings settings;
    settings.ca_file = config_.mta_sts.ca_file;
    settings.fetch_timeout = config_.mta_sts.fetch_timeout;
    settings.not_after = open_deadline_;  // the fetch's deadline is its own, not the session's
    settings.max_policies = config_.mta_sts.max_policies;
    sts = co_await within_open(
        lookup_policy(*resolver, *session_.mta_sts, domain, settings, std::time(nullptr)));
    // upstreams[].mta_sts: testing never skips a host, whatever the domain publishes.
    if (upstream.mta_sts == config::MtaStsMode::testing && sts.mode == PolicyState::Mode::enforce)
      sts.mode = PolicyState::Mode::testing;
    if (sts.local_failure) {
      // The relay could not fetch the policy for a reason of its own (mta_sts.ca_file, out of descriptors):
      // no failure of the domain's (nothing reported, the next message fetches again). With no cached policy
      // to go on with, the message waits, as for an upstream socket the relay could not make.
      session_.telemetry.upstream_error(upstream.name, "local_resources");
      log_limited(LogLevel::warn, "upstream_error",
                  {{"id", session_.id},
                   {"upstream", upstream.name},
                   {"domain", domain},
                   {"reason", "local_resources"},
                   {"error", sts.detail}});
      if (!sts.policy)
        co_return Refusal{proto::format_reply(451, "4.4.1",
                                              "MTA-STS policy of " + domain +
                                                  " could not be had (local_resources), try again later"),
                          {}};
    }
  }
  std::vector<std::string> rua;
  if (!connector.empty())
    rua = co_await within_open(report_addresses(*resolver, session_.telemetry.tlsrpt(), domain));
  if (auto over = open_over(upstream, domain, "policy")) co_return over;  // lookups given up: no report
  proto::tlsrpt::PolicyKey sts_key;
  if (sts.mode != PolicyState::Mode::none || sts.failure) {
    sts_key.type = proto::tlsrpt::PolicyType::sts;
    if (sts.policy) {
      sts_key.strings = sts.policy->lines;
      sts_key.mx_hosts = sts.policy->mx;
    }
  }
  if (sts.failure) {
    // The policy could not be had (fetch error, invalid, certificate); delivery goes on (with a cached policy if
    // there is one), and the failure is reported.
    log_limited(LogLevel::warn, "mta_sts",
                {{"id", session_.id}, {"domain", domain}, {"result", proto::tlsrpt::to_string(*sts.failure)},
                 {"error", sts.detail}});
    report_session(connector, "mta-sts", domain, rua, sts_key,
                   proto::tlsrpt::FailureKey{*sts.failure, {}, {}, {}, sts.detail});
  }

  std::string reason = "no address";
  std::map<std::string, proto::DanePlan, std::less<>> dane_plans;  // per host: its addresses share it
  // Postfix's smtp_mx_session_limit: a host that greeted and then failed (EHLO refused, TLS, a policy) was a
  // session; after mx_session_limit of them the walk ends (mx_route's list holds at most mx_address_limit).
  greeted_sessions_ = 0;
  std::size_t tried = 0;
  std::string_view limit = mx.address_limited ? "addresses" : "";
  // A host of the walk held its attempt until a deadline (timed_out()): whatever the later hosts did, the
  // next walk to the domain waits for it again. So does a host whose address lookup timed out (the route
  // waited dns.timeout for it before the first connection).
  bool hung = mx.timed_out();
  for (const auto& attempt : mx.attempts) {
    ++tried;
    // RFC 8460 4.3: sending-mta-ip is our side of the connection that attempted STARTTLS. A host skipped
    // before any connection (its TLSA lookup failed, the MTA-STS policy does not list it) has none; it
    // carried the previous host's.
    local_address_.clear();
    auto plan = dane_plans.find(attempt.host);
    if (plan == dane_plans.end()) {
      proto::DanePlan dane = co_await within_open(plan_dane(
          *resolver, upstream, attempt.host, attempt.canonical, upstream.port, attempt.secure, dns_error));
      plan = dane_plans.emplace(attempt.host, std::move(dane)).first;
    }
    if (auto over = open_over(upstream, domain, "dns")) co_return over;  // no next host
    // No socket for the TLSA lookup: nothing against the host or in the domain's report, and no next host
    // (its lookups would fail alike).
    if (!dns_error.empty()) co_return dns_unavailable(upstream, domain, dns_error);
    const proto::DanePlan& dane = plan->second;
    // DANE, where it applies, governs the host (RFC 8461 2: it takes precedence over MTA-STS).
    const bool by_dane = dane.kind != proto::DanePlan::Kind::none;
    const bool by_sts = !by_dane && sts.mode != PolicyState::Mode::none;
    proto::tlsrpt::PolicyKey key = by_sts ? sts_key : proto::tlsrpt::PolicyKey{};
    if (by_dane) {
      key.type = proto::tlsrpt::PolicyType::tlsa;
      key.strings = tlsa_strings(dane.rrset);
    }
    const auto failure_of = [&](proto::tlsrpt::ResultType type, std::string why) {
      return failure_key(type, attempt.host, attempt.endpoint, std::move(why));
    };
    std::optional<proto::tlsrpt::FailureKey> failure;
    bool connected = false;
    bool tls_session = false;
    if (dane.kind == proto::DanePlan::Kind::skip) {
      reason = "tls_policy";  // RFC 7672 2.2: a host whose TLSA records cannot be learned is not used
      failure = failure_of(proto::tlsrpt::ResultType::dnssec_invalid, std::string(dane.why));
    } else if (by_sts && sts.enforced() && !mx_listed(sts, attempt.host)) {
      reason = "tls_policy";  // RFC 8461 5: only the hosts the policy lists
      failure = failure_of(proto::tlsrpt::ResultType::validation_failure, "MX host not listed in the MTA-STS policy");
      log_mta_sts_refusal(session_.id, attempt.host, sts.mode, failure->result, failure->failure_reason_code);
    } else {
      connected = co_await connect_to(upstream, attempt.endpoint, attempt.host,
                                      open_bounded(config_.timeouts.upstream_connect), client, dane,
                                      by_sts ? &sts : nullptr, reason);
      // force_close() (a stop) ended the attempt: nothing of this host's to count.
      if (closed_) co_return Refusal{upstream_unavailable_reply, {}};
      tls_session = tls_session_;
      if (tls_failure_) failure = failure_of(*tls_failure_, tls_failure_reason_);
      // The failed handshake before the plaintext retry was an attempt of its own (the retry is counted
      // below).
      if (tls_fallback_) session_.telemetry.mx_attempt(upstream.name, "tls_failed");
    }
    // A session that never reached TLS negotiation (no connection, a refused banner) is no TLS session. One
    // whose negotiation succeeded is a successful one whatever SMTP said next (RFC 8460 4.3 counts sessions
    // by their TLS negotiation). A session in plaintext that no policy asked TLS of (no STARTTLS offered,
    // opportunistic) counts under policy none, but the domain's TLS report counts TLS sessions only, so it is
    // not recorded there.
    const std::string_view policy = by_dane ? "dane" : by_sts ? "mta-sts" : "none";
    const bool reported = tls_session || failure;
    if (connected || reported)
      report_session(connector, policy, domain, reported ? rua : std::vector<std::string>{}, key,
                     std::move(failure));
    hung = hung || timed_out_;
    // The open's deadline passed during this attempt: it ends the walk, and is no failure of this host's (a
    // TLS session it got as far as is reported above).
    const bool open_timeout = !connected && !closed_ && open_expired();
    if (open_timeout) reason = "open_timeout";
    session_.telemetry.mx_attempt(upstream.name, connected ? "success" : reason);
    if (connected) {
      timed_out_ = hung;  // the host that took it came after one that hung: the next walk waits again
      host_ = attempt.host;
      policy_ = policy;
      co_return std::nullopt;
    }
    if (open_timeout) co_return open_timed_out(upstream, domain, "connect");
    if (greeted_sessions_ >= mx_session_limit && tried < mx.attempts.size()) {
      limit = "sessions";
      break;
    }
  }
  if (!limit.empty()) {
    log_limited(LogLevel::info, "mx_limit",
                {{"id", session_.id},
                 {"upstream", upstream.name},
                 {"domain", domain},
                 {"limit", limit},
                 {"addresses", tried},
                 {"sessions", greeted_sessions_}});
  }
  timed_out_ = hung;
  co_return Refusal{proto::format_reply(451, "4.4.1",
                                        "No mail host of " + domain + " could be used (last: " + reason +
                                            "), try again later"),
                    {}};
}

bool UpstreamLeg::meets_mta_sts(const PolicyState& sts, const std::string& host,
                                const ClientTls* client_tls) {
  MxTls tls;
  tls.tls = link_->tls_active();
  tls.version = link_->tls().version;
  // The Web PKI's verdict (mta_sts.ca_file), also where tls: verify trusted the chain by its own ca_file.
  auto problem = certificate_problem(link_->webpki_verdict(client_tls));
  // The certificate must be valid for the MX host name (RFC 8461 4.2), also where tls: verify checked it
  // against verify_names instead.
  if (!problem && tls.tls && !link_->certificate_matches(host))
    problem = proto::tlsrpt::ResultType::certificate_host_mismatch;
  tls.certificate_valid = !problem;
  if (problem) tls.certificate_problem = *problem;
  const MxVerdict verdict = check_mx(sts, host, tls);
  if (verdict.failure) {
    tls_failure_ = *verdict.failure;
    tls_failure_reason_ = verdict.reason;
  }
  if (verdict.usable) return true;
  log_mta_sts_refusal(session_.id, host, sts.mode, *verdict.failure, verdict.reason);
  fail("tls_policy");
  return false;
}

asio::awaitable<bool> UpstreamLeg::connect_to(const config::Upstream& upstream, const tcp::endpoint& endpoint,
                                              const std::string& tls_name, TimePoint connect_deadline,
                                              const Client& client, const proto::DanePlan& dane,
                                              const PolicyState* sts, std::string& reason, bool plaintext) {
  link_ = std::make_unique<Link>(tcp::socket(executor_), session_.deadlines);
  dane_authenticated_ = false;
  tls_session_ = false;
  if (!plaintext) {  // the retry keeps the failed TLS session's verdict: that is what is reported
    tls_fallback_ = false;
    tls_failure_.reset();
    tls_failure_reason_.clear();
  }
  local_address_.clear();
  peer_ = endpoint_text(endpoint.address(), endpoint.port());
  peer_address_ = endpoint.address();
  in_.clear();
  timed_out_ = false;
  error_code ec;
  co_await link_->connect(endpoint, connect_deadline, ec);
  if (ec) {
    link_.reset();  // never connected: no upstream leg to count
    if (closed_) co_return false;  // force_close() ended it: no failure of the upstream's
    const bool timed_out = ec == asio::error::timed_out;
    timed_out_ = timed_out;
    if (timed_out && open_expired()) {
      reason = "open_timeout";  // the open's deadline, not this host's: the caller counts it
      co_return false;
    }
    reason = connect_failure_reason(ec);
    session_.telemetry.upstream_error(upstream.name, reason);
    log_limited(LogLevel::warn, "upstream_error",
                {{"id", session_.id},
                 {"upstream", upstream.name},
                 {"address", endpoint_text(endpoint.address(), endpoint.port())},
                 {"reason", reason},
                 {"error", ec.message()}});
    co_return false;
  }
  // Only the TLS reports and policy counts of an MX walk or of DANE name it (failure_key): for any other
  // upstream a getsockname() per session would be wasted (issue #16).
  if (upstream.mx || upstream.tls == config::UpstreamTls::dane)
    if (const auto local = link_->socket().local_endpoint(ec); !ec)
      local_address_ = address_text(local.address());

  proto::ClientSession::Options options;
  options.ehlo_name = config_.hostname;
  const bool dane_mandatory =
      dane.kind == proto::DanePlan::Kind::authenticate || dane.kind == proto::DanePlan::Kind::encrypt;
  switch (upstream.tls) {
    case config::UpstreamTls::none:
      options.tls = proto::UpstreamTlsPolicy::none;
      break;
    case config::UpstreamTls::opportunistic:
      options.tls = proto::UpstreamTlsPolicy::opportunistic;
      break;
    case config::UpstreamTls::required:
    case config::UpstreamTls::verify:
      options.tls = proto::UpstreamTlsPolicy::required;
      break;
    case config::UpstreamTls::dane:
      // Secure TLSA records make TLS mandatory (RFC 7672 2.2); without them DANE does not apply.
      options.tls = dane_mandatory ? proto::UpstreamTlsPolicy::required : proto::UpstreamTlsPolicy::opportunistic;
      break;
  }
  // An enforced MTA-STS policy makes TLS mandatory (RFC 8461 5): a host without STARTTLS gets no XCLIENT
  // either.
  if (sts != nullptr && sts->enforced() && options.tls == proto::UpstreamTlsPolicy::opportunistic)
    options.tls = proto::UpstreamTlsPolicy::required;
  // A failed handshake may be retried without TLS only where nothing asks for TLS: tls: opportunistic (not
  // dane, whose TLSA records are a policy), no enforced MTA-STS policy, and no min_version (a host below it
  // is not used, and plaintext is below every version).
  const bool may_fall_back = !plaintext && upstream.tls == config::UpstreamTls::opportunistic &&
                             !upstream.min_version && options.tls == proto::UpstreamTlsPolicy::opportunistic;
  if (plaintext) options.tls = proto::UpstreamTlsPolicy::none;
  options.xclient_allowed = upstream.xclient;
  options.client_address = client.address;
  options.client_port = client.port;
  options.client_helo = client.helo;
  options.client_esmtp = client.esmtp;
  proto::ClientSession engine(options);

  using Kind = proto::ClientSession::ActionKind;
  auto action = engine.start();
  bool first_reply = true;
  reason = "failed";
  for (;;) {
    switch (action.kind) {
      case Kind::send:
        if (!in_.empty()) {
          // A reply nobody asked for (behind the banner, the EHLO reply, ...) would answer this command.
          fail("protocol");
          co_return false;
        }
        if (!co_await write(action.data, open_bounded(config_.timeouts.command))) co_return false;
        [[fallthrough]];
      case Kind::read_reply: {
        // Connecting includes the banner: an upstream that accepts and never greets is
        // "connect_timeout"-slow.
        // The setup steps keep timeouts.command, as Postfix's smtp_helo_timeout, smtp_starttls_timeout and
        // smtp_xforward_timeout (300s) do; timeouts.upstream_open bounds them all together.
        auto reply =
            co_await read_reply(first_reply ? connect_deadline : open_bounded(config_.timeouts.command));
        if (!reply) {
          // Only a banner that did not come in time is a connect timeout; a host that closed before it (or
          // sent no reply) failed otherwise, as lost() or fail() counted it.
          if (first_reply && Deadlines::Clock::now() >= connect_deadline) reason = "connect_timeout";
          co_return false;
        }
        action = engine.on_reply(*reply);
        // A session, whatever follows; the plaintext retry after a failed handshake is the same host's
        // session, counted with its TLS attempt (Postfix's smtp_connect.c retries the address without
        // counting it again).
        if (first_reply && action.kind != Kind::fail && !plaintext) ++greeted_sessions_;
        first_reply = false;
        break;
      }
      case Kind::start_tls: {
        if (!in_.empty()) {
          // CVE-2011-0411 class: nothing the upstream sent before TLS is trusted after it.
          fail("starttls_pipelining");
          co_return false;
        }
        const ClientTls* tls = session_.runtime.client_tls(upstream.name);
        error_code hs;
        const bool authenticate = dane.kind == proto::DanePlan::Kind::authenticate;
        Link::Peer peer;
        // Under DANE the TLSA base domain (RFC 7672 8.1), which is the MX host name unless that is an alias.
        peer.name = authenticate && !dane.names.empty() ? dane.names.front() : tls_name;
        peer.verify = tls->verify();
        peer.verify_names = tls->verify_names();
        peer.record_name = tls->check_names();
        peer.dane = authenticate ? &dane.records : nullptr;
        peer.dane_names = authenticate ? &dane.names : nullptr;
        co_await link_->handshake(tls->context(), &peer, open_bounded(config_.timeouts.tls_handshake), hs);
        if (hs && closed_) {
          drop();  // force_close() (a stop) ended the handshake: no verdict on this host's TLS
          co_return false;
        }
        if (hs == asio::error::timed_out && open_expired()) {
          drop();  // the open's deadline, no verdict on this host's TLS: the caller counts it
          reason = "open_timeout";
          co_return false;
        }
        if (hs) {
          timed_out_ = hs == asio::error::timed_out;  // the plaintext retry below says again
          const std::string label = handshake_failure_label(hs);
          session_.telemetry.tls_handshake_failed(session_.listener, Leg::upstream, label);
          log_limited(LogLevel::warn, "tls_failed",
                      {{"id", session_.id}, {"upstream", upstream.name}, {"leg", "upstream"}, {"reason", label}});
          // Under DANE a certificate that matches no TLSA record is RFC 8460's tlsa-invalid, a DANE-TA chain
          // that matched but names another host or has expired is said as that; one that tls: verify refused
          // is said as the Web PKI check says it (expired, another host's, untrusted).
          const long verify_error = link_->tls().verify_error;
          fail("tls_failed");
          tls_failure_ = proto::tlsrpt::ResultType::validation_failure;
          if (label == "certificate_verify_failed")
            tls_failure_ = authenticate ? dane_problem(verify_error)
                                        : certificate_problem(verify_error).value_or(*tls_failure_);
          tls_failure_reason_ = label;
          // A certificate that `verify` refuses is the policy's doing; anything else is a failed handshake.
          reason = label == "certificate_verify_failed" ? "tls_policy" : "tls_failed";
          if (!may_fall_back) co_return false;
          // RFC 7435 (opportunistic security) and Postfix's "may" level: rather than give up on the mail, the
          // same host again without TLS, within the same timeouts.upstream_open. mailflowd has no queue: a
          // 451 would leave the mail with the sending MTA, which would then deliver it to this host without
          // TLS itself.
          log_limited(LogLevel::warn, "upstream_tls_fallback",
                      {{"id", session_.id},
                       {"upstream", upstream.name},
                       {"host", tls_name},
                       {"address", endpoint_text(endpoint.address(), endpoint.port())},
                       {"reason", label}});
          tls_fallback_ = true;
          co_return co_await connect_to(upstream, endpoint, tls_name,
                                        open_bounded(config_.timeouts.upstream_connect), client, dane,
                                        nullptr, reason, true);
        }
        if (upstream.min_version && link_->tls().version < *upstream.min_version) {
          // upstreams[].min_version: this host negotiated less; the next one is tried.
          log_limited(LogLevel::warn, "tls_below_minimum",
                      {{"id", session_.id},
                       {"upstream", upstream.name},
                       {"address", endpoint_text(endpoint.address(), endpoint.port())},
                       {"tls", proto::to_string(link_->tls().version)},
                       {"reason", "below min_version " + std::string(proto::to_string(*upstream.min_version))}});
          fail("tls_policy");
          reason = "tls_policy";
          tls_failure_ = proto::tlsrpt::ResultType::validation_failure;
          tls_failure_reason_ = "below min_version " + std::string(proto::to_string(*upstream.min_version));
          co_return false;
        }
        // MTA-STS before anything more is said to the host: no EHLO, no XCLIENT to one that fails it
        // (enforce).
        if (sts != nullptr && !meets_mta_sts(*sts, tls_name, tls)) {
          reason = "tls_policy";
          co_return false;
        }
        dane_authenticated_ = authenticate;
        tls_session_ = !tls_failure_;
        action = engine.on_tls_started();
        break;
      }
      case Kind::ready:
        // Without TLS (only where the policy is not enforced: enforce makes TLS mandatory): the failure it
        // reports.
        if (sts != nullptr && !link_->tls_active() &&
            !meets_mta_sts(*sts, tls_name, session_.runtime.client_tls(upstream.name))) {
          reason = "tls_policy";
          co_return false;
        }
        if (!in_.empty()) {
          fail("protocol");  // as before a command: it would be taken as the first transaction's reply
          co_return false;
        }
        if (const auto& declined = engine.starttls_declined()) {
          // tls: opportunistic and STARTTLS offered, then refused (454): the mail goes on this connection in
          // plaintext (RFC 3207 4.1), as after a failed handshake: said as that is, not only seen as
          // tls_version="none".
          log_limited(LogLevel::warn, "upstream_tls_fallback",
                      {{"id", session_.id},
                       {"upstream", upstream.name},
                       {"host", tls_name},
                       {"address", endpoint_text(endpoint.address(), endpoint.port())},
                       {"reason", "starttls_rejected"},
                       {"reply", std::to_string(declined->code) + " " +
                                     (declined->lines.empty() ? std::string() : declined->lines.front())}});
        }
        extensions_ = engine.extensions();
        co_return true;
      case Kind::fail: {
        const std::string said = action.reply.lines.empty() ? "" : action.reply.lines.front();
        log_limited(LogLevel::warn, "upstream_refused",
                    {{"id", session_.id}, {"upstream", upstream.name}, {"reason", action.reason}, {"reply", said}});
        fail(action.reason);
        // A 421 to STARTTLS is the host closing (as at any other step), not a refusal of TLS.
        const bool tls_refused =
            (action.reason == "starttls_unavailable" || action.reason == "starttls_rejected") &&
            action.reply.code != 421;
        if (tls_refused) {
          tls_failure_ = proto::tlsrpt::ResultType::starttls_not_supported;
          tls_failure_reason_ = std::string(action.reason);
          if (sts != nullptr && sts->enforced())
            log_mta_sts_refusal(session_.id, tls_name, sts->mode, *tls_failure_, tls_failure_reason_);
        }
        reason = action.reason == "greeting_rejected" ? "banner_rejected"
                 : tls_refused                          ? "tls_policy"
                                                        : "failed";
        co_return false;
      }
    }
  }
}

}  // namespace mailflow
