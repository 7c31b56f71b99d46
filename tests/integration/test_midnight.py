"""The tests' UTC day (report_helpers.day_clear_of_midnight, the utc_day fixture) against a clock moved over
midnight: what a test records and what it then asks the daemon for fall on one day, and report_days says which
days a report shows after it. The tests that asked for the
date when they checked (tlsrpt() in test_dns_local, test_outbound_policy; report() in test_tlsrpt_dns; tls_report()
in test_dane; test_tlsrpt_send's state for today; test_report's two-day history) asked for the next day after a
midnight that came between their traffic and their check."""
from datetime import datetime, timedelta, timezone

import pytest

import report_helpers as rh


class Clock:
    """A UTC clock that only the test moves (and report_helpers' sleep)."""

    def __init__(self, at):
        self.now = at

    def sleep(self, seconds):
        self.now += timedelta(seconds=seconds)


class Daemon:
    """Dates what it records by the clock at that moment, as mailflowd's stores do."""

    def __init__(self, clock):
        self.clock = clock
        self.days = {}

    def record(self, what):
        self.days.setdefault(self.clock.now.strftime("%Y-%m-%d"), []).append(what)

    def of_day(self, day):
        return self.days.get(day, [])

    def report(self, days=7):
        """/api/v1/report's shape as build_report makes it: generated_at by the clock when it answers, a row per day
        from that day back to the first recorded one (at most `days`), newest first."""
        today = self.clock.now.date()
        first = min((datetime.strptime(d, "%Y-%m-%d").date() for d in self.days), default=today)
        shown = min((today - first).days + 1, days)
        rows = [{"date": (today - timedelta(days=back)).isoformat(), "connector": "c", "direction": "inbound",
                 "messages": len(self.of_day((today - timedelta(days=back)).isoformat()))} for back in range(shown)]
        return {"generated_at": self.clock.now.strftime("%Y-%m-%dT%H:%M:%SZ"), "days": days, "rows": rows}


@pytest.fixture
def clock(monkeypatch):
    clock = Clock(datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc))
    monkeypatch.setattr(rh, "utc_now", lambda: clock.now)
    monkeypatch.setattr(rh.time, "sleep", clock.sleep)
    return clock


@pytest.mark.parametrize("before_midnight", [0.5, 30.0, rh.MIDNIGHT_GUARD - 1])
def test_traffic_and_its_check_fall_on_the_day_taken_when_midnight_comes_between(clock, before_midnight):
    clock.now = datetime(2026, 12, 7, tzinfo=timezone.utc) - timedelta(seconds=before_midnight)
    daemon = Daemon(clock)
    day = rh.day_clear_of_midnight()  # the test begins
    clock.sleep(0.4)
    daemon.record("a session")  # its traffic
    clock.sleep(rh.MIDNIGHT_GUARD - 1)  # the test runs on and checks
    assert daemon.of_day(day) == ["a session"], f"asked for {day}, recorded {daemon.days}"
    assert day == "2026-12-07"


def test_far_from_midnight_the_day_is_today_at_once(clock):
    clock.now = datetime(2026, 12, 6, 23, 57, tzinfo=timezone.utc)
    assert rh.day_clear_of_midnight() == "2026-12-06"
    assert clock.now == datetime(2026, 12, 6, 23, 57, tzinfo=timezone.utc), "waited far from midnight"


@pytest.mark.parametrize("checked_after", [1.0, rh.MIDNIGHT_GUARD - 1, 3600.0])
def test_a_report_checked_after_midnight_has_the_traffic_under_the_day_taken_before_it(clock, checked_after):
    """A module's traffic sent once (test_report, test_browser, test_report_volume), its report checked by a later
    test, after midnight: the messages are the rows of the day taken before they were sent, and the report shows
    the new day in front of it (report_days). stable_report, which these tests used, took the date at the fetch:
    the next day, whose rows are zero."""
    clock.now = datetime(2026, 12, 7, tzinfo=timezone.utc) - timedelta(seconds=rh.MIDNIGHT_GUARD + 5)
    daemon = Daemon(clock)
    day = rh.day_clear_of_midnight()  # the module's fixture, before it sends
    daemon.record("a session")
    clock.sleep(rh.MIDNIGHT_GUARD + 5 + checked_after)  # later tests of the module, after midnight
    report = daemon.report()
    assert rh.rows_of(report, day)[("c", "inbound")]["messages"] == 1, report
    assert rh.report_days(report, day) == ["2026-12-07", "2026-12-06"] == [r["date"] for r in report["rows"]]
    assert rh.report_days(daemon.report(days=1), day) == ["2026-12-07"]
