#!/usr/bin/env python3
"""Checks the metric names that docs, alert rules and the dashboard use against what a running mailflowd exports.

The exposition comes from the real binary: the checker starts it on a configuration with a STARTTLS listener (a
certificate), a fixed and an MX upstream, a connector, TLS-RPT sending and HTTP, and scrapes /metrics. Every family
declared in daemon/telemetry.cpp must be in that scrape with samples, so that its label names are seen.

1. docs/metrics.md's reference table lists every exported family (name, type, label names), and nothing else.
2. Every metric name in docs/, README.md, the man pages, deploy/prometheus (rules, rule tests, the example), the
   Kubernetes PrometheusRule, deploy/grafana/*.json and the dashboard test's sample metrics is an exported family
   (or one of its histogram series), and the label names of a selector behind it ({reason}, {leg="upstream"}) are
   its labels or a scrape's (instance, job); `mailflow_window_*` is a prefix that must match one. Recording rules
   (`mailflow_fleet:...`, with a colon) are the rules' own names, not the daemon's: each must be a `record:` of
   deploy/prometheus.
   The executables the build makes (mailflow_loadgen, ...) are names of programs, not metrics.
3. Every value of a closed vocabulary that the scrape exports (every `reason` and `result`, `offered`, `kind`,
   `insight`, `component`, ...: each family exports all of its values from the start) is named in the docs, as
   `value` or "value", so that an operator who sees a series can look up what it counts. Not the names the
   configuration gives (listeners, upstreams, connectors, certificate files) nor the OpenSSL reason strings of
   mailflow_tls_handshake_failures_total (see NOT_NAMED_VALUES).
4. Every label matcher on a fixed vocabulary in the rules, the dashboard and the docs ({reason="timeout"},
   {leg!="upstream"}, {tls_version=~"TLS1\\.[01]"}) matches a value that the scrape exports: a misspelt value makes a
   rule that never fires, or a `!=` that excludes nothing, and Prometheus says nothing about either. Values built
   by a template (`%s`, `$var`) are left alone.
5. The contract's Metrics table (INTERFACE.md, --interface FILE; not part of this repository) is only reported on:
   a metric there that the daemon does not export, or exports with another type or other labels, is printed as a
   NOTE, not a failure.

Before it reads the files it runs the same checks on known-bad lines (a wrong label, a wrong type, a metric that
does not exist) and fails if they would pass, so the checker itself can fail.

Usage: check_metrics.py --binary build/dev/daemon/mailflowd --source . [--interface INTERFACE.md]
"""
import argparse
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from free_port import free_port  # noqa: E402  (tests/tools is not a package)

