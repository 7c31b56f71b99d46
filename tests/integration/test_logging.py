"""Logs as systemd and log shippers read them (issue #17 item 8): the real daemon with its stderr redirected to a
file and JOURNAL_STREAM naming that file's device:inode, as systemd sets it for a service. Every line then starts
with an sd-daemon priority ("<3>" error, "<4>" warning, "<6>" info) and carries no timestamp of its own, so
`journalctl -p err` finds startup_failed; with log.format json each line after the prefix is a JSON object whose
numeric fields are JSON numbers. A JOURNAL_STREAM that names another file is not the journal."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import harness


def run_daemon(binary, directory, cfg, journal_stream):
    """Starts mailflowd with stderr to a file; journal_stream: True (the file's dev:inode), a string, or None."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    cfg_path = directory / "mailflowd.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    err_path = directory / "stderr"
    err = open(err_path, "wb")
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is True:
        info = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    elif journal_stream:
        env["JOURNAL_STREAM"] = journal_stream
    proc = subprocess.Popen([binary, "--config", str(cfg_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err, env=env)
    err.close()
    return proc, err_path


def config(directory, smtp_port, http_port, fmt, connectors=()):
    cfg = harness.default_config(directory / "state", http_port,
                                 [{"name": "inbound", "address": f"127.0.0.1:{smtp_port}", "upstream": "store"}],
                                 [{"name": "store", "address": "127.0.0.1:9", "tls": "none"}], connectors)
    cfg["log"] = {"level": "info", "format": fmt}
    return cfg


def wait_healthy(proc, http_port, err_path):
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mailflowd exited with {proc.returncode}:\n{err_path.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"mailflowd not healthy:\n{err_path.read_text()}")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_journal_priorities_and_json_numbers(mailflowd_bin, tmp_path):
    smtp_port, http_port = harness.free_port(), harness.free_port()
    # A connector after a catch-all never matches: logged as a config_warning at start and on reload.
    connectors = [{"name": "everything", "direction": "inbound"},
                  {"name": "partner", "direction": "inbound", "match": {"client_cidrs": ["192.0.2.0/24"]}}]
    proc, err_path = run_daemon(mailflowd_bin, tmp_path, config(tmp_path, smtp_port, http_port, "json", connectors),
                                journal_stream=True)
    wait_healthy(proc, http_port, err_path)
    proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: '"event":"reloaded"' in err_path.read_text(), what="the reloaded event")
    stop(proc)

    events = []
    for line in err_path.read_text().splitlines():
        assert line[:1] == "<" and line[2:3] == ">" and line[1] in "01234567", f"no sd-daemon priority: {line!r}"
        record = json.loads(line[3:])  # the rest of the line is one JSON object
        assert "time" not in record, f"the journal stamps lines itself: {line!r}"
        events.append((int(line[1]), record))
    by_event = {}
    for priority, record in events:
        by_event.setdefault(record["event"], []).append((priority, record))
    assert by_event["started"][0][0] == 6
    warnings = by_event["config_warning"]
    assert len(warnings) == 2 and all(p == 4 for p, _ in warnings), warnings  # at start and after the reload
    assert "connector \"partner\" never matches" in warnings[0][1]["warning"]
    priority, reloaded = by_event["reloaded"][0]
    assert priority == 6
    assert reloaded["listeners"] == 1 and reloaded["connectors"] == 2, reloaded
    assert type(reloaded["listeners"]) is int and type(reloaded["connectors"]) is int, reloaded
    priority, stopped = by_event["stopped"][0]
    assert priority == 6 and type(stopped["messages"]) is int and stopped["messages"] == 0, stopped


def test_session_duration_is_a_json_number(mailflowd_bin, tmp_path):
    """The session line's duration (seconds) is a number to a log shipper, as every other numeric field is
    (docs/configuration.md, log.format): a string "0.012" cannot be summed or compared in Loki, Elasticsearch or
    jq without a conversion per query. Text format keeps duration=0.012."""
    smtp_port, http_port = harness.free_port(), harness.free_port()
    proc, err_path = run_daemon(mailflowd_bin, tmp_path, config(tmp_path, smtp_port, http_port, "json"),
                                journal_stream=None)
    wait_healthy(proc, http_port, err_path)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", smtp_port), timeout=5) as s:
        assert s.recv(512).startswith(b"220")
        time.sleep(0.2)
        s.sendall(b"QUIT\r\n")
        assert s.recv(512).startswith(b"221")
    took = time.monotonic() - started
    harness.wait_for(lambda: '"event":"session"' in err_path.read_text(), what="the session line")
    stop(proc)
    sessions = [json.loads(line) for line in err_path.read_text().splitlines() if '"event":"session"' in line]
    assert len(sessions) == 1, sessions
    duration = sessions[0]["duration"]
    assert type(duration) in (int, float), f"duration is a {type(duration).__name__}: {sessions[0]}"
    assert 0.2 <= duration <= took + 0.1, (duration, took)
    assert type(sessions[0]["messages"]) is int and type(sessions[0]["rejects"]) is int, sessions[0]


def test_startup_failure_is_an_error_for_the_journal(mailflowd_bin, tmp_path):
    with socket.socket() as taken:  # the SMTP address is in use: the start fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = config(tmp_path, taken.getsockname()[1], harness.free_port(), "text")
        proc, err_path = run_daemon(mailflowd_bin, tmp_path, cfg, journal_stream=True)
        assert proc.wait(15) == 1
    lines = err_path.read_text().splitlines()
    failed = [ln for ln in lines if "startup_failed" in ln]
    assert failed and failed[0].startswith("<3>error startup_failed error="), lines


def test_journal_stream_of_another_file_is_not_the_journal(mailflowd_bin, tmp_path):
    smtp_port, http_port = harness.free_port(), harness.free_port()
    other = os.stat(tmp_path)  # systemd's stream, but stderr was redirected elsewhere
    proc, err_path = run_daemon(mailflowd_bin, tmp_path, config(tmp_path, smtp_port, http_port, "text"),
                                journal_stream=f"{other.st_dev}:{other.st_ino}")
    wait_healthy(proc, http_port, err_path)
    stop(proc)
    lines = err_path.read_text().splitlines()
    assert lines
    for line in lines:
        assert not line.startswith("<"), line
        assert line[:4].isdigit() and line[4] == "-", f"expected a timestamp first: {line!r}"
