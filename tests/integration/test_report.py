"""The connector report after real traffic at mixed TLS versions (none, TLS1.0, TLS1.2, TLS1.3) through a
connector chosen by client CIDR (127.0.0.2), connectors chosen by sender domain, and `internet` (inbound and
outbound): /api/v1/report (JSON), /api/v1/report.csv, /api/v1/report.txt, `mailflowd report`, and the
window metrics all say exactly what was sent; insights appear exactly when messages >= min_messages and the
share is strictly above the threshold; bad `days` get a 400 with a message."""
import csv
import io
import json
import re
import types
from pathlib import Path

import pytest

import harness
import report_helpers as rh


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory, mailflowd_bin):
    sink = sink_factory("store")
    listeners, upstreams, connectors, extra = rh.build_env_config(certs, sink.port, harness.free_port(),
                                                                  harness.free_port())
    daemon = daemon_factory(listeners, upstreams, connectors, **extra)
    day = rh.day_clear_of_midnight()  # the day of the plan's messages, taken before they are sent
    rh.send_plan(daemon, sink)
    return types.SimpleNamespace(sink=sink, daemon=daemon, bin=mailflowd_bin, counts=rh.plan_counts(), day=day)


def test_json_today_has_exact_counts_percentages_and_insights(env):
    report = rh.report_json(env.daemon)
    rh.assert_report_matches(report, env.counts, env.day)


def test_json_insight_set_is_what_the_plan_says(env):
    """Spelled out, so a wrong helper cannot hide a wrong daemon: partner-cidr is above both thresholds,
    legacy-domain above TLS1.0 (min_messages 2), forced-domain exactly at 0.25 (no insight), internet inbound
    has 50% without TLS but only 2 < 3 messages (no insight)."""
    report = rh.report_json(env.daemon)
    texts = sorted(rh.split_offender(i["text"]) for i in report["insights"])
    assert texts == sorted([
        "Inbound partner connector partner-cidr is seeing significant TLS1.0 mail flow: "
        "14.3% of 7 messages in the last 7 days",
        "Inbound partner connector partner-cidr is seeing significant mail flow without TLS: "
        "28.6% of 7 messages in the last 7 days",
        "Inbound on-premises connector legacy-domain is seeing significant TLS1.0 mail flow: "
        "66.7% of 3 messages in the last 7 days",
    ]), f"insights: {json.dumps(report['insights'], indent=1)}"


def test_json_has_a_row_for_every_day_and_connector(env):
    report = rh.report_json(env.daemon)
    assert report["days"] == 7, f"default days: {report['days']}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["generated_at"]), report["generated_at"]
    # Every message is from env.day and the daemon has no older state: the days before it did not exist for the
    # daemon and are not printed as zero rows (a midnight since then adds the new day's zero rows in front).
    dates = [r["date"] for r in report["rows"]]
    days = rh.report_days(report, env.day)
    assert sorted(set(dates), reverse=True) == days, f"dates in the report: {sorted(set(dates))}, want {days}"
    assert set(rh.rows_of(report, env.day)) == set(env.counts)
    assert len(report["rows"]) == len(env.counts) * len(days)


def test_days_parameter(env):
    one = rh.report_json(env.daemon, "?days=1")
    assert one["days"] == 1
    assert [r["date"] for r in one["rows"]] == [one["generated_at"][:10]] * len(env.counts), one["rows"]
    if one["generated_at"][:10] == env.day:
        rh.assert_report_matches(one, env.counts, env.day)
    else:  # a midnight since the plan: days=1 is the new day, without a message
        assert all(r["messages"] == 0 for r in one["rows"]), one["rows"]
    three = rh.report_json(env.daemon, "?days=3")
    assert three["days"] == 3
    assert sorted({r["date"] for r in three["rows"]}, reverse=True) == rh.report_days(three, env.day), \
        "days before the first message were printed"
    rh.assert_report_matches(three, env.counts, env.day)


