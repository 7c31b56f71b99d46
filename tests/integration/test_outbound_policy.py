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
- a domain whose policy host does not answer within fetch_timeout: the failed fetch is remembered (RFC 8461 3.3),
  so the next message neither waits for it nor asks the host again, and the failure is reported once;
- testing, an MX whose TLS handshake fails: delivered to it in plaintext (tls: opportunistic), the failed
  handshake reported once;
- a full state_dir: delivery goes on, the save at shutdown fails loudly;
- enforce, a scripted MX that fails the check (certificate for another name, no STARTTLS) is told nothing more:
  no XCLIENT, no second EHLO (RFC 8461 5);
- a TLS session that met the policy and then failed in SMTP (EHLO refused, connection closed) is a successful TLS
  session in the metric and the TLS report (RFC 8460);
- tls: verify with verify_names: a certificate that matches verify_names but not the MX host name fails
  MTA-STS (RFC 8461 4.2)."""
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

import harness
import report_helpers as rh
from harness import delta
from hostile_helpers import deliver_to

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

# The TLS reports asked for are those of the UTC day each test began on (report_helpers.day_clear_of_midnight).
pytestmark = pytest.mark.usefixtures("utc_day")

ORIGIN = "policy2.example.net"
GOOD_MX, BAD_MX, PLAIN_MX, POLICY_HOST = "127.0.0.71", "127.0.0.72", "127.0.0.73", "127.0.0.75"
# Scripted MX hosts (ScriptedMx): certificate for another name; no STARTTLS; EHLO after STARTTLS refused; the
# connection closed at the EHLO after STARTTLS.
OTHERCERT_MX, NOTLS_MX, REFUSE_MX, CLOSE_MX = "127.0.0.76", "127.0.0.77", "127.0.0.78", "127.0.0.79"
BROKEN_MX = "127.0.0.80"  # answers 220 to STARTTLS, then garbage for a ServerHello
CNONLY_MX = "127.0.0.81"  # its certificate names it in the subject CN only, no subjectAltName
RUA = "mailto:tls-reports@example.org"
# A record naming more destinations than a report goes to (proto::tlsrpt::max_rua, 10), in strings of 200.
MANY_RUA = ",".join(f"mailto:r{i}@victim{i}.example" for i in range(25))
MANY_RUA_TXT = " ".join(f'"{part}"' for part in (lambda text: [text[i:i + 200] for i in range(0, len(text), 200)])(
    f"v=TLSRPTv1; rua={MANY_RUA}"))


def policy(mode, mx):
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


POLICIES = {
    f"mta-sts.sts.{ORIGIN}": policy("enforce", f"mx.sts.{ORIGIN}"),
    f"mta-sts.badcert.{ORIGIN}": policy("enforce", f"mx.badcert.{ORIGIN}"),
    f"mta-sts.testing.{ORIGIN}": policy("testing", f"mx.badcert.{ORIGIN}"),
    f"mta-sts.notlisted.{ORIGIN}": policy("enforce", f"mx.elsewhere.{ORIGIN}"),
    f"mta-sts.vbadcert.{ORIGIN}": policy("enforce", f"mx.badcert.{ORIGIN}"),
    f"mta-sts.vnames.{ORIGIN}": policy("enforce", f"mx.badcert.{ORIGIN}"),
    **{f"mta-sts.{name}.{ORIGIN}": policy("enforce", f"mx.{name}.{ORIGIN}")
       for name in ("othercert", "notls", "refuse", "close", "cnonly")},
    f"mta-sts.notlstest.{ORIGIN}": policy("testing", f"mx.notls.{ORIGIN}"),
    f"mta-sts.brokentest.{ORIGIN}": policy("testing", f"mx.brokentest.{ORIGIN}"),
    f"mta-sts.brokenenf.{ORIGIN}": policy("enforce", f"mx.brokenenf.{ORIGIN}"),
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
silent           MX    10 mx.plain
_mta-sts.silent  TXT   "v=STSv1; id=1;"
mta-sts.silent   A     {POLICY_HOST}
_smtp._tls.silent TXT  "v=TLSRPTv1; rua={RUA}"
plainrpt         MX    10 mx.plain
vbadcert         MX    10 mx.badcert
_mta-sts.vbadcert TXT  "v=STSv1; id=1;"
mta-sts.vbadcert A     {POLICY_HOST}
_smtp._tls.vbadcert TXT "v=TLSRPTv1; rua={RUA}"
_smtp._tls.plainrpt TXT "v=TLSRPTv1; rua={RUA}"
notlstest        MX    10 mx.notls
_mta-sts.notlstest TXT "v=STSv1; id=1;"
mta-sts.notlstest A    {POLICY_HOST}
_smtp._tls.notlstest TXT "v=TLSRPTv1; rua={RUA}"
vnames           MX    10 mx.badcert
_mta-sts.vnames  TXT   "v=STSv1; id=1;"
mta-sts.vnames   A     {POLICY_HOST}
_smtp._tls.vnames TXT  "v=TLSRPTv1; rua={RUA}"
brokentest       MX    10 mx.brokentest
mx.brokentest    A     {BROKEN_MX}
_mta-sts.brokentest TXT "v=STSv1; id=1;"
mta-sts.brokentest A   {POLICY_HOST}
_smtp._tls.brokentest TXT "v=TLSRPTv1; rua={RUA}"
brokenenf        MX    10 mx.brokenenf
mx.brokenenf     A     {BROKEN_MX}
_mta-sts.brokenenf TXT "v=STSv1; id=1;"
mta-sts.brokenenf A    {POLICY_HOST}
manyrua          MX    10 mx.sts
_smtp._tls.manyrua TXT {MANY_RUA_TXT}
""" + "".join(f"""{name}  MX  10 mx.{name}
mx.{name}  A  {address}
_mta-sts.{name}  TXT  "v=STSv1; id=1;"
mta-sts.{name}  A  {POLICY_HOST}
_smtp._tls.{name}  TXT  "v=TLSRPTv1; rua={RUA}"
""" for name, address in (("othercert", OTHERCERT_MX), ("notls", NOTLS_MX), ("refuse", REFUSE_MX),
                          ("close", CLOSE_MX), ("cnonly", CNONLY_MX)))


