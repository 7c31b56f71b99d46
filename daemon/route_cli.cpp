#include "daemon/route_cli.hpp"

#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <charconv>
#include <chrono>
#include <exception>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "daemon/cli_http.hpp"
#include "daemon/connector_match.hpp"
#include "daemon/mx_route.hpp"
#include "daemon/own_listeners.hpp"
#include "daemon/report.hpp"
#include "daemon/resolver.hpp"
#include "daemon/runtime.hpp"
#include "daemon/telemetry.hpp"
#include "proto/command.hpp"
#include "proto/server_session.hpp"

namespace mailflow {
namespace {

namespace net = boost::asio;

constexpr std::string_view kUsage =
    "usage: mailflowd route -c|--config FILE --recipient ADDRESS [--listener NAME] [--sender ADDRESS]\n"
    "                       [--client IP] [--format text|json] [--seed N]\n"
    "  --recipient  user@domain (or a bare domain) to route\n"
    "  --listener   the listener the mail arrives on (default: the first outbound listener, else the first)\n"
    "  --sender     MAIL FROM address, for connectors that match sender_domains\n"
    "  --client     the client's IP address, for connectors that match client_cidrs\n"
    "  --format     text (default) or json\n"
    "  --seed       fixes the shuffle of equal MX preferences (default: random, as the relay does)\n"
    "exit: 0 deliverable, 1 configuration error, 2 usage, 3 permanent failure, 4 temporary DNS failure\n";

std::string domain_of(std::string_view address) {
  if (address.starts_with('<') && address.ends_with('>')) address = address.substr(1, address.size() - 2);
  // A bare domain is routed as an address at it: the same domain the relay would take from RCPT.
  return proto::address_domain(address.find('@') == std::string_view::npos ? "@" + std::string(address)
                                                                           : std::string(address));
}

// The path as the relay would get it in MAIL FROM or RCPT TO: a bare domain as its postmaster.
std::string smtp_path(std::string_view address) {
  if (address.starts_with('<') && address.ends_with('>')) address = address.substr(1, address.size() - 2);
  if (!address.empty() && address.find('@') == std::string_view::npos)
    return "<postmaster@" + std::string(address) + ">";
  return "<" + std::string(address) + ">";
}

// What the relay answers when it refuses the sender or the recipient itself, before any route is chosen: the
// client conversation the relay runs (proto::ServerSession), fed EHLO, MAIL and RCPT. "" when both pass.
std::string refused_by_relay(const config::Config& config, std::string_view sender,
                             std::string_view recipient) {
  proto::ServerSession session(proto::ServerSession::Options{.hostname = config.hostname});
  session.on_line("EHLO route.invalid", false);
  const std::string mail = "MAIL FROM:" + smtp_path(sender);
  auto action = session.on_line(mail, false);
  if (action.kind != proto::ServerSession::ActionKind::begin_mail) {
    return "the relay answers " + cli::shown(mail) + " with " +
           action.reply.substr(0, action.reply.size() - 2);
  }
  session.on_mail_reply(250);
  const std::string rcpt = "RCPT TO:" + smtp_path(recipient);
  action = session.on_line(rcpt, false);
  if (action.kind != proto::ServerSession::ActionKind::forward_rcpt) {
    return "the relay answers " + cli::shown(rcpt) + " with " +
           action.reply.substr(0, action.reply.size() - 2);
  }
  return {};
}

std::string endpoint_text(const net::ip::address& address, std::uint16_t port) {
  return address.is_v6() ? "[" + address.to_string() + "]:" + std::to_string(port)
                         : address.to_string() + ":" + std::to_string(port);
}

struct Route {
  std::string recipient;
  std::string domain;
  const config::Listener* listener = nullptr;
  const config::Connector* connector = nullptr;  // null: unmatched, "internet"
  const config::Upstream* upstream = nullptr;
  MxRoute delivery;  // mx upstreams only
  // A fixed upstream whose address is a host name: the names asked (resolve_upstream_name) and the last one's
  // result; none for an IP address.
  std::vector<std::string> asked;
  std::optional<AddressResult> name_lookup;
  std::vector<std::string> fixed_attempts;  // a fixed upstream's addresses, in the order to connect
  long elapsed_ms = 0;
  std::vector<std::pair<std::string, std::uint64_t>> lookups;  // "MX success" -> count (non-zero only)
};

// A fixed upstream: deliver (an IP address, or a name with addresses), else what the relay answers the RCPT
// (451: the name has no address or its lookup failed; 451 4.4.3: the lookup could not be sent).
std::string_view fixed_result(const Route& route) {
  if (!route.fixed_attempts.empty()) return "deliver";
  if (route.name_lookup->local_failure()) return "local_resources";
  return route.name_lookup->status == AddressResult::Status::failed ? "dns_failure" : "no_addresses";
}

std::string fixed_reply(const Route& route) {
  if (!route.fixed_attempts.empty()) return {};
  return std::string(route.name_lookup->local_failure() ? dns_unavailable_reply : upstream_unavailable_text);
}

int exit_code(const Route& route) {
  if (!route.upstream->mx) return route.fixed_attempts.empty() ? 4 : 0;
  if (route.delivery.result == MxRoute::Result::deliver) return 0;
  return route.delivery.permanent() ? 3 : 4;
}

// The non-zero samples of mailflow_dns_lookups_total, read back from the exposition the daemon serves.
std::vector<std::pair<std::string, std::uint64_t>> counted_lookups(Telemetry& telemetry) {
  std::vector<std::pair<std::string, std::uint64_t>> out;
  std::istringstream in(telemetry.metrics_text());
  constexpr std::string_view prefix = "mailflow_dns_lookups_total{result=\"";
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with(prefix)) continue;
    const auto result_end = line.find('"', prefix.size());
    const auto type_start = line.find("type=\"", result_end);
    const auto type_end = line.find('"', type_start + 6);
    const auto value_at = line.rfind(' ');
    if (result_end == std::string::npos || type_start == std::string::npos || type_end == std::string::npos) continue;
    const std::uint64_t value = std::stoull(line.substr(value_at + 1));
    if (value == 0) continue;
    out.emplace_back(line.substr(type_start + 6, type_end - type_start - 6) + " " +
                         line.substr(prefix.size(), result_end - prefix.size()),
                     value);
  }
  return out;
}

