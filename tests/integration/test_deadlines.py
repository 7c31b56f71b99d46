"""Issue #15's faults against the real binary: every deadline bounds its wait (a blackholed upstream, an
upstream that stalls in DATA followed by a client that stalls, a client that stalls in its TLS handshake),
close_notify on an orderly TLS close (and TLS1.2 session-ID resumption that follows from it), a greet_pause
hang-up that is no early talker, a listener renamed on its address by a reload, and whole connector names in the
session log line."""
import re
import signal
import socket
import ssl
import struct
import time
import types

import pytest

import harness
import hostile_helpers as hh

CONNECT_TIMEOUT = 2.0
DATA_BLOCK = 2.0
MARGIN = 1.5


class Blackhole:
    """A listening socket whose accept queue is full and never drained: the kernel drops further SYNs, so a
    connect to it hangs until the client gives up (the kernel's own retries take over two minutes)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):  # a backlog of 0 still queues one or two: fill it for sure
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
        time.sleep(0.2)

    def close(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


def script_stall_in_data(conn):
    """Answers up to DATA's 354, then stops reading: the relay's writes fill the socket buffers and block (a
    small receive buffer, so that they do well before max_message_size is reached)."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if conn.smtp_until(b"DATA") is None:
        return
    conn.send(b"354 go on\r\n")
    time.sleep(60)


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    blackhole = Blackhole()
    staller = hh.FakeUpstream("staller", script_stall_in_data)
    ports = {name: harness.free_port() for name in ("blackhole", "staller", "good", "tls", "paused")}
    listeners = [
        hh.listener("blackhole", ports["blackhole"], "blackhole"),
        hh.listener("staller", ports["staller"], "staller"),
        hh.listener("good", ports["good"], "good"),
        hh.listener("tls", ports["tls"], "good", certs=certs),
    ]
    upstreams = [
        hh.plain_upstream("blackhole", blackhole.port),
        hh.plain_upstream("staller", staller.port),
        hh.plain_upstream("good", sink.port),
    ]
    connectors = [
        {"name": "partner-contoso", "type": "partner", "direction": "inbound",
         "match": {"listener": "good", "sender_domains": ["contoso.example"]}},
        {"name": "partner", "type": "partner", "direction": "inbound",
         "match": {"listener": "good", "sender_domains": ["fabrikam.example"]}},
    ]
    daemon = daemon_factory(listeners=listeners, upstreams=upstreams, connectors=connectors,
                            timeouts={"greeting": "5s", "command": "5s", "upstream_connect": f"{CONNECT_TIMEOUT:g}s",
                                      "tls_handshake": "5s", "data_block": f"{DATA_BLOCK:g}s", "data_end": "5s"})
    yield types.SimpleNamespace(sink=sink, daemon=daemon, ports=ports)
    staller.stop()
    blackhole.close()


