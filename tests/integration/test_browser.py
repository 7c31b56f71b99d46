"""The HTML report page (`/`) in a real browser (Debian's chromium, headless) after traffic at mixed TLS
versions: the rendered DOM shows every connector, the window percentages and the insight sentences; the page
is self-contained (no <script>, no http(s):// src/href, no remote CSS); a screenshot is kept at
tests/artifacts/report-page.png (set MAILFLOW_UPDATE_DOCS_SCREENSHOT=1 to also copy it to
docs/report-page.png, the picture the README shows). A connector's drill-down is opened by a click, over the
DevTools protocol (chromium --remote-debugging-pipe), and must then show its servers."""
import html
import html.parser
import json
import os
import re
import select
import shutil
import struct
import subprocess
import time
import types
import zlib
from pathlib import Path

import pytest

import harness
import report_helpers as rh

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
SCREENSHOT = ARTIFACTS / "report-page.png"
DOCS_SCREENSHOT = REPO / "docs" / "report-page.png"
BROWSER_TIMEOUT = 40


def chromium_path():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if not path:
        pytest.skip("chromium is not installed (deploy/dev/deps.sh test installs it): browser test skipped")
    return path


@pytest.fixture(scope="module")
def env(browser, certs, sink_factory, daemon_factory, workdir):
    sink = sink_factory("store")
    listeners, upstreams, connectors, extra = rh.build_env_config(certs, sink.port, harness.free_port(),
                                                                  harness.free_port())
    daemon = daemon_factory(listeners, upstreams, connectors, **extra)
    day = rh.day_clear_of_midnight()  # the day of the plan's messages, taken before they are sent
    rh.send_plan(daemon, sink)
    return types.SimpleNamespace(sink=sink, daemon=daemon, browser=browser, workdir=workdir,
                                 counts=rh.plan_counts(), day=day)


