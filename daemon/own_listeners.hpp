#pragma once
// Whether an address and port an upstream resolved to is mailflowd itself: one of its own listeners, directly
// or through a wildcard listener (0.0.0.0, ::) on an address of this host. Delivering there would loop
// (554 5.4.6; RFC 5321 5.1: an MTA among a domain's MX hosts tries only those preferred over itself).
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <boost/asio/ip/address.hpp>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "config/config.hpp"

namespace mailflow {

class OwnListeners {
 public:
  // Reads the host's interface addresses once (getifaddrs); cheap enough to build per configuration.
  explicit OwnListeners(const config::Config& config);
  // For tests: the interface addresses given instead of read.
  OwnListeners(const config::Config& config, std::vector<boost::asio::ip::address> interface_addresses);

  bool contains(const boost::asio::ip::address& address, std::uint16_t port) const {
    return owner(address, port) != nullptr;
  }
  // The listener that a connection to `address`:`port` reaches, or nullptr.
  const config::Listener* owner(const boost::asio::ip::address& address, std::uint16_t port) const;

  // Why the host's interface addresses could not be read (getifaddrs failed), or empty. Then only loopback
  // and the listeners' own addresses count as this host's: each caller says so where its user sees it
  // (interfaces_unread_effect).
  const std::string& interfaces_error() const { return interfaces_error_; }

 private:
  struct Bound {
    boost::asio::ip::address address;  // unspecified for a wildcard listener
    std::uint16_t port;
    config::Listener listener;
  };
  std::vector<Bound> listeners_;
  std::set<boost::asio::ip::address> local_;
  std::string interfaces_error_;
};

// What a failed read of the interface addresses means, for the log and --check-config.
inline constexpr const char* interfaces_unread_effect =
    "only loopback and the listeners' own addresses count as this host's: an upstream or MX host on another "
    "address of this host, behind a 0.0.0.0 or [::] listener, is not known as mailflowd itself";

}  // namespace mailflow
