"""XCLIENT: with `xclient: auto` and a sink that advertises it, the real client's ADDR/PORT/HELO/PROTO reach
the sink, and mailflowd says EHLO again with the client's own name; with `xclient: off`, or a sink that does
not advertise it, no XCLIENT is sent and mail still flows. An upstream that answers XCLIENT with 421 (its
goodbye) is counted as xclient_rejected, and the RCPT gets 451."""
import types

from harness import delta, series_key

import pytest

import harness
import hostile_helpers as hh

MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: xclient\r\n\r\nbody\r\n"


def xclient_goodbye(conn):
    conn.send(b"220 fake.test ESMTP\r\n")
    conn.line()  # EHLO
    conn.send(b"250-fake.test\r\n250 XCLIENT ADDR PORT HELO PROTO\r\n")
    conn.line()  # XCLIENT
    conn.send(b"421 4.3.2 closing, try again later\r\n")
    conn.sock.close()


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    xsink = sink_factory("xsink", xclient=True)
    plain = sink_factory("plain")
    goodbye = hh.FakeUpstream("goodbye", xclient_goodbye)
    routes = {"in-auto": ("x-auto", xsink, "auto"), "in-off": ("x-off", xsink, "off"),
              "in-unadvertised": ("x-unadvertised", plain, "auto"),
              "in-goodbye": ("x-goodbye", goodbye, "auto")}
    ports = {name: harness.free_port() for name in routes}
    daemon = daemon_factory(
        listeners=[{"name": name, "address": f"127.0.0.1:{ports[name]}", "direction": "inbound",
                    "tls": harness.listener_tls(certs), "upstream": up} for name, (up, _, _) in routes.items()],
        upstreams=[{"name": up, "address": f"127.0.0.1:{sink.port}", "tls": "none", "xclient": mode}
                   for up, sink, mode in routes.values()])
    yield types.SimpleNamespace(daemon=daemon, ports=ports, xsink=xsink, plain=plain, goodbye=goodbye)
    goodbye.stop()


def send_from(port, source, ehlo):
    """Raw session from `source`; returns the client's own port."""
    c = harness.RawSmtp(port, source=source)
    try:
        client_port = c.sock.getsockname()[1]
        assert c.reply()[0] == 220
        assert c.cmd(f"EHLO {ehlo}")[0] == 250
        code, text = hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))
        assert code == 250, text
        c.cmd("QUIT")
        return client_port
    finally:
        c.close()


def test_xclient_attributes_reach_sink(env):
    n = env.xsink.count()
    client_port = send_from(env.ports["in-auto"], "127.0.0.2", "client.example.test")
    meta, content = env.xsink.wait_messages(n + 1)[-1]
    x = meta["xclient"]
    assert x is not None, f"no XCLIENT reached the sink: {meta}"
    assert x.get("ADDR") == "127.0.0.2", x
    assert x.get("PORT") == str(client_port), x
    assert x.get("HELO") == "client.example.test", x
    assert x.get("PROTO") in ("ESMTP", "SMTP"), x
    assert meta["helo"] == "client.example.test", f"EHLO after XCLIENT should carry the client's name: {meta}"
    assert harness.split_received(content)[1] == MESSAGE


def test_xclient_off(env):
    n = env.xsink.count()
    send_from(env.ports["in-off"], "127.0.0.2", "client.example.test")
    meta, _ = env.xsink.wait_messages(n + 1)[-1]
    assert meta["xclient"] is None, f"xclient: off, yet XCLIENT was sent: {meta['xclient']}"


def test_xclient_not_advertised(env):
    n = env.plain.count()
    send_from(env.ports["in-unadvertised"], "127.0.0.2", "client.example.test")
    meta, _ = env.plain.wait_messages(n + 1)[-1]
    assert meta["xclient"] is None


def test_new_helo_name_reaches_the_sink_on_the_next_transaction(env):
    """A client that greets again with another name (EHLO resets the session) must not have its next message
    sent over the upstream connection that XCLIENT and EHLO set up with the old name: the sink's HELO
    checks and Received: field would see a name the client no longer uses."""
    n = env.xsink.count()
    c = harness.RawSmtp(env.ports["in-auto"], source="127.0.0.2")
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO first.example.test")[0] == 250
        code, text = hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))
        assert code == 250, text
        assert c.cmd("HELO second.example.test")[0] == 250
        code, text = hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))
        assert code == 250, text
        c.cmd("QUIT")
    finally:
        c.close()
    first, second = [meta for meta, _ in env.xsink.wait_messages(n + 2)[-2:]]
    assert first["xclient"]["HELO"] == "first.example.test", first
    assert second["xclient"]["HELO"] == "second.example.test", second
    assert second["xclient"]["PROTO"] == "SMTP", second
    assert second["helo"] == "second.example.test", second


def test_xclient_answered_421_is_counted_as_such(env):
    """421 to XCLIENT is the upstream's goodbye: the RCPT gets 451 and the error is xclient_rejected (going on
    without XCLIENT found the close only at MAIL and counted connection_lost)."""
    before = env.daemon.metrics()
    c = harness.RawSmtp(env.ports["in-goodbye"])
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<r@dest.test>")
        assert code == 451, text
    finally:
        c.close()
    after = hh.assert_counter(env.daemon, before, "mailflow_upstream_errors_total", upstream="x-goodbye",
                              reason="xclient_rejected")
    assert delta(before, after, "mailflow_upstream_errors_total") == {
        series_key(upstream="x-goodbye", reason="xclient_rejected"): 1.0}
    assert env.goodbye.connections() == 1
