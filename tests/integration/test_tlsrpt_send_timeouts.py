"""TLS-RPT report tries that hang, against the real daemon (tlsrpt.send: true), with the set-up of
test_tlsrpt_send.py (tlsrpt_send_helpers.py: knotd serving rpt.example.net, the https rua server, a port that
never answers): tlsrpt.https_timeout bounds the rua host's lookup too; a run ends once it took tlsrpt.interval;
an https rua host or a mailto: rua domain whose try timed out (the POST, the host's lookup, a walk of MX hosts
that hung, the route's lookup) is marked for the rest of the run, its other reports counted as skipped and
tried at a later run, never given up untried; a report whose own POST times out keeps its host's other reports
untried; tlsrpt_deferred counts the reports left."""
import http.server
import json
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

import harness
from tlsrpt_send_helpers import (DATE, HANG_ADDR, SUBMITTER, WALK_ADDR, Collector, deliveries, log_with, reports_of,
                                 settled, state_dir_and_config, wait_https_successes)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import SilentServer, TamperingProxy  # noqa: E402

pytest_plugins = ["tlsrpt_send_helpers"]  # its fixtures: knot, https_port, report_cert, silent_port


@pytest.fixture(scope="module")
def silent_dns():
    """A DNS server that takes every query and never answers."""
    server = SilentServer()
    yield server.address
    server.close()


def test_https_timeout_bounds_the_lookup_of_the_rua_host_too(silent_dns, daemon_factory, workdir):
    """tlsrpt.https_timeout is the whole POST, the host name's lookup included: a DNS server that never answers
    (dns.timeout 20s) does not hold the try, and the run, for longer."""
    directory = workdir / "silent-dns-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(f"""mailflowd-tlsrpt 1
