"""A fixed upstream's host name (`address: "name:port"`, no `mx: true`) whose name servers do not answer, against the
real binary: the daemon runs in a mount namespace of its own with the test's /etc/hosts and /etc/resolv.conf bound
over the system's; the name server (127.0.0.85:53) is a UDP socket that takes every query and never answers.

- slow.upstream.example is in no hosts file: its lookup goes to the silent name server (not a name under .test,
  which libunbound answers NXDOMAIN itself, RFC 6761);
- fast.upstream.test is in the hosts file (127.0.0.86, a sink there).

Several sessions need slow.upstream.example at once, and one fast.upstream.test just after them. Each slow lookup
must end by timeouts.upstream_connect (3 s) on its own: the sessions' lookups run side by side, none waits for
another's, and the fast name, which /etc/hosts answers, is not held up by them.

Before, the lookup was Asio's async_resolve (getaddrinfo), which Asio runs on one private thread per event loop,
one lookup after the other: with resolv.conf's timeout:3 each getaddrinfo took 3 s, the first session got its 451
at 3 s, the second at 6 s (its lookup started when the first one ended, and upstream_connect could not cut it
short), the third and the fast one (cancelled at their deadlines, but queued) at 6 s: the fast upstream, whose
name /etc/hosts has, got 451 4.4.1 connect_timeout. Sessions whose clients had gone stayed active until the queue
reached their lookups."""
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import SilentServer  # noqa: E402

DNS_SERVER = "127.0.0.85"  # port 53: what resolv.conf names (it cannot say another port)
FAST = "127.0.0.86"  # fast.upstream.test in the hosts file
MOVED_FROM, MOVED_TO = "127.0.0.87", "127.0.0.88"  # moved.upstream.test before and after the hosts file changes
UPSTREAM_CONNECT = 3.0
RESOLV_TIMEOUT = 3  # getaddrinfo's own, per lookup (resolv.conf options timeout:, attempts:1)
MARGIN = 1.5
SLOW_SESSIONS = 3


@pytest.fixture(scope="module")
def env(workdir, mailflowd_bin, sink_factory):
    try:
        dns = SilentServer(DNS_SERVER, 53)
    except OSError as e:
        pytest.skip(f"cannot bind {DNS_SERVER}:53 for the silent name server: {e}")
    hosts = workdir / "name-lookup-hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{FAST} fast.upstream.test\n{MOVED_FROM} moved.upstream.test\n")
    resolv = workdir / "name-lookup-resolv.conf"
    resolv.write_text(f"nameserver {DNS_SERVER}\nsearch upstream.test\noptions timeout:{RESOLV_TIMEOUT} attempts:1\n")
    sink_port = harness.free_port(FAST)
    sink = sink_factory("name-lookup-fast", host=FAST, port=sink_port)
    moved_port = harness.free_port(MOVED_FROM, MOVED_TO)
    moved = {a: sink_factory(f"name-lookup-{a}", host=a, port=moved_port) for a in (MOVED_FROM, MOVED_TO)}
    daemon = None
    try:
        listen = {"slow": harness.free_port(), "fast": harness.free_port(), "moved": harness.free_port(),
                  "short": harness.free_port()}
        listeners = [hh.listener(name, port, name) for name, port in listen.items()]
        upstreams = [{"name": "slow", "address": f"slow.upstream.example:{harness.free_port()}", "tls": "none"},
                     {"name": "fast", "address": f"fast.upstream.test:{sink_port}", "tls": "none"},
                     {"name": "moved", "address": f"moved.upstream.test:{moved_port}", "tls": "none"},
                     {"name": "short", "address": f"fast:{sink_port}", "tls": "none"}]
        state = workdir / "name-lookup-state"
        state.mkdir(exist_ok=True)
        # dns.timeout above upstream_connect: upstream_connect is what bounds the lookup.
        cfg = harness.default_config(state, harness.free_port(), listeners, upstreams,
                                     dns={"timeout": "20s"},
                                     timeouts={"greeting": "30s", "command": "30s",
                                               "upstream_connect": f"{UPSTREAM_CONNECT:g}s",
                                               "upstream_open": "30s"})
        daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="name-lookup",
                                wrapper=harness.in_own_files(hosts, resolv)).start()
        yield types.SimpleNamespace(daemon=daemon, listen=listen, sink=sink, sink_port=sink_port, dns=dns, hosts=hosts,
                                    moved=moved)
    finally:
        if daemon is not None:
            harness.stop_exits_0(daemon)
        dns.close()


