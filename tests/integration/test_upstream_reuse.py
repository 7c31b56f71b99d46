"""The upstream connection kept between the transactions of a client session: an upstream that closed it in the
meantime (as Postfix does after smtpd_timeout, 10 s under stress: "421 4.4.2 ... timeout exceeded", then close;
or silently; or with a reset) is not reused: the next transaction opens a new connection and its message is
delivered, not refused with 451, and no upstream error is counted for a close the upstream was entitled to. A
connection that is still open is reused (one connection for both messages)."""
import socket
import struct
import time
import types

import pytest

import harness
import hostile_helpers as hh

IDLE_CLOSE = 0.4  # s: how long the fake upstream keeps a connection that has nothing to do


def make_idle_closer(how):
    """An upstream that takes messages and closes a connection left idle for IDLE_CLOSE seconds after a message:
    `how` = "421" (Postfix: the reply, then close), "fin" (close) or "rst" (reset)."""
    def script(conn):
        conn.send(b"220 fake.test ESMTP fake\r\n")
        while True:
            if how and conn.buf == b"" and conn.server.messages_on(conn.idx):
                conn.sock.settimeout(IDLE_CLOSE)
                try:
                    chunk = conn.sock.recv(65536)
                except socket.timeout:
                    if how == "421":
                        conn.send(b"421 4.4.2 fake.test Error: timeout exceeded\r\n")
                    if how == "rst":
                        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.sock.close()
                    return
                finally:
                    conn.sock.settimeout(30)
                if not chunk:
                    return
                conn.buf += chunk
                conn.server.received[conn.idx] += chunk
            line = conn.line()
            word = line.split(b" ", 1)[0].upper()
            if word == b"EHLO":
                conn.send(b"250-fake.test\r\n250 PIPELINING\r\n")
            elif word == b"DATA":
                conn.send(b"354 go on\r\n")
                content = conn.message()
                if content is None:
                    return
                conn.server.messages.append((conn.idx, content))
                conn.send(b"250 2.0.0 queued\r\n")
            elif word == b"QUIT":
                conn.send(b"221 bye\r\n")
                return
            else:
                conn.send(b"250 ok\r\n")
    return script


HOWS = ["421", "fin", "rst", None]  # None: an upstream that keeps the connection (reused)


@pytest.fixture(scope="module")
def env(daemon_factory):
    fakes = {}
    for how in HOWS:
        name = f"idle-{how}" if how else "keeps"
        fake = hh.FakeUpstream(name, make_idle_closer(how))
        fake.messages = []
        fake.messages_on = lambda idx, fake=fake: any(i == idx for i, _ in fake.messages)
        fakes[how] = fake
    ports = {how: harness.free_port() for how in HOWS}
    daemon = daemon_factory(listeners=[hh.listener(f.name, ports[how], f.name) for how, f in fakes.items()],
                            upstreams=[hh.plain_upstream(f.name, f.port) for f in fakes.values()])
    yield types.SimpleNamespace(daemon=daemon, ports=ports, fakes=fakes)
    for f in fakes.values():
        f.stop()


@pytest.mark.parametrize("how", HOWS, ids=[h or "kept" for h in HOWS])
def test_second_message_after_the_upstream_closed_the_kept_connection(env, how):
    fake = env.fakes[how]
    before = env.daemon.metrics()
    n, conns = len(fake.messages), fake.connections()
    c = hh.greeted(env.ports[how])
    try:
        code, text = hh.transaction(c, hh.message("first"))
        assert code == 250, text
        time.sleep(IDLE_CLOSE + 0.6)  # the upstream closes its idle connection meanwhile (unless it keeps it)
        code, text = hh.transaction(c, hh.message("second"))
        assert code == 250, f"the second message after the upstream closed its idle connection: {text!r}"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    assert len(fake.messages) == n + 2
    assert b"Subject: second" in fake.messages[-1][1]
    assert fake.connections() == conns + (1 if how is None else 2), "a new connection iff the kept one was closed"
    after = harness.assert_counted(env.daemon, before, "internet", "inbound", "none", n=2)
    moved = harness.delta(before, after, "mailflow_upstream_errors_total")
    assert not moved, f"an upstream closing an idle connection is no upstream error:\n{harness.fmt_delta(moved)}"


# ------------------------------------------------------------------------------------------------------------
# The upstream closes the kept connection after the peek found it open: it reads the next transaction's MAIL and
# closes without a word ("fin": end of stream; "rst": reset). Nothing of the transaction was answered there, so
# the relay sends it again, once, on a new connection (as Postfix's smtp client moves a cached connection's
# failure on to a new session): the client gets its 250s, the message arrives on the second connection, and no
# upstream error is counted. "answered": the upstream answers MAIL first and closes at RCPT; that transaction
# was answered there and is not replayed: the RCPT gets 451, and no second connection is made.

