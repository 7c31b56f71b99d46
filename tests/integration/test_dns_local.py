"""A DNS lookup that fails for a reason of the relay's own (out of file descriptors: libunbound cannot make the
socket for its query, logs "can't create socket" and answers SERVFAIL) is no failure of the recipient domain's.
Against the real binary, a real knotd serving a DNSSEC-signed zone, and a real sink as the MX host, with the
daemon's RLIMIT_NOFILE lowered with prlimit for one RCPT while the session is open:

- an MX lookup: the RCPT gets 451 4.4.3 DNS resolver unavailable (as when the resolver itself cannot be made),
  counted as mailflow_upstream_errors_total{reason="local_resources"} and
  mailflow_dns_lookups_total{result="local_resources"}, not as the domain's dns_failure (mailflow_rejects_total);
  logged dns_unavailable with the domain. With descriptors back the next transaction looks the domain up again
  and is delivered (libunbound's cache, which holds the SERVFAIL, was given up);
- under DANE, a TLSA lookup (the TLSA record's TTL is 1 s, so that it is looked up again while the MX, address and
  _smtp._tls answers are still in the resolver's cache): the same, and the MX host is neither skipped
  (mailflow_mx_attempts_total tls_policy) nor reported in mailflow_outbound_policy_total and the domain's TLS
  report as dnssec-invalid.

The fixed loopback address is of this file's range, 127.0.0.90-94."""
import datetime
import json
import resource
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

import harness
from harness import delta
from hostile_helpers import deliver_to, greeted
from test_dane import spki_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

ORIGIN = "dnsfd.example.net"
MX = "127.0.0.90"
RUA = f"mailto:tlsrpt@{ORIGIN}"


def zone(port, spki):
    return f"""$ORIGIN {ORIGIN}.
$TTL 300
@   SOA  ns hostmaster 1 3600 600 86400 300
@   NS   ns
ns  A    127.0.0.1
fresh      MX  10 mx.fresh
mx.fresh   A   {MX}
dane       MX  10 mx.dane
mx.dane    A   {MX}
_{port}._tcp.mx.dane  1  TLSA  3 1 1 {spki}
_smtp._tls.dane  TXT  "v=TLSRPTv1; rua={RUA}"
"""


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    short_dir = Path(tempfile.mkdtemp(prefix="mf-dnsfd-"))  # knotd's control socket path must stay short
    port = harness.free_port("127.0.0.1", MX)
    knot = KnotServer(short_dir, {ORIGIN: zone(port, spki_sha256(certs / "sink.pem"))}, dnssec=True).start()
    try:
        sink = sink_factory("dnsfd-mx", host=MX, port=port, tls_cert=certs / "sink.pem", tls_key=certs / "sink.key")
        daemon = daemon_factory(
            [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
            [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "off"},
             {"name": "dane-mx", "mx": True, "port": port, "tls": "dane", "mta_sts": "off"}],
            [{"name": "partners", "type": "partner", "direction": "outbound", "upstream": "dane-mx",
              "match": {"recipient_domains": [f"dane.{ORIGIN}"]}}],
            name="dnsfd", dns={"servers": [knot.address], "timeout": "2s",
                               "trust_anchor_file": str(knot.trust_anchor_file)})
        yield types.SimpleNamespace(daemon=daemon, port=port, sink=sink)
    finally:
        knot.stop()
        shutil.rmtree(short_dir, ignore_errors=True)


def at_descriptor_limit(daemon, c, command):
    """`command`'s reply while the daemon cannot make a new descriptor (every number below 3 is taken)."""
    pid = daemon.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        return c.cmd(command)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def send(c, rcpt):
    assert c.cmd("DATA")[0] == 354
    c.send(f"From: app@corp.example\r\nTo: {rcpt}\r\nSubject: dnsfd\r\n\r\nbody\r\n".encode())
    return c.cmd(".")


def moved(before, after, name, label, **labels):
    return {dict(k)[label]: v for k, v in delta(before, after, name, **labels).items()}


def tlsrpt(daemon, domain):
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    status, body = daemon.get(f"/api/v1/tlsrpt?date={today}")
    assert status == 200, body
    return {r["domain"]: r for r in json.loads(body)["reports"]}.get(domain)