@pytest.mark.parametrize("path", ["/api/v1/report", "/api/v1/report.csv", "/api/v1/report.txt", "/"])
@pytest.mark.parametrize("days", ["abc", "0", "8", "-1", "", "1.5", "7x", "99999999999999999999"])
def test_bad_days_is_400_with_a_message(env, path, days):
    status, body, ctype = rh.http_get(env.daemon, f"{path}?days={days}")
    assert status == 400, f"GET {path}?days={days} answered {status} (want 400): {body[:300]}"
    assert "days" in body and "7" in body, f"the 400 should say what days may be (1..7): {body!r}"
    assert len(body) < 500 and "<" not in body, f"the 400 should be a short plain message: {body[:500]!r}"


@pytest.mark.parametrize("query, days", [("days=%33", 3), ("d%61ys=2", 2), ("days=1&other=a&other=b", 1)])
def test_query_parameters_are_percent_decoded(env, query, days):
    """RFC 3986 2.1: %33 is 3, in a name too (d%61ys is days), as a browser or a client library may write them;
    parameters the server does not take are left alone, repeated or not."""
    status, body, _ = rh.http_get(env.daemon, f"/api/v1/report?{query}")
    assert status == 200, f"GET /api/v1/report?{query} answered {status}: {body[:300]}"
    assert json.loads(body)["days"] == days, body[:300]


def test_a_percent_encoded_connector_is_found(env):
    status, body, _ = rh.http_get(env.daemon, "/api/v1/remotes.csv?connector=partner%2dcidr")
    assert status == 200, body[:300]
    rows = list(csv.DictReader(io.StringIO(body)))
    assert rows and {r["connector"] for r in rows} == {"partner-cidr"}, body[:500]
    # A decoded name that is no connector is echoed, its control bytes shown as \xNN.
    status, body, _ = rh.http_get(env.daemon, "/api/v1/remotes.csv?connector=a%1b%5b2J")
    assert status == 404 and 'no connector "a\\x1b[2J"' in body, (status, body)


@pytest.mark.parametrize("path, query, words", [
    ("/api/v1/report", "days=%3", "bad %-escape"),
    ("/api/v1/report", "days=%zz", "bad %-escape"),
    ("/api/v1/report.csv", "x=%g1&days=1", "bad %-escape"),
    ("/api/v1/report", "days=2&days=3", "days is given more than once"),
    ("/", "days=1&d%61ys=1", "days is given more than once"),
    ("/api/v1/connectors", "days=1&days=1", "days is given more than once"),
    ("/api/v1/remotes.csv", "connector=partner-cidr&connector=internet", "connector is given more than once"),
    ("/api/v1/tlsrpt", "date=2026-01-02&date=2026-01-03", "date is given more than once"),
    ("/api/v1/tlsrpt", "domain=a%2", "bad %-escape"),
])
def test_a_bad_escape_or_a_repeated_parameter_is_400(env, path, query, words):
    """days=2&days=3 has no one meaning: it was the report of 3 days (the last won), silently. Counted as a bad
    request (the API's 400s were not counted)."""
    def refused():
        return harness.value(env.daemon.metrics(), "mailflow_http_rejects_total", reason="bad_request")
    before = refused()
    status, body, _ = rh.http_get(env.daemon, f"{path}?{query}")
    assert status == 400 and words in body, f"GET {path}?{query} answered {status}: {body[:300]!r}"
    assert refused() == before + 1


@pytest.mark.parametrize("path, query", [
    ("/api/v1/remotes.txt", ""),
    ("/api/v1/remotes.txt", "days=1"),
    ("/api/v1/remotes.txt", "connector="),
    ("/api/v1/remotes.csv", "connector"),
    ("/api/v1/report", "connector="),
    ("/api/v1/report.txt", "days=1&connector="),
    ("/", "connector="),
    ("/api/v1/connectors", "connector="),
])
def test_a_missing_or_empty_connector_is_400(env, path, query):
    """remotes.txt is one connector's servers: without ?connector= (as with an empty one) it answered 404 'no
    connector ""', as if the report lacked a connector of that name, where every other bad query value gets 400
    with its reason; "" is no connector name a configuration can have. Counted as a bad request."""
    def refused():
        return harness.value(env.daemon.metrics(), "mailflow_http_rejects_total", reason="bad_request")
    before = refused()
    status, body, _ = rh.http_get(env.daemon, f"{path}?{query}" if query else path)
    assert status == 400 and "needs connector=NAME" in body, f"GET {path}?{query} answered {status}: {body[:300]!r}"
    assert len(body) < 500 and "<" not in body, body[:500]
    assert refused() == before + 1


