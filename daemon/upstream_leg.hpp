#pragma once
// The upstream side of one relayed session: where a route is delivered (a fixed upstream's address, or the
// recipient domain's MX hosts in turn, RFC 5321 section 5), the connection to it (connect, banner, EHLO,
// STARTTLS and the upstream's TLS policy, XCLIENT), its reuse for the next transaction of the same route, and
// the commands and replies that go over it. One per session, on the session's event loop; every wait goes
// through the session's Deadlines. The transaction rules themselves are proto::RelayTransaction's.
#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "daemon/deadlines.hpp"
#include "daemon/link.hpp"
#include "daemon/read_buffer.hpp"
#include "proto/client_session.hpp"
#include "proto/dane.hpp"
#include "proto/reply.hpp"
#include "proto/tls_version.hpp"
#include "proto/tlsrpt.hpp"

namespace mailflow {

struct Runtime;
class MtaStsCache;
class Resolver;
struct ResolverSettings;
class Telemetry;
struct PolicyState;

class UpstreamLeg {
 public:
  using TimePoint = Deadlines::Clock::time_point;

  // What the leg needs of its session, for its whole life.
  struct Session {
    const Runtime& runtime;
    Telemetry& telemetry;
    Deadlines& deadlines;
    const std::string& id;        // the session id, for logs
    const std::string& listener;  // the listener's name, for telemetry
    MtaStsCache* mta_sts = nullptr;  // the daemon's MTA-STS policies (null: upstreams[].mta_sts is not applied)
  };
  // The real client, for XCLIENT (and the EHLO name after it).
  struct Client {
    std::string address;
    std::uint16_t port = 0;
    std::string helo;
    bool esmtp = true;
  };
  // Why a route cannot be used: the reply its recipient gets (wire form), and the reason to count as
  // mailflowd's own refusal of it (empty when the refusal is the upstream's or the network's).
  struct Refusal {
    std::string reply;
    std::string_view reason;
  };

  UpstreamLeg(Session session, boost::asio::any_io_executor executor);
  ~UpstreamLeg();
  UpstreamLeg(const UpstreamLeg&) = delete;
  UpstreamLeg& operator=(const UpstreamLeg&) = delete;

  // Connected for `upstream` (and for mx upstreams the recipient `domain`): the current connection when it
  // already goes there (`reused`), else a new one (the old one is closed first, with QUIT when `polite`).
  // Opening a new one (the old one's QUIT, DNS, MTA-STS, every connect attempt, banner, EHLO, STARTTLS,
  // XCLIENT, EHLO again) ends within timeouts.upstream_open, whatever each step's own timeout: 451 4.4.2 when
  // it passes. `connector`: whose mail it is (mailflow_outbound_policy_total and TLS-RPT); empty for
  // mailflowd's own deliveries (the TLS reports it sends), which are neither counted nor reported.
  boost::asio::awaitable<std::optional<Refusal>> open(const config::Upstream& upstream, const std::string& domain,
                                                      const Client& client, std::string_view connector,
                                                      bool polite, bool& reused);
  // False when the connection is gone (it was dropped and counted, or there was none).
  boost::asio::awaitable<bool> write(std::string_view data, TimePoint deadline);
  // What the connection takes at once, without waiting or a coroutine: the bytes sent (all of a command or DATA
  // block, nearly always); 0 with TLS, without a connection or after a failure (dropped and counted). write()
  // sends the rest.
  std::size_t write_now(std::string_view data);
  // The next reply, within `deadline` however many reads it takes; nullopt when the connection was lost,
  // timed out or sent garbage (dropped and counted).
  boost::asio::awaitable<std::optional<proto::Reply>> read_reply(TimePoint deadline);
  // The upstream sent more than the replies read so far (already received, no look at the socket).
  bool unread() const { return !in_.empty(); }
  // RSET; false when refused (rset_rejected), answered 421 (closing()) or lost (the connection is dropped then).
  boost::asio::awaitable<bool> reset();
  // Closes the connection, with QUIT when `polite`; no-op without one.
  boost::asio::awaitable<void> close(bool polite);
  // The connection failed for `reason` (mailflow_upstream_errors_total): counted, logged, dropped.
  void fail(std::string_view reason);
  // read_reply() returned a 421: the upstream is closing the connection (RFC 5321 3.8), lost as at its end of
  // stream: dropped and counted as connection_lost, or a kept connection's idle close (closed_idle()).
  void closing();
  // The connection last lost (write(), write_now(), read_reply() failed) was a kept one that the upstream had
  // closed (write error, end of stream, reset) before it answered anything since open() kept it: its idle
  // close, logged at debug as upstream_closed_idle and not counted; proto::RelayTransaction replays the
  // transaction.
  bool closed_idle() const { return closed_idle_; }
  // The last open() was refused, or the connection was last lost, because a deadline passed
  // (timeouts.upstream_open; dns.timeout of the route's MX or address lookups; for any host or address the
  // refused open tried, upstream_connect, tls_handshake or a reply's timeout, even where a later one refused
  // at once; for a connection, a reply's timeout): the far side hangs rather than refuses, and the next open
  // to it waits as long again. Right after an open() that connected: a lookup of its route timed out, or a
  // host or address it tried before the one that took it hung. The TLS reports' sender skips such a rua
  // domain for the rest of its run (tlsrpt_sender.cpp).
  bool timed_out() const { return timed_out_; }

