"""Hostile clients in the command phase (INTERFACE.md "What hostile or broken input gets"): over-long lines,
NUL/8-bit/bare-LF bytes, too many bad commands, commands out of order, too many recipients, a TLS
ClientHello on the plaintext port, garbage or a too-old TLS version after STARTTLS, plaintext pipelined
behind STARTTLS (the counter; the behaviour is test_starttls_injection.py), pipelining that RFC 2920 does not
allow (Postfix's smtpd_forbid_unauth_pipelining). Every case: the exact reply,
mailflow_rejects_total{reason} (or the handshake-failure counter) moved, and a normal message still relays."""
import re
import ssl
import types

import pytest

import harness
import hostile_helpers as hh

MAX_BAD = 3
MAX_RCPTS = 2


def script_refuse_data(conn):
    """An upstream that answers DATA with 451 (and everything else with 250)."""
    conn.send(b"220 fake.test ESMTP fake\r\n")
    while True:
        word = conn.line().split(b" ", 1)[0].upper()
        if word == b"EHLO":
            conn.send(b"250-fake.test\r\n250 PIPELINING\r\n")
        elif word == b"DATA":
            conn.send(b"451 4.3.0 not now\r\n")
        elif word == b"QUIT":
            conn.send(b"221 bye\r\n")
            return
        else:
            conn.send(b"250 ok\r\n")


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    refuser = hh.FakeUpstream("refuser", script_refuse_data)
    port, modern, refusing = harness.free_port(), harness.free_port(), harness.free_port()
    modern_tls = {"certificates": harness.listener_tls(certs)["certificates"], "min_version": "TLS1.2"}
    daemon = daemon_factory(
        listeners=[hh.listener("inbound", port, "store", certs),
                   hh.listener("modern", modern, "store", tls=modern_tls),
                   hh.listener("refusing", refusing, "refuser")],
        upstreams=[hh.plain_upstream("store", sink.port), hh.plain_upstream("refuser", refuser.port)],
        limits={"drain_timeout": "3s", "max_bad_commands": MAX_BAD, "max_recipients": MAX_RCPTS})
    yield types.SimpleNamespace(sink=sink, daemon=daemon, port=port, modern=modern, refusing=refusing,
                                refuser=refuser)
    refuser.stop()


def enhanced(text):
    m = re.match(r"^\d{3} (\d\.\d{1,3}\.\d{1,3}) ", text)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------ malformed lines
@pytest.mark.parametrize("first,second", [(600, 0), (300, 4000)], ids=["one-write", "tail-in-a-later-write"])
def test_overlong_command_gets_exactly_one_500(env, first, second):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        c.send(b"NOOP " + b"x" * first)
        if second:
            assert hh.unsolicited(c, 0.3) == b"", "a reply before the over-long line ended"
            c.send(b"y" * second)
        c.send(b"\r\nNOOP\r\n")
        code, text = c.reply()
        assert code == 500 and re.match(r"^500 5\.5\.\d ", text), f"over-long line: {text!r}"
        code, text = c.reply()
        assert code == 250, f"the next command must get its own reply, not a second 500: {text!r}"
        assert hh.unsolicited(c) == b"", "a second reply for the tail of the over-long line"
        # the session is still usable
        code, text = hh.transaction(c, hh.message("after long line"))
        assert code == 250, text
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "line_too_long")
    hh.assert_relays(env.daemon, env.port, env.sink)


