"""Accepting connections, against the real binary: a listener whose accept() fails (out of file descriptors,
EMFILE) logs it, counts it (mailflow_rejects_total{reason="accept_failed"}), pauses instead of spinning the CPU
on the connections waiting in the listen queue, and serves them once descriptors are free again; the HTTP server's
accept likewise. A connection that went away before accept() took it (accept() failing with a network error for
that one connection, made with tests/tools/accept_drop.c) is no shortage: the next one is accepted at once, not
counted, logged at level info. An upstream socket that cannot be made for want of descriptors counts as local_resources. What mailflow_sessions_total{leg="client"} counts. A reload to an upstream that is one of the
daemon's own listeners is refused."""
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import types
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("in", port, "up")], upstreams=[hh.plain_upstream("up", sink.port)])
    return sink, daemon, port


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    # /proc/PID/stat: utime and stime, fields 14 and 15, in clock ticks (after the ")" that ends the name).
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def banner(sock, wait):
    """The first bytes the daemon sent within `wait` seconds (b"" if none)."""
    sock.settimeout(wait)
    try:
        return sock.recv(512)
    except socket.timeout:
        return b""


def test_accept_out_of_descriptors_is_logged_counted_paced_and_recovers(env, mailflowd_bin):
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    sink, daemon, port = env
    pid = daemon.proc.pid
    before = daemon.metrics()
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held, waiting = [], []
    try:
        # Room for two more descriptors: two sessions, then accept() fails with EMFILE.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 2, hard))
        started = time.monotonic()
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if not banner(s, 3.0).startswith(b"220"):  # none in 3 s (a loaded test host): it is queued
                waiting.append(s)
                break
            held.append(s)
        assert waiting, f"every connection got a banner: the descriptor limit did not bite\n{daemon.log_tail()}"
        waiting.append(socket.create_connection(("127.0.0.1", port), timeout=5))  # queued behind it
        harness.wait_for(lambda: "accept_error" in daemon.stderr(), 5, what="the accept_error log line")
        line = [l for l in daemon.stderr().splitlines() if "accept_error" in l][-1]
        assert "listener=in" in line and "Too many open files" in line, line
        # While the queue stays full the loop retries after a pause, it does not spin on the failing accept().
        start = cpu_seconds(pid)
        time.sleep(1.0)
        used = cpu_seconds(pid) - start
        assert used < 0.3, f"{used:.2f} s of CPU in 1 s while accept() failed: the accept loop spins"
        # Descriptors come free: the connections that waited in the queue are served.
        for s in held:
            s.close()
        held.clear()
        for s in waiting:
            got = banner(s, 5.0)
            assert got.startswith(b"220"), f"a queued connection after the descriptors came free: {got!r}"
        failing = time.monotonic() - started
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in held + waiting:
            s.close()
    after = daemon.metrics()
    failed = harness.value(after, "mailflow_rejects_total", listener="in", reason="accept_failed") - \
        harness.value(before, "mailflow_rejects_total", listener="in", reason="accept_failed")
    assert failed >= 1, f"accept() failed, but mailflow_rejects_total{{reason=\"accept_failed\"}} moved by {failed}"
    # Each failed try counts (the loop tries again every 100 ms): about ten a second, not thousands.
    assert failed <= 12 * failing + 5, f"{failed} failed accepts counted in {failing:.1f} s"
    hh.assert_relays(daemon, port, sink)