  void cancel();  // the watchdog: cancel whatever is in flight
  // Shutdown (another thread's request, posted): close the socket and give up a name lookup in flight; from
  // now on open() refuses at once and no connection is made, so the session ends itself without delay.
  void force_close();
  void drop();         // close the connection without a word and count its leg
  void release_idle_buffers();

  bool connected() const { return link_ != nullptr; }
  const proto::UpstreamExtensions& extensions() const { return extensions_; }
  proto::TlsVersion tls_version() const;
  std::string_view cipher() const;  // of the current connection's TLS ("" without)
  // The far side of the current connection: its address ("203.0.113.7", the one connected to) and host name
  // (the MX host, or the fixed upstream's configured host).
  std::string address() const;
  const std::string& host() const { return host_; }
  // The policy that governed the current connection: "dane", "mta-sts" or "none".
  std::string_view policy() const { return policy_; }
  // "name/TLS1.2/cipher" of the last connection that ended ("/dane" when DANE authenticated it), for the
  // session's log line.
  const std::string& summary() const { return summary_; }

 private:
  // One connection attempt (connect, banner, EHLO, STARTTLS per policy, XCLIENT): false with `reason` set
  // (one of reasons::mx_attempts; "open_timeout", uncounted, when timeouts.upstream_open passed).
  // `dane`: what DANE asks of this host (kind none unless tls: dane). `sts`: the MTA-STS policy that governs
  // this MX host `tls_name` (null: none); it is checked right after the handshake, before anything else is
  // said to the host (RFC 8461 5: under enforce one that fails it gets nothing more), and under enforce TLS
  // is mandatory.
  // Under tls: opportunistic (without min_version) a failed handshake is followed by a new connection to the
  // same host without STARTTLS (`plaintext`, see tls_fallback_), as Postfix's "may" level does: a host whose
  // TLS does not work with ours still gets the mail. The failed TLS session stays in tls_failure_, to be
  // reported.
  boost::asio::awaitable<bool> connect_to(const config::Upstream& upstream,
                                          const boost::asio::ip::tcp::endpoint& endpoint,
                                          const std::string& tls_name, TimePoint connect_deadline,
                                          const Client& client, const proto::DanePlan& dane,
                                          const PolicyState* sts, std::string& reason,
                                          bool plaintext = false);
  // tls: dane: the TLSA records of `host` (when its DNS is `secure`; first those of its CNAME expansion
  // `canonical`, when it is an alias) and what they ask. The MX walk and a fixed upstream both plan with it.
  // `local_error`: set (and the plan not to be used) when a TLSA lookup could not be sent for a reason of
  // this relay's own (DnsOutcome::local_resources): nothing is known about the host's records.
  boost::asio::awaitable<proto::DanePlan> plan_dane(Resolver& resolver, const config::Upstream& upstream,
                                                    const std::string& host, const std::string& canonical,
                                                    std::uint16_t port, bool secure,
                                                    std::string& local_error);
  boost::asio::awaitable<std::optional<Refusal>> open_fixed(const config::Upstream& upstream, const Client& client,
                                                            std::string_view connector);
  // The event loop's for `settings` (the runtime's resolver, or its hosts_resolver for a fixed upstream's
  // host name), shared for this leg's lookups (force_close() gives them up); null when it cannot be made (the
  // libunbound context at the descriptor limit), `error` saying why (for dns_unavailable()).
  std::shared_ptr<Resolver> resolver(const ResolverSettings& settings, std::string& error);
  // The relay's DNS cannot work now for a reason of its own (the resolver cannot be made, a lookup could not
  // be sent: out of descriptors): counted as upstream_errors local_resources for `upstream` (no failure of
  // the upstream's or the domain's, so MailflowUpstreamDown leaves it out), logged `dns_unavailable` with
  // `domain` (when there is one) and `error`, and the recipient's 451 4.4.3 (mx_route.hpp
  // dns_unavailable_reply).
  Refusal dns_unavailable(const config::Upstream& upstream, const std::string& domain,
                          std::string_view error);
  boost::asio::awaitable<std::optional<Refusal>> open_mx(const config::Upstream& upstream,
                                                         const std::string& domain, const Client& client,
                                                         std::string_view connector);
  // One TLS session under `policy` (dane, mta-sts, none): counted for `connector` in mailflow_outbound_policy_total
  // (a failure also against the recipient `domain`, when given) and, where the domain wants TLS reports (`rua`),
  // recorded for them. Nothing for mailflowd's own deliveries (`connector` empty).
  void report_session(std::string_view connector, std::string_view policy, const std::string& domain,
                      const std::vector<std::string>& rua, const proto::tlsrpt::PolicyKey& key,
                      std::optional<proto::tlsrpt::FailureKey> failure);
  // A TLS-RPT failure of the session to `host` at `endpoint` (our side: this attempt's connection's; none
  // where the attempt made no connection).
  proto::tlsrpt::FailureKey failure_key(proto::tlsrpt::ResultType type, const std::string& host,
                                        const boost::asio::ip::tcp::endpoint& endpoint, std::string why) const;
  // The MTA-STS check (RFC 8461 4) of the connection just made to MX host `host`: after the handshake, or
  // where it goes on without TLS. A failure is kept in tls_failure_ (TLS-RPT); false when the policy is
  // enforced and the host fails it (the connection is then closed without another word).
  bool meets_mta_sts(const PolicyState& sts, const std::string& host, const ClientTls* tls);
  // A write or read of the connection failed with `ec` at `stage` ("write", "reply"): its idle close (see
  // closed_idle()) or a failure counted as `timeout` or `connection_lost` (or the open's timeout, counted by
  // open_timed_out()).
  void lost(const boost::system::error_code& ec, std::string_view stage);