def make_closer_at_next_mail(how, pipelining):
    def script(conn):
        conn.send(b"220 fake.test ESMTP fake\r\n")
        delivered = False
        while True:
            line = conn.line()
            word = line.split(b" ", 1)[0].upper()
            if word == b"EHLO":
                conn.send(b"250-fake.test\r\n250 PIPELINING\r\n" if pipelining else b"250 fake.test\r\n")
            elif word == b"MAIL" and delivered and how in ("fin", "rst"):
                if how == "rst":
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.sock.close()
                    return
                conn.sock.shutdown(socket.SHUT_WR)
                while conn.sock.recv(65536):
                    pass
                conn.sock.close()
                return
            elif word == b"RCPT" and delivered and how == "answered":
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.sock.close()
                return
            elif word == b"DATA":
                conn.send(b"354 go on\r\n")
                content = conn.message()
                if content is None:
                    return
                conn.server.messages.append((conn.idx, content))
                delivered = True
                conn.send(b"250 2.0.0 queued\r\n")
            elif word == b"QUIT":
                conn.send(b"221 bye\r\n")
                return
            else:
                conn.send(b"250 ok\r\n")
    return script


CLOSERS = [("fin", True), ("rst", True), ("fin", False), ("answered", True)]


@pytest.fixture(scope="module")
def closers(daemon_factory):
    fakes = {}
    for how, pipelining in CLOSERS:
        fake = hh.FakeUpstream(f"close-{how}-{'pipe' if pipelining else 'lock'}",
                               make_closer_at_next_mail(how, pipelining))
        fake.messages = []
        fakes[(how, pipelining)] = fake
    ports = {key: harness.free_port() for key in fakes}
    daemon = daemon_factory(listeners=[hh.listener(f.name, ports[key], f.name) for key, f in fakes.items()],
                            upstreams=[hh.plain_upstream(f.name, f.port) for f in fakes.values()], name="closers")
    yield types.SimpleNamespace(daemon=daemon, ports=ports, fakes=fakes)
    for f in fakes.values():
        f.stop()


@pytest.mark.parametrize("how,pipelining", CLOSERS, ids=[f"{h}-{'pipelining' if p else 'lockstep'}"
                                                         for h, p in CLOSERS])
def test_kept_connection_closed_after_the_peek_is_replayed_once(closers, how, pipelining):
    fake = closers.fakes[(how, pipelining)]
    daemon = closers.daemon
    before = daemon.metrics()
    n, conns = len(fake.messages), fake.connections()
    c = hh.greeted(closers.ports[(how, pipelining)])
    try:
        code, text = hh.transaction(c, hh.message("first"))
        assert code == 250, text
        if how == "answered":
            assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250  # answered here (INTERFACE rule 4)
            code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
            assert code == 451, f"a transaction the upstream answered is not replayed: {code} {text!r}"
            assert c.cmd("RSET")[0] == 250
        else:
            code, text = hh.transaction(c, hh.message("second"))
            assert code == 250, f"the transaction on the kept connection the upstream closed: {code} {text!r}"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    if how == "answered":
        assert len(fake.messages) == n + 1
        assert fake.connections() == conns + 1, "no second connection for a transaction that was answered"
        after = harness.assert_counted(daemon, before, "internet", "inbound", "none", n=1)
        moved = harness.delta(before, after, "mailflow_upstream_errors_total")
        assert moved == {harness.series_key(upstream=fake.name, reason="connection_lost"): 1.0}, \
            harness.fmt_delta(moved)
        return
    assert len(fake.messages) == n + 2, fake.log_tail()
    idx, content = fake.messages[-1]
    assert b"Subject: second" in content
    assert idx == conns + 1, "the second message arrives on a second connection"
    assert fake.connections() == conns + 2, "exactly one new connection: the replay, once"
    # The replayed commands arrived on the second connection once each.
    second = fake.received[conns + 1]
    assert second.count(b"MAIL FROM:") == 1 and second.count(b"RCPT TO:") == 1, second
    assert fake.received[conns].count(b"MAIL FROM:") == 2  # the first message's, and the one it closed at
    after = harness.assert_counted(daemon, before, "internet", "inbound", "none", n=2)
    moved = harness.delta(before, after, "mailflow_upstream_errors_total")
    assert not moved, f"an upstream closing an idle kept connection is no upstream error:\n{harness.fmt_delta(moved)}"
    log = daemon.stderr()
    assert "upstream_closed_idle" in log and ("at=reply" in log or "at=write" in log), harness.tail(daemon.log_path)
