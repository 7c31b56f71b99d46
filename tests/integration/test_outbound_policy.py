"""MTA-STS enforced in the MX walk, and every TLS session to an MX host counted under its policy (issue #19 items
2-4): a real knotd serves the domains' MX, _mta-sts and _smtp._tls records; a real HTTPS server (python's ssl,
certificates from the test CA) on 127.0.0.75:443 serves their policies; the MX hosts are real aiosmtpd sinks.

- a domain whose MX presents a certificate valid for its name: delivered; counted as
  mailflow_outbound_policy_total{policy="mta-sts",result="success"}; the day's TLS-RPT report for the domain
  (GET /api/v1/tlsrpt) has an sts policy with its policy strings and one successful session;
- enforce, the MX's certificate names another host: not used (451 4.4.1, tls_policy), reported as
  certificate-host-mismatch with the MX's name and address;
- testing, the same MX: delivered, and the failure is still reported;
- enforce, the MX is not listed in the policy: not used, validation-failure;
- a domain without a policy: counted under policy "none";
- a domain whose policy host answers 404: delivered, and sts-policy-fetch-error reported;
- a full state_dir: delivery goes on, the save at shutdown fails loudly."""
import datetime
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

import pytest

import harness
from harness import delta, series_key
from hostile_helpers import greeted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

ORIGIN = "policy2.example.net"
GOOD_MX, BAD_MX, PLAIN_MX, POLICY_HOST = "127.0.0.71", "127.0.0.72", "127.0.0.73", "127.0.0.75"
RUA = "mailto:tls-reports@example.org"


def policy(mode, mx):
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


POLICIES = {
    f"mta-sts.sts.{ORIGIN}": policy("enforce", f"mx.sts.{ORIGIN}"),
    f"mta-sts.badcert.{ORIGIN}": policy("enforce", f"mx.badcert.{ORIGIN}"),
    f"mta-sts.testing.{ORIGIN}": policy("testing", f"mx.badcert.{ORIGIN}"),
    f"mta-sts.notlisted.{ORIGIN}": policy("enforce", f"mx.elsewhere.{ORIGIN}"),
    f"mta-sts.vbadcert.{ORIGIN}": policy("enforce", f"mx.badcert.{ORIGIN}"),
}

ZONE = f"""$ORIGIN {ORIGIN}.
$TTL 300
@                SOA   ns hostmaster 1 3600 600 86400 300
@                NS    ns
ns               A     127.0.0.1
sts              MX    10 mx.sts
mx.sts           A     {GOOD_MX}
_mta-sts.sts     TXT   "v=STSv1; id=1;"
mta-sts.sts      A     {POLICY_HOST}
_smtp._tls.sts   TXT   "v=TLSRPTv1; rua={RUA}"
badcert          MX    10 mx.badcert
mx.badcert       A     {BAD_MX}
_mta-sts.badcert TXT   "v=STSv1; id=1;"
mta-sts.badcert  A     {POLICY_HOST}
_smtp._tls.badcert TXT "v=TLSRPTv1; rua={RUA}"
testing          MX    10 mx.badcert
_mta-sts.testing TXT   "v=STSv1; id=1;"
mta-sts.testing  A     {POLICY_HOST}
_smtp._tls.testing TXT "v=TLSRPTv1; rua={RUA}"
notlisted        MX    10 mx.sts
_mta-sts.notlisted TXT "v=STSv1; id=1;"
mta-sts.notlisted A    {POLICY_HOST}
_smtp._tls.notlisted TXT "v=TLSRPTv1; rua={RUA}"
plain            MX    10 mx.plain
mx.plain         A     {PLAIN_MX}
nopolicy         MX    10 mx.plain
_mta-sts.nopolicy TXT  "v=STSv1; id=1;"
mta-sts.nopolicy A     {POLICY_HOST}
_smtp._tls.nopolicy TXT "v=TLSRPTv1; rua={RUA}"
plainrpt         MX    10 mx.plain
vbadcert         MX    10 mx.badcert
_mta-sts.vbadcert TXT  "v=STSv1; id=1;"
mta-sts.vbadcert A     {POLICY_HOST}
_smtp._tls.vbadcert TXT "v=TLSRPTv1; rua={RUA}"
_smtp._tls.plainrpt TXT "v=TLSRPTv1; rua={RUA}"
"""


class PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = POLICIES.get(self.headers.get("Host", ""))
        data = (body or "not found").encode()
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def short_dir():
    path = tempfile.mkdtemp(prefix="mf-pol-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(certs, workdir, short_dir, sink_factory, daemon_factory):
    knot = KnotServer(short_dir, {ORIGIN: ZONE}).start()
    server = None
    try:
        # mta-sts.nopolicy's name is on the certificate, but the server has no policy for it (404).
        cert, key = harness.ca_signed_cert(certs, workdir, "policy-host",
                                           sorted(POLICIES) + [f"mta-sts.nopolicy.{ORIGIN}"])
        server = http.server.ThreadingHTTPServer((POLICY_HOST, 443), PolicyHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

        port = harness.free_port("127.0.0.1", GOOD_MX, BAD_MX, PLAIN_MX)
        good_cert, good_key = harness.ca_signed_cert(certs, workdir, "mx-sts", [f"mx.sts.{ORIGIN}"], chain=True)
        sinks = {
            "good": sink_factory("mx-sts", host=GOOD_MX, port=port, tls_cert=good_cert, tls_key=good_key),
            # a certificate from the test CA, for other names (sink.test, localhost)
            "bad": sink_factory("mx-badcert", host=BAD_MX, port=port, tls_cert=certs / "sink.pem",
                                tls_key=certs / "sink.key"),
            "plain": sink_factory("mx-plain", host=PLAIN_MX, port=port),
        }
        listeners = [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                      "upstream": "internet"}]
        upstreams = [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "enforce"},
                     {"name": "lenient", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "testing"},
                     {"name": "verifying", "mx": True, "port": port, "tls": "verify", "ca_file": str(certs / "ca.pem"),
                      "mta_sts": "enforce"}]
        connectors = [{"name": "partners", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"sts.{ORIGIN}", f"badcert.{ORIGIN}",
                                                       f"notlisted.{ORIGIN}", f"plain.{ORIGIN}",
                                                       f"nopolicy.{ORIGIN}", f"plainrpt.{ORIGIN}"]}},
                      {"name": "lenient-partner", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"testing.{ORIGIN}"]}, "upstream": "lenient"},
                      {"name": "verify-partner", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"vbadcert.{ORIGIN}"]}, "upstream": "verifying"}]
        daemon = daemon_factory(listeners, upstreams, connectors,
                                dns={"servers": [knot.address], "timeout": "2s"},
                                mta_sts={"ca_file": str(certs / "ca.pem"), "fetch_timeout": "3s"})
        yield types.SimpleNamespace(daemon=daemon, port=port, sinks=sinks, dns=knot.address, ca=certs / "ca.pem")
    finally:
        if server:
            server.shutdown()
        knot.stop()


def deliver(env, rcpt):
    c = greeted(env.port)
    try:
        assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
        rcpt_reply = c.cmd(f"RCPT TO:<{rcpt}>")
        if rcpt_reply[0] != 250:
            return rcpt_reply, None
        assert c.cmd("DATA")[0] == 354
        c.send(f"From: app@corp.example\r\nTo: {rcpt}\r\nSubject: policy\r\n\r\nbody\r\n".encode())
        return rcpt_reply, c.cmd(".")
    finally:
        c.close()


def policy_moved(before, after):
    return {(dict(k)["connector"], dict(k)["policy"], dict(k)["result"]): v
            for k, v in delta(before, after, "mailflow_outbound_policy_total").items()}


def tlsrpt(env, domain):
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    status, body = env.daemon.get(f"/api/v1/tlsrpt?date={today}")
    assert status == 200, body
    reports = {r["domain"]: r for r in json.loads(body)["reports"]}
    return reports.get(domain)