def test_blackholed_upstream_451_within_upstream_connect(env):
    """The connect itself is bounded by timeouts.upstream_connect (it was the kernel's 2+ minutes)."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["blackhole"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        start = time.monotonic()
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        elapsed = time.monotonic() - start
        assert code == 451 and text.startswith("451 4.4.1"), text
        assert CONNECT_TIMEOUT - 0.3 < elapsed < CONNECT_TIMEOUT + MARGIN, f"451 after {elapsed:.2f}s"
        assert c.cmd("NOOP")[0] == 250, "the client session survives"
    finally:
        c.close()
    hh.assert_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream="blackhole",
                      reason="connect_timeout")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_upstream_stalls_in_data_then_client_stalls(env):
    """The upstream stops reading mid-DATA (its write times out), then the client stops sending: each wait
    has its own deadline, so the session ends with 421 within data_block of the client's silence (it used
    to run with no deadline at all until a drain)."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["staller"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        # Send as fast as the relay takes it until its upstream write has timed out (the counter says so; the
        # upstream's buffers and the relay's must fill first), then stall for good.
        c.sock.setblocking(False)
        chunk = (b"x" * 998 + b"\r\n") * 64
        pending = chunk
        give_up = time.monotonic() + 60
        next_check = 0.0
        while True:
            now = time.monotonic()
            assert now < give_up, "the relay's upstream write never timed out although the upstream does not read"
            if now >= next_check:
                moved = harness.delta(before, env.daemon.metrics(), "mailflow_upstream_errors_total",
                                      upstream="staller")
                if moved:
                    break
                next_check = now + 0.25
            try:
                # A partial send keeps its rest for the next one: the lines must stay 1,000 octets, or the
                # message would be refused as line_too_long (and discarded) instead of stalling the upstream.
                pending = pending[c.sock.send(pending):] or chunk
            except BlockingIOError:
                time.sleep(0.01)
        c.sock.setblocking(True)
        stalled_at = time.monotonic()
        # What the client sent is still in its socket's send queue and the relay's receive queue (megabytes on
        # loopback): the relay reads it on, and each 64 KiB it reads starts the client's block over. Under load
        # that takes seconds, so the client's silence, as the relay sees it, begins when both queues are empty.
        queued = unread(c.sock)
        harness.wait_for(lambda: unread(c.sock) == 0, 30, interval=0.01, what="the relay reading what was sent")
        drained_at = time.monotonic()
        c.sock.settimeout(2 * DATA_BLOCK + 4 * MARGIN)
        got = b""
        try:
            while True:
                part = c.sock.recv(65536)
                if not part:
                    break
                got += part
        except socket.timeout:
            pytest.fail(f"the session was still open {time.monotonic() - drained_at:.1f}s after the relay had "
                        f"read all the client sent; it said {got!r}")
        elapsed = time.monotonic() - drained_at
    finally:
        c.close()
    assert b"421 4.4.2" in got, f"the stalled client must hear 421 4.4.2: {got!r}"
    # The client's block started over when the upstream was dropped (at most a scrape interval ago), and
    # again with every 64 KiB it sent since: one block of silence ends it.
    assert elapsed < DATA_BLOCK + MARGIN, (f"session ended {elapsed:.2f}s after the relay read the last of what "
                                           f"the client sent ({queued} bytes queued when the client stalled, read "
                                           f"{drained_at - stalled_at:.2f}s later)")
    hh.assert_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream="staller", reason="timeout")
    hh.assert_rejected(env.daemon, before, "timeout")
    harness.assert_not_counted(env.daemon, before, settle=0.1)
    hh.wait_sessions_idle(env.daemon)


def unread(sock):
    """Bytes the client wrote on `sock` that the relay has not read yet: the client socket's send queue and the
    relay socket's receive queue, from /proc/net/tcp (tx_queue:rx_queue); 0 once the connection is gone."""
    def key(address):
        host, port = address
        return f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"

    mine, peer = key(sock.getsockname()), key(sock.getpeername())
    total = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            tx, rx = (int(n, 16) for n in fields[4].split(":"))
            if (fields[1], fields[2]) == (mine, peer):
                total += tx
            elif (fields[1], fields[2]) == (peer, mine):
                total += rx
    return total


def tls_client_context(no_ticket):
    ctx = harness.client_tls_context("TLS1.2")
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # a missing close_notify must show
    if no_ticket:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def starttls_session(port, ctx, session=None):
    c = hh.greeted(port)
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = ctx.wrap_socket(c.sock, session=session, suppress_ragged_eofs=False)
    assert c.cmd("EHLO client.example.test")[0] == 250
    return c


def test_close_notify_after_quit_and_session_id_resumption(env):
    """QUIT -> 221, then close_notify: a strict client sees no truncation; and because the TLS session was
    shut down properly, the server keeps it: a TLS1.2 client without tickets resumes by session ID."""
    ctx = tls_client_context(no_ticket=True)
    c = starttls_session(env.ports["tls"], ctx)
    try:
        code, text = c.cmd("QUIT")
        assert code == 221, text
        c.sock.settimeout(5)
        try:
            rest = c.sock.recv(1024)
        except ssl.SSLError as e:
            pytest.fail(f"the relay closed TLS without close_notify: {e}")
        assert rest == b"", f"bytes after 221: {rest!r}"
        first = c.sock.session
    finally:
        c.close()
    assert first is not None
    c = starttls_session(env.ports["tls"], ctx, session=first)
    try:
        assert c.sock.session_reused, "TLS1.2 session-ID resumption did not happen"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()


