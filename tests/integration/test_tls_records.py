"""TLS records that arrive in pieces (as they do on real networks): the client leg's encrypted bytes are sent
a few at a time, so mailflowd sees partial records inside the handshake and inside DATA; the message must
still arrive byte-exact and be counted under TLS1.2 and TLS1.3."""
import socket
import ssl
import time
import types

import pytest

import harness

MESSAGE = (b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: trickled records\r\n\r\n"
           + b"".join(b"line %04d of a message whose TLS records arrive in small pieces\r\n" % i for i in range(300)))


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("sink")
    port = harness.free_port()
    daemon = daemon_factory(
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "tls": harness.listener_tls(certs), "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
        limits={"max_junk_commands": 0})  # 1000 pipelined RSETs fill a TLS record below: junk, every one answered
    return types.SimpleNamespace(daemon=daemon, port=port, sink=sink)


class TrickleTls:
    """TLS over a raw socket through ssl.MemoryBIO; every encrypted flight is sent in `piece`-byte writes."""

    def __init__(self, sock, version, piece):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        self.sock, self.piece = sock, piece
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="mx.test")

    def _send_pending(self):
        data = self.outgoing.read()
        for i in range(0, len(data), self.piece):
            self.sock.sendall(data[i:i + self.piece])
            time.sleep(0.0005)

    def _receive(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.incoming.write(chunk)

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                self._send_pending()
                return
            except ssl.SSLWantReadError:
                self._send_pending()
                self._receive()

    def send(self, data):
        self.obj.write(data)
        self._send_pending()

    def reply(self):
        buf = b""
        while True:
            try:
                buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
                continue
            lines = buf.split(b"\r\n")
            for line in lines[:-1]:
                if len(line) >= 4 and line[3:4] == b" ":
                    return int(line[:3]), buf.decode()

    def cmd(self, line):
        self.send(line.encode() + b"\r\n")
        return self.reply()


@pytest.mark.parametrize("version,label,piece", [(ssl.TLSVersion.TLSv1_2, "TLS1.2", 7),
                                                 (ssl.TLSVersion.TLSv1_3, "TLS1.3", 3)])
def test_partial_records_relay_byte_exact(env, version, label, piece):
    before = env.daemon.metrics()
    n = env.sink.count()
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=20)
    try:
        plain = harness.RawSmtp.__new__(harness.RawSmtp)  # reuse the reply parser on the plaintext part
        plain.sock, plain.buf, plain.transcript = sock, b"", []
        assert plain.reply()[0] == 220
        assert plain.cmd("EHLO trickle.example.test")[0] == 250
        assert plain.cmd("STARTTLS")[0] == 220
        tls = TrickleTls(sock, version, piece)
        tls.handshake()
        assert tls.cmd("EHLO trickle.example.test")[0] == 250
        assert tls.cmd("MAIL FROM:<s@example.test>")[0] == 250
        assert tls.cmd("RCPT TO:<r@dest.test>")[0] == 250
        assert tls.cmd("DATA")[0] == 354
        tls.send(harness.dot_stuff(MESSAGE) + b".\r\n")
        code, text = tls.reply()
        assert code == 250, text
        tls.cmd("QUIT")
    finally:
        sock.close()
    _, content = env.sink.wait_messages(n + 1)[-1]
    received, rest = harness.split_received(content)
    assert rest == MESSAGE
    assert label.encode() in received[0]
    harness.assert_counted(env.daemon, before, "internet", "inbound", label)


def test_commands_left_inside_tls_are_answered(env):
    """More pipelined commands in one TLS record than one read takes (4 KiB): the rest stays inside OpenSSL, where
    a session waiting idle for the socket to become readable would not see it. Every command must be answered
    without further input from the client."""
    count = 1000  # 6,000 bytes of RSETs (which RFC 2920 allows in a group, unlike NOOP)
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        plain = harness.RawSmtp.__new__(harness.RawSmtp)
        plain.sock, plain.buf, plain.transcript = sock, b"", []
        assert plain.reply()[0] == 220
        assert plain.cmd("EHLO pending.example.test")[0] == 250
        assert plain.cmd("STARTTLS")[0] == 220
        tls = TrickleTls(sock, ssl.TLSVersion.TLSv1_3, 1 << 20)  # each flight in one write
        tls.handshake()
        assert tls.cmd("EHLO pending.example.test")[0] == 250
        tls.send(b"RSET\r\n" * count)
        answered = b""
        while answered.count(b"\r\n") < count:  # a session stuck in its idle wait times the socket out here
            try:
                answered += tls.obj.read(65536)
            except ssl.SSLWantReadError:
                tls._receive()
        assert answered.count(b"\r\n") == count
        assert answered.count(b"250 ") == count, answered[:200]
    finally:
        sock.close()
