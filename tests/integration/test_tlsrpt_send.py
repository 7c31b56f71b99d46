"""TLS-RPT reports sent by the real daemon (tlsrpt.send: true, RFC 8460 section 5): the store is seeded through
state_dir/tlsrpt.state in the daemon's own format; knotd (tests/tools/dns_server.py) serves the rua domains'
MX hosts on 127.0.0.x, where real SMTP sinks listen on tlsrpt.smtp_port, and the https rua's host, where a
python HTTPS server with a certificate from the test CA takes the POST. Checked: the report mail as it arrives
(envelope, section 5.3 headers, the gzip attachment decompressed to the RFC 8460 JSON, over STARTTLS), the
POST (Content-Type application/tlsrpt+gzip, the same JSON), a rua that answers 451 retried every
tlsrpt.interval and given up after tlsrpt.retry_for, every try counted in mailflow_tlsrpt_deliveries_total,
sent days forgotten, today's day kept, and tlsrpt.send: false sending nothing. An https rua whose certificate
names another host, or whose server never answers (tlsrpt.https_timeout), is a temporary failure that says why.
The retry bookkeeping survives a restart (state_dir/tlsrpt-ledger.state): a rua that took a report does not get
it again, and retry_for counts from the first try; a corrupt ledger file is moved aside and counted. A reload
that turns send on with a shorter interval sends at that interval, not at the end of the wait under way."""
import contextlib
import datetime
import email
import email.policy
import gzip
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import harness
import report_helpers as rh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, TamperingProxy  # noqa: E402

DATE = "2026-01-02"
ADDR = {"ok": "127.0.0.51", "busy": "127.0.0.52"}
LEDGER_ADDR = {"took": "127.0.0.53", "later": "127.0.0.54"}  # the restart test's own rua hosts
STALL_ADDR = "127.0.0.55"  # an MX host that takes the connection and never greets
AGAIN_ADDR = "127.0.0.150"  # the one-report-per-day test's rua host
TURN_ADDR = {"stuck": "127.0.0.116", "next": "127.0.0.117"}  # the first-try-first test's rua hosts
FQDN_ADDR = "127.0.0.118"  # the fully qualified mailto: rua's MX host
HANG_ADDR = {"hang": "127.0.5.1", "take": "127.0.5.2"}  # the hanging mailto: rua test's MX hosts
# The walk test's MX hosts: one that hangs, then one where nothing listens (refused), and the other rua's host
WALK_ADDR = {"hang": "127.0.7.11", "refuse": "127.0.7.12", "take": "127.0.7.13", "defer": "127.0.7.14"}
ZONE = f"""$ORIGIN rpt.example.net.
$TTL 300
@              SOA   ns hostmaster 1 3600 600 86400 300
@              NS    ns
ns             A     127.0.0.1
ok             MX    10 mx.ok
mx.ok          A     {ADDR["ok"]}
busy           MX    10 mx.busy
mx.busy        A     {ADDR["busy"]}
took           MX    10 mx.took
mx.took        A     {LEDGER_ADDR["took"]}
later          MX    10 mx.later
mx.later       A     {LEDGER_ADDR["later"]}
stall          MX    10 mx.stall
again          MX    10 mx.again
mx.again       A     {AGAIN_ADDR}
mx.stall       A     {STALL_ADDR}
stuck          MX    10 mx.stuck
mx.stuck       A     {TURN_ADDR["stuck"]}
next           MX    10 mx.next
mx.next        A     {TURN_ADDR["next"]}
fq             MX    10 mx.fq
mx.fq          A     {FQDN_ADDR}
hang           MX    10 mx.hang
mx.hang        A     {HANG_ADDR["hang"]}
take           MX    10 mx.take
mx.take        A     {HANG_ADDR["take"]}
walk           MX    10 mx.walkhang
walk           MX    20 mx.walkrefuse
mx.walkhang    A     {WALK_ADDR["hang"]}
mx.walkrefuse  A     {WALK_ADDR["refuse"]}
wtake          MX    10 mx.wtake
walkdefer      MX    10 mx.walkhang
walkdefer      MX    20 mx.walkdefer
mx.walkdefer   A     {WALK_ADDR["defer"]}
mx.wtake       A     {WALK_ADDR["take"]}
lookdrop       MX    10 mx.lookdrop
mx.lookdrop    A     {WALK_ADDR["take"]}
addrdrop       MX    10 mx.addrdrop
mx.addrdrop    A     {WALK_ADDR["take"]}
addrwalk       MX    10 mx.addrdrop
addrwalk       MX    20 mx.walkrefuse
hdrop          A     127.0.0.1
hpart          A     127.0.0.1
reports        A     127.0.0.1
wrong          A     127.0.0.1
silent         A     127.0.0.1
"""
SUBMITTER = "mx.sender.example"


class Collector(http.server.BaseHTTPRequestHandler):
    posts = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Collector.posts.append((self.path, dict(self.headers), body))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def report_cert(certs, workdir):
    """A certificate from the test CA for reports.rpt.example.net."""
    return harness.ca_signed_cert(certs, workdir, "reports", ["reports.rpt.example.net"])


@pytest.fixture(scope="module")
def https_port(report_cert):
    server = harness.https_server(Collector, *report_cert)
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def silent_port():
    """Takes connections (the kernel's backlog completes them) and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture(scope="module")
def knot(workdir):
    server = KnotServer(workdir, {"rpt.example.net": ZONE}).start()
    yield server
    server.stop()


def state(https_port, today):
    return f"""mailflowd-tlsrpt 1
