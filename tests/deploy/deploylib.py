"""Helpers for the deploy tests: real Prometheus, Alertmanager, HAProxy, mailflowd and SMTP sinks as
subprocesses on free loopback ports, plus the Grafana dashboard's PromQL extracted and made runnable.

Every process is started with its output in a log file under the test's tmp dir; a failing assertion
should print the relevant log tails (see Procs.logs()).
"""
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RULES = REPO / "deploy" / "prometheus" / "mailflowd.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "mailflowd.json"
SINK = REPO / "tests" / "tools" / "sink.py"
PYTHON = "/usr/bin/python3"
sys.path.insert(0, str(SINK.parent))
from free_port import free_port  # noqa: E402  (tests/tools is not a package)
TLS_VERSIONS = ("none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3")


def wait_for(predicate, timeout=10.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - a not-yet-ready service raises; keep polling
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def tail(path, limit=6000):
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError as e:
        return f"<{e}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


class Procs:
    """Subprocesses of one test; stop_all() ends exactly those (by pid), newest first."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.items = []  # (name, Popen, log path)

    def start(self, name, argv, ready_line=None, env=None, cwd=None):
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        stdout = subprocess.PIPE if ready_line else log
        proc = subprocess.Popen([str(a) for a in argv], stdout=stdout, stderr=log, env=env, cwd=cwd,
                                start_new_session=True)
        self.items.append((name, proc, log_path))
        if ready_line:
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            line = proc.stdout.readline().decode() if ready else ""
            if not line.startswith(ready_line):
                raise AssertionError(f"{name} did not start (got {line!r}):\n{tail(log_path)}")
            # keep draining stdout into the log so the child never blocks on a full pipe
            threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True).start()
        return proc

    def check_alive(self):
        for name, proc, log_path in self.items:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail(log_path)}")

    def logs(self):
        return "\n".join(f"----- {name} ({log_path}) -----\n{tail(log_path, 3000)}"
                         for name, _, log_path in self.items)

    def stop_all(self):
        for _, proc, _ in reversed(self.items):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in reversed(self.items):
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(stream, log):
    for chunk in iter(lambda: stream.read1(4096), b""):
        log.write(chunk)
        log.flush()


# ------------------------------------------------------------------------------------------- Prometheus
class Prometheus:
    def __init__(self, procs, workdir, jobs, rule_files=(), alertmanager=None, interval="1s", name="prometheus",
                 external_labels=None, scrape_configs=()):
        """jobs: {job_name: [host:port, ...]}; scrape_configs: more scrape configs, as dicts"""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir = Path(workdir) / name if name != "prometheus" else Path(workdir)
        workdir.mkdir(exist_ok=True)
        (workdir / "prom-data").mkdir(exist_ok=True)
        lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}",
                 f"  scrape_timeout: {interval}"]
        if external_labels:
            lines.append(f"  external_labels: {json.dumps(external_labels)}")
        if rule_files:
            lines.append("rule_files:")
            lines += [f"  - {json.dumps(str(f))}" for f in rule_files]
        if alertmanager:
            lines += ["alerting:", "  alertmanagers:", "    - static_configs:",
                      f"        - targets: [{json.dumps(alertmanager)}]"]
        lines.append("scrape_configs:")
        for job, targets in jobs.items():
            lines += [f"  - job_name: {json.dumps(job)}", "    static_configs:",
                      f"      - targets: {json.dumps(list(targets))}"]
        lines += [f"  - {json.dumps(c)}" for c in scrape_configs]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text("\n".join(lines) + "\n")
        procs.start(name, ["prometheus", f"--config.file={self.config_path}",
                           f"--storage.tsdb.path={workdir / 'prom-data'}",
                           f"--web.listen-address=127.0.0.1:{self.port}",
                           "--storage.tsdb.retention.time=1d", "--log.level=warn"])
        wait_for(lambda: http_get(self.url + "/-/ready")[0] == 200, 30, what="prometheus ready")

    def api(self, path, **params):
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr, at=None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def query_range(self, expr, start, end, step="1s"):
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def scalar(self, expr):
        """Value of a query that must return exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def targets_up(self, job, count):
        result = self.query(f'up{{job="{job}"}} == 1')
        return len(result) == count

    def firing(self, alertname):
        return [a for a in self.api("alerts")["alerts"]
                if a["labels"].get("alertname") == alertname and a["state"] == "firing"]


# ------------------------------------------------------------------------------------------- Alertmanager
class Webhook:
    """A tiny HTTP listener that records Alertmanager webhook payloads."""

    def __init__(self):
        import http.server

        self.payloads = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, status="firing"):
        return [a for p in self.payloads for a in p.get("alerts", []) if a.get("status") == status]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    """A real Alertmanager: with webhook_url, routing everything to that webhook; with config, that file."""

    def __init__(self, procs, workdir, webhook_url=None, config=None):
        workdir = Path(workdir)
        self.port = free_port()
        cluster_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "alertmanager.yml"
        if config is not None:
            shutil.copyfile(config, self.config_path)
        else:
            self.config_path.write_text(f"""route:
  receiver: hook
  group_by: [alertname, connector, direction]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {json.dumps(webhook_url)}
        send_resolved: false
""")
        (workdir / "am-data").mkdir(exist_ok=True)
        procs.start("alertmanager", ["prometheus-alertmanager", f"--config.file={self.config_path}",
                                     f"--storage.path={workdir / 'am-data'}",
                                     f"--web.listen-address=127.0.0.1:{self.port}",
                                     f"--cluster.listen-address=127.0.0.1:{cluster_port}",
                                     "--log.level=warn"])
        wait_for(lambda: http_get(self.url + "/-/ready")[0] == 200, 30, what="alertmanager ready")

    def host_port(self):
        return f"127.0.0.1:{self.port}"

    def post(self, *label_sets):
        """Alerts firing now, as Prometheus sends them (API v2)."""
        body = json.dumps([{"labels": labels} for labels in label_sets]).encode()
        request = urllib.request.Request(self.url + "/api/v2/alerts", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200, response.status

    def alerts(self):
        """Every alert Alertmanager holds, with its status (state, inhibitedBy)."""
        with urllib.request.urlopen(self.url + "/api/v2/alerts", timeout=5) as response:
            return json.loads(response.read())


def rules_with_short_for(workdir, duration="0s"):
    """The shipped rules file with only `for:` shortened (the e2e tests cannot wait 30 minutes)."""
    text = RULES.read_text()
    shortened, n = re.subn(r"(?m)^(\s+for:\s*)\S+\s*$", lambda m: m.group(1) + duration, text)
    assert n >= 6, f"expected every alert to have a for:, replaced {n}"
    path = Path(workdir) / "mailflowd.rules.yml"
    path.write_text(shortened)
    return path


# ------------------------------------------------------------------------------------------- dashboard
# Values the test substitutes for Grafana's variables: "All" for the dashboard's own variables, and
# intervals that suit a Prometheus scraping every second.
GRAFANA_VARS = {
    "__rate_interval": "10s",
    "__interval": "2s",
    "__range": "1m",
    "__range_s": "60",
}


# Grafana's default "Scrape interval" of a Prometheus data source, which $__rate_interval assumes for a query
# without a Min step.
GRAFANA_DEFAULT_SCRAPE_INTERVAL = 15


def seconds(duration):
    """'30s', '2m', '1h' -> seconds."""
    m = re.fullmatch(r"(\d+)([smh])", duration)
    assert m, duration
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def grafana_rate_interval(min_step=None):
    """$__rate_interval in seconds as Grafana makes it for a short range (where $__interval is at its floor, the
    Min step): max($__interval + S, 4 * S), S = the query's Min step or the data source's scrape interval."""
    scrape = seconds(min_step) if min_step else GRAFANA_DEFAULT_SCRAPE_INTERVAL
    return max(scrape + scrape, 4 * scrape)


def load_dashboard(path=DASHBOARD):
    return json.loads(Path(path).read_text())


def all_panels(dashboard):
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def substitute(expr, dashboard, values=None):
    """Replaces $var, ${var} and ${var:format} by test values: the variable's allValue for the dashboard's
    own query/custom variables, GRAFANA_VARS for Grafana's built-ins."""
    subst = dict(GRAFANA_VARS)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") in ("query", "custom"):
            subst[var["name"]] = var.get("allValue") or ".*"
    subst.update(values or {})

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in subst:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}")
        return subst[name]

    # longest names first (so $__range_s is not read as $__range + "_s")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, expr)


