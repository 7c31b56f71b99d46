"""Outbound delivery end to end (issue #14): an `outbound` listener whose mail goes to the MX hosts of each
recipient's domain, found in a real DNS server (knotd, tests/tools/dns_server.py). The partners' MX hosts are
aiosmtpd sinks on different 127.0.0.x addresses, all on one port P (the upstreams' `port`): TLS1.3, TLS1.2
only, TLS1.0 only, no STARTTLS; a domain whose preferred MX host is down, one whose preferred host answers the
banner with 421, implicit MX, null MX, NXDOMAIN, an MX host that is mailflowd itself, a partner whose policy
(`tls: required`, `min_version: TLS1.2`) its TLS1.0-only MX cannot meet, one that refuses the sender, and a
stopped DNS server.

Checked with swaks and raw SMTP: MAIL answered locally (250 2.1.0) and sent upstream with the first RCPT;
the connector chosen at the first RCPT by recipient domain; 452 4.5.3 for a later RCPT that routes elsewhere;
530 5.7.0 for forced TLS at RCPT (at MAIL where the connector is already certain); 556 5.1.10, 550 5.1.2,
451 4.4.3, 451 4.4.1, 554 5.4.6; an upstream refusal of MAIL as the reply to every RCPT; the next MX host
after a failed connect, a 421 banner or a TLS policy miss; every message at its own domain's MX, counted once
under its connector by the TLS version of the leg to the MX; mailflow_mx_attempts_total and
mailflow_dns_lookups_total; the MX connection reused for the next transaction to the same domain."""
import re
import shutil
import socket
import sys
import tempfile
import threading
import types
import uuid
from pathlib import Path

import pytest

import harness
import hostile_helpers
import report_helpers as rh
from harness import delta, fmt_delta, series_key
from hostile_helpers import assert_counter, greeted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

SENDER = "app@corp.example"
# The MX hosts, each on its own loopback address; all listen on the same port P.
ADDR = {
    "tls13": "127.0.0.41",     # STARTTLS up to TLS1.3
    "tls12": "127.0.0.42",     # STARTTLS, TLS1.2 at most
    "tls10": "127.0.0.43",     # STARTTLS, TLS1.0 only (the sink's @SECLEVEL=0)
    "plain": "127.0.0.44",     # no STARTTLS
    "down": "127.0.0.45",      # nothing listens here
    "up": "127.0.0.46",        # the second MX of two-mx and busy
    "implicit": "127.0.0.47",  # A record, no MX
    "busy": "127.0.0.48",      # banner 421
    "refuse": "127.0.0.49",    # refuses every MAIL FROM
    "badtls": "127.0.0.50",    # offers STARTTLS, answers 220 to it, then garbage; takes mail without STARTTLS
}
ZONE = """$ORIGIN example.net.
$TTL 300
@            SOA   ns hostmaster 1 3600 600 86400 300
@            NS    ns
ns           A     127.0.0.1
tls13        MX    10 mx.tls13
mx.tls13     A     {tls13}
tls12        MX    10 mx.tls12
mx.tls12     A     {tls12}
tls10        MX    10 mx.tls10
mx.tls10     A     {tls10}
plain        MX    10 mx.plain
eu.plain     MX    10 mx.plain
mx.plain     A     {plain}
; the preferred host is down: the second one takes the mail
two-mx       MX    20 up.two-mx
two-mx       MX    10 down.two-mx
down.two-mx  A     {down}
up.two-mx    A     {up}
; the only host is down
dead         MX    10 down.two-mx
; the preferred host answers the banner with 421
busy         MX    10 mx.busy
busy         MX    20 up.two-mx
mx.busy      A     {busy}
implicit     A     {implicit}
nullmx       MX    0 .
; mailflowd's own outbound listener (127.0.0.1:P)
loop         MX    10 mx.loop
mx.loop      A     127.0.0.1
; partner-strict: tls required, min_version TLS1.2, but its MX only speaks TLS1.0
strict       MX    10 mx.tls10
; partner-needtls: tls required; the preferred MX has no STARTTLS, the second one has
needtls      MX    10 mx.plain
needtls      MX    20 mx.tls12
; partner-needtls too: the preferred MX breaks the TLS handshake
badtls       MX    10 mx.badtls
badtls       MX    20 mx.tls12
mx.badtls    A     {badtls}
; tls: opportunistic (internet), the only MX breaks the TLS handshake: plaintext to it instead
brokentls    MX    10 mx.badtls
forced       MX    10 mx.tls13
refuse       MX    10 mx.refuse
mx.refuse    A     {refuse}
""".format(**ADDR)

