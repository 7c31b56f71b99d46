"""Both legs of a session send with TCP_NODELAY: a relay answers in small writes, and with Nagle's algorithm a
reply written while an earlier one is unacknowledged waits for the peer's delayed ACK (about 40 ms on Linux).
The option is read on the daemon's own sockets, taken with pidfd_getfd(2) (Linux 5.6; needs ptrace rights over
the daemon, which the test's own child is). A listening socket that mailflowd binds passes the option to every
connection; one that systemd passes may hold connections that queued before mailflowd started, which
have the option the socket had then (none, without NoDelay=yes in the unit)."""
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh

SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
libc = ctypes.CDLL(None, use_errno=True)


def daemon_socket(pid, peer):
    """A duplicate of the daemon's TCP socket connected to `peer` (host, port), or None."""
    pidfd = libc.syscall(SYS_pidfd_open, pid, 0)
    if pidfd < 0:
        pytest.skip(f"pidfd_open: {os.strerror(ctypes.get_errno())}")
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            sock = socket.socket(fileno=fd)
            try:
                if sock.type != socket.SOCK_STREAM:
                    raise OSError
                if sock.getpeername()[:2] == peer:
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    return None


def test_both_legs_have_tcp_nodelay(daemon_factory, sink_factory):
    sink = sink_factory("nodelay-sink")
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("inbound", port, "sink")],
                            upstreams=[hh.plain_upstream("sink", sink.port)], name="nodelay")
    client = harness.RawSmtp(port)
    try:
        assert client.reply()[0] == 220
        assert client.cmd("EHLO client.example")[0] == 250
        assert client.cmd("MAIL FROM:<sender@example.test>")[0] == 250
        assert client.cmd("RCPT TO:<rcpt@dest.test>")[0] == 250  # the upstream leg is open now
        client_leg = daemon_socket(daemon.proc.pid, client.sock.getsockname()[:2])
        upstream_leg = daemon_socket(daemon.proc.pid, ("127.0.0.1", sink.port))
        assert client_leg is not None, "no socket of the daemon's is connected to the client"
        assert upstream_leg is not None, "no socket of the daemon's is connected to the upstream"
        with client_leg, upstream_leg:
            assert client_leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, "client leg"
            assert upstream_leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, "upstream leg"
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()


def assert_client_leg_nodelay(daemon, port, host, which):
    client = harness.RawSmtp(port, host=host)
    try:
        assert client.reply()[0] == 220, which
        leg = daemon_socket(daemon.proc.pid, client.sock.getsockname()[:2])
        assert leg is not None, f"{which}: no socket of the daemon's is connected to the client"
        with leg:
            assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, which
    finally:
        client.close()


def test_an_ipv6_listener_and_one_a_reload_added_pass_tcp_nodelay(daemon_factory, sink_factory):
    """The option is set where mailflowd binds a listening socket, before listen(): on an IPv6 socket as on an
    IPv4 one, and on a listener that a reload opens as on one opened at start."""
    sink = sink_factory("nodelay-v6")
    v4, v6 = harness.free_port(), harness.free_port("::1")
    daemon = daemon_factory(listeners=[{"name": "v6", "address": f"[::1]:{v6}", "direction": "inbound",
                                        "upstream": "sink"}],
                            upstreams=[hh.plain_upstream("sink", sink.port)], name="nodelay-v6")
    assert_client_leg_nodelay(daemon, v6, "::1", "an IPv6 listener")
    daemon.config["listeners"].append(hh.listener("added", v4, "sink"))
    daemon.config_path.write_text(json.dumps(daemon.config, indent=2) + "\n")
    daemon.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: " reloaded " in daemon.stderr(), 10, what="the reload")
    assert_client_leg_nodelay(daemon, v4, "127.0.0.1", "a listener a reload added")