day {DATE} g.example.net https://reports.nowhere.example/v1
policy no-policy-found - - 1 0 0
""")
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="silent-dns",
                            dns={"servers": [silent_dns], "timeout": "20s"},
                            tlsrpt={"send": True, "interval": "1s", "https_timeout": "500ms"})
    started = time.monotonic()  # the first run comes a second after the start
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="https",
                                           result="temporary_failure") >= 1, 40, what="the first try")
    assert time.monotonic() - started < 8, "the lookup outlasted tlsrpt.https_timeout"
    assert "looking up reports.nowhere.example timed out (tlsrpt.https_timeout 500ms)" in daemon.stderr()


def eight_silent_https_reports(workdir, knot, daemon_factory, name, interval):
    """A daemon whose state holds 8 reports of DATE, each to an https rua host of its own that takes connections
    (the kernel's backlog completes them) and never says a word, tried with https_timeout 500ms: (the 8
    listening sockets, the daemon, its tlsrpt settings, a reader of its temporary_failure count)."""
    silent = []
    for _ in range(8):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        silent.append(listener)
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} {name}{n}.example.net https://silent.rpt.example.net:{listener.getsockname()[1]}/{name}\n"
        "policy no-policy-found - - 1 0 0\n" for n, listener in enumerate(silent, 1))
    directory = workdir / f"{name}-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": interval, "https_timeout": "500ms", "retry_for": "1h",
              "submitter": SUBMITTER}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name=name,
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    failures = lambda: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total",  # noqa: E731
                                     method="https", result="temporary_failure")
    return silent, daemon, tlsrpt, failures


def test_a_run_of_rua_that_hang_ends_once_it_took_its_interval(workdir, knot, daemon_factory):
    """Each try has its deadline (tlsrpt.https_timeout here), but a run went on through every report due: with
    max_reports_per_run (1000) reports whose rua hangs until its deadline (30s), 8 hours, 10 rua a report 80, and
    a report mail's own timeouts.* allow half an hour a try. Meanwhile no next run began, so a new day's reports,
    which a run tries first, waited for the end of it. A run now ends once it has taken tlsrpt.interval, the rest
    waiting for the next run: here 8 reports to 8 hosts that never answer (500 ms each; one host's further reports
    are skipped once it timed out, so each has its own) and interval 1s, made 1h by a reload after the first try
    (no next run comes; the run under way keeps its own): at most the run's second try follows (before: the 7
    others, 3.5 s more)."""
    silent, daemon, tlsrpt, failures = eight_silent_https_reports(workdir, knot, daemon_factory, "hang", "1s")
    harness.wait_for(lambda: failures() >= 1, 20, what="the first try")
    reload_tlsrpt(daemon, {**tlsrpt, "interval": "1h"})
    at_reload = failures()
    time.sleep(4)
    assert failures() - at_reload <= 1, "the run went on past its interval"
    assert "tlsrpt_deferred" in daemon.stderr() and "the run took tlsrpt.interval 1s" in daemon.stderr()
    assert len(reports_of(daemon, DATE)) == 8  # none given up: each waits for its next try
    for listener in silent:
        listener.close()


def reload_tlsrpt(daemon, tlsrpt):
    """A reload of `daemon` whose new config has `tlsrpt`; returns once it succeeded."""
    daemon.config["tlsrpt"] = tlsrpt
    daemon.config_path.write_text(json.dumps(daemon.config, indent=2) + "\n")
    daemon.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success") == 1,
                     10, what="the reload")


def test_a_reload_that_turns_send_off_ends_the_run_under_way(workdir, knot, daemon_factory):
    """tlsrpt.send turned off by a reload applied to the next run only: the run under way went on with every
    report due, up to tlsrpt.interval (1h by default) or max_reports_per_run (1000), so an operator who stopped
    the sending (reports going where they should not) saw them go out for up to an hour more. Here 8 reports
    to 8 hosts that never answer (500 ms each), interval 5s, send turned off after the first try: the 7 others
    followed (3.5 s). The run now ends before its next report (the try in flight, if any, finishes)."""
    silent, daemon, tlsrpt, failures = eight_silent_https_reports(workdir, knot, daemon_factory, "send-off", "5s")
    try:
        harness.wait_for(lambda: failures() >= 1, 30, what="the first try")
        reload_tlsrpt(daemon, {**tlsrpt, "send": False})
        at_reload = failures()
        time.sleep(4)
        assert failures() - at_reload <= 1, ("the run went on after send was turned off", daemon.log_tail())
        assert re.search(r'tlsrpt_deferred reports=[1-7] reason="tlsrpt.send was turned off by a reload"',
                         daemon.stderr()), daemon.log_tail()
        assert len(reports_of(daemon, DATE)) == 8  # kept, none given up
    finally:
        for listener in silent:
            listener.close()


class HeadThenStall(http.server.BaseHTTPRequestHandler):
    """Takes each report: answers 201 with a head that announces a body of 100 octets, then sends none for 10 s
    (a reporting service whose answer stalls after its status line, or a hostile one)."""
    protocol_version = "HTTP/1.1"
    posts = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        HeadThenStall.posts.append((self.path, time.monotonic()))
        self.send_response(201)
        self.send_header("Content-Length", "100")
        self.end_headers()
        time.sleep(10)

    def log_message(self, *args):
        pass


def test_a_2xx_whose_body_stalls_is_taken_at_its_status(certs, report_cert, knot, daemon_factory, workdir):
    """An https rua that answered 201 and then stalled in its body held each try until tlsrpt.https_timeout: the
    status was all that counted (success), yet the body was read to its end, and the host was not marked as one
    that timed out, so every report to it took the whole https_timeout (here 4 reports, 2 s each, interval 1s:
    one report a run, the 4th POST 9 s after the 1st). The answer's head is all a report's POST needs: the body
    is not read, and the 4 go out at once."""
    server = harness.https_server(HeadThenStall, *report_cert)
    try:
        port = server.server_address[1]
        directory = workdir / "stallbody-state"
        directory.mkdir(exist_ok=True)
        (directory / "tlsrpt.state").write_text("mailflowd-tlsrpt 1\n" + "".join(
            f"day {DATE} s{n}.example.net https://reports.rpt.example.net:{port}/stall{n}\n"
            "policy no-policy-found - - 1 0 0\n" for n in range(1, 5)))
        listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                      "upstream": "internet"}]
        daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="stallbody",
                                dns={"servers": [knot.address], "timeout": "3s"},
                                tlsrpt={"send": True, "interval": "1s", "https_timeout": "2s", "retry_for": "1h",
                                        "submitter": SUBMITTER, "ca_file": str(certs / "ca.pem")})
        harness.wait_for(lambda: len(HeadThenStall.posts) == 4, 40, what="the 4 reports")
        first, last = HeadThenStall.posts[0][1], HeadThenStall.posts[-1][1]
        assert last - first < 4, (f"the 4th POST came {last - first:.1f} s after the 1st", daemon.log_tail())
        harness.wait_for(lambda: reports_of(daemon, DATE) == [], 10, what="every report done with")
        m = daemon.metrics()
        assert harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https", result="success") == 4
        assert harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https", result="temporary_failure") == 0
        assert "answered 201" in daemon.stderr()
    finally:
        server.shutdown()


def test_a_run_tries_a_rua_host_that_timed_out_once(workdir, knot, silent_port, https_port, certs, daemon_factory):
    """A run tried every report of an https rua host that does not answer, one after another, each until
    tlsrpt.https_timeout: the reporting service of a thousand domains, down for the run, held it for its whole
    interval, and the reports to every other rua waited behind it (here 6 reports to a host that never answers,
    500 ms each, before the report of z.example.net to a host that takes it: 6 tries first, 3 s). The host's
    first try timed out: its other reports in that run are not tried (counted as skipped, logged once with the
    host), and the report behind them goes at once."""
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} d{n}.example.net https://silent.rpt.example.net:{silent_port}/d{n}\n"
        "policy no-policy-found - - 1 0 0\n" for n in range(1, 7)) + (
        f"day {DATE} z.example.net https://reports.rpt.example.net:{https_port}/skip\n"
        "policy no-policy-found - - 1 0 0\n")
    directory = workdir / "dead-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "5s", "https_timeout": "500ms", "retry_for": "1h", "submitter": SUBMITTER,
              "ca_file": str(certs / "ca.pem")}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="dead",
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    harness.wait_for(lambda: any(path == "/skip" for path, _, _ in Collector.posts), 20, what="z's report")
    wait_https_successes(daemon, 1)
    m = daemon.metrics()
    count = lambda result: harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https",  # noqa: E731
                                         result=result)
    assert (count("temporary_failure"), count("skipped"), count("success")) == (1, 5, 1)
    deferred = f"their rua timed out earlier in this run (https://silent.rpt.example.net:{silent_port})"
    assert deferred in log_with(daemon, deferred), daemon.log_tail()
    # Each is tried again at a later run (the first of them first, while the host stays down): none was lost.
    assert reports_of(daemon, DATE) == [f"d{n}.example.net" for n in range(1, 7)]


def six_https_reports_then_one(workdir, certs, daemon_factory, proxy, name, port, https_port):
    """A daemon whose state holds 6 reports of DATE to https://NAME.rpt.example.net:PORT/NAME1..6, then one of
    z.example.net to https://reports.rpt.example.net:HTTPS_PORT/NAMEz, its DNS through `proxy` (dns.timeout 1 s,
    tlsrpt.https_timeout 5 s); returned once z's report was posted and counted."""
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} d{n}.example.net https://{name}.rpt.example.net:{port}/{name}{n}\n"
        "policy no-policy-found - - 1 0 0\n" for n in range(1, 7)) + (
        f"day {DATE} z.example.net https://reports.rpt.example.net:{https_port}/{name}z\n"
        "policy no-policy-found - - 1 0 0\n")
    directory = workdir / f"{name}-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "5s", "https_timeout": "5s", "retry_for": "1h", "submitter": SUBMITTER,
              "ca_file": str(certs / "ca.pem")}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name=name,
                            dns={"servers": [proxy.address], "timeout": "1s"}, tlsrpt=tlsrpt)
    harness.wait_for(lambda: any(path == f"/{name}z" for path, _, _ in Collector.posts), 30, what="z's report")
    wait_https_successes(daemon, 1)
    return daemon