day {DATE} a.example.net mailto:tlsrpt@ok.rpt.example.net,https://reports.rpt.example.net:{https_port}/v1/tlsrpt
policy sts version:%20STSv1,mode:%20enforce,mx:%20*.a.example.net,max_age:%2086400 *.a.example.net 5326 303 0
failure certificate-expired 192.0.2.1 mx1.a.example.net 198.51.100.7 - 303
day {DATE} b.example.net mailto:reports@busy.rpt.example.net
policy no-policy-found - - 2 0 0
day {today} a.example.net mailto:tlsrpt@ok.rpt.example.net
policy no-policy-found - - 1 0 0
"""


def failing_state(https_port, silent_port):
    return f"""mailflowd-tlsrpt 1
day {DATE} c.example.net https://wrong.rpt.example.net:{https_port}/wrong,https://silent.rpt.example.net:{silent_port}/
policy no-policy-found - - 1 0 0
"""


@pytest.fixture(scope="module")
def env(certs, workdir, knot, https_port, silent_port, sink_factory, daemon_factory):
    port = harness.free_port("127.0.0.1", *ADDR.values())
    sinks = {
        # STARTTLS offered: the report mail goes over opportunistic TLS.
        "ok": sink_factory("rua-ok", host=ADDR["ok"], port=port, tls_cert=certs / "server.pem",
                           tls_key=certs / "server.key"),
        "busy": sink_factory("rua-busy", host=ADDR["busy"], port=port,
                             fail_rcpt=["reports@busy.rpt.example.net=451 4.3.0 try again later"]),
    }
    tlsrpt = {"organization_name": "Example Sender", "contact_info": "tls@sender.example", "submitter": SUBMITTER,
              "smtp_port": port, "ca_file": str(certs / "ca.pem"), "interval": "1s", "retry_for": "3s"}
    dns = {"servers": [knot.address], "timeout": "3s"}
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    upstreams = [{"name": "internet", "mx": True}]
    # The day written as today's must still be today when test_a_day_every_rua_took_is_forgotten_today_is_kept
    # asks for it (after midnight the daemon sends that day as over).
    today = rh.day_clear_of_midnight()
    for name, send in (("sender", True), ("quiet", False)):
        directory = workdir / f"{name}-state"
        directory.mkdir(exist_ok=True)
        (directory / "tlsrpt.state").write_text(state(https_port, today))
    quiet = daemon_factory(listeners, upstreams, name="quiet", dns=dns, tlsrpt={**tlsrpt, "send": False})
    listeners = [{**listeners[0], "address": f"127.0.0.1:{harness.free_port()}"}]
    sender = daemon_factory(listeners, upstreams, name="sender", dns=dns, tlsrpt={**tlsrpt, "send": True})
    directory = workdir / "refused-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(failing_state(https_port, silent_port))
    listeners = [{**listeners[0], "address": f"127.0.0.1:{harness.free_port()}"}]
    refused = daemon_factory(listeners, upstreams, name="refused", dns=dns,
                             tlsrpt={**tlsrpt, "send": True, "https_timeout": "500ms"})
    return {"sender": sender, "quiet": quiet, "refused": refused, "sinks": sinks, "https_port": https_port,
            "today": today}


def reports_of(daemon, date):
    return [r["domain"] for r in json.loads(daemon.get(f"/api/v1/tlsrpt?date={date}")[1])["reports"]]


def check_report(report):
    assert report["organization-name"] == "Example Sender"
    assert report["contact-info"] == "tls@sender.example"
    assert report["report-id"] == f"{DATE}.a.example.net@{SUBMITTER}"
    assert report["date-range"] == {"start-datetime": f"{DATE}T00:00:00Z", "end-datetime": f"{DATE}T23:59:59Z"}
    (policy,) = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["summary"] == {"total-successful-session-count": 5326, "total-failure-session-count": 303}
    assert policy["failure-details"][0]["result-type"] == "certificate-expired"


def test_mailto_rua_gets_the_section_5_3_mail_over_starttls(env):
    (meta, content), = env["sinks"]["ok"].wait_messages(1, timeout=20)
    assert meta["mail_from"] == f"tlsrpt-noreply@{harness.HOSTNAME}"
    assert meta["rcpt_tos"] == ["tlsrpt@ok.rpt.example.net"]
    assert meta["tls_version"] in ("TLSv1.2", "TLSv1.3")  # the sink names them as python's ssl does
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message["TLS-Report-Domain"] == "a.example.net"
    assert message["TLS-Report-Submitter"] == SUBMITTER
    assert message["Subject"] == (f"Report Domain: a.example.net Submitter: {SUBMITTER} "
                                  f"Report-ID: <{DATE}.a.example.net@{SUBMITTER}>")
    # RFC 8460 5.3: the Subject's Report-ID is an RFC 5322 msg-id: "<" dot-atom-text "@" domain ">" (no ':').
    assert re.fullmatch(r"<[\w!#$%&'*+/=?^`{|}~-]+(\.[\w!#$%&'*+/=?^`{|}~-]+)*@[a-z0-9.-]+>",
                        message["Subject"].split("Report-ID: ")[1], re.ASCII)
    assert message["From"].addresses[0].addr_spec == f"tlsrpt-noreply@{harness.HOSTNAME}"
    assert message["To"].addresses[0].addr_spec == "tlsrpt@ok.rpt.example.net"
    assert message["Message-ID"].endswith(f"@{harness.HOSTNAME}>") and message["Date"]
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    attachment = parts[1]
    assert attachment.get_filename().startswith(f"{SUBMITTER}!a.example.net!")
    assert attachment.get_filename().endswith(".json.gz")
    check_report(json.loads(gzip.decompress(attachment.get_content())))


def test_https_rua_gets_the_post(env):
    harness.wait_for(lambda: Collector.posts, 20, what="the POST at the https rua")
    path, headers, body = Collector.posts[0]
    assert path == "/v1/tlsrpt"
    assert headers["Content-Type"] == "application/tlsrpt+gzip"
    assert headers["Host"] == f"reports.rpt.example.net:{env['https_port']}"
    check_report(json.loads(gzip.decompress(body)))


def test_a_day_every_rua_took_is_forgotten_today_is_kept(env):
    daemon = env["sender"]
    harness.wait_for(lambda: "a.example.net" not in reports_of(daemon, DATE), 20, what="a.example.net forgotten")
    assert reports_of(daemon, env["today"]) == ["a.example.net"]  # not finished yet: never sent
    assert env["sinks"]["ok"].count() == 1  # sent once, not again at the next run


def test_451_is_retried_then_given_up_and_counted(env):
    daemon = env["sender"]
    harness.wait_for(lambda: "b.example.net" not in reports_of(daemon, DATE), 30, what="b.example.net given up")
    m = daemon.metrics()
    count = lambda method, result: harness.value(m, "mailflow_tlsrpt_deliveries_total", method=method,  # noqa: E731
                                                 result=result)
    assert count("mailto", "success") == 1
    assert count("https", "success") == 1
    # Every second for retry_for (3s): the first try and at least two retries, then given up once.
    assert count("mailto", "temporary_failure") >= 3
    assert count("mailto", "gave_up") == 1
    assert count("mailto", "permanent_failure") == 0 and count("https", "temporary_failure") == 0
    assert env["sinks"]["busy"].count() == 0
    log = daemon.stderr()
    assert "tlsrpt_gave_up" in log and "mailto:reports@busy.rpt.example.net" in log
    assert "451 4.3.0 try again later" in log


def test_https_rua_that_fails_is_retried_and_says_why(env):
    daemon = env["refused"]
    harness.wait_for(lambda: "c.example.net" not in reports_of(daemon, DATE), 30, what="c.example.net given up")
    m = daemon.metrics()
    count = lambda result: harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https",  # noqa: E731
                                         result=result)
    assert count("success") == 0 and count("permanent_failure") == 0
    assert count("temporary_failure") >= 4  # both rua, the first try and at least one retry
    assert count("gave_up") == 2
    log = daemon.stderr()
    assert "certificate of wrong.rpt.example.net (127.0.0.1): hostname mismatch" in log
    assert "TLS handshake failed with silent.rpt.example.net (127.0.0.1): timed out" in log
    assert not [path for path, _, _ in Collector.posts if path == "/wrong"]
    # No report went by mail, yet the report mails' own series are there from the start (tlsrpt.send), at zero.
    own = [("mailflow_sessions_total", {"listener": "tlsrpt", "leg": "upstream"}),
           ("mailflow_mx_attempts_total", {"upstream": "tlsrpt", "result": "success"}),
           ("mailflow_upstream_errors_total", {"upstream": "tlsrpt", "reason": "connect_failed"}),
           ("mailflow_tls_handshake_failures_total",
            {"listener": "tlsrpt", "leg": "upstream", "reason": "certificate_verify_failed"})]
    for name, labels in own:
        assert harness.series(m, name, **labels), (name, labels)
        assert harness.value(m, name, **labels) == 0


def test_send_false_keeps_the_reports_and_sends_nothing(env):
    quiet = env["quiet"]
    m = quiet.metrics()
    for method in ("mailto", "https"):
        for result in ("success", "temporary_failure", "permanent_failure", "gave_up", "skipped"):
            # exported from the start, and nothing was tried
            assert ("mailflow_tlsrpt_deliveries_total",
                    frozenset({"method": method, "result": result}.items())) in m
            assert harness.value(m, "mailflow_tlsrpt_deliveries_total", method=method, result=result) == 0
    assert reports_of(quiet, DATE) == ["a.example.net", "b.example.net"]
    assert not harness.series(m, "mailflow_sessions_total", listener="tlsrpt")  # no report mails, no series
    assert not harness.series(m, "mailflow_mx_attempts_total", upstream="tlsrpt")
    assert not harness.series(m, "mailflow_tls_handshake_failures_total", listener="tlsrpt")


def test_a_reload_that_turns_send_on_applies_its_interval_to_the_wait_under_way(workdir, knot, certs, https_port,
                                                                                 daemon_factory):
    """tlsrpt.send and tlsrpt.interval apply at a reload, to the wait already under way too: a daemon started
    with send: false and interval: 1h waits a minute for its first run; a reload to send: true, interval: 1s
    sends the report a second after the start, not at the end of the wait begun before it (a minute here, up to
    a whole old interval later: 24h for interval: 24h)."""
    name = "reload-send"
    state_dir = workdir / f"{name}-state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "tlsrpt.state").write_text(f"""mailflowd-tlsrpt 1
