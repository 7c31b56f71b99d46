#pragma once
// `mailflowd tlsrpt [--config FILE] [--url URL] [--date YYYY-MM-DD] [--domain DOMAIN] [--format json|gzip]
// [--user U] [--password-file F] [--ca-file F] [--insecure]`: the TLS-RPT reports (RFC 8460) of a running daemon,
// from GET /api/v1/tlsrpt. Without --domain: every domain's report of that UTC day (default today) as JSON; with
// --domain: that domain's report as JSON, or with --format gzip exactly the bytes that are sent (the gzip body of
// the POST and of the mail's attachment). Exit codes: 0 printed, 1 no answer / not 200 (404: no report for that
// day and domain), 2 bad usage. The connection options are those of `mailflowd report` (daemon/cli_http.hpp).
#include <chrono>
#include <iosfwd>

namespace mailflow {

// argv as main() got it: argv[0] is the program; a leading "tlsrpt" word is skipped.
int run_tlsrpt_cli(int argc, char** argv);
int run_tlsrpt_cli(int argc, char** argv, std::ostream& out, std::ostream& err,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));

}  // namespace mailflow