// The MX hosts that were not looked up: after those that gave mx_address_limit addresses, or not preferred
// over this relay.
std::vector<std::string> not_looked_up(const MxRoute& delivery) {
  std::vector<std::string> out;
  if (!delivery.mx) return out;
  const auto& plan = delivery.mx->plan.hosts;
  for (std::size_t i = delivery.hosts.size(); i < plan.size(); ++i) out.push_back(plan[i].name);
  return out;
}

void print_lookups(const Route& route, std::ostream& out) {
  if (route.lookups.empty()) {
    out << "lookups:    none\n";
    return;
  }
  out << "lookups:    " << route.elapsed_ms << " ms: ";
  for (std::size_t i = 0; i < route.lookups.size(); ++i) {
    out << (i == 0 ? "" : ", ") << route.lookups[i].first << " " << route.lookups[i].second;
  }
  out << "\n";
}

void print_text(const Route& route, std::ostream& out) {
  out << "recipient:  " << route.recipient << " (domain " << route.domain << ")\n";
  out << "listener:   " << route.listener->name << " (" << config::to_string(route.listener->direction) << ")\n";
  if (route.connector != nullptr) {
    out << "connector:  " << route.connector->name << " (" << config::to_string(route.connector->type) << ")\n";
  } else {
    out << "connector:  internet (no connector matched)\n";
  }
  const config::Upstream& upstream = *route.upstream;
  out << "upstream:   " << upstream.name << ": ";
  if (!upstream.mx) {
    out << upstream.address.text << ", tls " << config::to_string(upstream.tls) << "\n";
    if (route.name_lookup) {
      const AddressResult& lookup = *route.name_lookup;
      out << "name lookup: ";
      for (std::size_t i = 0; i < route.asked.size(); ++i) out << (i == 0 ? "" : ", ") << route.asked[i];
      out << " ("
          << (upstream.tls == config::UpstreamTls::dane ? "DNS only, under tls: dane"
                                                        : "/etc/hosts, then DNS")
          << "): ";
      if (lookup.addresses.empty()) {
        out << "no address (AAAA " << to_string(lookup.aaaa) << ", A " << to_string(lookup.a) << ")"
            << (lookup.status != AddressResult::Status::failed || lookup.detail.empty()
                    ? ""
                    : ": " + lookup.detail);
      }
      for (std::size_t j = 0; j < lookup.addresses.size(); ++j)
        out << (j == 0 ? "" : ", ") << lookup.addresses[j].to_string();
      out << "\n";
    }
    out << "try:        " << (route.fixed_attempts.empty() ? "none" : "");
    for (std::size_t i = 0; i < route.fixed_attempts.size(); ++i)
      out << (i == 0 ? "" : ", ") << route.fixed_attempts[i];
    const std::string reply = fixed_reply(route);
    out << "\nresult:     " << fixed_result(route) << (reply.empty() ? "" : " (" + reply + ")") << "\n";
    if (route.name_lookup) print_lookups(route, out);
    return;
  }
  out << "the MX hosts of " << route.domain << ", port " << upstream.port << ", tls "
      << config::to_string(upstream.tls) << "\n";
  if (!route.delivery.mx) {
    out << "MX lookup:  none ("
        << (route.delivery.result == MxRoute::Result::no_domain ? "no domain"
                                                                : "an address literal has no MX hosts")
        << ")\n";
  } else {
    const MxResult& mx = *route.delivery.mx;
    out << "MX lookup:  " << to_string(mx.outcome) << (mx.secure ? " (DNSSEC secure)" : " (insecure)")
        << (mx.detail.empty() ? "" : ": " + mx.detail) << "\n";
    if (mx.status == MxResult::Status::hosts) {
      out << "MX plan:    " << proto::to_string(mx.plan.kind) << "\n";
      for (std::size_t i = 0; i < route.delivery.hosts.size(); ++i) {
        const auto& host = route.delivery.hosts[i];
        out << "  " << i + 1 << ". " << host.host.name << "  preference " << host.host.preference << "  ";
        if (host.self)
          out << "(this relay: skipped with every host of its preference or worse) ";
        else if (host.skipped)
          out << "(skipped: not preferred over this relay) ";
        if (host.addresses.addresses.empty()) {
          out << "no address (AAAA " << to_string(host.addresses.aaaa) << ", A "
              << to_string(host.addresses.a) << ")";
        }
        for (std::size_t j = 0; j < host.addresses.addresses.size(); ++j) {
          out << (j == 0 ? "" : ", ") << host.addresses.addresses[j].to_string();
        }
        out << "\n";
      }
      out << "try:        ";
      for (std::size_t i = 0; i < route.delivery.attempts.size(); ++i) {
        const auto& endpoint = route.delivery.attempts[i].endpoint;
        out << (i == 0 ? "" : ", ") << endpoint_text(endpoint.address(), endpoint.port());
      }
      out << "\n";
      const std::vector<std::string> rest = not_looked_up(route.delivery);
      if (!rest.empty()) {
        out << "not looked up: ";
        for (std::size_t i = 0; i < rest.size(); ++i) out << (i == 0 ? "" : ", ") << rest[i];
        out << "\n";
      }
      if (route.delivery.address_limited)
        out << "limit:      at most " << mx_address_limit << " addresses are tried (smtp_mx_address_limit)\n";
    }
  }
  out << "result:     " << to_string(route.delivery.result)
      << (route.delivery.reply.empty() ? "" : " (" + route.delivery.reply + ")") << "\n";
  print_lookups(route, out);
}

