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
- closes.example.net (a host that closes before its banner, good): counted as a lost connection and a failed
  attempt, not as a connect timeout; the good host delivers.
- a fixed upstream that stalls at EHLO: 451 4.4.2 at 3 s, not after timeouts.command.
- stsslow.example.net, whose MTA-STS policy host never answers (mta_sts.fetch_timeout 10s): 451 4.4.2 at 3 s.
- a DNS server that never answers (dns.timeout 8s, upstream_open 2s): 451 4.4.2 at 2 s.
- address literals: refused with 550 5.1.2 by an mx upstream (nothing looked up), relayed by a fixed one.
- <postmaster> without a domain: the same (no empty name is looked up).
- many.example.net, eight MX hosts whose banners say 421 (two with no address): at most 5 addresses are tried
  (Postfix's smtp_mx_address_limit), and no more hosts are looked up than give them.
- sessions.example.net, a 421 banner, two hosts that refuse EHLO, then a working one: at most 2 sessions that got a
  banner (Postfix's smtp_mx_session_limit), so the working host is never tried; the 421 banner is no session.
- closing.example.net, a host that answers STARTTLS with 421 (it is going away), then good: under tls: opportunistic
  the 421 ends that host's session (it is no declined STARTTLS to go on from in plaintext), and good gets the mail."""
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
ADDR = {"silent": "127.0.0.61", "mute": "127.0.0.62", "silent2": "127.0.0.63", "good": "127.0.0.64",
        "closes": "127.0.0.65"}
POLICY_HOST = "127.0.0.66"  # mta-sts.stsslow.example.net:443, which accepts and never answers
MANY = ["127.0.0.71", "127.0.0.72", "127.0.0.73", "127.0.0.74", "127.0.0.75", "127.0.0.76", "127.0.0.77"]
SESSIONS = {"busy": "127.0.0.81", "noehlo1": "127.0.0.82", "noehlo2": "127.0.0.83", "fine": "127.0.0.84"}
CLOSING = "127.0.0.58"  # mx.closing.example.net: 421 to STARTTLS
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
closes       MX    10 mx.closes
closes       MX    20 mx.good
mx.closes    A     {closes}
stsslow      MX    10 mx.good
_mta-sts.stsslow TXT "v=STSv1; id=1;"
mta-sts.stsslow  A   {policy}
; eight MX hosts, h3 and h4 without any address
many         MX    10 h1.many
many         MX    20 h2.many
many         MX    30 h3.many
many         MX    40 h4.many
many         MX    50 h5.many
many         MX    60 h6.many
many         MX    70 h7.many
many         MX    80 h8.many
h1.many      A     {many[0]}
h1.many      A     {many[1]}
h2.many      A     {many[2]}
h5.many      A     {many[3]}
h6.many      A     {many[4]}
h7.many      A     {many[5]}
h8.many      A     {many[6]}
sessions     MX    10 busy.sessions
sessions     MX    20 noehlo1.sessions
sessions     MX    30 noehlo2.sessions
sessions     MX    40 fine.sessions
busy.sessions    A {sessions[busy]}
noehlo1.sessions A {sessions[noehlo1]}
noehlo2.sessions A {sessions[noehlo2]}
fine.sessions    A {sessions[fine]}
closing      MX    10 mx.closing
closing      MX    20 mx.good
mx.closing   A     {closing}
""".format(policy=POLICY_HOST, many=MANY, sessions=SESSIONS, closing=CLOSING, **ADDR)


def black_hole(conn):
    conn.hang(30)  # accepted, never a banner


def mute_after_banner(conn):
    conn.send(b"220 mx.mute.example.net ESMTP\r\n")
    conn.hang(30)  # EHLO never answered


def closes_before_banner(conn):
    conn.sock.close()  # accepted, closed at once: no banner


def busy_banner(conn):
    conn.send(b"421 4.3.2 busy, try again later\r\n")


def refuses_ehlo(conn):
    conn.send(b"220 mx.example.net ESMTP\r\n")
    while True:  # EHLO, then HELO, refused; QUIT; until the close
        conn.line()
        conn.send(b"554 5.7.1 not for you\r\n")


def closes_at_starttls(conn):
    """Offers STARTTLS and answers it with 421 (going away, RFC 5321 3.8); records what still comes for a second."""
    conn.send(b"220 mx.closing.example.net ESMTP\r\n")
    conn.line()  # EHLO
    conn.send(b"250-mx.closing.example.net\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    conn.line()  # STARTTLS
    conn.send(b"421 4.3.2 Service shutting down, closing transmission channel\r\n")
    conn.sock.settimeout(1.0)
    try:
        while conn.recv_some():
            pass
    except OSError:
        pass


@pytest.fixture(scope="module")
def knot():
    short = Path(tempfile.mkdtemp(prefix="mf-walk-"))  # knotd's control socket path has at most 107 bytes
    server = KnotServer(short, {"example.net": ZONE}).start()
    yield server
    server.stop()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def env(knot, sink_factory, daemon_factory):
    port = harness.free_port("127.0.0.1", *ADDR.values(), *MANY, *SESSIONS.values(), CLOSING)
    good = sink_factory("mx-good", host=ADDR["good"], port=port)
    store = sink_factory("store")
    fakes = [hh.FakeUpstream("silent", black_hole, host=ADDR["silent"], port=port),
             hh.FakeUpstream("mute", mute_after_banner, host=ADDR["mute"], port=port),
             hh.FakeUpstream("silent2", black_hole, host=ADDR["silent2"], port=port),
             hh.FakeUpstream("stallfix", mute_after_banner),
             hh.FakeUpstream("policy", black_hole, host=POLICY_HOST, port=443),
             hh.FakeUpstream("closing", closes_at_starttls, host=CLOSING, port=port),
             hh.FakeUpstream("closes", closes_before_banner, host=ADDR["closes"], port=port)]
    many = [hh.FakeUpstream(f"many{i}", busy_banner, host=host, port=port) for i, host in enumerate(MANY)]
    sessions = {"busy": hh.FakeUpstream("busy", busy_banner, host=SESSIONS["busy"], port=port),
                "noehlo1": hh.FakeUpstream("noehlo1", refuses_ehlo, host=SESSIONS["noehlo1"], port=port),
                "noehlo2": hh.FakeUpstream("noehlo2", refuses_ehlo, host=SESSIONS["noehlo2"], port=port),
                "fine": sink_factory("mx-fine", host=SESSIONS["fine"], port=port)}
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
        yield types.SimpleNamespace(daemon=daemon, ports=ports, good=good, store=store, fakes=fakes, many=many,
                                    sessions=sessions)
    finally:
        for f in fakes + many + [sessions["busy"], sessions["noehlo1"], sessions["noehlo2"]]:
            f.stop()


def timed_rcpt(port, rcpt):
    """A session past MAIL (answered locally); RCPT's reply and how long it took. The session is returned open."""
    c = hh.greeted(port, timeout=COMMAND * 3)
    code, text = c.cmd(f"MAIL FROM:<{SENDER}>")
    assert code == 250, text
    start = time.monotonic()
    reply = c.cmd(f"RCPT TO:<{rcpt}>")
    return c, reply, time.monotonic() - start


def send_data(c, subject):
    """DATA and a message on a session past its RCPT; the reply to its end."""
    assert c.cmd("DATA")[0] == 354
    c.send(harness.dot_stuff(hh.message(subject)))
    return c.cmd(".")


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
        code, text = send_data(c, "walked")
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


def fake(env, name):
    return next(f for f in env.fakes if f.name == name)


def test_mx_host_that_closes_before_its_banner_is_no_connect_timeout(env):
    """An MX host that accepts and closes at once, well within upstream_connect: the connection was lost
    (upstream_errors connection_lost) and the attempt failed (mx_attempts failed), not connect_timeout (it was
    counted as one whatever ended the wait for the banner); the next host takes the mail."""
    d = env.daemon
    before = d.metrics()
    c, (code, text), elapsed = timed_rcpt(env.ports["out"], "dave@closes.example.net")
    try:
        assert code == 250, text
        assert elapsed < UPSTREAM_CONNECT, f"250 after {elapsed:.2f}s"
        c.cmd("RSET")
    finally:
        c.close()
    after = hh.assert_counter(d, before, "mailflow_mx_attempts_total", upstream="internet", result="success")
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="failed"): 1.0,
        series_key(upstream="internet", result="success"): 1.0}
    assert delta(before, after, "mailflow_upstream_errors_total") == {
        series_key(upstream="internet", reason="connection_lost"): 1.0}
    assert fake(env, "closes").connections() == 1


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


