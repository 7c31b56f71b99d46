"""The report of a daemon that has relayed nothing yet, or nothing in one direction: no direction is said to be
"0.0% with TLS" (no message went without TLS either), in the table as on the page, which says "no messages in
the window"; the JSON and CSV are still valid, with today's zero rows."""
import json
import types

import pytest

import harness
import report_helpers as rh


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    listeners, upstreams, connectors, extra = rh.build_env_config(certs, sink.port, harness.free_port(),
                                                                  harness.free_port())
    daemon = daemon_factory(listeners, upstreams, connectors, name="empty", **extra)
    return types.SimpleNamespace(sink=sink, daemon=daemon)


def transit_lines(text):
    return [ln for ln in text.splitlines() if "protected in transit" in ln]


@pytest.mark.parametrize("args", [(), ("--summary",)])
def test_table_says_no_messages_not_zero_percent(env, mailflowd_bin, args):
    res = rh.run_cli(mailflowd_bin, "--url", env.daemon.http, *args)
    assert res.returncode == 0, res.stderr
    lines = transit_lines(res.stdout)
    assert [ln.split()[0] for ln in lines] == ["Inbound", "Outbound"], res.stdout
    for ln in lines:
        assert "%" not in ln and "no messages in the window" in ln, ln


def test_table_of_an_empty_window_names_no_first_message(env, mailflowd_bin):
    res = rh.run_cli(mailflowd_bin, "--url", env.daemon.http)
    assert res.returncode == 0, res.stderr
    days = next(ln for ln in res.stdout.splitlines() if ln.startswith("Per day"))
    assert days == "Per day, newest first: last 7 days (no messages in the window yet: today only)", days


def test_page_json_and_csv_of_an_empty_window(env):
    status, page = env.daemon.get("/")
    assert status == 200 and page.count("no messages in the window") >= 2
    report = rh.report_json(env.daemon)
    assert {r["date"] for r in report["rows"]} == {report["generated_at"][:10]} and report["insights"] == []
    assert all(t["messages"] == 0 for t in report["in_transit"])
    # No messages is no share: null ("no data"), not 0 (which says that all mail went without TLS).
    for t in report["in_transit"]:
        assert t["tls_share"] is None and t["tls12_plus_share"] is None, t
    status, body, _ = rh.http_get(env.daemon, "/api/v1/connectors")
    assert status == 200 and all(t["tls_share"] is None for t in json.loads(body)["in_transit"]), body
    status, body, _ = rh.http_get(env.daemon, "/api/v1/report.csv")
    assert status == 200 and all(r["messages"] == "0" for r in rh.parse_csv(body))


def test_one_direction_with_mail_the_other_without(env, mailflowd_bin):
    rh.send_plan(env.daemon, env.sink, [("internet", "inbound", "inbound", "127.0.0.1", "a@elsewhere.test",
                                         "TLS1.2", 1)])
    res = rh.run_cli(mailflowd_bin, "--url", env.daemon.http, "--summary")
    assert res.returncode == 0, res.stderr
    inbound, outbound = transit_lines(res.stdout)
    assert "100.0% with TLS, 100.0% with TLS1.2 or later (1 of 1 message)" in inbound, inbound
    assert "%" not in outbound and "no messages in the window" in outbound, outbound
    transit = {t["direction"]: t for t in rh.report_json(env.daemon)["in_transit"]}
    assert (transit["inbound"]["tls_share"], transit["inbound"]["tls12_plus_share"]) == (1.0, 1.0), transit
    assert (transit["outbound"]["tls_share"], transit["outbound"]["tls12_plus_share"]) == (None, None), transit
    # The summary table before it is still read whole.
    assert rh.table_section(res.stdout, "CONNECTOR")[("internet", "inbound")][4] == "1"
