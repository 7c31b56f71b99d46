"""A fixed upstream whose `address` is a host name with several addresses: each address gets its own
timeouts.upstream_connect (connect and banner), as each MX host address does and as Postfix gives each attempt its
own smtp_connect_timeout, and the next address is tried after one that black-holes; all of it within
timeouts.upstream_open.

The host name two.upstream.test resolves (getaddrinfo, /etc/hosts: the daemon runs in a mount namespace of its
own with a hosts file of the test's bound over /etc/hosts) to 127.0.0.181, then 127.0.0.182, both on port P:
- `silent`: 127.0.0.181 accepts and never greets, 127.0.0.182 is a sink;
- `backlog`: 127.0.0.181's accept queue is full (its SYNs are dropped, the connect hangs), 127.0.0.182 a sink;
- `both`: both addresses accept and never greet: 451 4.4.2 when upstream_open passes (5 s), not sooner or later.
- `six`: six.upstream.test has six addresses (127.0.0.183 to .188, on a port of its own), each greeting with 421:
  five are tried (Postfix's smtp_mx_address_limit, which holds for every destination), then 451 4.4.1 at once;
- `greeters`: greeters.upstream.test has three addresses (127.0.0.185 to .187) that greet with 220 and refuse
  EHLO: two sessions are tried (smtp_mx_session_limit), the third address is not.
Before, every address was tried: a name with many dead addresses held the RCPT until upstream_open.
With upstream_connect 3s the first two deliver through the second address after about 3 s; before, the first
address's timeout spent the one upstream_connect of all the addresses and ended the loop: 451 4.4.1."""
import socket
import time
import types

import pytest

import harness
import hostile_helpers as hh

UPSTREAM_CONNECT = 3.0
UPSTREAM_OPEN = 5.0  # after the first address's upstream_connect, 2 s for the second one's connect, banner and EHLO
MARGIN = 1.5
FIRST, SECOND = "127.0.0.181", "127.0.0.182"  # two.upstream.test
BOTH_FIRST, BOTH_SECOND = "127.0.0.183", "127.0.0.184"  # both.upstream.test
SIX = [f"127.0.0.{n}" for n in range(183, 189)]  # six.upstream.test
GREETERS = [f"127.0.0.{n}" for n in range(185, 188)]  # greeters.upstream.test


def silent(conn):
    """Accepts and never sends a banner."""
    conn.hang(30)


def busy(conn):
    """Greets with 421 (no session), then waits for QUIT or the close."""
    conn.send(b"421 4.3.2 busy\r\n")
    try:
        conn.line()
    except (ConnectionError, OSError):
        pass


def refuses_ehlo(conn):
    """Greets with 220 (a session), then refuses EHLO with 421."""
    conn.send(b"220 greeter.test ESMTP\r\n")
    try:
        conn.line()
        conn.send(b"421 4.3.2 going away\r\n")
        conn.line()
    except (ConnectionError, OSError):
        pass