std::string quoted(std::string_view text) { return "\"" + json_escape(text) + "\""; }

void print_json(const Route& route, std::ostream& out) {
  const config::Upstream& upstream = *route.upstream;
  out << "{\"recipient\": " << quoted(route.recipient) << ", \"domain\": " << quoted(route.domain)
      << ", \"listener\": " << quoted(route.listener->name)
      << ", \"direction\": " << quoted(config::to_string(route.listener->direction))
      << ", \"connector\": " << quoted(route.connector != nullptr ? route.connector->name : "internet")
      << ", \"connector_matched\": " << (route.connector != nullptr ? "true" : "false")
      << ", \"upstream\": " << quoted(upstream.name) << ", \"mx\": " << (upstream.mx ? "true" : "false");
  if (!upstream.mx) {
    out << ", \"name_lookup\": ";
    if (!route.name_lookup) {
      out << "null";  // an IP address: nothing looked up
    } else {
      const AddressResult& lookup = *route.name_lookup;
      out << "{\"asked\": [";
      for (std::size_t i = 0; i < route.asked.size(); ++i)
        out << (i == 0 ? "" : ", ") << quoted(route.asked[i]);
      out << "], \"status\": " << quoted(to_string(lookup.status))
          << ", \"aaaa\": " << quoted(to_string(lookup.aaaa)) << ", \"a\": " << quoted(to_string(lookup.a))
          << ", \"detail\": " << quoted(lookup.detail) << ", \"addresses\": [";
      for (std::size_t j = 0; j < lookup.addresses.size(); ++j)
        out << (j == 0 ? "" : ", ") << quoted(lookup.addresses[j].to_string());
      out << "]}";
    }
    out << ", \"attempts\": [";
    for (std::size_t i = 0; i < route.fixed_attempts.size(); ++i)
      out << (i == 0 ? "" : ", ") << quoted(route.fixed_attempts[i]);
    out << "], \"result\": " << quoted(fixed_result(route)) << ", \"reply\": " << quoted(fixed_reply(route));
  } else {
    out << ", \"port\": " << upstream.port << ", \"mx_lookup\": ";
    if (!route.delivery.mx) {
      out << "null";  // an address literal: nothing looked up
    } else {
      const MxResult& mx = *route.delivery.mx;
      out << "{\"status\": " << quoted(to_string(mx.status))
          << ", \"outcome\": " << quoted(to_string(mx.outcome))
          << ", \"secure\": " << (mx.secure ? "true" : "false") << ", \"detail\": " << quoted(mx.detail)
          << ", \"plan\": "
          << quoted(mx.status == MxResult::Status::hosts ? proto::to_string(mx.plan.kind)
                                                         : std::string_view())
          << "}";
    }
    out << ", \"hosts\": [";
    for (std::size_t i = 0; i < route.delivery.hosts.size(); ++i) {
      const auto& host = route.delivery.hosts[i];
      out << (i == 0 ? "" : ", ") << "{\"name\": " << quoted(host.host.name)
          << ", \"preference\": " << host.host.preference << ", \"status\": " << quoted(to_string(host.addresses.status))
          << ", \"aaaa\": " << quoted(to_string(host.addresses.aaaa))
          << ", \"a\": " << quoted(to_string(host.addresses.a)) << ", \"self\": " << (host.self ? "true" : "false")
          << ", \"skipped\": " << (host.skipped ? "true" : "false") << ", \"addresses\": [";
      for (std::size_t j = 0; j < host.addresses.addresses.size(); ++j) {
        out << (j == 0 ? "" : ", ") << quoted(host.addresses.addresses[j].to_string());
      }
      out << "]}";
    }
    out << "], \"attempts\": [";
    for (std::size_t i = 0; i < route.delivery.attempts.size(); ++i) {
      const auto& endpoint = route.delivery.attempts[i].endpoint;
      out << (i == 0 ? "" : ", ") << quoted(endpoint_text(endpoint.address(), endpoint.port()));
    }
    out << "], \"not_looked_up\": [";
    const std::vector<std::string> rest = not_looked_up(route.delivery);
    for (std::size_t i = 0; i < rest.size(); ++i) out << (i == 0 ? "" : ", ") << quoted(rest[i]);
    out << "], \"address_limited\": " << (route.delivery.address_limited ? "true" : "false");
    out << ", \"result\": " << quoted(to_string(route.delivery.result))
        << ", \"reply\": " << quoted(route.delivery.reply);
  }
  out << ", \"elapsed_ms\": " << route.elapsed_ms << ", \"dns_lookups\": {";
  for (std::size_t i = 0; i < route.lookups.size(); ++i) {
    out << (i == 0 ? "" : ", ") << quoted(route.lookups[i].first) << ": " << route.lookups[i].second;
  }
  out << "}}\n";
}

}  // namespace