@pytest.mark.parametrize("line,reason,then", [
    (b"MAIL FROM:<a@example.test> X\x00Y", "bad_bytes", []),
    (b"MAIL FROM:<caf\xc3\xa9@example.test>", "bad_bytes", []),
    (b"EHLO h\xffst.example.test", "bad_bytes", []),
    # a bare CR inside a line: the whole line up to CRLF is refused once
    (b"MAIL FROM:<a@example.test>\rNOOP", "bare_newline_command", []),
], ids=["NUL", "utf8-in-MAIL", "8bit-in-EHLO", "bare-CR"])
def test_bad_bytes_in_command(env, line, reason, then):
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.port)
    try:
        c.send(line + b"\r\n")
        code, text = c.reply()
        assert code == 500 and re.match(r"^500 5\.5\.\d ", text), f"{line!r} answered {text!r}"
        more = hh.replies_within(c)
        assert [r[0] for r in more] == then, f"after the one 500 for {line!r}: {more!r}"
        # nothing of that line was executed: a MAIL hidden in it did not open a transaction
        code, text = c.cmd("RCPT TO:<r@dest.test>")
        assert code == 503, f"RCPT after the refused line must be 503 (no transaction): {text!r}"
    finally:
        c.close()
    assert env.sink.count() == n
    hh.assert_rejected(env.daemon, before, reason)
    hh.assert_rejected(env.daemon, before, "bad_sequence")
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_bare_lf_in_command_one_reply_then_close(env):
    """A bare LF ends the line where the client may not think it ends: one 500 for the whole line, never a
    second reply for its tail (`RCPT ...` here), then close, as Postfix's smtpd_forbid_bare_newline does."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.port)
    try:
        c.send(b"MAIL FROM:<a@example.test>\nRCPT TO:<b@example.test>\r\n")
        code, text = c.reply()
        assert code == 500 and re.match(r"^500 5\.5\.2 ", text), text
        more = hh.replies_within(c)
        assert more == [], f"a second reply for the tail of the line: {more!r}"
        assert c.pending(2.0) is None, "the session must be closed after the bare LF"
    finally:
        c.close()
    assert env.sink.count() == n
    hh.assert_rejected(env.daemon, before, "bare_newline_command")
    hh.assert_relays(env.daemon, env.port, env.sink)


@pytest.mark.parametrize("second", [0, 4000], ids=["one-write", "tail-in-a-later-write"])
def test_overlong_command_ended_by_bare_lf_one_reply_then_close(env, second):
    """An over-long line whose tail ends in a bare LF: the client may think the line goes on to the next CRLF,
    so what follows the LF is part of the line it got its one 500 for: never executed or answered; close."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.port)
    try:
        c.send(b"NOOP " + b"x" * 600)
        if second:
            code, text = c.reply()
            assert code == 500 and re.match(r"^500 5\.5\.2 ", text), f"over-long line: {text!r}"
            c.send(b"y" * second)
        c.send(b"\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
        if not second:
            code, text = c.reply()
            assert code == 500 and re.match(r"^500 5\.5\.2 ", text), f"over-long line: {text!r}"
        more = hh.replies_within(c)
        assert more == [], f"a second reply for the tail of the line: {more!r}"
        assert c.pending(2.0) is None, "the session must be closed after the bare LF"
    finally:
        c.close()
    assert env.sink.count() == n
    hh.assert_rejected(env.daemon, before, "bare_newline_command")
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_too_many_bad_commands_421_and_close(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        for i in range(MAX_BAD - 1):
            code, text = c.cmd(f"XYZZY{i}")
            assert code == 500 and enhanced(text) == "5.5.2", f"unknown command {i}: {text!r}"
        code, text = c.cmd("XYZZY-last")
        assert code == 421, f"the {MAX_BAD}th bad command must get 421: {text!r}"
        assert c.closed_or_error(3.0), "the connection stayed open after 421"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "unrecognized_command", MAX_BAD - 1)
    hh.assert_rejected(env.daemon, before, "too_many_bad_commands")
    hh.assert_relays(env.daemon, env.port, env.sink)


# -------------------------------------------------------------------------------------- sequencing
@pytest.mark.parametrize("setup,command", [
    ([], "MAIL FROM:<s@example.test>"),
    (["EHLO client.example.test"], "RCPT TO:<r@dest.test>"),
    (["EHLO client.example.test"], "DATA"),
    (["EHLO client.example.test", "MAIL FROM:<s@example.test>"], "MAIL FROM:<s2@example.test>"),
], ids=["MAIL-before-EHLO", "RCPT-before-MAIL", "DATA-before-MAIL", "nested-MAIL"])
def test_out_of_order_503(env, setup, command):
    before = env.daemon.metrics()
    c = harness.RawSmtp(env.port)
    try:
        assert c.reply()[0] == 220
        for s in setup:
            code, text = c.cmd(s)
            assert code == 250, f"{s}: {text!r}"
        code, text = c.cmd(command)
        assert code == 503 and enhanced(text) == "5.5.1", f"{command} out of order: {text!r}"
        assert c.cmd("NOOP")[0] == 250, "session unusable after 503"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "bad_sequence")
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_data_before_rcpt_503(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        code, text = c.cmd("DATA")
        assert text.startswith("503 5.5.1 "), f"DATA before any RCPT: {text!r}"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "bad_sequence")


def test_data_after_all_rcpts_refused_554(env):
    """Every RCPT refused (here: bad syntax), then DATA: 554 5.5.1, nothing relayed."""
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd("RCPT TO:<no at sign>")[0] == 501
        code, text = c.cmd("DATA")
        assert text.startswith("554 5.5.1 "), f"DATA with no accepted recipient: {text!r}"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "no_valid_recipients")
    harness.assert_not_counted(env.daemon, before, settle=0.1)