day {DATE} e.example.net https://reports.rpt.example.net:{https_port}/reload
policy no-policy-found - - 1 0 0
""")
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": False, "interval": "1h", "submitter": SUBMITTER, "ca_file": str(certs / "ca.pem")}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name=name,
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    daemon.config["tlsrpt"] = {**tlsrpt, "send": True, "interval": "1s"}
    daemon.config_path.write_text(json.dumps(daemon.config, indent=2) + "\n")
    daemon.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success") == 1,
                     10, what="the reload")
    reloaded = time.monotonic()
    harness.wait_for(lambda: [path for path, _, _ in Collector.posts if path == "/reload"], 20,
                     what="the report sent after the reload")
    assert time.monotonic() - reloaded < 10  # the first run's minute had not passed
    assert harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="https", result="success") == 1


def ledger_state():
    return f"""mailflowd-tlsrpt 1
day {DATE} d.example.net mailto:tlsrpt@took.rpt.example.net,mailto:reports@later.rpt.example.net
policy no-policy-found - - 3 0 0
"""


def state_dir_and_config(workdir, name, tlsrpt_state, knot, tlsrpt, **extra):
    """For a daemon the test starts (and starts again) itself: state_dir NAME-state holding tlsrpt.state, and a
    config on it with one outbound listener to the MX upstream, knotd for DNS, `tlsrpt` and the `extra` keys."""
    state_dir = workdir / f"{name}-state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "tlsrpt.state").write_text(tlsrpt_state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    config = harness.default_config(state_dir, harness.free_port(), listeners, [{"name": "internet", "mx": True}],
                                    dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt, **extra)
    return state_dir, config


def deliveries(daemon, result):
    return harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="mailto", result=result)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])  # a restart, or a crash (saved after each run)
def test_a_restart_keeps_which_rua_took_the_report_and_its_first_try(stop, workdir, knot, sink_factory,
                                                                     mailflowd_bin):
    port = harness.free_port("127.0.0.1", *LEDGER_ADDR.values())
    took = sink_factory(f"rua-took-{stop}", host=LEDGER_ADDR["took"], port=port)
    later = sink_factory(f"rua-later-{stop}", host=LEDGER_ADDR["later"], port=port,
                         fail_rcpt=["reports@later.rpt.example.net=451 4.3.0 try again later"])
    retry_for = 6  # long enough that the first daemon is stopped before it gives up itself
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s", "retry_for": f"{retry_for}s"}
    state_dir, config = state_dir_and_config(workdir, f"ledger-{stop}", ledger_state(), knot, tlsrpt)
    first = harness.Daemon(mailflowd_bin, workdir, config, name=f"ledger-{stop}").start()
    took.wait_messages(1, timeout=20)
    harness.wait_for(lambda: deliveries(first, "temporary_failure") >= 1, 20, what="the 451 of the other rua")
    first_try_seen = time.monotonic()  # the first try was before this
    ledger_file = state_dir / "tlsrpt-ledger.state"
    # Saved right after the report's try, not at the end of the run or at stop (the counter above comes first).
    harness.wait_for(lambda: ledger_file.exists() and "took.rpt.example.net" in ledger_file.read_text(), 10,
                     what="the ledger saved after the try")
    if stop == "SIGKILL":
        first.proc.kill()
        first.proc.wait(5)
    else:
        assert first.stop() == 0, first.log_tail()
    harness.LIVE.remove(first)
    ledger = ledger_file.read_text()
    assert "d.example.net" in ledger and "mailto:tlsrpt@took.rpt.example.net" in ledger, ledger
    assert "later.rpt.example.net" not in ledger, ledger  # it did not take it: tried again after the restart

    # Down for longer than retry_for after the first try: the first run after the restart is the last try.
    time.sleep(max(0.0, first_try_seen + retry_for + 0.5 - time.monotonic()))
    # Slow fsyncs: the stop below comes while the run that gave the report up is still saving tlsrpt.state, so
    # the ledger forgets it at the last save, not after that run's own save (which the stop cuts short).
    os.environ["MAILFLOWD_FAILPOINTS"] = "state.fsync=300ms"
    try:
        second = harness.Daemon(mailflowd_bin, workdir, config, name=f"ledger-{stop}-again").start()
    finally:
        os.environ.pop("MAILFLOWD_FAILPOINTS", None)
    try:
        harness.wait_for(lambda: "d.example.net" not in reports_of(second, DATE), 20, what="d.example.net given up")
        assert deliveries(second, "success") == 0  # the rua that took it was not tried again
        assert took.count() == 1, "the rua that took the report got it again after the restart"
        # One more try of the other rua, then given up: retry_for counts from the first try, not from the restart.
        assert deliveries(second, "temporary_failure") == 1
        assert deliveries(second, "gave_up") == 1
        assert later.count() == 0
        assert "state_discarded" not in second.stderr()
    finally:
        assert second.stop() == 0, second.log_tail()
        harness.LIVE.remove(second)
    assert "d.example.net" not in (state_dir / "tlsrpt-ledger.state").read_text()  # forgotten once given up


def test_a_corrupt_ledger_is_moved_aside_counted_and_the_daemon_starts_empty(workdir, daemon_factory):
    state_dir = workdir / "bad-ledger-state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "tlsrpt-ledger.state").write_text("mailflowd-tlsrpt-ledger 1\nreport 2026-01-02 x.example nope -\n")
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="bad-ledger",
                            tlsrpt={"send": True, "interval": "1s"})
    assert harness.value(daemon.metrics(), "mailflow_state_errors_total", reason="corrupt") == 1
    aside = sorted(state_dir.glob("tlsrpt-ledger.state.corrupt-*"))
    assert len(aside) == 1 and "x.example nope" in aside[0].read_text()
    assert not (state_dir / "tlsrpt-ledger.state").exists()
    log = daemon.stderr()
    assert "state_discarded" in log and "tlsrpt-ledger.state is unusable (line 2: malformed report)" in log


def test_a_report_sent_stays_sent_after_a_crash(workdir, knot, sink_factory, mailflowd_bin):
    """A report done with is saved gone at once: a crash before the periodic save must not bring it back from the
    older tlsrpt.state (once the ledger has forgotten it too, it would go out again to every rua)."""
    port = harness.free_port("127.0.0.1", LEDGER_ADDR["took"])
    took = sink_factory("rua-took-crash", host=LEDGER_ADDR["took"], port=port)
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s"}
    state_dir, config = state_dir_and_config(workdir, "sent-crash", f"""mailflowd-tlsrpt 1
