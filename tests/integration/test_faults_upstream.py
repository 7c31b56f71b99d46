"""Faults on the upstream leg, with scripted fake upstreams (hostile_helpers.FakeUpstream): STARTTLS command
injection by the upstream ("220 go ahead\\r\\n250 injected\\r\\n" in one write), a reset right after accept,
an upstream that accepts and never answers, one that closes mid-DATA, STARTTLS that fails or is refused
under `required`; and a client that disconnects mid-DATA. Each: the exact 4xx to the client, nothing
counted, nothing at the sink, mailflow_upstream_errors_total{upstream,reason} moved, and the daemon still
relays. (Connection refused and a foreign CA under `verify` are test_upstream_failures.py and
test_upstream_tls.py.)"""
import time
import types

import pytest

import harness
import hostile_helpers as hh

CONNECT_TIMEOUT = 2.0  # timeouts.upstream_connect: connecting, the upstream's banner included


def script_inject(conn):
    if conn.smtp_until(b"STARTTLS") is not None:
        conn.send(b"220 go ahead\r\n250 injected\r\n")
        conn.hang(10)


def script_reset(conn):
    conn.reset()


def script_hang(conn):
    conn.hang(15)


def script_close_after_data_chunk(conn):
    conn.send(b"220 fake.test ESMTP fake\r\n")
    while True:
        line = conn.line()
        word = line.split(b" ", 1)[0].upper()
        if word == b"EHLO":
            conn.send(b"250-fake.test\r\n250 PIPELINING\r\n")
        elif word == b"DATA":
            conn.send(b"354 go on\r\n")
            conn.recv_some()  # the first chunk of content, then gone without a reply
            conn.sock.close()
            return
        else:
            conn.send(b"250 ok\r\n")


def script_starttls_garbage(conn):
    if conn.smtp_until(b"STARTTLS") is not None:
        conn.send(b"220 2.0.0 Ready to start TLS\r\n")
        time.sleep(0.2)
        conn.send(b"this is not a TLS server hello\r\n" * 4)
        conn.sock.close()


def script_starttls_refused(conn):
    if conn.smtp_until(b"STARTTLS") is not None:
        conn.send(b"454 4.7.0 TLS not available due to local problem\r\n")
        conn.smtp_until(b"NEVER")


def script_421_at_rcpt(conn):
    """Delivers messages; a RCPT to closeme@ gets 421 (the upstream closes the channel), and then, as a sloppy
    server does, it goes on talking: DATA gets 451."""
    closing = []

    def rcpt(line):
        if b"closeme@" not in line:
            return None
        closing.append(True)
        conn.send(b"421 4.3.0 fake.test closing transmission channel\r\n")
        return False

    def data(_line):
        if not closing:
            return None
        conn.send(b"451 4.3.0 not now\r\n")
        return False

    conn.serve({b"RCPT": rcpt, b"DATA": data})


def script_421_at_rset(conn):
    """Delivers messages; RSET gets 421 (the upstream closes the channel) and the connection is closed."""
    def rset(_line):
        conn.send(b"421 4.3.0 fake.test closing transmission channel\r\n")
        conn.sock.close()
        return True

    conn.serve({b"RSET": rset})


FAKES = {  # listener/upstream name -> (script, upstream tls mode)
    "inject": (script_inject, "opportunistic"),
    "reset": (script_reset, "opportunistic"),
    "hang": (script_hang, "opportunistic"),
    "middata": (script_close_after_data_chunk, "none"),
    "tlsgarbage": (script_starttls_garbage, "required"),
    "tlsrefused": (script_starttls_refused, "required"),
    "closing": (script_421_at_rcpt, "none"),
    "rsetclosing": (script_421_at_rset, "none"),
}


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    fakes = {name: hh.FakeUpstream(name, script) for name, (script, _) in FAKES.items()}
    ports = {name: harness.free_port() for name in list(FAKES) + ["good"]}
    listeners = [hh.listener(name, ports[name], name) for name in FAKES]
    listeners.append(hh.listener("good", ports["good"], "good"))
    upstreams = [hh.plain_upstream(name, fakes[name].port, tls=mode) for name, (_, mode) in FAKES.items()]
    upstreams.append(hh.plain_upstream("good", sink.port))
    daemon = daemon_factory(listeners=listeners, upstreams=upstreams,
                            timeouts={"greeting": "3s", "command": "3s", "upstream_connect": "2s",
                                      "tls_handshake": "3s", "data_end": "3s"})
    yield types.SimpleNamespace(sink=sink, daemon=daemon, ports=ports, fakes=fakes)
    for f in fakes.values():
        f.stop()


def assert_upstream_error(env, before, upstream, reason):
    after = hh.assert_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream=upstream, reason=reason)
    harness.assert_not_counted(env.daemon, before, settle=0.1)
    return after


