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
  report as dnssec-invalid;
- MTA-STS (a real HTTPS policy host on 127.0.0.92:443): the lookup of mta-sts.<domain>'s address before a policy
  fetch (its A record's TTL and the policy's max_age are 1 s) is not the domain's sts-policy-fetch-error (TLS
  report, mailflow_outbound_policy_total) nor remembered as its failed fetch (the next message fetches again);
  the _mta-sts TXT lookup (TTL 1 s) is not taken as "no record": with no policy in force both leave the
  message waiting (451 4.4.1) rather than try the MX hosts as though the domain published none;
- libunbound out of memory for a query (UB_NOMEM; failpoints resolver.no_memory.MX and .TLSA stand in for it):
  an MX lookup and a TLSA lookup are the relay's own failure as above, not the domain's dns_failure nor, under
  DANE, its host skipped and reported as dnssec-invalid.

The fixed loopback addresses are of this file's range, 127.0.0.90-94."""
import json
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

import harness
import report_helpers as rh
from harness import delta
from hostile_helpers import deliver_to, greeted
from test_dane import spki_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

# The TLS reports asked for are those of the UTC day each test began on (report_helpers.day_clear_of_midnight).
pytestmark = pytest.mark.usefixtures("utc_day")

ORIGIN = "dnsfd.example.net"
MX, POLICY_HOST = "127.0.0.90", "127.0.0.92"
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
sts        MX  10 mx.sts
mx.sts     A   {MX}
_mta-sts.sts  TXT  "v=STSv1; id=1;"
mta-sts.sts  1  A  {POLICY_HOST}
_smtp._tls.sts  TXT  "v=TLSRPTv1; rua={RUA}"
ststxt     MX  10 mx.ststxt
mx.ststxt  A   {MX}
_mta-sts.ststxt  1  TXT  "v=STSv1; id=1;"
mta-sts.ststxt  A  {POLICY_HOST}
store  1  A  {MX}
"""


class PolicyHandler(harness.PolicyHost):
    policies = {f"mta-sts.sts.{ORIGIN}": f"version: STSv1\r\nmode: testing\r\nmx: mx.sts.{ORIGIN}\r\nmax_age: 1\r\n"}
    requests = []


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    short_dir = Path(tempfile.mkdtemp(prefix="mf-dnsfd-"))  # knotd's control socket path must stay short
    port = harness.free_port("127.0.0.1", MX)
    knot = KnotServer(short_dir, {ORIGIN: zone(port, spki_sha256(certs / "sink.pem"))}, dnssec=True).start()
    server = None
    try:
        cert, key = harness.ca_signed_cert(certs, workdir, "dnsfd-policy",
                                           [f"mta-sts.sts.{ORIGIN}", f"mta-sts.ststxt.{ORIGIN}"])
        server = harness.https_server(PolicyHandler, cert, key, address=(POLICY_HOST, 443))
        sink = sink_factory("dnsfd-mx", host=MX, port=port, tls_cert=certs / "sink.pem", tls_key=certs / "sink.key")
        daemon = daemon_factory(
            [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
            [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "off"},
             {"name": "dane-mx", "mx": True, "port": port, "tls": "dane", "mta_sts": "off"},
             {"name": "sts-mx", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "testing"},
             {"name": "store", "address": f"store.{ORIGIN}:{port}", "tls": "none"}],
            [{"name": "partners", "type": "partner", "direction": "outbound", "upstream": "dane-mx",
              "match": {"recipient_domains": [f"dane.{ORIGIN}"]}},
             {"name": "sts-partners", "type": "partner", "direction": "outbound", "upstream": "sts-mx",
              "match": {"recipient_domains": [f"sts.{ORIGIN}", f"ststxt.{ORIGIN}"]}},
             {"name": "stored", "type": "onpremises", "direction": "outbound", "upstream": "store",
              "match": {"recipient_domains": ["corp.example"]}}],
            name="dnsfd", dns={"servers": [knot.address], "timeout": "2s",
                               "trust_anchor_file": str(knot.trust_anchor_file)},
            mta_sts={"ca_file": str(certs / "ca.pem"), "fetch_timeout": "3s"})
        yield types.SimpleNamespace(daemon=daemon, port=port, sink=sink, knot=knot)
    finally:
        if server:
            server.shutdown()
        knot.stop()
        shutil.rmtree(short_dir, ignore_errors=True)


def send(c, rcpt):
    assert c.cmd("DATA")[0] == 354
    c.send(f"From: app@corp.example\r\nTo: {rcpt}\r\nSubject: dnsfd\r\n\r\nbody\r\n".encode())
    return c.cmd(".")


def moved(before, after, name, label, **labels):
    return {dict(k)[label]: v for k, v in delta(before, after, name, **labels).items()}


def tlsrpt(daemon, domain):
    today = rh.test_day()  # the day the test began, before its traffic
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
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd(f"RCPT TO:<ann@fresh.{ORIGIN}>")
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
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
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


def sts_at_descriptor_limit(daemon, c, domain, step):
    """RCPT to `domain` while `step` cannot be sent: the message waits, nothing of the domain's is counted."""
    before = daemon.metrics()
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd(f"RCPT TO:<carl@{domain}>")
    after = daemon.metrics()
    log = daemon.log_tail()
    assert text.startswith(f"451 4.4.1 MTA-STS policy of {domain} could not be had (local_resources)"), \
        f"RCPT with no descriptor for {step}: {text!r}\n{log}"
    assert moved(before, after, "mailflow_outbound_policy_total", "result") == {}, \
        f"{step} counted as the domain's failure\n{log}"
    assert moved(before, after, "mailflow_upstream_errors_total", "reason", upstream="sts-mx") == \
        {"local_resources": 1.0}, log
    assert moved(before, after, "mailflow_mx_attempts_total", "result") == {}, \
        f"after {step} failed, the MX hosts were tried without the domain's policy"
    line = [l for l in daemon.stderr().splitlines() if "upstream_error" in l][-1]
    assert "reason=local_resources" in line and domain in line and "Too many open files" in line, line
    assert c.cmd("RSET")[0] == 250 and c.cmd("MAIL FROM:<app@corp.example>")[0] == 250