day {DATE} e.example.net mailto:tlsrpt@took.rpt.example.net
policy no-policy-found - - 2 0 0
""", knot, tlsrpt)
    first = harness.Daemon(mailflowd_bin, workdir, config, name="sent-crash").start()
    took.wait_messages(1, timeout=20)
    # Two more runs (interval 1s): the ledger forgets the finished report and is saved without it.
    harness.wait_for(lambda: "e.example.net" not in (state_dir / "tlsrpt-ledger.state").read_text()
                     if (state_dir / "tlsrpt-ledger.state").exists() else False, 10, what="the ledger forgets it")
    first.proc.kill()  # well before the periodic save (every minute)
    first.proc.wait(5)
    harness.LIVE.remove(first)
    assert "e.example.net" not in (state_dir / "tlsrpt.state").read_text()
    second = harness.Daemon(mailflowd_bin, workdir, config, name="sent-crash-again").start()
    try:
        time.sleep(2.5)  # two runs of the sender
        assert took.count() == 1, "the report went out again after the crash"
        assert "e.example.net" not in reports_of(second, DATE)
    finally:
        assert second.stop() == 0, second.log_tail()
        harness.LIVE.remove(second)


def test_a_day_recorded_again_after_its_report_went_out_is_not_sent_twice(workdir, knot, sink_factory, mailflowd_bin):
    """The clock stepped back over midnight after a day's report went out: the store records sessions for that day
    again (here: the tlsrpt.state that the daemon writes then). RFC 8460 section 4: a report covers one UTC day; the
    ledger keeps the sent report while the store may hold its day (max_days), and the day is not reported again,
    which the log says."""
    port = harness.free_port("127.0.0.1", AGAIN_ADDR)
    again = sink_factory("rua-again", host=AGAIN_ADDR, port=port)
    yesterday = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    state_dir = workdir / "sent-again-state"
    state_dir.mkdir(exist_ok=True)

    def day_state(sessions):
        return f"""mailflowd-tlsrpt 1
