"""Every thread of the daemon at once: performance.event_loops: 3 relaying sessions (plain and STARTTLS, from
several client addresses, two connectors), the HTTP thread serving /metrics and the reports while they run,
SIGHUP reloads that change the log level, busy_poll, a connector's thresholds, dns (every loop makes its resolvers
for the upstream's host name again) and the listener's certificates under load, and the state writer saving
every 200 ms (a Debug build's failpoint). Every message is delivered once and counted once under its connector;
every reload succeeds. Under the tsan preset (CMakePresets.json) this is the test that finds data races:
ThreadSanitizer's report ends the daemon with a non-zero exit code and its text is in the assertion (it found
libunbound contexts set up on one loop while another loop deleted one: resolver.cpp's finalize_context)."""
import json
import os
import signal
import threading
import time

import pytest

import harness
import hostile_helpers as hh
import http_helpers

CLIENTS = ["127.0.0.189", "127.0.0.190", "127.0.0.191", "127.0.0.192"]  # this file's fixed addresses
PARTNER = "127.0.0.189"
MESSAGES_PER_CLIENT = 12
RELOADS = 8


@pytest.fixture(scope="module")
def sink(sink_factory):
    return sink_factory("store")


def variant(cfg, i, other):
    """The configuration of reload `i`: what a reload applies to running loops, changed each time."""
    cfg = json.loads(json.dumps(cfg))
    cfg["log"]["level"] = "debug" if i % 2 else "info"
    cfg["performance"]["busy_poll"] = i % 3 == 0
    cfg["connectors"][0]["alerts"] = {"tls10_share": 0.01 * (i + 1), "min_messages": 10 + i}
    cfg["dns"] = {"timeout": f"{5 + i % 2}s"}  # each loop makes its resolvers again (libunbound threads)
    if i % 2:  # a second certificate (picked by SNI), then none again: new TLS contexts for the listener
        cfg["listeners"][0]["tls"]["certificates"].append({"cert": str(other[0]), "key": str(other[1])})
    return cfg


def send_all(port, source, results, errors):
    for n in range(MESSAGES_PER_CLIENT):
        try:
            c = hh.greeted(port, source=source, ehlo=f"client-{source.replace('.', '-')}.example.test")
            try:
                if n % 2:
                    assert c.cmd("STARTTLS")[0] == 220
                    c.starttls("TLS1.2")
                    assert c.cmd("EHLO client.example.test")[0] == 250
                code, text = hh.transaction(c, hh.message(f"{source} message {n}"))
                results.append((source, code, text))
                c.cmd("QUIT")
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001 - reported by the test, with the client that saw it
            errors.append(f"{source} message {n}: {e!r}")


def scrape_until(daemon, done, counts, errors):
    http_port = int(daemon.config["http"]["address"].rsplit(":", 1)[1])
    paths = ["/metrics", "/api/v1/report", "/api/v1/report.csv", "/", "/api/v1/connectors",
             "/api/v1/remotes.csv", "/readyz"]
    while not done.is_set():
        for path in paths:
            try:
                status, _, _, _ = http_helpers.get(http_port, path, source="127.0.0.1", timeout=10)
                counts[status] = counts.get(status, 0) + 1
            except Exception as e:  # noqa: BLE001
                errors.append(f"GET {path}: {e!r}")


def test_loops_http_reloads_and_saves_at_once(sink, workdir, mailflowd_bin, certs):
    other = harness.ca_signed_cert(certs, workdir, "other", ["other.example.test"])
    port = harness.free_port()
    state = workdir / "threads-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(
        state, harness.free_port(), [hh.listener("inbound", port, "store", certs=certs)],
        [{"name": "store", "address": f"localhost:{sink.port}", "tls": "none"}],  # a name: per-loop resolvers
        [{"name": "partner", "type": "partner", "direction": "inbound",
          "match": {"listener": "inbound", "client_cidrs": [f"{PARTNER}/32"]}, "upstream": "store"}],
        performance={"event_loops": 3, "busy_poll": False})
    os.environ["MAILFLOWD_FAILPOINTS"] = "state.save_interval=200ms"
    try:
        d = harness.Daemon(mailflowd_bin, workdir, cfg, name="threads").start(timeout=60)
    finally:
        del os.environ["MAILFLOWD_FAILPOINTS"]
    try:
        before = d.metrics()
        delivered = sink.count()
        done = threading.Event()
        results, errors, statuses = [], [], {}
        clients = [threading.Thread(target=send_all, args=(port, source, results, errors)) for source in CLIENTS]
        scraper = threading.Thread(target=scrape_until, args=(d, done, statuses, errors))
        scraper.start()
        for t in clients:
            t.start()
        reloaded = 0
        for i in range(RELOADS):
            d.config_path.write_text(json.dumps(variant(cfg, i, other), indent=2) + "\n")
            base = harness.value(d.metrics(), "mailflow_config_reloads_total")
            d.proc.send_signal(signal.SIGHUP)
            harness.wait_for(lambda: harness.value(d.metrics(), "mailflow_config_reloads_total") > base, 30,
                             what=f"reload {i}")
            reloaded += 1
            time.sleep(0.2)
        for t in clients:
            t.join(120)
        done.set()
        scraper.join(30)
        assert not errors, "\n".join(errors[:20])
        sent = len(CLIENTS) * MESSAGES_PER_CLIENT
        refused = [r for r in results if r[1] != 250]
        assert len(results) == sent and not refused, refused[:5]
        assert len(sink.wait_messages(delivered + sent, timeout=30)) == delivered + sent
        assert set(statuses) == {200}, statuses
        after = harness.wait_moved(d, before, at_least=sent, timeout=10)
        moved = harness.delta(before, after, "mailflow_messages_total")
        per_connector = {}
        for labels, n in moved.items():
            per_connector[dict(labels)["connector"]] = per_connector.get(dict(labels)["connector"], 0) + n
        assert per_connector == {"partner": MESSAGES_PER_CLIENT, "internet": sent - MESSAGES_PER_CLIENT}, \
            harness.fmt_delta(moved)
        assert harness.value(after, "mailflow_config_reloads_total", result="success") - \
            harness.value(before, "mailflow_config_reloads_total", result="success") == reloaded
    finally:
        code = d.stop(timeout=60)
        if d in harness.LIVE:
            harness.LIVE.remove(d)
    stderr = d.stderr()
    race = stderr.find("WARNING: ThreadSanitizer")
    assert race < 0, stderr[race:race + 12000]
    assert code == 0, f"exit code after SIGTERM = {code!r}\n{d.log_tail()}"
