"""Hostile PROXY headers from a trusted peer (untrusted peers are test_proxy_protocol.py): truncated (closed
after 5 s even while bytes keep trickling in, or at EOF), oversized v1/v2, garbage. Each is closed (or
answered 5xx) without a banner and without relaying; a proper header still works afterwards."""
import socket
import struct
import time
import types

import pytest

import harness
import hostile_helpers as hh

PROXY_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    proxied, plain = harness.free_port(), harness.free_port()
    daemon = daemon_factory(
        listeners=[hh.listener("proxied", proxied, "store", proxy_protocol={"trusted": ["127.0.0.1/32"]}),
                   hh.listener("inbound", plain, "store")],
        upstreams=[hh.plain_upstream("store", sink.port)])
    return types.SimpleNamespace(sink=sink, daemon=daemon, proxied=proxied, plain=plain)


def assert_closed_unserved(data, closed):
    assert closed, "the connection was not closed"
    assert b"220" not in data, f"a bad PROXY header got the banner: {data!r}"
    assert data == b"" or data[:1] == b"5", f"only a close or a 5xx may answer a bad PROXY header: {data!r}"


def assert_proxied_relay(env):
    """A well-formed v1 header from the trusted peer is still honoured and the message relayed."""
    before = env.daemon.metrics()
    n = env.sink.count()
    data = hh.message("proxied after garbage")
    c = harness.RawSmtp(env.proxied)
    try:
        c.send(harness.proxy_v1("127.0.0.2", "127.0.0.1", 40000, env.proxied))
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = hh.transaction(c, data)
        assert code == 250, text
    finally:
        c.close()
    _, content = env.sink.wait_messages(n + 1)[-1]
    headers, rest = harness.split_received(content)
    assert rest == data and b"127.0.0.2" in headers[0], content
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")


def test_truncated_header_closed_after_5s_despite_trickle(env):
    before = env.daemon.metrics()
    conns = env.sink.connections()
    header = harness.proxy_v1("127.0.0.2", "127.0.0.1", 40000, env.proxied)[:-2]  # never completed
    c = harness.RawSmtp(env.proxied)
    start = time.monotonic()
    closed_after = None
    try:
        for i in range(len(header)):  # one byte per 0.4 s: activity must not extend the 5 s
            try:
                c.sock.sendall(header[i:i + 1])
            except OSError:
                closed_after = time.monotonic() - start
                break
            data, closed = hh.read_all(c.sock, wait=0.4)
            if closed or data:
                closed_after = time.monotonic() - start
                assert_closed_unserved(data, True)
                break
            if time.monotonic() - start > PROXY_TIMEOUT + 3:
                break
    finally:
        c.close()
    assert closed_after is not None, f"a truncated PROXY header kept the connection open for {PROXY_TIMEOUT + 3}s"
    assert PROXY_TIMEOUT - 0.5 < closed_after < PROXY_TIMEOUT + 2, f"closed after {closed_after:.2f}s"
    assert env.sink.connections() == conns
    hh.assert_rejected(env.daemon, before, "proxy_timeout", listener_name="proxied")
    assert_proxied_relay(env)


def test_truncated_header_then_eof(env):
    before = env.daemon.metrics()
    c = harness.RawSmtp(env.proxied)
    try:
        c.send(b"PROXY TCP4 127.0.0.2 127.")
        c.sock.shutdown(1)  # SHUT_WR: the peer sees EOF mid-header
        data, closed = hh.read_all(c.sock, wait=3.0)
    finally:
        c.close()
    assert_closed_unserved(data, closed)
    hh.assert_rejected(env.daemon, before, "proxy_truncated", listener_name="proxied")


def test_connect_and_close_without_a_byte_is_no_truncated_header(env):
    """A balancer's TCP health check connects and hangs up (FIN, or a reset as HAProxy's checks close) without
    sending anything: no header was begun, so nothing was truncated; counting each as proxy_truncated would
    fill rejects_total with one refusal per check. A header cut short still counts (the test above)."""
    before = env.daemon.metrics()
    for linger in (False, True):
        s = socket.create_connection(("127.0.0.1", env.proxied))
        if linger:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.5)
    hh.wait_sessions_idle(env.daemon)
    moved = harness.delta(before, env.daemon.metrics(), "mailflow_rejects_total")
    assert not moved, f"a connection that sent nothing was counted as a refusal: {moved}"


def proxy_v2_with_length(n):
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + n.to_bytes(2, "big") + b"\x7f\x00\x00\x02" * (n // 4)


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 " + b"1" * 150 + b" 127.0.0.1 40000 25\r\n",
    proxy_v2_with_length(2000),
    b"PROXY GARBAGE\r\n",
    b"PROXY TCP4 127.0.0.2 127.0.0.1 99999 25\r\n",
    b"PROXY TCP4 not-an-address 127.0.0.1 40000 25\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n",
], ids=["v1-oversized", "v2-oversized", "v1-garbage", "v1-bad-port", "v1-bad-address", "binary"])
def test_bad_header_closed_without_relaying(env, header):
    before = env.daemon.metrics()
    conns = env.sink.connections()
    c = harness.RawSmtp(env.proxied)
    try:
        c.send(header + b"EHLO client.example.test\r\nMAIL FROM:<s@example.test>\r\n")
        data, closed = hh.read_all(c.sock, wait=3.0)
    finally:
        c.close()
    assert_closed_unserved(data, closed)
    assert env.sink.connections() == conns, "a connection with a bad PROXY header reached the upstream"
    hh.assert_rejected(env.daemon, before, "proxy_invalid", listener_name="proxied")
    harness.assert_not_counted(env.daemon, before, settle=0.1)


def test_daemon_still_relays(env):
    assert_proxied_relay(env)
    hh.assert_relays(env.daemon, env.plain, env.sink)