@pytest.mark.parametrize("name,reason", [
    ("inject", "starttls_pipelining"),
    # An RST right after accept can beat the connect's completion (seen under ASan): either label is right.
    ("reset", ("connection_lost", "connect_failed")),
    ("tlsgarbage", "tls_failed"),
    ("tlsrefused", "starttls_rejected"),
])
def test_upstream_setup_failure_451_at_rcpt(env, name, reason):
    before = env.daemon.metrics()
    c = hh.greeted(env.ports[name])
    try:
        # MAIL is answered locally; the upstream is opened at the first RCPT, which hears the failure.
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        assert code == 451 and text.startswith("451 4.4."), f"RCPT with upstream {name}: {text!r}"
        assert c.cmd("NOOP")[0] == 250, "the client session must survive an upstream failure"
        assert c.cmd("DATA")[0] == 554, "no recipient was accepted: DATA must be refused"
    finally:
        c.close()
    if isinstance(reason, tuple):
        after = hh.wait_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream=name)
        moved = {r: sum(harness.delta(before, after, "mailflow_upstream_errors_total", upstream=name,
                                      reason=r).values()) for r in reason}
        assert sum(moved.values()) == 1, f"upstream {name}: expected one of {reason} to move by 1: {moved}"
        harness.assert_not_counted(env.daemon, before, settle=0.1)
    else:
        assert_upstream_error(env, before, name, reason)
    if name == "tlsgarbage":
        hh.assert_counter(env.daemon, before, "mailflow_tls_handshake_failures_total", listener=name, leg="upstream")
    if name == "inject":
        got = env.fakes[name].received
        assert got and all(b"MAIL FROM" not in r for r in got), f"MAIL was sent after the injection: {got!r}"
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_upstream_hangs_451_after_connect_timeout(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["hang"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        start = time.monotonic()
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        elapsed = time.monotonic() - start
        assert code == 451 and text.startswith("451 4.4.1"), f"RCPT with a silent upstream: {text!r}"
        assert CONNECT_TIMEOUT - 0.3 < elapsed < CONNECT_TIMEOUT + 1.5, f"451 after {elapsed:.2f}s"
    finally:
        c.close()
    assert_upstream_error(env, before, "hang", "timeout")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_upstream_closes_mid_data_451(env):
    before = env.daemon.metrics()
    big = hh.message("mid data", body=(b"y" * 78 + b"\r\n") * 3000)
    c = hh.greeted(env.ports["middata"])
    try:
        code, text = hh.transaction(c, big)
        assert code == 451 and text.startswith("451 4.4.2"), f"upstream gone mid-DATA: {text!r}"
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.close()
    assert_upstream_error(env, before, "middata", "connection_lost")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_client_disconnects_mid_data(env):
    before = env.daemon.metrics()
    n, conns = env.sink.count(), env.sink.connections()
    c = hh.greeted(env.ports["good"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(harness.dot_stuff(hh.message("half", body=b"first half\r\n" * 500)))
        time.sleep(0.3)
    finally:
        c.close()  # no terminator
    harness.wait_for(lambda: harness.value(env.daemon.metrics(), "mailflow_sessions_active") == 0, 5,
                     what="the session to end")
    after = harness.assert_not_counted(env.daemon, before, settle=0.5)
    assert env.sink.count() == n, "a half message reached the sink"
    assert env.sink.connections() == conns + 1
    moved = harness.delta(before, after, "mailflow_upstream_errors_total")
    assert not moved, f"a client going away is not an upstream error:\n{harness.fmt_delta(moved)}"
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


@pytest.mark.parametrize("pipelined", [False, True], ids=["RCPT", "RCPT+DATA-pipelined"])
def test_upstream_421_relayed_then_client_closed(env, pipelined):
    """A 421 from the upstream closes the channel (RFC 5321 3.8, 4.2.2): the client gets the upstream's 421 as
    it is, and then its session ends, as if it talked to the upstream directly; nothing the upstream says after
    it (here a 451 to the pipelined DATA) reaches the client. The message delivered before it stays delivered
    and counted once."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["closing"])
    try:
        code, text = hh.transaction(c, hh.message("before the 421"))
        assert code == 250, text
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        if pipelined:
            c.send(b"RCPT TO:<closeme@dest.test>\r\nDATA\r\n")
            replies = hh.replies_within(c, 1.0)
        else:
            replies = [c.cmd("RCPT TO:<closeme@dest.test>")] + hh.replies_within(c, 1.0)
        assert replies == [(421, "421 4.3.0 fake.test closing transmission channel")], replies
        assert c.closed_or_error(1.5), "the client session stayed open after the upstream's 421"
    finally:
        c.close()
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")
    hh.assert_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream="closing",
                      reason="connection_lost")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_upstream_421_to_rset_is_its_close(env):
    """The client's RSET is answered here and sent upstream; an upstream that answers it 421 closes the channel
    (RFC 5321 3.8), as a 421 to any other command does: counted as connection_lost (not as an RSET the upstream
    refused), and the client's next transaction goes over a new connection."""
    before = env.daemon.metrics()
    conns = env.fakes["rsetclosing"].connections()
    c = hh.greeted(env.ports["rsetclosing"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
        assert c.cmd("RSET")[0] == 250
        code, text = hh.transaction(c, hh.message("after the RSET"))
        assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    assert env.fakes["rsetclosing"].connections() == conns + 2
    after = harness.assert_counted(env.daemon, before, "internet", "inbound", "none")
    moved = harness.delta(before, after, "mailflow_upstream_errors_total")
    assert moved == {harness.series_key(upstream="rsetclosing", reason="connection_lost"): 1.0}, \
        harness.fmt_delta(moved)
