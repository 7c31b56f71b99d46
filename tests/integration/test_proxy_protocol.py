"""PROXY protocol: a header from an untrusted peer is refused (closed or 5xx, nothing relayed,
mailflow_rejects_total moved); a v1 or v2 header from a trusted peer carrying source 127.0.0.2 makes the
CIDR connector match and the Received header name 127.0.0.2."""
import re
import time
import types

import pytest

import harness
import hostile_helpers as hh
from harness import delta

MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: proxied\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    ports = {"proxied": harness.free_port(), "behind-lb": harness.free_port()}
    daemon = daemon_factory(
        listeners=[
            # trusts only 127.0.0.1: clients connecting from 127.0.0.2 are untrusted
            {"name": "proxied", "address": f"127.0.0.1:{ports['proxied']}", "direction": "inbound",
             "proxy_protocol": {"trusted": ["127.0.0.1/32"]}, "upstream": "store"},
            # trusts only 127.0.0.3: a header from 127.0.0.1 is untrusted
            {"name": "behind-lb", "address": f"127.0.0.1:{ports['behind-lb']}", "direction": "inbound",
             "proxy_protocol": {"trusted": ["127.0.0.3/32"]}, "upstream": "store"},
        ],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
        connectors=[{"name": "partner-cidr", "type": "partner", "direction": "inbound",
                     "match": {"client_cidrs": ["127.0.0.2/32"]}}])
    return types.SimpleNamespace(sink=sink, daemon=daemon, ports=ports)


def refused(c):
    """True when the server closes the connection or answers 5xx (reading up to 6 s)."""
    c.sock.settimeout(6.0)
    try:
        while True:
            code, text = c.reply()
            if code >= 500:
                return True
            if code == 220:
                continue  # a banner sent before the header was read; the header must still be refused
            return False
    except (ConnectionError, OSError):
        return True


def client_header(version, port):
    """A PROXY header (v1 or v2) that says the client is 127.0.0.2:40000, connected to 127.0.0.1:port."""
    return (harness.proxy_v1 if version == "v1" else harness.proxy_v2)("127.0.0.2", "127.0.0.1", 40000, port)


@pytest.mark.parametrize("listener,source", [("proxied", "127.0.0.2"), ("behind-lb", "127.0.0.1")])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_from_untrusted_peer_refused(env, listener, source, version):
    before = env.daemon.metrics()
    conns, n = env.sink.connections(), env.sink.count()
    port = env.ports[listener]
    header = client_header(version, port)
    c = harness.RawSmtp(port, source=source)
    try:
        c.send(header)
        assert refused(c), f"a PROXY {version} header from untrusted {source} must be refused (close or 5xx)"
    finally:
        c.close()
    assert env.sink.connections() == conns and env.sink.count() == n, "something was relayed upstream"
    harness.assert_not_counted(env.daemon, before, settle=0.2)
    harness.wait_for(lambda: delta(before, env.daemon.metrics(), "mailflow_rejects_total", listener=listener), 3,
                     what=f"mailflow_rejects_total{{listener={listener}}} to move")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_from_untrusted_peer_split_after_four_octets_refused(env, version):
    """The same header from an untrusted peer, its first four octets in a write of their own (too few to tell
    a header from a command): still 554 5.7.0 and close, counted as proxy_untrusted, not 500 for "PROXY ..."
    (or for the empty lines of the v2 signature) with the session going on."""
    before = env.daemon.metrics()
    conns = env.sink.connections()
    port = env.ports["proxied"]
    header = client_header(version, port)
    c = harness.RawSmtp(port, source="127.0.0.2")
    try:
        assert c.reply()[0] == 220
        c.send(header[:4])
        time.sleep(0.3)
        c.send(header[4:])
        data, closed = hh.read_all(c.sock, wait=3.0)
        c.transcript.append(f"S: {data!r} closed={closed}")
    finally:
        c.close()
    assert data.startswith(b"554 5.7.0 "), f"a split PROXY {version} header from an untrusted peer: {data!r}"
    assert closed, "the session went on after the untrusted PROXY header"
    assert env.sink.connections() == conns, "something was relayed upstream"
    hh.assert_rejected(env.daemon, before, "proxy_untrusted", listener_name="proxied")


def test_empty_line_held_for_the_header_check_is_no_pipelining(env):
    """A client's first line "\r\n" is held back (it may begin a v2 signature) until more comes. The EHLO
    that the client sends after it, unanswered, is no pipelining: the empty line gets its 500 and the EHLO its
    250, as when the empty line was not held. They came in apart, but the held line was judged with the EHLO
    waiting behind it, so the client got 554 5.5.0 (unauth_pipelining) and was closed."""
    before = env.daemon.metrics()
    c = harness.RawSmtp(env.ports["proxied"], source="127.0.0.2")
    try:
        assert c.reply()[0] == 220
        c.send(b"\r\n")
        time.sleep(0.3)
        code, text = c.cmd("EHLO client.example.test")
        assert code == 500, f"the empty line: {text!r}"
        code, text = c.reply()
        assert code == 250, f"the EHLO sent after the empty line: {text!r}"
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    assert not delta(before, env.daemon.metrics(), "mailflow_rejects_total", reason="unauth_pipelining")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_trusted_header_sets_client_address(env, version):
    before = env.daemon.metrics()
    n = env.sink.count()
    port = env.ports["proxied"]
    header = client_header(version, port)
    c = harness.RawSmtp(port, source="127.0.0.1")
    try:
        c.send(header)
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        code, text = hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))
        assert code == 250, text
        c.cmd("QUIT")
    finally:
        c.close()
    _, content = env.sink.wait_messages(n + 1)[-1]
    headers, rest = harness.split_received(content)
    assert rest == MESSAGE and len(headers) == 1
    assert re.search(rb"\b127\.0\.0\.2\b", headers[0]), f"Received should name the proxied client: {headers[0]!r}"
    harness.assert_counted(env.daemon, before, "partner-cidr", "inbound", "none")


def test_trusted_peer_without_header_refused(env):
    """The listener requires a PROXY header from its trusted peers: plain SMTP from one is refused."""
    conns = env.sink.connections()
    c = harness.RawSmtp(env.ports["proxied"], source="127.0.0.1")
    try:
        c.send(b"EHLO client.example.test\r\n")
        assert refused(c), "plain SMTP without the PROXY header from a trusted peer must be refused"
    finally:
        c.close()
    assert env.sink.connections() == conns
