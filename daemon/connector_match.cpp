#include "daemon/connector_match.hpp"

#include <algorithm>

namespace mailflow {
namespace {

template <typename Range, typename Pred>
bool any_or_empty(const Range& range, Pred pred) {
  return range.empty() || std::any_of(range.begin(), range.end(), pred);
}

bool domain_matches(std::string_view pattern, std::string_view domain) {
  return config::glob_match(pattern, domain);
}

}  // namespace

const config::Connector* match_connector(const config::Config& config, const MatchInput& input) {
  for (const auto& connector : config.connectors) {
    const auto& m = connector.match;
    if (connector.direction != input.direction) continue;
    if (!any_or_empty(m.listeners, [&](const std::string& l) { return l == input.listener; })) continue;
    if (!any_or_empty(m.client_cidrs,
                      [&](const config::Cidr& c) { return c.contains(input.client_address); }))
      continue;
    if (!any_or_empty(m.sender_domains,
                      [&](const std::string& d) { return domain_matches(d, input.sender_domain); }))
      continue;
    if (!any_or_empty(m.recipient_domains,
                      [&](const std::string& d) { return domain_matches(d, input.recipient_domain); }))
      continue;
    if (!any_or_empty(m.ehlo, [&](const std::string& p) { return config::glob_match(p, input.ehlo); }))
      continue;
    if (!any_or_empty(m.sni, [&](const std::string& p) { return config::glob_match(p, input.sni); }))
      continue;
    return &connector;
  }
  return nullptr;
}

}  // namespace mailflow