def rcpt_at(port, start, results, key):
    """One session: EHLO, MAIL, then RCPT at `start` (monotonic); records (reply code, text, seconds after start)."""
    c = hh.greeted(port, timeout=30)
    try:
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        time.sleep(max(0.0, start - time.monotonic()))
        code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        results[key] = (code, text, time.monotonic() - start)
    except (OSError, AssertionError) as e:
        results[key] = (None, repr(e), time.monotonic() - start)
    finally:
        c.close()


def test_lookups_of_a_silent_name_run_side_by_side_and_leave_hosts_names_alone(env):
    d = env.daemon
    before = d.metrics()
    start = time.monotonic() + 1.0
    results = {}
    # Half a second apart, so that each lookup is under way before the one before it ends.
    threads = [threading.Thread(target=rcpt_at, args=(env.listen["slow"], start + 0.5 * i, results, f"slow{i}"))
               for i in range(SLOW_SESSIONS)]
    threads.append(threading.Thread(target=rcpt_at, args=(env.listen["fast"], start + 1.2, results, "fast")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    shown = {k: (code, text, f"{elapsed:.2f}s") for k, (code, text, elapsed) in sorted(results.items())}
    code, text, elapsed = results["fast"]
    # The name /etc/hosts answers is not held up by the other upstream's lookups.
    assert code == 250 and elapsed < 1.0, f"{shown}\n{d.log_tail()}"
    for i in range(SLOW_SESSIONS):
        code, text, elapsed = results[f"slow{i}"]
        assert code == 451 and text.startswith("451 4.4.1 "), shown
        # Each lookup ends at its own upstream_connect, not after the lookups queued before it.
        assert UPSTREAM_CONNECT - 0.3 < elapsed < UPSTREAM_CONNECT + MARGIN, shown
    assert env.dns.queries, "the silent name server was asked"
    after = d.metrics()
    assert harness.delta(before, after, "mailflow_upstream_errors_total") == {
        harness.series_key(upstream="slow", reason="connect_timeout"): float(SLOW_SESSIONS)}, shown
    # Each is logged with the name and why.
    lines = [x for x in d.stderr().splitlines() if " upstream_error " in x and "upstream=slow " in x]
    assert len(lines) >= SLOW_SESSIONS and all("host=slow.upstream.example" in x and "reason=connect_timeout" in x
                                               for x in lines[-SLOW_SESSIONS:]), lines


def test_a_short_name_is_completed_by_the_search_list(env):
    """"fast:PORT" with `search upstream.test` in resolv.conf: getaddrinfo completed it (a Kubernetes pod's
    "mailstore:25" works so), libunbound asks only the name as written, so the upstream was unreachable (451
    after upstream_connect, the silent name server asked for "fast"). The search domains come first for a name
    with fewer dots than ndots, as glibc does: fast.upstream.test, which the hosts file has."""
    d = env.daemon
    before = harness.value(d.metrics(), "mailflow_upstream_errors_total", upstream="short")
    results = {}
    rcpt_at(env.listen["short"], time.monotonic(), results, "short")
    code, text, elapsed = results["short"]
    assert code == 250 and elapsed < 1.0, f"{results}\n{d.log_tail()}"
    assert harness.value(d.metrics(), "mailflow_upstream_errors_total", upstream="short") == before


def test_sessions_whose_clients_left_end_with_their_lookups(env):
    """Clients that give up while their RCPT waits for the lookup: their sessions end by upstream_connect (no lookup
    stays queued behind the others, holding its session). libunbound may go on asking for the name a little
    longer on its own schedule (one query for all the sessions that asked, not one per session), which holds
    no session."""
    d = env.daemon
    start = time.monotonic()
    clients = []
    for i in range(SLOW_SESSIONS):
        c = hh.greeted(env.listen["slow"], timeout=30)
        greeted_at = time.monotonic()  # the daemon's session began before this
        assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
        time.sleep(max(0.0, start + 0.5 * i - time.monotonic()))
        c.send(f"RCPT TO:<{hh.RCPT}>\r\n".encode())
        clients.append((c, c.sock.getsockname()[1], greeted_at, time.monotonic()))
    time.sleep(0.5)
    for c, *_ in clients:
        c.close()

    def active():
        return harness.value(d.metrics(), "mailflow_sessions_active", listener="slow")

    harness.wait_for(lambda: active() == 0, UPSTREAM_CONNECT + MARGIN + 10, what="the slow sessions to end")
    # Each session's end is timed from its own RCPT, not from when it was planned (a greeting slow under load
    # sends it later) nor from when a scrape saw the gauge fall (a scrape takes its time too): the session line
    # gives the session's duration from its accept, which came before the client had its EHLO answered.
    for c, client_port, greeted_at, rcpt_at in clients:
        (line,) = harness.wait_for(lambda: session_lines(d, client_port), 10, what=f"the session line of {client_port}")
        duration = float(re.search(r" duration=([\d.]+)", line)[1])
        ended = greeted_at + duration - rcpt_at  # at least as late as the real end
        assert ended < UPSTREAM_CONNECT + MARGIN, f"a session lasted {ended:.2f}s after its RCPT: {line}"


def session_lines(daemon, client_port):
    return [line for line in daemon.stderr().splitlines()
            if " session id=" in line and f" client=127.0.0.1:{client_port} " in line]


def test_a_hosts_name_that_is_no_dns_name_leaves_the_others_of_the_file(env, workdir, mailflowd_bin):
    """A name in /etc/hosts that is no DNS name ("a..b", an empty label; a label over 63 bytes) is skipped, and every
    other name of the file is still answered from it, as glibc's files service answers them (`getent -s files hosts`
    finds fast.upstream.test in such a file). Before, libunbound refused the whole file for that one name (a local
    data record it cannot parse): logged as hosts_file, every name went to DNS alone, and the fixed upstream
    fast.upstream.test, which the file names, got 451 (connect_failed, "AAAA nxdomain, A nxdomain")."""
    hosts = workdir / "name-lookup-broken-hosts"
    hosts.write_text(f"127.0.0.1 localhost\nnot-an-address some.name\n127.0.0.1 a..b {'x' * 64}.example\n"
                     f"{FAST} fast.upstream.test\n")
    resolv = workdir / "name-lookup-resolv.conf"
    getent = subprocess.run(harness.in_own_files(hosts, resolv) + ["getent", "-s", "files", "hosts",
                                                                   "fast.upstream.test"],
                            capture_output=True, text=True, timeout=10)
    assert getent.returncode == 0 and FAST in getent.stdout, getent
    port = harness.free_port()
    state = workdir / "name-lookup-broken-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener("fast", port, "fast")],
                                 [{"name": "fast", "address": f"fast.upstream.test:{env.sink_port}",
                                   "tls": "none"}],
                                 timeouts={"upstream_connect": f"{UPSTREAM_CONNECT:g}s", "upstream_open": "30s"})
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="name-lookup-broken",
                            wrapper=harness.in_own_files(hosts, resolv)).start()
    try:
        c = hh.greeted(port, timeout=30)
        try:
            assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
            code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        finally:
            c.close()
        assert code == 250, (code, text, daemon.log_tail())
        assert " hosts_file " not in daemon.stderr(), daemon.log_tail()
    finally:
        harness.stop_exits_0(daemon)


