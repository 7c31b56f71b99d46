"""Reloads are all or nothing, and lose no client: a reload refused at its last step (a fault injected where every
setting is loaded and none is applied yet) leaves the HTTP settings as they were too, and the same file at the
next reload puts them in force; the connections waiting on a listener that a reload removes (accepted, or in the
kernel's accept queue) are served under the configuration they connected to, not closed or reset unanswered; a
storm of reloads while STARTTLS sessions relay to tls: verify upstreams (one shared trust store per reload) loses
no message; SIGHUPs that come while the daemon stops leave its exit status 0; a hosts file libunbound cannot take
is logged by the start or reload that puts it in force, not by a reload that is refused. Fixed addresses:
127.0.0.165."""
import json
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh
import http_helpers as hx

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # noqa: E402  (deprecated in 3.11, as test_http_auth makes its hashes)

USER, PASSWORD = "prom", "reload secret"
GONE_HOST = "127.0.0.165"


def reloads(daemon, result, auth=None):
    metrics = hx.metrics(daemon_http_port(daemon), auth=auth)
    return (harness.value(metrics, "mailflow_config_reloads_total", result=result),
            harness.value(metrics, "mailflow_config_last_reload_successful"))


def daemon_http_port(daemon):
    return int(daemon.config["http"]["address"].rsplit(":", 1)[1])


def test_a_reload_refused_at_its_last_step_keeps_the_http_settings_too(daemon_factory, sink_factory, monkeypatch):
    """The reload put http.basic_auth (and http.tls) in force before steps that could still refuse it: a reload
    refused after that left /metrics asking for the new password while the relay ran the old configuration and
    mailflow_config_last_reload_successful said 0 ("nothing of the new file is in force",
    MailflowConfigReloadFailed). The failpoint reload.apply fails the first reload where everything is loaded and
    nothing applied yet."""
    sink = sink_factory("store")
    monkeypatch.setenv("MAILFLOWD_FAILPOINTS", "reload.apply=1")
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="all-or-nothing")
    http_port = daemon_http_port(d)
    assert reloads(d, "failure") == (0, 1)
    cfg = json.loads(d.config_path.read_text())
    cfg["http"]["basic_auth"] = {"user": USER,
                                 "password_hash": crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_SHA256))}
    d.config_path.write_text(json.dumps(cfg))

    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: "reload_refused" in d.stderr(), 10, what="the reload to be refused")
    status = hx.get(http_port, "/metrics")[0]
    assert status == 200, f"a refused reload put the new basic_auth in force: /metrics answered {status}"
    assert reloads(d, "failure") == (1, 0)
    hh.assert_relays(d, port, sink)

    d.proc.send_signal(signal.SIGHUP)  # the same file: the failpoint is spent, all of it applies now
    harness.wait_for(lambda: d.stderr().count(" reloaded ") == 1, 10, what="the second reload")
    assert hx.get(http_port, "/metrics")[0] == 401
    assert reloads(d, "success", auth=(USER, PASSWORD)) == (1, 1)


def test_connections_waiting_on_a_listener_a_reload_removes_are_served(daemon_factory, sink_factory, monkeypatch):
    """Clients that connected to a listener while the reload that removes it runs (held 1.5 s by the failpoint
    `reload`, as many CA bundles hold it: the loop that accepts is busy, so they wait in the kernel's accept
    queue) each get a banner and a session under the configuration they connected to: one got its socket closed
    unanswered (accepted, then no such listener in the new configuration), the others a reset (the socket closed
    with them in its queue), with no log line or count. listener_removed says so, with all of them taken from the
    queue; once the reload is done the address refuses new connections. (The clients came with the SIGHUP once,
    the daemon stopped meanwhile: since a reload begins 50 ms after its SIGHUP, the accept loop took them all
    in that time, queued_sessions=0, and the test passed without any client left in the queue.)"""
    monkeypatch.setenv("MAILFLOWD_FAILPOINTS", "reload=1500ms")
    sink = sink_factory("store")
    keep, gone = harness.free_port(), harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", keep, "store"),
                                  {**hh.listener("gone", gone, "store"), "address": f"{GONE_HOST}:{gone}"}],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="listener-removed")
    cfg = json.loads(d.config_path.read_text())
    cfg["listeners"] = [cfg["listeners"][0]]
    d.config_path.write_text(json.dumps(cfg))

    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: " reload config=" in d.stderr(), 10, interval=0.005, what="the reload to begin")
    clients = [harness.RawSmtp(gone, host=GONE_HOST, timeout=10) for _ in range(6)]
    outcomes = []
    try:
        for c in clients:
            try:
                code, _ = c.reply()
                if code == 220:
                    code, _ = c.cmd("EHLO waiting.example.test")
                outcomes.append(code)
            except (ConnectionError, OSError) as e:
                outcomes.append(type(e).__name__)
        assert outcomes == [250] * len(clients), f"banner and EHLO of each waiting client: {outcomes}"
        before = sink.count()
        code, text = hh.transaction(clients[0], hh.message("queued before the reload"))
        assert code == 250, text
        harness.wait_for(lambda: sink.count() == before + 1, 10, what="the message at the sink")
        for c in clients:
            assert c.cmd("QUIT")[0] == 221
    finally:
        for c in clients:
            c.close()
    harness.wait_for(lambda: " reloaded " in d.stderr(), 10, what="the reload")
    assert f"listener_removed listener=gone address={GONE_HOST}:{gone} queued_sessions=6" in d.stderr(), \
        d.log_tail()
    try:
        harness.RawSmtp(gone, host=GONE_HOST, timeout=2).close()
        raise AssertionError("the removed listener still accepts")
    except ConnectionRefusedError:
        pass
    hh.assert_relays(d, keep, sink)