def test_a_connection_queued_on_a_socket_systemd_passed_has_tcp_nodelay(tmp_path, sink_factory, mailflowd_bin):
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.fail("systemd-socket-activate is not installed (package systemd, deploy/dev/deps.sh test)",
                    pytrace=False)
    sink = sink_factory("nodelay-store")
    port = harness.free_port()
    state = tmp_path / "state"
    state.mkdir()
    cfg = harness.default_config(
        state, harness.free_port(),
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}])
    config = tmp_path / "mailflowd.yaml"
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    stderr = tmp_path / "mailflowd.stderr"
    # The tool listens without NoDelay, and execs mailflowd on the first connection: that one has queued.
    proc = subprocess.Popen([tool, "-l", f"127.0.0.1:{port}", mailflowd_bin, "--config", str(config)],
                            stdout=open(stderr, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        harness.wait_for(lambda: "Listening on" in stderr.read_text() or proc.poll() is not None, 10,
                         what="systemd-socket-activate to listen")
        first = harness.RawSmtp(port)
        second = harness.RawSmtp(port)
        for client, which in ((first, "the connection that queued"), (second, "a later connection")):
            assert client.reply()[0] == 220, harness.tail(stderr)
            leg = daemon_socket(proc.pid, client.sock.getsockname()[:2])
            assert leg is not None, f"{which}: no socket of the daemon's is connected to it"
            with leg:
                assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, which
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, harness.tail(stderr)


def test_a_socket_systemd_passed_with_tcp_nodelay_makes_no_setsockopt_per_session(tmp_path, sink_factory,
                                                                                  mailflowd_bin):
    """mailflowd.socket has NoDelay=yes: systemd sets TCP_NODELAY on the listening socket (right after listen()),
    and Linux gives it to each connection as its handshake completes, those that queued before mailflowd started
    included. So the sessions on such a socket set nothing: they did, a setsockopt() each. Counted by strace
    (setsockopt calls with TCP_NODELAY: these sessions open no upstream connection), and the option read on the
    daemon's side of a connection that queued before it started and of a later one."""
    strace = shutil.which("strace")
    if not strace:
        pytest.fail("strace is not installed (deploy/dev/deps.sh test)", pytrace=False)
    sink = sink_factory("nodelay-passed")
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(64)
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as systemd's NoDelay=yes: after listen()
    port = listening.getsockname()[1]
    state = tmp_path / "state"
    state.mkdir()
    cfg = harness.default_config(
        state, harness.free_port(),
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}])
    config = tmp_path / "mailflowd.yaml"
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    stderr = tmp_path / "mailflowd.stderr"
    trace = tmp_path / "strace.out"
    # Socket activation as systemd does it: the socket as fd 3, LISTEN_FDS=1, LISTEN_PID the daemon's own.
    activate = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
                "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])")
    # The asan preset's LeakSanitizer cannot run under ptrace: it failed the exit (status 1) under strace.
    env = dict(os.environ, ASAN_OPTIONS=":".join(filter(None, [os.environ.get("ASAN_OPTIONS"), "detect_leaks=0"])))
    queued = harness.RawSmtp(port)  # connected before mailflowd runs
    proc = subprocess.Popen([strace, "-f", "-qq", "-e", "trace=setsockopt", "-o", str(trace), "/usr/bin/python3",
                             "-c", activate, str(listening.fileno()), mailflowd_bin, "--config", str(config)],
                            pass_fds=[listening.fileno()], stdout=open(stderr, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    listening.close()
    sessions = 5
    daemon = None
    try:
        harness.wait_for(lambda: " started " in stderr.read_text() or proc.poll() is not None, 20,
                         what="mailflowd to start")
        daemon = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])  # strace's child
        clients = [queued] + [harness.RawSmtp(port) for _ in range(sessions - 1)]
        for i, client in enumerate(clients):
            assert client.reply()[0] == 220, harness.tail(stderr)
            if i < 2:
                which = "the connection that queued" if i == 0 else "a later connection"
                leg = daemon_socket(daemon, client.sock.getsockname()[:2])
                assert leg is not None, f"{which}: no socket of the daemon's is connected to it"
                with leg:
                    assert leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, which
            assert client.cmd("QUIT")[0] == 221
            client.close()
    finally:
        if daemon:
            os.kill(daemon, signal.SIGTERM)
        else:
            proc.kill()
        assert proc.wait(15) == 0, harness.tail(stderr)
    calls = [line for line in trace.read_text().splitlines() if "TCP_NODELAY" in line]
    assert calls == [], f"{len(calls)} setsockopt(TCP_NODELAY) for {sessions} sessions: {calls[:3]}"
