"""The per-connector drill-down (issue #18) and the per-destination-domain report (issue #14 item 6), end to end:
swaks from distinct 127.0.0.x addresses at TLS1.0/1.2/1.3 and without TLS into an inbound partner connector, and
outbound delivery through `mx: true` to MX hosts found in a real DNS server (knotd) that also serves the reverse
zone of those clients (one PTR forward-confirmed, one not, one missing). Checked: the JSON report's `connectors`
rows, /api/v1/remotes.csv and /api/v1/domains.csv, `mailflowd report --connector NAME` and `--domains`, the
insight's top offender, the bounded gauges, and the tables after a restart (state_dir/remotes.state)."""
import csv
import io
import json
import shutil
import socket
import struct
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh
import report_helpers as rh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

CLIENT = {"legacy": "127.0.0.21", "liar": "127.0.0.22", "modern": "127.0.0.23"}
MX = {"tls13": "127.0.0.61", "tls10": "127.0.0.62"}
ZONE = """$ORIGIN example.net.
$TTL 300
@            SOA   ns hostmaster 1 3600 600 86400 300
@            NS    ns
ns           A     127.0.0.1
tls13        MX    10 mx.tls13
mx.tls13     A     {tls13}
tls10        MX    10 mx.tls10
mx.tls10     A     {tls10}
mx1.sender   A     {legacy}
liar         A     127.0.0.99
""".format(**MX, **CLIENT)
# Reverse zone of the clients: .21 forward-confirmed, .22 names a host that does not have its address, .23 none.
REVERSE = """$ORIGIN 0.0.127.in-addr.arpa.
$TTL 300
@            SOA   ns.example.net. hostmaster.example.net. 1 3600 600 86400 300
@            NS    ns.example.net.
21           PTR   mx1.sender.example.net.
22           PTR   liar.example.net.
"""
# (client label, EHLO name, sender, swaks TLS label, messages)
INBOUND = [
    ("legacy", "mx1.sender.example.net", "a@sender.test", "TLS1.0", 3),
    ("liar", "liar.example.net", "b@liar.test", "TLS1.2", 2),
    ("modern", "modern.example.net", "c@modern.test", "TLS1.3", 1),
    ("modern", "modern.example.net", "c@modern.test", "none", 1),
]
OUTBOUND = [("tls13.example.net", 2), ("tls10.example.net", 1)]


@pytest.fixture(scope="module")
def short_dir():
    path = tempfile.mkdtemp(prefix="mf-rem-")  # knotd's control socket path is limited to 107 bytes
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(certs, workdir, short_dir, sink_factory, daemon_factory):
    knot = KnotServer(short_dir, {"example.net": ZONE, "0.0.127.in-addr.arpa": REVERSE}).start()
    try:
        port = harness.free_port(*MX.values())
        tls = {"tls_cert": certs / "sink.pem", "tls_key": certs / "sink.key"}
        sink_factory("mx-tls13", host=MX["tls13"], port=port, **tls)
        sink_factory("mx-tls10", host=MX["tls10"], port=port, tls_max_version="TLS1.0", **tls)
        store = sink_factory("store")
        listeners = [
            {"name": "in", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
             "tls": harness.listener_tls(certs), "upstream": "store"},
            {"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
             "tls": harness.listener_tls(certs), "upstream": "internet"},
        ]
        upstreams = [{"name": "store", "address": f"127.0.0.1:{store.port}", "tls": "none"},
                     {"name": "internet", "mx": True, "port": port, "tls": "opportunistic"}]
        connectors = [{"name": "partner-in", "type": "partner", "direction": "inbound",
                       "match": {"client_cidrs": ["127.0.0.20/30"]}}]
        daemon = daemon_factory(listeners, upstreams, connectors, name="remotes",
                                dns={"servers": [knot.address], "timeout": "2s"},
                                telemetry={"defaults": {"tls10_share": 0.05, "no_tls_share": 0.5,
                                                        "min_messages": 3}})
        before = daemon.metrics()
        total = 0
        for label, ehlo, sender, version, count in INBOUND:
            for _ in range(count):
                r = harness.swaks(daemon.listener_port("in"), sender=sender, data=rh.MESSAGE, local=CLIENT[label],
                                  ehlo=ehlo, tls=rh.SWAKS_TLS[version])
                assert r.rc == 0, str(r)
                total += 1
        for domain, count in OUTBOUND:
            for _ in range(count):
                r = harness.swaks(daemon.listener_port("out"), to=f"rcpt@{domain}", sender="app@corp.example",
                                  data=rh.MESSAGE)
                assert r.rc == 0, str(r)
                total += 1
        harness.wait_moved(daemon, before, at_least=total)
        yield daemon
    finally:
        knot.stop()


