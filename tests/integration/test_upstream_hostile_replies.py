"""Replies a broken or hostile upstream gives that do not fit the command they answer: a code outside 2xx-5xx
(RFC 5321 4.2.1: fatal), a 2xx to DATA, a 3xx to RCPT, and a reply that comes before its command was sent
(behind the 354, behind a RCPT's reply, behind the EHLO reply). Each is the upstream out of step: the client
gets a 451 for the command (never the misfit reply, never a 2xx that the upstream did not give to that
command), mailflow_upstream_errors_total{reason="protocol"} moves, nothing is counted, and the daemon still
relays."""
import types

import pytest

import harness
import hostile_helpers as hh

NO_PIPELINING = b"250 fake.test\r\n"


def answering(verb, reply, ehlo=b"250-fake.test\r\n250 PIPELINING\r\n"):
    """A mail server whose reply to `verb` is `reply` (bytes), and default otherwise."""
    def script(conn):
        def handler(_line):
            conn.send(reply)
            return False
        conn.serve({verb: handler}, ehlo=ehlo)
    return script


def script_early_250(conn):
    """354 with a 250 behind it in the same write (before the message was sent), then 554 to the message."""
    def data(_line):
        conn.send(b"354 go on\r\n250 2.0.0 queued before it came\r\n")
        if conn.message() is None:
            return True
        conn.send(b"554 5.7.1 refused after all\r\n")
        return False
    conn.serve({b"DATA": data})


def script_double_rcpt(conn):
    """No PIPELINING; the first RCPT is answered twice, nobody@ is refused."""
    def rcpt(line):
        if b"nobody@" in line:
            conn.send(b"550 5.1.1 no such user\r\n")
        else:
            conn.send(b"250 2.1.5 ok\r\n250 2.1.5 ok again\r\n")
        return False
    conn.serve({b"RCPT": rcpt}, ehlo=NO_PIPELINING)


def script_extra_after_ehlo(conn):
    """No PIPELINING; a 250 nobody asked for behind the EHLO reply, in the same write; every RCPT refused."""
    def rcpt(_line):
        conn.send(b"550 5.1.1 no such user\r\n")
        return False
    conn.serve({b"RCPT": rcpt}, ehlo=NO_PIPELINING + b"250 2.1.0 unasked\r\n")


FAKES = {
    "oddrcpt": answering(b"RCPT", b"650 6.0.0 out of range\r\n"),
    "rcpt354": answering(b"RCPT", b"354 go on\r\n"),
    "data250": answering(b"DATA", b"250 2.0.0 ok\r\n"),
    "early250": script_early_250,
    "doublercpt": script_double_rcpt,
    "extraehlo": script_extra_after_ehlo,
    "ctlrcpt": answering(b"RCPT", b"550 5.1.1 bad \x00\x1b[31m\x7f user\r\n"),
    "bigrcpt": answering(b"RCPT", b"".join(b"550-5.1.1 %d " % i + b"x" * 2000 + b"\r\n" for i in range(99)) +
                         b"550 5.1.1 the last line\r\n"),
}


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    fakes = {name: hh.FakeUpstream(name, script) for name, script in FAKES.items()}
    ports = {name: harness.free_port() for name in list(FAKES) + ["good"]}
    listeners = [hh.listener(name, ports[name], name) for name in list(FAKES) + ["good"]]
    upstreams = [hh.plain_upstream(name, fake.port) for name, fake in fakes.items()]
    upstreams.append(hh.plain_upstream("good", sink.port))
    daemon = daemon_factory(listeners=listeners, upstreams=upstreams,
                            timeouts={"command": "3s", "upstream_connect": "2s", "data_end": "3s"})
    yield types.SimpleNamespace(sink=sink, daemon=daemon, ports=ports, fakes=fakes)
    for f in fakes.values():
        f.stop()


def assert_protocol_error(env, before, name):
    after = hh.assert_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream=name,
                              reason="protocol")
    harness.assert_not_counted(env.daemon, before, settle=0.2)
    return after