def test_a_hosts_line_ends_at_a_nul_byte_as_glibc_reads_it(env, workdir, mailflowd_bin):
    """A NUL byte in /etc/hosts (a corrupt copy, a binary file given by mistake) ends its line for glibc, which reads
    each line as a C string: `getent -s files hosts` finds no name behind it. The relay read on past it and took
    "127.0.0.86\\0 nul.upstream.test" for nul.upstream.test's address (the field "127.0.0.86\\0" passed inet_pton
    as a C string): RCPT got 250 from the sink there, a delivery to an address glibc's lookup never gave; and
    "fast.upstream.test\\0 cut.test", which glibc reads as fast.upstream.test, was skipped as a name with a NUL in
    it: 451, an upstream that getaddrinfo reached unreachable. Now the relay reads the lines as glibc does:
    nul.upstream.test is in DNS alone (NXDOMAIN under .test, 451 at once), fast.upstream.test is the sink (250)."""
    hosts = workdir / "name-lookup-nul-hosts"
    hosts.write_bytes(f"127.0.0.1 localhost\n{FAST}\0 nul.upstream.test\n{FAST} fast.upstream.test\0 cut.test\n"
                      .encode())
    resolv = workdir / "name-lookup-resolv.conf"
    for name, found in (("nul.upstream.test", False), ("fast.upstream.test", True)):
        getent = subprocess.run(harness.in_own_files(hosts, resolv) + ["getent", "-s", "files", "hosts", name],
                                capture_output=True, text=True, timeout=10)
        assert (getent.returncode == 0) == found, (name, getent)
    ports = {"nul": harness.free_port(), "fast": harness.free_port()}
    state = workdir / "name-lookup-nul-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(
        state, harness.free_port(), [hh.listener(name, port, name) for name, port in ports.items()],
        [{"name": name, "address": f"{name}.upstream.test:{env.sink_port}", "tls": "none"} for name in ports],
        timeouts={"upstream_connect": f"{UPSTREAM_CONNECT:g}s", "upstream_open": "30s"})
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="name-lookup-nul",
                            wrapper=harness.in_own_files(hosts, resolv)).start()
    try:
        replies = {}
        for name, port in ports.items():
            c = hh.greeted(port, timeout=30)
            try:
                assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
                replies[name] = c.cmd(f"RCPT TO:<{hh.RCPT}>")
            finally:
                c.close()
        assert replies["fast"][0] == 250, (replies, daemon.log_tail())
        assert replies["nul"][0] == 451, (replies, daemon.log_tail())
        assert "host=nul.upstream.test reason=connect_failed" in daemon.stderr(), daemon.log_tail()
    finally:
        harness.stop_exits_0(daemon)


