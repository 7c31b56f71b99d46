"""The rolling windows survive a restart (SIGTERM saves state_dir/windows.state, the next daemon on the same
state_dir reports the same counts); a corrupt state file is moved aside (windows.state.corrupt-*) and counted
(mailflow_state_errors_total{reason="corrupt"}), and the daemon starts empty and relays; a state_dir that
cannot be used makes the daemon refuse to start with a message naming it."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

import harness
import report_helpers as rh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import SilentServer  # noqa: E402

SMALL_PLAN = [
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "none", 1),
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "TLS1.0", 1),
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "TLS1.3", 1),
    ("legacy-domain", "inbound", "inbound", "127.0.0.1", "b@legacy.test", "TLS1.0", 2),
    ("internet", "inbound", "inbound", "127.0.0.1", "d@example.test", "TLS1.2", 1),
]
ONE_MORE = [("internet", "inbound", "inbound", "127.0.0.1", "d@example.test", "TLS1.3", 1)]


@pytest.fixture(scope="module")
def env(certs, sink_factory, workdir, mailflowd_bin):
    sink = sink_factory("store")
    started = []

    def make(name, state_dir, start=True, connectors=None):
        listeners, upstreams, configured, extra = rh.build_env_config(certs, sink.port, harness.free_port(),
                                                                      harness.free_port())
        connectors = configured if connectors is None else connectors
        cfg = harness.default_config(state_dir, harness.free_port(), listeners, upstreams, connectors, **extra)
        d = harness.Daemon(mailflowd_bin, workdir, cfg, name=name)
        started.append(d)
        return d.start() if start else d

    yield types.SimpleNamespace(sink=sink, make=make, workdir=workdir, bin=mailflowd_bin, certs=certs)
    failures = []
    for d in started:
        code = d.stop()
        if d in harness.LIVE:
            harness.LIVE.remove(d)
        if code not in (0, None):
            failures.append(f"{d.name}: exit code after SIGTERM = {code!r}\n{d.log_tail()}")
    assert not failures, "\n".join(failures)


def stop_ok(daemon):
    code = daemon.stop()
    assert code == 0, f"{daemon.name}: exit code after SIGTERM = {code!r}\n{daemon.log_tail()}"
    if daemon in harness.LIVE:
        harness.LIVE.remove(daemon)


def window_gauges(daemon):
    m = daemon.metrics()
    return {tuple(sorted(lab)): v for (n, lab), v in m.items() if n == "mailflow_window_messages"}


def empty_counts():
    return rh.plan_counts([])


def state_errors(daemon, reason):
    return harness.value(daemon.metrics(), "mailflow_state_errors_total", reason=reason)


# ------------------------------------------------------------------------------------------- restart
def test_restart_keeps_the_window(env, utc_day):
    state = env.workdir / "restart-state"
    first = env.make("first", state)
    rh.send_plan(first, env.sink, SMALL_PLAN)
    before = rh.report_json(first)
    gauges = window_gauges(first)
    stop_ok(first)

    path = state / "windows.state"
    assert path.is_file() and path.stat().st_size > 0, f"SIGTERM did not save {path}"

    second = env.make("second", state)
    after = rh.report_json(second)
    rh.assert_report_matches(after, rh.plan_counts(SMALL_PLAN), utc_day)
    assert after["rows"] == before["rows"], "the report rows differ after a restart"
    assert after["insights"] == before["insights"], "the insights differ after a restart"
    assert window_gauges(second) == gauges, "mailflow_window_messages differs after a restart"
    assert state_errors(second, "corrupt") == 0

    # What the second daemon adds is saved on top of what it loaded.
    rh.send_plan(second, env.sink, ONE_MORE)
    stop_ok(second)
    third = env.make("third", state)
    report = rh.report_json(third)
    rh.assert_report_matches(report, rh.plan_counts(SMALL_PLAN + ONE_MORE), utc_day)
    stop_ok(third)


def test_sigint_saves_too(env, utc_day):
    state = env.workdir / "sigint-state"
    first = env.make("sigint-first", state)
    rh.send_plan(first, env.sink, ONE_MORE)
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(15) == 0, f"exit code after SIGINT: {first.proc.returncode}\n{first.log_tail()}"
    harness.LIVE.remove(first)
    second = env.make("sigint-second", state)
    report = rh.report_json(second)
    rh.assert_report_matches(report, rh.plan_counts(ONE_MORE), utc_day)
    stop_ok(second)


def test_restart_with_a_connector_removed_keeps_its_history(env, utc_day):
    """History of a connector that is no longer configured stays in the report (as the header documents:
    type internet, not forced, default thresholds, "removed from config" on the page) and is not merged into
    another connector."""
    state = env.workdir / "removed-state"
    first = env.make("removed-first", state)
    rh.send_plan(first, env.sink, SMALL_PLAN)
    stop_ok(first)
    remaining = [c for c in rh.CONNECTORS if c["name"] != "legacy-domain"]
    second = env.make("removed-second", state, connectors=remaining)
    report = rh.report_json(second)
    rows = rh.rows_of(report, utc_day)
    legacy = rows.get(("legacy-domain", "inbound"))
    assert legacy is not None, f"the removed connector's history vanished: {sorted(rows)}"
    assert legacy["messages"] == 2 and legacy["percent"]["TLS1.0"] == 100.0, legacy
    assert legacy["type"] == "internet" and legacy["forced_tls"] is False, legacy
    assert rows[("internet", "inbound")]["messages"] == 1, "history was merged into internet"
    assert rows[("partner-cidr", "inbound")]["messages"] == 3
    status, page, _ = rh.http_get(second, "/")
    assert status == 200 and "legacy-domain" in page and "removed from config" in page
    stop_ok(second)


def test_history_from_earlier_days(env, utc_day):
    """A state file with history (written in the daemon's own format, as a restart days later would find it):
    each bucket is reported on its UTC day, what is older than the window rolls off everywhere (rows, window
    gauges, insights), and new traffic adds to the loaded window."""
    today = date.fromisoformat(utc_day)

    def noon(days_ago):  # the hour bucket (hours since the epoch) of 12:00 UTC `days_ago` days back
        day = datetime.combine(today - timedelta(days=days_ago), datetime.min.time(), tzinfo=timezone.utc)
        return int(day.timestamp()) // 3600 + 12

    state = env.workdir / "history-state"
    state.mkdir()
    (state / "windows.state").write_text(
        "mailflowd-windows 1\n"
        f"{noon(10)} partner-cidr inbound 100 0 0 0 0\n"   # rolled off: must not count anywhere
        f"{noon(3)} partner-cidr inbound 0 4 0 4 0\n"
        f"{noon(2)} gone-partner inbound 0 0 0 0 5\n")     # a connector no longer configured
    daemon = env.make("history", state)
    assert state_errors(daemon, "corrupt") == 0, f"the daemon did not accept its own format:\n{daemon.log_tail()}"
    report = rh.report_json(daemon)
    d3 = rh.rows_of(report, (today - timedelta(days=3)).isoformat())
    assert d3[("partner-cidr", "inbound")]["messages"] == 8
    assert d3[("partner-cidr", "inbound")]["percent"] == {"none": 0.0, "TLS1.0": 50.0, "TLS1.1": 0.0,
                                                         "TLS1.2": 50.0, "TLS1.3": 0.0}
    d2 = rh.rows_of(report, (today - timedelta(days=2)).isoformat())
    assert d2[("gone-partner", "inbound")]["messages"] == 5 and d2[("gone-partner", "inbound")]["type"] == "internet"
    busy = sorted((r["date"], r["connector"]) for r in report["rows"] if r["messages"])
    assert busy == [((today - timedelta(days=3)).isoformat(), "partner-cidr"),
                    ((today - timedelta(days=2)).isoformat(), "gone-partner")], busy
    assert [rh.split_offender(i["text"]) for i in report["insights"]] == [
        "Inbound partner connector partner-cidr is seeing significant TLS1.0 mail flow: "
        "50.0% of 8 messages in the last 7 days"], report["insights"]
    m = daemon.metrics()
    got = {v: harness.value(m, "mailflow_window_messages", connector="partner-cidr", direction="inbound",
                            tls_version=v) for v in rh.VERSIONS}
    assert got == {"none": 0, "TLS1.0": 4, "TLS1.1": 0, "TLS1.2": 4, "TLS1.3": 0}, got

    rh.send_plan(daemon, env.sink, [SMALL_PLAN[0]])  # one message without TLS today
    report = rh.report_json(daemon)
    assert rh.rows_of(report, utc_day)[("partner-cidr", "inbound")]["messages"] == 1
    assert sorted(rh.split_offender(i["text"]) for i in report["insights"]) == [
        "Inbound partner connector partner-cidr is seeing significant TLS1.0 mail flow: "
        "44.4% of 9 messages in the last 7 days",
        "Inbound partner connector partner-cidr is seeing significant mail flow without TLS: "
        "11.1% of 9 messages in the last 7 days"], report["insights"]
    m = daemon.metrics()
    assert harness.value(m, "mailflow_insight_active", connector="partner-cidr", insight="significant_no_tls") == 1
    stop_ok(daemon)


# ------------------------------------------------------------------------------------ corrupt state
def garbage():
    rnd = random.Random(4)
    return bytes(rnd.randrange(256) for _ in range(4096))


CORRUPT = {
    "garbage-bytes": garbage(),
    "empty-file": b"",
    "right-header-garbage-line": b"mailflowd-windows 1\n\x00\xff\xfe not a bucket line\n",
    "truncated-line": b"mailflowd-windows 1\n490000 partner-cidr inbound 1 0 0 0",
    "cut-at-a-line-end": b"mailflowd-windows 2\n490000 partner-cidr inbound 1 0 0 0 0\n",  # no "end" line
    "counts-beyond-64-bits": b"mailflowd-windows 2\n490000 partner-cidr inbound 18446744073709551615 0 0 0 0\n"
                             b"490001 partner-cidr inbound 1 0 0 0 0\nend\n",
    "negative-count": b"mailflowd-windows 1\n490000 partner-cidr inbound 1 -5 0 0 0\n",
    "foreign-text": b"{\"windows\": []}\n",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_state_file_is_moved_aside_and_the_daemon_relays(env, kind, utc_day):
    state = env.workdir / f"corrupt-{kind}-state"
    state.mkdir()
    content = CORRUPT[kind]
    (state / "windows.state").write_bytes(content)

    daemon = env.make(f"corrupt-{kind}", state)  # starts (the harness fails the test if it does not)
    aside = sorted(state.glob("windows.state.corrupt-*"))
    assert len(aside) == 1, f"the corrupt file should be moved aside as windows.state.corrupt-*: " \
                            f"{sorted(p.name for p in state.iterdir())}"
    assert aside[0].read_bytes() == content, "the moved-aside file is not the original bytes (evidence lost)"
    assert state_errors(daemon, "corrupt") == 1, \
        f"mailflow_state_errors_total{{reason=\"corrupt\"}} = {state_errors(daemon, 'corrupt')} (want 1)"
    assert aside[0].name in daemon.stderr(), f"the log should say where the file went ({aside[0].name})"

    report = rh.report_json(daemon)
    assert all(r["messages"] == 0 for r in report["rows"]), "the report should start empty"
    assert report["insights"] == []
    rh.assert_report_matches(report, empty_counts(), report["generated_at"][:10])  # no message: the report's day

    rh.send_plan(daemon, env.sink, ONE_MORE)  # still relays, and counts
    report = rh.report_json(daemon)
    rh.assert_report_matches(report, rh.plan_counts(ONE_MORE), utc_day)
    stop_ok(daemon)

    # The state it saves on the way out is good: the next start has no state error and the message.
    again = env.make(f"corrupt-{kind}-again", state)
    assert state_errors(again, "corrupt") == 0
    assert len(list(state.glob("windows.state.corrupt-*"))) == 1
    report = rh.report_json(again)
    rh.assert_report_matches(report, rh.plan_counts(ONE_MORE), utc_day)
    stop_ok(again)


def test_a_file_moved_aside_never_replaces_an_earlier_one(env):
    """Two corrupt copies moved aside in the same second (a restart loop, another bad copy restored at once) must
    both be kept: the rename over windows.state.corrupt-<time> lost the first. Earlier ones are made for every
    second the start can take, so the daemon's own name is always taken."""
    state = env.workdir / "aside-twice-state"
    state.mkdir()
    now = int(time.time())
    earlier = {state / f"windows.state.corrupt-{t}": f"earlier {t}\n".encode() for t in range(now - 2, now + 60)}
    for path, content in earlier.items():
        path.write_bytes(content)
    (state / "windows.state").write_bytes(b"garbage\n")
    daemon = env.make("aside-twice", state)
    stop_ok(daemon)
    for path, content in earlier.items():
        assert not path.exists() or path.read_bytes() == content, f"{path.name} was replaced by the file moved aside"
    new = [p for p in state.glob("windows.state.corrupt-*") if p not in earlier]
    assert [p.read_bytes() for p in new] == [b"garbage\n"], sorted(p.name for p in new)
    assert new[0].name in daemon.stderr(), f"the log should say where the file went ({new[0].name})"
    # At most 5 are kept: the one moved aside now and the 4 newest earlier ones; the log names those removed.
    kept = sorted(p.name for p in state.glob("windows.state.corrupt-*") if p in earlier)
    assert kept == [f"windows.state.corrupt-{t}" for t in range(now + 56, now + 60)], kept
    assert f"windows.state.corrupt-{now - 2}, windows.state.corrupt-{now - 1}," in daemon.stderr(), daemon.log_tail()


def test_files_moved_aside_are_bounded_and_the_removed_ones_logged(env):
    """A state file that is corrupt at every start (a restart loop, a disk going bad) must not fill state_dir with
    copies: the newest 5 moved aside are kept, the older ones are removed, and the log says which."""
    state = env.workdir / "aside-bounded-state"
    state.mkdir()
    for start in range(7):
        (state / "windows.state").write_bytes(f"garbage {start}\n".encode())
        daemon = env.make(f"aside-bounded-{start}", state)
        stop_ok(daemon)
        aside = sorted(state.glob("windows.state.corrupt-*"), key=lambda p: p.stat().st_mtime_ns)
        assert len(aside) == min(start + 1, 5), sorted(p.name for p in aside)
        if start >= 5:
            assert "removed the oldest moved aside before: windows.state.corrupt-" in daemon.stderr(), \
                daemon.log_tail()
    contents = sorted(p.read_bytes() for p in state.glob("windows.state.corrupt-*"))
    assert contents == [f"garbage {n}\n".encode() for n in range(2, 7)], contents


def test_a_state_dir_in_use_is_refused(env, utc_day):
    """state_dir is one process's: a second daemon on it (another configuration on the same state_dir) and
    `mailflowd mta-sts --state` are refused while the first runs, reloads included, naming its pid; neither
    writes there. --check-config takes no lock. Once the first has stopped, the next one starts."""
    state = env.workdir / "shared-state"
    first = env.make("in-use-first", state)
    rh.send_plan(first, env.sink, ONE_MORE)
    base = harness.value(first.metrics(), "mailflow_config_reloads_total", result="success")
    first.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(first.metrics(), "mailflow_config_reloads_total",
                                           result="success") >= base + 1, 10, what="the reload")
    before = sorted(p.name for p in state.iterdir())

    rc, out, second = start_expecting_refusal(env, "in-use-second", state)
    assert rc != 0, f"a second mailflowd started on the same state_dir:\n{out}"
    assert f"state_dir {state} is in use" in out and f"pid {first.proc.pid}" in out, \
        f"the message should name state_dir and the first daemon's pid {first.proc.pid}:\n{out}"
    assert rh.http_get_fails(second), "the HTTP side answered although the daemon refused to start"

    cli = subprocess.run([env.bin, "mta-sts", "--config", str(first.config_path), "--domain", "example.net",
                          "--state"], capture_output=True, text=True, timeout=20)
    harness.TRANSCRIPTS.append(f"$ mailflowd mta-sts ... --state\n(rc={cli.returncode})\n{cli.stderr}")
    assert cli.returncode == 1 and "the daemon is running" in cli.stderr and f"pid {first.proc.pid}" in cli.stderr, \
        cli.stderr

    check = subprocess.run([env.bin, "--check-config", str(first.config_path)], capture_output=True, text=True,
                           timeout=20)
    assert check.returncode == 0, check.stderr
    assert sorted(p.name for p in state.iterdir()) == before, "a refused process wrote in state_dir"

    stop_ok(first)  # its last save: the message it relayed
    again = env.make("in-use-again", state)
    report = rh.report_json(again)
    rh.assert_report_matches(report, rh.plan_counts(ONE_MORE), utc_day)
    stop_ok(again)


