// plan_mx: RFC 5321 5.1 ordering, equal preferences shuffled, implicit MX, RFC 7505 null MX; address order.
#include <doctest/doctest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "proto/mx_plan.hpp"

namespace mailflow::proto {
namespace {

std::vector<std::string> names(const MxPlan& plan) {
  std::vector<std::string> out;
  for (const auto& host : plan.hosts) out.push_back(host.name);
  return out;
}

TEST_CASE("MX hosts by preference, lowest first, names normalized") {
  const auto plan = plan_mx("example.net", {{20, "MX2.example.net."}, {10, "mx1.Example.NET."}, {30, "backup.example.org"}}, 1);
  CHECK(plan.kind == MxPlanKind::mx);
  CHECK(names(plan) == std::vector<std::string>{"mx1.example.net", "mx2.example.net", "backup.example.org"});
  CHECK(plan.hosts[0].preference == 10);
  CHECK(plan.hosts[2].preference == 30);
}

TEST_CASE("equal preferences are shuffled; the seed decides, every order occurs, groups never mix") {
  const std::vector<MxRecord> records{{10, "a.example."}, {10, "b.example."}, {10, "c.example."}, {5, "first.example."},
                                      {20, "last.example."}};
  std::set<std::vector<std::string>> orders;
  std::map<std::string, int> leading;
  for (std::uint64_t seed = 0; seed < 200; ++seed) {
    const auto plan = plan_mx("example", records, seed);
    const auto order = names(plan);
    REQUIRE(order.size() == 5);
    CHECK(order.front() == "first.example");
    CHECK(order.back() == "last.example");
    CHECK(std::set<std::string>(order.begin() + 1, order.end() - 1) ==
          std::set<std::string>{"a.example", "b.example", "c.example"});
    orders.insert(order);
    ++leading[order[1]];
    CHECK(plan_mx("example", records, seed).hosts[1].name == order[1]);  // deterministic per seed
  }
  CHECK(orders.size() == 6);  // all 3! orders of the equal-preference group
  for (const auto& [name, count] : leading) {
    CAPTURE(name);
    CHECK(count > 40);  // roughly uniform: each of the 3 leads about 67 of 200
  }
}

TEST_CASE("the order DNS returned does not matter for a given seed") {
  const auto a = plan_mx("d", {{10, "x."}, {10, "y."}, {10, "z."}}, 7);
  const auto b = plan_mx("d", {{10, "z."}, {10, "x."}, {10, "y."}}, 7);
  CHECK(names(a) == names(b));
}

TEST_CASE("no MX records: implicit MX, the domain itself") {
  const auto plan = plan_mx("Implicit.Example.", {}, 3);
  CHECK(plan.kind == MxPlanKind::implicit);
  REQUIRE(plan.hosts.size() == 1);
  CHECK(plan.hosts[0].name == "implicit.example");
  CHECK(plan.hosts[0].preference == 0);
}

TEST_CASE("null MX (RFC 7505): one record whose exchange is the root") {
  CHECK(plan_mx("nomail.example", {{0, "."}}, 1).kind == MxPlanKind::null_mx);
  CHECK(plan_mx("nomail.example", {{0, "."}}, 1).hosts.empty());
  CHECK(plan_mx("nomail.example", {{10, ""}}, 1).kind == MxPlanKind::null_mx);  // any preference
  // Several records, every one the root: no host either (not an MX plan without hosts).
  CHECK(plan_mx("nomail.example", {{0, "."}, {10, "."}}, 1).kind == MxPlanKind::null_mx);
  // A "." beside real hosts violates RFC 7505 section 3; the real hosts are used, the "." is skipped.
  const auto mixed = plan_mx("mixed.example", {{0, "."}, {10, "mx.mixed.example."}}, 1);
  CHECK(mixed.kind == MxPlanKind::mx);
  CHECK(names(mixed) == std::vector<std::string>{"mx.mixed.example"});
}

TEST_CASE("a host listed twice is tried once, at its lowest preference") {
  const auto plan = plan_mx("d", {{30, "mx.d."}, {10, "MX.d"}, {20, "other.d."}}, 1);
  CHECK(names(plan) == std::vector<std::string>{"mx.d", "other.d"});
  CHECK(plan.hosts[0].preference == 10);
}

TEST_CASE("addresses: IPv6 and IPv4 alternate, IPv6 first") {
  using V = std::vector<std::string>;
  CHECK(interleave_families<std::string>({"v6a", "v6b", "v6c"}, {"v4a"}) == V{"v6a", "v4a", "v6b", "v6c"});
  CHECK(interleave_families<std::string>({}, {"v4a", "v4b"}) == V{"v4a", "v4b"});
  CHECK(interleave_families<std::string>({"v6a"}, {}) == V{"v6a"});
  CHECK(interleave_families<std::string>({}, {}).empty());
}

TEST_CASE("to_string of the plan kinds") {
  CHECK(to_string(MxPlanKind::mx) == "mx");
  CHECK(to_string(MxPlanKind::implicit) == "implicit");
  CHECK(to_string(MxPlanKind::null_mx) == "null_mx");
}

}  // namespace
}  // namespace mailflow::proto