def dashboard_queries(dashboard, values=None):
    """[(panel title, refId, PromQL)] of every target of every panel, variables substituted."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                out.append((panel.get("title", "?"), target.get("refId", "?"), substitute(expr, dashboard, values)))
    return out


def variable_queries(dashboard, values=None):
    """[(variable name, metric selector, label)] of every label_values() variable."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query or "")
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        out.append((var["name"], substitute(m.group(1), dashboard, values), m.group(2)))
    return out


def check_dashboard_queries(prom, dashboard, values=None):
    """Runs every dashboard query as an instant and a range query; returns a list of problems (empty = ok).
    A query must parse, evaluate, and return at least one series."""
    problems = []
    now = time.time()
    for title, ref, expr in dashboard_queries(dashboard, values):
        try:
            instant = prom.query(expr)
            ranged = prom.query_range(expr, now - 30, now, "2s")
        except AssertionError as e:
            problems.append(f"[{title} / {ref}] {expr}\n    error: {e}")
            continue
        if not instant or not ranged:
            problems.append(f"[{title} / {ref}] {expr}\n    no data (instant: {len(instant)} series, "
                            f"range: {len(ranged)} series)")
    # Annotation queries only have to be valid: config reloads are rare, "no data" is normal.
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            expr = substitute(annotation["expr"], dashboard, values)
            try:
                prom.query_range(expr, now - 30, now, "2s")
            except AssertionError as e:
                problems.append(f"[annotation {annotation.get('name')}] {expr}\n    error: {e}")
    for name, selector, label in variable_queries(dashboard, values):
        try:
            values_found = prom.api(f"label/{label}/values", **{"match[]": selector})
        except AssertionError as e:
            problems.append(f"[variable {name}] label_values({selector}, {label}): {e}")
            continue
        if not values_found:
            problems.append(f"[variable {name}] label_values({selector}, {label}): no values")
    return problems


