"""Writes the socket takes only in part (a peer that reads slowly, full socket buffers): replies, commands and DATA
blocks are written at once where the socket takes them, and what is left must still go out whole and in order
before anything else. A client that pipelines thousands of commands and reads late gets every reply once, in
command order; an upstream that stops reading in the middle of a large message gets it byte-exact."""
import socket
import threading
import time
import types

import pytest

import harness
import hostile_helpers as hh

LINE = b"%06d a line of a large message, long enough to fill the socket buffers quickly .........\r\n"
BIG = (b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: partial writes\r\n\r\n"
       + b"".join(LINE % i for i in range(120000)))  # about 11 MB: more than loopback's socket buffers hold


def script_slow_reader(conn):
    """An upstream that stops reading for a while once DATA began (the relay's writes then block part way),
    then takes the whole message and keeps it; 250 at its end."""
    conn.send(b"220 fake.test ESMTP fake\r\n")
    while True:
        line = conn.line()
        word = line.split(b" ", 1)[0].upper()
        if word == b"EHLO":
            conn.send(b"250-fake.test\r\n250 PIPELINING\r\n")
        elif word == b"DATA":
            conn.send(b"354 go on\r\n")
            time.sleep(1.5)
            content = conn.buf
            conn.buf = b""
            while not content.endswith(b"\r\n.\r\n"):
                chunk = conn.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("peer closed in DATA")
                content += chunk
                if len(content) % 7 == 0:
                    time.sleep(0.001)  # and reads unevenly
            conn.server.messages.append(content)
            conn.send(b"250 2.0.0 queued\r\n")
        elif word == b"QUIT":
            conn.send(b"221 bye\r\n")
            return
        else:
            conn.send(b"250 ok\r\n")


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    slow = hh.FakeUpstream("slow", script_slow_reader)
    slow.messages = []
    ports = {"plain": harness.free_port(), "slow": harness.free_port()}
    daemon = daemon_factory(listeners=[hh.listener("plain", ports["plain"], "store"),
                                       hh.listener("slow", ports["slow"], "slow")],
                            upstreams=[hh.plain_upstream("store", sink.port), hh.plain_upstream("slow", slow.port)],
                            # max_junk_commands 0: the late reader's 200000 HELP and RSET are junk, but here
                            # they are there for the size of their replies
                            limits={"max_message_size": 64 << 20, "drain_timeout": "3s", "max_junk_commands": 0})
    yield types.SimpleNamespace(daemon=daemon, ports=ports, slow=slow)
    slow.stop()


def test_pipelined_replies_once_and_in_order_when_the_client_reads_late(env):
    pairs = 100000  # HELP and RSET (allowed in a group, RFC 2920): about 8 MB of replies, more than the socket
    # buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the relay's writes fill up soon
    sock.settimeout(30)
    sock.connect(("127.0.0.1", env.ports["plain"]))
    c = harness.RawSmtp.__new__(harness.RawSmtp)
    c.sock, c.buf, c.transcript = sock, b"", []
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO late.example.test")[0] == 250
        help_reply = c.cmd("HELP")[1].encode() + b"\r\n"
        batch = b"HELP\r\nRSET\r\n" * pairs + b"QUIT\r\n"
        sender = threading.Thread(target=c.sock.sendall, args=(batch,), daemon=True)
        sender.start()
        time.sleep(1.5)  # the relay's replies fill the socket buffers: its writes are partial from here on
        replies, closed = hh.read_all(c.sock, wait=10, limit=1 << 30)
        sender.join(5)
    finally:
        c.close()
    assert closed, "the session did not end after QUIT"
    rset = b"250 2.0.0 Ok\r\n"
    expected = (help_reply + rset) * pairs
    got = replies[:len(expected)]
    if got != expected:
        at = next((i for i in range(min(len(got), len(expected))) if got[i] != expected[i]), min(len(got), len(expected)))
        pytest.fail(f"{len(replies)} bytes of replies, {len(expected)} expected before 221; first difference at {at}: "
                    f"{got[max(0, at - 60):at + 60]!r} instead of {expected[max(0, at - 60):at + 60]!r}")
    assert replies[len(expected):].startswith(b"221"), replies[len(expected):][:200]


def test_large_message_to_an_upstream_that_reads_late_arrives_whole(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["slow"], timeout=60)
    try:
        code, text = hh.transaction(c, BIG)
        assert code == 250, text
        c.cmd("QUIT")
    finally:
        c.close()
    harness.wait_for(lambda: env.slow.messages, 10, what="the message at the slow upstream")
    content = env.slow.messages[-1]
    received, rest = harness.split_received(content)
    assert len(received) == 1
    assert rest == harness.dot_stuff(BIG) + b".\r\n", "the message arrived altered (bytes lost or out of order)"
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")