def https_outcomes(daemon):
    """The run's https deliveries: (temporary_failure, skipped, success)."""
    m = daemon.metrics()
    return tuple(harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https", result=result)
                 for result in ("temporary_failure", "skipped", "success"))


def test_an_https_rua_host_whose_lookup_timed_out_is_marked(workdir, knot, https_port, certs, daemon_factory):
    """The https rua host's AAAA and A queries get no answer (the DNS proxy drops them) and dns.timeout (1 s) is
    shorter than tlsrpt.https_timeout (5 s): the lookup ended at dns.timeout with "no address for ...", which did
    not say timed_out, so each of the 6 reports to the host waited dns.timeout again before z's report went
    (temporary_failure 6, skipped 0). A lookup that timed out now marks the host and port for the run, as one
    that ran into https_timeout does (1 tried, 5 skipped)."""
    proxy = TamperingProxy(knot.address, drop=["hdrop.rpt.example.net"])
    try:
        daemon = six_https_reports_then_one(workdir, certs, daemon_factory, proxy, "hdrop", https_port, https_port)
        counts = settled(lambda: https_outcomes(daemon), (1, 5, 1))
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = log_with(daemon, "their rua timed out earlier")
        assert "no address for hdrop.rpt.example.net: AAAA: no answer within 1s" in log, log
        assert f"their rua timed out earlier in this run (https://hdrop.rpt.example.net:{https_port})" in log, log
        assert not [path for path, _, _ in Collector.posts if path.startswith("/hdrop") and path != "/hdropz"]
    finally:
        proxy.close()


