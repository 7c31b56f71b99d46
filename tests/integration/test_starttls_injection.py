"""STARTTLS command injection (CVE-2011-0411 class): plaintext pipelined behind STARTTLS in the same write
must be discarded, never executed or answered inside TLS; after STARTTLS the session starts over and needs a
new EHLO."""
import types

import pytest

import harness
import hostile_helpers as hh

MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: after injection\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    port = harness.free_port()
    daemon = daemon_factory(
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "tls": harness.listener_tls(certs), "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}])
    return types.SimpleNamespace(sink=sink, daemon=daemon, port=port)


def open_session(env):
    c = harness.RawSmtp(env.port)
    assert c.reply()[0] == 220
    code, text = c.cmd("EHLO client.example.test")
    assert code == 250 and "STARTTLS" in text, text
    return c


def inject(c, tail):
    c.send(b"STARTTLS\r\n" + tail)
    code, text = c.reply()
    assert code == 220, f"STARTTLS answered {text!r}"
    assert not c.buf, f"the server answered the injected plaintext before the handshake: {c.buf!r}"
    c.starttls("TLS1.2")
    unsolicited = c.pending(1.0)
    assert unsolicited == b"", f"the server answered the injected commands inside TLS: {unsolicited!r}"


def test_injected_rset_not_answered_inside_tls(env):
    c = open_session(env)
    try:
        inject(c, b"RSET\r\n")
        code, text = c.cmd("EHLO client.example.test")
        assert code == 250, text
        assert harness.HOSTNAME in text.splitlines()[0], f"first reply inside TLS is not the EHLO reply: {text!r}"
        assert "STARTTLS" not in text, "STARTTLS offered again inside TLS"
        assert c.cmd("NOOP")[0] == 250
        assert c.pending(0.5) == b"", "stray replies after NOOP"
    finally:
        c.close()


def test_injected_mail_from_not_executed(env):
    """An injected MAIL FROM must not open a transaction inside TLS: RCPT then gets 503."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = open_session(env)
    try:
        inject(c, b"MAIL FROM:<attacker@evil.test>\r\n")
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = c.cmd("RCPT TO:<victim@dest.test>")
        assert code == 503, f"RCPT after an injected MAIL must be 503 (no transaction), got {text!r}"
        # the session is still usable for an honest transaction
        assert hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()
    meta, content = env.sink.wait_messages(n + 1)[-1]
    assert meta["mail_from"] == "s@example.test", meta
    assert harness.split_received(content)[1] == MESSAGE
    harness.assert_counted(env.daemon, before, "internet", "inbound", "TLS1.2")


def test_mail_after_starttls_needs_new_ehlo(env):
    c = open_session(env)
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls("TLS1.3")
        code, text = c.cmd("MAIL FROM:<s@example.test>")
        assert code == 503 and text.startswith("503 5.5.1"), f"MAIL without a new EHLO after STARTTLS: {text!r}"
    finally:
        c.close()


def test_starttls_twice_refused(env):
    c = open_session(env)
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls("TLS1.2")
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = c.cmd("STARTTLS")
        assert code in (503, 554), f"a second STARTTLS must be refused with 503/554, got {text!r}"
    finally:
        c.close()
