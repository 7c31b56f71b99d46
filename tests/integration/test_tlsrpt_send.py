"""TLS-RPT reports sent by the real daemon (tlsrpt.send: true, RFC 8460 section 5): the store is seeded through
state_dir/tlsrpt.state in the daemon's own format; knotd (tests/tools/dns_server.py) serves the rua domains'
MX hosts on 127.0.0.x, where real SMTP sinks listen on tlsrpt.smtp_port, and the https rua's host, where a
python HTTPS server with a certificate from the test CA takes the POST (tlsrpt_send_helpers.py). Checked: the
report mail as it arrives (envelope, section 5.3 headers, the gzip attachment decompressed to the RFC 8460 JSON,
over STARTTLS), the POST (Content-Type application/tlsrpt+gzip, the same JSON), a rua that answers 451 retried
every tlsrpt.interval and given up after tlsrpt.retry_for, every try counted in mailflow_tlsrpt_deliveries_total,
sent days forgotten, today's day kept, and tlsrpt.send: false sending nothing. An https rua whose certificate
names another host, or whose server never answers (tlsrpt.https_timeout), is a temporary failure that says why.
The retry bookkeeping survives a restart (state_dir/tlsrpt-ledger.state): a rua that took a report does not get
it again, and retry_for counts from the first try; a corrupt ledger file is moved aside and counted. A reload
that turns send on with a shorter interval sends at that interval, not at the end of the wait under way.
Tries that hang, and what a run does after one timed out: test_tlsrpt_send_timeouts.py."""
import contextlib
import datetime
import email
import email.policy
import gzip
import http.server
import json
import re
import signal
import socket
import subprocess
import time

import pytest

import harness
import report_helpers as rh
from tlsrpt_send_helpers import (ADDR, AGAIN_ADDR, DATE, FQDN_ADDR, LEDGER_ADDR, STALL_ADDR, SUBMITTER, TURN_ADDR,
                                 Collector, deliveries, reports_of, state_dir_and_config, wait_https_successes)

pytest_plugins = ["tlsrpt_send_helpers"]  # its fixtures: knot, https_port, report_cert, silent_port


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
    wait_https_successes(daemon, 1)
    assert harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="https", result="success") == 1


def ledger_state():
    return f"""mailflowd-tlsrpt 1
day {DATE} d.example.net mailto:tlsrpt@took.rpt.example.net,mailto:reports@later.rpt.example.net
policy no-policy-found - - 3 0 0
"""


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
    second = harness.Daemon(mailflowd_bin, workdir, config, name=f"ledger-{stop}-again",
                            env={"MAILFLOWD_FAILPOINTS": "state.fsync=300ms"}).start()
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
    # The day before the one the daemons run on, taken clear of a midnight as the report tests take theirs.
    yesterday = (datetime.date.fromisoformat(rh.day_clear_of_midnight()) - datetime.timedelta(days=1)).isoformat()
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
        wait_https_successes(daemon, 1)
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


