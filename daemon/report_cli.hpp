#pragma once
// `mailflowd report [--url http://127.0.0.1:9725] [--days N] [--format table|json|csv]`: fetches the connector
// report from a running daemon over plain HTTP/1.1 and prints the body.
// Exit codes: 0 printed, 1 connection failure / timeout / non-200 answer (the server's message is shown),
// 2 bad usage. Credentials for basic auth may be given in the URL: http://user:password@host:port.
#include <chrono>
#include <iosfwd>

namespace mailflow {

// argv as main() got it: argv[0] is the program; a leading "report" word is skipped.
int run_report_cli(int argc, char** argv);
// Same, with the streams and the network timeout injected (tests).
int run_report_cli(int argc, char** argv, std::ostream& out, std::ostream& err,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));

}  // namespace mailflow