def test_an_https_rua_host_whose_aaaa_lookup_timed_out_and_whose_post_failed_is_marked(workdir, knot,
                                                                                        https_port, certs,
                                                                                        daemon_factory):
    """The name server drops the https rua host's AAAA queries and answers its A query (dns.timeout 1 s, shorter
    than tlsrpt.https_timeout); nothing listens at the address and port: each try waits dns.timeout, then the
    connection is refused. The refusal did not say timed_out, so each of the 6 reports to the host waited for the
    AAAA query again (temporary_failure 6, skipped 0). The try failed after a lookup that timed out: the host is
    marked for the run (1 tried, 5 skipped), as a mailto: walk that hung before a refusing host is (57e7579)."""
    proxy = TamperingProxy(knot.address, drop=["hpart.rpt.example.net"], drop_types=[28])
    refused_port = harness.free_port()  # nothing listens there
    try:
        daemon = six_https_reports_then_one(workdir, certs, daemon_factory, proxy, "hpart", refused_port, https_port)
        counts = settled(lambda: https_outcomes(daemon), (1, 5, 1))
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = log_with(daemon, "their rua timed out earlier")
        assert "cannot connect to hpart.rpt.example.net (127.0.0.1" in log, log
        assert f"their rua timed out earlier in this run (https://hpart.rpt.example.net:{refused_port})" in log, log
    finally:
        proxy.close()


class HangingMx:
    """An MX host at `host`:`port` (HANG_ADDR["hang"] unless said) that `mode` says how to fail: "silent" takes the connection (the
    kernel's backlog completes it) and never says a word; "stall_at_mail" greets, answers EHLO, then never answers
    MAIL; "close_at_mail" greets, answers EHLO and closes the connection at MAIL; "defer_at_mail" answers MAIL 451."""

    def __init__(self, mode, port, host=HANG_ADDR["hang"]):
        self.mode = mode
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(16)
        self.connections = []
        self.thread = None
        if mode != "silent":
            self.thread = threading.Thread(target=self.serve, daemon=True)
            self.thread.start()

    def serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(connection)
            threading.Thread(target=self.converse, args=(connection,), daemon=True).start()

    def converse(self, connection):
        try:
            connection.settimeout(30)
            connection.sendall(b"220 mx.hang.rpt.example.net ESMTP\r\n")
            buffered = b""
            while True:
                data = connection.recv(4096)
                if not data:
                    return
                buffered += data
                while b"\r\n" in buffered:
                    line, buffered = buffered.split(b"\r\n", 1)
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        connection.sendall(b"250 mx.hang.rpt.example.net\r\n")
                    elif verb == b"MAIL" and self.mode == "close_at_mail":
                        connection.close()
                        return
                    elif verb == b"MAIL" and self.mode == "defer_at_mail":
                        connection.sendall(b"451 4.3.2 try again later\r\n")
                    elif verb == b"MAIL":
                        continue  # stall_at_mail: no answer, ever
                    elif verb == b"QUIT":
                        connection.sendall(b"221 bye\r\n")
                        return
                    else:
                        connection.sendall(b"502 5.5.2 no\r\n")
        except OSError:
            return

    def close(self):
        self.listener.close()
        for connection in self.connections:
            connection.close()
        if self.thread:
            self.thread.join(5)


