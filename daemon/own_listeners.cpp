#include "daemon/own_listeners.hpp"

#include <ifaddrs.h>
#include <netinet/in.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace mailflow {
namespace {

namespace net = boost::asio;

// ::ffff:192.0.2.1 and 192.0.2.1 are the same host.
net::ip::address unmapped(const net::ip::address& address) {
  if (address.is_v6() && address.to_v6().is_v4_mapped()) {
    return net::ip::make_address_v4(net::ip::v4_mapped, address.to_v6());
  }
  return address;
}

// The addresses of this host's interfaces; `error` says why there are none when getifaddrs(3) fails.
std::vector<net::ip::address> interface_addresses(std::string& error) {
  std::vector<net::ip::address> out;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) {
    error = std::string("getifaddrs: ") + std::strerror(errno);
    return out;
  }
  for (const ifaddrs* entry = list; entry != nullptr; entry = entry->ifa_next) {
    if (entry->ifa_addr == nullptr) continue;
    if (entry->ifa_addr->sa_family == AF_INET) {
      net::ip::address_v4::bytes_type bytes;
      std::memcpy(bytes.data(), &reinterpret_cast<const sockaddr_in*>(entry->ifa_addr)->sin_addr, 4);
      out.emplace_back(net::ip::address_v4(bytes));
    } else if (entry->ifa_addr->sa_family == AF_INET6) {
      net::ip::address_v6::bytes_type bytes;
      std::memcpy(bytes.data(), &reinterpret_cast<const sockaddr_in6*>(entry->ifa_addr)->sin6_addr, 16);
      out.emplace_back(net::ip::address_v6(bytes));
    }
  }
  ::freeifaddrs(list);
  return out;
}

}  // namespace

OwnListeners::OwnListeners(const config::Config& config) : OwnListeners(config, {}) {
  for (const auto& address : interface_addresses(interfaces_error_)) local_.insert(unmapped(address));
}

OwnListeners::OwnListeners(const config::Config& config, std::vector<net::ip::address> addresses) {
  for (const auto& listener : config.listeners) {
    boost::system::error_code ec;
    const auto address = net::ip::make_address(listener.address.host, ec);
    if (!ec) listeners_.push_back(Bound{unmapped(address), listener.address.port, listener});
  }
  for (const auto& address : addresses) local_.insert(unmapped(address));
}

const config::Listener* OwnListeners::owner(const net::ip::address& candidate, std::uint16_t port) const {
  auto address = unmapped(candidate);
  // A connect() to 0.0.0.0 or :: reaches this host's loopback, 127.0.0.1 or ::1 (Linux), where a listener on
  // that address takes it: an MX host that a hostile DNS puts there is us.
  if (address.is_unspecified())
    address = address.is_v4() ? net::ip::address(net::ip::address_v4::loopback())
                              : net::ip::address(net::ip::address_v6::loopback());
  for (const auto& listener : listeners_) {
    if (listener.port != port) continue;
    if (!listener.address.is_unspecified()) {
      if (listener.address == address) return &listener.listener;
      continue;
    }
    // 0.0.0.0 takes IPv4 only, and :: IPv6 only: the server binds it IPv6-only (IPV6_V6ONLY), so that an IPv4
    // listener on the same port can listen beside it.
    if (listener.address.is_v4() != address.is_v4()) continue;
    if (address.is_loopback() || address.is_unspecified() || local_.count(address) != 0)
      return &listener.listener;
  }
  return nullptr;
}

}  // namespace mailflow
