"""Hostile DATA: SMTP smuggling (bare LF, bare CR and fake terminators <LF>.<LF>, <CR>.<CR>, <LF>.<CR><LF>,
<CR><LF>.<LF> followed by a whole second transaction) under `bare_newline: normalize` (default) and
`reject`; SIZE= above the limit at MAIL; a message growing past max_message_size; a text line over max_line.
Only CRLF.CRLF ends a message; nothing after a fake terminator becomes a second message at the sink."""
import re
import types

import pytest

import harness
import hostile_helpers as hh

MAX_SIZE = 20000
MAX_LINE = 1000

VARIANTS = {
    "bare-LF": b"\n",
    "bare-CR": b"\r",
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
}
SMUGGLED = (b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
            b"From: evil@evil.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    strict_sink = sink_factory("strict-store")
    port, strict = harness.free_port(), harness.free_port()
    limits = {"drain_timeout": "3s", "max_message_size": MAX_SIZE, "max_line": MAX_LINE}
    daemon = daemon_factory(
        listeners=[hh.listener("inbound", port, "store")],
        upstreams=[hh.plain_upstream("store", sink.port)], limits=limits)
    strict_daemon = daemon_factory(
        listeners=[hh.listener("inbound", strict, "store")],
        upstreams=[hh.plain_upstream("store", strict_sink.port)], name="strict",
        limits=dict(limits, bare_newline="reject"))
    return types.SimpleNamespace(sink=sink, daemon=daemon, port=port,
                                 strict_sink=strict_sink, strict_daemon=strict_daemon, strict=strict)


def normalized(raw):
    """What `normalize` must make of raw DATA bytes: CRLF kept, bare LF -> CRLF, bare CR -> space."""
    out = bytearray()
    i = 0
    while i < len(raw):
        b = raw[i:i + 1]
        if b == b"\r" and raw[i + 1:i + 2] == b"\n":
            out += b"\r\n"
            i += 2
            continue
        out += b"\r\n" if b == b"\n" else b" " if b == b"\r" else b
        i += 1
    return bytes(out)


def smuggle(c, raw):
    """MAIL/RCPT/DATA, then `raw` verbatim (no client-side stuffing: the attacker's bytes), then CRLF.CRLF."""
    assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(raw)
    return c.cmd(".")


def smuggling_payload(name):
    prefix = hh.message(f"smuggling {name}", body=b"hello")
    return prefix + VARIANTS[name] + SMUGGLED


@pytest.mark.parametrize("name", list(VARIANTS))
def test_smuggling_normalized(env, name):
    before = env.daemon.metrics()
    n = env.sink.count()
    raw = smuggling_payload(name)
    c = hh.greeted(env.port)
    try:
        code, text = smuggle(c, raw)
        assert code == 250, f"end of data: {text!r}"
        assert hh.unsolicited(c, 0.5) == b"", "replies to the smuggled commands reached the client"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    meta, content = env.sink.wait_messages(n + 1)[-1]
    assert meta["mail_from"] == hh.SENDER and meta["rcpt_tos"] == [hh.RCPT], meta
    rest = harness.split_received(content)[1]
    assert not BARE.search(rest), f"bare CR/LF reached the upstream: {rest!r}"
    assert rest == normalized(raw), f"normalised content differs:\n got {rest!r}\nwant {normalized(raw)!r}"
    if name in ("LF.LF", "LF.CRLF", "CRLF.LF"):
        assert b"\r\n.\r\n" in rest, "the fake terminator line did not arrive as a '.' content line"
    hh.assert_rejected(env.daemon, before, "bare_newline_normalized")
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")
    assert env.sink.count() == n + 1, "a second message appeared at the sink"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_smuggling_rejected(env, name):
    before = env.strict_daemon.metrics()
    n = env.strict_sink.count()
    raw = smuggling_payload(name)
    c = hh.greeted(env.strict)
    try:
        code, text = smuggle(c, raw)
        assert code == 550 and text.startswith("550 5.5.2"), f"bare_newline: reject must give 550 5.5.2: {text!r}"
        assert hh.unsolicited(c, 0.5) == b"", "replies to the smuggled commands reached the client"
        # the session goes on: an honest message on the same connection is delivered
        data = hh.message("honest after 550")
        code, text = hh.transaction(c, data)
        assert code == 250, text
    finally:
        c.close()
    meta, content = env.strict_sink.wait_messages(n + 1)[-1]
    assert harness.split_received(content)[1] == data
    harness.assert_counted(env.strict_daemon, before, "internet", "inbound", "none", n=1)  # the honest one only
    assert env.strict_sink.count() == n + 1, "the refused (or a smuggled) message reached the sink"
    hh.assert_rejected(env.strict_daemon, before, "bare_newline")


def test_plain_message_with_dots_untouched_under_reject(env):
    """`reject` refuses only bare CR/LF: ordinary dot-stuffed lines pass byte-exactly."""
    hh.assert_relays(env.strict_daemon, env.strict, env.strict_sink)
    data = hh.message("dots", body=b".leading dot\r\n..two\r\n.\r\n")
    n = env.strict_sink.count()
    c = hh.greeted(env.strict)
    try:
        code, text = hh.transaction(c, data)
        assert code == 250, text
    finally:
        c.close()
    assert harness.split_received(env.strict_sink.wait_messages(n + 1)[-1][1])[1] == data


# --------------------------------------------------------------------------------------------- sizes
def test_size_parameter_above_limit_552_at_mail(env):
    before = env.daemon.metrics()
    conns = env.sink.connections()
    c = hh.greeted(env.port)
    try:
        code, text = c.cmd(f"MAIL FROM:<{hh.SENDER}> SIZE={MAX_SIZE + 1}")
        assert code == 552 and text.startswith("552 5.3.4"), f"SIZE above the limit: {text!r}"
        code, text = c.cmd(f"MAIL FROM:<{hh.SENDER}> SIZE={MAX_SIZE}")
        assert code == 250, f"SIZE at the limit must be accepted: {text!r}"
        # MAIL goes upstream with the first RCPT (INTERFACE rule 6)
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        assert code == 250, text
        c.cmd("RSET")
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "message_too_big")
    assert env.sink.connections() == conns + 1, "the refused MAIL reached the upstream (only the second may)"
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_message_growing_past_limit_552_at_end(env):
    before = env.daemon.metrics()
    n = env.sink.count()
    big = hh.message("too big", body=(b"x" * 98 + b"\r\n") * (MAX_SIZE // 100 + 50))
    c = hh.greeted(env.port)
    try:
        code, text = hh.transaction(c, big)
        assert code == 552 and text.startswith("552 5.3.4"), f"oversized message: {text!r}"
        code, text = hh.transaction(c, hh.message("small after big"))
        assert code == 250, f"session unusable after 552: {text!r}"
    finally:
        c.close()
    msgs = env.sink.wait_messages(n + 1)
    assert env.sink.count() == n + 1 and b"too big" not in msgs[-1][1], "the oversized message reached the sink"
    hh.assert_rejected(env.daemon, before, "message_too_big")
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none", n=1)


def test_text_line_over_max_line_refused_at_end(env):
    before = env.daemon.metrics()
    n = env.sink.count()
    long_line = hh.message("long line", body=b"a" * (MAX_LINE + 500) + b"\r\nshort\r\n")
    c = hh.greeted(env.port)
    try:
        code, text = hh.transaction(c, long_line)
        assert code in (552, 554) and re.match(r"^55[24] 5\.\d\.\d ", text), f"line over max_line: {text!r}"
        assert hh.unsolicited(c, 0.3) == b""
    finally:
        c.close()
    harness.assert_not_counted(env.daemon, before)
    assert env.sink.count() == n, "a message with an over-long line reached the sink"
    hh.assert_rejected(env.daemon, before, "data_line_too_long")
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_too_many_received_headers_554_loop(env):
    """limits.max_hops (default 50, Postfix's hopcount_limit): 51 Received: fields mean a mail loop, refused
    with 554 5.4.6 after the end of data and nothing delivered; 50 still pass."""
    before = env.daemon.metrics()
    n = env.sink.count()
    trace = b"".join(b"Received: from hop%d.example.test by next.example.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % i
                     for i in range(51))
    c = hh.greeted(env.port)
    try:
        code, text = hh.transaction(c, trace + hh.message("looping"))
        assert code == 554 and text.startswith("554 5.4.6"), f"51 hops: {text!r}"
        code, text = hh.transaction(c, trace[trace.index(b"\r\n") + 2:] + hh.message("50 hops"))
        assert code == 250, f"50 hops must pass: {text!r}"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "too_many_hops")
    got = env.sink.wait_messages(n + 1)
    assert len(got) == n + 1 and b"looping" not in got[-1][1], "the looping message reached the upstream"
