"""Recipients refused by the upstream count towards limits.max_bad_commands, as Postfix counts every error reply
towards smtpd_hard_error_limit, a before-queue proxy's refusals included: a client that walks a list of addresses
through the relay (harvesting) is cut off by the relay with its 421, whatever the upstream's own limit. A
delivered message starts the count over; a 452 (too many recipients: the client is to send them again) does not
count. Refusals of DATA and of a message count as well (Postfix's data_cmd returns every failure to the same
count): the upstream's to DATA or to the end of data, and the relay's own (a message too big)."""
import types

import pytest

import harness
import hostile_helpers as hh

MAX_BAD = 3


MAX_SIZE = 4096


def picky(conn):
    """An upstream that refuses unknown@ (550), greylists later@ (450), says full@ is one too many (452) and takes
    the rest; it refuses DATA from nodata@ (554) and a message whose content says "refuse-me" (554 after its
    end)."""
    sender = [b""]

    def mail(line):
        sender[0] = line.split(b":", 1)[1].strip(b"<> ").lower()
        return None

    def data(_line):
        if sender[0].startswith(b"nodata"):
            conn.send(b"554 5.7.1 Error: no data accepted from this sender\r\n")
            return False
        conn.send(b"354 go on\r\n")
        content = conn.message()
        if content is None:
            return True
        if b"refuse-me" in content:
            conn.send(b"554 5.7.1 Error: content refused\r\n")
        else:
            conn.server.delivered.append(content)
            conn.send(b"250 2.0.0 queued\r\n")
        return False

    def rcpt(line):
        address = line.split(b":", 1)[1].strip(b"<> ").lower()
        if address.startswith(b"unknown"):
            conn.send(b"550 5.1.1 <" + address + b">: Recipient address rejected: User unknown\r\n")
        elif address.startswith(b"later"):
            conn.send(b"450 4.2.0 <" + address + b">: Recipient address rejected: Greylisted\r\n")
        elif address.startswith(b"full"):
            conn.send(b"452 4.5.3 Error: too many recipients\r\n")
        else:
            return None
        return False

    conn.serve({b"MAIL": mail, b"RCPT": rcpt, b"DATA": data})


@pytest.fixture(scope="module")
def env(daemon_factory):
    upstream = hh.FakeUpstream("picky", picky)
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("inbound", port, "picky")],
                            upstreams=[hh.plain_upstream("picky", upstream.port)], name="refused",
                            limits={"drain_timeout": "3s", "max_bad_commands": MAX_BAD, "max_message_size": MAX_SIZE})
    yield types.SimpleNamespace(daemon=daemon, port=port, upstream=upstream)
    upstream.stop()


@pytest.mark.parametrize("local", ["unknown", "later"])
def test_refused_recipients_end_the_session_at_max_bad_commands(env, local):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        assert c.cmd("MAIL FROM:<harvester@example.test>")[0] == 250
        for i in range(MAX_BAD):
            code, text = c.cmd(f"RCPT TO:<{local}{i}@dest.test>")
            assert code in (450, 550), f"RCPT {i + 1}: {text!r}"
        # The max_bad_commands-th refusal is followed by the 421, before the client's next command (as Postfix's
        # smtpd_hard_error_limit), and the session ends.
        hh.assert_cut_off(c.reply(), c, f"{MAX_BAD} refused recipients")
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "too_many_bad_commands")
    hh.wait_sessions_idle(env.daemon)


def test_pipelined_refused_recipients_get_no_reply_after_the_421(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        c.send(b"MAIL FROM:<harvester@example.test>\r\n"
               + b"".join(b"RCPT TO:<unknown%d@dest.test>\r\n" % i for i in range(MAX_BAD + 3)))
        replies = hh.replies_within(c, 2.0)
        codes = [code for code, _ in replies]
        assert codes == [250] + [550] * MAX_BAD + [421], replies
        assert c.closed_or_error(3.0), "the connection stayed open after 421"
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "too_many_bad_commands")


def test_a_delivered_message_starts_the_count_over_and_452_does_not_count(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        for round_ in range(2):
            assert c.cmd("MAIL FROM:<sender@example.test>")[0] == 250
            for i in range(MAX_BAD - 1):
                code, text = c.cmd(f"RCPT TO:<unknown{round_}{i}@dest.test>")
                assert code == 550, text
            for i in range(MAX_BAD + 1):
                code, text = c.cmd(f"RCPT TO:<full{round_}{i}@dest.test>")
                assert code == 452, f"a 452 counted as a bad command: {text!r}"
            assert c.cmd("RCPT TO:<rcpt@dest.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(harness.dot_stuff(hh.message(f"round {round_}")))
            code, text = c.cmd(".")
            assert code == 250, f"the message: {text!r}"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    after = env.daemon.metrics()
    assert not harness.delta(before, after, "mailflow_rejects_total", reason="too_many_bad_commands")


@pytest.mark.parametrize("refused", ["data", "end_of_data", "too_big"])
def test_refused_messages_end_the_session_at_max_bad_commands(env, refused):
    """The upstream's 554 to DATA, its 554 to the end of data, mailflowd's own 552 to a message too big: each one
    is a bad command, and the max_bad_commands-th is followed by the 421."""
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        for i in range(MAX_BAD):
            sender = "nodata@example.test" if refused == "data" else "sender@example.test"
            assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
            assert c.cmd(f"RCPT TO:<rcpt{i}@dest.test>")[0] == 250
            code, text = c.cmd("DATA")
            if refused == "data":
                assert code == 554, f"DATA {i + 1}: {text!r}"
                continue
            assert code == 354, f"DATA {i + 1}: {text!r}"
            body = b"x" * 100 + b"\r\n"
            body = body * (2 * MAX_SIZE // len(body)) if refused == "too_big" else b"refuse-me\r\n"
            c.send(harness.dot_stuff(hh.message(f"refused {i}", body=body)))
            code, text = c.cmd(".")
            assert code == (552 if refused == "too_big" else 554), f"message {i + 1}: {text!r}"
        hh.assert_cut_off(c.reply(), c, f"{MAX_BAD} refusals")
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "too_many_bad_commands")
    hh.wait_sessions_idle(env.daemon)
