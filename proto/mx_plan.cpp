#include "proto/mx_plan.hpp"

#include <algorithm>
#include <random>

#include "proto/ascii.hpp"

namespace mailflow::proto {

std::string_view to_string(MxPlanKind kind) {
  switch (kind) {
    case MxPlanKind::mx:
      return "mx";
    case MxPlanKind::implicit:
      return "implicit";
    case MxPlanKind::null_mx:
      return "null_mx";
  }
  return "mx";
}

MxPlan plan_mx(std::string_view domain, const std::vector<MxRecord>& records, std::uint64_t seed) {
  MxPlan plan;
  if (records.empty()) {
    plan.kind = MxPlanKind::implicit;
    plan.hosts.push_back(MxHost{dns_name_key(domain), 0});
    return plan;
  }
  // Every record the root (one, or several at different preferences): the domain names no host at all.
  if (std::all_of(records.begin(), records.end(),
                  [](const MxRecord& record) { return dns_name_key(record.exchange).empty(); })) {
    plan.kind = MxPlanKind::null_mx;
    return plan;
  }
  std::vector<MxHost> hosts;
  for (const auto& record : records) {
    std::string name = dns_name_key(record.exchange);
    if (name.empty()) continue;  // "." beside real MX hosts: nothing to connect to
    const auto same = std::find_if(hosts.begin(), hosts.end(), [&](const MxHost& h) { return h.name == name; });
    if (same == hosts.end()) {
      hosts.push_back(MxHost{std::move(name), record.preference});
    } else {
      same->preference = std::min(same->preference, record.preference);
    }
  }
  // Sort first (a fixed order whatever DNS returned), then shuffle each run of equal preference.
  std::sort(hosts.begin(), hosts.end(), [](const MxHost& a, const MxHost& b) {
    return a.preference != b.preference ? a.preference < b.preference : a.name < b.name;
  });
  std::mt19937_64 random(seed);
  for (auto run = hosts.begin(); run != hosts.end();) {
    const auto end = std::find_if(run, hosts.end(), [&](const MxHost& h) { return h.preference != run->preference; });
    std::shuffle(run, end, random);
    run = end;
  }
  plan.hosts = std::move(hosts);
  return plan;
}

}  // namespace mailflow::proto