SINK_TLS = {"TLSv1": "TLS1.0", "TLSv1.1": "TLS1.1", "TLSv1.2": "TLS1.2", "TLSv1.3": "TLS1.3", "none": "none"}


class ScriptedMx(hostile_helpers.FakeUpstream):
    """hostile_helpers.FakeUpstream on a given address and port (an MX host of the zone)."""

    def __init__(self, name, host, port, script):  # noqa: super().__init__ binds 127.0.0.1:0, not wanted here
        self.name, self.script = name, script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = port
        self.received, self.delivered, self.log, self.conns = [], [], [], []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        harness.LIVE.append(self)


def busy_banner(conn):
    conn.send(b"421 4.3.2 mx.busy.example.net busy, try another host\r\n")
    conn.hang(5)


def refuse_mail(conn):
    conn.send(b"220 mx.refuse.example.net ESMTP\r\n")
    while True:
        word = conn.line().split(b" ", 1)[0].upper()
        if word in (b"EHLO", b"HELO"):
            conn.send(b"250-mx.refuse.example.net\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
        elif word == b"MAIL":
            conn.send(b"550 5.7.1 sender app@corp.example refused by partner policy\r\n")
        elif word == b"RCPT":
            conn.send(b"503 5.5.1 Error: need MAIL command\r\n")
        elif word in (b"RSET", b"NOOP"):
            conn.send(b"250 2.0.0 Ok\r\n")
        elif word == b"QUIT":
            conn.send(b"221 2.0.0 Bye\r\n")
            return
        else:
            conn.send(b"502 5.5.2 Error: command not recognized\r\n")


@pytest.fixture(scope="module")
def short_dir():
    """knotd's control socket lives under its directory: a unix socket path has at most 107 bytes, which a
    ctest basetemp (build/<dir>/tests/integration/pytest-<file>/<file>0/...) can exceed."""
    path = tempfile.mkdtemp(prefix="mf-out-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def knot(short_dir):
    server = KnotServer(short_dir, {"example.net": ZONE}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(certs, workdir, knot, sink_factory, daemon_factory):
    port = harness.free_port("127.0.0.1", *ADDR.values())  # P must be free on every address that listens on it
    tls = {"tls_cert": certs / "sink.pem", "tls_key": certs / "sink.key"}
    sinks = {
        "tls13": sink_factory("mx-tls13", host=ADDR["tls13"], port=port, **tls),
        "tls12": sink_factory("mx-tls12", host=ADDR["tls12"], port=port, tls_max_version="TLS1.2", **tls),
        "tls10": sink_factory("mx-tls10", host=ADDR["tls10"], port=port, tls_max_version="TLS1.0", **tls),
        "plain": sink_factory("mx-plain", host=ADDR["plain"], port=port),
        "up": sink_factory("mx-up", host=ADDR["up"], port=port, **tls),
        "implicit": sink_factory("mx-implicit", host=ADDR["implicit"], port=port),
    }
    store = sink_factory("store")  # the inbound listener's fixed upstream
    fakes = []
    try:
        fakes += [ScriptedMx("mx-busy", ADDR["busy"], port, busy_banner),
                  ScriptedMx("mx-refuse", ADDR["refuse"], port, refuse_mail),
                  ScriptedMx("mx-badtls", ADDR["badtls"], port, lambda conn: conn.broken_tls_sink())]
        yield from _start(certs, knot, daemon_factory, port, sinks, store, fakes)
    finally:
        for f in fakes:
            f.stop()


def _start(certs, knot, daemon_factory, port, sinks, store, fakes):
    in_port = harness.free_port()
    listeners = [
        {"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
         "tls": harness.listener_tls(certs), "upstream": "internet"},
        {"name": "in", "address": f"127.0.0.1:{in_port}", "direction": "inbound",
         "tls": harness.listener_tls(certs), "upstream": "store"},
    ]
    upstreams = [
        {"name": "internet", "mx": True, "port": port, "tls": "opportunistic"},
        {"name": "strict-mx", "mx": True, "port": port, "tls": "required", "min_version": "TLS1.2"},
        {"name": "needtls-mx", "mx": True, "port": port, "tls": "required"},
        {"name": "store", "address": f"127.0.0.1:{store.port}", "tls": "none"},
    ]

    def partner(name, domains, upstream="internet", **extra):
        c = {"name": name, "type": "partner", "direction": "outbound",
             "match": {"recipient_domains": domains}, "upstream": upstream}
        c.update(extra)
        return c

    connectors = [
        partner("partner-tls13", ["tls13.example.net"]),
        partner("partner-tls12", ["TLS12.example.net"]),  # case-insensitive
        partner("partner-tls10", ["tls10.example.net"]),
        partner("partner-plain", ["plain.example.net", "*.plain.example.net"]),
        partner("partner-strict", ["strict.example.net"], "strict-mx"),
        partner("partner-needtls", ["needtls.example.net", "badtls.example.net"], "needtls-mx"),
        partner("partner-forced", ["forced.example.net"], require_tls=True),
        {"name": "onprem-in", "type": "onpremises", "direction": "inbound", "match": {"listener": "in"},
         "require_tls": True, "upstream": "store"},
    ]
    daemon = daemon_factory(listeners, upstreams, connectors,
                            dns={"servers": [knot.address], "timeout": "2s"})
    yield types.SimpleNamespace(daemon=daemon, port=port, in_port=in_port, sinks=sinks, store=store,
                                busy=fakes[0], refuse=fakes[1], badtls=fakes[2])


def message(rcpts, subject="outbound"):
    mid = f"<{uuid.uuid4().hex}@corp.example>"
    return (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n\r\n"
            "body\r\n.a line that starts with a dot\r\n").encode()


def send(c, rcpts, expect=None):
    """MAIL (must be the local 250 2.1.0), one RCPT per address; DATA when any RCPT got 250.
    Returns {rcpt: (code, text)} plus "data" -> the reply to the final dot (None without DATA)."""
    code, text = c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (code, text[4:9]) == (250, "2.1.0"), f"MAIL should be answered locally with 250 2.1.0: {text!r}"
    out = {}
    for r in rcpts:
        out[r] = c.cmd(f"RCPT TO:<{r}>")
    accepted = [r for r in rcpts if out[r][0] == 250]
    if not accepted:
        assert c.cmd("RSET")[0] == 250
        out["data"] = None
        return out
    code, text = c.cmd("DATA")
    assert code == 354, f"DATA: {text!r}"
    c.send(harness.dot_stuff(message(accepted)))
    out["data"] = c.cmd(".")
    return out


def enhanced(reply):
    """(code, "x.y.z") of a (code, text) reply."""
    code, text = reply
    return code, text.split("\n")[-1][4:].split(" ", 1)[0]


def sink_tls(meta):
    return SINK_TLS[meta["tls_version"]]


def total_connections(env):
    return (sum(s.connections() for s in env.sinks.values()) + env.busy.connections() + env.refuse.connections()
            + env.badtls.connections())


def dns_moved(before, after):
    return {f"{dict(k)['type']} {dict(k)['result']}": v
            for k, v in delta(before, after, "mailflow_dns_lookups_total").items()}


# ------------------------------------------------------------------------------------------------ tests
def test_mail_answered_locally_sent_upstream_with_the_first_rcpt(env):
    d, sink = env.daemon, env.sinks["tls13"]
    before = d.metrics()
    n, conns = sink.count(), total_connections(env)
    c = greeted(env.port)
    try:
        code, text = c.cmd(f"MAIL FROM:<{SENDER}>")
        assert (code, text[:9]) == (250, "250 2.1.0"), text
        # The route is not known yet: no MX host has been contacted.
        assert hostile_helpers.unsolicited(c, 0.5) == b""
        assert total_connections(env) == conns, "an MX host was contacted before the first RCPT"
        assert enhanced(c.cmd("RCPT TO:<alice@tls13.example.net>")) == (250, "2.1.5")
        assert c.cmd("DATA")[0] == 354
        data = message(["alice@tls13.example.net"])
        c.send(harness.dot_stuff(data))
        code, text = c.cmd(".")
        assert code == 250, text
        c.cmd("QUIT")
    finally:
        c.close()
    meta, content = sink.wait_messages(n + 1)[-1]
    assert (meta["mail_from"], meta["rcpt_tos"]) == (SENDER, ["alice@tls13.example.net"])
    assert meta["tls_version"] == "TLSv1.3"
    headers, rest = harness.split_received(content)
    assert len(headers) == 1 and rest == data, f"message altered: {content!r}"
    after = harness.assert_counted(d, before, "partner-tls13", "outbound", "TLS1.3")
    assert delta(before, after, "mailflow_mx_attempts_total") == \
        {series_key(upstream="internet", result="success"): 1.0}
    # One MX lookup, then the MX host's addresses (AAAA and A; it has only A); then what the domain publishes:
    # _mta-sts (upstreams[].mta_sts defaults to testing for mx upstreams) and _smtp._tls (TLS-RPT), neither here.
    assert dns_moved(before, after) == {"MX success": 1.0, "A success": 1.0, "AAAA nodata": 1.0,
                                        "TXT nxdomain": 2.0}


@pytest.mark.parametrize("domain, mx, connector, tls_version", [
    ("tls12.example.net", "tls12", "partner-tls12", "TLS1.2"),
    ("tls10.example.net", "tls10", "partner-tls10", "TLS1.0"),
    ("plain.example.net", "plain", "partner-plain", "none"),
    ("eu.plain.example.net", "plain", "partner-plain", "none"),  # *.plain.example.net
    ("implicit.example.net", "implicit", "internet", "none"),    # no connector: internet; implicit MX
], ids=lambda v: v if isinstance(v, str) and "." in v else None)
def test_each_domain_at_its_mx_counted_by_the_tls_of_that_leg(env, domain, mx, connector, tls_version):
    d, sink = env.daemon, env.sinks[mx]
    before = d.metrics()
    n = sink.count()
    rcpt = f"bob@{domain}"
    r = harness.swaks(env.port, to=rcpt, sender=SENDER)
    assert r.rc == 0, f"swaks failed:\n{r}"
    replies = r.final_replies()
    assert replies[2].startswith("250 2.1.0 ") and replies[3].startswith("250 2.1.5 "), str(r)  # MAIL, RCPT
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == [rcpt] and meta["mail_from"] == SENDER
    assert sink_tls(meta) == tls_version
    after = harness.assert_counted(d, before, connector, "outbound", tls_version)
    assert delta(before, after, "mailflow_mx_attempts_total") == \
        {series_key(upstream="internet", result="success"): 1.0}
    assert delta(before, after, "mailflow_recipients_total") == \
        {series_key(connector=connector, direction="outbound", tls_version=tls_version): 1.0}


def test_preferred_mx_down_next_host_takes_it(env):
    d, sink = env.daemon, env.sinks["up"]
    before = d.metrics()
    n = sink.count()
    r = harness.swaks(env.port, to="carol@two-mx.example.net", sender=SENDER)
    assert r.rc == 0, f"swaks failed:\n{r}"
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["carol@two-mx.example.net"]
    after = harness.assert_counted(d, before, "internet", "outbound", "TLS1.3")
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="connect_failed"): 1.0,
        series_key(upstream="internet", result="success"): 1.0}, \
        fmt_delta(delta(before, after, "mailflow_mx_attempts_total"))


def test_banner_421_next_host_takes_it(env):
    d, sink = env.daemon, env.sinks["up"]
    before = d.metrics()
    n, busy = sink.count(), env.busy.connections()
    r = harness.swaks(env.port, to="dave@busy.example.net", sender=SENDER)
    assert r.rc == 0, f"swaks failed:\n{r}"
    assert env.busy.connections() == busy + 1, "the preferred MX host (421 banner) was not tried first"
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["dave@busy.example.net"]
    after = harness.assert_counted(d, before, "internet", "outbound", "TLS1.3")
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="banner_rejected"): 1.0,
        series_key(upstream="internet", result="success"): 1.0}, \
        fmt_delta(delta(before, after, "mailflow_mx_attempts_total"))


