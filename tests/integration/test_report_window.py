"""A telemetry.window other than 7 days: `days` defaults to the window when it is shorter, may not exceed
it (400 naming the limit), the insight sentence names the window ("in the last 1 day"), and the report's own
statement of the window agrees with what the days parameter accepts."""
import re
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
    return types.SimpleNamespace(sink=sink, one_day=one_day,
                                 hours36=make(daemon_factory, sink, "hours36", "36h"))


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
    assert [i["text"] for i in report["insights"]] == [
        "Inbound partner connector partner-cidr is seeing significant mail flow without TLS: "
        "100.0% of 2 messages in the last 1 day"], report["insights"]


@pytest.mark.xfail(strict=True, reason="bug: with telemetry.window 36h the report says 'window 2 days' "
                   "(report.cpp window_days_of rounds up) while /api/v1/report?days=2 answers 400 'days must be an "
                   "integer from 1 to 1 (the telemetry window)' (telemetry.cpp Telemetry::window_days rounds down)")
def test_window_not_whole_days_is_stated_and_enforced_alike(env):
    stated = stated_window_days(env.hours36)
    accepted = accepted_days(env.hours36)
    assert accepted == list(range(1, stated + 1)), \
        f"the report states a window of {stated} day(s) but days={accepted} are accepted"
