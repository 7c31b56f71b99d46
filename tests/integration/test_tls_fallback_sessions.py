"""tls: opportunistic and Postfix's smtp_mx_session_limit (2): a host whose STARTTLS handshake fails is tried again
over a new connection without STARTTLS, and that retry is the same host's session, not a second one (Postfix's
smtp_connect.c retries the same address in plaintext without counting it again). The host name
pair.fallback.test resolves (the daemon runs in a mount namespace of its own with a hosts file of the test's
bound over /etc/hosts) to 127.0.0.140, then 127.0.0.141, both on port P:
- 127.0.0.140 offers STARTTLS and breaks the handshake; the plaintext retry then gets 451 to its EHLO;
- 127.0.0.141 takes mail in plaintext.
Before, the failed handshake and the retry counted as two sessions: the limit ended the walk after the first
address and the RCPT got 451 4.4.1, the second address never tried. Now the second address gets the mail."""
import time
import types

import pytest

import harness
import hostile_helpers as hh

FIRST, SECOND = "127.0.0.140", "127.0.0.141"  # pair.fallback.test


def broken_then_refusing(conn):
    """The TLS attempt (even connections): STARTTLS offered, the handshake broken. The plaintext retry (odd ones):
    greets with 220, then answers EHLO with 451."""
    if conn.idx % 2 == 0:
        conn.broken_tls_sink()
        return
    conn.send(b"220 first.test ESMTP\r\n")
    try:
        conn.line()
        conn.send(b"451 4.3.0 try again later\r\n")
        conn.line()
    except (ConnectionError, OSError):
        pass


@pytest.fixture(scope="module")
def env(workdir, mailflowd_bin):
    hosts = workdir / "fallback-hosts"
    hosts.write_text(f"{FIRST} pair.fallback.test\n{SECOND} pair.fallback.test\n")
    port = harness.free_port(FIRST, SECOND)
    first = hh.FakeUpstream("first", broken_then_refusing, host=FIRST, port=port)
    second = hh.FakeUpstream("second", lambda conn: conn.serve(), host=SECOND, port=port)
    wrapper = harness.in_own_files(hosts)
    daemon = None
    try:
        listen = harness.free_port()
        listeners = [{"name": "out", "address": f"127.0.0.1:{listen}", "direction": "outbound", "upstream": "pair"}]
        upstreams = [{"name": "pair", "address": f"pair.fallback.test:{port}", "tls": "opportunistic"}]
        state = workdir / "fallback-state"
        state.mkdir(exist_ok=True)
        cfg = harness.default_config(state, harness.free_port(), listeners, upstreams,
                                     timeouts={"greeting": "10s", "command": "10s", "upstream_connect": "5s"})
        daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="fallback", wrapper=wrapper).start()
        yield types.SimpleNamespace(daemon=daemon, listen=listen, first=first, second=second)
    finally:
        if daemon is not None:
            harness.stop_exits_0(daemon)
        first.stop()
        second.stop()


def test_the_plaintext_retry_is_the_same_session(env):
    """The first address's failed handshake and its plaintext retry (refused at EHLO) are one session of the two
    that smtp_mx_session_limit allows: the second address is tried and gets the mail, counted under none."""
    d, first, second = env.daemon, env.first, env.second
    before = d.metrics()
    r = harness.swaks(env.listen, data=hh.message("fallback sessions"))
    assert r.rc == 0, f"the second address should get the mail:\n{r}\n{first.log_tail()}\n{d.log_tail()}"
    assert first.connections() == 2, f"want the TLS attempt and one plaintext retry:\n{first.log_tail()}"
    assert b"STARTTLS" in first.received[0] and b"STARTTLS" not in first.received[1], first.log_tail()
    assert second.connections() == 1 and len(second.delivered) == 1, second.log_tail()
    assert b"Subject: fallback sessions" in second.delivered[0], second.log_tail()
    harness.assert_counted(d, before, "internet", "outbound", "none")
    hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream="pair", reason="tls_failed")
    time.sleep(0.2)  # an mx_limit line would be written before the RCPT's reply; none is
    assert not [x for x in d.stderr().splitlines() if " mx_limit " in x], d.log_tail()
