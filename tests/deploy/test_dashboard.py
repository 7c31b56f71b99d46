"""The Grafana dashboard's PromQL, run through a real Prometheus.

Prometheus scrapes a static file server (python -m http.server) that serves metrics text in mailflowd's
format (sample_metrics.py), so this test does not need the daemon. Every panel query, with the dashboard
variables substituted, must be accepted by Prometheus AND return data; every variable's label_values()
must find values. The shipped rules are loaded too and must evaluate without errors.
"""
import json
import os
import re
import subprocess
import threading
import time

import pytest
import yaml

import deploylib as d
import sample_metrics


@pytest.fixture
def procs(tmp_path):
    p = d.Procs(tmp_path)
    yield p
    p.stop_all()


def serve_sample_metrics(procs, tmp_path):
    """Static file server for tmp/www/metrics; a thread rewrites the file (atomically) so counters grow."""
    www = tmp_path / "www"
    www.mkdir()
    stop = threading.Event()
    start = time.time()

    def writer():
        while not stop.is_set():
            tmp = www / ".metrics.tmp"
            tmp.write_text(sample_metrics.render(time.time() - start))
            os.replace(tmp, www / "metrics")
            stop.wait(0.5)

    (www / "metrics").write_text(sample_metrics.render(0))
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    port = d.free_port()
    procs.start("http.server", [d.PYTHON, "-m", "http.server", "--bind", "127.0.0.1", "--directory", www, port])
    d.wait_for(lambda: d.http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200, 10, what="http.server")
    return port, stop


def test_dashboard_structure():
    dash = d.load_dashboard()
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[:3] == ["datasource", "connector", "direction"], names
    panels = d.all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    titles = {p["title"] for p in panels}
    for wanted in ("TLS share per connector", "Window per connector", "Volume by TLS version", "Active insights",
                   "TLS handshake failures by reason", "Upstream errors", "Active sessions"):
        assert wanted in titles, f"panel {wanted!r} missing; have {sorted(titles)}"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            # connector-level panels must honour the connector/direction variables
            if "mailflow_window_messages" in t["expr"] or "mailflow_messages_total" in t["expr"]:
                assert '$connector' in t["expr"] and '$direction' in t["expr"], (p["title"], t["expr"])
    queries = d.dashboard_queries(dash)
    assert len(queries) >= 12, queries
    for _, _, expr in queries:
        assert "$" not in expr, f"unsubstituted variable in {expr}"