@pytest.mark.parametrize("setup,command,reply,reason", [
    ([], "MAIL FROM:<not an address>", "501 5.1.7", "bad_address"),
    ([], "MAIL FROM:<s@example.test> FOO=bar", "555 5.5.4", "unknown_parameter"),
    ([], "MAIL FROM:<s@example.test> SIZE=lots", "555 5.5.4", "unknown_parameter"),
    (["MAIL FROM:<s@example.test>"], "RCPT TO:<no at sign>", "501 5.1.3", "bad_address"),
    (["MAIL FROM:<s@example.test>"], "RCPT TO:<r@dest.test> NOTIFY=NEVER", "555 5.5.4", "unknown_parameter"),
    ([], "MAIL TO:<s@example.test>", "501 5.5.4", "syntax_error"),
    ([], "EHLO", "501 5.5.4", "syntax_error"),
    (["MAIL FROM:<s@example.test>", "RCPT TO:<r@dest.test>"], "DATA now", "501 5.5.4", "syntax_error"),
    ([], "VRFY postmaster", "502 5.5.1", "vrfy_disabled"),
    ([], "EXPN staff", "502 5.5.1", "vrfy_disabled"),
], ids=["MAIL-bad-address", "MAIL-unknown-param", "MAIL-bad-SIZE", "RCPT-bad-address", "RCPT-param",
        "MAIL-TO", "EHLO-no-name", "DATA-argument", "VRFY", "EXPN"])
def test_bad_arguments(env, setup, command, reply, reason):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        for s in setup:
            assert c.cmd(s)[0] == 250, s
        code, text = c.cmd(command)
        assert text.startswith(reply + " "), f"{command}: want {reply}, got {text!r}"
        c.cmd("RSET")
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, reason)
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_too_many_recipients_452_each(env):
    before = env.daemon.metrics()
    n = env.sink.count()
    data = hh.message("many recipients")
    c = hh.greeted(env.port)
    try:
        assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
        for i in range(MAX_RCPTS):
            code, text = c.cmd(f"RCPT TO:<r{i}@dest.test>")
            assert code == 250, text
        for i in range(MAX_RCPTS, MAX_RCPTS + 2):
            code, text = c.cmd(f"RCPT TO:<r{i}@dest.test>")
            assert code == 452 and enhanced(text) == "4.5.3", f"RCPT beyond max_recipients: {text!r}"
        assert c.cmd("DATA")[0] == 354
        c.send(harness.dot_stuff(data))
        code, text = c.cmd(".")
        assert code == 250, text
    finally:
        c.close()
    meta, _ = env.sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == [f"r{i}@dest.test" for i in range(MAX_RCPTS)], meta
    hh.assert_rejected(env.daemon, before, "too_many_recipients", 2)
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")


# -------------------------------------------------------------------------------------------- TLS
def client_hello():
    """The bytes a TLS client sends first (a real ClientHello from Python's ssl)."""
    ctx = harness.client_tls_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_tls_client_hello_on_plaintext_port(env):
    """An implicit-TLS client (port 465 style) on the SMTP port: its ClientHello is binary garbage to the
    command parser: only 500 5.5.x replies (or 421 after max_bad_commands), nothing executed."""
    before = env.daemon.metrics()
    hello = client_hello()
    assert hello[:1] == b"\x16", hello[:8]
    c = harness.RawSmtp(env.port)
    try:
        c.send(hello + b"\r\n")
        data, _closed = hh.read_all(c.sock, wait=1.5)
    finally:
        c.close()
    lines = [ln for ln in data.decode("latin-1").split("\r\n") if ln]
    assert lines and lines[0].startswith("220 "), f"no banner: {lines!r}"
    rest = lines[1:]
    assert rest, "the ClientHello got no reply at all"
    for ln in rest:
        assert re.match(r"^(500 5\.5\.\d|421 4\.7\.0) ", ln), f"unexpected reply to a ClientHello: {ln!r}"
    after = hh.wait_counter(env.daemon, before, "mailflow_rejects_total")
    moved = harness.delta(before, after, "mailflow_rejects_total")
    reasons = {dict(k)["reason"] for k in moved}
    assert reasons and reasons <= {"bad_bytes", "line_too_long", "bare_newline_command", "too_many_bad_commands",
                                   "unrecognized_command"}, harness.fmt_delta(moved)
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_garbage_instead_of_tls_handshake(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        code, text = c.cmd("STARTTLS")
        assert code == 220, text
        c.send(b"this is not a TLS record\r\nMAIL FROM:<x@example.test>\r\n")
        assert c.closed_or_error(5.0), "the server kept the connection after a garbage handshake"
        assert not any("250" in str(t) for t in c.transcript[-3:]), c.transcript
    finally:
        c.close()
    hh.assert_counter(env.daemon, before, "mailflow_tls_handshake_failures_total", listener="inbound", leg="client")
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_tls_version_below_listener_minimum(env):
    """Listener `modern` has min_version TLS1.2: a TLS1.0-only client fails the handshake (counted), a TLS1.2
    client on the same listener relays."""
    before = env.daemon.metrics()
    c = hh.greeted(env.modern)
    try:
        assert c.cmd("STARTTLS")[0] == 220
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.starttls("TLS1.0")
            c.cmd("EHLO client.example.test")
    finally:
        c.close()
    hh.assert_counter(env.daemon, before, "mailflow_tls_handshake_failures_total", listener="modern", leg="client")
    # a modern client still gets through on that listener
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.modern)
    try:
        assert c.cmd("STARTTLS")[0] == 220
        assert c.starttls("TLS1.2") == "TLSv1.2"
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = hh.transaction(c, hh.message("modern"))
        assert code == 250, text
    finally:
        c.close()
    env.sink.wait_messages(n + 1)
    harness.assert_counted(env.daemon, before, "internet", "inbound", "TLS1.2")