class PolicyHandler(harness.PolicyHost):
    policies = POLICIES
    requests = []  # the Host header of every GET
    SILENT = f"mta-sts.silent.{ORIGIN}"  # says nothing for longer than the daemon's fetch_timeout (3s)
    silent = (SILENT,)


class ScriptedMx:
    """An MX host that speaks SMTP itself and records every command it receives, before and after STARTTLS: EHLO
    offers XCLIENT, and STARTTLS when it has a certificate. After the handshake `after_tls` says what it does:
    "serve" (250 to everything, a message taken), "refuse" (421 to the EHLO, then close) or "close" (close at the
    EHLO); "garbage" breaks the handshake itself (220 to STARTTLS, then bytes that are no ServerHello)."""

    def __init__(self, host, port, cert=None, key=None, after_tls="serve"):
        self.name = f"scripted-mx-{host}"
        self.after_tls = after_tls
        self.context = None
        if cert:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert, key)
        self.commands = []  # (tls, command line) in arrival order, over all connections
        self.sock = socket.create_server((host, port))
        threading.Thread(target=self._accept, daemon=True).start()
        harness.LIVE.append(self)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        buffer, tls, data = b"", False, False
        try:
            conn.sendall(b"220 scripted.test ESMTP\r\n")
            while True:
                while b"\r\n" not in buffer:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buffer += chunk
                line, buffer = buffer.split(b"\r\n", 1)
                if data:  # message text, up to its end
                    if line == b".":
                        data = False
                        conn.sendall(b"250 2.0.0 Queued\r\n")
                    continue
                self.commands.append((tls, line.decode(errors="replace")))
                verb = line.split(b" ", 1)[0].upper()
                if tls and self.after_tls == "close":
                    return
                if tls and self.after_tls == "refuse":
                    conn.sendall(b"421 4.3.2 Not now\r\n")
                    return
                if verb == b"EHLO":
                    conn.sendall(b"250-scripted.test\r\n250-XCLIENT ADDR PORT HELO PROTO\r\n" +
                                 (b"250 STARTTLS\r\n" if self.context and not tls else b"250 8BITMIME\r\n"))
                elif verb == b"STARTTLS" and self.after_tls == "garbage":
                    conn.sendall(b"220 2.0.0 Go ahead\r\n")
                    conn.recv(4096)  # the ClientHello
                    conn.sendall(b"this is not a TLS server hello\r\n" * 4)
                    return
                elif verb == b"STARTTLS" and self.context and not tls:
                    conn.sendall(b"220 2.0.0 Go ahead\r\n")
                    conn = self.context.wrap_socket(conn, server_side=True)
                    tls = True
                elif verb == b"XCLIENT":
                    conn.sendall(b"220 scripted.test ESMTP\r\n")
                elif verb == b"DATA":
                    data = True
                    conn.sendall(b"354 Go ahead\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 OK\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()
        if self in harness.LIVE:
            harness.LIVE.remove(self)

    def log_tail(self):
        return "\n".join(f"{'TLS' if tls else 'plain'}: {line}" for tls, line in self.commands[-50:])


@pytest.fixture(scope="module")
def short_dir():
    path = tempfile.mkdtemp(prefix="mf-pol-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(certs, workdir, short_dir, sink_factory, daemon_factory):
    knot = KnotServer(short_dir, {ORIGIN: ZONE}).start()
    server = None
    scripted = {}
    try:
        # mta-sts.nopolicy's (and mta-sts.silent's) name is on the certificate, but the server has no policy for it
        # (404).
        cert, key = harness.ca_signed_cert(certs, workdir, "policy-host",
                                           sorted(POLICIES) + [f"mta-sts.nopolicy.{ORIGIN}", PolicyHandler.SILENT])
        server = harness.https_server(PolicyHandler, cert, key, address=(POLICY_HOST, 443))

        port = harness.free_port("127.0.0.1", GOOD_MX, BAD_MX, PLAIN_MX, OTHERCERT_MX, NOTLS_MX, REFUSE_MX, CLOSE_MX,
                                 BROKEN_MX, CNONLY_MX)
        good_cert, good_key = harness.ca_signed_cert(certs, workdir, "mx-sts", [f"mx.sts.{ORIGIN}"], chain=True)
        sinks = {
            "good": sink_factory("mx-sts", host=GOOD_MX, port=port, tls_cert=good_cert, tls_key=good_key),
            # a certificate from the test CA, for other names (sink.test, localhost)
            "bad": sink_factory("mx-badcert", host=BAD_MX, port=port, tls_cert=certs / "sink.pem",
                                tls_key=certs / "sink.key"),
            "plain": sink_factory("mx-plain", host=PLAIN_MX, port=port),
        }
        scripted = {"othercert": ScriptedMx(OTHERCERT_MX, port, certs / "sink.pem", certs / "sink.key"),
                    "notls": ScriptedMx(NOTLS_MX, port),
                    "broken": ScriptedMx(BROKEN_MX, port, certs / "sink.pem", certs / "sink.key", after_tls="garbage")}
        for name, address in (("refuse", REFUSE_MX), ("close", CLOSE_MX)):
            cert, key = harness.ca_signed_cert(certs, workdir, f"mx-{name}", [f"mx.{name}.{ORIGIN}"], chain=True)
            scripted[name] = ScriptedMx(address, port, cert, key, after_tls=name)
        cert, key = harness.ca_signed_cert(certs, workdir, "mx-cnonly", [f"mx.cnonly.{ORIGIN}"], chain=True,
                                           san=False)
        scripted["cnonly"] = ScriptedMx(CNONLY_MX, port, cert, key)
        listeners = [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                      "upstream": "internet"}]
        upstreams = [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "enforce"},
                     {"name": "lenient", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "testing"},
                     {"name": "verifying", "mx": True, "port": port, "tls": "verify", "ca_file": str(certs / "ca.pem"),
                      "mta_sts": "enforce"},
                     {"name": "verifying-names", "mx": True, "port": port, "tls": "verify",
                      "ca_file": str(certs / "ca.pem"), "verify_names": ["sink.test"], "mta_sts": "enforce"}]
        connectors = [{"name": "partners", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"sts.{ORIGIN}", f"badcert.{ORIGIN}",
                                                       f"notlisted.{ORIGIN}", f"plain.{ORIGIN}",
                                                       f"nopolicy.{ORIGIN}", f"plainrpt.{ORIGIN}",
                                                       f"brokenenf.{ORIGIN}", f"silent.{ORIGIN}"] +
                                                      [f"{name}.{ORIGIN}" for name in scripted if name != "broken"]}},
                      {"name": "lenient-partner", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"testing.{ORIGIN}", f"notlstest.{ORIGIN}",
                                                       f"brokentest.{ORIGIN}"]},
                       "upstream": "lenient"},
                      {"name": "verify-partner", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"vbadcert.{ORIGIN}"]}, "upstream": "verifying"},
                      {"name": "names-partner", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"vnames.{ORIGIN}"]}, "upstream": "verifying-names"}]
        daemon = daemon_factory(listeners, upstreams, connectors,
                                dns={"servers": [knot.address], "timeout": "2s"},
                                mta_sts={"ca_file": str(certs / "ca.pem"), "fetch_timeout": "3s"})
        yield types.SimpleNamespace(daemon=daemon, port=port, sinks=sinks, scripted=scripted, dns=knot.address,
                                    ca=certs / "ca.pem")
    finally:
        for mx in scripted.values():
            mx.stop()
        if server:
            server.shutdown()
        knot.stop()