def test_mx_lookup_out_of_descriptors_is_not_the_domains_dns_failure(env, mailflowd_bin):
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, sink = env.daemon, env.sink
    c = greeted(env.port)
    # A first RCPT of another domain makes the loop's resolver, so that what fails below is the lookup itself.
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    assert c.cmd(f"RCPT TO:<x@nowhere.{ORIGIN}>")[0] == 550
    before = daemon.metrics()
    code, text = at_descriptor_limit(daemon, c, f"RCPT TO:<ann@fresh.{ORIGIN}>")
    after = daemon.metrics()
    log = daemon.log_tail()
    assert text.startswith("451 4.4.3 DNS resolver unavailable"), f"RCPT with no descriptor for the MX lookup: " \
                                                                  f"{text!r}\n{log}"
    assert moved(before, after, "mailflow_upstream_errors_total", "reason", upstream="internet") == \
        {"local_resources": 1.0}, log
    assert moved(before, after, "mailflow_rejects_total", "reason") == {}, "counted as the domain's DNS failure"
    assert moved(before, after, "mailflow_dns_lookups_total", "result", type="MX") == {"local_resources": 1.0}
    line = [l for l in daemon.stderr().splitlines() if "dns_unavailable" in l][-1]
    assert "reason=local_resources" in line and f"fresh.{ORIGIN}" in line, line
    # Descriptors back: the next transaction looks the domain up again (no failure of its remembered) and is
    # delivered.
    n = sink.count()
    assert c.cmd("RSET")[0] == 250 and c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    code, text = c.cmd(f"RCPT TO:<ann@fresh.{ORIGIN}>")
    assert code == 250, f"RCPT once descriptors are free again: {text!r}\n{daemon.log_tail()}"
    assert send(c, f"ann@fresh.{ORIGIN}")[0] == 250
    sink.wait_messages(n + 1)
    c.cmd("QUIT")
    c.close()


def test_tlsa_lookup_out_of_descriptors_is_not_reported_as_the_domains_failure(env, mailflowd_bin):
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, sink = env.daemon, env.sink
    rcpt = f"bob@dane.{ORIGIN}"
    domain = f"dane.{ORIGIN}"
    # A first message under DANE: delivered, one successful session in the domain's TLS report, every answer
    # in the resolver's cache (the TLSA record for 1 s only).
    n = sink.count()
    rcpt_reply, final = deliver_to(env.port, rcpt, "app@corp.example", "dnsfd")
    assert rcpt_reply[0] == 250 and final[0] == 250, (rcpt_reply, final, daemon.log_tail())
    sink.wait_messages(n + 1)
    success = {"total-successful-session-count": 1, "total-failure-session-count": 0}
    report = tlsrpt(daemon, domain)
    assert report and [p["summary"] for p in report["report"]["policies"]] == [success], report
    c = greeted(env.port)
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    time.sleep(2.5)  # the TLSA record has expired from the cache; the MX, A and TLS-RPT answers have not
    before = daemon.metrics()
    code, text = at_descriptor_limit(daemon, c, f"RCPT TO:<{rcpt}>")
    after = daemon.metrics()
    log = daemon.log_tail()
    assert text.startswith("451 4.4.3 DNS resolver unavailable"), f"RCPT with no descriptor for the TLSA " \
                                                                  f"lookup: {text!r}\n{log}"
    assert moved(before, after, "mailflow_upstream_errors_total", "reason", upstream="dane-mx") == \
        {"local_resources": 1.0}, log
    assert moved(before, after, "mailflow_mx_attempts_total", "result") == {}, "the MX host counted a failure"
    assert moved(before, after, "mailflow_outbound_policy_total", "result") == {}, "a DANE failure was counted"
    assert moved(before, after, "mailflow_dns_lookups_total", "result", type="TLSA") == {"local_resources": 1.0}
    report = tlsrpt(daemon, domain)
    assert [p["summary"] for p in report["report"]["policies"]] == [success], \
        f"the domain's TLS report after a TLSA lookup that the relay could not make: {report}"
    # Descriptors back: the next transaction is delivered under DANE again.
    assert c.cmd("RSET")[0] == 250 and c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    code, text = c.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 250, f"RCPT once descriptors are free again: {text!r}\n{daemon.log_tail()}"
    assert send(c, rcpt)[0] == 250
    sink.wait_messages(n + 2)
    c.cmd("QUIT")
    c.close()
