"""An MTA-STS policy fetch that fails for a reason of the relay's own (out of file descriptors) is no failure of the
recipient domain's: not counted or reported as sts-policy-fetch-error (mailflow_outbound_policy_total and the
domain's TLS report), not remembered as the domain's failed fetch (the next message fetches again), counted as
mailflow_upstream_errors_total{reason="local_resources"}; with no policy in force the message waits (451 4.4.1).

A real knotd serves the domain (MX, _mta-sts TXT, the policy host's address), a real HTTPS server on
127.0.0.100:443 serves its enforce policy (max_age 1 s, so that the next message fetches it again), a sink on
127.0.0.101 is its MX. The daemon's RLIMIT_NOFILE is lowered with prlimit while the DNS answers are in its
resolver's cache, so the only thing that needs a new descriptor is the fetch (and the MX connect after it)."""
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

import harness
from harness import delta
from hostile_helpers import greeted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

ORIGIN = "stsfd.example.net"
DOMAIN = f"short.{ORIGIN}"
POLICY_HOST, MX = "127.0.0.100", "127.0.0.101"
POLICY = f"version: STSv1\r\nmode: enforce\r\nmx: mx.{DOMAIN}\r\nmax_age: 1\r\n"
ZONE = f"""$ORIGIN {ORIGIN}.
$TTL 300
@   SOA  ns hostmaster 1 3600 600 86400 300
@   NS   ns
ns  A    127.0.0.1
short  MX  10 mx.short
mx.short  A  {MX}
_mta-sts.short  TXT  "v=STSv1; id=1;"
mta-sts.short  A  {POLICY_HOST}
"""


class PolicyHandler(harness.PolicyHost):
    policies = {f"mta-sts.{DOMAIN}": POLICY}
    requests = []


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    short_dir = Path(tempfile.mkdtemp(prefix="mf-stsfd-"))
    knot = KnotServer(short_dir, {ORIGIN: ZONE}).start()
    server = None
    try:
        cert, key = harness.ca_signed_cert(certs, workdir, "stsfd-policy", [f"mta-sts.{DOMAIN}"])
        server = harness.https_server(PolicyHandler, cert, key, address=(POLICY_HOST, 443))
        port = harness.free_port("127.0.0.1", MX)
        mx_cert, mx_key = harness.ca_signed_cert(certs, workdir, "stsfd-mx", [f"mx.{DOMAIN}"])
        sink = sink_factory("stsfd-mx", host=MX, port=port, tls_cert=mx_cert, tls_key=mx_key)
        daemon = daemon_factory(
            [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
            [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic", "mta_sts": "enforce"}],
            name="stsfd", dns={"servers": [knot.address], "timeout": "2s"},
            mta_sts={"ca_file": str(certs / "ca.pem"), "fetch_timeout": "3s"})
        yield types.SimpleNamespace(daemon=daemon, port=port, sink=sink)
    finally:
        if server:
            server.shutdown()
        knot.stop()
        shutil.rmtree(short_dir, ignore_errors=True)


def deliver(env, c):
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    rcpt = c.cmd(f"RCPT TO:<ann@{DOMAIN}>")
    if rcpt[0] != 250:
        return rcpt, None
    assert c.cmd("DATA")[0] == 354
    c.send(f"From: app@corp.example\r\nTo: ann@{DOMAIN}\r\nSubject: fd\r\n\r\nbody\r\n".encode())
    return rcpt, c.cmd(".")


def policy_moved(before, after):
    return {(dict(k)["policy"], dict(k)["result"]): v
            for k, v in delta(before, after, "mailflow_outbound_policy_total").items()}


def test_policy_fetch_out_of_descriptors_is_not_the_domains_failure(env, mailflowd_bin):
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, sink = env.daemon, env.sink
    # A first message: the policy is fetched and applied, and every DNS answer is in the resolver's cache.
    c = greeted(env.port)
    n = sink.count()
    before = daemon.metrics()
    rcpt, final = deliver(env, c)
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final, daemon.log_tail())
    sink.wait_messages(n + 1)
    after = harness.wait_moved(daemon, before)
    assert policy_moved(before, after) == {("mta-sts", "success"): 1.0}
    fetched = len(PolicyHandler.requests)
    assert fetched == 1, PolicyHandler.requests
    c.cmd("QUIT")
    c.close()  # its upstream connection with it: the next session opens the upstream, MTA-STS lookup first
    c = greeted(env.port)  # while there are descriptors for it
    time.sleep(2.2)  # the policy (max_age 1) has expired: the next message fetches it again

    before = daemon.metrics()
    with harness.out_of_descriptors(daemon):
        rcpt, _ = deliver(env, c)
    assert rcpt[0] == 451 and "4.4.1" in rcpt[1], f"RCPT with no descriptor for the policy fetch: {rcpt!r}"
    after = daemon.metrics()
    assert len(PolicyHandler.requests) == fetched, "the fetch reached the policy host although it had no socket"
    # Nothing of the domain's: no sts-policy-fetch-error (the TLS report's policy counts are these).
    assert policy_moved(before, after) == {}, \
        f"mailflow_outbound_policy_total moved by {policy_moved(before, after)}\n{daemon.log_tail()}"
    errors = {dict(k)["reason"]: v for k, v in
              delta(before, after, "mailflow_upstream_errors_total", upstream="internet").items()}
    assert errors == {"local_resources": 1.0}, f"mailflow_upstream_errors_total moved by {errors}"
    line = [l for l in daemon.stderr().splitlines() if "upstream_error" in l][-1]
    assert "reason=local_resources" in line and "Too many open files" in line and DOMAIN in line, line

    # Descriptors back: the next message fetches the policy again (no failed fetch was remembered) and is
    # delivered under it.
    c.cmd("QUIT")
    c.close()
    c = greeted(env.port)
    before = daemon.metrics()
    rcpt, final = deliver(env, c)
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final, daemon.log_tail())
    sink.wait_messages(n + 2)
    after = harness.wait_moved(daemon, before)
    assert len(PolicyHandler.requests) == fetched + 1, "the policy was not fetched again once descriptors were back"
    assert policy_moved(before, after) == {("mta-sts", "success"): 1.0}
    c.cmd("QUIT")
    c.close()