day {yesterday} f.example.net mailto:tlsrpt@again.rpt.example.net
policy no-policy-found - - {sessions} 0 0
"""

    (state_dir / "tlsrpt.state").write_text(day_state(2))
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s"}
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    config = harness.default_config(state_dir, harness.free_port(), listeners, [{"name": "internet", "mx": True}],
                                    dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    first = harness.Daemon(mailflowd_bin, workdir, config, name="sent-again").start()
    try:
        again.wait_messages(1, timeout=20)
        harness.wait_for(lambda: "f.example.net" not in reports_of(first, yesterday), 10, what="the report done with")
    finally:
        assert first.stop() == 0, first.log_tail()
        harness.LIVE.remove(first)
    (state_dir / "tlsrpt.state").write_text(day_state(3))  # sessions recorded for that day after its report
    second = harness.Daemon(mailflowd_bin, workdir, config, name="sent-again-later").start()
    try:
        harness.wait_for(lambda: "tlsrpt_not_sent_again" in second.stderr() or again.count() > 1, 10,
                         what="the sender's run over that day")
        time.sleep(1.5)  # another run of the sender
        assert again.count() == 1, "a second report of one day went out"
        assert re.search(rf"tlsrpt_not_sent_again date={yesterday} domain=f.example.net", second.stderr())
        assert "f.example.net" not in reports_of(second, yesterday)
    finally:
        assert second.stop() == 0, second.log_tail()
        harness.LIVE.remove(second)


def test_a_report_that_keeps_failing_does_not_hold_back_the_first_try_of_the_next(workdir, knot, sink_factory,
                                                                                    mailflowd_bin):
    """tlsrpt.max_reports_per_run bounds a run; a report whose rua keeps failing (451 here; an https rua that never
    answers holds each try for https_timeout) is tried again at every run until retry_for gives it up. Reports
    never tried go first: the one behind it (here max_reports_per_run 1) gets its first try at the next run, not
    after retry_for. Oldest day first, domain next, it waited for the whole retry_for: a domain of any name at the
    front of the list (a thousand of them with the default bound) held every other report back for good."""
    port = harness.free_port("127.0.0.1", *TURN_ADDR.values())
    stuck = sink_factory("rua-stuck", host=TURN_ADDR["stuck"], port=port,
                         fail_rcpt=["reports@stuck.rpt.example.net=451 4.3.0 try again later"])
    behind = sink_factory("rua-next", host=TURN_ADDR["next"], port=port)
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s", "retry_for": "60s",
              "max_reports_per_run": 1}
    _, config = state_dir_and_config(workdir, "turns", f"""mailflowd-tlsrpt 1
day {DATE} a.example.net mailto:reports@stuck.rpt.example.net
policy no-policy-found - - 1 0 0
day {DATE} b.example.net mailto:reports@next.rpt.example.net
policy no-policy-found - - 1 0 0
""", knot, tlsrpt)
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name="turns").start()
    try:
        behind.wait_messages(1, timeout=15)
        assert deliveries(daemon, "temporary_failure") >= 1 and deliveries(daemon, "gave_up") == 0
        assert reports_of(daemon, DATE) == ["a.example.net"] and stuck.count() == 0
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
        harness.LIVE.remove(daemon)


def test_a_rua_host_written_with_a_trailing_dot_gets_the_post(workdir, knot, https_port, mailflowd_bin, certs):
    """A fully qualified rua host name (https://reports.rpt.example.net.:PORT/...): the same host; the POST goes
    there, its certificate checked against the name without the root's dot."""
    tlsrpt = {"send": True, "submitter": SUBMITTER, "interval": "1s", "ca_file": str(certs / "ca.pem")}
    _, config = state_dir_and_config(workdir, "fqdn", f"""mailflowd-tlsrpt 1
day {DATE} f.example.net https://reports.rpt.example.net.:{https_port}/fqdn
policy no-policy-found - - 1 0 0
""", knot, tlsrpt)
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name="fqdn").start()
    try:
        harness.wait_for(lambda: [p for p, _, _ in Collector.posts if p == "/fqdn"], 15, what="the POST")
        assert harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="https",
                             result="success") == 1
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
        harness.LIVE.remove(daemon)