# ------------------------------------------------------------------------------------------- mailflowd
def mailflowd_binary():
    path = os.environ.get("MAILFLOWD")
    if not path or not Path(path).is_file():
        raise AssertionError(f"MAILFLOWD must name the mailflowd binary (got {path!r}); ctest sets it")
    return path


def self_signed_cert(workdir, cn="mx.test"):
    workdir = Path(workdir)
    cert, key = workdir / "server.pem", workdir / "server.key"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
                        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}",
                        "-addext", f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
    return cert, key


def start_sink(procs, workdir, name="sink"):
    """tests/tools/sink.py when present, else Postfix's smtp-sink. Returns the port."""
    port = free_port()
    if SINK.exists():
        maildir = Path(workdir) / f"{name}-maildir"
        maildir.mkdir(exist_ok=True)
        procs.start(name, [PYTHON, SINK, "--port", port, "--maildir", maildir], ready_line="READY ")
    else:
        smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        procs.start(name, [smtp_sink, "-c", f"127.0.0.1:{port}", "1000"])
        wait_for(lambda: _connectable(port), 10, what=f"{name} listening")
    return port


def _connectable(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def write_config(path, text):
    Path(path).write_text(text)
    return path


def start_mailflowd(procs, name, config_path, http_port):
    binary = mailflowd_binary()
    check = subprocess.run([binary, "--check-config", str(config_path)], capture_output=True, text=True)
    assert check.returncode == 0, f"--check-config refused {config_path}:\n{check.stdout}{check.stderr}"
    procs.start(name, [binary, "--config", config_path])
    url = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: http_get(url + "/readyz")[0] == 200, 20, what=f"{name} /readyz")
    return url


