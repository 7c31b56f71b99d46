"""How long opening an upstream may take (timeouts.upstream_open), against the real binary and a real DNS server
(knotd): the sending MTA waits for its RCPT reply meanwhile and gives up after 5 minutes, so MX hosts that
black-hole or stall must not hold it past that, nor keep a later working host from being tried in time.

The MX hosts are raw TCP servers on 127.0.0.6x, all on one port P: `silent` accepts and never sends a banner (a
connect to a closed loopback port fails at once, so a listening socket that never greets is the black hole),
`mute` greets and never answers EHLO, `good` is a sink. With upstream_connect 1s, command 6s and
upstream_open 3s:
- stalls.example.net (silent, mute, silent2, good): without the bound the walk would take 1 + 6 + 1 s and then
  deliver; with it, the RCPT gets 451 4.4.2 at 3 s, counted once as upstream_errors open_timeout.
- onehole.example.net (silent, good): the walk reaches the good host in time and delivers.
- a fixed upstream that stalls at EHLO: 451 4.4.2 at 3 s, not after timeouts.command.
- stsslow.example.net, whose MTA-STS policy host never answers (mta_sts.fetch_timeout 10s): 451 4.4.2 at 3 s.
- a DNS server that never answers (dns.timeout 8s, upstream_open 2s): 451 4.4.2 at 2 s.
- address literals: refused with 550 5.1.2 by an mx upstream (nothing looked up), relayed by a fixed one.
- <postmaster> without a domain: the same (no empty name is looked up)."""
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh
from harness import delta, series_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, SilentServer  # noqa: E402

UPSTREAM_CONNECT = 1.0
COMMAND = 6.0
UPSTREAM_OPEN = 3.0
MARGIN = 1.5
SENDER = "app@corp.example"
ADDR = {"silent": "127.0.0.61", "mute": "127.0.0.62", "silent2": "127.0.0.63", "good": "127.0.0.64"}
POLICY_HOST = "127.0.0.66"  # mta-sts.stsslow.example.net:443, which accepts and never answers
ZONE = """$ORIGIN example.net.
$TTL 300
@            SOA   ns hostmaster 1 3600 600 86400 300
@            NS    ns
ns           A     127.0.0.1
stalls       MX    10 mx.silent
stalls       MX    20 mx.mute
stalls       MX    30 mx.silent2
stalls       MX    40 mx.good
onehole      MX    10 mx.silent
onehole      MX    20 mx.good
mx.silent    A     {silent}
mx.mute      A     {mute}
mx.silent2   A     {silent2}
mx.good      A     {good}
stsslow      MX    10 mx.good
_mta-sts.stsslow TXT "v=STSv1; id=1;"
mta-sts.stsslow  A   {policy}
""".format(policy=POLICY_HOST, **ADDR)


def black_hole(conn):
    conn.hang(30)  # accepted, never a banner


def mute_after_banner(conn):
    conn.send(b"220 mx.mute.example.net ESMTP\r\n")
    conn.hang(30)  # EHLO never answered


@pytest.fixture(scope="module")
def knot():
    short = Path(tempfile.mkdtemp(prefix="mf-walk-"))  # knotd's control socket path has at most 107 bytes
    server = KnotServer(short, {"example.net": ZONE}).start()
    yield server
    server.stop()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def env(knot, sink_factory, daemon_factory):
    port = harness.free_port("127.0.0.1", *ADDR.values())
    good = sink_factory("mx-good", host=ADDR["good"], port=port)
    store = sink_factory("store")
    fakes = [hh.FakeUpstream("silent", black_hole, host=ADDR["silent"], port=port),
             hh.FakeUpstream("mute", mute_after_banner, host=ADDR["mute"], port=port),
             hh.FakeUpstream("silent2", black_hole, host=ADDR["silent2"], port=port),
             hh.FakeUpstream("stallfix", mute_after_banner),
             hh.FakeUpstream("policy", black_hole, host=POLICY_HOST, port=443)]
    try:
        ports = {name: harness.free_port() for name in ("out", "in", "stallfix")}
        listeners = [
            {"name": "out", "address": f"127.0.0.1:{ports['out']}", "direction": "outbound", "upstream": "internet"},
            hh.listener("in", ports["in"], "store"),
            hh.listener("stallfix", ports["stallfix"], "stallfix"),
        ]
        upstreams = [
            {"name": "internet", "mx": True, "port": port, "tls": "opportunistic"},
            hh.plain_upstream("store", store.port),
            hh.plain_upstream("stallfix", fakes[3].port),
        ]
        daemon = daemon_factory(listeners, upstreams, dns={"servers": [knot.address], "timeout": "6s"},
                                mta_sts={"fetch_timeout": "10s"},
                                timeouts={"greeting": "10s", "command": f"{COMMAND:g}s",
                                          "upstream_connect": f"{UPSTREAM_CONNECT:g}s",
                                          "upstream_open": f"{UPSTREAM_OPEN:g}s", "tls_handshake": "5s"})
        yield types.SimpleNamespace(daemon=daemon, ports=ports, good=good, store=store, fakes=fakes)
    finally:
        for f in fakes:
            f.stop()