def six_mailto_reports_then_one(workdir, knot, name, port, prefix, domain, take):
    """The config of a daemon whose state holds 6 reports of DATE to mailto: rua at `domain` (of
    PREFIX1..6.example.net), then one of z.example.net to `take`, every mail host on `port`; each step that hangs
    costs 1 s, a whole try 5 s at most, a run 5 s (tlsrpt.interval)."""
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "5s", "retry_for": "1h"}
    _, config = state_dir_and_config(workdir, name, "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} {prefix}{n}.example.net mailto:reports+{prefix}{n}@{domain}\n"
        "policy no-policy-found - - 1 0 0\n" for n in range(1, 7)) + (
        f"day {DATE} z.example.net mailto:reports@{take}\n"
        "policy no-policy-found - - 1 0 0\n"), knot, tlsrpt,
        timeouts={"upstream_connect": "1s", "command": "1s", "upstream_open": "5s"})
    return config


def outcomes(daemon):
    """The run's deliveries: (temporary_failure, skipped, success)."""
    return tuple(deliveries(daemon, result) for result in ("temporary_failure", "skipped", "success"))


@pytest.mark.parametrize("mode", ["silent", "stall_at_mail", "close_at_mail"])
def test_a_run_tries_a_mailto_rua_domain_that_timed_out_once(mode, workdir, knot, sink_factory, mailflowd_bin):
    """A run tried every report to a mailto: rua whose mail host hangs, one after another, each until its deadline
    (a host that never greets: timeouts.upstream_connect; one that stalls at MAIL: timeouts.command; up to
    timeouts.upstream_open and the timeouts.* of each step): a reporting address that many domains send their
    reports to, whose host hangs for the run, held it for that per report, and the reports to every other rua
    waited behind it. Here 6 reports to hang.rpt.example.net (1 s each) before the report of z.example.net to
    take.rpt.example.net: 6 tries before z's mail before (temporary_failure 6, skipped 0). A mail domain whose try
    timed out is now marked for the rest of the run, as an https host is: its other reports are counted as
    skipped and logged once at the end of the run, and the try says "timed out", not "connection lost". A host
    that closes the connection (close_at_mail) answers at once: each of its reports is still tried."""
    port = harness.free_port("127.0.0.1", *HANG_ADDR.values())
    take = sink_factory(f"rua-take-{mode}", host=HANG_ADDR["take"], port=port)
    hanging = HangingMx(mode, port)
    config = six_mailto_reports_then_one(workdir, knot, f"hang-{mode}", port,
                                         "d", "hang.rpt.example.net", "take.rpt.example.net")
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name=f"hang-{mode}").start()
    try:
        take.wait_messages(1, timeout=30)
        counts = settled(lambda: outcomes(daemon), (6, 0, 1) if mode == "close_at_mail" else (1, 5, 1))
        log = daemon.stderr() if mode == "close_at_mail" else log_with(daemon, "their rua timed out")
        tries = [line for line in log.splitlines() if "tlsrpt_delivery" in line and "hang.rpt.example.net" in line]
        if mode == "close_at_mail":
            assert counts == (6, 0, 1), (counts, daemon.log_tail())
            assert all("connection lost at MAIL" in line for line in tries), tries
            assert "their rua timed out" not in log
        else:
            assert counts == (1, 5, 1), (counts, daemon.log_tail())
            (first,) = tries
            assert ("timed out at MAIL" if mode == "stall_at_mail" else "last: connect_timeout") in first, first
            assert "their rua timed out earlier in this run (the mail hosts of hang.rpt.example.net)" in log, log
        # None was lost: each waits for a later run.
        assert reports_of(daemon, DATE) == [f"d{n}.example.net" for n in range(1, 7)]
    finally:
        harness.stop_exits_0(daemon)
        hanging.close()


