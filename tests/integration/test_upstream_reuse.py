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
                while b"\r\n.\r\n" not in conn.buf:
                    chunk = conn.sock.recv(65536)
                    if not chunk:
                        return
                    conn.buf += chunk
                content, conn.buf = conn.buf.split(b"\r\n.\r\n", 1)
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
