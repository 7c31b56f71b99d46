"""Socket activation as mailflowd.socket does it, through systemd's own tool (systemd-socket-activate passes
the sockets as LISTEN_FDS and execs mailflowd on the first connection): a listener whose address equals an
inherited socket serves on it (mailflowd could not bind that address itself, the socket holds it), and an
inherited socket that no listener's address equals is named in the log at start, since no one would ever
answer the clients that connect to it. A reload that drops the listener of an inherited socket keeps the socket
(systemd keeps it listening too) and names it the same way; a later reload that brings the listener back
takes it again, and serves the clients that queued on it meanwhile; a reload that is refused after it took an
inherited socket for a new listener leaves that socket open too. The sockets no listener uses are counted in the
gauge mailflow_sockets_unused too (the log line comes once; an alert needs a series)."""
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

import harness


def sockets_unused(config_path):
    """mailflow_sockets_unused of the daemon that runs `config_path` (read for its http.address)."""
    http = json.loads(Path(config_path).read_text())["http"]["address"]
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as response:
        metrics = harness.parse_metrics(response.read().decode())
    found = harness.series(metrics, "mailflow_sockets_unused")
    assert len(found) == 1, f"mailflow_sockets_unused: {found}"
    return next(iter(found.values()))


@pytest.fixture(scope="module")
def sink(sink_factory):
    return sink_factory("store")


@pytest.fixture
def activated(tmp_path, sink, mailflowd_bin):
    """start(listener_port, extra_ports, extra_listen, host, upstream) -> (Popen of mailflowd, its stderr path,
    sink), under systemd-socket-activate (extra_listen: more -l addresses, e.g. a unix socket's path; host: the
    listener's and its socket's address; upstream: the store's address instead of the sink's)."""
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.fail("systemd-socket-activate is not installed (package systemd, deploy/dev/deps.sh test)",
                    pytrace=False)
    procs = []

    def start(listener_port, extra_ports=(), extra_listen=(), host="127.0.0.1", upstream=None):
        state = tmp_path / "state"
        state.mkdir()
        cfg = harness.default_config(
            state, harness.free_port(),
            listeners=[{"name": "inbound", "address": f"{host}:{listener_port}", "direction": "inbound",
                        "upstream": "store"}],
            upstreams=[{"name": "store", "address": upstream or f"127.0.0.1:{sink.port}", "tls": "none",
                        "xclient": "off"}])
        config = tmp_path / "mailflowd.yaml"
        config.write_text(json.dumps(cfg, indent=2) + "\n")
        stderr = tmp_path / "mailflowd.stderr"
        argv = [tool, "-l", f"{host}:{listener_port}"]
        argv += [a for p in extra_ports for a in ("-l", f"127.0.0.1:{p}")]
        argv += [a for address in extra_listen for a in ("-l", str(address))]
        argv += [mailflowd_bin, "--config", str(config)]
        proc = subprocess.Popen(argv, stdout=open(stderr, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        # The tool listens first, then execs mailflowd (same pid) on the first connection.
        harness.wait_for(lambda: "Listening on" in stderr.read_text() or proc.poll() is not None, 10,
                         what="systemd-socket-activate to listen")
        assert proc.poll() is None, harness.tail(stderr)
        return proc, stderr, sink

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_listener_serves_on_its_inherited_socket(activated):
    port = harness.free_port()
    proc, stderr, sink = activated(port)
    before = sink.count()
    res = harness.swaks(port)  # this connection makes the tool exec mailflowd, which accepts it
    assert res.rc == 0, f"{res}\n{harness.tail(stderr)}"
    sink.wait_messages(before + 1)
    assert proc.poll() is None, harness.tail(stderr)
    assert "startup_failed" not in stderr.read_text(), harness.tail(stderr)


def test_inherited_socket_without_listener_is_logged_at_start(activated):
    port, stray = harness.free_port(), harness.free_port()
    proc, stderr, sink = activated(port, extra_ports=(stray,))
    before = sink.count()
    res = harness.swaks(port)
    assert res.rc == 0, f"{res}\n{harness.tail(stderr)}"
    harness.wait_for(lambda: " started " in stderr.read_text(), 10, what="mailflowd started")
    lines = [line for line in stderr.read_text().splitlines() if "socket_unused" in line]
    assert len(lines) == 1, f"expected one socket_unused line naming 127.0.0.1:{stray}\n{harness.tail(stderr)}"
    assert f"address=127.0.0.1:{stray}" in lines[0] and " error " in lines[0], lines[0]
    assert f"127.0.0.1:{port}" not in lines[0], lines[0]
    assert sockets_unused(stderr.parent / "mailflowd.yaml") == 1
    # The listener on the other inherited socket is not disturbed by it.
    assert harness.swaks(port).rc == 0
    sink.wait_messages(before + 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, harness.tail(stderr)


def test_inherited_unix_socket_is_logged_at_start(activated, tmp_path):
    """No listener can take a unix socket (ListenStream=/path): named at start like an unused TCP socket."""
    port = harness.free_port()
    # A unix socket's path has at most 107 bytes: not under tmp_path, which a long checkout path makes longer.
    short = Path(tempfile.mkdtemp(prefix="mfd-", dir="/tmp"))
    path = short / "smtp.sock"
    try:
        proc, stderr, sink = activated(port, extra_listen=(path,))
        assert harness.swaks(port).rc == 0, harness.tail(stderr)
        harness.wait_for(lambda: " started " in stderr.read_text(), 10, what="mailflowd started")
        lines = [line for line in stderr.read_text().splitlines() if "socket_unused" in line]
        assert len(lines) == 1 and str(path) in lines[0] and " error " in lines[0], \
            f"expected one socket_unused line naming {path}\n{harness.tail(stderr)}"
        assert sockets_unused(stderr.parent / "mailflowd.yaml") == 1
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_reload_without_the_listener_keeps_its_inherited_socket(activated, tmp_path):
    port, other = harness.free_port(), harness.free_port()
    proc, stderr, sink = activated(port)
    before = sink.count()
    assert harness.swaks(port).rc == 0, harness.tail(stderr)  # execs mailflowd, which takes the socket
    harness.wait_for(lambda: " started " in stderr.read_text(), 10, what="mailflowd started")
    config = tmp_path / "mailflowd.yaml"
    assert sockets_unused(config) == 0
    with_listener = json.loads(config.read_text())
    without = json.loads(config.read_text())
    without["listeners"] = [dict(without["listeners"][0], name="other", address=f"127.0.0.1:{other}")]

    def reload(cfg, n):
        config.write_text(json.dumps(cfg, indent=2) + "\n")
        proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: stderr.read_text().count(" reloaded ") >= n, 10, what=f"reload {n}")
        assert "reload_refused" not in stderr.read_text(), harness.tail(stderr)

    reload(without, 1)
    after_reload = stderr.read_text().split(" reload config=", 1)[1]
    lines = [line for line in after_reload.splitlines() if "socket_unused" in line]
    assert len(lines) == 1 and f"address=127.0.0.1:{port}" in lines[0], \
        f"the reload that dropped the listener of 127.0.0.1:{port} did not name its socket\n{harness.tail(stderr)}"
    assert sockets_unused(config) == 1
    assert harness.swaks(other).rc == 0, harness.tail(stderr)
    # Still listening (under systemd the socket unit holds it open whatever mailflowd does): a client connects
    # and waits, unanswered, for the listener to come back.
    waiting = harness.RawSmtp(port)
    try:
        assert waiting.pending(0.5) == b"", "a banner on a socket no listener uses"
        reload(with_listener, 2)
        code, text = waiting.reply()
        assert code == 220, text
        assert sockets_unused(config) == 0, "the listener took its socket back"
        assert waiting.cmd("QUIT")[0] == 221
    finally:
        waiting.close()
    assert harness.swaks(port).rc == 0, harness.tail(stderr)
    sink.wait_messages(before + 3)
    assert proc.poll() is None, harness.tail(stderr)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, harness.tail(stderr)


def test_refused_reload_keeps_the_inherited_socket_it_took(activated, tmp_path):
    port, stray = harness.free_port(), harness.free_port()
    proc, stderr, sink = activated(port, extra_ports=(stray,))
    assert harness.swaks(port).rc == 0, harness.tail(stderr)
    harness.wait_for(lambda: " started " in stderr.read_text(), 10, what="mailflowd started")
    config = tmp_path / "mailflowd.yaml"
    cfg = json.loads(config.read_text())
    inbound = cfg["listeners"][0]
    # The listener for the unused socket takes it, then the next listener cannot bind: the reload is refused.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg["listeners"] += [dict(inbound, name="stray", address=f"127.0.0.1:{stray}"),
                         dict(inbound, name="busy", address=f"127.0.0.1:{busy.getsockname()[1]}")]
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: "reload_refused" in stderr.read_text(), 10, what="the reload to be refused")
    busy.close()
    try:
        waiting = harness.RawSmtp(stray)  # refused once mailflowd has closed the socket systemd passed
    except ConnectionRefusedError:
        pytest.fail(f"the refused reload closed the inherited socket 127.0.0.1:{stray}\n{harness.tail(stderr)}",
                    pytrace=False)
    waiting.close()
    assert harness.swaks(port).rc == 0, harness.tail(stderr)


