#pragma once
// `mailflowd report [--url http://127.0.0.1:9725] [--days N] [--format table|json|csv] [--ca-file F]
// [--insecure]`: fetches the connector report from a running daemon over HTTP/1.1 (https:// when http.tls is
// configured) and prints the body. json -> /api/v1/report, csv -> /api/v1/report.csv, table ->
// /api/v1/report.txt. Exit codes: 0 printed, 1 connection failure / timeout / TLS failure / non-200 answer
// (the server's message is shown), 2 bad usage. Credentials for basic auth may be given in the URL:
// http://user:password@host:port.
#include <chrono>
#include <iosfwd>

namespace mailflow {

// argv as main() got it: argv[0] is the program; a leading "report" word is skipped.
int run_report_cli(int argc, char** argv);
// Same, with the streams and the network timeout injected (tests).
int run_report_cli(int argc, char** argv, std::ostream& out, std::ostream& err,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));

}  // namespace mailflow