def test_starttls_pipelining_counted(env):
    """Plaintext (a full MAIL line and a partial RCPT) behind STARTTLS: discarded, counted once as
    starttls_pipelining; the honest transaction inside TLS is delivered with the honest sender."""
    before = env.daemon.metrics()
    n = env.sink.count()
    data = hh.message("after injection")
    c = hh.greeted(env.port)
    try:
        c.send(b"STARTTLS\r\nMAIL FROM:<attacker@evil.test>\r\nRCPT TO:<vic")
        code, text = c.reply()
        assert code == 220, text
        c.starttls("TLS1.3")
        assert hh.unsolicited(c, 0.5) == b"", "the injected plaintext was answered inside TLS"
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = hh.transaction(c, data)
        assert code == 250, text
    finally:
        c.close()
    meta, content = env.sink.wait_messages(n + 1)[-1]
    assert meta["mail_from"] == hh.SENDER and meta["rcpt_tos"] == [hh.RCPT], meta
    hh.assert_rejected(env.daemon, before, "starttls_pipelining")
    harness.assert_counted(env.daemon, before, "internet", "inbound", "TLS1.3")


def test_starttls_sequence_counters(env):
    """The reasons behind test_starttls_injection.py's replies: MAIL after STARTTLS without a new EHLO is
    bad_sequence, a second STARTTLS is starttls_twice (503 5.5.1)."""
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls("TLS1.2")
        code, text = c.cmd(f"MAIL FROM:<{hh.SENDER}>")
        assert text.startswith("503 5.5.1 "), f"MAIL without EHLO after STARTTLS: {text!r}"
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = c.cmd("STARTTLS")
        assert text.startswith("503 5.5.1 "), f"second STARTTLS: {text!r}"
        code, text = hh.transaction(c, hh.message("after the refusals"))
        assert code == 250, text
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "bad_sequence")
    hh.assert_rejected(env.daemon, before, "starttls_twice")