def test_mta_sts_lookups_out_of_descriptors_are_not_the_domains_failures(env, mailflowd_bin):
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, sink = env.daemon, env.sink
    sts, ststxt = f"sts.{ORIGIN}", f"ststxt.{ORIGIN}"
    # ststxt's policy host has none (404: its failed fetch is reported and remembered, and the message goes on
    # without a policy); its answers are cached, the _mta-sts TXT record for 1 s.
    n = sink.count()
    rcpt_reply, final = deliver_to(env.port, f"carl@{ststxt}", "app@corp.example", "dnsfd")
    assert rcpt_reply[0] == 250 and final[0] == 250, (rcpt_reply, final, daemon.log_tail())
    c = greeted(env.port)
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    time.sleep(2.5)
    sts_at_descriptor_limit(daemon, c, ststxt, "the _mta-sts TXT lookup")

    # sts's policy is fetched (max_age 1 s), its answers cached (the policy host's address for 1 s).
    rcpt_reply, final = deliver_to(env.port, f"carl@{sts}", "app@corp.example", "dnsfd")
    assert rcpt_reply[0] == 250 and final[0] == 250, (rcpt_reply, final, daemon.log_tail())
    sink.wait_messages(n + 2)
    assert PolicyHandler.requests == [f"mta-sts.{ststxt}", f"mta-sts.{sts}"], PolicyHandler.requests
    report_before = tlsrpt(daemon, sts)
    time.sleep(2.5)
    sts_at_descriptor_limit(daemon, c, sts, "the policy host's address lookup")
    assert tlsrpt(daemon, sts) == report_before, "the policy host's address lookup reported as the domain's failure"

    # Descriptors back: sts's policy is fetched again (no failed fetch remembered) and the message delivered.
    code, text = c.cmd(f"RCPT TO:<carl@{sts}>")
    assert code == 250, f"RCPT once descriptors are free again: {text!r}\n{daemon.log_tail()}"
    assert PolicyHandler.requests[2:] == [f"mta-sts.{sts}"], PolicyHandler.requests
    assert send(c, f"carl@{sts}")[0] == 250
    sink.wait_messages(n + 3)
    c.cmd("QUIT")
    c.close()