@pytest.mark.parametrize("rcpt, result", [
    # the preferred MX offers no STARTTLS: it cannot meet the policy
    ("erin@needtls.example.net", "tls_policy"),
    # the preferred MX answers 220 to STARTTLS and then breaks the handshake
    ("fay@badtls.example.net", "tls_failed"),
], ids=["no-starttls", "broken-handshake"])
def test_tls_required_next_mx_when_the_first_has_no_tls(env, rcpt, result):
    """partner-needtls (tls: required): the preferred MX gives no TLS, the second one (TLS1.2) takes the mail."""
    d, plain, tls12 = env.daemon, env.sinks["plain"], env.sinks["tls12"]
    before = d.metrics()
    n_plain, n12 = plain.count(), tls12.count()
    r = harness.swaks(env.port, to=rcpt, sender=SENDER)
    assert r.rc == 0, f"swaks failed:\n{r}"
    meta, _ = tls12.wait_messages(n12 + 1)[-1]
    assert meta["rcpt_tos"] == [rcpt] and meta["tls_version"] == "TLSv1.2"
    assert plain.count() == n_plain, "mail went in plaintext to an MX host under tls: required"
    after = harness.assert_counted(d, before, "partner-needtls", "outbound", "TLS1.2")
    attempts = delta(before, after, "mailflow_mx_attempts_total")
    assert attempts == {series_key(upstream="needtls-mx", result=result): 1.0,
                        series_key(upstream="needtls-mx", result="success"): 1.0}, fmt_delta(attempts)