def test_a_mailto_rua_written_fully_qualified_gets_the_mail(workdir, knot, sink_factory, mailflowd_bin):
    """mailto:reports@fq.rpt.example.net. (the root's final dot): the mail goes to that domain's MX host, to the
    address without the dot (RFC 5321's Domain has none)."""
    port = harness.free_port("127.0.0.1", FQDN_ADDR)
    sink = sink_factory("rua-fq", host=FQDN_ADDR, port=port)
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s"}
    _, config = state_dir_and_config(workdir, "fq", f"""mailflowd-tlsrpt 1
day {DATE} g.example.net mailto:reports@fq.rpt.example.net.
policy no-policy-found - - 1 0 0
""", knot, tlsrpt)
    daemon = harness.Daemon(mailflowd_bin, workdir, config, name="fq").start()
    try:
        (meta, _), = sink.wait_messages(1, timeout=15)
        assert meta["rcpt_tos"] == ["reports@fq.rpt.example.net"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
        harness.LIVE.remove(daemon)


class InterimThenFinal(http.server.BaseHTTPRequestHandler):
    """Answers each POST with a 100 Continue it was not asked for, then the final status its path names
    (/ok: 201, /busy: 503). RFC 9110 15.2: a client must parse 1xx answers that come before the final one."""
    protocol_version = "HTTP/1.1"
    posts = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        InterimThenFinal.posts.append((self.path, self.rfile.read(int(self.headers.get("Content-Length", "0")))))
        self.send_response_only(100)
        self.end_headers()
        self.send_response(201 if self.path == "/ok" else 503)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_interim_100_before_the_final_answer_is_not_the_answer(certs, report_cert, knot, daemon_factory,
                                                                    workdir):
    server = harness.https_server(InterimThenFinal, *report_cert)
    try:
        port = server.server_address[1]
        directory = workdir / "interim-state"
        directory.mkdir(exist_ok=True)
        (directory / "tlsrpt.state").write_text(f"""mailflowd-tlsrpt 1
day {DATE} f.example.net https://reports.rpt.example.net:{port}/ok,https://reports.rpt.example.net:{port}/busy
policy no-policy-found - - 1 0 0
""")
        listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                      "upstream": "internet"}]
        daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="interim",
                                dns={"servers": [knot.address], "timeout": "3s"},
                                tlsrpt={"send": True, "interval": "1s", "retry_for": "3s",
                                        "ca_file": str(certs / "ca.pem")})
        harness.wait_for(lambda: "f.example.net" not in reports_of(daemon, DATE), 30, what="f.example.net done")
        m = daemon.metrics()
        count = lambda result: harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https",  # noqa: E731
                                             result=result)
        assert count("success") == 1  # the 201 after the 100
        # The 503 after the 100 is temporary: retried every second until retry_for, then given up.
        assert count("permanent_failure") == 0
        assert count("temporary_failure") >= 2 and count("gave_up") == 1
        log = daemon.stderr()
        assert "answered 201" in log and "answered 503" in log and "answered 100" not in log
    finally:
        server.shutdown()


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


@pytest.fixture(scope="module")
def silent_dns():
    """A DNS server that takes every query and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{server.getsockname()[1]}"
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


def test_a_rua_that_took_the_report_is_saved_before_the_next_rua_is_tried(workdir, knot, sink_factory,
                                                                          mailflowd_bin):
    """Which rua took a report is in the ledger as soon as it took it, not once every rua of the report was tried:
    a stop while a later rua's MX host keeps the try waiting (it never greets) must not send the report again to
    the one that took it."""
    port = harness.free_port("127.0.0.1", LEDGER_ADDR["took"], STALL_ADDR)
    took = sink_factory("rua-took-stall", host=LEDGER_ADDR["took"], port=port)
    stall = socket.socket()
    stall.bind((STALL_ADDR, port))
    stall.listen(16)  # the kernel completes the connection; nobody ever speaks
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s"}
    state_dir, config = state_dir_and_config(workdir, "stall", f"""mailflowd-tlsrpt 1
