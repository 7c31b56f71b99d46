"""IPv6: a listener on [::1] relays, the session log and the Received header carry the IPv6 client, and a
connector matches an IPv6 CIDR."""
import types

import pytest

import harness
import hostile_helpers as hh

MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: v6\r\n\r\nover IPv6\r\n"


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("sink")
    port = harness.free_port("::1")
    daemon = daemon_factory(
        listeners=[{"name": "v6", "address": f"[::1]:{port}", "direction": "inbound", "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
        connectors=[{"name": "loopback6", "type": "onpremises", "match": {"listener": "v6", "client_cidrs": ["::1/128"]}}])
    return types.SimpleNamespace(daemon=daemon, port=port, sink=sink)


def test_relay_over_ipv6(env):
    before = env.daemon.metrics()
    n = env.sink.count()
    c = harness.RawSmtp(env.port, host="::1")
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO v6.example.test")[0] == 250
        assert hh.transaction(c, MESSAGE, "s@example.test", ("r@dest.test",))[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()
    _, content = env.sink.wait_messages(n + 1)[-1]
    received, rest = harness.split_received(content)
    assert len(received) == 1 and rest == MESSAGE
    assert b"[IPv6:::1]" in received[0], received[0]
    harness.assert_counted(env.daemon, before, "loopback6", "inbound", "none")
    harness.wait_for(lambda: "client=[::1]:" in env.daemon.stderr(), what="session log line with [::1]")


def test_any_address_listener_is_ipv6_only_beside_an_ipv4_one(sink_factory, daemon_factory):
    """"[::]:PORT" takes IPv6 clients only (IPV6_V6ONLY, as mailflowd.socket's BindIPv6Only=ipv6-only), so an
    IPv4 listener "0.0.0.0:PORT" on the same port can sit beside it and each client counts under the listener
    of its address family (docs/configuration.md, the example mailflowd.yaml)."""
    sink = sink_factory("sink-any")
    port = harness.free_port()
    daemon = daemon_factory(
        listeners=[{"name": "any6", "address": f"[::]:{port}", "direction": "inbound", "upstream": "store"},
                   {"name": "any4", "address": f"0.0.0.0:{port}", "direction": "inbound", "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}], name="anyaddr")
    for host in ("::1", "127.0.0.1"):
        c = harness.RawSmtp(port, host=host)
        try:
            assert c.reply()[0] == 220
            c.cmd("QUIT")
        finally:
            c.close()
    harness.wait_for(lambda: "client=[::1]:" in daemon.stderr() and "client=127.0.0.1:" in daemon.stderr(),
                     what="both session lines")
    lines = [line for line in daemon.stderr().splitlines() if " session " in line]
    assert any("client=[::1]:" in line and "listener=any6" in line for line in lines), lines
    assert any("client=127.0.0.1:" in line and "listener=any4" in line for line in lines), lines
