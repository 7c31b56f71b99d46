"""Helpers shared by the report tests (test_report*.py, test_state*.py, test_browser*.py): a fixed traffic
plan at mixed TLS versions through two connectors plus `internet`, what the report must then say about it
(computed here from the plan, independently of the daemon), and small clients for the report endpoints and
the `mailflowd report` CLI."""
import csv
import io
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from datetime import date, datetime, timedelta, timezone

import harness

VERSIONS = ("none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3")
CSV_HEADER = ("date,connector,direction,type,forced_tls,messages,none_pct,tls10_pct,tls11_pct,tls12_pct,tls13_pct,"
              "none_count,tls10_count,tls11_count,tls12_count,tls13_count,configured")
CSV_COUNT_COLUMNS = dict(zip(VERSIONS, ("none_count", "tls10_count", "tls11_count", "tls12_count", "tls13_count")))
# swaks --tls-protocol per label (None: plaintext, no STARTTLS)
SWAKS_TLS = {"none": None, "TLS1.0": "tlsv1", "TLS1.1": "tlsv1_1", "TLS1.2": "tlsv1_2", "TLS1.3": "tlsv1_3"}
TYPE_WORDS = {"partner": "partner", "onpremises": "on-premises", "internet": "internet"}
MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: report\r\n\r\nbody\r\n"

# --------------------------------------------------------------------------------------------- setup
DEFAULTS = {"tls10_share": 0.05, "tls11_share": 0.05, "no_tls_share": 0.05, "min_messages": 3}

CONNECTORS = [
    # by client address: everything from 127.0.0.2
    {"name": "partner-cidr", "type": "partner", "direction": "inbound",
     "match": {"client_cidrs": ["127.0.0.2/32"]}},
    # by sender domain, legacy on-premises servers
    {"name": "legacy-domain", "type": "onpremises", "direction": "inbound",
     "match": {"sender_domains": ["legacy.test"]}, "alerts": {"min_messages": 2}},
    # by sender domain, Forced TLS, a TLS1.0 share exactly at its threshold (an insight needs "strictly greater")
    {"name": "forced-domain", "type": "partner", "direction": "inbound", "require_tls": True,
     "match": {"sender_domains": ["contoso.test"]}, "alerts": {"tls10_share": 0.25, "min_messages": 4}},
    # configured, never used: zero rows, no insight
    {"name": "idle-partner", "type": "partner", "direction": "inbound", "match": {"sender_domains": ["idle.test"]}},
]

# (connector, direction, listener, source address, sender, tls label, how many)
PLAN = [
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "none", 2),
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "TLS1.0", 1),
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "TLS1.2", 1),
    ("partner-cidr", "inbound", "inbound", "127.0.0.2", "a@example.test", "TLS1.3", 3),
    ("legacy-domain", "inbound", "inbound", "127.0.0.1", "b@legacy.test", "TLS1.0", 2),
    ("legacy-domain", "inbound", "inbound", "127.0.0.1", "b@legacy.test", "TLS1.2", 1),
    ("forced-domain", "inbound", "inbound", "127.0.0.1", "c@contoso.test", "TLS1.0", 1),
    ("forced-domain", "inbound", "inbound", "127.0.0.1", "c@contoso.test", "TLS1.2", 2),
    ("forced-domain", "inbound", "inbound", "127.0.0.1", "c@contoso.test", "TLS1.3", 1),
    ("internet", "inbound", "inbound", "127.0.0.1", "d@example.test", "none", 1),
    ("internet", "inbound", "inbound", "127.0.0.1", "d@example.test", "TLS1.3", 1),
    # outbound: counted under the upstream leg's version (the sink has no TLS => none)
    ("internet", "outbound", "outbound", "127.0.0.1", "e@example.test", "none", 1),
]

# (connector, direction) -> (type, forced_tls, alerts) as configured (internet: the defaults)
META = {("internet", "inbound"): ("internet", False, DEFAULTS),
        ("internet", "outbound"): ("internet", False, DEFAULTS)}
for _c in CONNECTORS:
    META[(_c["name"], _c["direction"])] = (_c["type"], bool(_c.get("require_tls", False)),
                                           {**DEFAULTS, **_c.get("alerts", {})})


