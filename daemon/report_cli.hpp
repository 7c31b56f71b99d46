#pragma once
// `mailflowd report [--config FILE] [--url http://127.0.0.1:9725] [--days N] [--format table|json|csv]
// [--summary] [--user U] [--password-file F] [--ca-file F] [--insecure]`: fetches the connector report from a running
// daemon over HTTP/1.1 (https:// when http.tls is configured) and prints the body. json -> /api/v1/report,
// csv -> /api/v1/report.csv, table -> /api/v1/report.txt (--summary: /api/v1/connectors, .csv, .txt), after a first line that names the daemon (URL and
// version, from its Server: header). --config reads http.address, http.tls and http.basic_auth.user from the
// daemon's file. The basic auth password comes from --password-file or MAILFLOWD_PASSWORD (or the URL's
// user:password@, which ps shows). Exit codes: 0 printed, 1 connection failure / timeout / TLS failure /
// non-200 answer (the server's message is shown) / a 200 in another media type than the format's (not the
// report: a proxy's page) / unusable --config, 2 bad usage.
#include <chrono>
#include <iosfwd>

namespace mailflow {

// argv as main() got it: argv[0] is the program; a leading "report" word is skipped.
int run_report_cli(int argc, char** argv);
// Same, with the streams and the network timeout injected (tests).
int run_report_cli(int argc, char** argv, std::ostream& out, std::ostream& err,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));

}  // namespace mailflow