def test_a_reload_storm_during_tls_sessions_on_both_legs_loses_nothing(daemon_factory, sink_factory, certs):
    """SIGHUPs every 20 ms while clients relay over STARTTLS to tls: verify upstreams that share one CA file's
    trust store (loaded once per reload, referenced by each upstream's context): every reload frees the previous
    runtime's contexts and stores once the last session that holds them ends, while handshakes use them. Every
    message arrives and the daemon exits 0 (under the asan preset, a store or context freed in use fails it)."""
    sink = sink_factory("tls-store", tls_cert=certs / "sink.pem", tls_key=certs / "sink.key")
    ca = str(certs / "ca.pem")
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "up0", certs=certs)],
                       upstreams=[{"name": f"up{i}", "address": f"127.0.0.1:{sink.port}", "tls": "verify",
                                   "ca_file": ca} for i in range(8)], name="reload-storm")
    before = sink.count()
    results = []

    def client():
        for _ in range(4):
            results.append(harness.swaks(port, data=hh.message("storm"), tls="starttls").rc)

    stop = threading.Event()

    def storm():
        while not stop.is_set():
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)

    signaller = threading.Thread(target=storm)
    clients = [threading.Thread(target=client) for _ in range(3)]
    signaller.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    stop.set()
    signaller.join(5)
    assert results == [0] * 12, f"swaks exit codes during the reload storm: {results}"
    arrived = sink.wait_messages(before + 12, 20)[before:]
    assert [meta["tls_version"] for meta, _ in arrived] == ["TLSv1.3"] * 12, "the upstream leg was not TLS"
    assert d.proc.poll() is None
    assert "reloaded" in d.stderr() and "reload_refused" not in d.stderr()
    assert d.stop() == 0, d.log_tail()


def test_sighups_while_the_daemon_stops_leave_its_exit_status_0(daemon_factory, sink_factory):
    """SIGHUPs back to back (a deploy hook in a loop) from a SIGTERM on: the daemon drains, ignores them
    (reload_ignored), saves its windows and exits 0. Those that came while it exited, after its signal sets were
    gone and Asio had put SIG_DFL back, ended it by signal 1 instead, its stop clean until then (exit status -1
    here, 129 to a shell or a container runtime): about one stop in two here, so six stops."""
    sink = sink_factory("store")
    codes = []
    for round in range(6):
        d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                           upstreams=[hh.plain_upstream("store", sink.port)], name=f"sighup-exit{round}")
        state = Path(d.config["state_dir"]) / "windows.state"
        state.unlink(missing_ok=True)

        def flood():
            while d.proc.poll() is None:
                try:
                    d.proc.send_signal(signal.SIGHUP)
                except ProcessLookupError:
                    return

        flooder = threading.Thread(target=flood)
        flooder.start()
        d.proc.send_signal(signal.SIGTERM)
        try:
            codes.append(d.proc.wait(15))
        except subprocess.TimeoutExpired:
            codes.append("running 15 s after SIGTERM")
        flooder.join(5)
        assert state.exists(), "the windows were not saved"
    assert codes == [0] * 6, f"exit status of each stop: {codes}"


@pytest.mark.parametrize("failpoints, in_force", [
    ("runtime.hosts_file=1", "start"),
    ("runtime.hosts_file=2,reload.apply=1", None),  # the first reload has the problem, and is refused
    ("runtime.hosts_file=3,reload.apply=1", "second reload"),  # refused first, then in force with the problem
])
def test_a_hosts_file_problem_is_logged_for_a_configuration_that_goes_in_force(failpoints, in_force, daemon_factory,
                                                                                sink_factory, monkeypatch):
    """/etc/hosts that libunbound cannot take (its names are then asked of DNS alone) is logged as hosts_file by the
    start or reload that puts it in force. Runtime::build logged it while it built the configuration, so a reload
    that a later step refused (here the failpoint reload.apply; a listener address taken, a certificate that does
    not load) said that the hosts file of a configuration that never went in force had a problem: the running one,
    built from the file as it was read earlier, had none. No such file is known (proto::hosts_records leaves out
    what libunbound refuses), so the failpoint runtime.hosts_file stands in for it at the N-th build."""
    sink = sink_factory("store")
    monkeypatch.setenv("MAILFLOWD_FAILPOINTS", failpoints)
    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name=f"hosts-file-{in_force}")

    def reloads_done():
        log = d.stderr()
        return log.count(" reloaded ") + log.count(" reload_refused ")

    for n in (1, 2):
        d.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: reloads_done() == n, 10, what=f"reload {n}")
    lines = d.stderr().splitlines()
    said = [i for i, line in enumerate(lines) if " hosts_file " in line]
    refused = [i for i, line in enumerate(lines) if " reload_refused " in line]
    assert len(refused) == (0 if in_force == "start" else 1), d.log_tail()
    if in_force is None:
        assert said == [], "a refused reload logged the hosts file of a configuration never in force:\n" + \
            "\n".join(lines[i] for i in said)
        return
    assert len(said) == 1, d.log_tail()
    assert "failpoint runtime.hosts_file" in lines[said[0]]
    reload_lines = [i for i, line in enumerate(lines) if " reload config=" in line]
    if in_force == "start":
        assert said[0] < reload_lines[0], d.log_tail()
    else:
        assert reload_lines[1] < said[0], d.log_tail()