REFERENCE = os.path.join("docs", "metrics.md")
# `mailflow_x` or process_x, not part of a longer word or a recording rule's name (mailflow_fleet:...).
METRIC = re.compile(r"(?<![\w:])((?:mailflow|process)_[a-z0-9_]*)(?![\w:])(\*?)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels a series has in Prometheus besides its own: the scrape's target labels, the name, a histogram's le.
TARGET_LABELS = {"instance", "job", "__name__", "le"}
# Label values that the docs need not name one by one: say why when adding one.
NOT_NAMED_VALUES = {
    "listener": "a listener's configured name (or tlsrpt, http)",
    "upstream": "an upstream's configured name (or tlsrpt)",
    "connector": "a connector's configured name (or internet)",
    "certificate": "a certificate file as configured",
    "version": "the binary's version",
    "le": "a histogram bucket's bound",
    ("mailflow_tls_handshake_failures_total", "reason"): "OpenSSL's own reason strings in snake_case, listed in "
                                                         "daemon/reasons.hpp (docs/operations.md says so)",
}
# | `name` | type | `label`, `label` | meaning |
ROW = re.compile(r"^\| `((?:mailflow|process)_[a-z0-9_]+)` \| ([a-z]+) \| ([^|]*) \|")


def scrape(binary):
    """The /metrics text of mailflowd started on a configuration that makes every family export samples."""
    with tempfile.TemporaryDirectory(prefix="check-metrics-") as work:
        cert, key = os.path.join(work, "c.pem"), os.path.join(work, "c.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "30", "-subj", "/CN=mx.test", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=30)
        # Below the ephemeral range (tests/tools/free_port.py: a bind(0) port is any outgoing connection's to
        # take before the daemon binds it), and three different ones.
        ports = []
        while len(ports) < 3:
            port = free_port()
            if port not in ports:
                ports.append(port)
        smtp, smtp_out, http = ports
        config = os.path.join(work, "mailflowd.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(f"""hostname: mx.test
state_dir: {work}/state
listeners:
  - name: inbound
    address: "127.0.0.1:{smtp}"
    upstream: mailstore
    tls:
      certificates: [{{cert: {cert}, key: {key}}}]
  - name: outbound
    address: "127.0.0.1:{smtp_out}"
    direction: outbound
    upstream: internet
upstreams:
  - {{name: mailstore, address: "127.0.0.1:9"}}
  - {{name: internet, mx: true}}
dns: {{servers: ["127.0.0.1:9"], timeout: 1s}}
tlsrpt: {{send: true}}
connectors:
  - {{name: partner, match: {{listener: inbound, client_cidrs: ["192.0.2.0/24"]}}}}
http: {{address: "127.0.0.1:{http}"}}
""")
        log = open(os.path.join(work, "log"), "w+", encoding="utf-8")
        daemon = subprocess.Popen([binary, "--config", config], stdout=log, stderr=subprocess.STDOUT)
        try:
            # One finished session, so that the session histogram has samples too.
            deadline = time.monotonic() + 15
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", smtp), timeout=5) as s:
                        s.recv(512)
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    break
                except OSError:
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as answer:
                        text = answer.read().decode()
                    if "mailflow_session_duration_seconds_count{" in text or time.monotonic() > deadline:
                        return text
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        except Exception:
            log.seek(0)
            sys.exit(f"FAIL: could not scrape mailflowd (exit {daemon.poll()}):\n{log.read()[-3000:]}")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            log.close()


def label_values(text):
    """{(family, label): {values}} of every sample in an exposition (a histogram's series under its family)."""
    values = {}
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} ", line)
        if not m:
            continue
        name = m.group(1)
        if name not in families:
            name = next((name[:-len(s)] for s in HISTOGRAM_SUFFIXES
                         if name.endswith(s) and families.get(name[:-len(s)]) == "histogram"), name)
        for label, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)):
            values.setdefault((name, label), set()).add(value)
    return values


def check_values(values, lines):
    """Every exported value of a closed vocabulary is named in `lines` (`value` or "value")."""
    text = "\n".join(line.replace("\\_", "_") for _, line in lines)
    named = set(re.findall(r"`([^`\s]+)`", text)) | set(re.findall(r'"([^"\s]+)"', text)) | \
        set(re.findall(r"\\\"([^\"\\\s]+)\\\"", text))
    errors = []
    for (family, label), vals in sorted(values.items()):
        if label in NOT_NAMED_VALUES or (family, label) in NOT_NAMED_VALUES:
            continue
        for value in sorted(vals - named):
            errors.append(f"{family}{{{label}=\"{value}\"}} is exported, but no doc names the value {value} (as "
                          f"`{value}`): say what it counts where the family's other values are described, or add the "
                          f"label to NOT_NAMED_VALUES in {os.path.basename(__file__)} with the reason")
    return errors


MATCHER = re.compile(r"""([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*\\*["']((?:[^"'\\]|\\+[^"'])*)\\*["']""")


def check_matchers(lines, values):
    """Every matcher of a fixed-vocabulary label behind a metric name matches an exported value of that label."""
    errors = []
    for where, line in lines:
        for m in re.finditer(r"\b(mailflow_[a-z0-9_]+)\{([^{}]*)\}", line.replace("\\_", "_")):
            family = m.group(1)
            family = next((family[:-len(s)] for s in HISTOGRAM_SUFFIXES
                           if family.endswith(s) and (family[:-len(s)], "listener") in values), family)
            for label, op, value in MATCHER.findall(m.group(2)):
                exported = values.get((family, label))
                if exported is None or label in NOT_NAMED_VALUES or "%" in value or "$" in value:
                    continue
                value = re.sub(r"\\+", lambda b: "\\", value)  # YAML, Go template and JSON escapes: one backslash
                # Each alternative of a regex without groups on its own: "TLS1\.2|TLS 1\.3" has a dead one.
                alternatives = value.split("|") if "~" in op and "(" not in value else [value]
                for alternative in alternatives:
                    try:
                        pattern = re.compile(alternative if "~" in op else re.escape(alternative))
                    except re.error as e:
                        errors.append(f"{where}: {family}{{{label}{op}\"{value}\"}} is no regular expression ({e})")
                        break
                    if not alternative or any(pattern.fullmatch(v) for v in exported):
                        continue
                    errors.append(f"{where}: {family}{{{label}{op}\"{value}\"}}: \"{alternative}\" matches none of "
                                  f"the values mailflowd exports ({', '.join(sorted(exported))}): {line.strip()[:160]}")
    return errors


def parse_exposition(text):
    """{family: (type, frozenset of label names)} of the families with samples; families with none get None."""
    families = {}
    labels = {}
    for line in text.splitlines():
        m = re.match(r"^# TYPE (\S+) (\S+)$", line)
        if m:
            families[m.group(1)] = m.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        if not m:
            sys.exit(f"FAIL: unparsable exposition line: {line!r}")
        name = m.group(1)
        if name not in families:
            name = next((name[:-len(s)] for s in HISTOGRAM_SUFFIXES
                         if name.endswith(s) and families.get(name[:-len(s)]) == "histogram"), name)
        names = set(re.findall(r'(\w+)="(?:[^"\\]|\\.)*"', m.group(2) or ""))
        if families.get(name) == "histogram":
            names.discard("le")
        labels.setdefault(name, set()).update(names)
    return {name: (kind, frozenset(labels[name]) if name in labels else None) for name, kind in families.items()}


def declared_families(source):
    """The families daemon/telemetry.cpp declares in its one list: {"name", "type", ...}."""
    text = open(os.path.join(source, "daemon", "telemetry.cpp"), encoding="utf-8").read()
    return dict(re.findall(r'constexpr Family \w+\{"([a-z0-9_]+)",\s*"([a-z]+)"', text))


def label_names(cell):
    """`connector`, `direction` -> {connector, direction}; "—" or empty -> set()."""
    return frozenset(re.findall(r"`([a-z_][a-z0-9_]*)`", cell))


def reference_rows(lines):
    """[(where, name, type, labels)] of the table rows in docs/metrics.md."""
    rows = []
    for where, line in lines:
        m = ROW.match(line)
        if m:
            rows.append((where, m.group(1), m.group(2), label_names(m.group(3))))
    return rows


def differences(where, name, kind, labels, exported, said):
    """How one metric as a table `said` it (type, label names) differs from what mailflowd exports."""
    if name not in exported:
        return [f"{where}: {name} is {said} but mailflowd does not export it"]
    real_kind, real_labels = exported[name]
    out = []
    if kind != real_kind:
        out.append(f"{where}: {name} is {said} as a {kind}, mailflowd exports a {real_kind}")
    if real_labels is not None and labels != real_labels:
        out.append(f"{where}: {name} is {said} with labels {sorted(labels)}, mailflowd exports {sorted(real_labels)}")
    return out


def check_reference(rows, exported):
    errors = []
    seen = set()
    for where, name, kind, labels in rows:
        if name in seen:
            errors.append(f"{where}: {name} is listed twice")
        seen.add(name)
        errors += differences(where, name, kind, labels, exported, "documented")
    for name in sorted(set(exported) - seen):
        kind, labels = exported[name]
        errors.append(f"{REFERENCE}: does not list {name} ({kind}, labels {sorted(labels or [])}), which mailflowd "
                      "exports")
    return errors


def exists(name, star, exported):
    if star:
        return any(e.startswith(name) for e in exported)
    if name in exported:
        return True
    return any(name.endswith(s) and exported.get(name[:-len(s)], ("",))[0] == "histogram" for s in HISTOGRAM_SUFFIXES)


def program_names(source):
    """The executables the build makes (tests/bench/mailflow_loadgen, ...): names in the docs that are no metric."""
    names = set()
    for path in glob.glob(os.path.join(source, "**", "CMakeLists.txt"), recursive=True):
        if not os.path.relpath(path, source).startswith("build" + os.sep):
            names.update(re.findall(r"add_executable\(\s*([\w-]+)", open(path, encoding="utf-8").read()))
    return names


def family_of(name, exported):
    """The family of a series name (a histogram's _bucket, _sum, _count belong to it); None if not exported."""
    if name in exported:
        return name
    return next((name[:-len(s)] for s in HISTOGRAM_SUFFIXES
                 if name.endswith(s) and exported.get(name[:-len(s)], ("",))[0] == "histogram"), None)


def selector_labels(text, at):
    """The label names of a selector right after a metric name: {reason}, {leg="upstream", offered=~"TLS1.*"}
    (also with the JSON-escaped quotes of a dashboard); none where no { follows."""
    if at >= len(text) or text[at] != "{":
        return []
    end = text.find("}", at)
    if end < 0:
        return []
    body = re.sub(r'\\?"(?:[^"\\]|\\.)*?\\?"', '""', text[at + 1:end])  # values out of the way
    return [m.group(1) for m in re.finditer(r"(?:^|,)\s*([a-zA-Z_]\w*)", body)]


RECORDED = re.compile(r"(?<![\w:])(mailflow_[a-z0-9_]*:[a-z0-9_:]*[a-z0-9_])(?![\w:])")


def recorded_names(source):
    """The names the shipped recording rules define (record: mailflow_fleet:...)."""
    names = set()
    for path in glob.glob(os.path.join(source, "deploy", "prometheus", "*.yml")):
        names.update(re.findall(r"^\s*-?\s*record:\s*(\S+)", open(path, encoding="utf-8").read(), re.M))
    return names


def check_names(lines, exported, programs=(), recorded=None):
    errors = []
    for where, line in lines:
        text = line.replace("\\_", "_")
        for m in RECORDED.finditer(text) if recorded is not None else ():
            if m.group(1) not in recorded:
                errors.append(f"{where}: {m.group(1)} is no recording rule of deploy/prometheus: {line.strip()[:160]}")
        for m in METRIC.finditer(text):
            name, star = m.group(1), m.group(2)
            if name in ("mailflow_", "process_") or (not star and name.endswith("_")):
                continue  # the prefix itself ("prefix `mailflow_`")
            if name in programs:
                continue
            if not exists(name, star, exported):
                errors.append(f"{where}: {name}{star} is not a metric mailflowd exports: {line.strip()[:160]}")
                continue
            for label in selector_labels(text, m.end()):
                family = family_of(name, exported)
                allowed = (exported[family][1] or frozenset()) | TARGET_LABELS
                if family and exported[family][1] is not None and label not in allowed:
                    errors.append(f"{where}: {name} has no label {label} (its labels: "
                                  f"{', '.join(sorted(exported[family][1]))}): {line.strip()[:160]}")
    return errors


def interface_notes(path, exported):
    """What the contract's Metrics table says that the daemon does not do (reported, not failed)."""
    notes = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        m = re.match(r"^\| (mailflow_[a-z0-9_]+) \| ([^|]+) \| ([^|]*) \|", line)
        if not m:
            continue
        name, kind = m.group(1), m.group(2).split()[0].split("=")[0]
        labels = frozenset(re.findall(r"(?:^|,)\s*([a-z_]+)", re.sub(r"\([^)]*\)", "", m.group(3))))
        where = f"{os.path.basename(path)}:{n}"
        notes += differences(where, name, kind, labels, exported, "in the contract")
    return notes


def file_lines(paths, source):
    for path in paths:
        rel = os.path.relpath(path, source)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield f"{rel}:{n}", line


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--interface", help="a contract file whose Metrics table is reported on (read-only)")
    args = parser.parse_args()
    src = args.source

    scraped = scrape(args.binary)
    exported = parse_exposition(scraped)
    errors = []
    for name, kind in declared_families(src).items():
        if name not in exported:
            errors.append(f"daemon/telemetry.cpp declares {name} but the scrape has no such family")
        elif exported[name][1] is None:
            errors.append(f"the scrape has no sample of {name}: give the checker's configuration what makes it "
                          "export one, so that its labels are checked")
        elif exported[name][0] != kind:
            errors.append(f"daemon/telemetry.cpp declares {name} a {kind}, the scrape says {exported[name][0]}")
    if "mailflow_messages_total" not in exported or len(exported) < 20:
        sys.exit(f"FAIL: the scrape has too few families: {sorted(exported)}")

    # The checker must be able to fail on a wrong reference row, a wrong type and a made-up name.
    bad = [("wrong labels", "| `mailflow_sessions_active` | gauge | `listener`, `connector` | open sessions |"),
           ("wrong type", "| `mailflow_messages_total` | gauge | `connector`, `direction`, `tls_version` | x |")]
    good_row = ("good", "| `mailflow_sessions_active` | gauge | `listener` | open sessions |")
    wrong = [e for e in check_reference(reference_rows(bad), exported) if "does not list" not in e]
    right = [e for e in check_reference(reference_rows([good_row]), exported) if "does not list" not in e]
    made_up = check_names(
        [("made-up", "rate(mailflow_tls_failures_total[5m]) and mailflow_fleet:x:sum"),
         ("made-up label", '"expr": "mailflow_rejects_total{listener=~\\"$l\\",connector=\\"a,b\\"}"')],
        exported, (), {"mailflow_fleet:y:sum"})
    fine = check_names(
        [("fine", "mailflow_session_duration_seconds_bucket{le=\"1\"}, mailflow_window_*, prefix `mailflow_`, "
                  "mailflow_fleet:window_messages:sum, mailflow_rejects_total{reason}, "
                  '"mailflow_rejects_total{job=\\"x\\",listener=~\\"$l,connector\\"}"')],
        exported, (), {"mailflow_fleet:window_messages:sum"})
    sample = 'mailflow_rejects_total{listener="in",reason="bad_sequence"} 0\n' \
             'mailflow_rejects_total{listener="in",reason="made_up_reason"} 0\n'
    unnamed = check_values(label_values(sample), [("doc", "rejects `bad_sequence`")])
    named = check_values(label_values(sample), [("doc", 'rejects `bad_sequence`, {reason="made_up_reason"}')])
    typos = check_matchers([("typo", 'increase(mailflow_rejects_total{reason="tls_requird"}[1h])'),
                            ("typo", 'mailflow_rejects_total{reason!~"local_resource"}'),
                            ("typo", 'mailflow_rejects_total{reason=~"bad_sequence|local_resource"}')],
                           label_values(sample.replace("made_up_reason", "local_resources")))
    matching = check_matchers(
        [("ok", r'mailflow_rejects_total{listener="x",reason=~"bad_.*|local_resources"} and '
                r'mailflow_rejects_total{reason!="local_resources"} {{ printf "mailflow_rejects_total{reason=\"%s\"}" }}'),
         ("ok", r'"expr": "mailflow_rejects_total{reason=~\"bad\\\\_sequence\"}"')],
        label_values(sample.replace("made_up_reason", "local_resources")))
    if len(wrong) != 2 or right or len(made_up) != 3 or fine or len(unnamed) != 1 or named or len(typos) != 3 or \
            matching:
        sys.exit(f"FAIL: the checker cannot tell known-bad from known-good lines: {wrong} {right} {made_up} {fine}")

    reference = os.path.join(src, REFERENCE)
    if not os.path.exists(reference):
        errors.append(f"{REFERENCE} is missing: it is the metrics reference")
    else:
        errors += check_reference(reference_rows(file_lines([reference], src)), exported)

    paths = sorted(glob.glob(os.path.join(src, "docs", "**", "*.md"), recursive=True))
    paths += sorted(glob.glob(os.path.join(src, "docs", "man", "*.scd")))
    paths += [os.path.join(src, "README.md")]
    paths += sorted(glob.glob(os.path.join(src, "deploy", "prometheus", "**", "*.yml"), recursive=True))
    paths += [os.path.join(src, "deploy", "kubernetes", "prometheusrule.yaml")]
    paths += sorted(glob.glob(os.path.join(src, "deploy", "grafana", "*.json")))
    paths += [os.path.join(src, "tests", "deploy", "sample_metrics.py")]
    paths = [p for p in paths if os.path.exists(p)]
    lines = list(file_lines(paths, src))
    recorded = recorded_names(src)
    if "mailflow_fleet:window_tls_share:ratio" not in recorded:
        sys.exit(f"FAIL: cannot read the recording rules' names from deploy/prometheus: {sorted(recorded)}")
    errors += check_names(lines, exported, program_names(src), recorded)
    # The values are looked up in what an operator reads: docs/, the man pages and README.md.
    values = label_values(scraped)
    if len(values.get(("mailflow_rejects_total", "reason"), ())) < 20:
        sys.exit(f"FAIL: cannot read the label values of the scrape: {sorted(values)}")
    errors += check_values(values, [(w, ln) for w, ln in lines if w.startswith(("docs", "README"))])
    errors += check_matchers(lines, values)

    if args.interface and os.path.exists(args.interface):
        for note in interface_notes(args.interface, exported):
            print("NOTE:", note)
    for e in errors:
        print("FAIL:", e)
    print(f"checked {len(exported)} exported families against {REFERENCE}, the metric names in "
          f"{len(paths)} files ({len(lines)} lines) and {sum(map(len, values.values()))} exported label values")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