def test_dual_stack_inherited_socket_for_an_ipv6_wildcard_listener_is_refused(activated):
    """A "[::]" listener takes IPv6 clients only (IPV6_V6ONLY, docs/configuration.md), and the upstream loop checks
    rely on it: an IPv4 upstream on its port is no loop of mailflowd's. A socket that systemd passes for "[::]:PORT"
    without BindIPv6Only=ipv6-only (BindIPv6Only=both, or default with net.ipv6.bindv6only=0, as
    systemd-socket-activate binds it here) takes IPv4 clients too: mailflowd served them on it, and an upstream
    127.0.0.1:PORT passed every check and got each RCPT back into mailflowd, session inside session. Such a socket
    is refused at start now (startup_failed names the socket and BindIPv6Only=ipv6-only), and it is left to
    systemd: no client, IPv4 or IPv6, is served on it."""
    port = harness.free_port()
    proc, stderr, sink = activated(port, host="[::]", upstream=f"127.0.0.1:{port}")
    try:
        c = harness.RawSmtp(port, host="127.0.0.1")  # makes the tool exec mailflowd
    except ConnectionRefusedError:
        pytest.fail("systemd-socket-activate did not take the IPv4 connection on [::]", pytrace=False)
    try:
        c.sock.settimeout(10)
        try:
            banner = c.sock.recv(512)
        except OSError:
            banner = b""
        assert not banner.startswith(b"220"), f"an IPv4 client was served on [::]:{port}: {banner!r}"
    finally:
        c.close()
    assert proc.wait(15) != 0, harness.tail(stderr)
    text = stderr.read_text()
    assert "startup_failed" in text and f"[::]:{port}" in text and "BindIPv6Only=ipv6-only" in text, \
        harness.tail(stderr)
