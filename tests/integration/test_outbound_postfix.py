"""A real Postfix as the sending MTA, with mailflowd's outbound listener as its relayhost (issue #14).

One message to recipients at three partner domains. mailflowd takes the first recipient's route and answers
the other two `452 4.5.3` (another route: a transaction of its own); Postfix defers them and delivers them in
later delivery attempts. Checked: every recipient arrives at its own domain's MX sink (found through knotd),
each exactly once, and mailflowd counts each message once under the partner's connector by the TLS version
of its leg to that MX (TLS1.3, TLS1.2, TLS1.0).

Measured (printed; docs/outbound.md "Several recipient domains in one message: 452 4.5.3"): how long the
452'd recipients wait with short queue timers, and that with one recipient per delivery
(`mailflowd_destination_recipient_limit = 1` on a transport of its own) no recipient waits at all, even with
Postfix's default queue timers (300 s)."""
import re
import shutil
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

import pytest

import harness
from harness import delta, fmt_delta, series_key
from postfix_helpers import PostfixInstance, postfix_usable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

_why = postfix_usable()
if _why:
    pytest.skip(f"Postfix cannot run here: {_why}", allow_module_level=True)

SENDER = "app@corp.example"
ADDR = {"alpha": "127.0.0.61", "beta": "127.0.0.62", "gamma": "127.0.0.63"}
TLS = {"alpha": ("TLSv1.3", "TLS1.3"), "beta": ("TLSv1.2", "TLS1.2"), "gamma": ("TLSv1", "TLS1.0")}
ZONE = """$ORIGIN example.net.
$TTL 300
@         SOA  ns hostmaster 1 3600 600 86400 300
@         NS   ns
ns        A    127.0.0.1
alpha     MX   10 mx.alpha
mx.alpha  A    {alpha}
beta      MX   10 mx.beta
mx.beta   A    {beta}
gamma     MX   10 mx.gamma
mx.gamma  A    {gamma}
""".format(**ADDR)
SHORT_TIMERS = {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"}


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    # A short directory for knotd: its control socket path must fit a unix socket address (107 bytes).
    knot_dir = tempfile.mkdtemp(prefix="mf-pf-")
    knot = KnotServer(knot_dir, {"example.net": ZONE})
    try:
        knot.start()
        mx_port = harness.free_port(*ADDR.values())
        tls = {"tls_cert": certs / "sink.pem", "tls_key": certs / "sink.key"}
        sinks = {
            "alpha": sink_factory("mx-alpha", host=ADDR["alpha"], port=mx_port, **tls),
            "beta": sink_factory("mx-beta", host=ADDR["beta"], port=mx_port, tls_max_version="TLS1.2", **tls),
            "gamma": sink_factory("mx-gamma", host=ADDR["gamma"], port=mx_port, tls_max_version="TLS1.0", **tls),
        }
        out_port = harness.free_port()
        connectors = [{"name": f"partner-{k}", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": [f"{k}.example.net"]}, "upstream": "internet"}
                      for k in ADDR]
        daemon = daemon_factory([{"name": "out", "address": f"127.0.0.1:{out_port}", "direction": "outbound",
                                  "upstream": "internet"}],
                                [{"name": "internet", "mx": True, "port": mx_port, "tls": "opportunistic"}],
                                connectors, dns={"servers": [knot.address], "timeout": "2s"})
        yield types.SimpleNamespace(daemon=daemon, sinks=sinks, relayhost=f"[127.0.0.1]:{out_port}",
                                    workdir=workdir)
    finally:
        knot.stop()
        shutil.rmtree(knot_dir, ignore_errors=True)


def message(rcpts):
    return (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: three partners\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@corp.example>\r\n\r\nhello partners\r\n").encode()


def deliver_through_postfix(env, name, main, timeout):
    """Starts a private Postfix, submits one message for a@alpha, b@beta, c@gamma, waits until each partner's
    MX has it; returns (seconds from submission to each arrival, the Postfix maillog, metrics before)."""
    rcpts = {k: f"{k[0]}-{uuid.uuid4().hex[:6]}@{k}.example.net" for k in ADDR}
    counts = {k: s.count() for k, s in env.sinks.items()}
    before = env.daemon.metrics()
    pf = PostfixInstance(env.workdir, name, env.relayhost, main).start()
    try:
        t0 = time.time()
        pf.submit(SENDER, list(rcpts.values()), message(list(rcpts.values())))
        arrived = {}
        deadline = time.monotonic() + timeout
        while len(arrived) < len(rcpts) and time.monotonic() < deadline:
            for k, s in env.sinks.items():
                if k not in arrived and s.count() > counts[k]:
                    meta = s.messages()[counts[k]][0]
                    arrived[k] = int(meta["id"].split("-")[0]) / 1e9 - t0
            time.sleep(0.05)
        time.sleep(1.5)  # a duplicate from a later queue run would show up here
        log = pf.log()
    finally:
        pf.stop()
    print(f"\n[{name}] {main}: arrival after submission: "
          + ", ".join(f"{k}@+{arrived[k]:.2f}s" for k in sorted(arrived, key=arrived.get)))
    for line in log.splitlines():
        if "status=" in line:
            print("   ", re.sub(r"^.*?: ", "", line, count=1)[:220])
    assert set(arrived) == set(rcpts), (f"not every recipient arrived within {timeout}s: arrived {arrived}\n"
                                        f"Postfix log:\n{log[-6000:]}")
    for k, rcpt in rcpts.items():
        new = env.sinks[k].messages()[counts[k]:]
        assert len(new) == 1, f"{k}: {len(new)} copies at its MX (want exactly one): {[m for m, _ in new]}"
        meta = new[0][0]
        assert meta["rcpt_tos"] == [rcpt], f"{k}'s MX got {meta['rcpt_tos']}, want only {rcpt}"
        assert meta["mail_from"] == SENDER and meta["tls_version"] == TLS[k][0], meta
    after = harness.wait_moved(env.daemon, before, at_least=3)
    moved = delta(before, after, "mailflow_messages_total")
    assert moved == {series_key(connector=f"partner-{k}", direction="outbound", tls_version=TLS[k][1]): 1.0
                     for k in ADDR}, fmt_delta(moved)
    return arrived, log


def test_postfix_default_recipient_limit_452_then_later_queue_runs(env):
    arrived, log = deliver_through_postfix(env, "pf-short", SHORT_TIMERS, timeout=30)
    deferred = re.findall(r"dsn=4\.5\.3, status=deferred \(host \S+ said: 452 4\.5\.3 ", log)
    sent = re.findall(r"status=sent", log)
    # One domain per delivery attempt: 2 recipients deferred after the first, 1 after the second.
    assert (len(deferred), len(sent)) == (3, 3), f"deferred {len(deferred)}, sent {len(sent)}:\n{log}"
    # The deferred recipients are not retried inside the same delivery: each waits for a queue run.
    times = sorted(arrived.values())
    assert times[1] - times[0] >= 0.5 and times[2] - times[1] >= 0.5, arrived


def test_postfix_one_recipient_per_delivery_needs_no_retry(env):
    # A transport of its own for mailflowd (master.cf: "mailflowd unix - - n - - smtp"), one recipient per
    # delivery; Postfix's default queue timers (300 s): any 452 would mean minutes of waiting.
    arrived, log = deliver_through_postfix(
        env, "pf-rcpt1", {"default_transport": "mailflowd", "mailflowd_destination_recipient_limit": "1"},
        timeout=20)
    assert "status=deferred" not in log, log
    assert max(arrived.values()) < 10, arrived