def test_http_accept_out_of_descriptors_is_logged_and_counted(env, mailflowd_bin):
    """The HTTP server's accept loop likewise: logged, counted (mailflow_http_rejects_total{reason="accept_failed"}),
    and the scrape that waited in the queue is answered once there are descriptors again."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    _, daemon, _ = env
    pid = daemon.proc.pid
    host, http_port = daemon.config["http"]["address"].rsplit(":", 1)
    before = daemon.metrics()
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    scrape = None
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid), hard))  # no room at all
        scrape = socket.create_connection((host, int(http_port)), timeout=5)
        scrape.sendall(b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nConnection: close\r\n\r\n")
        harness.wait_for(lambda: "http_accept_failed" in daemon.stderr(), 5, what="the http_accept_failed log line")
        start = cpu_seconds(pid)
        time.sleep(1.0)
        used = cpu_seconds(pid) - start
        assert used < 0.3, f"{used:.2f} s of CPU in 1 s while the HTTP accept() failed: the accept loop spins"
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        got = banner(scrape, 5.0)
        assert got.startswith(b"HTTP/1.1 200"), f"the request that waited in the queue: {got!r}"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        if scrape:
            scrape.close()
    failed = harness.value(daemon.metrics(), "mailflow_http_rejects_total", reason="accept_failed") - \
        harness.value(before, "mailflow_http_rejects_total", reason="accept_failed")
    assert 1 <= failed <= 40, f"the HTTP accept() failed, mailflow_http_rejects_total{{reason=\"accept_failed\"}} moved by {failed}"


DROPPED = 20  # connections that accept_drop.so makes accept() fail for, per port


@pytest.fixture(scope="module")
def dropping(workdir, mailflowd_bin, sink_factory):
    """A daemon whose accept() fails with ENETUNREACH for the first DROPPED connections on its SMTP listener and on
    its HTTP port, each connection gone from the queue (tests/tools/accept_drop.c, LD_PRELOAD), as Linux's accept()
    passes on a network error pending on the new connection."""
    if harness.sanitized(mailflowd_bin):
        pytest.skip("LD_PRELOAD of a shim before the sanitizer runtime aborts the daemon")
    if not shutil.which("cc"):
        pytest.skip("needs a C compiler for tests/tools/accept_drop.c")
    lib = workdir / "accept_drop.so"
    source = Path(__file__).resolve().parents[1] / "tools" / "accept_drop.c"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    sink = sink_factory("dropping-store")
    port, http_port = harness.free_port(), harness.free_port()
    state = workdir / "dropping-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, http_port, [hh.listener("in", port, "up")],
                                 [hh.plain_upstream("up", sink.port)])
    armed = workdir / "accept-drop-armed"
    wrapper = ["env", f"LD_PRELOAD={lib}", f"ACCEPT_DROP_PORTS={port},{http_port}", f"ACCEPT_DROP_COUNT={DROPPED}",
               f"ACCEPT_DROP_ERRNO={errno.ENETUNREACH}", f"ACCEPT_DROP_ARMED={armed}"]
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="dropping", wrapper=wrapper)
    try:
        yield types.SimpleNamespace(daemon=daemon.start(), port=port, http_port=http_port, armed=armed)
    finally:
        harness.stop_exits_0(daemon)


def queued_behind_dropped(env, port, request):
    """Stops the daemon, queues DROPPED connections and then one that sends `request`, arms accept_drop.so, lets
    the daemon go on: the first bytes that last one gets, and how long after the daemon went on."""
    pid = env.daemon.proc.pid
    dropped = []
    os.kill(pid, signal.SIGSTOP)
    env.armed.write_text("")
    try:
        for _ in range(DROPPED):
            dropped.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        last = socket.create_connection(("127.0.0.1", port), timeout=5)
        if request:
            last.sendall(request)
    finally:
        os.kill(pid, signal.SIGCONT)
    start = time.monotonic()
    try:
        got = banner(last, 10.0)
        return got, time.monotonic() - start
    finally:
        env.armed.unlink()
        last.close()
        for s in dropped:
            s.close()


def test_a_connection_gone_before_accept_is_passed_at_once_not_paused_or_counted(dropping):
    """accept() failing for one connection that went away (ENETUNREACH, ECONNABORTED: nginx logs it and accepts
    on) is no shortage: the listener takes the next connection at once, it is not counted as accept_failed (which
    says out of descriptors or memory, and pages), and it is logged as accept_dropped. Before, each such failure
    was counted as accept_failed and paused the listener 100 ms: the client queued behind 20 of them waited 2 s."""
    daemon, port = dropping.daemon, dropping.port
    before = daemon.metrics()
    got, waited = queued_behind_dropped(dropping, port, None)
    assert got.startswith(b"220"), f"the client queued behind the dropped connections: {got!r}\n{daemon.log_tail()}"
    assert waited < 1.0, f"its banner came {waited:.2f} s after the daemon went on: the listener paused"
    failed = harness.value(daemon.metrics(), "mailflow_rejects_total", listener="in", reason="accept_failed") - \
        harness.value(before, "mailflow_rejects_total", listener="in", reason="accept_failed")
    assert failed == 0, f"{failed} connections gone before accept() counted as accept_failed"
    lines = [x for x in daemon.stderr().splitlines() if " accept_dropped " in x]
    assert lines and "listener=in" in lines[0] and "Network is unreachable" in lines[0], daemon.log_tail()
    assert "accept_error" not in daemon.stderr(), daemon.log_tail()


def test_http_a_connection_gone_before_accept_is_passed_at_once_not_paused_or_counted(dropping):
    """The HTTP server's accept loop likewise: the scrape queued behind 20 connections gone before accept() is
    answered at once, nothing counts as mailflow_http_rejects_total{reason="accept_failed"}, logged as
    http_accept_dropped."""
    daemon, http_port = dropping.daemon, dropping.http_port
    before = daemon.metrics()
    got, waited = queued_behind_dropped(
        dropping, http_port, b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200"), f"the scrape queued behind the dropped connections: {got!r}"
    assert waited < 1.0, f"its answer came {waited:.2f} s after the daemon went on: the HTTP listener paused"
    failed = harness.value(daemon.metrics(), "mailflow_http_rejects_total", reason="accept_failed") - \
        harness.value(before, "mailflow_http_rejects_total", reason="accept_failed")
    assert failed == 0, f"{failed} connections gone before accept() counted as accept_failed"
    lines = [x for x in daemon.stderr().splitlines() if " http_accept_dropped " in x]
    assert lines and "Network is unreachable" in lines[0], daemon.log_tail()


def assert_local_resources_then_relays(daemon, before, c):
    """After a 451 at the descriptor limit: counted as the relay's own shortage (local_resources), not as the
    upstream's connect_failed, and logged so; the session goes on, and with descriptors back the same client's
    next transaction is relayed."""
    after = daemon.metrics()
    moved = {reason: harness.value(after, "mailflow_upstream_errors_total", upstream="up", reason=reason)
             - harness.value(before, "mailflow_upstream_errors_total", upstream="up", reason=reason)
             for reason in ("local_resources", "connect_failed")}
    assert moved == {"local_resources": 1, "connect_failed": 0}, \
        f"mailflow_upstream_errors_total{{upstream=\"up\"}} moved by {moved}\n{daemon.log_tail()}"
    line = [l for l in daemon.stderr().splitlines() if "upstream_error" in l or "dns_unavailable" in l][-1]
    assert "reason=local_resources" in line, line
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
    code, text = c.cmd("RCPT TO:<r@dest.test>")
    assert code == 250, f"RCPT once descriptors are free again: {text!r}"
    c.cmd("QUIT")
    c.close()


def test_upstream_socket_out_of_descriptors_is_counted_as_local_resources(env, mailflowd_bin):
    """With the daemon at its descriptor limit an RCPT cannot open the upstream: 451, as for an upstream that is
    down, but counted as mailflow_upstream_errors_total{reason="local_resources"}, not connect_failed, which
    MailflowUpstreamDown would page for although the upstream is fine."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    sink, daemon, port = env
    c = hh.greeted(port)
    code, text = c.cmd("MAIL FROM:<s@example.test>")
    assert code == 250, f"MAIL: {text!r}"  # answered locally: no upstream yet
    before = daemon.metrics()
    with harness.out_of_descriptors(daemon):  # no room for the upstream's socket
        code, text = c.cmd("RCPT TO:<r@dest.test>")
    assert code == 451, f"RCPT with no descriptor left for the upstream: {text!r}"
    assert_local_resources_then_relays(daemon, before, c)
    hh.assert_relays(daemon, port, sink)


