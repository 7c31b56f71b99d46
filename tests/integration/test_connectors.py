"""Connector selection at MAIL FROM: by client CIDR (connecting from 127.0.0.2 vs 127.0.0.1) and by sender
domain, first match wins, unmatched traffic under "internet"; a require_tls connector refuses MAIL before
STARTTLS with 530 5.7.0 and accepts it over TLS; an SNI with a trailing dot (openssl s_client -servername
other.test.) picks the certificate and the connector of other.test."""
import re
import ssl
import subprocess
import types

import pytest

import harness
import hostile_helpers as hh
from harness import delta, fmt_delta

MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: connectors\r\n\r\nbody\r\n"
CONNECTORS = ["partner-cidr", "partner-domain", "forced", "by-sni"]


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    port = harness.free_port()
    daemon = daemon_factory(
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "tls": harness.listener_tls(certs, extra_certs=["other"]), "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
        connectors=[
            {"name": "partner-cidr", "type": "partner", "direction": "inbound",
             "match": {"client_cidrs": ["127.0.0.2/32"]}},
            {"name": "partner-domain", "type": "partner", "direction": "inbound",
             "match": {"listener": "inbound", "sender_domains": ["contoso.test", "*.contoso.test"]}},
            {"name": "forced", "type": "onpremises", "direction": "inbound",
             "match": {"sender_domains": ["forced.test"]}, "require_tls": True},
            {"name": "by-sni", "type": "partner", "direction": "inbound", "match": {"sni": ["other.test"]}},
        ])
    return types.SimpleNamespace(sink=sink, daemon=daemon, port=port, certs=certs)


def deliver(env, sender, local=None, tls=None):
    n = env.sink.count()
    r = harness.swaks(env.port, sender=sender, data=MESSAGE, local=local, tls=tls)
    assert r.rc == 0, f"swaks failed:\n{r}"
    meta, _ = env.sink.wait_messages(n + 1)[-1]
    assert meta["mail_from"] == sender


@pytest.mark.parametrize("source,sender,connector", [
    ("127.0.0.2", "a@example.test", "partner-cidr"),
    ("127.0.0.1", "a@contoso.test", "partner-domain"),
    ("127.0.0.1", "a@mail.contoso.test", "partner-domain"),
    ("127.0.0.2", "a@contoso.test", "partner-cidr"),      # first match wins
    ("127.0.0.1", "a@example.test", "internet"),          # unmatched
    ("127.0.0.1", "a@notcontoso.test", "internet"),
])
def test_connector_chosen(env, source, sender, connector):
    before = env.daemon.metrics()
    deliver(env, sender, local=source)
    harness.assert_counted(env.daemon, before, connector, "inbound", "none")


def served_subject(port, servername):
    """The subject of the certificate the listener serves to openssl s_client -servername `servername`."""
    r = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}", "-tls1_2",
                        "-servername", servername], input=b"QUIT\r\n", capture_output=True, timeout=20)
    found = re.search(r"^subject=(.*)$", r.stdout.decode("utf-8", "replace"), re.M)
    assert found, f"s_client saw no certificate:\n{r.stdout[-2000:]!r}\n{r.stderr[-2000:]!r}"
    return found.group(1)


def test_sni_with_a_trailing_dot_names_the_same_host(env):
    """SNI "other.test." (a fully qualified name; RFC 6066 says SNI has none, but clients send it) is the host
    other.test: its certificate, the connector whose sni: pattern is other.test, and sni=other.test in the
    session line."""
    assert "other.test" in served_subject(env.port, "other.test."), "the default certificate answered other.test."
    before = env.daemon.metrics()
    n = env.sink.count()
    c = harness.SClient(env.port, extra=("-servername", "other.test."))
    try:
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<r@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        for line in MESSAGE.decode().split("\r\n")[:-1]:
            c.send_line(line)
        assert c.cmd(".")[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()
    env.sink.wait_messages(n + 1)
    harness.assert_counted(env.daemon, before, "by-sni", "inbound", "TLS1.2")
    lines = harness.wait_for(lambda: [ln for ln in env.daemon.stderr().splitlines()
                                      if " session id=" in ln and " connector=by-sni " in ln] or None,
                             5, what="the session line")
    assert " sni=other.test " in lines[-1], lines[-1]


def test_every_connector_exports_all_versions(env):
    m = env.daemon.metrics()
    for connector in CONNECTORS + ["internet"]:
        for label in harness.TLS_LABELS:
            key = ("mailflow_messages_total",
                   frozenset({"connector": connector, "direction": "inbound", "tls_version": label}.items()))
            assert key in m, f"missing series mailflow_messages_total{dict(key[1])}"
    info = harness.series(m, "mailflow_connector_info", connector="forced")
    assert info and all(v == 1 for v in info.values()), f"mailflow_connector_info{{connector=forced}}: {info}"


def test_require_tls_refuses_plaintext_mail(env):
    before = env.daemon.metrics()
    n, conns = env.sink.count(), env.sink.connections()
    r = harness.swaks(env.port, sender="a@forced.test", data=MESSAGE)
    replies = r.final_replies()
    assert any(x.startswith("530 5.7.0") for x in replies), f"MAIL before STARTTLS must get 530 5.7.0:\n{r}"
    assert r.rc != 0
    assert env.sink.count() == n and env.sink.connections() == conns, "the upstream was contacted"
    after = harness.assert_not_counted(env.daemon, before)
    rejects = delta(before, after, "mailflow_rejects_total", listener="inbound")
    assert rejects, "mailflow_rejects_total{listener=inbound} did not move for the 530"


def test_require_tls_accepts_over_tls(env):
    before = env.daemon.metrics()
    deliver(env, "a@forced.test", tls="tlsv1_3")
    harness.assert_counted(env.daemon, before, "forced", "inbound", "TLS1.3")


def test_cidr_connector_over_tls10(env):
    before = env.daemon.metrics()
    deliver(env, "a@example.test", local="127.0.0.2", tls="tlsv1")
    after = harness.assert_counted(env.daemon, before, "partner-cidr", "inbound", "TLS1.0")
    below = delta(before, after, "mailflow_below_tls12_total")
    assert below == {harness.series_key(connector="partner-cidr", direction="inbound"): 1.0}, \
        f"mailflow_below_tls12_total moved:\n{fmt_delta(below)}"


@pytest.mark.parametrize("sni,cert,connector", [("other.test", "other", "by-sni"), ("mx.test", "server", "internet"),
                                                (None, "server", "internet")])
def test_sni_picks_certificate_and_connector(env, sni, cert, connector):
    """The certificate is chosen by SNI (default: the first), and a connector can match on SNI."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = harness.RawSmtp(env.port)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls("TLS1.2", server_hostname=sni)
        served = c.sock.getpeercert(binary_form=True)
        expected = ssl.PEM_cert_to_DER_cert((env.certs / f"{cert}.pem").read_text())
        assert served == expected, f"SNI {sni!r}: expected the {cert}.pem certificate"
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()
    env.sink.wait_messages(n + 1)
    harness.assert_counted(env.daemon, before, connector, "inbound", "TLS1.2")