def build_env_config(certs, sink_port, inbound_port, outbound_port):
    """(listeners, upstreams, connectors, extra) for daemon_factory / make_config."""
    listeners = [
        {"name": "inbound", "address": f"127.0.0.1:{inbound_port}", "direction": "inbound",
         "tls": harness.listener_tls(certs), "upstream": "store"},
        {"name": "outbound", "address": f"127.0.0.1:{outbound_port}", "direction": "outbound",
         "tls": harness.listener_tls(certs), "upstream": "store"},
    ]
    upstreams = [{"name": "store", "address": f"127.0.0.1:{sink_port}", "tls": "none"}]
    extra = {"telemetry": {"window": "7d", "defaults": dict(DEFAULTS)}}
    return listeners, upstreams, CONNECTORS, extra


# ------------------------------------------------------------------------------------------- traffic
def send(port, sender, source, tls_label):
    r = harness.swaks(port, sender=sender, data=MESSAGE, local=source, tls=SWAKS_TLS[tls_label])
    assert r.rc == 0, f"swaks ({tls_label} from {source} as {sender}) failed:\n{r}"
    return r


def send_plan(daemon, sink, plan=PLAN):
    """Relays every message of `plan`, waits until the sink has them all and the daemon counted them all."""
    before = daemon.metrics()
    n0 = sink.count()
    total = 0
    for _connector, _direction, listener, source, sender, tls, count in plan:
        for _ in range(count):
            send(daemon.listener_port(listener), sender, source, tls)
            total += 1
    sink.wait_messages(n0 + total)
    after = harness.wait_moved(daemon, before, at_least=total)
    moved = harness.delta(before, after, "mailflow_messages_total")
    want = {}
    for connector, direction, _l, _s, _f, tls, count in plan:
        key = harness.series_key(connector=connector, direction=direction, tls_version=tls)
        want[key] = want.get(key, 0.0) + count
    assert moved == want, ("mailflow_messages_total did not move exactly as the traffic plan says:\n"
                           f"moved:\n{harness.fmt_delta(moved)}\nwanted:\n{harness.fmt_delta(want)}")
    return total


def plan_counts(plan=PLAN):
    """{(connector, direction): {version: messages}} with every configured connector (zeros included)."""
    out = {key: {v: 0 for v in VERSIONS} for key in META}
    for connector, direction, _l, _s, _f, tls, count in plan:
        out[(connector, direction)][tls] += count
    return out