def test_a_changed_hosts_file_applies_at_the_reload(env):
    """/etc/hosts is read at start and at each reload (SIGHUP), as dns.trust_anchor_file: a change applies to the
    sessions after the reload, on every event loop alike, not before it on some of them."""
    d = env.daemon

    def deliver(subject):
        c = hh.greeted(env.listen["moved"], timeout=30)
        try:
            code, text = hh.transaction(c, hh.message(subject))
            assert code == 250, text
        finally:
            c.close()

    old, new = env.moved[MOVED_FROM], env.moved[MOVED_TO]
    deliver("before")
    old.wait_messages(1)
    # Rewritten in place (the bind mount shows the same file), every line but the moved one kept.
    env.hosts.write_text(env.hosts.read_text().replace(f"{MOVED_FROM} moved", f"{MOVED_TO} moved"))
    for i in range(3):  # fresh sessions, spread over the event loops
        deliver(f"unreloaded {i}")
    old.wait_messages(4)
    assert new.count() == 0, "a change without a reload was used"
    base = harness.value(d.metrics(), "mailflow_config_reloads_total", result="success")
    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(d.metrics(), "mailflow_config_reloads_total", result="success") > base,
                     10, what="the reload")
    for i in range(3):
        deliver(f"reloaded {i}")
    new.wait_messages(3)
    assert old.count() == 4