class FullBacklog:
    """A listening socket on `host`:`port` whose accept queue is full and never drained: the kernel drops further
    SYNs, so a connect to it hangs."""

    def __init__(self, host, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(0)
        self.fillers = []
        for _ in range(4):  # a backlog of 0 still queues one or two: fill it for sure
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((host, port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
        time.sleep(0.2)

    def stop(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


@pytest.fixture(scope="module")
def env(workdir, mailflowd_bin, sink_factory):
    hosts = workdir / "addresses-hosts"
    hosts.write_text(f"{FIRST} two.upstream.test\n{SECOND} two.upstream.test\n"
                     f"{BOTH_FIRST} both.upstream.test\n{BOTH_SECOND} both.upstream.test\n"
                     + "".join(f"{a} six.upstream.test\n" for a in SIX)
                     + "".join(f"{a} greeters.upstream.test\n" for a in GREETERS))
    ports = {name: harness.free_port(FIRST, SECOND) for name in ("silent", "backlog")}
    ports["both"] = harness.free_port(BOTH_FIRST, BOTH_SECOND)
    ports["six"] = harness.free_port(*SIX)
    ports["greeters"] = harness.free_port(*GREETERS)
    sinks = {name: sink_factory(f"second-{name}", host=SECOND, port=ports[name]) for name in ("silent", "backlog")}
    holes = [hh.FakeUpstream("silent", silent, host=FIRST, port=ports["silent"]),
             FullBacklog(FIRST, ports["backlog"]),
             hh.FakeUpstream("both1", silent, host=BOTH_FIRST, port=ports["both"]),
             hh.FakeUpstream("both2", silent, host=BOTH_SECOND, port=ports["both"])]
    six = [hh.FakeUpstream(f"six{i}", busy, host=a, port=ports["six"]) for i, a in enumerate(SIX)]
    greeters = [hh.FakeUpstream(f"greeter{i}", refuses_ehlo, host=a, port=ports["greeters"])
                for i, a in enumerate(GREETERS)]
    holes += six + greeters
    daemon = None
    try:
        listen = {name: harness.free_port() for name in ports}
        listeners = [hh.listener(name, listen[name], name) for name in ports]
        host = {"silent": "two", "backlog": "two", "both": "both", "six": "six", "greeters": "greeters"}
        upstreams = [{"name": name, "address": f"{host[name]}.upstream.test:{port}", "tls": "none"}
                     for name, port in ports.items()]
        state = workdir / "addresses-state"
        state.mkdir(exist_ok=True)
        cfg = harness.default_config(state, harness.free_port(), listeners, upstreams,
                                     timeouts={"greeting": "10s", "command": "10s",
                                               "upstream_connect": f"{UPSTREAM_CONNECT:g}s",
                                               "upstream_open": f"{UPSTREAM_OPEN:g}s"})
        daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="addresses",
                                wrapper=harness.in_own_files(hosts)).start()
        yield types.SimpleNamespace(daemon=daemon, listen=listen, sinks=sinks, holes=holes, six=six,
                                    greeters=greeters)
    finally:
        if daemon is not None:
            harness.stop_exits_0(daemon)
        for hole in holes:
            hole.stop()


def timed_rcpt(port):
    c = hh.greeted(port, timeout=20)
    assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
    start = time.monotonic()
    reply = c.cmd(f"RCPT TO:<{hh.RCPT}>")
    return c, reply, time.monotonic() - start


@pytest.mark.parametrize("first", ["silent", "backlog"])
def test_next_address_after_one_that_black_holes(env, first):
    d, sink = env.daemon, env.sinks[first]
    before = d.metrics()
    n = sink.count()
    c, (code, text), elapsed = timed_rcpt(env.listen[first])
    try:
        assert code == 250, f"RCPT: {text!r} after {elapsed:.2f}s\n{d.log_tail()}"
        assert UPSTREAM_CONNECT - 0.3 < elapsed < UPSTREAM_CONNECT + MARGIN, f"250 after {elapsed:.2f}s"
        assert c.cmd("DATA")[0] == 354
        c.send(harness.dot_stuff(hh.message(f"past {first}")))
        code, text = c.cmd(".")
        assert code == 250, text
    finally:
        c.close()
    meta, content = sink.wait_messages(n + 1)[-1]
    assert f"Subject: past {first}".encode() in content
    after = harness.assert_counted(d, before, "internet", "inbound", "none")
    # The first address's timeout, and nothing else.
    reason = "connect_timeout" if first == "backlog" else "timeout"
    assert harness.delta(before, after, "mailflow_upstream_errors_total") == {
        harness.series_key(upstream=first, reason=reason): 1.0}
    # The log line says which address failed.
    lines = [x for x in d.stderr().splitlines() if " upstream_error " in x and f"upstream={first} " in x]
    assert lines and f"address={FIRST}:" in lines[-1] and f"reason={reason}" in lines[-1], lines


def test_every_address_black_holes_451_at_upstream_open(env):
    d = env.daemon
    before = d.metrics()
    c, (code, text), elapsed = timed_rcpt(env.listen["both"])
    try:
        assert code == 451 and text.startswith("451 4.4.2 "), text
        assert UPSTREAM_OPEN - 0.3 < elapsed < UPSTREAM_OPEN + MARGIN, f"451 after {elapsed:.2f}s"
        assert c.cmd("NOOP")[0] == 250, "the client session goes on"
    finally:
        c.close()
    assert env.holes[2].connections() == 1 and env.holes[3].connections() == 1, "both addresses were tried"
    after = d.metrics()
    assert harness.delta(before, after, "mailflow_upstream_errors_total") == {
        harness.series_key(upstream="both", reason="timeout"): 1.0,
        harness.series_key(upstream="both", reason="open_timeout"): 1.0}


def limit_lines(daemon, upstream):
    """The limit= field of each mx_limit line logged for `upstream`."""
    lines = [x.split() for x in daemon.stderr().splitlines() if " mx_limit " in x and f"upstream={upstream} " in x]
    return [w for words in lines for w in words if w.startswith("limit=")]


@pytest.mark.parametrize("name, tried, limit", [("six", 5, "addresses"), ("greeters", 2, "sessions")])
def test_postfix_limits_on_the_addresses_tried(env, name, tried, limit):
    """Postfix's smtp_mx_address_limit (5) and smtp_mx_session_limit (2) hold for a fixed upstream's host name as
    for an MX walk: six addresses that greet with 421 (no session) get five attempts; three that greet and then
    refuse EHLO get two. Then 451 4.4.1 at once, not at upstream_open."""
    d, fakes = env.daemon, getattr(env, name)
    before = d.metrics()
    logged = len(limit_lines(d, name))
    c, (code, text), elapsed = timed_rcpt(env.listen[name])
    try:
        assert code == 451 and text.startswith("451 4.4.1 "), text
        assert elapsed < UPSTREAM_CONNECT, f"451 after {elapsed:.2f}s"
        assert c.cmd("NOOP")[0] == 250, "the client session goes on"
    finally:
        c.close()
    counts = [f.connections() for f in fakes]
    assert sorted(counts) == [0] * (len(fakes) - tried) + [1] * tried, counts
    moved = harness.delta(before, d.metrics(), "mailflow_upstream_errors_total", upstream=name)
    assert sum(moved.values()) == tried, harness.fmt_delta(moved)
    deadline = time.monotonic() + 5
    while len(limit_lines(d, name)) == logged and time.monotonic() < deadline:
        time.sleep(0.1)
    assert limit_lines(d, name)[logged:] == [f"limit={limit}"], d.log_tail()
