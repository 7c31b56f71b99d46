"""Both legs of a session send with TCP_NODELAY: a relay answers in small writes, and with Nagle's algorithm a
reply written while an earlier one is unacknowledged waits for the peer's delayed ACK (about 40 ms on Linux).
The option is read on the daemon's own sockets, taken with pidfd_getfd(2) (Linux 5.6; needs ptrace rights over
the daemon, which the test's own child is)."""
import ctypes
import os
import socket

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


def test_both_legs_have_tcp_nodelay(daemon_factory, workdir):
    sink = harness.Sink(workdir)
    sink.start()
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
        sink.stop()
