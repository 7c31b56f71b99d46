"""Junk commands (Postfix's smtpd_junk_command_limit): EHLO, HELO, RSET, NOOP and HELP carry no mail, so a
client that repeats them (one per timeouts.command) would hold its session and its per-IP slot forever. Those
beyond limits.max_junk_commands count as bad commands, so max_bad_commands ends the session with its 421; a
delivered message starts the count over."""
import types

import pytest

import harness
import hostile_helpers as hh

MAX_JUNK = 5
MAX_BAD = 3


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("inbound", port, "store")],
                            upstreams=[hh.plain_upstream("store", sink.port)], name="junk",
                            limits={"drain_timeout": "3s", "max_junk_commands": MAX_JUNK,
                                    "max_bad_commands": MAX_BAD})
    return types.SimpleNamespace(sink=sink, daemon=daemon, port=port)


def test_noop_loop_ends_with_421(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)  # EHLO: the first junk command
    try:
        # The junk commands within the limit, and the MAX_BAD - 1 after it that count as bad commands, keep
        # their answer...
        for i in range(MAX_JUNK - 1 + MAX_BAD - 1):
            code, text = c.cmd("NOOP")
            assert code == 250, f"NOOP {i + 2} of the session: {text!r}"
        # ...the one that reaches max_bad_commands gets the 421.
        hh.assert_cut_off(c.cmd("NOOP"), c, f"junk command {MAX_JUNK + MAX_BAD}")
    finally:
        c.close()
    hh.assert_rejected(env.daemon, before, "too_many_bad_commands")
    hh.wait_sessions_idle(env.daemon)
    hh.assert_relays(env.daemon, env.port, env.sink)


def test_a_delivered_message_starts_the_count_over(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.port)
    try:
        for _ in range(2):
            for verb in ["NOOP", "RSET", "HELP", "NOOP"]:
                code, text = c.cmd(verb)
                assert code in (250, 214), f"{verb}: {text!r}"
            code, text = hh.transaction(c, hh.message("between junk commands"))
            assert code == 250, f"the message: {text!r}"
        # Without the deliveries this session would have sent 11 junk commands: 421 at the 8th.
        code, text = c.cmd("NOOP")
        assert code == 250, f"NOOP after a delivery: {text!r}"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    after = env.daemon.metrics()
    assert not hh.delta(before, after, "mailflow_rejects_total"), "a refusal in a session that delivered mail"