def test_every_row_with_messages_adds_up_to_100_percent(env):
    """The five percentages of a row are rounded together (largest remainder), not each on its own: partner-cidr's
    2/7, 1/7, 1/7, 3/7 rounded one by one are 28.6 + 14.3 + 14.3 + 42.9 = 100.1. In the JSON rows, the
    connectors, the servers behind them, and both CSVs."""
    def tenths(values):
        return sum(round(float(x) * 10) for x in values)

    report = rh.report_json(env.daemon)
    rows = [r for r in report["rows"] + report["connectors"] if r["messages"]]
    rows += [s for c in report["connectors"] for s in c["remotes"]["rows"] if s["messages"]]
    assert any(r.get("connector") == "partner-cidr" for r in rows)
    for row in rows:
        assert tenths(row["percent"].values()) == 1000, row
    for path, columns in (("/api/v1/report.csv", ("none_pct", "tls10_pct", "tls11_pct", "tls12_pct", "tls13_pct")),
                          ("/api/v1/remotes.csv", ("none_pct", "tls10_pct", "tls11_pct", "tls12_pct", "tls13_pct"))):
        status, body, _ = rh.http_get(env.daemon, path)
        assert status == 200, (path, body)
        for row in csv.DictReader(io.StringIO(body)):
            if row["messages"] != "0":
                assert tenths(row[c] for c in columns) == 1000, (path, row)


def test_csv_header_and_numbers(env):
    status, body, ctype = rh.http_get(env.daemon, "/api/v1/report.csv")
    assert status == 200 and ctype.startswith("text/csv"), f"{status} {ctype}"
    report = rh.report_json(env.daemon)
    today = env.day
    assert body.splitlines()[0] == rh.CSV_HEADER
    rows = rh.parse_csv(body)
    assert len(rows) == len(report["rows"]), f"CSV has {len(rows)} rows, JSON {len(report['rows'])}"
    today_rows = {(r["connector"], r["direction"]): r for r in rows if r["date"] == today}
    assert set(today_rows) == set(env.counts)
    for key, counts in env.counts.items():
        r = today_rows[key]
        ctype_, forced, _ = rh.META[key]
        pct = rh.expected_percent(counts)
        want = {"date": today, "connector": key[0], "direction": key[1], "type": ctype_,
                "forced_tls": "true" if forced else "false", "messages": str(sum(counts.values())),
                "none_pct": f"{pct['none']:.1f}", "tls10_pct": f"{pct['TLS1.0']:.1f}",
                "tls11_pct": f"{pct['TLS1.1']:.1f}", "tls12_pct": f"{pct['TLS1.2']:.1f}",
                "tls13_pct": f"{pct['TLS1.3']:.1f}", "configured": "true"}
        want.update({rh.CSV_COUNT_COLUMNS[v]: str(counts[v]) for v in rh.VERSIONS})
        assert dict(r) == want, f"CSV row for {key}:\n  got  {dict(r)}\n  want {want}"


def test_cli_json(env):
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--format", "json")
    assert res.returncode == 0, f"mailflowd report --format json exited {res.returncode}: {res.stderr}"
    report = json.loads(res.stdout)
    rh.assert_report_matches(report, env.counts, env.day)
    assert res.stderr == "", f"stderr on success: {res.stderr!r}"


def test_cli_csv(env):
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--format", "csv", "--days", "2")
    assert res.returncode == 0, f"mailflowd report --format csv exited {res.returncode}: {res.stderr}"
    _, body, _ = rh.http_get(env.daemon, "/api/v1/report.csv?days=2")
    assert res.stdout == body, f"CLI CSV differs from /api/v1/report.csv:\n{res.stdout}\n---\n{body}"
    rows = rh.parse_csv(res.stdout)
    assert {r["date"] for r in rows} == set(rh.report_days(rh.report_json(env.daemon, "?days=2"), env.day)), \
        "days before the first message were printed"
    assert {(r["connector"], r["direction"]) for r in rows if r["messages"] != "0"} == \
        {k for k, c in env.counts.items() if sum(c.values())}