def drilldown(report, connector, direction):
    found = [c for c in report["connectors"] if c["connector"] == connector and c["direction"] == direction]
    assert len(found) == 1, f"{connector}/{direction} in {[(c['connector'], c['direction']) for c in report['connectors']]}"
    return found[0]


def wait_verified(daemon, timeout=15.0):
    """The report once the reverse lookups (a background task) have named the legacy client."""
    deadline = time.monotonic() + timeout
    while True:
        report = rh.report_json(daemon)
        rows = {r["address"]: r for r in drilldown(report, "partner-in", "inbound")["remotes"]["rows"]}
        if rows.get(CLIENT["legacy"], {}).get("verified_name") or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def counts(**given):
    return {v: given.get(v.replace(".", ""), 0) for v in rh.VERSIONS}


def check_inbound_rows(report, with_names=True):
    table = drilldown(report, "partner-in", "inbound")["remotes"]
    assert table["enabled"] is True and table["error_bound"] == 0, table
    rows = table["rows"]
    # The ones to fix first: 3 TLS1.0, then 1 without TLS (and 1 TLS1.3), then the TLS1.2-only server.
    assert [r["address"] for r in rows] == [CLIENT["legacy"], CLIENT["modern"], CLIENT["liar"]], rows
    by = {r["address"]: r for r in rows}
    assert by[CLIENT["legacy"]]["counts"] == counts(TLS10=3), by[CLIENT["legacy"]]
    assert by[CLIENT["liar"]]["counts"] == counts(TLS12=2)
    assert by[CLIENT["modern"]]["counts"] == counts(none=1, TLS13=1)
    assert by[CLIENT["legacy"]]["name"] == "mx1.sender.example.net"
    assert by[CLIENT["legacy"]]["domains"] == ["sender.test"]
    assert by[CLIENT["legacy"]]["messages"] == 3 and by[CLIENT["legacy"]]["error"] == 0
    assert by[CLIENT["legacy"]]["cipher"], by[CLIENT["legacy"]]
    assert by[CLIENT["legacy"]]["first_seen"] <= by[CLIENT["legacy"]]["last_seen"]
    assert table["other"]["messages"] == 0
    if with_names:
        assert by[CLIENT["legacy"]]["verified_name"] == "mx1.sender.example.net"  # forward-confirmed
        assert by[CLIENT["liar"]]["verified_name"] == ""  # its PTR names a host without this address
        assert by[CLIENT["modern"]]["verified_name"] == ""  # no PTR


def check_outbound(report):
    d = drilldown(report, "internet", "outbound")
    domains = {r["domain"]: r for r in d["domains"]["rows"]}
    assert set(domains) == {"tls13.example.net", "tls10.example.net"}, domains
    assert domains["tls13.example.net"]["counts"] == counts(TLS13=2)
    assert domains["tls10.example.net"]["counts"] == counts(TLS10=1)
    assert domains["tls10.example.net"]["name"] == "mx.tls10.example.net"
    assert [r["domain"] for r in d["domains"]["rows"]][0] == "tls10.example.net"  # legacy first
    remotes = {r["address"]: r for r in d["remotes"]["rows"]}
    assert remotes[MX["tls13"]]["name"] == "mx.tls13.example.net"
    assert remotes[MX["tls13"]]["domains"] == ["tls13.example.net"]
    assert remotes[MX["tls10"]]["counts"] == counts(TLS10=1)


