"""Hostile timing and resource use: an early talker under greet_pause, slowloris on a command and on DATA
(every command and DATA block must complete within its timeout; activity must not extend it), the per-IP
and total session limits (421 4.7.0 at connect while the others are still served)."""
import socket
import time
import types

import pytest

import harness
import hostile_helpers as hh

COMMAND_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    slow, limited, paused, proxied = harness.free_port(), harness.free_port(), harness.free_port(), harness.free_port()
    limited_proxied = harness.free_port()
    up = [hh.plain_upstream("store", sink.port)]
    slow_d = daemon_factory(listeners=[hh.listener("inbound", slow, "store")], upstreams=up, name="slow",
                            timeouts={"greeting": "1s", "command": "2s", "data_block": "2s",
                                      "upstream_connect": "5s"},
                            # the client that stops reading sends thousands of HELP: junk, but here it is
                            # the write timeout that must end its session
                            limits={"max_junk_commands": 0})
    limited_d = daemon_factory(listeners=[hh.listener("inbound", limited, "store"),
                                          hh.listener("proxied", limited_proxied, "store",
                                                      proxy_protocol={"trusted": ["127.0.0.1/32"]})],
                               upstreams=up, name="limited",
                               limits={"drain_timeout": "3s", "max_sessions_per_ip": 2, "max_sessions": 3})
    paused_d = daemon_factory(listeners=[hh.listener("inbound", paused, "store"),
                                         hh.listener("proxied", proxied, "store",
                                                     proxy_protocol={"trusted": ["127.0.0.1/32"]})],
                              upstreams=up, name="paused", limits={"drain_timeout": "3s", "greet_pause": "1s"})
    return types.SimpleNamespace(sink=sink, slow=slow, slow_d=slow_d, limited=limited, limited_d=limited_d,
                                 limited_proxied=limited_proxied,
                                 paused=paused, paused_d=paused_d, proxied=proxied)


# ------------------------------------------------------------------------------------------ early talker
def test_early_talker_554_and_close(env):
    before = env.paused_d.metrics()
    c = harness.RawSmtp(env.paused)
    try:
        c.send(b"EHLO spambot.example.test\r\n")
        data, closed = hh.read_all(c.sock, wait=4.0)
    finally:
        c.close()
    c.transcript.append(f"S: {data!r}")
    assert data.startswith(b"554 "), f"input before the banner must get 554 (and no banner): {data!r}"
    assert b"220 " not in data, f"an early talker got the banner: {data!r}"
    assert closed, "the connection stayed open after 554"
    hh.assert_rejected(env.paused_d, before, "early_talker")


def test_early_talker_behind_a_proxy_554_and_close(env):
    """The proxy forwards the client's early bytes right behind its PROXY header, often in the same segment:
    they are input before the banner all the same."""
    before = env.paused_d.metrics()
    c = harness.RawSmtp(env.proxied)
    try:
        c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nEHLO spambot.example.test\r\n")
        data, closed = hh.read_all(c.sock, wait=4.0)
    finally:
        c.close()
    c.transcript.append(f"S: {data!r}")
    assert data.startswith(b"554 "), f"input before the banner must get 554 (and no banner): {data!r}"
    assert b"220 " not in data, f"an early talker got the banner: {data!r}"
    assert closed, "the connection stayed open after 554"
    hh.assert_rejected(env.paused_d, before, "early_talker", listener_name="proxied")


def test_patient_client_served_after_greet_pause(env):
    start = time.monotonic()
    c = harness.RawSmtp(env.paused)
    try:
        code, _ = c.reply()
        waited = time.monotonic() - start
    finally:
        c.close()
    assert code == 220
    assert waited >= 0.9, f"the banner came after {waited:.2f}s, before greet_pause (1s)"
    hh.assert_relays(env.paused_d, env.paused, env.sink)