def timed_rcpt(port, rcpt):
    """A session past MAIL (answered locally); RCPT's reply and how long it took. The session is returned open."""
    c = hh.greeted(port, timeout=COMMAND * 3)
    code, text = c.cmd(f"MAIL FROM:<{SENDER}>")
    assert code == 250, text
    start = time.monotonic()
    reply = c.cmd(f"RCPT TO:<{rcpt}>")
    return c, reply, time.monotonic() - start


def test_stalling_mx_hosts_get_451_by_upstream_open(env):
    """silent (1 s), mute (banner, then EHLO never answered: timeouts.command is 6 s), silent2, good: the walk ends
    at upstream_open with 451 4.4.2, instead of holding the RCPT for 8 s and more (in real life: 30 s per black
    hole and 300 s per stall, past the client's 5 minutes)."""
    d = env.daemon
    before = d.metrics()
    n = env.good.connections()
    c, (code, text), elapsed = timed_rcpt(env.ports["out"], "bob@stalls.example.net")
    try:
        assert code == 451 and text.startswith("451 4.4.2 "), text
        assert "stalls.example.net" in text, text
        assert UPSTREAM_OPEN - 0.3 < elapsed < UPSTREAM_OPEN + MARGIN, f"451 after {elapsed:.2f}s"
        assert c.cmd("RSET")[0] == 250 and c.cmd("NOOP")[0] == 250, "the client session goes on"
    finally:
        c.close()
    after = hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream="internet", reason="open_timeout")
    # Counted once, by the open: the EHLO it cut short is no "timeout" of the mute host's.
    assert delta(before, after, "mailflow_upstream_errors_total") == {
        series_key(upstream="internet", reason="timeout"): 1.0,  # silent: no banner within its upstream_connect
        series_key(upstream="internet", reason="open_timeout"): 1.0}
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="connect_timeout"): 1.0,
        series_key(upstream="internet", result="open_timeout"): 1.0}
    assert env.fakes[1].connections() >= 1 and env.fakes[2].connections() == 0
    assert env.good.connections() == n, "the walk went on after upstream_open"
    log = d.stderr()
    assert "upstream_error" in log and "reason=open_timeout" in log and "at=connect" in log, d.log_tail()


def test_walk_past_a_black_hole_reaches_the_working_host_in_time(env):
    d, sink = env.daemon, env.good
    before = d.metrics()
    n = sink.count()
    c, (code, text), elapsed = timed_rcpt(env.ports["out"], "carol@onehole.example.net")
    try:
        assert code == 250, text
        assert UPSTREAM_CONNECT - 0.3 < elapsed < UPSTREAM_OPEN, f"250 after {elapsed:.2f}s"
        assert c.cmd("DATA")[0] == 354
        c.send(harness.dot_stuff(hh.message("walked")))
        code, text = c.cmd(".")
        assert code == 250, text
    finally:
        c.close()
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["carol@onehole.example.net"]
    after = d.metrics()
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="connect_timeout"): 1.0,
        series_key(upstream="internet", result="success"): 1.0}
    assert not delta(before, after, "mailflow_upstream_errors_total", reason="open_timeout")


def test_fixed_upstream_that_stalls_at_ehlo_gets_451_by_upstream_open(env):
    d = env.daemon
    before = d.metrics()
    c, (code, text), elapsed = timed_rcpt(env.ports["stallfix"], hh.RCPT)
    try:
        assert code == 451 and text.startswith("451 4.4.2 "), text
        assert UPSTREAM_OPEN - 0.3 < elapsed < UPSTREAM_OPEN + MARGIN, f"451 after {elapsed:.2f}s"
    finally:
        c.close()
    after = hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream="stallfix", reason="open_timeout")
    assert delta(before, after, "mailflow_upstream_errors_total") == {
        series_key(upstream="stallfix", reason="open_timeout"): 1.0}