def test_fixed_upstream_name_lookup_out_of_descriptors_is_not_the_upstreams_failure(env, mailflowd_bin):
    """A fixed upstream named by a host name (store.dnsfd.example.net, TTL 1 s) is looked up through the loop's
    libunbound: at the descriptor limit, once that resolver exists, the lookup's SERVFAIL is the relay's own
    (upstream_errors local_resources, 451 4.4.3), not the upstream's connect_failed, which MailflowUpstreamDown
    pages for; with descriptors back the next transaction is relayed."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, sink = env.daemon, env.sink
    n = sink.count()
    rcpt_reply, final = deliver_to(env.port, "dana@corp.example", "app@corp.example", "dnsfd")
    assert rcpt_reply[0] == 250 and final[0] == 250, (rcpt_reply, final, daemon.log_tail())
    c = greeted(env.port)
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    time.sleep(2.5)  # the upstream's A record has expired from the cache
    before = daemon.metrics()
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd("RCPT TO:<dana@corp.example>")
    after = daemon.metrics()
    log = daemon.log_tail()
    assert text.startswith("451 4.4.3 DNS resolver unavailable"), f"RCPT with no descriptor for the upstream's " \
                                                                  f"lookup: {text!r}\n{log}"
    assert moved(before, after, "mailflow_upstream_errors_total", "reason", upstream="store") == \
        {"local_resources": 1.0}, log
    assert c.cmd("RSET")[0] == 250 and c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    code, text = c.cmd("RCPT TO:<dana@corp.example>")
    assert code == 250, f"RCPT once descriptors are free again: {text!r}\n{daemon.log_tail()}"
    assert send(c, "dana@corp.example")[0] == 250
    sink.wait_messages(n + 2)
    c.cmd("QUIT")
    c.close()


def test_lookups_libunbound_has_no_memory_for_are_not_the_domains_failures(env, daemon_factory, monkeypatch):
    """libunbound that cannot allocate a query (ub_resolve_async's UB_NOMEM, or its worker's in the answer) sent
    nothing: the MX lookup was the domain's "451 4.4.3 Temporary DNS failure ... (MX: resolver error: out of
    memory)", counted as its dns_failure, and the TLSA lookup under DANE had the MX host skipped and the domain's
    TLS report say dnssec-invalid. A daemon of its own, whose first MX and first TLSA query get UB_NOMEM."""
    monkeypatch.setenv("MAILFLOWD_FAILPOINTS", "resolver.no_memory.MX=1,resolver.no_memory.TLSA=1")
    port = harness.free_port()
    daemon = daemon_factory(
        [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
        [{"name": "internet", "mx": True, "port": env.port, "tls": "opportunistic", "mta_sts": "off"},
         {"name": "dane-mx", "mx": True, "port": env.port, "tls": "dane", "mta_sts": "off"}],
        [{"name": "partners", "type": "partner", "direction": "outbound", "upstream": "dane-mx",
          "match": {"recipient_domains": [f"dane.{ORIGIN}"]}}],
        name="dnsfd-nomem", dns={"servers": [env.knot.address], "timeout": "2s",
                                 "trust_anchor_file": str(env.knot.trust_anchor_file)})
    monkeypatch.delenv("MAILFLOWD_FAILPOINTS")
    c = greeted(port)
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    for upstream, rcpt, lookup in (("internet", f"ann@fresh.{ORIGIN}", "MX"), ("dane-mx", f"bob@dane.{ORIGIN}", "TLSA")):
        before = daemon.metrics()
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        after = daemon.metrics()
        log = daemon.log_tail()
        assert text.startswith("451 4.4.3 DNS resolver unavailable"), \
            f"RCPT whose {lookup} lookup libunbound had no memory for: {text!r}\n{log}"
        assert moved(before, after, "mailflow_upstream_errors_total", "reason", upstream=upstream) == \
            {"local_resources": 1.0}, log
        assert moved(before, after, "mailflow_rejects_total", "reason") == {}, "counted as the domain's DNS failure"
        assert moved(before, after, "mailflow_mx_attempts_total", "result") == {}, "an MX host counted a failure"
        assert moved(before, after, "mailflow_outbound_policy_total", "result") == {}, "a DANE failure was counted"
        assert moved(before, after, "mailflow_dns_lookups_total", "result", type=lookup) == \
            {"local_resources": 1.0}, log
        line = [l for l in daemon.stderr().splitlines() if "dns_unavailable" in l][-1]
        assert "reason=local_resources" in line and rcpt.split("@")[1] in line and "out of memory" in line, line
        assert c.cmd("RSET")[0] == 250 and c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    assert tlsrpt(daemon, f"dane.{ORIGIN}") is None, "the TLSA lookup reported in the domain's TLS report"
    # Memory back: both are delivered, the dane domain's under DANE, its report one successful session.
    n = env.sink.count()
    for rcpt in (f"ann@fresh.{ORIGIN}", f"bob@dane.{ORIGIN}"):
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, f"RCPT {rcpt} after the failed lookup: {text!r}\n{daemon.log_tail()}"
        assert send(c, rcpt)[0] == 250
        assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    env.sink.wait_messages(n + 2)
    report = tlsrpt(daemon, f"dane.{ORIGIN}")
    assert report and [p["summary"] for p in report["report"]["policies"]] == \
        [{"total-successful-session-count": 1, "total-failure-session-count": 0}], report
    c.cmd("QUIT")
    c.close()
