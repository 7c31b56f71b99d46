"""SIGTERM while sessions wait for their next command: every idle session hears 421 4.3.2 at once (not after
limits.drain_timeout, when it is cut without a word), plaintext or TLS, also when the client has sent part of
a command or part of a TLS record; the daemon then exits 0 without waiting for the drain timeout. Clients still
waiting in the listener's accept queue at the signal are told 421 4.3.2 too."""
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


def test_clients_waiting_in_the_accept_queue_at_sigterm_are_told_421(daemon_factory, certs, sink):
    """Clients whose connection the kernel completed before the SIGTERM (the daemon stopped meanwhile, so that they
    wait in its accept queue) are told 421 4.3.2 and counted, as RFC 5321 section 3.8 asks of a server that shuts
    down. They were reset when the drain closed the listening socket: no reply, no log line, no count. A client that
    the accept loop took before the signal (its banner sent) is told 421 at the drain like any idle session: as the
    daemon resumes, its accept loop takes some of the queue before the signal is read, so many clients (of which
    all but four were reset here)."""
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="drain-queued",
                       limits={"drain_timeout": f"{DRAIN_TIMEOUT}s", "max_sessions_per_ip": 1000})
    clients = d.queue_clients(200, lambda: harness.RawSmtp(port, timeout=DRAIN_TIMEOUT + 5), signal.SIGTERM)
    at = time.monotonic()
    outcomes = []
    try:
        for c in clients:
            try:
                code, text = c.reply()
                if code == 220:  # taken by the accept loop before the signal
                    code, text = c.reply()
                outcomes.append(text[:9])
            except (ConnectionError, OSError) as e:
                outcomes.append(type(e).__name__)
    finally:
        for c in clients:
            c.close()
    assert outcomes == ["421 4.3.2"] * len(clients), f"what each waiting client got: {outcomes}"
    assert_quick(exited(d, at))
    log = d.stderr()
    assert log.count(" result=shutdown") == len(clients), d.log_tail()
    assert " queued_sessions=" in log.split(" draining ", 1)[1], d.log_tail()


def told_421_at_sigterm(d, port):
    """A client whose session has begun (accepted, counted in mailflow_sessions_active, not yet greeted) at the
    SIGTERM is told 421 4.3.2 within 2 s of it (not closed without a reply, not after its greet pause or PROXY
    header deadline). A client still in the accept queue is told 421 too: the SIGTERM waits for the session, or
    the test would check that case instead. Returns when the signal was sent."""
    c = harness.RawSmtp(port, timeout=DRAIN_TIMEOUT + 5)
    try:
        harness.wait_for(lambda: harness.value(d.metrics(), "mailflow_sessions_active", listener="inbound") == 1,
                         30, what="the session to begin")
        at = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            code, text = c.reply()
        except (ConnectionError, OSError) as e:
            pytest.fail(f"closed without a reply after {time.monotonic() - at:.1f}s: {e!r}")
        took = time.monotonic() - at
        assert code == 421 and text.startswith("421 4.3.2"), f"after {took:.1f}s: {text}"
        assert took < 2, f"421 {took:.1f}s after SIGTERM"
    finally:
        c.close()
    return at


def test_a_client_in_the_greet_pause_at_sigterm_is_told_421_at_once(daemon_factory, certs, sink):
    """A client accepted before the SIGTERM and still waiting for its banner (limits.greet_pause, 6 s as Postfix's
    postscreen_greet_wait) waited as an idle one does not: the rest of the pause, then a 220 banner it could not
    use, then the 421 (and a greet_pause longer than drain_timeout cut it without a word). It is told 421 4.3.2 at
    once, with no banner before it, as the clients still in the accept queue are."""
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="drain-greet-pause",
                       limits={"drain_timeout": f"{DRAIN_TIMEOUT}s", "greet_pause": "6s"})
    at = told_421_at_sigterm(d, port)  # accepted, in its greet pause
    assert exited(d, at) < 3
    assert " result=shutdown" in d.stderr(), d.log_tail()


def test_a_trusted_proxy_that_has_not_sent_its_header_at_sigterm_is_told_421_at_once(daemon_factory, sink):
    """A connection from a trusted proxy that is still waiting for its PROXY header at the SIGTERM (the balancer
    connected, the header not yet sent) held the drain for the header's 5 s, was then closed without a word and
    counted as a proxy_timeout refusal, the drain's doing. It is told 421 4.3.2 at once, as an idle session is
    (what the proxy relays to its client), with result=shutdown and no refusal counted."""
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store",
                                              proxy_protocol={"trusted": ["127.0.0.1/32"]})],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="drain-proxy",
                       limits={"drain_timeout": f"{DRAIN_TIMEOUT}s"})
    at = told_421_at_sigterm(d, port)  # accepted, waiting for the PROXY header
    assert exited(d, at) < 3
    log = d.stderr()
    assert " result=shutdown" in log and "proxy_timeout" not in log, d.log_tail()


def test_trusted_proxy_connections_in_the_accept_queue_without_their_header_are_told_421_at_once(daemon_factory,
                                                                                                  sink):
    """Connections from a trusted proxy still in the kernel's accept queue at the SIGTERM, their PROXY header not
    sent yet, are taken by the drain (take_queued) after it notified the sessions it had: nothing cancelled their
    wait for the header, so they held the drain for its 5 s, were then closed without a word and counted as
    proxy_timeout refusals. They are told 421 4.3.2 at once, as the ones the accept loop took before the signal."""
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store",
                                              proxy_protocol={"trusted": ["127.0.0.1/32"]})],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="drain-proxy-queued",
                       limits={"drain_timeout": f"{DRAIN_TIMEOUT}s", "max_sessions_per_ip": 1000})
    clients = d.queue_clients(20, lambda: harness.RawSmtp(port, timeout=DRAIN_TIMEOUT + 5), signal.SIGTERM)
    at = time.monotonic()
    outcomes = []
    try:
        for c in clients:
            try:
                code, text = c.reply()
                outcomes.append((text[:9], time.monotonic() - at))
            except (ConnectionError, OSError) as e:
                outcomes.append((type(e).__name__, time.monotonic() - at))
    finally:
        for c in clients:
            c.close()
    shown = [f"{what} after {took:.1f}s" for what, took in outcomes]
    assert all(what == "421 4.3.2" and took < 2 for what, took in outcomes), f"what each proxy connection got: {shown}"
    assert_quick(exited(d, at))
    log = d.stderr()
    assert log.count(" result=shutdown") == len(clients) and "proxy_timeout" not in log, d.log_tail()