def test_opportunistic_mx_with_broken_tls_gets_the_mail_in_plaintext(env):
    """upstream internet (tls: opportunistic): the only MX host of brokentls.example.net fails the TLS handshake;
    the same host gets the mail over a new connection without STARTTLS, counted under none. The failed TLS
    session still counts (mx_attempts tls_failed, then success for the retry; the policy none session as a
    failure)."""
    d, fake = env.daemon, env.badtls
    before = d.metrics()
    n, conns = len(fake.delivered), fake.connections()
    r = harness.swaks(env.port, to="gus@brokentls.example.net", sender=SENDER)
    assert r.rc == 0, f"swaks failed:\n{r}\n{fake.log_tail()}"
    assert len(fake.delivered) == n + 1, fake.log_tail()
    assert fake.connections() == conns + 2, fake.log_tail()
    after = harness.assert_counted(d, before, "internet", "outbound", "none")
    attempts = delta(before, after, "mailflow_mx_attempts_total")
    assert attempts == {series_key(upstream="internet", result="tls_failed"): 1.0,
                        series_key(upstream="internet", result="success"): 1.0}, fmt_delta(attempts)
    assert_counter(d, before, "mailflow_upstream_errors_total", upstream="internet", reason="tls_failed")
    policy = delta(before, after, "mailflow_outbound_policy_total")
    assert policy == {series_key(connector="internet", policy="none", result="validation-failure"): 1.0}, \
        fmt_delta(policy)


