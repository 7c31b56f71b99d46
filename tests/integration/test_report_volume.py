"""The contract's own example, for real: 1,024 messages through partner-contoso (12 without TLS, 128 over
TLS1.0, 820 over TLS1.2, 64 over TLS1.3, several transactions per SMTP session) give the row
{"none": 1.2, "TLS1.0": 12.5, "TLS1.1": 0.0, "TLS1.2": 80.1, "TLS1.3": 6.2} and the insight sentence with a
thousands separator, in JSON, CSV, the table, the HTML page and the window metrics."""
import types

import pytest

import harness
import report_helpers as rh

MIX = {"none": 12, "TLS1.0": 128, "TLS1.2": 820, "TLS1.3": 64}
SENTENCE = ("Inbound partner connector partner-contoso is seeing significant TLS1.0 mail flow: "
            "12.5% of 1,024 messages in the last 7 days")
PERCENT = {"none": 1.2, "TLS1.0": 12.5, "TLS1.1": 0.0, "TLS1.2": 80.1, "TLS1.3": 6.2}
PER_SESSION = 100


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory, mailflowd_bin):
    sink = sink_factory("store")
    port = harness.free_port()
    daemon = daemon_factory(
        listeners=[{"name": "inbound", "address": f"127.0.0.1:{port}", "direction": "inbound",
                    "tls": harness.listener_tls(certs), "upstream": "store"}],
        upstreams=[{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
        connectors=[{"name": "partner-contoso", "type": "partner", "direction": "inbound",
                     "match": {"sender_domains": ["contoso.com"]}}],
        # the contract's default thresholds: tls10 5%, no TLS 5%, min_messages 100 (1.2% without TLS: no insight)
        telemetry={"window": "7d", "defaults": {"tls10_share": 0.05, "no_tls_share": 0.05, "min_messages": 100}})
    before = daemon.metrics()
    day = rh.day_clear_of_midnight()  # the day of the 1024 messages, taken before they are sent
    for version, n in MIX.items():
        while n > 0:
            k = min(n, PER_SESSION)
            session(port, version, k)
            n -= k
    sink.wait_messages(1024, timeout=30)
    after = harness.wait_moved(daemon, before, at_least=1024, timeout=10)
    moved = harness.delta(before, after, "mailflow_messages_total")
    want = {harness.series_key(connector="partner-contoso", direction="inbound", tls_version=v): float(n)
            for v, n in MIX.items()}
    assert moved == want, f"mailflow_messages_total moved:\n{harness.fmt_delta(moved)}"
    return types.SimpleNamespace(daemon=daemon, bin=mailflowd_bin, day=day)


def session(port, version, count):
    """`count` transactions in one SMTP session (STARTTLS at `version` unless "none")."""
    c = harness.RawSmtp(port, timeout=20)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.contoso.com")[0] == 250
        if version != "none":
            assert c.cmd("STARTTLS")[0] == 220
            got = c.starttls(version)
            assert got == {"TLS1.0": "TLSv1", "TLS1.2": "TLSv1.2", "TLS1.3": "TLSv1.3"}[version], got
            assert c.cmd("EHLO client.contoso.com")[0] == 250
        for i in range(count):
            # MAIL, RCPT and DATA pipelined (PIPELINING is advertised), then the message and its end.
            c.send(b"MAIL FROM:<bulk@contoso.com>\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n")
            assert [c.reply()[0] for _ in range(3)] == [250, 250, 354], f"transaction {i} at {version}"
            c.send(f"Subject: bulk {version} {i}\r\n\r\nbody\r\n.\r\n".encode())
            code, text = c.reply()
            assert code == 250, f"end of data, transaction {i} at {version}: {code} {text}"
        c.cmd("QUIT")
    finally:
        c.transcript[:] = c.transcript[-40:]  # a failure report needs the tail, not 500 transactions
        c.close()


def test_json_row_and_insight_are_the_contracts_example(env):
    report = rh.report_json(env.daemon)
    row = rh.rows_of(report, env.day)[("partner-contoso", "inbound")]
    assert row["messages"] == 1024 and row["percent"] == PERCENT, row
    assert [rh.split_offender(i["text"]) for i in report["insights"]] == [SENTENCE], report["insights"]
    i = report["insights"][0]
    assert (i["connector"], i["direction"], i["insight"], i["share"], i["messages"], i["threshold"]) == \
        ("partner-contoso", "inbound", "significant_tls10", 0.125, 1024, 0.05), i


def test_csv_table_and_page(env):
    # days=2: the day of the messages is still there after a midnight since the fixture sent them
    _, csv_text, _ = rh.http_get(env.daemon, "/api/v1/report.csv?days=2")
    rows = rh.parse_csv(csv_text)
    contoso = [r for r in rows if r["connector"] == "partner-contoso" and r["date"] == env.day]
    assert len(contoso) == 1 and [contoso[0][k] for k in ("messages", "none_pct", "tls10_pct", "tls11_pct",
                                                          "tls12_pct", "tls13_pct")] == \
        ["1024", "1.2", "12.5", "0.0", "80.1", "6.2"], contoso
    res = rh.run_cli(env.bin, "--url", env.daemon.http, "--days", "2")
    assert res.returncode == 0, res.stderr
    day = rh.table_section(res.stdout, "DATE", env.day)[("partner-contoso", "inbound")]
    assert day[5:] == ["1,024", ("12", "1.2"), ("128", "12.5"), ("0", "0.0"), ("820", "80.1"), ("64", "6.2")], day
    assert [contoso[0][k] for k in ("none_count", "tls10_count", "tls11_count", "tls12_count", "tls13_count")] == \
        ["12", "128", "0", "820", "64"], contoso
    assert f"  - {SENTENCE}" in [rh.split_offender(ln) for ln in res.stdout.splitlines()]
    _, page, _ = rh.http_get(env.daemon, "/")
    assert SENTENCE in page and "1,024" in page


def test_window_metrics(env):
    m = env.daemon.metrics()
    for v in rh.VERSIONS:
        labels = {"connector": "partner-contoso", "direction": "inbound", "tls_version": v}
        assert harness.value(m, "mailflow_window_messages", **labels) == MIX.get(v, 0), v
        assert abs(harness.value(m, "mailflow_window_tls_share", **labels) - MIX.get(v, 0) / 1024) < 1e-12, v
    assert harness.value(m, "mailflow_insight_active", connector="partner-contoso", insight="significant_tls10") == 1
    assert harness.value(m, "mailflow_insight_active", connector="partner-contoso", insight="significant_no_tls") == 0
