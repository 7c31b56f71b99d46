#pragma once
// `mailflowd mta-sts --config FILE --domain DOMAIN [--connect HOST:PORT] [--fetch-only] [--state]`: what
// mailflowd's own code makes of DOMAIN's MTA-STS: the _mta-sts TXT record (the file's dns: settings), the
// policy fetched from https://mta-sts.DOMAIN/.well-known/mta-sts.txt (mta_sts.ca_file, mta_sts.fetch_timeout)
// and the mode the MX walk would apply, as JSON. --connect HOST:PORT connects there instead (SNI and the
// verified name stay mta-sts.DOMAIN), as curl's --connect-to does; --fetch-only skips the TXT record and
// shows the fetch alone; --state uses and updates state_dir/mta-sts.state as the daemon does.
// Exit codes: 0 a policy (or none published); 1 unusable configuration; 2 bad usage; 3 a failure that
// TLS-RPT reports (sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid); 4 the _mta-sts TXT lookup
// failed temporarily (timeout, servfail, bogus, error), so the mode shown is the relay's fallback.
#include <iosfwd>

namespace mailflow {

int run_mta_sts_cli(int argc, char** argv);
int run_mta_sts_cli(int argc, char** argv, std::ostream& out, std::ostream& err);

}  // namespace mailflow