def test_min_version_not_met_by_the_only_mx_is_451_4_4_1(env):
    """partner-strict: tls: required, min_version TLS1.2; its MX speaks TLS1.0 only."""
    d, tls10 = env.daemon, env.sinks["tls10"]
    before = d.metrics()
    n = tls10.count()
    c = greeted(env.port)
    try:
        out = send(c, ["frank@strict.example.net"])
        c.cmd("QUIT")
    finally:
        c.close()
    assert enhanced(out["frank@strict.example.net"]) == (451, "4.4.1"), out
    assert "tls" in out["frank@strict.example.net"][1].lower(), f"451 4.4.1 should name the last reason: {out}"
    assert out["data"] is None
    after = harness.assert_not_counted(d, before)
    assert tls10.count() == n, "delivered to an MX below the partner's min_version"
    attempts = delta(before, after, "mailflow_mx_attempts_total")
    assert attempts == {series_key(upstream="strict-mx", result="tls_policy"): 1.0}, fmt_delta(attempts)
    # Every version is offered, so the host is measured and named: it negotiated TLS1.0, below the minimum.
    errors = delta(before, after, "mailflow_upstream_errors_total", upstream="strict-mx")
    assert errors == {series_key(reason="tls_policy", upstream="strict-mx"): 1.0}, fmt_delta(errors)
    assert re.search(r"tls_below_minimum .*upstream=strict-mx .*tls=TLS1\.0", d.stderr()), d.log_tail()