day {DATE} h.example.net mailto:tlsrpt@took.rpt.example.net,mailto:reports@stall.rpt.example.net
policy no-policy-found - - 1 0 0
""", knot, tlsrpt, timeouts={"upstream_connect": "60s", "tls_handshake": "60s"})
    ledger_file = state_dir / "tlsrpt-ledger.state"
    try:
        first = harness.Daemon(mailflowd_bin, workdir, config, name="stall").start()
        took.wait_messages(1, timeout=20)
        # The try of the other rua waits for a banner (timeouts.upstream_connect, 60s): the ledger already says
        # who took the report.
        harness.wait_for(lambda: ledger_file.exists() and "took.rpt.example.net" in ledger_file.read_text(), 5,
                         what="the ledger saved once the first rua took the report")
        assert first.stop() == 0, first.log_tail()
        harness.LIVE.remove(first)
        second = harness.Daemon(mailflowd_bin, workdir, config, name="stall-again").start()
        try:
            time.sleep(2.5)  # the first run after the start, and one more
            assert took.count() == 1, "the rua that took the report got it again after the restart"
        finally:
            assert second.stop() == 0, second.log_tail()
            harness.LIVE.remove(second)
    finally:
        stall.close()


def test_a_stop_while_a_report_mail_is_in_flight_is_nobodys_failure(workdir, knot, mailflowd_bin):
    """A report mail cut short by a stop (its MX host has not greeted yet) is the daemon's own doing, as a relay
    session's upstream leg cut by a stop is (operations.md): logged with result=shutdown, no temporary_failure, no
    upstream error or failed MX attempt, nothing in the ledger (retry_for has not started), and the next start
    sends it again."""
    port = harness.free_port("127.0.0.1", STALL_ADDR)
    stall = socket.socket()
    stall.bind((STALL_ADDR, port))
    stall.listen(16)
    stall.settimeout(20)
    tlsrpt = {"send": True, "submitter": SUBMITTER, "smtp_port": port, "interval": "1s"}
    state_dir, config = state_dir_and_config(workdir, "stop", f"""mailflowd-tlsrpt 1
day {DATE} h.example.net mailto:reports@stall.rpt.example.net
policy no-policy-found - - 1 0 0
""", knot, tlsrpt, timeouts={"upstream_connect": "60s", "tls_handshake": "60s"})
    held = []
    try:
        for name in ("stop-in-flight", "stop-in-flight-again"):
            daemon = harness.Daemon(mailflowd_bin, workdir, config, name=name).start()
            held.append(stall.accept()[0])  # the report mail's MX attempt: it waits for a banner that never comes
            assert daemon.stop() == 0, daemon.log_tail()
            harness.LIVE.remove(daemon)
            log = daemon.stderr()
            tries = [line for line in log.splitlines() if "tlsrpt_delivery" in line]
            assert len(tries) == 1 and "result=shutdown" in tries[0] and "stall.rpt.example.net" in tries[0], log
            assert "upstream_error" not in log and "connect_timeout" not in log, log
            ledger = state_dir / "tlsrpt-ledger.state"
            assert not ledger.exists() or "stall.rpt.example.net" not in ledger.read_text(), ledger.read_text()
    finally:
        for connection in held:
            connection.close()
        stall.close()


def drain_seconds(log):
    """From the daemon's `draining` line to its `stopped` line, by their own timestamps."""
    stamps = {}
    for line in log.splitlines():
        fields = line.split(" ", 3)
        if len(fields) > 2 and fields[2] in ("draining", "stopped"):
            stamps[fields[2]] = datetime.datetime.strptime(fields[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return (stamps["stopped"] - stamps["draining"]).total_seconds()


@pytest.mark.parametrize("step", ["post", "lookup"])
def test_a_stop_while_a_report_post_is_in_flight_is_nobodys_failure(step, workdir, knot, certs, mailflowd_bin):
    """An https rua's try in flight at a stop ("post": its host took the connection and never answers the TLS
    handshake; "lookup": the name server never answers the host's queries), tlsrpt.https_timeout 60s: only a
    report mail in flight was closed by the stop. The drain waited 5 s for the POST, then the daemon exited with
    the try abandoned, logged nowhere, although operations.md says a try that a stop cut short is logged with
    result=shutdown. It is ended at once now, as a report mail is: result=shutdown, no temporary_failure,
    nothing in the ledger, and the next start tries it again."""
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes every query and never answers
    dns.bind(("127.0.0.1", 0))
    dns.settimeout(20)
    https = socket.socket()  # the kernel completes the connection; nobody ever speaks
    https.bind(("127.0.0.1", 0))
    https.listen(16)
    https.settimeout(20)
    port = https.getsockname()[1]
    tlsrpt = {"send": True, "submitter": SUBMITTER, "interval": "1s", "https_timeout": "60s",
              "ca_file": str(certs / "ca.pem")}
    state_dir, config = state_dir_and_config(workdir, f"stop-post-{step}", f"""mailflowd-tlsrpt 1
day {DATE} h.example.net https://silent.rpt.example.net:{port}/stop
policy no-policy-found - - 1 0 0
""", knot, tlsrpt)
    if step == "lookup":
        config["dns"] = {"servers": [f"127.0.0.1:{dns.getsockname()[1]}"], "timeout": "20s"}
    held = []
    try:
        for name in (f"stop-post-{step}", f"stop-post-{step}-again"):
            daemon = harness.Daemon(mailflowd_bin, workdir, config, name=name).start()
            if step == "post":
                held.append(https.accept()[0])  # the POST's connection: its TLS handshake is never answered
            else:
                dns.recvfrom(512)  # the rua host's lookup: never answered
            assert daemon.stop() == 0, daemon.log_tail()
            harness.LIVE.remove(daemon)
            log = daemon.stderr()
            tries = [line for line in log.splitlines() if "tlsrpt_delivery" in line]
            assert len(tries) == 1 and "result=shutdown" in tries[0] and "silent.rpt.example.net" in tries[0], log
            assert drain_seconds(log) < 3, log  # not the 5 s the drain waits for a run that goes on
            ledger = state_dir / "tlsrpt-ledger.state"
            assert not ledger.exists() or "h.example.net" not in ledger.read_text(), ledger.read_text()
            dns.setblocking(False)  # the stopped daemon's queries are not the next one's
            with contextlib.suppress(BlockingIOError):
                while True:
                    dns.recvfrom(512)
            dns.settimeout(20)
    finally:
        for connection in held:
            connection.close()
        https.close()
        dns.close()


@pytest.mark.parametrize("name, error", [
    ("O" * 257, "tlsrpt.organization_name: at most 256 characters (it goes into a line of the report mail, and "
                "mail lines end at 998), got 257"),
    ("Example\\tOrg", "tlsrpt.organization_name: must be printable ASCII, not empty"),
    ("Example\\x7fOrg", "tlsrpt.organization_name: must be printable ASCII, not empty"),
    ("O" * 256, None),
])
def test_check_config_refuses_an_organization_name_no_report_mail_can_carry(name, error, workdir, mailflowd_bin):
    """tlsrpt.organization_name goes into a plain-text line of every report mail: a name that would break the
    998-octet line limit (receivers refuse such mail, so every report would bounce), or with control characters,
    is refused by --check-config with file:line:col; the longest one allowed is accepted."""
    config = workdir / "organization-name.yaml"
    config.write_text(
        "hostname: mx.sender.example\n"
        f"state_dir: {workdir}\n"
        "listeners:\n  - {name: out, address: \"127.0.0.1:2525\", direction: outbound, upstream: internet}\n"
        "upstreams:\n  - {name: internet, mx: true}\n"
        f"tlsrpt:\n  send: true\n  organization_name: \"{name}\"\n")
    result = subprocess.run([mailflowd_bin, "--check-config", str(config)], capture_output=True, text=True)
    if error is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1, result
        assert f"{config}:9:22: {error}" in result.stderr, result.stderr


def test_a_run_of_rua_that_hang_ends_once_it_took_its_interval(workdir, knot, daemon_factory):
    """Each try has its deadline (tlsrpt.https_timeout here), but a run went on through every report due: with
    max_reports_per_run (1000) reports whose rua hangs until its deadline (30s), 8 hours, 10 rua a report 80, and
    a report mail's own timeouts.* allow half an hour a try. Meanwhile no next run began, so a new day's reports,
    which a run tries first, waited for the end of it. A run now ends once it has taken tlsrpt.interval, the rest
    waiting for the next run: here 8 reports to 8 hosts that never answer (500 ms each; one host's further reports
    are skipped once it timed out, so each has its own) and interval 1s, made 1h by a reload after the first try
    (no next run comes; the run under way keeps its own): at most the run's second try follows (before: the 7
    others, 3.5 s more)."""
    silent = []
    for _ in range(8):  # each takes connections (the kernel's backlog completes them) and never says a word
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        silent.append(listener)
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} h{n}.example.net https://silent.rpt.example.net:{listener.getsockname()[1]}/hang\n"
        "policy no-policy-found - - 1 0 0\n" for n, listener in enumerate(silent, 1))
    directory = workdir / "hang-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "1s", "https_timeout": "500ms", "retry_for": "1h", "submitter": SUBMITTER}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="hang",
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    failures = lambda: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total",  # noqa: E731
                                     method="https", result="temporary_failure")
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
    silent = []
    for _ in range(8):  # each takes connections (the kernel's backlog completes them) and never says a word
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        silent.append(listener)
    state = "mailflowd-tlsrpt 1\n" + "".join(
        f"day {DATE} o{n}.example.net https://silent.rpt.example.net:{listener.getsockname()[1]}/off\n"
        "policy no-policy-found - - 1 0 0\n" for n, listener in enumerate(silent, 1))
    directory = workdir / "send-off-state"
    directory.mkdir(exist_ok=True)
    (directory / "tlsrpt.state").write_text(state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    tlsrpt = {"send": True, "interval": "5s", "https_timeout": "500ms", "retry_for": "1h", "submitter": SUBMITTER}
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True}], name="send-off",
                            dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt)
    failures = lambda: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total",  # noqa: E731
                                     method="https", result="temporary_failure")
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
    m = daemon.metrics()
    count = lambda result: harness.value(m, "mailflow_tlsrpt_deliveries_total", method="https",  # noqa: E731
                                         result=result)
    assert (count("temporary_failure"), count("skipped"), count("success")) == (1, 5, 1)
    assert f"their rua timed out earlier in this run (https://silent.rpt.example.net:{silent_port})" in \
        daemon.stderr()
    # Each is tried again at a later run (the first of them first, while the host stays down): none was lost.
    assert reports_of(daemon, DATE) == [f"d{n}.example.net" for n in range(1, 7)]


