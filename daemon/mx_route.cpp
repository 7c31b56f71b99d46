#include "daemon/mx_route.hpp"

#include <algorithm>

#include "daemon/own_listeners.hpp"
#include "proto/hosts_file.hpp"

namespace mailflow {

std::string_view to_string(MxRoute::Result result) {
  switch (result) {
    case MxRoute::Result::deliver:
      return "deliver";
    case MxRoute::Result::null_mx:
      return "null_mx";
    case MxRoute::Result::nxdomain:
      return "nxdomain";
    case MxRoute::Result::no_addresses:
      return "no_addresses";
    case MxRoute::Result::dns_failure:
      return "dns_failure";
    case MxRoute::Result::loop:
      return "loop";
    case MxRoute::Result::address_literal:
      return "address_literal";
    case MxRoute::Result::no_domain:
      return "no_domain";
    case MxRoute::Result::local_resources:
      return "local_resources";
  }
  return "dns_failure";
}

boost::asio::awaitable<MxRoute> resolve_mx_route(Resolver& resolver, const OwnListeners& own,
                                                 std::string domain, std::uint16_t port) {
  MxRoute route;
  route.domain = std::move(domain);
  if (route.domain.empty()) {
    // RCPT TO:<postmaster> (RFC 5321 4.5.1) means the postmaster of the server it is sent to; through MX
    // delivery there is no domain to look up and so no server it could mean (an MX query for "" is a resolver
    // error, a 451 the client would retry for days). A fixed upstream relays it.
    route.result = MxRoute::Result::no_domain;
    route.reply = "550 5.1.2 Recipient address rejected: no domain to route through MX delivery";
    co_return route;
  }
  if (route.domain.starts_with('[')) {
    // RFC 5321 4.1.3: a host named by its address, not a domain whose MX hosts could be looked up (asking DNS
    // for MX of "[192.0.2.1]" gets nothing sensible). Delivering to it directly would let any client of an mx
    // upstream send to any address, internal ones included, past every policy that rests on the domain
    // (connectors by recipient domain, MTA-STS, DANE, TLS-RPT): refused, as most MX delivery is. A fixed
    // upstream relays it.
    route.result = MxRoute::Result::address_literal;
    route.reply = "550 5.1.2 Recipient address rejected: address literal " + route.domain +
                  " is not routed through MX delivery";
    co_return route;
  }
  route.mx = co_await resolver.resolve_mx(route.domain);
  switch (route.mx->status) {
    case MxResult::Status::null_mx:
      route.result = MxRoute::Result::null_mx;
      route.reply = "556 5.1.10 Recipient address rejected: " + route.domain + " accepts no mail (null MX)";
      co_return route;
    case MxResult::Status::nxdomain:
      route.result = MxRoute::Result::nxdomain;
      route.reply = "550 5.1.2 Recipient address rejected: domain " + route.domain + " does not exist";
      co_return route;
    case MxResult::Status::failed:
      if (route.mx->outcome == DnsOutcome::local_resources) {
        route.result = MxRoute::Result::local_resources;
        route.reply = dns_unavailable_reply;
        route.local_error = "MX " + route.domain + ": " + route.mx->detail;
        co_return route;
      }
      route.result = MxRoute::Result::dns_failure;
      route.reply = "451 4.4.3 Temporary DNS failure for " + route.domain + " (MX: " + route.mx->detail + ")";
      co_return route;
    case MxResult::Status::hosts:
      break;
  }
  // The hosts' addresses in preference order, a batch at a time: each batch is as many hosts as addresses are
  // still wanted (a host with an address gives one at least), its AAAA and A queries all at once, so one to
  // five MX hosts are one round, as before, and a domain with hundreds costs a few lookups, not hundreds.
  // Hosts that give no address take another round; timeouts.upstream_open bounds the rounds.
  //
  // RFC 5321 5.1: when this relay is itself one of the MX hosts, only the hosts it prefers over itself are
  // tried; none left means the mail would loop. So no host of its preference or worse is looked up once it is
  // known. A host not looked up cannot be recognized as this relay, but it comes after every host that gave
  // the addresses to try: it can only share the last one's preference (a peer, which skips us by the same
  // rule).
  const auto& plan = route.mx->plan.hosts;
  std::optional<std::uint16_t> self_preference;
  std::size_t usable = 0;  // addresses of the hosts looked up that are preferred over this relay
  std::size_t next = 0;    // the first host not looked up
  const auto may_be_tried = [&] {
    return next < plan.size() && !(self_preference && plan[next].preference >= *self_preference);
  };
  while (may_be_tried() && usable < mx_address_limit) {
    const std::size_t batch = std::min(plan.size() - next, mx_address_limit - usable);
    std::vector<std::string> names;
    for (std::size_t i = next; i < next + batch; ++i) names.push_back(plan[i].name);
    std::vector<AddressResult> addresses = co_await resolver.resolve_addresses(std::move(names));
    for (std::size_t i = 0; i < addresses.size(); ++i) {
      MxTarget& entry = route.hosts.emplace_back(MxTarget{plan[next + i], std::move(addresses[i])});
      for (const auto& address : entry.addresses.addresses)
        entry.self = entry.self || own.contains(address, port);
      if (entry.self && !self_preference) self_preference = entry.host.preference;
    }
    next += batch;
    usable = 0;
    for (const auto& entry : route.hosts)
      if (!self_preference || entry.host.preference < *self_preference)
        usable += entry.addresses.addresses.size();
  }
  route.address_limited = usable > mx_address_limit || may_be_tried();
  std::string temporary;  // the first host that may be tried and could not be looked up now, and why
  bool local = false;     // that host's lookup could not be sent (no socket: AddressResult::local_failure)
  for (auto& entry : route.hosts) {
    entry.skipped = self_preference && entry.host.preference >= *self_preference;
    if (entry.skipped) continue;
    if (temporary.empty() && entry.addresses.status == AddressResult::Status::failed) {
      temporary = entry.host.name + ": " + entry.addresses.detail;
      local = entry.addresses.local_failure();
    }
    for (const auto& address : entry.addresses.addresses) {
      if (route.attempts.size() == mx_address_limit) break;
      route.attempts.push_back(
          {entry.host.name, {address, port}, route.mx->secure && entry.addresses.secure, entry.addresses.canonical});
    }
  }
  if (!route.attempts.empty()) {
    route.result = MxRoute::Result::deliver;
  } else if (local) {
    route.result = MxRoute::Result::local_resources;
    route.reply = dns_unavailable_reply;
    route.local_error = temporary;
  } else if (!temporary.empty()) {
    // Before the loop check: a host preferred over this relay whose lookup failed for now may take the mail
    // once DNS answers, so the sender tries again (a DNS failure is never a bounce).
    route.result = MxRoute::Result::dns_failure;
    route.reply =
        "451 4.4.3 Temporary DNS failure for the MX hosts of " + route.domain + " (" + temporary + ")";
  } else if (self_preference) {
    route.result = MxRoute::Result::loop;
    route.reply = "554 5.4.6 Mail for " + route.domain + " loops back to myself";
  } else {
    route.result = MxRoute::Result::no_addresses;
    route.reply = "550 5.1.2 Recipient address rejected: no address for the mail hosts of " + route.domain;
  }
  co_return route;
}

boost::asio::awaitable<AddressResult> resolve_upstream_name(Resolver& resolver,
                                                            const ResolverSettings& settings,
                                                            std::string written,
                                                            std::vector<std::string>& asked) {
  AddressResult addresses;
  for (auto& name : proto::search_names(written, settings.search, settings.ndots, settings.hosts_records)) {
    asked.push_back(name);
    addresses = co_await resolver.resolve_addresses(std::move(name));
    if (!addresses.addresses.empty() || addresses.local_failure()) break;
  }
  co_return addresses;
}

const ResolverSettings& upstream_name_settings(const config::Upstream& upstream, const ResolverSettings& dns,
                                               const ResolverSettings& hosts) {
  return upstream.tls == config::UpstreamTls::dane ? dns : hosts;
}

}  // namespace mailflow