def address_lookups(before, after):
    """The A and AAAA lookups between two scrapes, {"A success": 4, ...}."""
    return {f"{dict(k)['type']} {dict(k)['result']}": v
            for k, v in delta(before, after, "mailflow_dns_lookups_total").items() if dict(k)["type"] in ("A", "AAAA")}


def limit_lines(d, domain):
    """The limit= field of each mx_limit line logged for `domain`."""
    lines = [line.split() for line in d.stderr().splitlines()]
    return [word for words in lines if "mx_limit" in words and f"domain={domain}" in words
            for word in words if word.startswith("limit=")]


def test_at_most_five_addresses_are_looked_up_and_tried(env):
    """A hostile domain's many MX hosts must not make the relay spray DNS queries and connections at addresses of
    its choosing. As Postfix's smtp_mx_address_limit (5): h1 (2 addresses), h2, h5 and h6 are tried, h3 and h4
    (no address) do not count, and h7 and h8 are neither looked up nor connected to."""
    d = env.daemon
    before = d.metrics()
    c, (code, text), _ = timed_rcpt(env.ports["out"], "erin@many.example.net")
    try:
        assert text == "451 4.4.1 No mail host of many.example.net could be used (last: banner_rejected), try " \
                       "again later", text
    finally:
        c.close()
    after = d.metrics()
    assert [f.connections() for f in env.many] == [1, 1, 1, 1, 1, 0, 0], d.log_tail()
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="banner_rejected"): 5.0}
    # h1..h5 at once (5 addresses were wanted), then h6 alone (one was missing): six hosts, AAAA and A each.
    assert address_lookups(before, after) == {"A success": 4.0, "A nxdomain": 2.0, "AAAA nodata": 4.0,
                                              "AAAA nxdomain": 2.0}
    assert limit_lines(d, "many.example.net") == ["limit=addresses"], d.log_tail()