def test_cli_table(env):
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--format", "table", "--days", "2")
    assert res.returncode == 0, f"mailflowd report --format table exited {res.returncode}: {res.stderr}"
    lines = res.stdout.splitlines()
    header = next((ln for ln in lines if ln.split()[:1] == ["DATE"]), "")
    assert header.split() == ["DATE", "CONNECTOR", "DIRECTION", "TYPE", "FORCED_TLS", "MESSAGES",
                              "NONE", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"], header
    # The days (exact counts and percentages per version) and the whole-window summary above them agree with
    # the plan: all of it was sent on env.day (a midnight since then adds the new day's zero lines).
    for first, fixed in (("DATE", 6), ("CONNECTOR", 5)):
        got = rh.table_section(res.stdout, first, env.day if first == "DATE" else None)
        assert set(got) == set(env.counts), f"{first} table rows: {sorted(got)}"
        for key, counts in env.counts.items():
            ctype, forced, _ = rh.META[key]
            pct = rh.expected_percent(counts)
            total = sum(counts.values())
            want = [key[0], key[1], ctype, "yes" if forced else "no", f"{total:,}"] + \
                [(f"{counts[v]:,}", f"{pct[v]:.1f}") if total else ("0", None) for v in rh.VERSIONS]
            assert got[key][fixed - 5:] == want, f"{first} table row for {key}:\n  got  {got[key]}\n  want {want}"
    for insight in rh.expected_insights(env.counts):
        assert f"  - {insight['text']}" in [rh.split_offender(ln) for ln in lines], \
            f"insight {insight['text']!r} not in the table output"


def test_readme_example_has_the_shape_of_the_real_table(env):
    """README.md shows `mailflowd report --days 1`: its headings, column headers and the lines around them are
    those the command prints (data rows, times and versions aside)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("$ mailflowd report --days 1\n", 1)[1].split("```", 1)[0]
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--days", "1")
    assert res.returncode == 0, res.stderr

    def shape(text):
        out = []
        for ln in text.splitlines():
            words = ln.split()
            if not words or words[0] in ("mailflowd", "-", "partner-contoso", "internet") or \
                    re.match(r"\d{4}-\d\d-\d\d$|[a-z]+-[a-z]+$", words[0]):
                continue  # the daemon line, data rows, insights
            ln = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", ln)
            out.append(" ".join(re.sub(r"[\d.,]+%?", "N", w) for w in ln.split()))
        return out

    real = iter(shape(res.stdout))  # this daemon has more connectors and an outbound direction too
    missing = [ln for ln in shape(example) if not any(ln == r for r in real)]
    assert not missing, f"README lines the command does not print: {missing}\nmailflowd report --days 1:\n{res.stdout}"


def test_cli_default_format_is_table(env):
    res = rh.run_cli(env.bin, "--url", env.daemon.http)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^DATE\s+CONNECTOR\s+DIRECTION", res.stdout, re.M), res.stdout


def test_cli_daemon_down(env):
    port = harness.free_port()  # nothing listens there
    res = rh.run_cli(env.bin, "--url", f"http://127.0.0.1:{port}", "--format", "json")
    assert res.returncode == 1, f"exit code {res.returncode} (want 1)"
    assert res.stdout == "", f"nothing on stdout when the daemon is down: {res.stdout!r}"
    assert f"127.0.0.1:{port}" in res.stderr and "cannot connect" in res.stderr.lower(), \
        f"the message should say it cannot connect, and where: {res.stderr!r}"
    assert "mailflowd running" in res.stderr, f"the message should hint at a stopped daemon: {res.stderr!r}"
    assert len(res.stderr.splitlines()) <= 3, f"a clear message, not a dump: {res.stderr!r}"


def test_cli_days_beyond_window(env):
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--days", "8")
    assert res.returncode == 1, f"exit code {res.returncode} (want 1)"
    assert "400" in res.stderr and "days must be" in res.stderr, res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args", [["--days", "abc"], ["--days", "0"], ["--format", "xml"], ["--bogus"],
                                  ["--summary", "--days", "3"], ["--connector", "partner contoso"],
                                  ["--connector", "Partner"]])
def test_cli_usage_errors(env, args):
    res = rh.run_cli(env.bin, "--url", env.daemon.http, *args)
    assert res.returncode == 2, f"{args}: exit code {res.returncode} (want 2, a usage error)"
    assert "usage:" in res.stderr and res.stdout == "", res.stderr


def test_metrics_agree_with_report(env):
    m = env.daemon.metrics()
    report = rh.report_json(env.daemon)
    active = {(i["connector"], i["direction"], i["insight"]) for i in report["insights"]}
    for (connector, direction), counts in env.counts.items():
        total = sum(counts.values())
        for v in rh.VERSIONS:
            key = ("mailflow_window_messages",
                   frozenset({"connector": connector, "direction": direction, "tls_version": v}.items()))
            assert m.get(key) == counts[v], f"{key[0]}{dict(key[1])} = {m.get(key)}, want {counts[v]}"
            key = ("mailflow_window_tls_share", key[1])
            want = counts[v] / total if total else 0.0
            assert key in m and abs(m[key] - want) < 1e-9, f"{key[0]}{dict(key[1])} = {m.get(key)}, want {want}"
        for insight in ("significant_tls10", "significant_no_tls"):
            key = ("mailflow_insight_active",
                   frozenset({"connector": connector, "direction": direction, "insight": insight}.items()))
            want = 1.0 if (connector, direction, insight) in active else 0.0
            assert m.get(key) == want, f"{key[0]}{dict(key[1])} = {m.get(key)}, want {want} (report insights: " \
                                       f"{sorted(active)})"
    assert len(active) == 3


def test_whole_window_summary_in_json_csv_and_cli(env):
    """Per connector, the whole window's exact messages per TLS version (as the page's bars show them), and the
    inbound/outbound "protected in transit" totals: in /api/v1/report, /api/v1/connectors(.csv) and
    `mailflowd report --summary`."""
    report = rh.report_json(env.daemon)
    summary = {(c["connector"], c["direction"]): c for c in report["connectors"]}
    assert set(summary) == set(env.counts), sorted(summary)
    for key, counts in env.counts.items():
        c = summary[key]
        assert c["counts"] == counts and c["messages"] == sum(counts.values()), (key, c)
        assert c["percent"] == rh.expected_percent(counts) and c["configured"] is True, (key, c)
    for transit in report["in_transit"]:
        mine = [counts for (_, d), counts in env.counts.items() if d == transit["direction"]]
        total = sum(sum(c.values()) for c in mine)
        tls = total - sum(c["none"] for c in mine)
        modern = sum(c["TLS1.2"] + c["TLS1.3"] for c in mine)
        assert (transit["messages"], transit["tls"], transit["tls12_plus"]) == (total, tls, modern), transit
        assert abs(transit["tls_share"] - tls / total) < 1e-12, transit
    assert [t["direction"] for t in report["in_transit"]] == ["inbound", "outbound"]

    status, body, ctype = rh.http_get(env.daemon, "/api/v1/connectors.csv")
    assert status == 200 and ctype.startswith("text/csv"), (status, ctype)
    rows = {(r["connector"], r["direction"]): r for r in rh.csv.DictReader(rh.io.StringIO(body))}
    assert set(rows) == set(env.counts)
    for key, counts in env.counts.items():
        assert [int(rows[key][rh.CSV_COUNT_COLUMNS[v]]) for v in rh.VERSIONS] == [counts[v] for v in rh.VERSIONS]
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--summary", "--format", "csv")
    assert res.returncode == 0 and res.stdout == body, f"CLI --summary CSV differs:\n{res.stdout}\n---\n{body}"
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--summary", "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["connectors"] == report["connectors"]
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--summary")
    assert res.returncode == 0, res.stderr
    assert set(rh.table_section(res.stdout, "CONNECTOR")) == set(env.counts)
    assert "DATE" not in res.stdout.split()
    assert "Inbound protected in transit:" in res.stdout


def test_cli_table_and_page_sort_days_the_same_way(env, tmp_path, utc_day):
    """Newest day first in the table, the page and the JSON: with history from yesterday (a state file, as a
    restart finds it) today's rows come first everywhere."""
    import datetime as dt
    import signal
    state = tmp_path / "two-days-state"
    state.mkdir()
    hour = int(rh.utc_now().timestamp()) // 3600  # on utc_day: yesterday's hour is on the day before
    (state / "windows.state").write_text(f"mailflowd-windows 1\n{hour - 24} partner-cidr inbound 0 0 0 5 0\n")
    cfg = json.loads(json.dumps(env.daemon.config))
    cfg["state_dir"] = str(state)
    cfg["http"]["address"] = f"127.0.0.1:{harness.free_port()}"
    for lst in cfg["listeners"]:
        lst["address"] = f"127.0.0.1:{harness.free_port()}"
    d = harness.Daemon(env.daemon.binary, tmp_path, cfg, name="two-days").start()
    try:
        report = rh.report_json(d)
        today = report["generated_at"][:10]
        assert today == utc_day, f"the test ran from {utc_day} into {today}"
        dates = [r["date"] for r in report["rows"]]
        yesterday = (dt.date.fromisoformat(today) - dt.timedelta(days=1)).isoformat()
        assert dates[0] == today and dates[-1] == yesterday and sorted(dates, reverse=True) == dates, dates
        table = rh.run_cli(env.bin, "--url", d.http).stdout
        table_dates = [ln.split()[0] for ln in table.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", ln)]
        assert table_dates and table_dates[0] == today and table_dates[-1] == yesterday, table
        _, page, _ = rh.http_get(d, "/")
        daily = page[page.index('id="daily"'):]
        assert daily.index(f"<td>{yesterday}</td>") > daily.find(f"{today}"), "page: the newest day is not first"
        assert f"{yesterday}</td><td>partner-cidr" in daily
    finally:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        harness.LIVE.remove(d)


def test_reload_that_renames_a_connector_leaves_no_ghost(certs, sink_factory, daemon_factory, mailflowd_bin, utc_day):
    """SIGHUP with legacy-domain renamed: its insight and window gauges disappear from /metrics (its counters
    stay), its history stays in the report marked configured=false (page: "removed from config") without an
    insight, and the new name starts at zero."""
    import signal
    sink = sink_factory("ghost-store")
    listeners, upstreams, connectors, extra = rh.build_env_config(certs, sink.port, harness.free_port(),
                                                                  harness.free_port())
    d = daemon_factory(listeners, upstreams, connectors, name="ghost", **extra)
    plan = [p for p in rh.PLAN if p[0] == "legacy-domain"]  # 2 TLS1.0 + 1 TLS1.2: significant_tls10
    rh.send_plan(d, sink, plan)
    m = d.metrics()
    assert harness.value(m, "mailflow_insight_active", connector="legacy-domain", insight="significant_tls10") == 1

    d.config["connectors"] = [dict(c, name="legacy-domain-v2") if c["name"] == "legacy-domain" else c
                              for c in d.config["connectors"]]
    d.config_path.write_text(json.dumps(d.config, indent=2) + "\n")
    base = harness.value(m, "mailflow_config_reloads_total", result="success")
    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(d.metrics(), "mailflow_config_reloads_total", result="success") > base,
                     10, what="the reload")

    m = d.metrics()
    for family in ("mailflow_insight_active", "mailflow_window_messages", "mailflow_window_tls_share",
                   "mailflow_alert_threshold", "mailflow_connector_info"):
        assert not harness.series(m, family, connector="legacy-domain"), f"{family} still has legacy-domain"
    assert harness.series(m, "mailflow_insight_active", connector="legacy-domain-v2", insight="significant_tls10")
    assert harness.value(m, "mailflow_messages_total", connector="legacy-domain") == 3  # counters never go back

    report = rh.report_json(d)
    old = rh.rows_of(report, utc_day)[("legacy-domain", "inbound")]
    assert old["configured"] is False and old["counts"]["TLS1.0"] == 2, old
    assert old["type"] == "internet", old  # its config is gone: documented, and marked as removed
    new = rh.rows_of(report, utc_day)[("legacy-domain-v2", "inbound")]
    assert new["configured"] is True and new["type"] == "onpremises" and new["messages"] == 0, new
    assert not [i for i in report["insights"] if i["connector"].startswith("legacy-domain")], report["insights"]
    _, page, _ = rh.http_get(d, "/")
    assert "legacy-domain" in page and "removed from config" in page
    table = rh.run_cli(mailflowd_bin, "--url", d.http, "--days", "1").stdout
    assert rh.table_section(table, "DATE")[("legacy-domain", "inbound")][3] == "removed", table
