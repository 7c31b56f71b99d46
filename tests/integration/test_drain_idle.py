"""SIGTERM while sessions wait for their next command: every idle session hears 421 4.3.2 at once (not after
limits.drain_timeout, when it is cut without a word), plaintext or TLS, also when the client has sent part of
a command or part of a TLS record; the daemon then exits 0 without waiting for the drain timeout."""
import signal
import socket
import ssl
import subprocess
import time

import pytest

import harness
import hostile_helpers as hh
from test_tls_records import TrickleTls

DRAIN_TIMEOUT = 10  # s: a session cut by the drain timeout is told apart from one told at once


@pytest.fixture(scope="module")
def sink(sink_factory):
    return sink_factory("store")


def start(daemon_factory, certs, sink, name):
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store", certs=certs)],
                       upstreams=[hh.plain_upstream("store", sink.port)], name=name,
                       limits={"drain_timeout": f"{DRAIN_TIMEOUT}s"})
    return d, port


def tls_session(port):
    """A session past STARTTLS and a second EHLO: (socket, TrickleTls)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DRAIN_TIMEOUT + 5)
    plain = harness.RawSmtp.__new__(harness.RawSmtp)  # the reply parser on the plaintext part
    plain.sock, plain.buf, plain.transcript = sock, b"", []
    assert plain.reply()[0] == 220
    assert plain.cmd("EHLO drain.example.test")[0] == 250
    assert plain.cmd("STARTTLS")[0] == 220
    tls = TrickleTls(sock, ssl.TLSVersion.TLSv1_3, 1 << 20)
    tls.handshake()
    assert tls.cmd("EHLO drain.example.test")[0] == 250
    return sock, tls


def exited(d, at):
    """The seconds from `at` (the SIGTERM) until mailflowd exited (0 asserted)."""
    try:
        d.proc.wait(DRAIN_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        pytest.fail("mailflowd did not exit after SIGTERM")
    assert d.proc.returncode == 0, f"exit code {d.proc.returncode}"
    return time.monotonic() - at


def assert_quick(took):
    assert took < DRAIN_TIMEOUT - 3, (f"exit {took:.1f}s after SIGTERM: an idle session was left to the drain timeout "
                                      f"({DRAIN_TIMEOUT}s) instead of being told 421 at once")


@pytest.mark.parametrize("partial", [b"", b"NO"], ids=["nothing", "part_of_a_line"])
def test_idle_plaintext_session_told_421(daemon_factory, certs, sink, partial):
    d, port = start(daemon_factory, certs, sink, f"drain-plain-{len(partial)}")
    c = hh.greeted(port)
    try:
        if partial:
            c.send(partial)
            time.sleep(0.3)  # read by the session, which waits again for the rest of the line
        at = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code, text = c.reply()
        assert code == 421 and text.startswith("421 4.3.2"), text
        assert_quick(time.monotonic() - at)
    finally:
        c.close()
    assert_quick(exited(d, at))


@pytest.mark.parametrize("partial", ["none", "line", "record"])
def test_idle_tls_session_told_421(daemon_factory, certs, sink, partial):
    """`record`: the client sent all of a TLS record but its last byte; the session has read the part and waits
    for the rest of it, as idle as one that got nothing."""
    d, port = start(daemon_factory, certs, sink, f"drain-tls-{partial}")
    sock, tls = tls_session(port)
    try:
        if partial == "line":
            tls.send(b"NO")
        elif partial == "record":
            tls.obj.write(b"NOOP\r\n")
            record = tls.outgoing.read()
            sock.sendall(record[:-1])
        time.sleep(0.3)
        at = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            code, text = tls.reply()
        except (ConnectionError, ssl.SSLError) as e:
            pytest.fail(f"closed without a reply after {time.monotonic() - at:.1f}s: {e!r}")
        assert code == 421 and text.startswith("421 4.3.2"), text
        assert_quick(time.monotonic() - at)
    finally:
        sock.close()
    assert_quick(exited(d, at))
