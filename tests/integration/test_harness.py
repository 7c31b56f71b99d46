"""The harness itself, without mailflowd: swaks / s_client / raw sockets straight to the sink.
If these fail, the other integration tests cannot be trusted."""
import subprocess

import pytest

import harness

MESSAGE = (b"From: a@example.test\r\nTo: b@dest.test\r\nSubject: harness\r\n\r\n"
           b"line\r\n.leading dot\r\n..two dots\r\n.\r\n \ttrailing space \r\nend\r\n")


@pytest.fixture(scope="module")
def sink(certs, sink_factory):
    return sink_factory("direct", tls_cert=certs / "sink.pem", tls_key=certs / "sink.key", xclient=True,
                        fail_rcpt=["nobody@dest.test=550 5.1.1 no such user"])


@pytest.mark.parametrize("proto,expected", [(None, "none"), ("tlsv1", "TLSv1"), ("tlsv1_1", "TLSv1.1"),
                                            ("tlsv1_2", "TLSv1.2"), ("tlsv1_3", "TLSv1.3")])
def test_swaks_to_sink_byte_exact(sink, proto, expected):
    n = sink.count()
    r = harness.swaks(sink.port, data=MESSAGE, tls=proto)
    assert r.rc == 0, str(r)
    meta, content = sink.wait_messages(n + 1)[-1]
    assert content == MESSAGE
    assert meta["tls_version"] == expected
    assert meta["rcpt_tos"] == ["rcpt@dest.test"]


def test_sink_fail_rcpt_text(sink):
    r = harness.swaks(sink.port, to="nobody@dest.test")
    assert "550 5.1.1 no such user" in r.final_replies(), str(r)


def test_s_client_drives_starttls(sink):
    n = sink.count()
    c = harness.SClient(sink.port, "-tls1_2")
    try:
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<r@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        for line in ("Subject: s_client", "", "Quick Reply line", ".."):
            c.send_line(line)
        assert c.cmd(".")[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()
    meta, content = sink.wait_messages(n + 1)[-1]
    assert content == b"Subject: s_client\r\n\r\nQuick Reply line\r\n.\r\n"
    assert meta["tls_version"] == "TLSv1.2"


def test_raw_client_starttls_and_xclient(sink):
    n = sink.count()
    c = harness.RawSmtp(sink.port)
    try:
        assert c.reply()[0] == 220
        code, text = c.cmd("EHLO relay.test")
        assert code == 250 and "XCLIENT" in text and "STARTTLS" in text
        assert c.cmd("STARTTLS")[0] == 220
        assert c.starttls("TLS1.1") == "TLSv1.1"
        assert c.cmd("EHLO relay.test")[0] == 250
        assert c.cmd("XCLIENT ADDR=127.0.0.2 PORT=4444 HELO=client.example.test PROTO=ESMTP")[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<r@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert c.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
    finally:
        c.close()
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["xclient"] == {"ADDR": "127.0.0.2", "PORT": "4444", "HELO": "client.example.test", "PROTO": "ESMTP"}
    assert meta["tls_version"] == "TLSv1.1"


def test_swaks_local_interface(sink):
    n = sink.count()
    r = harness.swaks(sink.port, local="127.0.0.2")
    assert r.rc == 0, str(r)
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["peer"][0] == "127.0.0.2"


def test_parse_metrics():
    text = ('# HELP x y\n# TYPE mailflow_messages_total counter\n'
            'mailflow_messages_total{connector="a",direction="inbound",tls_version="TLS1.0"} 3\n'
            'mailflow_messages_total{connector="a\\"b",direction="inbound",tls_version="none"} 1 1700000000\n'
            'process_open_fds 12\n')
    m = harness.parse_metrics(text)
    assert harness.value(m, "mailflow_messages_total", connector="a") == 3
    assert harness.value(m, "mailflow_messages_total", connector='a"b', tls_version="none") == 1
    assert harness.value(m, "process_open_fds") == 12
    after = dict(m)
    key = ("mailflow_messages_total", frozenset({"connector": "a", "direction": "inbound",
                                                 "tls_version": "TLS1.0"}.items()))
    after[key] += 1
    assert harness.delta(m, after, "mailflow_messages_total") == {tuple(sorted(key[1])): 1}


def test_split_received():
    hdr = b"Received: from x (x [127.0.0.1])\r\n\tby mx.test with ESMTPS (TLSv1.2 cipher X);\r\n Tue, 1 Jan\r\n"
    headers, rest = harness.split_received(hdr + b"Subject: s\r\n\r\nb\r\n")
    assert headers == [hdr] and rest == b"Subject: s\r\n\r\nb\r\n"
    assert harness.tls_mentions(hdr) == ["TLS1.2"]


def test_injection_detector_catches_a_vulnerable_server(certs):
    """A server that executes plaintext pipelined behind STARTTLS inside TLS must fail the injection check
    used by test_starttls_injection (so that test can fail)."""
    import socket
    import ssl
    import threading

    import test_starttls_injection as inj

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b"220 vulnerable ESMTP\r\n")
        data = b""
        while b"STARTTLS\r\n" not in data:
            data += conn.recv(4096)
            if data.startswith(b"EHLO"):
                conn.sendall(b"250-vulnerable\r\n250 STARTTLS\r\n")
                data = b""
        queued = data.split(b"STARTTLS\r\n", 1)[1]  # the bug: kept across the handshake
        conn.sendall(b"220 go ahead\r\n")
        tls = ctx.wrap_socket(conn, server_side=True)
        if queued:
            tls.sendall(b"250 2.0.0 reset\r\n")
        try:
            tls.recv(4096)
        except OSError:
            pass
        tls.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = harness.RawSmtp(port)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        with pytest.raises(AssertionError, match="inside TLS"):
            inj.inject(c, b"RSET\r\n")
    finally:
        c.close()
        listener.close()
        t.join(5)


def test_free_port_never_hands_one_port_to_two_processes():
    """ctest runs two test files at once, each in a pytest process of its own: a port that one of them picked and
    has not bound yet (its daemon is still starting) is still bindable, and must not be handed to the other."""
    picks = 400  # of some 22,000 ports: two processes drawing independently would meet on about 7 of them
    pick = (f"import sys; sys.path.insert(0, {str(harness.SINK.parent)!r}); from free_port import free_port; "
            f"print(*(free_port() for _ in range({picks})), flush=True); sys.stdin.read()")
    first, second = (subprocess.Popen([harness.PYTHON, "-c", pick], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True) for _ in range(2))
    try:
        ports = [set(p.stdout.readline().split()) for p in (first, second)]  # both hold theirs until stdin closes
    finally:
        for p in (first, second):
            p.stdin.close()
            p.wait(10)
    assert [len(p) for p in ports] == [picks, picks], ports
    assert not ports[0] & ports[1], f"both processes were handed {sorted(ports[0] & ports[1], key=int)}"