def test_certificate_panel_turns_red_where_the_alert_fires():
    """MailflowCertificateExpiring alerts on every served certificate (per relay, listener and file) that expires
    within the rule's days; the dashboard shows those days left per relay, listener and file, and its red starts
    at the rule's threshold, not at a number of its own."""
    rules = yaml.safe_load(d.RULES.read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "MailflowCertificateExpiring"]
    m = re.fullmatch(r"\s*mailflow_certificate_expiry_timestamp_seconds - time\(\) < (\d+) \* 86400\s*", rule["expr"])
    assert m, rule["expr"]
    alert_days = int(m.group(1))
    panels = [p for p in d.all_panels(d.load_dashboard())
              if any("mailflow_certificate_expiry_timestamp_seconds" in t["expr"] for t in p.get("targets", []))]
    assert [p["title"] for p in panels] == ["Certificate expiry"], [p["title"] for p in panels]
    (panel,) = panels
    (target,) = panel["targets"]
    assert re.search(r"by \(instance, listener, certificate\)", target["expr"]), target["expr"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "d", panel["fieldConfig"]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[0] == {"color": "red", "value": None}, steps
    assert steps[1]["value"] == alert_days and steps[1]["color"] != "red", steps


def test_every_dashboard_query_returns_data(procs, tmp_path):
    port, stop = serve_sample_metrics(procs, tmp_path)
    try:
        prom = d.Prometheus(procs, tmp_path, {"mailflowd": [f"127.0.0.1:{port}"]}, rule_files=[d.RULES])
        d.wait_for(lambda: prom.targets_up("mailflowd", 1), 20, what="sample target scraped")
        # rate() over $__rate_interval (10s here) needs a few samples
        d.wait_for(lambda: prom.query("count_over_time(up{job='mailflowd'}[1m]) >= 8"), 30,
                   what="8 scrapes of the sample target")
        problems = d.check_dashboard_queries(prom, d.load_dashboard())
        assert not problems, "dashboard queries that fail or return nothing:\n" + "\n".join(problems)

        # Values a user would read off the dashboard: partner-contoso's TLS1.0 share is 128/1024.
        share = prom.scalar('sum(mailflow_window_messages{connector="partner-contoso",tls_version="TLS1.0"}) '
                            '/ sum(mailflow_window_messages{connector="partner-contoso"})')
        assert share == pytest.approx(0.125)
        # A connector variable narrows the panels to that connector.
        dash = d.load_dashboard()
        narrowed = dict((title, expr) for title, _, expr in d.dashboard_queries(
            dash, {"connector": "onprem", "direction": ".*"}))
        result = prom.query(narrowed["Window per connector"])
        assert {r["metric"]["connector"] for r in result} == {"onprem"}, result
        # Days left per relay, listener and file, as the certificate panel shows them.
        days_left = {(r["metric"]["listener"], r["metric"]["certificate"]): float(r["value"][1])
                     for r in prom.query(narrowed["Certificate expiry"])}
        assert days_left == {key: pytest.approx(days, abs=0.01)
                             for key, days in sample_metrics.CERTIFICATE_DAYS_LEFT.items()}, days_left

        # The shipped rules load and evaluate cleanly on this data ...
        def rules_evaluated():
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) >= 12 and all(r.get("lastEvaluation", "").startswith("20") for r in rules) and rules
        rules = d.wait_for(rules_evaluated, 20, what="every rule evaluated once")
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, f"rules with errors: {bad}"
        # ... and the TLS1.0 alert is pending (for: 30m) for exactly partner-contoso.
        def pending():
            return [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "MailflowSignificantTLS10"]
        alerts = d.wait_for(pending, 20, what="MailflowSignificantTLS10 pending")
        assert [(a["labels"]["connector"], a["state"]) for a in alerts] == [("partner-contoso", "pending")], alerts
        assert "12.5% of 1024 messages" in alerts[0]["annotations"]["summary"], alerts[0]["annotations"]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
    finally:
        stop.set()


def test_reload_annotation_marks_reloads_not_restarts(tmp_path):
    """The "Config reloads" annotation on a relay scraped every 30s (as the shipped configs do) that is
    reloaded once and restarted later: the reload is marked, the restart is not (a restart sets
    mailflow_config_reloads_total back to 0, and that is no reload). promtool evaluates the dashboard's own
    expression, $__rate_interval as Grafana makes it for a 30s scrape; "* 0 + 1" only fixes the value."""
    dash = d.load_dashboard()
    (annotation,) = [a for a in dash["annotations"]["list"] if a["name"] == "Config reloads"]
    expr = "(" + d.substitute(annotation["expr"], dash, {"__rate_interval": "2m"}) + ") * 0 + 1"
    marked = [{"labels": '{instance="r1",job="mailflowd",result="success"}', "value": 1}]
    test = {
        "rule_files": [],
        "evaluation_interval": "30s",
        "tests": [{
            "interval": "30s",
            "input_series": [
                # reloaded at 3m (0 -> 1); restarted at 10m: two scrapes missed, then the new process's 0
                {"series": 'mailflow_config_reloads_total{instance="r1",job="mailflowd",result="success"}',
                 "values": "0x5 1x13 _x2 0x20"},
                {"series": 'mailflow_config_reloads_total{instance="r1",job="mailflowd",result="failure"}',
                 "values": "0x5 0x13 _x2 0x20"},
            ],
            "promql_expr_test": [
                {"expr": expr, "eval_time": "2m", "exp_samples": []},
                {"expr": expr, "eval_time": "4m", "exp_samples": marked},
                {"expr": expr, "eval_time": "8m", "exp_samples": []},
                {"expr": expr, "eval_time": "11m", "exp_samples": []},
                {"expr": expr, "eval_time": "12m", "exp_samples": []},
            ],
        }],
    }
    path = tmp_path / "annotation.test.yml"
    path.write_text(json.dumps(test))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{annotation['expr']}\n{result.stdout}{result.stderr}"