def test_only_mx_down_is_451_4_4_1(env):
    d = env.daemon
    before = d.metrics()
    r = harness.swaks(env.port, to="gina@dead.example.net", sender=SENDER, quit_after="RCPT")
    assert any(x.startswith("451 4.4.1 ") for x in r.final_replies()), f"expected 451 4.4.1 to RCPT:\n{r}"
    after = harness.assert_not_counted(d, before)
    assert delta(before, after, "mailflow_mx_attempts_total") == \
        {series_key(upstream="internet", result="connect_failed"): 1.0}


@pytest.mark.parametrize("rcpt, code, ext, lookups", [
    ("hal@nullmx.example.net", 556, "5.1.10", {"MX success": 1.0}),
    ("ida@nope.example.net", 550, "5.1.2", {"MX nxdomain": 1.0}),
    ("jo@loop.example.net", 554, "5.4.6", None),
], ids=["null-mx", "nxdomain", "loop"])
def test_permanent_route_failures_at_rcpt(env, rcpt, code, ext, lookups):
    d = env.daemon
    before = d.metrics()
    conns = total_connections(env)
    c = greeted(env.port)
    try:
        out = send(c, [rcpt])
        c.cmd("QUIT")
    finally:
        c.close()
    assert enhanced(out[rcpt]) == (code, ext), out
    after = harness.assert_not_counted(d, before)
    assert total_connections(env) == conns
    assert not delta(before, after, "mailflow_mx_attempts_total")
    if lookups is not None:
        assert dns_moved(before, after) == lookups
    # Also through swaks: the same reply to RCPT.
    r = harness.swaks(env.port, to=rcpt, sender=SENDER, quit_after="RCPT")
    assert any(x.startswith(f"{code} {ext} ") for x in r.final_replies()), str(r)


def test_every_recipient_of_a_dead_domain_counts_its_refusal(env):
    # The domain is looked up once per transaction; its later recipients get the same 550 at once, and each
    # of those refusals is counted like the first (rejects_total says how many recipients were refused).
    d = env.daemon
    before = d.metrics()
    c = greeted(env.port)
    rcpts = ["kay@nope.example.net", "lou@nope.example.net", "mo@nope.example.net"]
    try:
        out = send(c, rcpts)
        c.cmd("QUIT")
    finally:
        c.close()
    assert [enhanced(out[r]) for r in rcpts] == [(550, "5.1.2")] * 3, out
    after = harness.assert_not_counted(d, before)
    assert dns_moved(before, after) == {"MX nxdomain": 1.0}
    assert delta(before, after, "mailflow_rejects_total", listener="out") == \
        {series_key(listener="out", reason="nxdomain"): 3.0}, \
        fmt_delta(delta(before, after, "mailflow_rejects_total", listener="out"))