# ---------------------------------------------------------------------------------------------- slowloris
def trickle(c, payload, interval=0.5, give_up=8.0):
    """Sends `payload` one byte per `interval` until the server answers or closes; returns
    (seconds from the first byte to the answer or None, what came back)."""
    start = time.monotonic()
    for i in range(len(payload)):
        if time.monotonic() - start > give_up:
            return None, b""
        try:
            c.sock.sendall(payload[i:i + 1])
        except OSError:
            return time.monotonic() - start, b""
        c.sock.settimeout(interval)
        try:
            chunk = c.sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start, b""
        elapsed = time.monotonic() - start
        c.transcript.append(f"S after {elapsed:.2f}s: {chunk!r}")
        return elapsed, chunk
    return None, b""


def test_slowloris_command_421_after_timeout(env):
    before = env.slow_d.metrics()
    c = hh.greeted(env.slow)
    try:
        elapsed, answer = trickle(c, b"MAIL FROM:<slow-loris-sender-with-a-long-name@example.test>\r\n")
        assert elapsed is not None, ("a client sending one byte per 0.5 s was still connected after 8 s: "
                                     f"activity extends timeouts.command ({COMMAND_TIMEOUT}s)")
        assert answer.startswith(b"421 4.4.2"), f"slowloris command: {answer!r}"
        assert elapsed < COMMAND_TIMEOUT + 2.5, f"421 came {elapsed:.2f}s after the first byte"
        assert c.closed_or_error(3.0), "connection open after 421"
    finally:
        c.close()
    hh.assert_rejected(env.slow_d, before, "timeout")
    hh.assert_relays(env.slow_d, env.slow, env.sink)


def test_idle_command_421_after_timeout(env):
    """The plain case: nothing at all sent after EHLO -> 421 4.4.2 after timeouts.command."""
    before = env.slow_d.metrics()
    c = hh.greeted(env.slow)
    try:
        start = time.monotonic()
        data, closed = hh.read_all(c.sock, wait=COMMAND_TIMEOUT + 2)
        elapsed = time.monotonic() - start
    finally:
        c.close()
    assert data.startswith(b"421 4.4.2"), f"idle client: {data!r}"
    assert closed and COMMAND_TIMEOUT - 0.3 < elapsed < COMMAND_TIMEOUT + 2.5, f"closed={closed} after {elapsed:.2f}s"
    hh.assert_rejected(env.slow_d, before, "timeout")


def test_silent_client_421_after_greeting_timeout(env):
    """Nothing at all after the banner: 421 4.4.2 after timeouts.greeting (1 s here), not timeouts.command."""
    before = env.slow_d.metrics()
    c = harness.RawSmtp(env.slow)
    try:
        assert c.reply()[0] == 220
        start = time.monotonic()
        data, closed = hh.read_all(c.sock, wait=COMMAND_TIMEOUT + 2)
        elapsed = time.monotonic() - start
    finally:
        c.close()
    assert data.startswith(b"421 4.4.2"), f"silent client: {data!r}"
    assert closed and 0.7 < elapsed < COMMAND_TIMEOUT - 0.3, f"closed={closed} after {elapsed:.2f}s"
    hh.assert_rejected(env.slow_d, before, "timeout")


def test_slow_data_421_after_block_timeout(env):
    before = env.slow_d.metrics()
    n = env.sink.count()
    c = hh.greeted(env.slow)
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        elapsed, answer = trickle(c, harness.dot_stuff(hh.message("slow data", body=b"z" * 200 + b"\r\n")) + b".\r\n")
        assert elapsed is not None, "a byte every 0.5 s kept a DATA transfer alive for 8 s (data_block is 2s)"
        assert answer.startswith(b"421 4.4.2"), f"slow DATA: {answer!r}"
        assert elapsed < COMMAND_TIMEOUT + 2.5, f"421 came {elapsed:.2f}s after the first DATA byte"
        assert c.closed_or_error(3.0)
    finally:
        c.close()
    harness.assert_not_counted(env.slow_d, before)
    assert env.sink.count() == n, "a timed-out message reached the sink"
    hh.assert_rejected(env.slow_d, before, "timeout")
    hh.assert_relays(env.slow_d, env.slow, env.sink)