def shipped_scrape_interval():
    """The scrape interval of the shipped Prometheus config (the ServiceMonitor's must be the same)."""
    prom = yaml.safe_load((d.REPO / "deploy" / "prometheus" / "examples" / "prometheus.example.yml").read_text())
    (monitor,) = [doc for doc in yaml.safe_load_all((d.REPO / "deploy" / "kubernetes" / "servicemonitor.yaml")
                                                     .read_text()) if doc and doc.get("kind") == "ServiceMonitor"]
    assert {e["interval"] for e in monitor["spec"]["endpoints"]} == {prom["global"]["scrape_interval"]}
    return d.seconds(prom["global"]["scrape_interval"])


def test_rate_panels_bridge_a_missed_scrape_at_the_shipped_scrape_interval(tmp_path):
    """Grafana makes $__rate_interval max($__interval + S, 4 * S), S being the query's Min step or else the data
    source's scrape interval setting, 15s unless someone changed it. The shipped configs scrape every 30s, so
    without a Min step a short range gets 1m: two scrapes, and one missed scrape leaves a gap in every rate panel.
    Every query (and annotation) with $__rate_interval must come to at least 4 scrapes by itself, and promtool
    shows what that window gives on a relay scraped every 30s with one scrape missed: a value at every step."""
    scrape = shipped_scrape_interval()
    dash = d.load_dashboard()
    queries = [(p["title"], t) for p in d.all_panels(dash) for t in p.get("targets", [])]
    queries += [(a["name"], {**a, "interval": a.get("step")}) for a in dash["annotations"]["list"] if "expr" in a]
    windows = {}
    for title, target in queries:
        if "$__rate_interval" in target["expr"]:
            windows[title] = d.grafana_rate_interval(target.get("interval"))
    assert len(windows) >= 7, windows
    short = {title: w for title, w in windows.items() if w < 4 * scrape}
    assert not short, f"$__rate_interval below 4 scrapes of {scrape}s (seconds per query): {short}"

    window = min(windows.values())
    step = f"{scrape}s"
    expr = f"(rate(c[{window}s]) > 0) * 0 + 1"  # present or not: "* 0 + 1" only fixes the value
    test = {"rule_files": [], "evaluation_interval": step, "tests": [{
        "interval": step,
        # 1 a scrape, the 6th scrape missed
        "input_series": [{"series": 'c{job="mailflowd"}', "values": "0 1 2 3 4 _ 6 7 8 9 10 11 12 13 14 15"}],
        # Grafana's steps fall between scrapes: every half-way point once the window is full
        "promql_expr_test": [{"expr": expr, "eval_time": f"{n * scrape + scrape // 2}s",
                              "exp_samples": [{"labels": '{job="mailflowd"}', "value": 1}]}
                             for n in range(window // scrape, 14)],
    }]}
    path = tmp_path / "rate.test.yml"
    path.write_text(json.dumps(test))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{expr}\n{result.stdout}{result.stderr}"


def test_scaling_md_federation_serves_its_90_day_query(procs, tmp_path):
    """docs/scaling.md's federation setup, as written: a site Prometheus with the shipped rules scrapes a
    relay, a central one federates from it with the documented match[], and the documented 90-day query
    must find its series on the central server."""
    text = (d.REPO / "docs" / "scaling.md").read_text()
    (federation,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "/federate" in b]
    (query,) = re.findall(r"```promql\n(.*?)```", text, re.S)
    query = "\n".join(line for line in query.splitlines() if not line.lstrip().startswith("#"))
    port, stop = serve_sample_metrics(procs, tmp_path)
    try:
        site = d.Prometheus(procs, tmp_path, {"mailflowd": [f"127.0.0.1:{port}"]}, rule_files=[d.RULES],
                            name="prometheus-site", external_labels={"site": "a"})
        (job,) = yaml.safe_load(federation)["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{site.port}"]}]
        central = d.Prometheus(procs, tmp_path, {}, name="prometheus-central", scrape_configs=[job])
        d.wait_for(lambda: central.query('count_over_time(mailflow_fleet:window_messages_all:sum[1m]) >= 3'), 30,
                   what="3 federation scrapes of the fleet series on the central server")
        assert central.query(query), f"central Prometheus has nothing for scaling.md's query:\n{query}\n" \
            f"federated with:\n{federation}"
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
    finally:
        stop.set()
