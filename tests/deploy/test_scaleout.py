"""Scale-out: two mailflowd relays behind HAProxy (send-proxy-v2), Prometheus scraping both.

- the connector chosen by client CIDR is right behind the proxy (client 127.0.0.2 -> partner-contoso,
  client 127.0.0.1 -> internet), because the relays take the address from the PROXY v2 header;
- the fleet recording rules equal the traffic sent in total;
- MailflowSignificantTLS10 fires once for the fleet although each relay on its own is above the threshold.
"""
import time

import pytest

import deploylib as d


@pytest.fixture
def procs(tmp_path):
    p = d.Procs(tmp_path)
    yield p
    p.stop_all()


def start_haproxy(procs, tmp_path, backends):
    port = d.free_port()
    servers = "\n".join(f"  server relay{i} 127.0.0.1:{p} send-proxy-v2" for i, p in enumerate(backends))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend smtp
  bind 127.0.0.1:{port}
  default_backend relays
backend relays
  balance roundrobin
{servers}
""")
    check = d.subprocess.run(["haproxy", "-c", "-f", cfg], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    procs.start("haproxy", ["haproxy", "-db", "-f", cfg])
    d.wait_for(lambda: d._connectable(port), 10, what="haproxy listening")
    return port


def test_two_relays_behind_haproxy_alert_once(procs, tmp_path):
    cert, key = d.self_signed_cert(tmp_path)
    sink_port = d.start_sink(procs, tmp_path)
    connectors = [{"name": "partner-contoso", "type": "partner", "direction": "inbound",
                   "match": {"listener": "inbound", "client_cidrs": ["127.0.0.2/32"]},
                   "alerts": {"min_messages": 3}}]
    relays = []
    for name in ("relay-a", "relay-b"):
        smtp_port, http_port = d.free_port(), d.free_port()
        config = d.mailflowd_config(tmp_path, name, smtp_port, http_port, sink_port, connectors, cert=cert,
                                    key=key, proxy_trusted=["127.0.0.1/32"])
        url = d.start_mailflowd(procs, name, config, http_port)
        relays.append((name, smtp_port, http_port, url))
    lb_port = start_haproxy(procs, tmp_path, [r[1] for r in relays])
    rules = d.rules_with_short_for(tmp_path, "0s")
    prom = d.Prometheus(procs, tmp_path, {"mailflowd": [f"127.0.0.1:{r[2]}" for r in relays]}, rule_files=[rules])
    try:
        d.wait_for(lambda: prom.targets_up("mailflowd", 2), 20, what="both relays scraped")

        # partner traffic from 127.0.0.2: 6 x TLS1.0 then 2 x TLS1.2; round robin gives each relay 3 + 1.
        for _ in range(6):
            d.swaks(lb_port, tls_version="tlsv1", local_interface="127.0.0.2")
        for _ in range(2):
            d.swaks(lb_port, tls_version="tlsv1_2", local_interface="127.0.0.2")
        # internet traffic (not in the partner's CIDR) from 127.0.0.1, plain text.
        for _ in range(2):
            d.swaks(lb_port, local_interface="127.0.0.1", sender="someone@elsewhere.test")

        per_relay = {name: d.scrape(url) for name, _, _, url in relays}
        for name, text in per_relay.items():
            # each relay alone is above the threshold: a per-instance rule would alert twice
            tls10 = d.metric_value(text, "mailflow_window_messages", connector="partner-contoso", tls_version="TLS1.0")
            assert tls10 >= 3, f"{name} saw {tls10} TLS1.0 partner messages; haproxy did not spread the load"
        total = {v: sum(d.metric_value(t, "mailflow_window_messages", connector="partner-contoso", tls_version=v)
                        for t in per_relay.values()) for v in d.TLS_VERSIONS}
        assert total == {"none": 0, "TLS1.0": 6, "TLS1.1": 0, "TLS1.2": 2, "TLS1.3": 0}, total
        internet = {v: sum(d.metric_value(t, "mailflow_window_messages", connector="internet", tls_version=v)
                           for t in per_relay.values()) for v in d.TLS_VERSIONS}
        assert internet["none"] == 2 and sum(internet.values()) == 2, internet

        # The fleet recording rules equal what was sent.
        # Wait until Prometheus has scraped both relays after the last message (the internet mails came last).
        def fleet_ready():
            return (prom.query('mailflow_fleet:window_messages_all:sum{connector="partner-contoso"} == 8')
                    and prom.query('mailflow_fleet:window_messages_all:sum{connector="internet"} >= 2'))
        d.wait_for(fleet_ready, 15, what="fleet windows = 8 partner + 2 internet in Prometheus")
        fleet = {r["metric"]["tls_version"]: float(r["value"][1]) for r in
                 prom.query('mailflow_fleet:window_messages:sum{connector="partner-contoso"}')}
        assert fleet == {"none": 0, "TLS1.0": 6, "TLS1.1": 0, "TLS1.2": 2, "TLS1.3": 0}, fleet
        assert prom.scalar('mailflow_fleet:window_tls_share:ratio{connector="partner-contoso",tls_version="TLS1.0"}') \
            == pytest.approx(0.75)
        assert prom.scalar('mailflow_fleet:window_messages_all:sum{connector="internet"}') == 2
        # per instance both shares are above 5%: two series a naive rule would turn into two alerts
        assert len(prom.query('mailflow_window_tls_share{connector="partner-contoso",tls_version="TLS1.0"} > 0.05')) == 2

        alerts = d.wait_for(lambda: prom.firing("MailflowSignificantTLS10"), 15, what="MailflowSignificantTLS10")
        time.sleep(4)  # several more evaluations: still exactly one
        alerts = prom.firing("MailflowSignificantTLS10")
        assert len(alerts) == 1, alerts
        assert alerts[0]["labels"]["connector"] == "partner-contoso", alerts
        assert "instance" not in alerts[0]["labels"], alerts
        assert "75% of 8 messages" in alerts[0]["annotations"]["summary"], alerts[0]["annotations"]
        procs.check_alive()
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