def test_a_mailto_rua_domain_whose_walk_hung_at_one_host_and_was_refused_at_the_last_is_marked(
        workdir, knot, sink_factory, mailflowd_bin):
    """The rua domain walk.rpt.example.net has two MX hosts: the first takes the connection and never greets
    (each walk waits timeouts.upstream_connect for it), the second refuses the connection. Whether the domain
    was marked for the rest of the run went by the last host tried alone: refused, so not marked, and each of
    its 6 reports waited for the first host again (1 s each) before the report of z.example.net to
    wtake.rpt.example.net went (temporary_failure 6, skipped 0). The walk is the unit, as Postfix's queue
    manager suspends a destination when its last MX host failed, whatever the earlier ones did: a walk that
    found no host to take the mail and hung at one of them marks the domain (1 tried, 5 skipped)."""
    port = harness.free_port("127.0.0.1", *WALK_ADDR.values())
    take = sink_factory("rua-walk-take", host=WALK_ADDR["take"], port=port)
    hanging = HangingMx("silent", port, host=WALK_ADDR["hang"])  # nothing listens at WALK_ADDR["refuse"]
    config = six_mailto_reports_then_one(workdir, knot, "walk", port,
                                         "w", "walk.rpt.example.net", "wtake.rpt.example.net")
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name="walk").start()
    try:
        take.wait_messages(1, timeout=30)
        counts = settled(lambda: outcomes(daemon), (1, 5, 1))
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = log_with(daemon, "their rua timed out earlier")
        assert "their rua timed out earlier in this run (the mail hosts of walk.rpt.example.net)" in log, log
        assert reports_of(daemon, DATE) == [f"w{n}.example.net" for n in range(1, 7)]
    finally:
        harness.stop_exits_0(daemon)
        hanging.close()


def test_a_mailto_rua_domain_whose_walk_hung_before_the_host_that_deferred_the_mail_is_marked(
        workdir, knot, sink_factory, mailflowd_bin):
    """walk.rpt.example.net's case with a second host that takes the connection and answers MAIL 451: the try
    failed after its walk waited for the first host (timeouts.upstream_connect), so the next report to the domain
    waits for it again before it gets that far. It was not marked (temporary_failure 6, skipped 0): it now is,
    as a walk that hung and found no host is (1 tried, 5 skipped)."""
    port = harness.free_port("127.0.0.1", *WALK_ADDR.values())
    take = sink_factory("rua-walkdefer-take", host=WALK_ADDR["take"], port=port)
    hanging = HangingMx("silent", port, host=WALK_ADDR["hang"])
    deferring = HangingMx("defer_at_mail", port, host=WALK_ADDR["defer"])
    config = six_mailto_reports_then_one(workdir, knot, "walkdefer", port,
                                         "v", "walkdefer.rpt.example.net", "wtake.rpt.example.net")
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name="walkdefer").start()
    try:
        take.wait_messages(1, timeout=30)
        counts = settled(lambda: outcomes(daemon), (1, 5, 1))
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = log_with(daemon, "their rua timed out earlier")
        assert "MAIL answered 451" in log, log
        assert "their rua timed out earlier in this run (the mail hosts of walkdefer.rpt.example.net)" in log, log
    finally:
        harness.stop_exits_0(daemon)
        hanging.close()
        deferring.close()


@pytest.mark.parametrize("dropped", ["mx", "address", "address_then_refused"])
def test_a_mailto_rua_domain_whose_route_lookup_timed_out_is_marked(dropped, workdir, knot, sink_factory,
                                                                     mailflowd_bin):
    """The rua domain's route lookup gets no answer (a DNS tampering proxy drops the queries for the name): "mx",
    the MX query of lookdrop.rpt.example.net. The lookup ends at dns.timeout (1 s, shorter than
    timeouts.upstream_open) with 451 4.4.3, which did not say timed_out(), so each of the 6 reports to the domain
    waited for dns.timeout again (libunbound does not keep the timeout: each try asks again) before the report of
    z.example.net went (temporary_failure 6, skipped 0). A route lookup that timed out now marks the domain for
    the run, as a walk that hung does (1 tried, 5 skipped). "address": the MX query is answered, the MX host's
    AAAA and A queries are dropped (451 4.4.3 for the MX hosts); "address_then_refused": so are those of the first
    of two MX hosts, and the second refuses the connection (the walk's 451 4.4.1 after a dns.timeout's wait)."""
    domain, name = {"mx": ("lookdrop", "lookdrop.rpt.example.net"),
                    "address": ("addrdrop", "mx.addrdrop.rpt.example.net"),
                    "address_then_refused": ("addrwalk", "mx.addrdrop.rpt.example.net")}[dropped]
    port = harness.free_port("127.0.0.1", WALK_ADDR["take"])
    take = sink_factory(f"rua-{domain}-take", host=WALK_ADDR["take"], port=port)
    proxy = TamperingProxy(knot.address, drop=[name])
    config = six_mailto_reports_then_one(workdir, knot, domain, port,
                                         "l", f"{domain}.rpt.example.net", "wtake.rpt.example.net")
    config["dns"] = {"servers": [proxy.address], "timeout": "1s"}
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name=domain).start()
    try:
        take.wait_messages(1, timeout=40)
        counts = settled(lambda: outcomes(daemon), (1, 5, 1))
        asked = [t for (q, _), t in zip(proxy.questions, proxy.asked_at) if q == name]
        print("dropped queries", len(asked), "spread over", asked[-1] - asked[0] if asked else 0, "s")
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = log_with(daemon, "their rua timed out earlier")
        assert ("451 4.4.1" if dropped == "address_then_refused" else "451 4.4.3") in log, log
        assert f"their rua timed out earlier in this run (the mail hosts of {domain}.rpt.example.net)" in log, log
        assert reports_of(daemon, DATE) == [f"l{n}.example.net" for n in range(1, 7)]
    finally:
        harness.stop_exits_0(daemon)
        proxy.close()