# ------------------------------------------------------------------------------------- expectations
def expected_percent(counts):
    """The five percentages in tenths, as the report shows them: each rounded down, then the tenths left over go
    to the largest remainders (ties in version order), so that a row with messages adds up to exactly 100.0
    (a row of 2/7, 1/7, 1/7, 3/7 is 28.6, 14.3, 14.3, 42.8, not 100.1); 0.0 each for a row without messages."""
    total = sum(counts.values())
    if not total:
        return {v: 0.0 for v in VERSIONS}
    tenths = {v: counts[v] * 1000 // total for v in VERSIONS}
    left = 1000 - sum(tenths.values())
    for v in sorted(VERSIONS, key=lambda v: -(counts[v] * 1000 % total))[:left]:  # stable: ties in version order
        tenths[v] += 1
    return {v: tenths[v] / 10 for v in VERSIONS}


def plural(n, one, many):
    return f"{n:,} {one if n == 1 else many}"


def insight_sentence(connector, direction, ctype, insight, share, messages, days):
    what = {"significant_tls10": "significant TLS1.0 mail flow",
            "significant_tls11": "significant TLS1.1 mail flow",
            "significant_no_tls": "significant mail flow without TLS"}[insight]
    return (f"{direction.capitalize()} {TYPE_WORDS[ctype]} connector {connector} is seeing {what}: "
            f"{100.0 * share:.1f}% of {plural(messages, 'message', 'messages')} in the last "
            f"{plural(days, 'day', 'days')}")


# The top offender the report appends to an insight (issue #18): "...; ADDRESS (NAME) sent N of the M
# TLS1.0 messages since YYYY-MM-DD 00:00 UTC" (or "messages without TLS"): the servers are kept per UTC day, so
# the clause counts from midnight of the window's first day.
OFFENDER = re.compile(r"; (?P<address>\S+)(?: \((?P<name>[^)]*)\))? sent (?P<sent>[\d,]+) of the (?P<all>[\d,]+) "
                      r"(?:(?P<version>TLS1\.[01]) messages|messages without TLS) "
                      r"since (?P<since>\d{4}-\d{2}-\d{2}) 00:00 UTC$")


def split_offender(text, counts=None, insight=None):
    """The insight sentence without its offender clause; with `counts` ({version: n} of the window), the clause
    is checked: it names the version of the insight, and "of the M" is all of that version's messages."""
    m = OFFENDER.search(text)
    if m is None:
        return text
    if counts is not None:
        version = m["version"] or "none"
        assert insight in (None, {"TLS1.0": "significant_tls10", "TLS1.1": "significant_tls11",
                                  "none": "significant_no_tls"}[version]), f"offender of {insight}: {text!r}"
        assert int(m["all"].replace(",", "")) == counts[version], f"offender clause vs {counts}: {text!r}"
        assert 0 < int(m["sent"].replace(",", "")) <= counts[version], f"offender clause vs {counts}: {text!r}"
    return text[:m.start()]


def expected_insights(counts_by_key, window_days=7):
    """[{connector, direction, insight, share, messages, threshold, text}] by the contract's rule: window
    messages >= min_messages and share strictly greater than the threshold."""
    out = []
    for (connector, direction), counts in counts_by_key.items():
        ctype, _forced, alerts = META[(connector, direction)]
        total = sum(counts.values())
        if total == 0 or total < alerts["min_messages"]:
            continue
        for insight, version, kind in (("significant_tls10", "TLS1.0", "tls10_share"),
                                       ("significant_tls11", "TLS1.1", "tls11_share"),
                                       ("significant_no_tls", "none", "no_tls_share")):
            share = counts[version] / total
            if share > alerts[kind]:
                out.append({"connector": connector, "direction": direction, "insight": insight, "share": share,
                            "messages": total, "threshold": alerts[kind],
                            "text": insight_sentence(connector, direction, ctype, insight, share, total,
                                                     window_days)})
    return out


# ------------------------------------------------------------------------------------------- clients
def http_get(daemon, path):
    """(status, body text) also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(daemon.http + path, timeout=10) as r:
            return r.status, r.read().decode("utf-8", "replace"), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace"), e.headers.get("Content-Type", "")


def report_json(daemon, query=""):
    status, body, ctype = http_get(daemon, "/api/v1/report" + query)
    assert status == 200, f"/api/v1/report{query} answered {status}: {body}"
    assert ctype.startswith("application/json"), f"/api/v1/report Content-Type: {ctype!r}"
    try:
        return json.loads(body)
    except ValueError as e:
        raise AssertionError(f"/api/v1/report{query} is not JSON ({e}):\n{body[:2000]}")


def utc_now():
    """The tests' one clock for UTC dates (a test of the helpers below moves it over midnight)."""
    return datetime.now(timezone.utc)


# How long a test may take from day_clear_of_midnight() to its last check of that day.
MIDNIGHT_GUARD = 120.0


def day_clear_of_midnight(guard=MIDNIGHT_GUARD):
    """The UTC day on which what a test records next (traffic, a state file for "today") falls, and its checks of
    that day: when UTC midnight is less than `guard` seconds away, waits until it has passed. The daemon dates
    what it records by its clock then; a test that asked for the date only when it checked, after midnight,
    asked for the next day. Tests take this day before they record anything, through the utc_day fixture."""
    now = utc_now()
    left = 86400 - (now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6)
    if left < guard:
        time.sleep(left + 0.05)
        now = utc_now()
    return now.strftime("%Y-%m-%d")


TEST_DAY = None  # set by the utc_day fixture for the test that runs


def test_day():
    """The day the utc_day fixture took for the running test (a module's tests use it with
    pytestmark = pytest.mark.usefixtures("utc_day"))."""
    assert TEST_DAY is not None, "the test does not use the utc_day fixture"
    return TEST_DAY


def rows_of(report, date):
    """{(connector, direction): row} of one day; a duplicate row is an error."""
    out = {}
    for row in report["rows"]:
        if row["date"] != date:
            continue
        key = (row["connector"], row["direction"])
        assert key not in out, f"two rows for {key} on {date}: {out[key]} and {row}"
        out[key] = row
    return out


def parse_csv(text):
    lines = text.splitlines()
    assert lines and lines[0] == CSV_HEADER, f"CSV header is {lines[:1]!r}, expected {CSV_HEADER!r}"
    return list(csv.DictReader(io.StringIO(text)))


def run_cli(binary, *args, timeout=20):
    p = subprocess.run([binary, "report", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    res = subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode("utf-8", "replace"),
                                      p.stderr.decode("utf-8", "replace"))
    harness.TRANSCRIPTS.append(f"$ {' '.join(map(str, p.args))}\n(rc={p.returncode})\n"
                               f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}")
    return res


def assert_report_matches(report, counts_by_key, date, window_days=7):
    """Today's rows carry exactly the plan's counts/percentages, type/forced_tls/direction as configured,
    and the insights are exactly those the contract's rule gives."""
    rows = rows_of(report, date)
    assert set(rows) == set(counts_by_key), (f"rows on {date}: {sorted(rows)}; expected one per connector x "
                                             f"direction: {sorted(counts_by_key)}")
    for key, counts in counts_by_key.items():
        row = rows[key]
        ctype, forced, _alerts = META[key]
        want = {"date": date, "connector": key[0], "direction": key[1], "type": ctype, "forced_tls": forced,
                "messages": sum(counts.values()), "percent": expected_percent(counts),
                "counts": {v: counts[v] for v in VERSIONS}, "configured": True}
        assert row == want, f"row for {key} on {date}:\n  got  {row}\n  want {want}"
    got = sorted(report["insights"], key=lambda i: (i["connector"], i["direction"], i["insight"]))
    want = sorted(expected_insights(counts_by_key, window_days),
                  key=lambda i: (i["connector"], i["direction"], i["insight"]))
    assert [(i["connector"], i["direction"], i["insight"]) for i in got] == \
        [(i["connector"], i["direction"], i["insight"]) for i in want], \
        f"insights:\n  got  {got}\n  want {want}"
    for g, w in zip(got, want):
        text = split_offender(g["text"], counts_by_key[(g["connector"], g["direction"])], g["insight"])
        assert text == w["text"], f"insight sentence:\n  got  {g['text']!r}\n  want {w['text']!r}"
        assert g["messages"] == w["messages"] and abs(g["share"] - w["share"]) < 1e-9 \
            and abs(g["threshold"] - w["threshold"]) < 1e-9, f"insight numbers:\n  got  {g}\n  want {w}"


def table_section(text, first_column, date=None):
    """{(connector, direction): [date?, connector, direction, type, forced, messages, (count, pct) x 5]} of the
    `mailflowd report` table whose header starts with `first_column` (DATE: the days, CONNECTOR: the summary).
    A cell per version is "12 (1.2%)", or "0" for a row without messages. `date`: the DATE table's lines of that
    day only (a test's traffic day, with the new day's zero lines in front after a midnight)."""
    lines = text.splitlines()
    header = next((i for i, ln in enumerate(lines) if ln.split()[:1] == [first_column]), None)
    assert header is not None, f"no table with a {first_column} column in:\n{text}"
    fixed = 6 if first_column == "DATE" else 5
    out = {}
    for ln in lines[header + 1:]:
        if not ln.strip() or "protected in transit:" in ln:
            break
        f = ln.split()
        if date is not None and f[0] != date:
            continue
        head, tail = f[:fixed], " ".join(f[fixed:])
        cells = re.findall(r"([\d,]+) \(([\d.]+)%\)", tail)
        if not cells:
            assert tail.split() == ["0"] * 5, f"table line without messages, but not zeros: {ln!r}"
            cells = [("0", None)] * 5
        assert len(cells) == 5, f"table line with {len(cells)} version cells: {ln!r}"
        key = (head[fixed - 5], head[fixed - 4])
        assert key not in out, f"two table lines for {key}"
        out[key] = head + cells
    return out


def report_days(report, first_day):
    """The dates a report shows when the first message of the daemon's window fell on `first_day` (the day a test
    took with day_clear_of_midnight() before it recorded that message): from the report's own day (generated_at,
    the daemon's clock when it answered) back to first_day, newest first, at most report["days"] of them. A
    midnight between the traffic and the report adds the new day in front; the traffic stays under first_day.
    The day of a test's traffic is never the date at the report's fetch: after such a midnight that is the next
    day, whose rows are zero."""
    newest = date.fromisoformat(report["generated_at"][:10])
    first = date.fromisoformat(first_day)
    assert newest >= first, f"the report's day {newest} is before the traffic's day {first}"
    shown = min((newest - first).days + 1, report["days"])
    return [(newest - timedelta(days=back)).isoformat() for back in range(shown)]


def http_get_fails(daemon):
    """True when nothing answers on the daemon's HTTP address."""
    try:
        with urllib.request.urlopen(daemon.http + "/healthz", timeout=2):
            return False
    except (urllib.error.URLError, OSError):
        return True