def test_valid_certificate_under_an_enforced_policy_delivers_and_is_reported(env):
    sink = env.sinks["good"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"alice@sts.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert sink.wait_messages(n + 1)[-1][0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("partners", "mta-sts", "success"): 1.0}
    report = tlsrpt(env, f"sts.{ORIGIN}")
    assert report and report["rua"] == [RUA], report
    (entry,) = report["report"]["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert "mode: enforce" in entry["policy"]["policy-string"]
    assert entry["policy"]["mx-host"] == [f"mx.sts.{ORIGIN}"]
    assert entry["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}


def test_enforced_policy_skips_an_mx_whose_certificate_names_another_host(env):
    sink = env.sinks["bad"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"bob@badcert.{ORIGIN}")
    assert rcpt[0] == 451 and "4.4.1" in rcpt[1] and "tls_policy" in rcpt[1], rcpt
    assert sink.count() == n
    after = env.daemon.metrics()
    assert policy_moved(before, after) == {("partners", "mta-sts", "certificate-host-mismatch"): 1.0}
    (entry,) = tlsrpt(env, f"badcert.{ORIGIN}")["report"]["policies"]
    assert entry["summary"]["total-failure-session-count"] == 1
    (detail,) = entry["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == f"mx.badcert.{ORIGIN}"
    assert detail["receiving-ip"] == BAD_MX
    assert detail["failed-session-count"] == 1


def test_certificate_that_tls_verify_refuses_is_reported_with_its_result_type(env):
    """tls: verify refuses the MX's certificate in the handshake (it names another host): the TLS report and
    mailflow_outbound_policy_total say why, certificate-host-mismatch, as they do where the handshake is made
    without verification and the verdict is checked after it (RFC 8460 4.3.2.2), not a bare validation-failure."""
    sink = env.sinks["bad"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"ivy@vbadcert.{ORIGIN}")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    assert sink.count() == n
    assert policy_moved(before, env.daemon.metrics()) == \
        {("verify-partner", "mta-sts", "certificate-host-mismatch"): 1.0}
    (entry,) = tlsrpt(env, f"vbadcert.{ORIGIN}")["report"]["policies"]
    (detail,) = entry["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch", detail
    assert detail["receiving-mx-hostname"] == f"mx.badcert.{ORIGIN}"


def test_testing_policy_delivers_and_still_reports_the_failure(env):
    sink = env.sinks["bad"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"carol@testing.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("lenient-partner", "mta-sts", "certificate-host-mismatch"): 1.0}
    (entry,) = tlsrpt(env, f"testing.{ORIGIN}")["report"]["policies"]
    assert entry["failure-details"][0]["result-type"] == "certificate-host-mismatch"


def test_enforced_policy_skips_an_mx_it_does_not_list(env):
    sink = env.sinks["good"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"dave@notlisted.{ORIGIN}")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    assert sink.count() == n
    assert policy_moved(before, env.daemon.metrics()) == {("partners", "mta-sts", "validation-failure"): 1.0}
    (detail,) = tlsrpt(env, f"notlisted.{ORIGIN}")["report"]["policies"][0]["failure-details"]
    assert detail["result-type"] == "validation-failure"
    # The operator sees why the host was not used: an mta_sts line naming it and the result (docs/outbound.md).
    harness.wait_for(lambda: any(" mta_sts " in line and f"host=mx.sts.{ORIGIN}" in line
                                 and "result=validation-failure" in line
                                 for line in env.daemon.stderr().splitlines()),
                     what="an mta_sts log line for the MX host the policy does not list")


def test_domain_without_a_policy_counts_under_none(env):
    sink = env.sinks["plain"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"erin@plain.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("partners", "none", "success"): 1.0}
    assert tlsrpt(env, f"plain.{ORIGIN}") is None  # it asks for no reports


def test_policy_that_cannot_be_fetched_is_reported_and_mail_goes_on(env):
    sink = env.sinks["plain"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"frank@nopolicy.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    after = harness.wait_moved(env.daemon, before)
    # The fetch failure under the sts policy; the session itself had no policy to meet.
    assert policy_moved(before, after) == {("partners", "mta-sts", "sts-policy-fetch-error"): 1.0,
                                           ("partners", "none", "success"): 1.0}
    policies = {p["policy"]["policy-type"]: p for p in tlsrpt(env, f"nopolicy.{ORIGIN}")["report"]["policies"]}
    assert policies["sts"]["failure-details"][0]["result-type"] == "sts-policy-fetch-error"
    # The MX host offers no STARTTLS: a plaintext session is no TLS session to report (RFC 8460 4.3).
    assert "no-policy-found" not in policies, policies


def test_plaintext_session_is_no_successful_tls_session_in_the_report(env):
    """RFC 8460 4.3: total-successful-session-count counts successfully negotiated TLS connections. A domain
    without a policy whose MX host offers no STARTTLS gets the mail in plaintext (opportunistic), and its report
    must not tell its postmaster that the session was a TLS success."""
    sink = env.sinks["plain"]
    n = sink.count()
    rcpt, final = deliver(env, f"gina@plainrpt.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert sink.wait_messages(n + 1)[-1][0]["tls_version"] == "none"
    report = tlsrpt(env, f"plainrpt.{ORIGIN}")
    successes = sum(p["summary"]["total-successful-session-count"] for p in report["report"]["policies"]) \
        if report else 0
    assert successes == 0, report
    # A TLS session to the same kind of domain is reported as a success (the negative above is not vacuous).
    good = env.sinks["good"]
    n = good.count()
    rcpt, final = deliver(env, f"hank@sts.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    good.wait_messages(n + 1)
    assert tlsrpt(env, f"sts.{ORIGIN}")["report"]["policies"][0]["summary"]["total-successful-session-count"] >= 1


def test_full_state_dir_keeps_delivering_and_says_why(env, daemon_factory, workdir):
    """state_dir on a file system that fills up while the daemon runs (a tmpfs of 64 KiB; a full one at start is
    refused with a clear error): MTA-STS and TLS-RPT still work from memory, mail is delivered, and the save at
    shutdown fails loudly (logged, exit 0) instead of silently."""
    state = Path(workdir) / "mailflowd-full-state"  # the state_dir daemon_factory gives name="mailflowd-full"
    state.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        port = harness.free_port()
        daemon = daemon_factory([{"name": "out3", "address": f"127.0.0.1:{port}", "direction": "outbound",
                                  "upstream": "internet3"}],
                                [{"name": "internet3", "mx": True, "port": env.port, "mta_sts": "enforce"}],
                                name="mailflowd-full",
                                dns={"servers": [env.dns], "timeout": "2s"},
                                mta_sts={"ca_file": str(env.ca), "fetch_timeout": "3s"})
        fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        sink = env.sinks["good"]
        n = sink.count()
        rcpt, final = deliver(types.SimpleNamespace(port=port), f"grace@sts.{ORIGIN}")
        assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
        sink.wait_messages(n + 1)
        assert tlsrpt(types.SimpleNamespace(daemon=daemon), f"sts.{ORIGIN}") is not None
        code = daemon.stop()
        log = daemon.stderr()
        assert code == 0, f"exit code {code} with a full state_dir"
        assert "state_save_failed" in log, log[-3000:]
    finally:
        subprocess.run(["umount", str(state)], capture_output=True)


def test_destination_domains_show_their_policy_and_failures(env):
    """The per-domain report (issue #19 item 4): which domains publish MTA-STS, and which fail it."""
    if tlsrpt(env, f"badcert.{ORIGIN}") is None:
        deliver(env, f"bob@badcert.{ORIGIN}")
    if tlsrpt(env, f"sts.{ORIGIN}") is None:
        deliver(env, f"alice@sts.{ORIGIN}")
    report = json.loads(env.daemon.get("/api/v1/report")[1])
    partners = next(c for c in report["connectors"] if c["connector"] == "partners" and c["direction"] == "outbound")
    rows = {r["domain"]: r for r in partners["domains"]["rows"]}
    assert rows[f"sts.{ORIGIN}"]["policy"] == "mta-sts" and rows[f"sts.{ORIGIN}"]["messages"] >= 1, rows
    assert rows[f"badcert.{ORIGIN}"]["policy"] == "mta-sts", rows
    assert rows[f"badcert.{ORIGIN}"]["refused"] >= 1 and rows[f"badcert.{ORIGIN}"]["messages"] == 0, rows
    # The domains that fail their policy come first.
    order = [r["domain"] for r in partners["domains"]["rows"]]
    assert order.index(f"badcert.{ORIGIN}") < order.index(f"sts.{ORIGIN}"), order
    status, csv_text = env.daemon.get("/api/v1/domains.csv")
    header, *lines = csv_text.splitlines()
    assert header.endswith(",policy,policy_failures"), header
    badcert = next(line.split(",") for line in lines if f",badcert.{ORIGIN}," in line)
    assert badcert[-2:] == ["mta-sts", str(rows[f"badcert.{ORIGIN}"]["refused"])], badcert