class HangsOnOnePath(http.server.BaseHTTPRequestHandler):
    """Takes every report but the one POSTed to /hang, which it holds past tlsrpt.https_timeout (a large report
    on a slow link, a path of the reporting service that hangs)."""
    posts = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/hang":
            time.sleep(3)
            return
        HangsOnOnePath.posts.append(self.path)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_report_that_times_out_does_not_keep_its_hosts_other_reports_untried(workdir, knot, certs, report_cert,
                                                                                 daemon_factory):
    """A report whose own POST times out marks its host for the run, and the host's other reports are skipped
    (not tried). The skipped ones took their turn all the same, so at the next run the one that timed out, tried
    longest ago, went first again, timed out again, and the others were skipped again, run after run, until
    retry_for gave them up without a single try, although the host took them. A report none of whose rua was
    tried takes no turn: the next run tries the skipped ones first."""
    server = harness.https_server(HangsOnOnePath, *report_cert)
    port = server.server_address[1]
    try:
        host = f"https://reports.rpt.example.net:{port}"
        state = "mailflowd-tlsrpt 1\n" + "".join(
            f"day {DATE} {name}.example.net {host}/{path}\npolicy no-policy-found - - 1 0 0\n"
            for name, path in (("h1", "hang"), ("h2", "two"), ("h3", "three")))
        directory = workdir / "onepath-state"
        directory.mkdir(exist_ok=True)
        (directory / "tlsrpt.state").write_text(state)
        listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                      "upstream": "internet"}]
        tlsrpt = {"send": True, "interval": "1s", "https_timeout": "500ms", "retry_for": "1h",
                  "submitter": SUBMITTER, "ca_file": str(certs / "ca.pem")}
        daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="onepath",
                                dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
        # Several runs (1 s apart, the first after at most 1 s): before, /hang first at each, the others skipped.
        harness.wait_for(lambda: sorted(HangsOnOnePath.posts) == ["/three", "/two"], 10,
                         what="the reports of h2 and h3, which the host takes")
        wait_https_successes(daemon, 2)
        assert reports_of(daemon, DATE) == ["h1.example.net"]
        m = daemon.metrics()
        assert harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https", result="success") == 2
        assert harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https", result="gave_up") == 0
    finally:
        server.shutdown()


def test_a_skipped_report_is_not_given_up_before_its_first_try(workdir, knot, silent_port, daemon_factory):
    """tlsrpt.retry_for is counted from a report's first try, and a report skipped in a run (its https host timed
    out earlier in the run) starts it too; but it was given up in the very run that skipped it once its retry_for
    had run out: with retry_for 0 (one try each) the first report to a host that does not answer was tried and
    given up, and the others, skipped behind it, were given up with it untried (counted gave_up, dropped), where
    the host was not even asked. A report is given up only at a run that tried it: each is tried once here."""
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} g{n}.example.net https://silent.rpt.example.net:{silent_port}/g{n}\n"
        "policy no-policy-found - - 1 0 0\n" for n in range(1, 4))
    directory = workdir / "once-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "1s", "https_timeout": "500ms", "retry_for": "0s", "submitter": SUBMITTER}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="once",
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    count = lambda result: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total",  # noqa: E731
                                         method="https", result=result)
    harness.wait_for(lambda: count("gave_up") == 3, 15, what="the three reports given up")
    assert reports_of(daemon, DATE) == []
    assert count("temporary_failure") == 3, "a report was given up without its one try"
    tried = re.findall(r"tlsrpt_delivery date=\S+ domain=(g\d)\.example\.net rua=\S+ method=https "
                       r"result=temporary_failure", daemon.stderr())
    assert sorted(tried) == ["g1", "g2", "g3"], daemon.log_tail()