def swaks(server_port, *, tls_version=None, sender="alice@contoso.com", rcpt="bob@example.org",
          server="127.0.0.1", local_interface=None, ehlo="client.contoso.com", timeout=30):
    """One message through swaks. tls_version: None (plain), "tlsv1", "tlsv1_2", ... Returns the transcript;
    raises when swaks failed."""
    argv = ["swaks", "--server", f"{server}:{server_port}", "--from", sender, "--to", rcpt,
            "--ehlo", ehlo, "--header", "Subject: deploy test", "--body", "hello", "--timeout", "20"]
    if local_interface:
        argv += ["--local-interface", local_interface]
    if tls_version:
        argv += ["--tls", "--tls-protocol", tls_version, "--tls-cipher", "DEFAULT:@SECLEVEL=0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"swaks exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def scrape(url):
    status, text = http_get(url + "/metrics")
    assert status == 200
    return text


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def mailflowd_config(workdir, name, smtp_port, http_port, upstream_port, connectors, *, cert=None, key=None,
                     proxy_trusted=None, extra_upstreams=(), defaults_min_messages=100):
    """mailflowd.yaml text for the deploy tests (one inbound listener, upstream "sink")."""
    state = Path(workdir) / f"{name}-state"
    state.mkdir(exist_ok=True)
    listener = {"name": "inbound", "address": f"127.0.0.1:{smtp_port}", "direction": "inbound", "upstream": "sink"}
    if cert:
        listener["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}], "min_version": "TLS1.0",
                           "ciphers": "DEFAULT:@SECLEVEL=0"}
    if proxy_trusted:
        listener["proxy_protocol"] = {"trusted": list(proxy_trusted)}
    upstreams = [{"name": "sink", "address": f"127.0.0.1:{upstream_port}", "tls": "none"}]
    upstreams += list(extra_upstreams)
    config = {
        "hostname": "mx.test",
        "state_dir": str(state),
        "listeners": [listener],
        "upstreams": upstreams,
        "connectors": list(connectors),
        "telemetry": {"window": "1d", "defaults": {"tls10_share": 0.05, "no_tls_share": 0.05,
                                                   "min_messages": defaults_min_messages}},
        "http": {"address": f"127.0.0.1:{http_port}"},
        "limits": {"drain_timeout": "2s"},
        "timeouts": {"upstream_connect": "3s", "tls_handshake": "10s"},
        "log": {"level": "debug"},
    }
    path = Path(workdir) / f"{name}.yaml"
    # JSON is YAML: no YAML library needed, and nothing is left to YAML's implicit typing ("off", "no").
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def smtp_raw(port, lines, host="127.0.0.1", timeout=10.0):
    """Sends raw command lines one by one, returns everything the server said (for rejects and handshake
    failures). Each line gets CRLF; a bytes item is sent as is."""
    out = b""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        out += _read_reply(s)
        for line in lines:
            s.sendall(line if isinstance(line, bytes) else line.encode() + b"\r\n")
            try:
                out += _read_reply(s)
            except (socket.timeout, ConnectionError):
                break
    return out.decode("latin-1")


def _read_reply(s):
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        # a complete reply ends with a line "DDD text" (no dash)
        if len(lines) >= 2 and re.match(rb"^\d{3}( |$)", lines[-2]) and data.endswith(b"\r\n"):
            return data