def test_upstream_host_name_out_of_descriptors_is_counted_as_local_resources(sink_factory, daemon_factory,
                                                                           mailflowd_bin):
    """A fixed upstream given by host name ("localhost:PORT") is looked up for each new connection; at the
    descriptor limit the lookup cannot be made (getaddrinfo, which looked it up before the event loop's libunbound
    did, could open neither /etc/hosts nor a socket to the name server and answered EAI_NONAME; libunbound cannot
    make its context or its query's socket): that counted as mailflow_upstream_errors_total{reason=
    "connect_failed"}, the upstream's failure, which MailflowUpstreamDown pages for, although the name and the
    upstream are fine. It counts as local_resources, as the socket that cannot be made does (0a413ae)."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    sink = sink_factory("store-by-name")
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("in", port, "up")],
                            upstreams=[dict(hh.plain_upstream("up", sink.port), address=f"localhost:{sink.port}")],
                            name="by-name")
    c = hh.greeted(port)
    assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
    before = daemon.metrics()
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd("RCPT TO:<r@dest.test>")
    assert code == 451, f"RCPT with no descriptor left for the lookup: {text!r}"
    assert_local_resources_then_relays(daemon, before, c)


def test_resolver_that_cannot_be_made_for_want_of_descriptors_is_counted_as_local_resources(daemon_factory,
                                                                                          mailflowd_bin):
    """An mx upstream's first RCPT on an event loop makes its DNS resolver (a libunbound context, whose socketpair
    needs descriptors): at the descriptor limit that fails, the RCPT gets 451 4.4.3 as before, and it counts as
    mailflow_upstream_errors_total{reason="local_resources"}, which MailflowDescriptorsLow watches; it counted
    nowhere before (only a log line)."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    port = harness.free_port()
    dead_dns = harness.free_port()  # never asked: the context cannot even be made
    daemon = daemon_factory(listeners=[hh.listener("mxl", port, "mx")],
                            upstreams=[{"name": "mx", "mx": True, "port": 25}], name="nodns",
                            dns={"servers": [f"127.0.0.1:{dead_dns}"], "timeout": "1s"})
    c = hh.greeted(port)
    assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
    before = daemon.metrics()
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd("RCPT TO:<r@dest.example.net>")
    assert (code, text[:9]) == (451, "451 4.4.3"), f"RCPT with no descriptor for the resolver: {text!r}"
    after = daemon.metrics()
    moved = {dict(k)["reason"]: v for k, v in
             harness.delta(before, after, "mailflow_upstream_errors_total", upstream="mx").items()}
    assert moved == {"local_resources": 1.0}, f"mailflow_upstream_errors_total moved by {moved}\n{daemon.log_tail()}"
    line = [l for l in daemon.stderr().splitlines() if "dns_unavailable" in l][-1]
    assert "upstream=mx" in line and "reason=local_resources" in line, line
    c.cmd("QUIT")
    c.close()


