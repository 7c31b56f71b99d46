#include "daemon/mx_route.hpp"

#include "daemon/own_listeners.hpp"

namespace mailflow {

namespace {
constexpr std::size_t max_parallel_hosts = 32;  // MX hosts whose addresses are looked up at once
}  // namespace

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
      route.result = MxRoute::Result::dns_failure;
      route.reply = "451 4.4.3 Temporary DNS failure for " + route.domain + " (MX: " + route.mx->detail + ")";
      co_return route;
    case MxResult::Status::hosts:
      break;
  }
  // The hosts' addresses at once, up to max_parallel_hosts of them (a huge MX RRset must not flood the
  // resolver): a domain whose MX hosts never answer costs one dns.timeout per such group, not one per host.
  const auto& plan = route.mx->plan.hosts;
  for (std::size_t first = 0; first < plan.size(); first += max_parallel_hosts) {
    std::vector<std::string> names;
    for (std::size_t i = first; i < plan.size() && i < first + max_parallel_hosts; ++i)
      names.push_back(plan[i].name);
    std::vector<AddressResult> addresses = co_await resolver.resolve_addresses(std::move(names));
    for (std::size_t i = 0; i < addresses.size(); ++i)
      route.hosts.push_back(MxTarget{plan[first + i], std::move(addresses[i])});
  }
  // RFC 5321 5.1: when this relay is itself one of the MX hosts, only the hosts it prefers over itself are
  // tried; none left means the mail would loop.
  std::optional<std::uint16_t> self_preference;
  for (auto& entry : route.hosts) {
    for (const auto& address : entry.addresses.addresses)
      entry.self = entry.self || own.contains(address, port);
    if (entry.self && !self_preference) self_preference = entry.host.preference;
  }
  std::string temporary;  // the first host that may be tried and could not be looked up now, and why
  for (auto& entry : route.hosts) {
    entry.skipped = self_preference && entry.host.preference >= *self_preference;
    if (entry.skipped) continue;
    if (temporary.empty() && entry.addresses.status == AddressResult::Status::failed)
      temporary = entry.host.name + ": " + entry.addresses.detail;
    for (const auto& address : entry.addresses.addresses)
      route.attempts.push_back(
          {entry.host.name, {address, port}, route.mx->secure && entry.addresses.secure, entry.addresses.canonical});
  }
  if (!route.attempts.empty()) {
    route.result = MxRoute::Result::deliver;
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

}  // namespace mailflow