@pytest.mark.parametrize("taken", [True, False], ids=["taken_by_a_daemon", "nobody_else"])
def test_mta_sts_state_with_state_dir_deleted_while_it_runs(env, taken):
    """`mailflowd mta-sts --state` holds state_dir's lock from before it reads the cache until it has written it.
    A state_dir deleted while its lookup runs (an operator's rm -rf, a clean-up job) leaves that lock on a file
    nobody can open any more: a daemon started meanwhile made state_dir again and took it, and the command still
    wrote its cache into the daemon's state_dir (exit 4 for the TXT timeout, no word of it), through the NAME.tmp
    that the daemon's saves use. Now the command takes the lock again before it writes, as the daemon's saves do:
    held by the daemon, it writes nothing and exits 1 naming its pid; held by nobody, state_dir is made again and
    the cache written there, and stderr says so."""
    state = env.workdir / f"cli-deleted-{taken}-state"
    state.mkdir()
    now = int(time.time())
    cached = (f"mailflowd-mta-sts 1\nok.policy.example.net\tkept1\t{now - 100}\t{now + 3600}\t"
              "version: STSv1\tmode: enforce\tmx: mx1.ok.policy.example.net\tmax_age: 86400\n")
    silent = SilentServer()  # the TXT lookup waits for its timeout: the window in which state_dir goes
    config = env.workdir / f"cli-deleted-{taken}.yaml"
    config.write_text("\n".join([
        f"state_dir: {state}",
        "listeners:",
        '  - {name: out, address: "127.0.0.133:2587", direction: outbound, upstream: internet}',
        "upstreams:",
        "  - {name: internet, mx: true, mta_sts: enforce}",
        "dns: " + json.dumps({"servers": [silent.address], "timeout": "6s"}),
    ]) + "\n")
    daemon = None
    try:
        (state / "mta-sts.state").write_text(cached)
        cli = subprocess.Popen([env.bin, "mta-sts", "--config", str(config), "--domain", "ok.policy.example.net",
                                "--state"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            silent.sock.settimeout(10)
            silent.sock.recvfrom(4096)  # its TXT query: the cache is read and the lock held
            assert (state / "mailflowd.lock").exists()
            shutil.rmtree(state)
            if taken:
                daemon = env.make(f"cli-deleted-daemon-{taken}", state)
            assert cli.poll() is None, "the command ended before the test was ready: the DNS timeout is too short"
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        harness.TRANSCRIPTS.append(f"$ mailflowd mta-sts ... --state\n(rc={cli.returncode})\n{out}{err}")
        written = (state / "mta-sts.state").read_text() if (state / "mta-sts.state").exists() else ""
        if taken:
            assert cli.returncode == 1 and "cannot be taken again" in err and f"pid {daemon.proc.pid}" in err, err
            assert out == "", out
            assert "kept1" not in written, f"the command wrote into the daemon's state_dir:\n{written}"
            stop_ok(daemon)
        else:
            assert cli.returncode == 4 and "was deleted while this command ran: made again" in err, err
            assert json.loads(out)["id"] == "kept1", out
            assert "\tkept1\t" in written, written
            assert (state / "mailflowd.lock").exists()
    finally:
        silent.close()
        if daemon is not None and daemon.proc.poll() is None:
            stop_ok(daemon)


# -------------------------------------------------------------------------------- unusable state_dir
def start_expecting_refusal(env, name, state_dir):
    d = env.make(name, state_dir, start=False)
    d.config_path.write_text(json.dumps(d.config, indent=2) + "\n")
    try:
        p = subprocess.run([env.bin, "--config", str(d.config_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"mailflowd with state_dir {state_dir} kept running (it should refuse to start)")
    out = p.stdout.decode("utf-8", "replace")
    harness.TRANSCRIPTS.append(f"$ mailflowd --config {d.config_path}\n(rc={p.returncode})\n{out}")
    return p.returncode, out, d


def test_state_dir_is_a_regular_file(env):
    state = env.workdir / "state-is-a-file"
    state.write_text("not a directory\n")
    rc, out, d = start_expecting_refusal(env, "state-file", state)
    assert rc != 0, f"mailflowd started with state_dir = a regular file:\n{out}"
    assert "state_dir" in out and str(state) in out, f"the message should name state_dir and its path:\n{out}"
    assert state.read_text() == "not a directory\n", "the regular file was changed"
    assert rh.http_get_fails(d), "the HTTP side answered although the daemon refused to start"


def test_state_dir_below_a_regular_file(env):
    parent = env.workdir / "parent-is-a-file"
    parent.write_text("x\n")
    state = parent / "state"
    rc, out, _ = start_expecting_refusal(env, "state-below-file", state)
    assert rc != 0, f"mailflowd started with state_dir below a regular file:\n{out}"
    assert "state_dir" in out and str(state) in out, f"the message should name state_dir and its path:\n{out}"


def test_state_file_is_a_directory(env):
    """windows.state that cannot be read at all (a directory): refuse, naming the file, rather than start
    without the window and overwrite nothing."""
    state = env.workdir / "state-file-is-dir"
    (state / "windows.state").mkdir(parents=True)
    rc, out, _ = start_expecting_refusal(env, "state-file-dir", state)
    assert rc != 0, f"mailflowd started with windows.state a directory:\n{out}"
    assert "state_dir" in out and "windows.state" in out, f"the message should name the state file:\n{out}"


@pytest.mark.parametrize("file", ["windows.state", "remotes.state", "tlsrpt.state", "tlsrpt-ledger.state",
                                  "mta-sts.state", "mailflowd.lock"])
def test_a_state_file_that_is_a_fifo_is_refused_at_once(env, file):
    """A FIFO in place of a state file (a mistake, a planted one): the open waited for a writer forever, so the daemon
    never became ready and never said why (under systemd: a start timeout, no log line). Refused at once, as a
    directory is, naming the file: as Postfix's safe_open(), only a regular file is read."""
    state = env.workdir / f"state-fifo-{file}"
    state.mkdir()
    os.mkfifo(state / file)
    rc, out, _ = start_expecting_refusal(env, f"state-fifo-{file}", state)
    assert rc != 0, f"mailflowd started with {file} a FIFO:\n{out}"
    assert f"{file}: not a regular file" in out, f"the message should name the file and say why:\n{out}"
    assert (state / file).is_fifo(), "nothing is moved or replaced"


def test_a_lock_fifo_the_daemon_cannot_write_is_refused_at_once(env):
    """mailflowd.lock a FIFO that the daemon's user cannot write (made by root; as root, the daemon runs as
    `nobody` via setpriv): the lock falls back to opening it read-only, which for a FIFO waited for a writer
    forever, so the daemon hung at start without a word. Refused at once, naming the file."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv: a FIFO the daemon's user cannot open for writing")
    base = Path(tempfile.mkdtemp(prefix="mailflowd-lockfifo-"))  # outside the 0700 pytest basetemp
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        state.chmod(0o777)  # the daemon's user may write the directory, not the lock
        os.mkfifo(state / "mailflowd.lock", 0o444)
        cfg = harness.default_config(
            state, harness.free_port(),
            [{"name": "inbound", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
              "upstream": "store"}],
            [{"name": "store", "address": f"127.0.0.1:{env.sink.port}", "tls": "none"}])
        config = base / "mailflowd.yaml"
        config.write_text(json.dumps(cfg, indent=2) + "\n")
        config.chmod(0o644)
        argv = [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups", env.bin,
                "--config", str(config)]
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError("mailflowd hung at start on a mailflowd.lock FIFO it cannot write")
        out = p.stdout.decode("utf-8", "replace")
        harness.TRANSCRIPTS.append(f"$ {' '.join(argv)}\n(rc={p.returncode})\n{out}")
        assert p.returncode != 0, f"mailflowd started with mailflowd.lock a FIFO:\n{out}"
        assert "mailflowd.lock: not a regular file" in out, f"the message should name the file and say why:\n{out}"
        assert (state / "mailflowd.lock").is_fifo(), "nothing is moved or replaced"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_state_dir_not_writable(env, tmp_path_factory):
    """A state_dir the daemon's user cannot write. As root (permissions do not bind root), the daemon runs as
    `nobody` via setpriv against a root-owned 0755 directory; otherwise the directory is made 0555."""
    base = Path(tempfile.mkdtemp(prefix="mailflowd-ro-"))  # outside the 0700 pytest basetemp: nobody reads it
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o755)
        argv = [env.bin]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if not setpriv:
                pytest.skip("running as root without setpriv: cannot make a directory unwritable for the daemon")
            argv = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", env.bin]
        else:
            state.chmod(0o555)
        http_port = harness.free_port()
        cfg = harness.default_config(
            state, http_port,
            [{"name": "inbound", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
              "upstream": "store"}],
            [{"name": "store", "address": f"127.0.0.1:{env.sink.port}", "tls": "none"}])
        config = base / "mailflowd.yaml"
        config.write_text(json.dumps(cfg, indent=2) + "\n")
        config.chmod(0o644)
        p = subprocess.run(argv + ["--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=15)
        out = p.stdout.decode("utf-8", "replace")
        harness.TRANSCRIPTS.append(f"$ {' '.join(argv)} --config {config}\n(rc={p.returncode})\n{out}")
        assert p.returncode != 0, f"mailflowd started with an unwritable state_dir:\n{out}"
        assert "state_dir" in out and str(state) in out and "writable" in out, \
            f"the message should name state_dir, its path, and say it is not writable:\n{out}"
        assert list(state.iterdir()) == [], f"something was written: {list(state.iterdir())}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_temporary_file_left_by_a_crashed_root_run_does_not_block_the_saves(env):
    """windows.state.tmp left by a run that died mid-save, owned by root (an operator's run as root): the daemon's
    user cannot open it for writing, and every save failed on it until someone removed it. As root, the daemon
    runs as `nobody` via setpriv; otherwise the file is made read-only for its owner."""
    base = Path(tempfile.mkdtemp(prefix="mailflowd-tmp-"))  # outside the 0700 pytest basetemp: nobody reads it
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o750)
        left = state / "windows.state.tmp"
        left.write_text("mailflowd-windows 2\nhalf a save\n")
        left.chmod(0o400)
        wrapper = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if not setpriv:
                pytest.skip("running as root without setpriv: cannot leave a file the daemon cannot write")
            nobody = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
            os.chown(state, nobody, -1)
            wrapper = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        cfg = harness.default_config(
            state, harness.free_port(),
            [{"name": "inbound", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
              "upstream": "store"}],
            [{"name": "store", "address": f"127.0.0.1:{env.sink.port}", "tls": "none"}])
        d = harness.Daemon(env.bin, base, cfg, name="stale-tmp", wrapper=wrapper).start()
        stop_ok(d)
        log = d.stderr()
        assert "state_save_failed" not in log, f"the save failed on the stale temporary file:\n{log}"
        assert (state / "windows.state").read_text().startswith("mailflowd-windows 2\n"), log
        assert not left.exists(), "the stale temporary file is still there"
    finally:
        shutil.rmtree(base, ignore_errors=True)