def test_every_accepted_connection_is_a_client_session(env, daemon_factory):
    """mailflow_sessions_total{leg="client"} counts every accepted connection once it closed, as docs/metrics.md
    says: a connection that closes without a word (a load balancer's TCP health check, a port scan) and one refused
    at connect (421 4.7.0, over max_sessions_per_ip) each count one, under tls_version "none", as does the
    session duration histogram; mailflow_rejects_total says which were refused."""
    sink, _, _ = env
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("lim", port, "up")], upstreams=[hh.plain_upstream("up", sink.port)],
                            name="limited", limits={"max_sessions_per_ip": 1, "drain_timeout": "3s"})
    sessions = dict(name="mailflow_sessions_total", listener="lim", leg="client", tls_version="none")
    before = daemon.metrics()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # a TCP health check
    held = hh.greeted(port)
    try:
        refused = harness.RawSmtp(port)
        code, text = refused.reply()
        assert code == 421, f"the second session from one address: {text!r}"
        refused.close()
        after = hh.assert_counter(daemon, before, n=2, **sessions)
    finally:
        held.close()
    after = hh.assert_counter(daemon, before, n=3, **sessions)
    assert harness.value(after, "mailflow_sessions_total", listener="lim", leg="client") - \
        harness.value(before, "mailflow_sessions_total", listener="lim", leg="client") == 3
    hh.assert_rejected(daemon, before, "ip_limit", n=1, listener_name="lim")
    durations = harness.value(after, "mailflow_session_duration_seconds_count", listener="lim") - \
        harness.value(before, "mailflow_session_duration_seconds_count", listener="lim")
    assert durations == 3, f"the duration histogram counted {durations} sessions, sessions_total 3"
    results = [l.split(" result=", 1)[1].split()[0] for l in daemon.stderr().splitlines()
               if " session id=" in l and "listener=lim" in l]
    assert sorted(results) == ["disconnected", "disconnected", "ip_limit"], results


def test_reload_to_an_upstream_that_is_an_own_listener_is_refused(sink_factory, daemon_factory):
    """An upstream at an address of this host on a 0.0.0.0 listener's port is mailflowd itself: a reload to it is
    refused (at the key's file:line:col) before the new listener is bound, and the old configuration keeps
    relaying."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    own = [line.split()[3].split("/")[0] for line in out.splitlines()]
    assert own, f"the host has no global IPv4 address (ip -o -4 addr): {out!r}"
    sink = sink_factory("reload-store")
    port, wild = harness.free_port(), harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("in", port, "up")], upstreams=[hh.plain_upstream("up", sink.port)],
                            name="reload-loop")
    before = daemon.metrics()
    cfg = json.loads(daemon.config_path.read_text())
    cfg["listeners"].append({"name": "any", "address": f"0.0.0.0:{wild}", "direction": "inbound", "upstream": "self"})
    cfg["upstreams"].append({"name": "self", "address": f"{own[0]}:{wild}", "tls": "none"})
    daemon.config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    daemon.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: "reload_refused" in daemon.stderr(), 10, what="the reload to be refused")
    line = [l for l in daemon.stderr().splitlines() if "reload_refused" in l][-1]
    assert f"{daemon.config_path}:" in line and "upstreams[1].address" in line and "in a loop" in line, line
    hh.assert_counter(daemon, before, "mailflow_config_reloads_total", n=1, result="failure")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", wild), timeout=2).close()  # the refused listener never listened
    hh.assert_relays(daemon, port, sink)