def test_client_that_stops_reading_replies_is_closed_and_counted(env):
    """The write side of slowloris: a client pipelines commands (HELP may be inside an RFC 2920 group) and
    never reads a reply. Once the socket buffers are full, the reply write must end within timeouts.command,
    close the session and count it as the read side's timeout is counted."""
    before = env.slow_d.metrics()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("127.0.0.1", env.slow))
        s.settimeout(5)
        assert s.recv(4096).startswith(b"220 ")
        s.sendall(b"EHLO reader.example.test\r\n")
        assert b"250 " in s.recv(4096)
        s.setblocking(False)
        group = b"HELP\r\n" * 1000
        start, ended = time.monotonic(), None
        while time.monotonic() - start < COMMAND_TIMEOUT + 8:
            try:
                s.send(group)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                ended = time.monotonic() - start
                break
        assert ended is not None, "a client that reads no reply kept its session for 10 s (timeouts.command 2s)"
    finally:
        s.close()
    hh.assert_rejected(env.slow_d, before, "timeout")
    hh.wait_sessions_idle(env.slow_d)
    hh.assert_relays(env.slow_d, env.slow, env.sink)


# ------------------------------------------------------------------------------------------ session limits
def refused_at_connect(port, source=None):
    c = harness.RawSmtp(port, source=source)
    try:
        data, closed = hh.read_all(c.sock, wait=3.0)
        c.transcript.append(f"S: {data!r} closed={closed}")
        return data, closed
    finally:
        c.close()


def test_per_ip_and_total_limits(env):
    d = env.limited_d
    hh.wait_sessions_idle(d)
    before = d.metrics()
    a = hh.greeted(env.limited)
    b = hh.greeted(env.limited)
    others = []
    try:
        data, closed = refused_at_connect(env.limited)
        assert data.startswith(b"421 4.7.0"), f"third connection from 127.0.0.1 (max_sessions_per_ip 2): {data!r}"
        assert closed, "connection over the per-IP limit left open"
        hh.assert_rejected(d, before, "ip_limit")
        # the first two are still served
        assert a.cmd("NOOP")[0] == 250 and b.cmd("NOOP")[0] == 250
        harness.wait_for(lambda: harness.value(d.metrics(), "mailflow_sessions_active") == 2, 5,
                         what="the refused session to be released")
        # another address is still admitted: the third session in total
        others.append(hh.greeted(env.limited, source="127.0.0.2"))
        data, closed = refused_at_connect(env.limited, source="127.0.0.3")
        assert data.startswith(b"421 4.7.0"), f"fourth session in total (max_sessions 3): {data!r}"
        assert closed
        hh.assert_rejected(d, before, "session_limit")
        code, text = hh.transaction(a, hh.message("served while limited"))
        assert code == 250, text
        assert others[0].cmd("NOOP")[0] == 250
    finally:
        for c in [a, b] + others:
            c.close()
    hh.wait_sessions_idle(d)
    hh.assert_relays(d, env.limited, env.sink)


def first_line(sock):
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_total_limit_counts_sessions_not_connections(env):
    """max_sessions (3) counts sessions: a connection still sending its PROXY header, or being refused, holds
    no slot. The limit was compared with every accepted connection, so with two sessions served and two
    connections behind a proxy not yet past their header, the first header got 421 while two sessions were
    served (and connections arriving together could be refused whole)."""
    d = env.limited_d
    hh.wait_sessions_idle(d)
    before = d.metrics()
    served = [hh.greeted(env.limited, source="127.0.0.2"), hh.greeted(env.limited, source="127.0.0.3")]
    pending = [socket.create_connection(("127.0.0.1", env.limited_proxied), timeout=5.0) for _ in range(2)]
    try:
        time.sleep(0.5)  # both accepted, each waiting for its header
        pending[0].sendall(b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n")
        data = first_line(pending[0])
        assert data.startswith(b"220 "), f"the third session (max_sessions 3, two served): {data!r}"
        pending[1].sendall(b"PROXY TCP4 192.0.2.11 127.0.0.1 40000 25\r\n")
        data = first_line(pending[1])
        assert data.startswith(b"421 4.7.0"), f"the fourth session (max_sessions 3): {data!r}"
        hh.assert_rejected(d, before, "session_limit", listener_name="proxied")
        assert all(c.cmd("NOOP")[0] == 250 for c in served)
    finally:
        for c in served:
            c.close()
        for s in pending:
            s.close()
    hh.wait_sessions_idle(d)
    hh.assert_relays(d, env.limited, env.sink)
