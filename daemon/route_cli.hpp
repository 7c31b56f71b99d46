#pragma once
// `mailflowd route --config FILE --recipient ADDRESS [--listener NAME] [--sender ADDRESS] [--client IP]
// [--format text|json] [--seed N]`: where mail for ADDRESS goes, decided by the daemon's own code: the
// connector (match_connector), its upstream and, for an `mx: true` upstream, the MX hosts and their addresses
// in the order they would be tried (the Resolver and plan_mx, with the file's dns: settings), for a fixed
// upstream with a host name its addresses as the relay looks them up (resolve_upstream_name: /etc/hosts and
// the search list), plus the lookups counted in mailflow_dns_lookups_total. Like Postfix's `postmap -q` /
// `smtp -v` debugging, for operators and for the integration tests of the resolver. Exit codes: 0 deliverable
// (a fixed address, or at least one MX address); 1 unusable configuration; 2 bad usage; 3 permanent failure
// (null MX 556, NXDOMAIN 550, no address 550, a loop back to one of mailflowd's own listeners 554); 4
// temporary DNS failure (451; a fixed upstream's name without an address too).
#include <iosfwd>

namespace mailflow {

// argv as main() got it: argv[0] is the program; a leading "route" word is skipped.
int run_route_cli(int argc, char** argv);
int run_route_cli(int argc, char** argv, std::ostream& out, std::ostream& err);

}  // namespace mailflow