def test_mta_sts_policy_fetch_ends_by_upstream_open(env):
    """The domain's policy host accepts and never answers the TLS handshake, mta_sts.fetch_timeout is 10 s: the
    fetch (which has a deadline of its own, not the session's) ends with the open at 3 s."""
    d = env.daemon
    before = d.metrics()
    n = env.good.connections()
    c, (code, text), elapsed = timed_rcpt(env.ports["out"], "ivan@stsslow.example.net")
    try:
        assert code == 451 and text.startswith("451 4.4.2 "), text
        assert UPSTREAM_OPEN - 0.3 < elapsed < UPSTREAM_OPEN + MARGIN, f"451 after {elapsed:.2f}s"
    finally:
        c.close()
    hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream="internet", reason="open_timeout")
    assert env.fakes[4].connections() >= 1, "the policy fetch was tried"
    assert env.good.connections() == n
    assert "at=policy" in d.stderr(), d.log_tail()


def test_dns_lookups_end_by_upstream_open(env, daemon_factory):
    """A DNS server that never answers, dns.timeout 8 s, upstream_open 2 s: the open gives its lookups up at 2 s
    (uncounted, as given-up lookups are). A daemon of its own: libunbound's own retries give up sooner against
    a server it has seen answer fast many times, and must not be what ends the lookup here."""
    silent = SilentServer()
    try:
        port = harness.free_port()
        d = daemon_factory([{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                             "upstream": "internet"}],
                           [{"name": "internet", "mx": True, "port": 25}], name="silent-dns",
                           dns={"servers": [silent.address], "timeout": "8s"},
                           timeouts={"upstream_connect": "1s", "upstream_open": "2s"})
        before = d.metrics()
        c, (code, text), elapsed = timed_rcpt(port, "dave@dnsslow.example.net")
        try:
            assert code == 451 and text.startswith("451 4.4.2 "), text
            assert 2.0 - 0.3 < elapsed < 2.0 + MARGIN, f"451 after {elapsed:.2f}s"
        finally:
            c.close()
        after = hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream="internet",
                                  reason="open_timeout")
        assert not delta(before, after, "mailflow_dns_lookups_total"), "the lookups were given up, not answered"
        assert not delta(before, after, "mailflow_mx_attempts_total"), "no host could be tried"
        assert "at=dns" in d.stderr(), d.log_tail()
    finally:
        silent.close()


def test_address_literal_refused_by_mx_upstream_relayed_by_fixed_one(env):
    d = env.daemon
    before = d.metrics()
    n = env.good.connections()
    c, (code, text), _ = timed_rcpt(env.ports["out"], f"frank@[{ADDR['good']}]")
    try:
        assert code == 550 and text.startswith("550 5.1.2 "), text
        assert "address literal" in text, text
    finally:
        c.close()
    after = hh.assert_counter(d, before, "mailflow_rejects_total", listener="out", reason="address_literal")
    assert not delta(before, after, "mailflow_dns_lookups_total"), "an address literal is not looked up"
    assert env.good.connections() == n, "nothing was delivered to the literal's address"

    # A fixed upstream takes the recipient as it is.
    n = env.store.count()
    c = hh.greeted(env.ports["in"])
    try:
        code, text = hh.transaction(c, hh.message("literal"), sender=SENDER, rcpts=("grace@[127.0.0.1]",))
        assert code == 250, text
    finally:
        c.close()
    meta, _ = env.store.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["grace@[127.0.0.1]"]


def test_postmaster_without_domain_refused_by_mx_upstream_relayed_by_fixed_one(env):
    """RCPT TO:<postmaster> (RFC 5321 4.5.1: the postmaster of the server it is sent to) has no domain whose MX
    hosts could be looked up: an mx upstream refuses it with 550 5.1.2 without a lookup; a fixed upstream relays
    it, the postmaster being its business."""
    d = env.daemon
    before = d.metrics()
    n = env.good.connections()
    c, (code, text), _ = timed_rcpt(env.ports["out"], "postmaster")
    try:
        assert code == 550 and text.startswith("550 5.1.2 "), text
        assert "no domain" in text, text
    finally:
        c.close()
    after = hh.assert_counter(d, before, "mailflow_rejects_total", listener="out", reason="no_domain")
    assert not delta(before, after, "mailflow_dns_lookups_total"), \
        f"an empty domain was looked up: {delta(before, after, 'mailflow_dns_lookups_total')}"
    assert env.good.connections() == n, "an MX host was connected to"

    n = env.store.count()
    c = hh.greeted(env.ports["in"])
    try:
        code, text = hh.transaction(c, hh.message("postmaster"), sender=SENDER, rcpts=("postmaster",))
        assert code == 250, text
    finally:
        c.close()
    meta, _ = env.store.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["postmaster"], meta