# ------------------------------------------------------------------------------------------ pipelining
SMUGGLED = (b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n")


@pytest.mark.parametrize("upstream", ["store", "refuser"], ids=["upstream-354", "upstream-451-to-DATA"])
def test_message_pipelined_behind_data_554_and_close(env, upstream):
    """DATA must be the last command of a group (RFC 2920): a message sent behind it without waiting for the 354
    gets 554 5.5.0 and the session ends, whatever the upstream would have answered DATA. Before, with an
    upstream that refused DATA, each message line was answered as a command and a MAIL/RCPT/DATA in the content
    ran as a transaction of its own."""
    before = env.daemon.metrics()
    n = env.sink.count()
    port = env.port if upstream == "store" else env.refusing
    c = hh.greeted(port)
    try:
        c.send(f"MAIL FROM:<{hh.SENDER}>\r\nRCPT TO:<{hh.RCPT}>\r\nDATA\r\n".encode()
               + hh.message("pipelined behind DATA") + b".\r\n" + SMUGGLED)
        replies = hh.replies_within(c, 1.0)
        assert [code for code, _ in replies] == [250, 250, 554], replies
        assert replies[-1][1].startswith("554 5.5.0 "), replies
        assert "synchronization" in replies[-1][1], replies
        assert c.closed_or_error(3.0), "the session stayed open after 554"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "unauth_pipelining")
    harness.assert_not_counted(env.daemon, before, settle=0.3)
    assert env.sink.count() == n, "a message reached the sink"
    assert all(b"evil" not in r for r in env.refuser.received), "the content's MAIL reached the upstream"
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_bdat_alone_502_and_close(env):
    """A BDAT whose chunk comes in a later write: it gets its 502, and the session ends there (mailflowd
    announces no CHUNKING and cannot tell where the chunk ends); before, the chunk's MAIL/RCPT/DATA ran."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.port)
    try:
        c.send(b"BDAT %d LAST\r\n" % len(SMUGGLED))
        code, text = c.reply()
        assert code == 502 and text.startswith("502 5.5.1 "), text
        try:
            c.send(SMUGGLED)
        except OSError:
            pass  # closed already
        assert hh.replies_within(c, 1.0) == [], "the chunk was answered as commands"
        assert c.closed_or_error(3.0), "the session stayed open after BDAT"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "not_implemented")
    harness.assert_not_counted(env.daemon, before, settle=0.3)
    assert env.sink.count() == n, "the chunk's message reached the sink"
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_bdat_with_its_chunk_502_and_close(env):
    """BDAT's chunk follows the command at once (RFC 3030), and mailflowd announces no CHUNKING: the chunk is a
    message it cannot frame, never commands. 502 and close; before, the chunk's MAIL/RCPT/DATA ran as a
    transaction of its own."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.port)
    try:
        c.send(b"BDAT %d LAST\r\n" % len(SMUGGLED) + SMUGGLED)
        replies = hh.replies_within(c, 1.0)
        assert len(replies) == 1 and replies[0][1].startswith("502 5.5.1 "), replies
        assert c.closed_or_error(3.0), "the session stayed open after BDAT"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "not_implemented")
    harness.assert_not_counted(env.daemon, before, settle=0.3)
    assert env.sink.count() == n, "the chunk's message reached the sink"
    hh.assert_relays(env.daemon, env.port, env.sink)


@pytest.mark.parametrize("setup,batch", [
    ([], b"EHLO client.example.test\r\nMAIL FROM:<s@example.test>\r\n"),
    (["HELO client.example.test"], b"MAIL FROM:<s@example.test>\r\nRCPT TO:<r@dest.test>\r\n"),
    (["HELO client.example.test"], b"RSET\r\nNOOP\r\n"),
    ([], b"RSET\r\nEHLO client.example.test\r\n"),
    (["EHLO client.example.test"], b"NOOP\r\nMAIL FROM:<s@example.test>\r\n"),
    (["EHLO client.example.test"], b"VRFY postmaster\r\nNOOP\r\n"),
    (["EHLO client.example.test"], b"HELO client.example.test\r\nMAIL FROM:<s@example.test>\r\n"),
], ids=["behind-EHLO", "no-PIPELINING-after-HELO", "RSET-after-HELO", "before-the-EHLO-reply", "behind-NOOP",
        "behind-VRFY", "behind-HELO"])
def test_illegal_pipelining_554_and_close(env, setup, batch):
    """Input waiting behind a command that must end a group (EHLO, HELO, NOOP, VRFY), or behind any command
    while PIPELINING was not announced to the client: 554 5.5.0 for that command, which is not executed, and
    close (Postfix 3.9's smtpd_forbid_unauth_pipelining)."""
    before = env.daemon.metrics()
    c = harness.RawSmtp(env.port)
    try:
        assert c.reply()[0] == 220
        for s in setup:
            assert c.cmd(s)[0] == 250, s
        c.send(batch)
        replies = hh.replies_within(c, 1.0)
        assert len(replies) == 1 and replies[0][1].startswith("554 5.5.0 "), replies
        assert c.closed_or_error(3.0), "the session stayed open after 554"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "unauth_pipelining")
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_pipelining_after_ehlo_relays(env):
    """What RFC 2920 allows after the EHLO reply announced PIPELINING: MAIL, RCPTs and DATA in one write, then
    RSET and the next transaction's MAIL in one write. Nothing refused."""
    before = env.daemon.metrics()
    n = env.sink.count()
    data = hh.message("pipelined")
    c = hh.greeted(env.port)
    try:
        c.send(f"MAIL FROM:<{hh.SENDER}>\r\nRCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n".encode())
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(harness.dot_stuff(data) + b".\r\nRSET\r\n" + f"MAIL FROM:<{hh.SENDER}>\r\n".encode())
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    meta, _ = env.sink.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["a@dest.test", "b@dest.test"], meta
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")
    after = env.daemon.metrics()
    assert not harness.delta(before, after, "mailflow_rejects_total"), \
        harness.fmt_delta(harness.delta(before, after, "mailflow_rejects_total"))
