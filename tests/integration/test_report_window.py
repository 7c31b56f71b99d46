"""A telemetry.window other than 7 days: `days` defaults to the window when it is shorter, may not exceed
it (400 naming the limit), the insight sentence names the window ("in the last 1 day"), and the report's own
statement of the window agrees with what the days parameter accepts; a window that is not whole days is refused."""
import json
import re
import signal
import subprocess
import types
from datetime import datetime, timezone

import pytest

import harness
import report_helpers as rh


def make(daemon_factory, sink, name, window, min_messages=1):
    return daemon_factory(
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
                    "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
        connectors=[{"name": "partner-cidr", "type": "partner", "direction": "inbound",
                     "match": {"client_cidrs": ["127.0.0.2/32"]}}],
        name=name,
        telemetry={"window": window, "defaults": {"tls10_share": 0.05, "no_tls_share": 0.05,
                                                  "min_messages": min_messages}})


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    one_day = make(daemon_factory, sink, "one-day", "1d")
    rh.send_plan(one_day, sink, [("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "none", 2)])
    return types.SimpleNamespace(sink=sink, one_day=one_day)


def accepted_days(daemon, upto=4):
    return [n for n in range(1, upto + 1) if rh.http_get(daemon, f"/api/v1/report?days={n}")[0] == 200]


def stated_window_days(daemon):
    _, text, _ = rh.http_get(daemon, "/api/v1/report.txt")
    m = re.search(r"window (\d+) days?", text)
    assert m, f"the table does not state the window:\n{text[:300]}"
    return int(m.group(1))


def test_one_day_window_defaults_and_limits(env):
    report = rh.report_json(env.one_day)
    assert report["days"] == 1 and {r["date"] for r in report["rows"]} == {report["generated_at"][:10]}
    status, body, _ = rh.http_get(env.one_day, "/api/v1/report?days=2")
    assert status == 400 and "1" in body, f"days=2 over a 1-day window: {status} {body!r}"
    assert accepted_days(env.one_day) == [1]
    assert stated_window_days(env.one_day) == 1


def test_one_day_window_insight_sentence(env):
    report = rh.report_json(env.one_day)
    assert [rh.split_offender(i["text"]) for i in report["insights"]] == [
        "Inbound partner connector partner-cidr is seeing significant mail flow without TLS: "
        "100.0% of 2 messages in the last 1 day"], report["insights"]


def test_window_must_be_whole_days(tmp_path, mailflowd_bin):
    """Reports, insights and alerts count in days, so a window of 36h is a config error, not a silent rounding."""
    config = tmp_path / "window36h.yaml"
    config.write_text(
        "listeners:\n  - {name: inbound, address: \"127.0.0.1:2525\", upstream: store}\n"
        "upstreams:\n  - {name: store, address: \"127.0.0.1:25\", tls: none}\n"
        "telemetry:\n  window: 36h\n")
    result = subprocess.run([mailflowd_bin, "--check-config", str(config)], capture_output=True, text=True)
    assert result.returncode == 1, result
    assert f"{config}:6:11: telemetry.window: must be a whole number of days" in result.stderr, result.stderr



def test_reload_that_shortens_the_window_drops_the_older_hours_at_once(workdir, sink_factory, daemon_factory):
    """SIGHUP with telemetry.window 7d -> 1d drops the hours older than the new window at once, scraped or not
    in between: a later reload back to 7d brings nothing back (as docs/configuration.md says). The days
    parameter follows each window, and what stayed inside is still counted."""
    sink = sink_factory("reload-window-store")
    hour = int(datetime.now(timezone.utc).timestamp()) // 3600
    state = workdir / "reload-window-state"
    state.mkdir()
    (state / "windows.state").write_text("mailflowd-windows 1\n"
                                         f"{hour - 72} partner-cidr inbound 0 4 0 0 0\n"  # 3 days ago
                                         f"{hour} partner-cidr inbound 2 0 0 0 0\n")
    d = make(daemon_factory, sink, "reload-window", "7d")

    def reload_to(window):
        d.config["telemetry"]["window"] = window
        d.config_path.write_text(json.dumps(d.config, indent=2) + "\n")
        before = d.stderr().count("reloaded")
        d.proc.send_signal(signal.SIGHUP)  # waited for in the log: a scrape would prune by itself
        harness.wait_for(lambda: d.stderr().count("reloaded") > before, 10, what=f"the reload to {window}")

    reload_to("1d")
    reload_to("7d")
    assert accepted_days(d, 7) == [1, 2, 3, 4, 5, 6, 7]
    report = rh.report_json(d, "?days=7")
    counted = {r["date"]: r["counts"] for r in report["rows"] if r["connector"] == "partner-cidr" and r["messages"]}
    assert list(counted.values()) == [{"none": 2, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 0}], \
        f"the hours before the 1-day window came back: {counted}"
    assert harness.value(d.metrics(), "mailflow_window_messages", connector="partner-cidr", tls_version="TLS1.0") == 0
    reload_to("1d")
    assert accepted_days(d, 3) == [1]