def test_json_drilldown_rows_names_and_offender(env):
    report = wait_verified(env)
    check_inbound_rows(report)
    check_outbound(report)
    insight = [i for i in report["insights"] if i["connector"] == "partner-in"]
    assert [i["insight"] for i in insight] == ["significant_tls10"], report["insights"]
    # The servers are kept per UTC day: the count starts at midnight of the first day the 7-day window touches.
    now = datetime.strptime(report["generated_at"], "%Y-%m-%dT%H:%M:%SZ")
    since = (now - timedelta(days=7) + timedelta(hours=1)).date().isoformat()
    assert insight[0]["text"].endswith("in the last 7 days; 127.0.0.21 (mx1.sender.example.net) sent 3 of the 3 "
                                       f"TLS1.0 messages since {since} 00:00 UTC"), insight[0]["text"]


def test_csv_forms(env):
    status, body, ctype = rh.http_get(env, "/api/v1/remotes.csv")
    assert status == 200 and ctype.startswith("text/csv"), (status, ctype)
    rows = list(csv.DictReader(io.StringIO(body)))
    inbound = [r for r in rows if r["connector"] == "partner-in"]
    assert [r["address"] for r in inbound] == [CLIENT["legacy"], CLIENT["modern"], CLIENT["liar"]], body
    assert (inbound[0]["tls10"], inbound[0]["messages"], inbound[0]["tls10_pct"]) == ("3", "3", "100.0")
    assert inbound[1]["none"] == "1" and inbound[1]["tls13"] == "1"
    status, body, _ = rh.http_get(env, "/api/v1/domains.csv")
    assert status == 200
    domains = {r["domain"]: r for r in csv.DictReader(io.StringIO(body))}
    assert domains["tls13.example.net"]["tls13"] == "2" and domains["tls10.example.net"]["tls10"] == "1", body
    assert domains["tls10.example.net"]["mx_host"] == "mx.tls10.example.net"


def test_cli_connector_and_domains(env, mailflowd_bin):
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "partner-in")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("127.0.0.")]
    assert [ln.split()[0] for ln in lines] == [CLIENT["legacy"], CLIENT["modern"], CLIENT["liar"]], res.stdout
    # ADDRESS EHLO VERIFIED MESSAGES NONE TLS1.0 TLS1.1 TLS1.2 TLS1.3 REFUSED ...
    assert lines[0].split()[3:9] == ["3", "0", "3", "0", "0", "0"], lines[0]
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--domains")
    assert res.returncode == 0, res.stderr
    rows = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if ln.startswith("tls1")}
    assert rows["tls13.example.net"][3:9] == ["2", "0", "0", "0", "0", "2"], res.stdout
    assert rows["tls10.example.net"][1] == "mx.tls10.example.net", res.stdout
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "no-such")
    assert res.returncode == 1 and "partner-in" in res.stderr, res.stderr


def test_cli_connector_csv_is_that_connectors_servers(env, mailflowd_bin):
    """`--connector NAME --format csv` is the named connector's servers (both directions when it has both), as the
    table is, not every connector's; /api/v1/remotes.csv without ?connector= stays the whole list."""
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "partner-in", "--format", "csv")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [(r["connector"], r["address"]) for r in rows] == \
        [("partner-in", CLIENT[c]) for c in ("legacy", "modern", "liar")], res.stdout
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "internet", "--format", "csv")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert {r["connector"] for r in rows} == {"internet"} and {r["address"] for r in rows} == set(MX.values()), \
        res.stdout
    status, body, _ = rh.http_get(env, "/api/v1/remotes.csv")
    assert status == 200 and {r["connector"] for r in csv.DictReader(io.StringIO(body))} == {"partner-in", "internet"}
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "no-such", "--format", "csv")
    assert res.returncode == 1 and res.stdout == "" and "partner-in" in res.stderr, (res.stdout, res.stderr)


def test_cli_connector_json_is_that_connectors_report(env, mailflowd_bin):
    """`--connector NAME --format json` was the whole report, every connector's rows, insights and servers (the name
    was not even looked up): an administrator asking for one connector's JSON got all of them. It is now that
    connector's report alone (/api/v1/report?connector=NAME), "protected in transit" over it alone, and a name
    that is no connector fails as it does in the other formats."""
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "partner-in", "--format", "json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert {r["connector"] for r in report["rows"]} == {"partner-in"}, report["rows"]
    assert report["insights"] and {i["connector"] for i in report["insights"]} == {"partner-in"}, report["insights"]
    assert [(c["connector"], c["direction"]) for c in report["connectors"]] == [("partner-in", "inbound")]
    check_inbound_rows(report, with_names=False)
    inbound = sum(n for label, _, _, _, n in INBOUND)
    assert [(t["direction"], t["messages"]) for t in report["in_transit"]] == [("inbound", inbound)], \
        report["in_transit"]
    whole = rh.report_json(env)
    assert {c["connector"] for c in whole["connectors"]} == {"partner-in", "internet"}  # unchanged without it
    res = rh.run_cli(mailflowd_bin, "--url", env.http, "--connector", "no-such", "--format", "json")
    assert res.returncode == 1 and res.stdout == "" and "partner-in" in res.stderr, (res.stdout, res.stderr)