class Chromium:
    """One headless chromium run; its stderr goes to the failure report."""

    def __init__(self, env, name):
        self.name = f"chromium-{name}"
        self.log_path = env.workdir / f"{self.name}.stderr"
        self.profile = env.workdir / f"{self.name}-profile"
        self.argv = [env.browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--hide-scrollbars", f"--user-data-dir={self.profile}"]

    def run(self, *args):
        harness.LIVE.append(self)
        try:
            with open(self.log_path, "wb") as log:
                p = subprocess.run(self.argv + list(args), stdout=subprocess.PIPE, stderr=log,
                                   stdin=subprocess.DEVNULL, timeout=BROWSER_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"chromium did not finish within {BROWSER_TIMEOUT}s: {' '.join(args)}")
        assert p.returncode == 0, f"chromium exited {p.returncode}:\n{self.log_tail()}"
        return p.stdout.decode("utf-8", "replace")

    def log_tail(self):
        return harness.tail(self.log_path, 4000)


class Text(html.parser.HTMLParser):
    """Visible text (no <style>/<script>/<title> content), whitespace collapsed, plus every tag seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.tags, self.attrs, self._skip = [], [], [], 0
        self.rows, self._row, self._cell = [], None, None  # table rows as lists of cell texts

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v or "") for k, v in attrs)
        if tag in ("style", "script", "title"):
            self._skip += 1
        elif tag == "tr":
            self._row = []
            self.rows.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("style", "script", "title") and self._skip:
            self._skip -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(re.sub(r"\s+", " ", "".join(self._cell)).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)
            if self._cell is not None:
                self._cell.append(data)

    def text(self):
        return re.sub(r"\s+", " ", " ".join(self.parts))


def parse(page):
    t = Text()
    t.feed(page)
    t.close()
    return t


def assert_self_contained(page, what):
    t = parse(page)
    assert "script" not in t.tags, f"{what}: the page has a <script>"
    external = [(tag, k, v) for tag, k, v in t.attrs
                if k in ("src", "href", "srcset", "action", "data", "poster", "xlink:href")
                and re.match(r"\s*(https?:)?//", v, re.I)]
    assert not external, f"{what}: external references: {external}"
    links = [(tag, k, v) for tag, k, v in t.attrs if tag == "link" and k == "href"]
    assert not links, f"{what}: <link href> (the page must carry its own CSS): {links}"
    assert not re.search(r"@import|url\(\s*['\"]?\s*(https?:)?//", page, re.I), \
        f"{what}: CSS that loads something remote"
    assert not re.search(r"\bon[a-z]+\s*=", page, re.I), f"{what}: inline event handlers (JavaScript)"
    assert "javascript:" not in page.lower(), f"{what}: a javascript: URL"


@pytest.fixture(scope="module")
def dom(env):
    return Chromium(env, "dump-dom").run("--dump-dom", env.daemon.http + "/")


def test_served_page_is_self_contained(env):
    status, page, ctype = rh.http_get(env.daemon, "/")
    assert status == 200 and ctype.startswith("text/html"), f"GET / answered {status} {ctype}"
    assert_self_contained(page, "GET /")


def test_rendered_dom_is_self_contained(dom):
    assert "<html" in dom and "</html>" in dom, f"chromium dumped no document:\n{dom[:500]}"
    assert_self_contained(dom, "rendered DOM")


def test_rendered_dom_shows_connectors_percentages_and_insights(env, dom):
    text = parse(dom).text()
    for (connector, direction), counts in env.counts.items():
        assert connector in text, f"connector {connector} is not on the page"
    # The window percentages of each busy connector, as the page prints them ("TLS1.0 14.3%").
    for (connector, direction), counts in env.counts.items():
        if not sum(counts.values()):
            continue
        pct = rh.expected_percent(counts)
        for v in rh.VERSIONS:
            assert f"{v} {pct[v]:.1f}%" in text, f"{connector}/{direction}: '{v} {pct[v]:.1f}%' not on the page"
    insights = rh.expected_insights(env.counts)
    assert insights, "the traffic plan should produce insights"
    for insight in insights:
        assert insight["text"] in text, f"insight sentence not on the page: {insight['text']!r}"
    # Nothing is claimed that the rule does not give: only these sentences say "is seeing significant".
    assert text.count("is seeing significant") == len(insights), \
        f"{text.count('is seeing significant')} insight sentences on the page, want {len(insights)}"

def test_rendered_dom_has_a_window_row_per_connector(env, dom):
    """Each connector x direction has a table row with its direction, type, Forced TLS and message volume."""
    rows = parse(dom).rows
    for (connector, direction), counts in env.counts.items():
        ctype, forced, _ = rh.META[(connector, direction)]
        n = f"{sum(counts.values()):,}"
        want = [direction, rh.TYPE_WORDS[ctype], "yes" if forced else "no", n]
        found = [r for r in rows if r and r[0].split()[0] == connector and r[1:5] == want]
        assert len(found) == 1, (f"{connector}: want one whole-window row [{connector}, {', '.join(want)}, ...]; "
                                 f"rows naming it: {[r for r in rows if r and r[0].startswith(connector)][:3]}")
        if n != "0":
            pct = rh.expected_percent(counts)
            shown = " ".join(found[0][5:])
            for v in rh.VERSIONS:
                assert f"{v} {pct[v]:.1f}%" in shown, f"{connector}/{direction}: '{v} {pct[v]:.1f}%' not in {shown!r}"


class Chart(html.parser.HTMLParser):
    """The rendered trend charts and the protected-in-transit boxes, read from the DOM chromium built: per
    (connector, direction) {date: (messages, {version: bar height})}, and per direction the box's data and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.charts, self.transit = {}, {}
        self._chart = self._day = self._box = None
        self._texts = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "").split()
        if tag == "figure" and "trend" in cls:
            self._chart = self.charts.setdefault((a["data-connector"], a["data-direction"]), {})
        elif tag == "g" and "day" in cls and self._chart is not None:
            assert a.get("role") == "img" and a.get("aria-label"), f"a bar without an accessible label: {a}"
            self._day = self._chart.setdefault(a["data-date"], (int(a["data-messages"]), {}, a["aria-label"]))
        elif tag == "rect" and "v" in cls and self._day is not None:
            self._day[1][a["data-version"]] = float(a["height"])
        elif tag == "div" and "transit" in cls:
            self._box = {k: v for k, v in a.items() if k.startswith("data-")}
            self._texts = []
            self.transit[a["data-direction"]] = self._box
        if self._box is not None and tag == "span" and cls and cls[0] in ("tls-pct", "tls12-pct"):
            self._texts.append(cls[0])

    def handle_data(self, data):
        if self._box is not None and self._texts:
            self._box.setdefault(self._texts[-1], data)

    def handle_endtag(self, tag):
        if tag == "figure":
            self._chart = None
        elif tag == "g":
            self._day = None


