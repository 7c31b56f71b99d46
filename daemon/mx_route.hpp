#pragma once
// Where mail for a domain goes through an `mx: true` upstream: the MX lookup, the hosts' addresses, the
// RFC 5321 5.1 rule for a relay that is itself one of the MX hosts, and the SMTP reply when the domain cannot
// be delivered to. One piece of code for the relay (which then connects in `attempts` order) and for
// `mailflowd route` (which prints it).
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <algorithm>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "daemon/resolver.hpp"

namespace mailflow {

class OwnListeners;

// Postfix's bounds on a delivery's walk of the MX hosts (smtp_mx_address_limit, smtp_mx_session_limit, with
// their defaults): the addresses tried, in MX preference order (a host without an address does not count),
// and the sessions that got a banner. A domain with hundreds of MX hosts must not make the relay send DNS
// queries and connections to hundreds of addresses of the domain's choosing for one recipient.
constexpr std::size_t mx_address_limit = 5;
constexpr std::size_t mx_session_limit = 2;

// The reply to a recipient whose route this relay cannot look up for a reason of its own: its DNS resolver
// could not be made, or a lookup could not be sent (MxRoute::Result::local_resources, a TLSA lookup).
inline constexpr std::string_view dns_unavailable_reply =
    "451 4.4.3 DNS resolver unavailable, try again later";

// The reply to a recipient whose fixed upstream could not be reached (its host name has no address, or its
// lookup failed).
inline constexpr std::string_view upstream_unavailable_text =
    "451 4.4.1 Upstream unavailable, try again later";

struct MxTarget {
  proto::MxHost host;
  AddressResult addresses;
  bool self = false;     // an address of it is one of our own listeners
  bool skipped = false;  // not tried: this relay is an MX host at its preference or better
};

struct MxRoute {
  struct Attempt {
    std::string host;  // the MX host name (what a certificate is checked against)
    boost::asio::ip::tcp::endpoint endpoint;
    bool secure = false;  // the MX answer and the host's addresses were DNSSEC-validated (DANE may apply)
    std::string canonical;  // the host name's CNAME expansion ("" when it is no alias; AddressResult::canonical)
  };
  std::string domain;
  std::optional<MxResult> mx;
  std::vector<MxTarget> hosts;    // those looked up, in the plan's order (mx->plan.hosts may name more)
  std::vector<Attempt> attempts;  // in the order to connect, at most mx_address_limit
  bool address_limited = false;   // mx_address_limit left hosts unlooked-up or addresses untried
  // local_resources: the lookups could not be sent, this process could not make a socket for them
  // (DnsOutcome::local_resources): no failure of the domain's (not counted in mailflow_rejects_total).
  enum class Result {
    deliver,
    null_mx,
    nxdomain,
    no_addresses,
    dns_failure,
    loop,
    address_literal,
    no_domain,
    local_resources
  };
  Result result = Result::dns_failure;
  std::string reply;  // the reply to the RCPT instead of delivering (empty with deliver)
  std::string local_error;  // local_resources: which lookup could not be sent, and why
  bool permanent() const {
    return result != Result::deliver && result != Result::dns_failure && result != Result::local_resources;
  }
  // A lookup of the route got no answer within dns.timeout (DnsOutcome::timeout): the MX query, or the AAAA
  // or A query of a host looked up (its batch waited for it, whatever the other hosts gave).
  bool timed_out() const {
    return (mx && mx->outcome == DnsOutcome::timeout) ||
           std::any_of(hosts.begin(), hosts.end(), [](const MxTarget& host) {
             return host.addresses.aaaa == DnsOutcome::timeout || host.addresses.a == DnsOutcome::timeout;
           });
  }
};
// deliver, null_mx, nxdomain, no_addresses, dns_failure, loop, address_literal, no_domain, local_resources
std::string_view to_string(MxRoute::Result result);

// Resolves `domain`'s route for delivery on `port`; every lookup goes through `resolver` (and is counted
// there). The hosts are looked up in preference order, a few at a time, until they give mx_address_limit
// addresses (or the next host is not preferred over this relay). An address literal ("[192.0.2.1]") has no MX
// hosts: address_literal (550 5.1.2), nothing looked up; nor has an empty domain (RCPT TO:<postmaster>):
// no_domain (550 5.1.2), nothing looked up.
boost::asio::awaitable<MxRoute> resolve_mx_route(Resolver& resolver, const OwnListeners& own,
                                                 std::string domain, std::uint16_t port);

// A fixed upstream's host name (its address as written, a final dot included) looked up as the relay looks it
// up at each new connection (UpstreamLeg) and as `mailflowd route` shows it, one piece of code for both: the
// settings of upstream_name_settings(), each of proto::search_names() in turn (resolv.conf's search list, a
// name of the hosts file as written) until one has addresses or a lookup could not be sent. `asked` gets the
// names asked, in order; the result is the last one's.
boost::asio::awaitable<AddressResult> resolve_upstream_name(Resolver& resolver,
                                                            const ResolverSettings& settings,
                                                            std::string written,
                                                            std::vector<std::string>& asked);
// The settings a fixed upstream's host name is looked up with: `dns` (DNS only, no search list) under tls:
// dane, which needs to know whether the addresses are DNSSEC-validated (no hosts file says so), else `hosts`
// (/etc/hosts first, the search list: fixed_upstream_settings()).
const ResolverSettings& upstream_name_settings(const config::Upstream& upstream, const ResolverSettings& dns,
                                               const ResolverSettings& hosts);

}  // namespace mailflow