def six_https_reports_then_one(workdir, certs, daemon_factory, proxy, name, port, https_port):
    """A daemon whose state holds 6 reports of DATE to https://NAME.rpt.example.net:PORT/NAME1..6, then one of
    z.example.net to https://reports.rpt.example.net:HTTPS_PORT/NAMEz, its DNS through `proxy` (dns.timeout 1 s,
    tlsrpt.https_timeout 5 s); returned once z's report was posted."""
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
        counts = https_outcomes(daemon)
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = daemon.stderr()
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
        counts = https_outcomes(daemon)
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = daemon.stderr()
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
        counts = outcomes(daemon)
        log = daemon.stderr()
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
        counts = outcomes(daemon)
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = daemon.stderr()
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
        counts = outcomes(daemon)
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = daemon.stderr()
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
        counts = outcomes(daemon)
        asked = [t for (q, _), t in zip(proxy.questions, proxy.asked_at) if q == name]
        print("dropped queries", len(asked), "spread over", asked[-1] - asked[0] if asked else 0, "s")
        assert counts == (1, 5, 1), (counts, daemon.log_tail())
        log = daemon.stderr()
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
    assert 'tlsrpt_deferred reports=1 reason="their rua timed out earlier in this run' in daemon.stderr()
    assert reports_of(daemon, DATE) == ["d1.example.net", "d2.example.net", "d4.example.net", "d5.example.net"]