def deliver(env, rcpt):
    return deliver_to(env.port, rcpt, "app@corp.example", "policy")


def policy_moved(before, after):
    return {(dict(k)["connector"], dict(k)["policy"], dict(k)["result"]): v
            for k, v in delta(before, after, "mailflow_outbound_policy_total").items()}


def tlsrpt(env, domain):
    today = rh.test_day()  # the day the test began, before its traffic
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


def test_a_record_with_more_rua_than_a_report_goes_to_keeps_the_first(env):
    """Any recipient domain names where its reports go: a thousand addresses would make mailflowd send a thousand
    report mails a day on its behalf. The first ten are kept, the rest left out and logged."""
    sink = env.sinks["good"]
    n = sink.count()
    rcpt, final = deliver(env, f"gina@manyrua.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    report = harness.wait_for(lambda: tlsrpt(env, f"manyrua.{ORIGIN}"), 5, what="the day's report")
    assert report["rua"] == MANY_RUA.split(",")[:10]
    assert f"tlsrpt_record domain=manyrua.{ORIGIN} rua=10 left_out=15" in env.daemon.stderr()


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


def test_failed_fetch_is_remembered_so_the_next_message_neither_waits_nor_asks_again(env):
    """RFC 8461 3.3: after a failed fetch, further attempts are limited to one per five minutes per policy id. The
    policy host of silent.<origin> says nothing for longer than fetch_timeout (3s): the first message waits for it and the
    failure is reported; the second message, a moment later, is delivered at once without asking the host again,
    as if there were no policy, and the failure is not reported again (once per fetch, not per message)."""
    sink = env.sinks["plain"]
    n = sink.count()
    PolicyHandler.requests.clear()
    before = env.daemon.metrics()
    started = time.monotonic()
    rcpt, final = deliver(env, f"ivan@silent.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert time.monotonic() - started >= 2.9  # the fetch was given up at fetch_timeout
    sink.wait_messages(n + 1)
    middle = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, middle) == {("partners", "mta-sts", "sts-policy-fetch-error"): 1.0,
                                            ("partners", "none", "success"): 1.0}
    started = time.monotonic()
    rcpt, final = deliver(env, f"judy@silent.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert time.monotonic() - started < 2.0
    sink.wait_messages(n + 2)
    after = harness.wait_moved(env.daemon, middle)
    assert policy_moved(middle, after) == {("partners", "none", "success"): 1.0}
    assert PolicyHandler.requests.count(PolicyHandler.SILENT) == 1, PolicyHandler.requests


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


@pytest.mark.parametrize("name,result", [("othercert", "certificate-host-mismatch"),
                                         ("notls", "starttls-not-supported"),
                                         # RFC 8461 4.2: the MX name must be a DNS-ID of the subjectAltName
                                         ("cnonly", "certificate-host-mismatch")])
def test_enforced_policy_tells_a_failing_host_nothing_more(env, name, result):
    """RFC 8461 5: the MTA-STS check belongs right after the TLS handshake (and before anything is sent to a host
    that has no STARTTLS): a host that fails it under enforce gets neither XCLIENT (the real client's address and
    HELO) nor a second EHLO. The scripted MX offers XCLIENT and records every command."""
    mx = env.scripted[name]
    start = len(mx.commands)
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"kim@{name}.{ORIGIN}")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    received = mx.commands[start:]
    verbs = [line.split(" ", 1)[0].upper() for _, line in received]
    assert verbs and verbs[0] == "EHLO", received  # it was contacted
    assert "XCLIENT" not in verbs and verbs.count("EHLO") == 1, received
    assert "MAIL" not in verbs, received
    assert not any(tls for tls, _ in received), received  # not a word inside TLS either
    assert policy_moved(before, env.daemon.metrics()) == {("partners", "mta-sts", result): 1.0}
    (detail,) = tlsrpt(env, f"{name}.{ORIGIN}")["report"]["policies"][0]["failure-details"]
    assert detail["result-type"] == result and detail["receiving-mx-hostname"] == f"mx.{name}.{ORIGIN}", detail


@pytest.mark.parametrize("name", ["refuse", "close"])
def test_tls_session_that_fails_after_the_handshake_is_a_successful_tls_session(env, name):
    """RFC 8460 counts TLS sessions by their negotiation: the handshake and the policy's checks succeeded, so the
    session is a success in mailflow_outbound_policy_total and in the domain's TLS report, whatever SMTP said next
    (the EHLO after STARTTLS refused, or the connection closed)."""
    mx = env.scripted[name]
    start = len(mx.commands)
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"lee@{name}.{ORIGIN}")
    assert rcpt[0] == 451, rcpt  # no host took the mail
    received = mx.commands[start:]
    assert any(tls for tls, _ in received), received  # TLS was negotiated, the EHLO inside it sent
    assert policy_moved(before, env.daemon.metrics()) == {("partners", "mta-sts", "success"): 1.0}
    (entry,) = tlsrpt(env, f"{name}.{ORIGIN}")["report"]["policies"]
    assert entry["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}, entry


def test_verify_names_do_not_stand_in_for_the_mx_host_name_under_mta_sts(env):
    """tls: verify with verify_names: ["sink.test"]: the MX's certificate (sink.test, from the trusted CA) passes the
    upstream's own check, but MTA-STS wants a certificate valid for the MX host name (RFC 8461 4.2), which it is
    not: under enforce the host is not used, and certificate-host-mismatch is reported."""
    sink = env.sinks["bad"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"max@vnames.{ORIGIN}")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    assert sink.count() == n
    assert policy_moved(before, env.daemon.metrics()) == \
        {("names-partner", "mta-sts", "certificate-host-mismatch"): 1.0}
    (detail,) = tlsrpt(env, f"vnames.{ORIGIN}")["report"]["policies"][0]["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch", detail


def test_testing_policy_delivers_in_plaintext_and_reports_starttls_not_supported(env):
    """A testing policy withholds nothing: an MX without STARTTLS gets the mail in plaintext, and the session is
    reported as the policy's failure (starttls-not-supported), not as a success."""
    mx = env.scripted["notls"]
    start = len(mx.commands)
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"nina@notlstest.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert "XCLIENT" in [line.split(" ", 1)[0] for _, line in mx.commands[start:]], mx.commands[start:]
    assert policy_moved(before, harness.wait_moved(env.daemon, before)) == \
        {("lenient-partner", "mta-sts", "starttls-not-supported"): 1.0}
    (detail,) = tlsrpt(env, f"notlstest.{ORIGIN}")["report"]["policies"][0]["failure-details"]
    assert detail["result-type"] == "starttls-not-supported", detail


def test_testing_policy_mx_with_broken_tls_gets_the_mail_in_plaintext(env):
    """tls: opportunistic under a testing policy (RFC 8461 5: testing withholds no mail): an MX whose TLS handshake
    fails gets the mail over a new connection without STARTTLS. The failed handshake is the session that counts
    and is reported (validation-failure), once: the plaintext retry adds neither a success nor a second
    failure."""
    mx = env.scripted["broken"]
    start = len(mx.commands)
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"otto@brokentest.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    verbs = [(tls, line.split(" ", 1)[0].upper()) for tls, line in mx.commands[start:]]
    assert verbs.count((False, "STARTTLS")) == 1 and (False, "DATA") in verbs, mx.log_tail()
    after = harness.assert_counted(env.daemon, before, "lenient-partner", "outbound", "none")
    assert policy_moved(before, after) == {("lenient-partner", "mta-sts", "validation-failure"): 1.0}
    (entry,) = tlsrpt(env, f"brokentest.{ORIGIN}")["report"]["policies"]
    assert entry["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}, entry
    (detail,) = entry["failure-details"]
    assert detail["result-type"] == "validation-failure", detail
    assert detail["receiving-mx-hostname"] == f"mx.brokentest.{ORIGIN}" and detail["receiving-ip"] == BROKEN_MX


def test_enforced_policy_mx_with_broken_tls_gets_no_plaintext_retry(env):
    """tls: opportunistic retries a failed handshake in plaintext, but never under an enforced policy (RFC 8461 5:
    a host that fails the policy is not used): the same broken MX as above, enforced, gets STARTTLS once and no
    message; the sender gets 451 and the failure is reported."""
    mx = env.scripted["broken"]
    start = len(mx.commands)
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"pia@brokenenf.{ORIGIN}")
    assert rcpt[0] == 451, rcpt
    verbs = [(tls, line.split(" ", 1)[0].upper()) for tls, line in mx.commands[start:]]
    assert verbs.count((False, "STARTTLS")) == 1, mx.log_tail()
    assert not [v for _, v in verbs if v in ("MAIL", "RCPT", "DATA", "XCLIENT")], mx.log_tail()
    harness.assert_not_counted(env.daemon, before)
    assert policy_moved(before, env.daemon.metrics()) == {("partners", "mta-sts", "validation-failure"): 1.0}