def test_page_has_a_drilldown_per_connector(env):
    status, page = env.get("/")
    assert status == 200
    assert '<details class="drilldown" data-connector="partner-in" data-direction="inbound">' in page
    section = page[page.index('data-connector="partner-in"'):]
    section = section[:section.index("</details>")]
    assert section.index(CLIENT["legacy"]) < section.index(CLIENT["modern"]) < section.index(CLIENT["liar"])


def test_gauges_are_bounded(env):
    m = env.metrics()
    assert harness.value(m, "mailflow_remotes_tracked", connector="partner-in", direction="inbound") == 3
    assert harness.value(m, "mailflow_remotes_tracked", connector="internet", direction="outbound") == 2
    assert harness.value(m, "mailflow_remotes_error_bound", connector="partner-in", direction="inbound") == 0
    # Exported with zeros from the start for a connector that saw nothing.
    assert harness.series(m, "mailflow_remotes_tracked", connector="internet", direction="inbound")
    assert harness.value(m, "mailflow_remotes_tracked", connector="internet", direction="inbound") == 0
    # No address or domain ever becomes a label.
    for (name, labels), _value in m.items():
        assert not any(CLIENT["legacy"] in v or "example.net" in v for _k, v in labels), (name, labels)


def test_tables_survive_a_restart(env):
    before = rh.report_json(env)
    assert env.stop() == 0
    assert (Path(env.config["state_dir"]) / "remotes.state").is_file()
    env.start()
    after = rh.report_json(env)
    check_inbound_rows(after, with_names=False)
    check_outbound(after)
    strip = lambda report: [{**c, "remotes": {**c["remotes"], "rows": [{**r, "verified_name": ""}  # noqa: E731
                                                                       for r in c["remotes"]["rows"]]}}
                            for c in report["connectors"]]
    assert strip(after) == strip(before)


RESETTER = "127.0.0.231"  # a fixed upstream of the test below (h-rev30perf's addresses)


def accept_then_reset(conn):
    """Takes a message, answers its end with 250 and resets the connection at once (SO_LINGER 0: an RST, no
    FIN), as a server that drops its side the moment it has queued the message."""
    def data(_line):
        conn.send(b"354 go on\r\n")
        if conn.message() is None:
            return True
        conn.send(b"250 2.0.0 queued\r\n")
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
        return True
    conn.serve({b"DATA": data})


def test_outbound_remote_is_the_address_connected_to_after_a_reset(daemon_factory):
    """The outbound drill-down's row of a message is the upstream's address also when the upstream reset the
    connection right after its 250: the address was asked of the socket (getpeername()) after the reply, which
    fails with ENOTCONN once the RST has come, and the message was counted under the address ""."""
    upstream = hh.FakeUpstream("resetter", accept_then_reset, host=RESETTER, port=harness.free_port(RESETTER))
    try:
        listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                      "upstream": "resetter"}]
        upstreams = [{"name": "resetter", "address": f"{RESETTER}:{upstream.port}", "tls": "none",
                      "xclient": "off"}]
        daemon = daemon_factory(listeners, upstreams, name="remotes-reset")
        before = daemon.metrics()
        messages = 3
        for _ in range(messages):
            r = harness.swaks(daemon.listener_port("out"), to="rcpt@reset.example", sender="app@corp.example",
                              data=rh.MESSAGE)
            assert r.rc == 0, str(r) + upstream.log_tail()
        harness.wait_moved(daemon, before, at_least=messages)
        rows = drilldown(rh.report_json(daemon), "internet", "outbound")["remotes"]["rows"]
        assert [(r["address"], r["messages"]) for r in rows] == [(RESETTER, messages)], rows
    finally:
        upstream.stop()