  // timeouts.upstream_open: the deadline of the open() in progress (max outside one). Every step of an open
  // waits at most until then; a lookup (DNS, the MTA-STS policy), which has no deadline of the session's own,
  // is armed with it by within_open(), and the watchdog (cancel()) gives up the session's lookups once it has
  // passed.
  bool open_expired() const { return Deadlines::Clock::now() >= open_deadline_; }
  TimePoint open_bounded(Deadlines::Clock::duration timeout) const {
    return std::min(Deadlines::in(timeout), open_deadline_);
  }
  template <typename T>
  boost::asio::awaitable<T> within_open(boost::asio::awaitable<T> lookup);
  // The open ran out of time at `stage` ("dns", "policy", "connect"): counted (upstream_errors open_timeout),
  // logged, and the recipient's 451 4.4.2.
  Refusal open_timed_out(const config::Upstream& upstream, const std::string& domain, std::string_view stage);
  // After a wait of the open (a lookup): its refusal when the open ends there, because force_close() came
  // meanwhile or timeouts.upstream_open passed (open_timed_out() at `stage`); nullopt to go on.
  std::optional<Refusal> open_over(const config::Upstream& upstream, const std::string& domain,
                                   std::string_view stage);

  Session session_;
  boost::asio::any_io_executor executor_;
  const config::Config& config_;
  std::shared_ptr<Resolver>
      name_lookup_;  // a fixed upstream's host name being looked up (cancel() gives it up)
  std::weak_ptr<Resolver> dns_;                             // what resolver() gave for the open() in progress
  bool closed_ = false;                                     // force_close(): the session is being closed
  TimePoint open_deadline_ = TimePoint::max();              // see open_expired()
  const config::Upstream* upstream_ = nullptr;
  std::string domain_;  // mx upstreams: the recipient domain whose MX host this is
  // The client's HELO name and ESMTP-ness the connection was opened with (XCLIENT HELO=/PROTO=, EHLO after it):
  // a client that greets again with another name gets a new connection, not one that speaks for the old one.
  std::string client_helo_;
  bool client_esmtp_ = true;
  std::string host_;
  std::unique_ptr<Link> link_;
  ReadBuffer in_;
  proto::UpstreamExtensions extensions_;
  bool dane_authenticated_ = false;  // the current connection's certificate matched a TLSA record
  std::string_view policy_ = "none";
  // Why the last connect_to() failed in TLS (TLS-RPT result type and reason), when it did, or what the
  // MTA-STS check found where a testing policy let the connection go on; a connection that never reached
  // STARTTLS is no TLS session and leaves it empty.
  std::optional<proto::tlsrpt::ResultType> tls_failure_;
  std::string tls_failure_reason_;
  // The last connect_to() negotiated TLS and the policy's checks passed: a successful TLS session (RFC 8460),
  // whatever SMTP said next (EHLO refused, connection lost).
  bool tls_session_ = false;
  bool tls_fallback_ = false;  // the last connect_to()'s handshake failed and it went on without TLS
  std::size_t greeted_sessions_ = 0;  // connections whose banner was 2xx, for open_mx's mx_session_limit
  std::string local_address_;         // our side (TLS-RPT's sending-mta-ip); MX walks and DANE only
  std::string peer_;           // its far side, "203.0.113.7:25", for its upstream_error lines
  boost::asio::ip::address peer_address_;  // its far side's address, for address()
  bool kept_unanswered_ = false;  // open() kept the connection, and it has not answered anything since
  bool closed_idle_ = false;      // see closed_idle()
  bool timed_out_ = false;        // see timed_out()
  std::string summary_;
};

}  // namespace mailflow