int run_route_cli(int argc, char** argv) { return run_route_cli(argc, argv, std::cout, std::cerr); }

int run_route_cli(int argc, char** argv, std::ostream& out, std::ostream& err) {
  std::string config_path;
  std::string recipient;
  std::string listener_name;
  std::string sender;
  std::string client;
  std::string format = "text";
  std::uint64_t seed = 0;
  int first = 1;
  if (argc > 1 && std::string_view(argv[1]) == "route") first = 2;
  for (int i = first; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      out << kUsage;
      return 0;
    }
    cli::ValuedOption option;
    std::string error;
    if (!cli::parse_valued_option(argc, argv, i,
                                  {"--config", "-c", "--recipient", "--listener", "--sender", "--client", "--format",
                                   "--seed"},
                                  option, error)) {
      err << "mailflowd route: "
          << cli::shown(error.empty() ? "unknown argument '" + std::string(arg) + "'" : error) << "\n"
          << kUsage;
      return 2;
    }
    const std::string_view name = option.name;
    const std::string value(option.value);
    // An empty --listener or --client (a script's empty variable) is no value, as report's options are: not
    // the default listener, nor mail from no address, whose route would be shown for the one asked about.
    if (value.empty() && (name == "--listener" || name == "--client")) {
      err << "mailflowd route: " << name << " needs a value\n" << kUsage;
      return 2;
    }
    if (name == "--config" || name == "-c") {
      config_path = value;
    } else if (name == "--recipient") {
      recipient = value;
    } else if (name == "--listener") {
      listener_name = value;
    } else if (name == "--sender") {
      sender = value;
    } else if (name == "--client") {
      client = value;
    } else if (name == "--format" && (value == "text" || value == "json")) {
      format = value;
    } else if (name == "--seed") {
      const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), seed);
      if (ec != std::errc{} || end != value.data() + value.size() || seed == 0) {
        err << "mailflowd route: --seed needs a whole number above 0\n";
        return 2;
      }
    } else {
      err << "mailflowd route: bad value '" << cli::shown(value) << "' for " << name << "\n" << kUsage;
      return 2;
    }
  }
  if (config_path.empty() || recipient.empty()) {
    err << "mailflowd route: --config and --recipient are required\n" << kUsage;
    return 2;
  }
  const auto loaded = config::load_config_file(config_path);
  if (!loaded.errors.empty()) {
    for (const auto& error : loaded.errors) err << cli::shown(error.to_string()) << "\n";
    return 1;
  }
  const config::Config& config = *loaded.config;
  // A file that the daemon would not start on (as --check-config says it): no route to show.
  const OwnListeners own(config);
  if (!own.interfaces_error().empty())
    err << "mailflowd route: warning: this host's interface addresses could not be read ("
        << cli::shown(own.interfaces_error()) << "): " << interfaces_unread_effect << "\n";
  if (const auto loops = upstream_loops(config, own); !loops.empty()) {
    for (const auto& error : loops) err << cli::shown(error.to_string()) << "\n";
    return 1;
  }
  if (const std::string refusal = refused_by_relay(config, sender, recipient); !refusal.empty()) {
    err << "mailflowd route: " << refusal << "\n";
    return 2;
  }

  Route route;
  route.recipient = recipient;
  route.domain = domain_of(recipient);
  if (!listener_name.empty()) {
    route.listener = config.find_listener(listener_name);
    if (route.listener == nullptr) {
      std::string known;
      for (const auto& listener : config.listeners) known += (known.empty() ? "" : ", ") + listener.name;
      err << "mailflowd route: no listener named '" << cli::shown(listener_name) << "' in "
          << cli::shown(config_path) << " (its listeners: " << known << ")\n";
      return 2;
    }
  } else {
    for (const auto& listener : config.listeners) {
      if (listener.direction == config::Direction::outbound) {
        route.listener = &listener;
        break;
      }
    }
    if (route.listener == nullptr) route.listener = &config.listeners.front();
  }
  MatchInput input;
  input.listener = route.listener->name;
  input.direction = route.listener->direction;
  if (!client.empty()) {
    const auto address = config::parse_ip_address(client);
    if (!address) {
      err << "mailflowd route: --client needs an IP address, got '" << cli::shown(client) << "'\n";
      return 2;
    }
    input.client_address = *address;
  }
  const std::string sender_domain = sender.empty() ? std::string() : domain_of(sender);
  input.sender_domain = sender_domain;
  input.recipient_domain = route.domain;
  route.connector = match_connector(config, input);
  const std::string& upstream_name =
      route.connector != nullptr && !route.connector->upstream.empty() ? route.connector->upstream
                                                                       : route.listener->upstream;
  route.upstream = config.find_upstream(upstream_name);
  if (route.upstream == nullptr) {  // the loader refuses such a file; kept as a guard
    err << "mailflowd route: no upstream named '" << upstream_name << "'\n";
    return 1;
  }

  const config::Upstream& upstream = *route.upstream;
  boost::system::error_code no_address;
  const auto address = net::ip::make_address(upstream.address.host, no_address);
  if (!upstream.mx && !no_address)
    route.fixed_attempts.push_back(endpoint_text(address, upstream.address.port));
  if (upstream.mx || no_address) {
    Telemetry telemetry;
    net::io_context io;
    std::exception_ptr failure;
    try {
      // The settings as the daemon's start makes them (Runtime::build): a fixed upstream's host name with
      // /etc/hosts and resolv.conf's search list, looked up by the relay's own code (resolve_upstream_name).
      const ResolverSettings dns = resolver_settings(config.dns);
      std::string hosts_problem;
      const ResolverSettings hosts = upstream.mx ? dns : fixed_upstream_settings(dns, config, hosts_problem);
      if (!hosts_problem.empty())
        err << "mailflowd route: " << cli::shown(hosts_problem) << " (names looked up in DNS only)\n";
      if (!hosts.search_problem.empty())
        err << "mailflowd route: " << cli::shown(hosts.search_problem)
            << " (no search list: names asked as written)\n";
      const ResolverSettings& settings = upstream.mx ? dns : upstream_name_settings(upstream, dns, hosts);
      Resolver resolver(io.get_executor(), settings, &telemetry, seed);
      const auto started = std::chrono::steady_clock::now();
      if (upstream.mx) {
        net::co_spawn(io, resolve_mx_route(resolver, own, route.domain, upstream.port),
                      [&](std::exception_ptr e, MxRoute delivery) {
                        failure = e;
                        route.delivery = std::move(delivery);
                      });
      } else {
        net::co_spawn(io, resolve_upstream_name(resolver, settings, upstream.address.host, route.asked),
                      [&](std::exception_ptr e, AddressResult lookup) {
                        failure = e;
                        route.name_lookup = std::move(lookup);
                      });
      }
      io.run();
      route.elapsed_ms = static_cast<long>(
          std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count());
    } catch (const std::exception& e) {
      err << "mailflowd route: " << e.what() << "\n";
      return 1;
    }
    if (failure) {
      try {
        std::rethrow_exception(failure);
      } catch (const std::exception& e) {
        err << "mailflowd route: " << e.what() << "\n";
        return 1;
      }
    }
    route.lookups = counted_lookups(telemetry);
    if (route.name_lookup) {
      // As the relay connects: each address in turn, at most mx_address_limit (UpstreamLeg::open_fixed).
      for (const auto& found : route.name_lookup->addresses)
        if (route.fixed_attempts.size() < mx_address_limit)
          route.fixed_attempts.push_back(endpoint_text(found, upstream.address.port));
    }
  }
  if (format == "json") {
    print_json(route, out);
  } else {
    print_text(route, out);
  }
  return exit_code(route);
}

}  // namespace mailflow