def test_three_partner_domains_in_one_transaction(env):
    d = env.daemon
    rcpts = {"tls13": "kim@tls13.example.net", "tls12": "lee@tls12.example.net", "tls10": "max@tls10.example.net"}
    tls = {"tls13": ("partner-tls13", "TLS1.3"), "tls12": ("partner-tls12", "TLS1.2"),
           "tls10": ("partner-tls10", "TLS1.0")}
    counts = {k: env.sinks[k].count() for k in rcpts}
    before = d.metrics()
    c = greeted(env.port)
    try:
        out = send(c, list(rcpts.values()))
        assert enhanced(out[rcpts["tls13"]]) == (250, "2.1.5"), out
        for k in ("tls12", "tls10"):
            code, text = out[rcpts[k]]
            assert enhanced((code, text)) == (452, "4.5.3"), out
            assert len(text.split("4.5.3", 1)[1].strip()) > 10, f"452 4.5.3 should say why: {text!r}"
        assert out["data"][0] == 250, out
        # The client sends the 452'd recipients in transactions of their own, on the same connection.
        for k in ("tls12", "tls10"):
            again = send(c, [rcpts[k]])
            assert enhanced(again[rcpts[k]]) == (250, "2.1.5") and again["data"][0] == 250, again
        c.cmd("QUIT")
    finally:
        c.close()
    for k, rcpt in rcpts.items():
        msgs = env.sinks[k].wait_messages(counts[k] + 1)
        assert len(msgs) == counts[k] + 1, f"{k}: {len(msgs) - counts[k]} new messages"
        assert msgs[-1][0]["rcpt_tos"] == [rcpt], msgs[-1][0]
        assert sink_tls(msgs[-1][0]) == tls[k][1]
    after = harness.wait_moved(d, before, at_least=3)
    assert delta(before, after, "mailflow_messages_total") == {
        series_key(connector=conn, direction="outbound", tls_version=v): 1.0 for conn, v in tls.values()}, \
        fmt_delta(delta(before, after, "mailflow_messages_total"))
    # Each 452 is a refusal like any other: counted with its reason.
    assert delta(before, after, "mailflow_rejects_total") == \
        {series_key(listener="out", reason="recipient_route"): 2.0}, fmt_delta(delta(before, after, "mailflow_rejects_total"))


def test_other_domain_of_the_same_connector_is_another_route(env):
    """partner-plain covers plain.example.net and *.plain.example.net, but with an mx upstream each domain is a
    route of its own: a later RCPT for eu.plain gets 452 4.5.3, one for plain.example.net again is accepted."""
    d, sink = env.daemon, env.sinks["plain"]
    before = d.metrics()
    n = sink.count()
    c = greeted(env.port)
    try:
        out = send(c, ["a1@plain.example.net", "b2@eu.plain.example.net", "c3@PLAIN.example.net"])
        assert enhanced(out["a1@plain.example.net"]) == (250, "2.1.5"), out
        assert enhanced(out["b2@eu.plain.example.net"]) == (452, "4.5.3"), out
        assert enhanced(out["c3@PLAIN.example.net"]) == (250, "2.1.5"), out
        assert out["data"][0] == 250
        again = send(c, ["b2@eu.plain.example.net"])
        assert again["data"][0] == 250, again
        c.cmd("QUIT")
    finally:
        c.close()
    msgs = sink.wait_messages(n + 2)
    assert [m["rcpt_tos"] for m, _ in msgs[n:]] == [["a1@plain.example.net", "c3@PLAIN.example.net"],
                                                     ["b2@eu.plain.example.net"]]
    harness.assert_counted(d, before, "partner-plain", "outbound", "none", n=2)


def test_mx_connection_reused_for_the_same_domain(env):
    d, s12, s10 = env.daemon, env.sinks["tls12"], env.sinks["tls10"]
    before = d.metrics()
    n12, n10, c12, c10 = s12.count(), s10.count(), s12.connections(), s10.connections()
    c = greeted(env.port)
    try:
        for rcpt in ("one@tls12.example.net", "two@tls12.example.net", "three@tls10.example.net"):
            out = send(c, [rcpt])
            assert out["data"][0] == 250, out
        c.cmd("QUIT")
    finally:
        c.close()
    s12.wait_messages(n12 + 2)
    s10.wait_messages(n10 + 1)
    assert s12.connections() == c12 + 1, "the MX connection was not reused for the second transaction"
    assert s10.connections() == c10 + 1
    after = harness.wait_moved(d, before, at_least=3)
    assert delta(before, after, "mailflow_messages_total") == {
        series_key(connector="partner-tls12", direction="outbound", tls_version="TLS1.2"): 2.0,
        series_key(connector="partner-tls10", direction="outbound", tls_version="TLS1.0"): 1.0}
    assert delta(before, after, "mailflow_mx_attempts_total") == \
        {series_key(upstream="internet", result="success"): 2.0}


