"""Which trust store decides an MX certificate under MTA-STS (RFC 8461 4.2: valid for the MX host name and chained
to a CA the sending MTA trusts, the Web PKI that the policy host is checked against too): mta_sts.ca_file (else the
system's), also for an upstream with tls: verify, whose ca_file is its own, stricter or private, requirement.

A real knotd serves the domains; a real HTTPS server on 127.0.0.130:443 serves their enforce policies; two MX sinks
present certificates for their names: mx.private's from a private CA that only the upstream's ca_file trusts,
mx.public's from the test CA (mta_sts.ca_file). The upstream verifies against both CAs (ca_file holds both)."""
import shutil
import sys
import tempfile
import types
from pathlib import Path

import pytest

import harness
from harness import delta
from hostile_helpers import deliver_to

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

ORIGIN = "sts3.example.net"
POLICY_HOST, PRIVATE_MX, PUBLIC_MX = "127.0.0.130", "127.0.0.131", "127.0.0.132"
POLICIES = {f"mta-sts.{name}.{ORIGIN}": f"version: STSv1\r\nmode: enforce\r\nmx: mx.{name}.{ORIGIN}\r\n"
                                        "max_age: 86400\r\n" for name in ("private", "public")}
ZONE = f"""$ORIGIN {ORIGIN}.
$TTL 300
@   SOA  ns hostmaster 1 3600 600 86400 300
@   NS   ns
ns  A    127.0.0.1
""" + "".join(f"""{name}  MX  10 mx.{name}
mx.{name}  A  {address}
_mta-sts.{name}  TXT  "v=STSv1; id=1;"
mta-sts.{name}  A  {POLICY_HOST}
""" for name, address in (("private", PRIVATE_MX), ("public", PUBLIC_MX)))


class PolicyHandler(harness.PolicyHost):
    policies = POLICIES
    requests = []


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    short_dir = Path(tempfile.mkdtemp(prefix="mf-sts3-"))
    knot = KnotServer(short_dir, {ORIGIN: ZONE}).start()
    server = None
    try:
        cert, key = harness.ca_signed_cert(certs, workdir, "sts3-policy", sorted(POLICIES))
        server = harness.https_server(PolicyHandler, cert, key, address=(POLICY_HOST, 443))

        private_ca = harness.make_ca(workdir, "sts3-private-ca", "mailflow private CA")
        both = workdir / "sts3-both-cas.pem"
        both.write_text(private_ca.read_text() + (certs / "ca.pem").read_text())
        port = harness.free_port("127.0.0.1", PRIVATE_MX, PUBLIC_MX)
        private_cert, private_key = harness.ca_signed_cert(workdir, workdir, "sts3-mx-private",
                                                           [f"mx.private.{ORIGIN}"], ca="sts3-private-ca")
        public_cert, public_key = harness.ca_signed_cert(certs, workdir, "sts3-mx-public", [f"mx.public.{ORIGIN}"])
        sinks = {"private": sink_factory("sts3-private", host=PRIVATE_MX, port=port, tls_cert=private_cert,
                                         tls_key=private_key),
                 "public": sink_factory("sts3-public", host=PUBLIC_MX, port=port, tls_cert=public_cert,
                                        tls_key=public_key)}
        daemon = daemon_factory(
            [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
            [{"name": "internet", "mx": True, "port": port, "tls": "verify", "ca_file": str(both),
              "mta_sts": "enforce"}],
            name="sts3", dns={"servers": [knot.address], "timeout": "2s"},
            mta_sts={"ca_file": str(certs / "ca.pem"), "fetch_timeout": "3s"})
        yield types.SimpleNamespace(daemon=daemon, port=port, sinks=sinks)
    finally:
        if server:
            server.shutdown()
        knot.stop()
        shutil.rmtree(short_dir, ignore_errors=True)


def deliver(env, rcpt):
    return deliver_to(env.port, rcpt, "app@corp.example", "trust")


def policy_moved(before, after):
    return {(dict(k)["policy"], dict(k)["result"]): v
            for k, v in delta(before, after, "mailflow_outbound_policy_total").items()}


def test_mx_certificate_from_a_ca_only_ca_file_trusts_fails_mta_sts(env):
    """tls: verify accepts the private CA's certificate (the handshake succeeds), but the Web PKI does not: under
    the domain's enforce policy the MX is not used, and the failure is certificate-not-trusted."""
    sink = env.sinks["private"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, _ = deliver(env, f"ann@private.{ORIGIN}")
    assert rcpt[0] == 451 and "4.4.1" in rcpt[1] and "tls_policy" in rcpt[1], rcpt
    assert sink.count() == n
    assert policy_moved(before, env.daemon.metrics()) == {("mta-sts", "certificate-not-trusted"): 1.0}


def test_mx_certificate_trusted_by_both_delivers(env):
    sink = env.sinks["public"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, f"bob@public.{ORIGIN}")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("mta-sts", "success"): 1.0}