def test_client_that_never_finishes_its_handshake(env):
    """A client that sends STARTTLS and then only the first bytes of a ClientHello: closed when
    timeouts.tls_handshake (5 s) passes, counted as a handshake failure with reason timeout, and the session is
    gone (sessions_active back to 0)."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["tls"])
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"\x16\x03\x01\x02\x00\x01")  # a record header and the start of a ClientHello, then nothing
        started = time.monotonic()
        assert c.closed_or_error(5 + 2 * MARGIN), "the server kept waiting past timeouts.tls_handshake"
        took = time.monotonic() - started
    finally:
        c.close()
    assert 5 - 0.5 <= took <= 5 + MARGIN, f"closed after {took:.1f}s, timeouts.tls_handshake is 5s"
    hh.assert_counter(env.daemon, before, "mailflow_tls_handshake_failures_total", listener="tls", leg="client",
                      reason="timeout")
    hh.wait_sessions_idle(env.daemon)


def test_greet_pause_hangup_is_not_an_early_talker(env, daemon_factory, sink_factory):
    sink = sink_factory("paused-sink")
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("paused", port, "paused")],
                            upstreams=[hh.plain_upstream("paused", sink.port)], name="paused",
                            limits={"greet_pause": "1s", "drain_timeout": "3s"})
    before = daemon.metrics()
    s = socket.create_connection(("127.0.0.1", port))
    s.close()  # a client that gives up silently during the pause
    # ... or with a reset, as a balancer's health check closes (HAProxy's checks do): no word said either
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(1.5)
    hh.wait_sessions_idle(daemon)
    after = daemon.metrics()
    moved = harness.delta(before, after, "mailflow_rejects_total", reason="early_talker")
    assert not moved, f"a silent hang-up was counted as an early talker: {moved}"
    # A real early talker still is one.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"EHLO too.early.example\r\n")
    got, _ = hh.read_all(s, wait=3)
    s.close()
    assert got.startswith(b"554 "), got
    hh.assert_rejected(daemon, after, "early_talker")


def test_listener_renamed_on_the_same_address_reloads(env, daemon_factory, sink_factory):
    sink = sink_factory("rename-sink")
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("before", port, "up")],
                            upstreams=[hh.plain_upstream("up", sink.port)], name="rename")
    base = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
    daemon.config["listeners"] = [hh.listener("after", port, "up")]
    daemon.config_path.write_text(__import__("json").dumps(daemon.config))
    daemon.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total",
                                           result="success") >= base + 1, 10, what="the reload to succeed")
    assert "Address already in use" not in daemon.stderr()
    r = harness.swaks(port)
    assert r.rc == 0, str(r)
    # Sessions count when they end, a moment after swaks has its 221.
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_sessions_total", listener="after",
                                           leg="client") >= 1, 5,
                     what="sessions on the renamed listener to count under its new name")


def test_session_log_keeps_whole_connector_names(env):
    """Two transactions, "partner-contoso" then "partner": the log line names both (a substring test hid
    the second)."""
    c = hh.greeted(env.ports["good"])
    try:
        for sender in ("a@contoso.example", "b@fabrikam.example"):
            code, text = hh.transaction(c, hh.message("two connectors"), sender=sender)
            assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    hh.wait_sessions_idle(env.daemon)
    lines = [line for line in env.daemon.stderr().splitlines() if "partner-contoso" in line and "session" in line]
    assert lines, "no session line with the connectors"
    assert re.search(r"connector=\"?partner-contoso,partner\"?( |$)", lines[-1]), lines[-1]
    # issue #17.9: the envelope senders' domains, never their local parts
    assert re.search(r"sender_domains=\"?contoso.example,fabrikam.example\"?( |$)", lines[-1]), lines[-1]
    assert "a@contoso" not in lines[-1] and "b@fabrikam" not in lines[-1]