def test_at_most_two_sessions_that_got_a_banner(env):
    """As Postfix's smtp_mx_session_limit (2): busy (421 banner: no session), noehlo1 and noehlo2 (a banner, then
    EHLO refused: two sessions) are tried, and the working fine.sessions is not: the RCPT gets 451 4.4.1."""
    d = env.daemon
    before = d.metrics()
    n = env.sessions["fine"].connections()
    c, (code, text), _ = timed_rcpt(env.ports["out"], "frank@sessions.example.net")
    try:
        assert text == "451 4.4.1 No mail host of sessions.example.net could be used (last: failed), try again " \
                       "later", text
    finally:
        c.close()
    after = d.metrics()
    assert [env.sessions[h].connections() for h in ("busy", "noehlo1", "noehlo2")] == [1, 1, 1], d.log_tail()
    assert env.sessions["fine"].connections() == n, "a third session was opened"
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="banner_rejected"): 1.0,
        series_key(upstream="internet", result="failed"): 2.0}
    assert limit_lines(d, "sessions.example.net") == ["limit=sessions"], d.log_tail()


def test_a_host_that_answers_starttls_with_421_is_left_for_the_next(env):
    """mx.closing greets, offers STARTTLS and answers it with 421: mailflowd took that for a declined STARTTLS (the
    454 of tls: opportunistic, after which mail goes on in plaintext), sent MAIL and RCPT to a host that had said
    it is closing, and gave the client 451 for a connection lost, never trying mx.good. The 421 ends that host's
    session instead, as it does at any other step: nothing more is sent to it, and mx.good gets the mail."""
    d, sink, closing = env.daemon, env.good, fake(env, "closing")
    before = d.metrics()
    n, conns = sink.count(), closing.connections()
    c, (code, text), _ = timed_rcpt(env.ports["out"], "dave@closing.example.net")
    try:
        assert code == 250, text
        code, text = send_data(c, "past a closing host")
        assert code == 250, text
    finally:
        c.close()
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["dave@closing.example.net"]
    assert closing.connections() == conns + 1
    said = closing.received[conns]
    assert said.endswith(b"STARTTLS\r\n"), f"commands sent after the 421: {said!r}"
    after = d.metrics()
    assert delta(before, after, "mailflow_mx_attempts_total") == {
        series_key(upstream="internet", result="failed"): 1.0,
        series_key(upstream="internet", result="success"): 1.0}
    assert delta(before, after, "mailflow_upstream_errors_total") == {
        series_key(upstream="internet", reason="starttls_rejected"): 1.0}