def test_chart_renders_the_daily_shares_and_the_summary_matches_the_json(env, dom):
    """The trend chart is drawn (a bar per busy connector and day, each version's height its share) and the
    protected-in-transit numbers at the top are those of /api/v1/report; fails on an empty chart."""
    report, today = rh.report_json(env.daemon), env.day
    chart = Chart()
    chart.feed(dom)
    busy = {key for key, counts in env.counts.items() if sum(counts.values())}
    assert set(chart.charts) == busy, f"charts for {sorted(chart.charts)}, want one per busy connector {sorted(busy)}"
    for key in busy:
        days = chart.charts[key]
        assert today in days, f"{key}: no bar for {today}: {sorted(days)}"
        messages, heights, label = days[today]
        counts = env.counts[key]
        assert messages == sum(counts.values()), (key, messages)
        full = sum(heights.values())
        assert full > 100, f"{key}: the bar for {today} is empty ({heights})"
        for v in rh.VERSIONS:
            assert abs(heights.get(v, 0.0) / full - counts[v] / messages) < 0.01, (key, v, heights)
        pct = rh.expected_percent(counts)
        assert all(f"{v} {pct[v]:.1f}%" in label for v in rh.VERSIONS), f"{key}: bar label {label!r}"
    assert [t["direction"] for t in report["in_transit"]] == sorted(chart.transit), chart.transit
    for t in report["in_transit"]:
        box = chart.transit[t["direction"]]
        assert (int(box["data-messages"]), int(box["data-tls"]), int(box["data-tls12-plus"])) == \
            (t["messages"], t["tls"], t["tls12_plus"]), (box, t)
        assert box["tls-pct"] == f"{100 * t['tls_share']:.1f}%", (box, t)
        assert box["tls12-pct"] == f"{100 * t['tls12_plus_share']:.1f}%", (box, t)


def test_daily_table_has_no_zero_rows(dom):
    rows = parse(dom).rows
    start = next(i for i, r in enumerate(rows) if r[:2] == ["Date", "Connector"])
    daily = []
    for r in rows[start + 1:]:
        if len(r) > 5 and not re.match(r"\d{4}-\d{2}-\d{2}$", r[0]):
            break  # the next table (the drill-down) begins
        if len(r) > 5:
            daily.append(r)
    assert daily, "the daily table is empty"
    assert all(r[5] != "0" for r in daily), f"zero rows in the daily table: {[r for r in daily if r[5] == '0']}"


