"""The end of a session: the closing reply (221 to QUIT, the 421 of max_bad_commands) that a client does not read
is written within the 5 s goodbye limit, not timeouts.command; the session ends with the result it had, and no
timeout is counted for it."""
import socket
import time
import types

import pytest

import harness
import hostile_helpers as hh

COMMAND_TIMEOUT = 60  # far beyond the goodbye limit (5 s): a session that waits for it is plainly seen
# Segments of this size: the relay's send buffer is sized by them (a loopback MSS of 64 kB gives it megabytes), by
# 2 kB per segment up to about 1400 octets; the client's commands go in one segment (below). 1400: 70 RCPTs and
# 350 kB of replies, about 80 kB of which reach the client (536: 24 RCPTs, 125 kB, and 90 kB too close to it).
MSS = 1400
# Ten lines of 500 octets: the longest reply the relay writes (proto/reply.cpp), 5 kB for a RCPT command
# of 19 octets.
LONG_OK = b"".join(b"250-" + b"x" * 496 + b"\r\n" for _ in range(9)) + b"250 2.1.5 " + b"y" * 490 + b"\r\n"


def long_replies(conn):
    """An upstream that accepts every recipient with the longest reply the relay passes on."""
    def rcpt(_line):
        conn.send(LONG_OK)
        return False

    conn.serve({b"RCPT": rcpt})


@pytest.fixture(scope="module")
def env(daemon_factory):
    upstream = hh.FakeUpstream("long", long_replies)
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("inbound", port, "long")],
                            upstreams=[hh.plain_upstream("long", upstream.port)], name="end",
                            limits={"drain_timeout": "3s", "max_bad_commands": 1},
                            timeouts={"command": f"{COMMAND_TIMEOUT}s", "upstream_connect": "5s",
                                      "tls_handshake": "10s"})
    yield types.SimpleNamespace(daemon=daemon, port=port, upstream=upstream)
    upstream.stop()


def session_lines(daemon, client_port):
    text = daemon.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if " session " in line and f"client=127.0.0.1:{client_port} " in line]


@pytest.mark.parametrize("last,result", [("QUIT", "quit"), ("XYZZY", "too_many_bad_commands")])
def test_a_closing_reply_nobody_reads_gets_the_goodbye_limit(env, last, result):
    # A client with a small receive window pipelines a transaction's MAIL and RCPTs and then the command that ends
    # the session (QUIT; an unknown command, the max_bad_commands-th), and reads nothing more: the 350 kB of
    # replies and the closing one are still being written when the session ends.
    before = env.daemon.metrics()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", env.port))
    client_port = sock.getsockname()[1]
    c = harness.RawSmtp.__new__(harness.RawSmtp)
    c.sock, c.buf, c.transcript = sock, b"", []
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO unread.example.test")[0] == 250
        # In one segment, so that the relay reads it at once: had it read a part, the replies to that part
        # would wait for the client at the reply deadline (timeouts.command), before the session could end.
        mail, rcpt, end = b"MAIL FROM:<s@e.test>\r\n", b"RCPT TO:<r@d.test>\r\n", last.encode() + b"\r\n"
        batch = mail + rcpt * ((MSS - 40 - len(mail) - len(end)) // len(rcpt)) + end  # 40: TCP options
        c.sock.sendall(batch)
        sent = time.monotonic()
        harness.wait_for(lambda: session_lines(env.daemon, client_port), 20,
                         what=f"the session's end within the goodbye limit (timeouts.command is {COMMAND_TIMEOUT}s)")
        took = time.monotonic() - sent
    finally:
        c.close()
    line = session_lines(env.daemon, client_port)[0]
    assert f" result={result} " in line, line
    # It waited for the client (the replies did not fit), then gave up at the goodbye limit.
    assert 4 < took < 12, f"the session ended {took:.1f}s after the commands"
    after = env.daemon.metrics()
    assert not harness.delta(before, after, "mailflow_rejects_total", reason="timeout"), \
        "a goodbye nobody read counted as a timeout"