def test_a_rua_skipped_in_a_run_is_not_given_up_with_the_reports_other_rua(workdir, knot, silent_port, https_port,
                                                                           certs, daemon_factory):
    """A report whose rua were partly skipped (their destination timed out earlier in the run) and partly tried:
    its verdict gave up every rua left once retry_for had run out, the skipped one too, which the run never asked.
    With retry_for 0: g1's report to a host that never answers times out (given up, tried once); g2's report
    goes to that host (skipped) and to one that takes it; the skipped rua was given up with no try at all
    (temporary_failure 1, gave_up 2). It is given up only at a run that tried it: g2's report is kept for that
    rua, tried at the next run, and given up then (temporary_failure 2, gave_up 2)."""
    silent = f"https://silent.rpt.example.net:{silent_port}"
    state = "mailflowd-tlsrpt 1\n" + (
        f"day {DATE} g1.example.net {silent}/g1\npolicy no-policy-found - - 1 0 0\n"
        f"day {DATE} g2.example.net {silent}/g2,https://reports.rpt.example.net:{https_port}/g2\n"
        "policy no-policy-found - - 1 0 0\n")
    directory = workdir / "partly-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "1s", "https_timeout": "500ms", "retry_for": "0s", "submitter": SUBMITTER,
              "ca_file": str(certs / "ca.pem")}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="partly",
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    count = lambda result: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total",  # noqa: E731
                                         method="https", result=result)
    harness.wait_for(lambda: count("gave_up") == 2 and reports_of(daemon, DATE) == [], 15,
                     what="both silent rua given up, every report done with")
    assert any(path == "/g2" for path, _, _ in Collector.posts)
    assert count("temporary_failure") == 2, ("a rua was given up without a try", daemon.log_tail())
    tried = re.findall(r"tlsrpt_delivery date=\S+ domain=(g\d)\.example\.net rua=\S+/g\d method=https "
                       r"result=temporary_failure", daemon.stderr())
    assert sorted(tried) == ["g1", "g2"], daemon.log_tail()


def test_tlsrpt_deferred_counts_the_reports_left_not_those_skipped_before(workdir, knot, silent_port, https_port,
                                                                          certs, daemon_factory):
    """tlsrpt_deferred for max_reports_per_run said how many reports were left as the reports due less those
    tried, so a report skipped earlier in the run (every rua skipped: not one of max_reports_per_run, and said
    in the run's other tlsrpt_deferred line) was counted again among those left. Here max_reports_per_run 2: d1
    to a host that never answers (tried), d2 to it (skipped), d3 to a host that takes it (tried), d4 and d5 left:
    the line said reports=3, and now 2."""
    silent = f"https://silent.rpt.example.net:{silent_port}"
    ok = f"https://reports.rpt.example.net:{https_port}"
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} d{n}.example.net {silent if n <= 2 else ok}/left{n}\npolicy no-policy-found - - 1 0 0\n"
        for n in range(1, 6))
    directory = workdir / "left-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "3s", "https_timeout": "500ms", "retry_for": "1h", "submitter": SUBMITTER,
              "ca_file": str(certs / "ca.pem"), "max_reports_per_run": 2}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="left",
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    harness.wait_for(lambda: "max_reports_per_run reached" in daemon.stderr(), 60, what="the first run's end")
    assert any(path == "/left3" for path, _, _ in Collector.posts)
    left = re.findall(r'tlsrpt_deferred reports=(\d+) reason="tlsrpt.max_reports_per_run reached"', daemon.stderr())
    assert left == ["2"], daemon.log_tail()
    deferred = 'tlsrpt_deferred reports=1 reason="their rua timed out earlier in this run'
    assert deferred in log_with(daemon, deferred), daemon.log_tail()
    assert reports_of(daemon, DATE) == ["d1.example.net", "d2.example.net", "d4.example.net", "d5.example.net"]