def png_info(data):
    """(width, height, distinct byte values over the decompressed pixel rows) of a PNG file."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(idat)
    return width, height, len(set(pixels[::7]))


def test_screenshot(env):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = env.workdir / "report-page.png"
    Chromium(env, "screenshot").run(f"--screenshot={shot}", "--window-size=1280,1600", env.daemon.http + "/")
    assert shot.is_file(), f"chromium wrote no screenshot at {shot}"
    data = shot.read_bytes()
    width, height, variety = png_info(data)
    assert (width, height) == (1280, 1600), f"screenshot is {width}x{height}"
    assert variety > 64, f"the screenshot is (nearly) blank: {variety} distinct byte values"
    shutil.copyfile(shot, SCREENSHOT)
    if os.environ.get("MAILFLOW_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)


class DevTools:
    """Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on fd 3, answers
    and events on fd 4, NUL-terminated JSON), standard library only: the test clicks like a user would."""

    def __init__(self, env):
        self.chromium = Chromium(env, "devtools")
        self.name = self.chromium.name
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        os.set_inheritable(to_browser_r, True)
        os.set_inheritable(from_browser_w, True)
        self._log = open(self.chromium.log_path, "wb")

        def fds():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(self.chromium.argv + ["--remote-debugging-pipe", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                                     preexec_fn=fds, close_fds=False)  # close_fds would close 3 and 4
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next = b"", 0
        harness.LIVE.append(self)
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next:
                    assert "error" not in answer, f"{method}: {answer['error']}"
                    return answer["result"]
            ready, _, _ = select.select([self._from_browser], [], [], 1.0)
            if ready:
                chunk = os.read(self._from_browser, 65536)
                assert chunk, f"chromium closed the DevTools pipe:\n{self.chromium.log_tail()}"
                self._buffer += chunk
        raise AssertionError(f"no DevTools answer to {method} within {BROWSER_TIMEOUT}s")

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, url):
        self.call("Page.navigate", session=self.session, url=url)
        harness.wait_for(lambda: self.evaluate("document.readyState") == "complete", timeout=BROWSER_TIMEOUT,
                         what="the page to load")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def log_tail(self):
        return self.chromium.log_tail()


def test_drilldown_opens_on_click_and_lists_the_servers(env):
    """A connector's drill-down is closed at first (its table takes no room), opens when its summary is clicked,
    and then shows the servers behind the connector with their messages."""
    tools = DevTools(env)
    try:
        tools.open(env.daemon.http + "/")
        sections = tools.evaluate("Array.from(document.querySelectorAll('details.drilldown'))"
                                  ".map(d => [d.dataset.connector, d.dataset.direction])")
        assert sections, "the page has no drill-down"
        report = json.loads(env.daemon.get("/api/v1/report")[1])
        busy = next(c for c in report["connectors"] if c["messages"] > 0 and c.get("remotes", {}).get("rows"))
        selector = (f"details.drilldown[data-connector='{busy['connector']}']"
                    f"[data-direction='{busy['direction']}']")
        height = f"document.querySelector(\"{selector}\").getBoundingClientRect().height"
        visible = f"document.querySelector(\"{selector} table\").checkVisibility()"
        assert tools.evaluate(f"document.querySelector(\"{selector}\").open") is False
        assert tools.evaluate(visible) is False, "a closed drill-down shows its table"
        closed = tools.evaluate(height)
        tools.evaluate(f"document.querySelector(\"{selector} summary\").click()")
        assert tools.evaluate(f"document.querySelector(\"{selector}\").open") is True
        assert tools.evaluate(visible) is True, "the opened drill-down does not show its table"
        assert tools.evaluate(height) > closed + 40, "the opened drill-down takes no more room than closed"
        rows = tools.evaluate(f"Array.from(document.querySelectorAll(\"{selector} table\")[0].tBodies[0].rows)"
                              ".map(r => Array.from(r.cells).map(c => c.innerText))")
        expected = {r["address"]: r["messages"] for r in busy["remotes"]["rows"]}
        shown = {r[0]: int(r[3].replace(",", "")) for r in rows if r[0] in expected}
        assert shown == expected, (rows, expected)
    finally:
        tools.stop()


def test_drilldown_tables_have_as_many_cells_per_row_as_columns(env):
    """Every row of every drill-down table (the "no messages in these days" row of an idle connector too) spans
    exactly the columns of its header: a wider row adds a column without a header to the whole table."""
    tools = DevTools(env)
    try:
        tools.open(env.daemon.http + "/")
        widths = tools.evaluate(
            "Array.from(document.querySelectorAll('details.drilldown table')).map(t => ["
            " t.closest('details').dataset.connector, t.tHead.rows[0].cells.length,"
            " Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).reduce((n, c) => n + c.colSpan, 0))])")
        assert any(name == "idle-partner" for name, _, _ in widths), widths
        wrong = [(name, columns, rows) for name, columns, rows in widths if any(n != columns for n in rows)]
        assert not wrong, f"(connector, header columns, row widths): {wrong}"
    finally:
        tools.stop()


def test_page_runs_no_script_even_one_slipped_in_and_keeps_its_style(env):
    """Defence in depth behind the escaping: the page is served with a Content-Security-Policy that allows no
    script at all, so markup that got into it (an escaping bug) could not run an event handler; its own <style>
    still applies. Every answer says nosniff, so no browser takes a text/plain or CSV answer for HTML."""
    import urllib.request
    for path in ("/", "/metrics", "/api/v1/report", "/api/v1/report.csv", "/nonexistent"):
        try:
            answer = urllib.request.urlopen(env.daemon.http + path, timeout=5)
        except urllib.error.HTTPError as error:
            answer = error
        assert answer.headers.get("X-Content-Type-Options") == "nosniff", (path, dict(answer.headers))
        policy = answer.headers.get("Content-Security-Policy")
        if path == "/":
            assert policy and "default-src 'none'" in policy and "script-src" not in policy, policy
    tools = DevTools(env)
    try:
        tools.open(env.daemon.http + "/")
        assert tools.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor") == \
            "rgb(31, 41, 55)", "the page's own <style> did not apply"
        # As an EHLO name that escaped the escaping would: an element whose handler runs as it loads.
        tools.evaluate("document.querySelector('main').insertAdjacentHTML('beforeend', "
                       "'<img src=\"data:,x\" onerror=\"document.body.id=\\'xss\\'\">')")
        time.sleep(0.5)
        assert tools.evaluate("document.body.id") != "xss", "a handler in the page ran"
    finally:
        tools.stop()
