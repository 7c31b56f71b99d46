"""Client leg: plaintext and TLS1.0..1.3 (swaks, and openssl s_client over stdin) through an inbound
listener. Each message must reach the sink byte-for-byte behind exactly one prepended Received header that
names the client leg's TLS version, and mailflow_messages_total must move by exactly one, in exactly the
series {connector="internet", direction="inbound", tls_version=<client leg>} (the upstream leg to the sink
is TLS1.3, so counting the wrong leg shows). A TLS session (TLS1.2 session ticket, TLS1.3 PSK) resumes on the
listener that issued it and not on another listener of the same daemon (openssl s_client -sess_out/-sess_in)."""
import re
import subprocess
import types

import pytest

import harness
from harness import delta, fmt_delta, value

MESSAGE = (b"From: Sender <sender@example.test>\r\n"
           b"To: <rcpt@dest.test>\r\n"
           b"Subject: client leg\r\n"
           b"Message-ID: <client-leg@example.test>\r\n"
           b"\r\n"
           b"first line\r\n"
           b".a line that starts with a dot\r\n"
           b"..two dots\r\n"
           b".\r\n"
           b"  indented, trailing blanks \t \r\n"
           b"From the start of a line\r\n"
           b"\r\n"
           b"last line\r\n")


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store", tls_cert=certs / "sink.pem", tls_key=certs / "sink.key")
    port = harness.free_port()
    daemon = daemon_factory(
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "tls": harness.listener_tls(certs), "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "opportunistic"}])
    return types.SimpleNamespace(sink=sink, daemon=daemon, port=port)


def check_delivery(env, before, label, sink_count):
    """The assertions shared by every client-leg case."""
    meta, content = env.sink.wait_messages(sink_count + 1)[-1]
    assert len(env.sink.messages()) == sink_count + 1, "more than one message arrived at the sink"
    headers, rest = harness.split_received(content)
    assert len(headers) == 1, f"expected exactly one prepended Received header, got:\n{content[:2000]!r}"
    assert rest == MESSAGE, f"message altered in transit:\nsent {MESSAGE!r}\ngot  {rest!r}"
    received = headers[0]
    assert harness.HOSTNAME.encode() in received, f"Received header does not name {harness.HOSTNAME}: {received!r}"
    assert b"127.0.0.1" in received, f"Received header does not name the client address: {received!r}"
    expected = [] if label == "none" else [label]
    assert harness.tls_mentions(received) == expected, \
        f"Received header should name {label} (and no other TLS version): {received!r}"
    assert meta["mail_from"] == "sender@example.test" and meta["rcpt_tos"] == ["rcpt@dest.test"], meta

    after = harness.assert_counted(env.daemon, before, "internet", "inbound", label)
    want = {harness.series_key(connector="internet", direction="inbound", tls_version=label): 1.0}
    rcpts = delta(before, after, "mailflow_recipients_total")
    assert rcpts == want, f"mailflow_recipients_total moved:\n{fmt_delta(rcpts)}"
    grown = value(after, "mailflow_message_bytes_total", connector="internet", tls_version=label) - \
        value(before, "mailflow_message_bytes_total", connector="internet", tls_version=label)
    assert grown >= len(MESSAGE), f"mailflow_message_bytes_total grew by {grown}, message is {len(MESSAGE)} bytes"


CASES = [(None, "none"), ("tlsv1", "TLS1.0"), ("tlsv1_1", "TLS1.1"), ("tlsv1_2", "TLS1.2"), ("tlsv1_3", "TLS1.3")]


@pytest.mark.parametrize("proto,label", CASES, ids=[c[1] for c in CASES])
def test_swaks_client_leg(env, proto, label):
    before = env.daemon.metrics()
    n = env.sink.count()
    r = harness.swaks(env.port, data=MESSAGE, tls=proto)
    assert r.rc == 0, f"swaks failed:\n{r}"
    assert r.final_replies()[-2].startswith("250"), f"end of data not accepted:\n{r}"
    check_delivery(env, before, label, n)
    # the session is over (QUIT): both legs are counted in mailflow_sessions_total, each with its own version
    client = harness.series_key(leg="client", listener="inbound", tls_version=label)
    upstream = harness.series_key(leg="upstream", listener="inbound", tls_version="TLS1.3")
    after = harness.wait_moved(env.daemon, before, "mailflow_sessions_total", at_least=2)
    moved = delta(before, after, "mailflow_sessions_total")
    assert moved == {client: 1.0, upstream: 1.0}, f"mailflow_sessions_total moved:\n{fmt_delta(moved)}"


def test_every_series_exported_from_start(env):
    m = env.daemon.metrics()
    for label in harness.TLS_LABELS:
        assert ("mailflow_messages_total",
                frozenset({"connector": "internet", "direction": "inbound", "tls_version": label}.items())) in m, \
            f"mailflow_messages_total{{connector=internet,direction=inbound,tls_version={label}}} missing"


@pytest.mark.parametrize("flag,label", [("-tls1_2", "TLS1.2"), ("-tls1", "TLS1.0")])
def test_openssl_s_client(env, flag, label):
    before = env.daemon.metrics()
    n = env.sink.count()
    c = harness.SClient(env.port, flag)
    try:
        code, text = c.cmd("EHLO client.example.test")
        assert code == 250, text
        assert "STARTTLS" not in text, "STARTTLS still offered inside TLS"
        assert c.cmd("MAIL FROM:<sender@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        for line in harness.dot_stuff(MESSAGE).decode().split("\r\n")[:-1]:
            c.send_line(line)
        code, text = c.cmd(".")
        assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    check_delivery(env, before, label, n)


def test_second_message_same_session_counts_again(env):
    """Two transactions in one session: two deliveries, two counts (the upstream connection is reused)."""
    before = env.daemon.metrics()
    n = env.sink.count()
    c = harness.RawSmtp(env.port)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls("TLS1.2")
        assert c.cmd("EHLO client.example.test")[0] == 250
        for i in range(2):
            assert c.cmd("MAIL FROM:<sender@example.test>")[0] == 250
            assert c.cmd("RCPT TO:<rcpt@dest.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(harness.dot_stuff(MESSAGE))
            code, text = c.cmd(".")
            assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    msgs = env.sink.wait_messages(n + 2)
    for _, content in msgs[-2:]:
        assert harness.split_received(content)[1] == MESSAGE
    harness.assert_counted(env.daemon, before, "internet", "inbound", "TLS1.2", n=2)


def s_client_session(port, version_flag, sess_out=None, sess_in=None, servername=None):
    """One STARTTLS session with openssl s_client (QUIT over TLS: EHLO with QUIT behind it is pipelining RFC 2920
    forbids): "Reused" or "New", as s_client says it.
    `sess_out` saves the session (with its ticket), `sess_in` offers a saved one for resumption."""
    argv = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}", version_flag,
            "-cipher", "DEFAULT:@SECLEVEL=0", "-name", "client.example.test", "-ign_eof"]
    argv += ["-sess_out", str(sess_out)] if sess_out else []
    argv += ["-sess_in", str(sess_in)] if sess_in else []
    argv += ["-servername", servername] if servername else []
    # -ign_eof: s_client reads until the server closes after QUIT, so a TLS1.3 ticket (sent after the handshake)
    # is received before the session is saved.
    r = subprocess.run(argv, input=b"QUIT\r\n", capture_output=True, timeout=20)
    out = r.stdout.decode("utf-8", "replace")
    found = re.search(r"^(Reused|New), ", out, re.M)
    assert found and "221 " in out, f"s_client session failed:\n$ {' '.join(argv)}\n{out[-3000:]}\n{r.stderr[-2000:]!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def two_listeners(certs, sink_factory, daemon_factory):
    """Listener a serves server.pem, listener b other.pem; one daemon, so they share the ticket keys."""
    sink = sink_factory("resume-store")
    ports = {"a": harness.free_port(), "b": harness.free_port()}
    other = {"certificates": [{"cert": str(certs / "other.pem"), "key": str(certs / "other.key")}],
             "min_version": "TLS1.0", "ciphers": "DEFAULT:@SECLEVEL=0"}
    listeners = [{"name": "a", "address": f"127.0.0.1:{ports['a']}", "direction": "inbound",
                  "tls": harness.listener_tls(certs), "upstream": "store"},
                 {"name": "b", "address": f"127.0.0.1:{ports['b']}", "direction": "inbound",
                  "tls": other, "upstream": "store"}]
    daemon = daemon_factory(listeners=listeners, name="resume",
                            upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}])
    return types.SimpleNamespace(daemon=daemon, ports=ports)


@pytest.mark.parametrize("version_flag", ["-tls1_2", "-tls1_3"])
def test_session_resumes_only_on_the_listener_that_issued_it(two_listeners, workdir, version_flag):
    """Listeners share the ticket keys; a session (ticket) issued by listener `a` (certificate server.pem)
    resumes there, and never on listener `b` (certificate other.pem): b makes a full handshake with its own
    certificate instead."""
    ports = two_listeners.ports
    saved = workdir / f"a-session{version_flag}.pem"
    assert s_client_session(ports["a"], version_flag, sess_out=saved) == "New"
    assert s_client_session(ports["a"], version_flag, sess_in=saved) == "Reused", \
        "the session did not resume on the listener that issued it: the test would prove nothing"
    assert s_client_session(ports["b"], version_flag, sess_in=saved) == "New", \
        "a session issued by listener a (another certificate) resumed on listener b"
