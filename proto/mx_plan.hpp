#pragma once
// Which hosts an SMTP client tries for a recipient domain, and in what order (RFC 5321 section 5.1,
// RFC 7505): a pure function of the DNS answer and a random seed, so that every rule is a unit test and the
// resolver only does I/O.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto {

// One MX record as DNS returned it: the exchange may carry the trailing dot ("mx1.example.net.").
struct MxRecord {
  std::uint16_t preference = 0;
  std::string exchange;
};

enum class MxPlanKind {
  mx,        // hosts from MX records, by preference
  implicit,  // no MX records: the domain itself is the only host (its A/AAAA records)
  null_mx,   // RFC 7505: the domain accepts no mail (556 5.1.10 at RCPT)
};
std::string_view to_string(MxPlanKind kind);  // "mx", "implicit", "null_mx"

struct MxHost {
  std::string name;  // lower-case, without the trailing dot
  std::uint16_t preference = 0;  // implicit MX: 0
};

struct MxPlan {
  MxPlanKind kind = MxPlanKind::mx;
  std::vector<MxHost> hosts;  // in the order to try; empty for null_mx
};

// `records` is the MX RRset of `domain` (empty: the domain has none, answered NOERROR/NODATA). Hosts are
// ordered by preference, lowest first; hosts of equal preference are shuffled (RFC 5321 5.1: "pick one at
// random") by a generator seeded with `seed`, so a test can fix the order and a relay spreads its load.
// A host listed twice keeps its lowest preference. A record whose exchange is the root (".") is a null MX,
// whatever its preference (so are several such records and nothing else); a "." among other records is a
// misconfigured RRset (RFC 7505 section 3: a null MX must be the only MX) and the "." is skipped like any
// host that cannot be connected to, so the domain's real MX hosts still get the mail.
MxPlan plan_mx(std::string_view domain, const std::vector<MxRecord>& records, std::uint64_t seed);

// The addresses of one host in the order to connect: IPv6 and IPv4 alternating, IPv6 first (RFC 8305
// section 4, the "Happy Eyeballs" interleaving, without the parallel connects): a host whose IPv6 path is
// broken costs one failed connect per attempt, not all of them. The order inside a family is DNS order.
template <class Address>
std::vector<Address> interleave_families(const std::vector<Address>& v6, const std::vector<Address>& v4) {
  std::vector<Address> out;
  out.reserve(v6.size() + v4.size());
  for (std::size_t i = 0; i < v6.size() || i < v4.size(); ++i) {
    if (i < v6.size()) out.push_back(v6[i]);
    if (i < v4.size()) out.push_back(v4[i]);
  }
  return out;
}

}  // namespace mailflow::proto
