"""A telemetry.window other than 7 days: `days` defaults to the window when it is shorter, may not exceed
it (400 naming the limit), the insight sentence names the window ("in the last 1 day"), and the report's own
statement of the window agrees with what the days parameter accepts; a window that is not whole days is refused."""
import re
import subprocess
import types

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
    report, today = rh.stable_report(env.one_day)
    assert report["days"] == 1 and {r["date"] for r in report["rows"]} == {today}
    status, body, _ = rh.http_get(env.one_day, "/api/v1/report?days=2")
    assert status == 400 and "1" in body, f"days=2 over a 1-day window: {status} {body!r}"
    assert accepted_days(env.one_day) == [1]
    assert stated_window_days(env.one_day) == 1


def test_one_day_window_insight_sentence(env):
    report, _ = rh.stable_report(env.one_day)
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
