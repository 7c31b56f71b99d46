// The small value types of config.hpp: names, CIDRs, globs, durations, lookups, error text.
#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <limits>

#include "config/config.hpp"

namespace mailflow::config {

std::string_view to_string(Direction direction) {
  return direction == Direction::inbound ? "inbound" : "outbound";
}

std::string_view to_string(ConnectorType type) {
  switch (type) {
    case ConnectorType::partner:
      return "partner";
    case ConnectorType::onpremises:
      return "onpremises";
    case ConnectorType::internet:
      return "internet";
  }
  return "partner";
}

std::string_view to_string(UpstreamTls tls) {
  switch (tls) {
    case UpstreamTls::none:
      return "none";
    case UpstreamTls::opportunistic:
      return "opportunistic";
    case UpstreamTls::required:
      return "required";
    case UpstreamTls::verify:
      return "verify";
    case UpstreamTls::dane:
      return "dane";
  }
  return "opportunistic";
}

std::string_view to_string(MtaStsMode mode) {
  switch (mode) {
    case MtaStsMode::off:
      return "off";
    case MtaStsMode::testing:
      return "testing";
    case MtaStsMode::enforce:
      return "enforce";
  }
  return "off";
}

std::string_view to_string(LogFormat format) { return format == LogFormat::json ? "json" : "text"; }

std::string_view to_string(LogOutput output) { return output == LogOutput::syslog ? "syslog" : "stderr"; }

std::optional<std::array<std::uint8_t, 16>> parse_ip_address(std::string_view text) {
  if (text.empty() || text.size() > 64) return std::nullopt;
  const std::string copy(text);
  std::array<std::uint8_t, 16> out{};
  if (copy.find(':') == std::string::npos) {
    std::array<std::uint8_t, 4> v4{};
    if (inet_pton(AF_INET, copy.c_str(), v4.data()) != 1) return std::nullopt;
    out[10] = 0xff;
    out[11] = 0xff;
    std::copy(v4.begin(), v4.end(), out.begin() + 12);
    return out;
  }
  if (inet_pton(AF_INET6, copy.c_str(), out.data()) != 1) return std::nullopt;
  return out;
}

std::optional<Cidr> Cidr::parse(std::string_view text) {
  const auto slash = text.find('/');
  const std::string_view address_text = text.substr(0, slash);
  const auto address = parse_ip_address(address_text);
  if (!address) return std::nullopt;
  const bool v4 = address_text.find(':') == std::string_view::npos;
  const int max_prefix = v4 ? 32 : 128;
  int prefix = max_prefix;
  if (slash != std::string_view::npos) {
    const std::string_view digits = text.substr(slash + 1);
    if (digits.empty() || digits.size() > 3 ||
        !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return std::nullopt;
    }
    std::from_chars(digits.data(), digits.data() + digits.size(), prefix);
    if (prefix > max_prefix) return std::nullopt;
  }
  Cidr cidr;
  cidr.prefix = v4 ? prefix + 96 : prefix;
  // Host bits are cleared so that comparisons are exact; the loader separately refuses host bits as a typo.
  for (int i = 0; i < 16; ++i) {
    const int bits = std::clamp(cidr.prefix - 8 * i, 0, 8);
    const auto mask = static_cast<std::uint8_t>(bits == 0 ? 0 : (0xff << (8 - bits)) & 0xff);
    cidr.network[static_cast<std::size_t>(i)] = (*address)[static_cast<std::size_t>(i)] & mask;
  }
  return cidr;
}

bool Cidr::contains(const std::array<std::uint8_t, 16>& address) const {
  for (int i = 0; i < 16; ++i) {
    const int bits = std::clamp(prefix - 8 * i, 0, 8);
    if (bits == 0) return true;
    const auto mask = static_cast<std::uint8_t>((0xff << (8 - bits)) & 0xff);
    if ((address[static_cast<std::size_t>(i)] & mask) != network[static_cast<std::size_t>(i)]) return false;
  }
  return true;
}

std::string Cidr::to_string() const {
  static constexpr std::array<std::uint8_t, 12> mapped_prefix{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  char buffer[INET6_ADDRSTRLEN] = {};
  if (prefix >= 96 && std::equal(mapped_prefix.begin(), mapped_prefix.end(), network.begin())) {
    inet_ntop(AF_INET, network.data() + 12, buffer, sizeof buffer);
    return std::string(buffer) + "/" + std::to_string(prefix - 96);
  }
  inet_ntop(AF_INET6, network.data(), buffer, sizeof buffer);
  return std::string(buffer) + "/" + std::to_string(prefix);
}

std::optional<std::string> parse_domain_pattern(std::string_view text) {
  std::string out;
  std::string_view rest = text;
  if (rest.starts_with("*.")) {
    out = "*.";
    rest.remove_prefix(2);
  }
  if (rest.empty() || rest.size() > 253) return std::nullopt;
  std::size_t label = 0;  // length of the current label
  for (const char c : rest) {
    if (c == '.') {
      if (label == 0) return std::nullopt;  // leading or doubled dot
      label = 0;
    } else if (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') {
      if (++label > 63) return std::nullopt;
    } else {
      return std::nullopt;  // '*' elsewhere, '@', spaces, ...
    }
    out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  if (label == 0) return std::nullopt;  // a trailing dot
  return out;
}

bool glob_match(std::string_view pattern, std::string_view text) {
  const auto lower = [](char c) { return static_cast<char>(std::tolower(static_cast<unsigned char>(c))); };
  // Iterative matcher with one backtrack point: linear in practice, never exponential.
  std::size_t p = 0, t = 0, star = std::string_view::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = t;
    } else if (p < pattern.size() && lower(pattern[p]) == lower(text[t])) {
      ++p;
      ++t;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::optional<std::chrono::milliseconds> parse_duration(std::string_view text) {
  if (text == "0") return std::chrono::milliseconds{0};
  if (text.empty()) return std::nullopt;
  constexpr std::int64_t max_ms = std::int64_t{366} * 24 * 3600 * 1000 * 100;  // a century: no overflow below
  std::int64_t total = 0;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t start = i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') ++i;
    if (i == start || i - start > 12) return std::nullopt;
    std::int64_t number = 0;
    std::from_chars(text.data() + start, text.data() + i, number);
    start = i;
    while (i < text.size() && std::isalpha(static_cast<unsigned char>(text[i]))) ++i;
    const std::string_view unit = text.substr(start, i - start);
    std::int64_t scale = 0;
    if (unit == "ms")
      scale = 1;
    else if (unit == "s")
      scale = 1000;
    else if (unit == "m")
      scale = 60'000;
    else if (unit == "h")
      scale = 3'600'000;
    else if (unit == "d")
      scale = 86'400'000;
    else
      return std::nullopt;
    if (number > max_ms / scale) return std::nullopt;
    total += number * scale;
    if (total > max_ms) return std::nullopt;
  }
  return std::chrono::milliseconds{total};
}

std::string format_duration(std::chrono::milliseconds duration) {
  std::int64_t ms = duration.count();
  if (ms == 0) return "0s";
  std::string out;
  if (ms < 0) {
    out = "-";
    ms = -ms;
  }
  static constexpr std::pair<std::int64_t, const char*> units[] = {
      {86'400'000, "d"}, {3'600'000, "h"}, {60'000, "m"}, {1000, "s"}, {1, "ms"}};
  for (const auto& [scale, name] : units) {
    if (ms >= scale) {
      out += std::to_string(ms / scale) + name;
      ms %= scale;
    }
  }
  return out;
}

const Upstream* Config::find_upstream(std::string_view name) const {
  for (const auto& upstream : upstreams) {
    if (upstream.name == name) return &upstream;
  }
  return nullptr;
}

const Listener* Config::find_listener(std::string_view name) const {
  for (const auto& listener : listeners) {
    if (listener.name == name) return &listener;
  }
  return nullptr;
}

const Connector* Config::find_connector(std::string_view name) const {
  for (const auto& connector : connectors) {
    if (connector.name == name) return &connector;
  }
  return nullptr;
}

std::string ConfigError::to_string() const {
  const std::string text = warning ? "warning: " + message : message;
  if (line <= 0) return file + ": " + text;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column) + ": " + text;
}

}  // namespace mailflow::config