@pytest.mark.parametrize("name", ["oddrcpt", "rcpt354"])
def test_rcpt_reply_out_of_class_is_451(env, name):
    before = env.daemon.metrics()
    c = hh.greeted(env.ports[name])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        assert text.startswith("451 4.4.2"), f"RCPT answered {text!r} upstream: the client got {text!r}"
        assert c.cmd("DATA")[0] in (503, 554), "no recipient was accepted (the transaction is gone)"
    finally:
        c.close()
    assert_protocol_error(env, before, name)
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_2xx_to_data_is_451(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["data250"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
        code, text = c.cmd("DATA")
        assert text.startswith("451 4.4.2"), f"DATA answered 250 upstream: the client got {text!r}"
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.close()
    assert_protocol_error(env, before, "data250")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_reply_before_the_message_is_no_delivery(env):
    """A 250 that came before the message was sent is no answer to it: the client must not hear 250 (the
    upstream refused the message); the 354 it came behind is not relayed either, so no message is sent."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["early250"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{hh.RCPT}>")[0] == 250
        code, text = c.cmd("DATA")
        if code == 354:
            c.send(harness.dot_stuff(hh.message("early 250")))
            code, text = c.cmd(".")
            assert code != 250, f"the client was told {text!r} for a message the upstream refused"
        assert text.startswith("451 4.4.2"), f"DATA answered 354 and 250 at once: the client got {text!r}"
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.close()
    assert_protocol_error(env, before, "early250")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_second_reply_to_rcpt_answers_no_other_command(env):
    """The upstream answers a RCPT twice (no PIPELINING): its second reply must not become the next RCPT's,
    which the upstream refused."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["doublercpt"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        first = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        second = c.cmd("RCPT TO:<nobody@dest.test>")
        assert second[0] != 250, f"nobody@ was refused upstream, the client got {second[1]!r} ({first!r})"
        assert first[1].startswith("451 4.4.2"), f"RCPT answered twice: the client got {first[1]!r}"
    finally:
        c.close()
    assert_protocol_error(env, before, "doublercpt")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_reply_behind_the_ehlo_reply_answers_no_command(env):
    """A reply behind the EHLO reply, before any command was sent: taken as MAIL's, it shifted every reply by
    one, and the RCPT the upstream refused heard MAIL's 250. The connection is not used: 451 4.4.1 at RCPT."""
    before = env.daemon.metrics()
    c = hh.greeted(env.ports["extraehlo"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        assert code != 250, f"the upstream refused the RCPT, the client got {text!r}"
        assert text.startswith("451 4.4.1"), text
    finally:
        c.close()
    assert_protocol_error(env, before, "extraehlo")
    hh.assert_relays(env.daemon, env.ports["good"], env.sink)


def test_control_bytes_in_reply_text_never_reach_the_client(env):
    """The refusal is relayed (its code and words), but not the NUL, the terminal escape or the DEL in its text
    (RFC 5321 4.2: reply text is HT and printable US-ASCII)."""
    c = hh.greeted(env.ports["ctlrcpt"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
    finally:
        c.close()
    assert code == 550 and text.startswith("550 5.1.1 bad ") and text.endswith(" user"), repr(text)
    assert not [ch for ch in text if ord(ch) < 32 or ord(ch) == 127], f"control bytes relayed: {text!r}"


def test_a_huge_reply_is_relayed_in_ten_lines_of_512_octets(env):
    """An upstream's refusal of 100 lines of 2 KiB (what the reply parser takes) reaches the client as its first
    9 lines and its last, each cut to 512 octets (RFC 5321 4.5.3.1.5): a hostile MX answering 100 pipelined
    RCPTs so piled up 20 MB in one session."""
    c = hh.greeted(env.ports["bigrcpt"])
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
    finally:
        c.close()
    lines = text.split("\n")
    assert code == 550 and len(lines) == 10, f"{len(lines)} lines, {len(text)} characters"
    assert all(len(line) + 2 <= 512 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith("550-5.1.1 0 xxx") and lines[-1] == "550 5.1.1 the last line", lines[-1]
