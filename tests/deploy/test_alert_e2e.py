"""End to end: mailflowd -> Prometheus (shipped rules, only `for:` shortened) -> Alertmanager -> webhook.

TLS1.0 mail through a partner connector above its threshold (min_messages 3) must reach the webhook as
MailflowSignificantTLS10 with that connector's label; traffic below min_messages, and a clean connector,
must not. The dashboard's queries must work against this Prometheus too.
"""
import time

import pytest

import deploylib as d


@pytest.fixture
def procs(tmp_path):
    p = d.Procs(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture
def webhook():
    w = d.Webhook()
    yield w
    w.close()


def tls10_alerts(webhook):
    return [a for a in webhook.alerts() if a["labels"].get("alertname") == "MailflowSignificantTLS10"]


def test_significant_tls10_reaches_alertmanager(procs, webhook, tmp_path):
    cert, key = d.self_signed_cert(tmp_path)
    sink_port = d.start_sink(procs, tmp_path)
    smtp_port, http_port, dead_port = d.free_port(), d.free_port(), d.free_port()
    connectors = [
        {"name": "partner-contoso", "type": "partner", "direction": "inbound",
         "match": {"listener": "inbound", "sender_domains": ["contoso.com"]}, "alerts": {"min_messages": 3}},
        {"name": "partner-fabrikam", "type": "partner", "direction": "inbound",
         "match": {"listener": "inbound", "sender_domains": ["fabrikam.com"]}, "alerts": {"min_messages": 3}},
        {"name": "partner-broken", "type": "partner", "direction": "inbound",
         "match": {"listener": "inbound", "sender_domains": ["broken.example"]}, "upstream": "dead"},
        # An outbound connector: the outbound-policy panels have its (zero) series to show.
        {"name": "partner-outbound", "type": "partner", "direction": "outbound",
         "match": {"recipient_domains": ["fabrikam.com"]}},
    ]
    config = d.mailflowd_config(tmp_path, "mailflowd", smtp_port, http_port, sink_port, connectors, cert=cert,
                                key=key, extra_upstreams=[{"name": "dead", "address": f"127.0.0.1:{dead_port}",
                                                           "tls": "none"}])
    url = d.start_mailflowd(procs, "mailflowd", config, http_port)
    am = d.Alertmanager(procs, tmp_path, webhook.url)
    rules = d.rules_with_short_for(tmp_path, "0s")
    prom = d.Prometheus(procs, tmp_path, {"mailflowd": [f"127.0.0.1:{http_port}"]}, rule_files=[rules],
                        alertmanager=am.host_port())
    try:
        d.wait_for(lambda: prom.targets_up("mailflowd", 1), 20, what="mailflowd scraped")
        # The daemon exports every configured connector's thresholds from the start.
        assert prom.scalar('mailflow_alert_threshold{connector="partner-contoso",kind="min_messages"}') == 3

        # Below min_messages: 2 TLS1.0 messages (100% TLS1.0, but 2 < 3); a clean connector with 3 TLS1.2.
        for _ in range(2):
            d.swaks(smtp_port, tls_version="tlsv1", sender="alice@contoso.com")
        for _ in range(3):
            d.swaks(smtp_port, tls_version="tlsv1_2", sender="bob@fabrikam.com")
        metrics = d.scrape(url)
        assert d.metric_value(metrics, "mailflow_window_messages", connector="partner-contoso",
                              tls_version="TLS1.0") == 2, metrics
        assert d.metric_value(metrics, "mailflow_window_messages", connector="partner-fabrikam",
                              tls_version="TLS1.2") == 3, metrics
        d.wait_for(lambda: prom.query('mailflow_fleet:window_messages_all:sum{connector="partner-contoso"} == 2')
                   and prom.query('mailflow_fleet:window_messages_all:sum{connector="partner-fabrikam"} == 3'),
                   15, what="Prometheus to see the first 5 messages")
        time.sleep(5)  # several evaluations, and longer than Alertmanager's group_wait
        assert prom.firing("MailflowSignificantTLS10") == [], prom.api("alerts")
        assert tls10_alerts(webhook) == [], webhook.payloads

        # The third TLS1.0 message reaches min_messages: 3 of 3 > 5% -> the alert reaches the webhook.
        d.swaks(smtp_port, tls_version="tlsv1", sender="carol@contoso.com")
        alerts = d.wait_for(lambda: tls10_alerts(webhook), 30, what="MailflowSignificantTLS10 at the webhook")
        labels = alerts[0]["labels"]
        assert labels["connector"] == "partner-contoso" and labels["direction"] == "inbound", labels
        assert labels["severity"] == "warning", labels
        assert "100% of 3 messages" in alerts[0]["annotations"]["summary"], alerts[0]["annotations"]
        assert "threshold 5%" in alerts[0]["annotations"]["summary"], alerts[0]["annotations"]
        time.sleep(3)
        assert {a["labels"]["connector"] for a in tls10_alerts(webhook)} == {"partner-contoso"}, webhook.payloads

        # Events the remaining dashboard panels show: an upstream error, a failed handshake, a reject.
        try:
            d.swaks(smtp_port, sender="dave@broken.example")
        except AssertionError as e:
            assert "4" in str(e)  # a temporary error: the upstream is down
        else:
            raise AssertionError("a message to a dead upstream must not be accepted")
        d.smtp_raw(smtp_port, ["EHLO client.test", "STARTTLS", b"\x16\x03\x01\x00\x05garbage-not-a-client-hello"])
        d.smtp_raw(smtp_port, ["MAIL FROM:<x@y.test>", "QUIT"])  # MAIL before EHLO: 503 + rejects_total
        d.wait_for(lambda: prom.query("mailflow_upstream_errors_total > 0")
                   and prom.query("mailflow_tls_handshake_failures_total > 0")
                   and prom.query("mailflow_rejects_total > 0"), 15, what="error counters in Prometheus")
        time.sleep(12)  # a full $__rate_interval (10s) of samples after the events
        problems = d.check_dashboard_queries(prom, d.load_dashboard())
        assert not problems, "dashboard queries against the real daemon:\n" + "\n".join(problems)
        procs.check_alive()
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
