#pragma once
// Which connector a transaction belongs to: the first configured connector whose every given match key
// fits; none => the implicit "internet" connector with the listener's direction. Pure function.
#include <array>
#include <cstdint>
#include <string_view>

#include "config/config.hpp"

namespace mailflow {

struct MatchInput {
  std::string_view listener;
  config::Direction direction = config::Direction::inbound;  // the listener's
  std::array<std::uint8_t, 16> client_address{};             // IPv4-mapped form for IPv4
  std::string_view sni;
  std::string_view ehlo;
  std::string_view sender_domain;  // lower-case
  // lower-case; empty when not known yet (before the first RCPT): a connector with recipient_domains then
  // does not match.
  std::string_view recipient_domain;
};

inline constexpr std::string_view internet_connector = "internet";

// nullptr: unmatched (count under "internet").
const config::Connector* match_connector(const config::Config& config, const MatchInput& input);

}  // namespace mailflow