def test_upstream_refusal_of_mail_is_the_reply_to_every_rcpt(env):
    d = env.daemon
    before = d.metrics()
    c = greeted(env.port)
    try:
        out = send(c, ["nia@refuse.example.net", "oli@refuse.example.net"])
        for r in ("nia@refuse.example.net", "oli@refuse.example.net"):
            assert enhanced(out[r]) == (550, "5.7.1"), out
            assert "refused by partner policy" in out[r][1], out
        # The session goes on: the next transaction to another partner is delivered.
        again = send(c, ["pat@tls13.example.net"])
        assert again["data"][0] == 250, again
        c.cmd("QUIT")
    finally:
        c.close()
    assert env.refuse.connections() >= 1
    harness.assert_counted(d, before, "partner-tls13", "outbound", "TLS1.3")


def test_forced_tls_connector_530_at_rcpt_then_delivered_over_tls(env):
    d, sink = env.daemon, env.sinks["tls13"]
    before = d.metrics()
    n = sink.count()
    c = greeted(env.port)
    try:
        out = send(c, ["quin@forced.example.net"])
        c.cmd("QUIT")
    finally:
        c.close()
    assert enhanced(out["quin@forced.example.net"]) == (530, "5.7.0"), out
    assert_counter(d, before, "mailflow_rejects_total", 1, listener="out", reason="tls_required")
    # Over TLS1.2 on the client leg: accepted, and counted by the leg to the MX (TLS1.3).
    c = harness.RawSmtp(env.port)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        assert c.starttls("TLS1.2") == "TLSv1.2"
        assert c.cmd("EHLO client.example.test")[0] == 250
        out = send(c, ["quin@forced.example.net"])
        assert out["data"][0] == 250, out
        c.cmd("QUIT")
    finally:
        c.close()
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["quin@forced.example.net"]
    harness.assert_counted(d, before, "partner-forced", "outbound", "TLS1.3")


def test_forced_tls_530_at_mail_where_the_connector_is_certain(env):
    d = env.daemon
    before = d.metrics()
    c = greeted(env.in_port)
    try:
        assert enhanced(c.cmd(f"MAIL FROM:<{SENDER}>")) == (530, "5.7.0")
        c.cmd("QUIT")
    finally:
        c.close()
    assert_counter(d, before, "mailflow_rejects_total", 1, listener="in", reason="tls_required")


def test_stopped_dns_server_is_451_4_4_3(short_dir, daemon_factory):
    stopped = KnotServer(short_dir, {"example.net": ZONE}, name="knotd-stopped").start()
    assert stopped.dig("tls13.example.net", "MX")
    stopped.stop()
    port = harness.free_port()
    d = daemon_factory([{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                         "upstream": "internet"}],
                       [{"name": "internet", "mx": True, "port": port + 1, "tls": "opportunistic"}],
                       name="mailflowd-nodns", dns={"servers": [stopped.address], "timeout": "2s"})
    before = d.metrics()
    c = greeted(port)
    try:
        out = send(c, ["ray@tls13.example.net"])
        c.cmd("QUIT")
    finally:
        c.close()
    assert enhanced(out["ray@tls13.example.net"]) == (451, "4.4.3"), out
    after = harness.assert_not_counted(d, before)
    failed = dns_moved(before, after)
    assert failed in ({"MX servfail": 1.0}, {"MX timeout": 1.0}), failed
    assert not delta(before, after, "mailflow_mx_attempts_total")


def test_a_client_refused_at_starttls_is_no_mx_host_in_the_drilldown(env):
    # The outbound drill-down lists the MX hosts mail went to; a client of the outbound listener whose own
    # handshake failed is counted in mailflow_tls_handshake_refused_total, and is not listed among them.
    d = env.daemon
    before = d.metrics()
    c = greeted(env.port, source="127.0.0.9")
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
        assert c.closed_or_error()
    finally:
        c.close()
    assert_counter(d, before, "mailflow_tls_handshake_refused_total", listener="out", connector="internet",
                   offered="no_hello")
    report = rh.report_json(d)
    listed = [(c["connector"], r["address"]) for c in report["connectors"] if c["direction"] == "outbound"
              for r in c["remotes"]["rows"] + c["domains"]["rows"] if r.get("address", r.get("domain")) == "127.0.0.9"]
    assert not listed, f"the refused client is listed as an MX host: {listed}"
