"""A reload that changes `dns` while sessions from before it are still open. Each event loop keeps one
libunbound context (and its cache) for the MX walk; it follows the newest settings, so that the sessions
from before the reload look up through the reload's servers too. Before, such a session replaced the loop's
context with one made from its own (older) settings, and the next new session replaced it back: every other
lookup started from an empty cache, and each replacement made a new libunbound context and worker thread.

Against the real binary, a real knotd behind two counting UDP forwarders (the servers before and after the
reload), and a real sink as the MX host. The fixed loopback address is this file's: 127.0.0.206."""
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

import harness
from hostile_helpers import greeted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, TamperingProxy  # noqa: E402

ORIGIN = "dnsreload.example.net"
MX = "127.0.0.206"
MX_TYPE = 15


def zone():
    return f"""$ORIGIN {ORIGIN}.
$TTL 300
@   SOA  ns hostmaster 1 3600 600 86400 300
@   NS   ns
ns  A    127.0.0.1
a   MX   10 mx
b   MX   10 mx
mx  A    {MX}
"""


@pytest.fixture(scope="module")
def env(workdir, sink_factory, daemon_factory):
    short_dir = Path(tempfile.mkdtemp(prefix="mf-dnsrl-"))  # knotd's control socket path must stay short
    knot = KnotServer(short_dir, {ORIGIN: zone()}).start()
    before, after = TamperingProxy(knot.address), TamperingProxy(knot.address)
    try:
        port = harness.free_port("127.0.0.1", MX)
        sink = sink_factory("dnsrl-mx", host=MX, port=port)
        daemon = daemon_factory(
            [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
            [{"name": "internet", "mx": True, "port": port, "tls": "none", "mta_sts": "off"}],
            name="dnsrl", dns={"servers": [before.address], "timeout": "3s"})
        yield daemon, sink, before, after
    finally:
        before.close()
        after.close()
        knot.stop()
        shutil.rmtree(short_dir, ignore_errors=True)


def mx_queries(proxy):
    return sorted(name for name, qtype in proxy.questions if qtype == MX_TYPE)


def deliver(c, domain, n):
    """One transaction to `domain`. The session's upstream connection is kept only for the same domain: a
    transaction to the other one opens the upstream again, and with it looks the domain's MX up."""
    rcpt = f"user{n}@{domain}.{ORIGIN}"
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    code, text = c.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 250, text
    assert c.cmd("DATA")[0] == 354
    c.send(f"From: app@corp.example\r\nTo: {rcpt}\r\nSubject: dns reload {n}\r\n\r\nbody\r\n".encode())
    code, text = c.cmd(".")
    assert code == 250, text


def test_sessions_from_before_a_dns_reload_use_the_reloads_resolver(env):
    daemon, sink, before, after = env
    port = daemon.listener_port("out")
    old = greeted(port)  # keeps the configuration of before the reload for its whole life
    try:
        deliver(old, "a", 0)
        assert mx_queries(before) == [f"a.{ORIGIN}"] and mx_queries(after) == []
        reloaded = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
        daemon.config["dns"]["servers"] = [after.address]
        daemon.config_path.write_text(json.dumps(daemon.config, indent=2) + "\n")
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total",
                                               result="success") > reloaded, 10, what="the reload")
        new = greeted(port)
        try:
            n = 1
            for domain in ("a", "b", "a", "b"):  # new and old sessions in turn, each on the other domain
                deliver(new, domain, n)
                deliver(old, "b" if domain == "a" else "a", n + 1)
                n += 2
        finally:
            new.close()
    finally:
        old.close()
    assert mx_queries(after) == [f"a.{ORIGIN}", f"b.{ORIGIN}"], (
        f"the loop's resolver was made again (an empty cache) after the reload: {after.questions}")
    assert mx_queries(before) == [f"a.{ORIGIN}"], (
        f"a session from before the reload asked the old servers: {before.questions}")
    harness.wait_for(lambda: len(sink.messages()) >= 9, 10, what="the 9 messages at the sink")
