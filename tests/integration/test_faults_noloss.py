"""No message is lost or duplicated while the upstream dies: several concurrent Python SMTP clients send
~2,000 messages (unique Message-IDs) through mailflowd while the sink is SIGKILLed and restarted on the same
port at random moments (a bounded loop). Afterwards every message that got a 250 is at the sink exactly once,
no Message-ID is at the sink twice, and mailflow_messages_total moved by exactly the number of 250s.

The only messages that may be at the sink without a 250 are those in flight when the sink was killed after
it had stored them but before its 250 reached mailflowd (the classic SMTP duplicate window: the client got a
4xx and would retry); there can be at most one per client per kill, and none of them is counted."""
import collections
import random
import re
import smtplib
import threading
import time
import types
import uuid

import pytest

import harness
import hostile_helpers as hh

CLIENTS = 5
PER_CLIENT = 400
PER_SESSION = 25
MIN_KILLS = 3
MAX_KILLS = 12
SEND_BUDGET = 40.0  # seconds; the run is bounded even on a slow machine


@pytest.fixture(scope="module")
def env(certs, workdir, daemon_factory):
    sink = harness.Sink(workdir, name="store")
    sink.argv.remove("--verbose")  # per-line debug logging would dominate the run time
    sink.start()
    port = harness.free_port()
    daemon = daemon_factory(listeners=[hh.listener("inbound", port, "store")],
                            upstreams=[hh.plain_upstream("store", sink.port)],
                            timeouts={"upstream_connect": "2s", "greeting": "3s", "command": "5s",
                                      "data_end": "5s"},
                            log={"level": "warn", "format": "text"})
    yield types.SimpleNamespace(sink=sink, daemon=daemon, port=port)
    sink.stop()


class Client(threading.Thread):
    def __init__(self, port, index, stop_at, faults_done):
        super().__init__(daemon=True)
        self.port, self.index, self.stop_at, self.faults_done = port, index, stop_at, faults_done
        self.accepted, self.refused, self.errors = [], [], collections.Counter()
        self.last = None

    def more(self, sent):
        """PER_CLIENT messages, and on until the sink has been killed MIN_KILLS times (a fast relay must not
        finish before the faults happen); never past the send budget."""
        return (sent < PER_CLIENT or not self.faults_done.is_set()) and time.monotonic() < self.stop_at

    def run(self):
        sent = 0
        while self.more(sent):
            try:
                s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="noloss.example.test", timeout=15)
            except OSError as e:
                self.errors[f"connect: {e.__class__.__name__}"] += 1
                time.sleep(0.05)
                continue
            try:
                s.ehlo()
                for _ in range(PER_SESSION):
                    if not self.more(sent):
                        break
                    sent += 1
                    mid = f"<noloss-{self.index}-{sent}-{uuid.uuid4().hex[:8]}@example.test>"
                    self.one(s, mid)
                s.quit()
            except (smtplib.SMTPServerDisconnected, OSError) as e:
                self.errors[f"session: {e.__class__.__name__}"] += 1
            finally:
                s.close()

    def one(self, s, mid):
        if self.refused and self.refused[-1][0] == self.last:
            time.sleep(0.02)  # a real client backs off after a 4xx
        self.last = mid
        data = hh.message(f"noloss {mid}", message_id=mid)
        code, text = s.mail(hh.SENDER)
        if code != 250:
            self.refused.append((mid, "MAIL", code))
            s.rset()
            return
        code, text = s.rcpt(hh.RCPT)
        if code != 250:
            self.refused.append((mid, "RCPT", code))
            s.rset()
            return
        try:
            code, text = s.data(data)
        except smtplib.SMTPDataError as e:
            self.refused.append((mid, "DATA", e.smtp_code))
            s.rset()
            return
        if code == 250:
            self.accepted.append(mid)
        else:
            self.refused.append((mid, "end", code))
            if code >= 500:
                raise AssertionError(f"a 5xx for a message while the upstream flapped: {code} {text!r}")


def restart(sink):
    sink.proc.kill()
    sink.proc.wait()
    if sink in harness.LIVE:
        harness.LIVE.remove(sink)
    sink.start()


def test_no_message_lost_or_duplicated_while_upstream_flaps(env):
    before = env.daemon.metrics()
    stop_at = time.monotonic() + SEND_BUDGET
    faults_done = threading.Event()
    clients = [Client(env.port, i, stop_at, faults_done) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    rng = random.Random()
    kills = 0
    time.sleep(0.5)
    while any(c.is_alive() for c in clients) and kills < MAX_KILLS:
        time.sleep(rng.uniform(0.05, 0.25))
        restart(env.sink)
        kills += 1
        if kills >= MIN_KILLS:
            faults_done.set()
    faults_done.set()
    for c in clients:
        c.join(SEND_BUDGET + 30)
        assert not c.is_alive(), f"client {c.index} hung"

    accepted = [m for c in clients for m in c.accepted]
    refused = [r for c in clients for r in c.refused]
    errors = sum((c.errors for c in clients), collections.Counter())
    attempted = len(accepted) + len(refused)
    summary = (f"kills={kills} attempted={attempted} accepted={len(accepted)} refused={len(refused)} "
               f"(by step: {collections.Counter(r[1] for r in refused)}) errors={dict(errors)}")
    harness.TRANSCRIPTS.append(summary)
    assert kills >= MIN_KILLS, f"the sink was not killed often enough to prove anything: {summary}"
    assert attempted >= 600, f"too few messages went through the run: {summary}"
    assert refused, f"no message met a dead upstream, the faults were not exercised: {summary}"
    assert len(accepted) >= attempted // 2, f"most messages should get through: {summary}"

    after = hh.wait_counter(env.daemon, before, "mailflow_messages_total", at_least=len(accepted))
    counted = sum(harness.delta(before, after, "mailflow_messages_total").values())

    at_sink = collections.Counter()
    for meta, content in env.sink.messages():
        m = re.search(rb"^Message-ID: (<noloss-[^>]+>)\r$", content, re.M | re.I)
        assert m, f"a message without our Message-ID at the sink: {content[:300]!r}"
        at_sink[m.group(1).decode()] += 1
    twice = {k: v for k, v in at_sink.items() if v > 1}
    assert not twice, f"messages at the sink more than once: {list(twice.items())[:10]}"
    lost = [m for m in accepted if at_sink[m] != 1]
    assert not lost, f"{len(lost)} message(s) got a 250 but are not at the sink: {lost[:10]}; {summary}"
    assert counted == len(accepted), (f"mailflow_messages_total moved by {counted}, but {len(accepted)} messages "
                                      f"got a 250; {summary}")
    extra = set(at_sink) - set(accepted)
    assert len(extra) <= kills * CLIENTS, (f"{len(extra)} messages at the sink without a 250 (more than one per "
                                            f"client per kill): {summary}")
    assert sum(at_sink.values()) == counted + len(extra)
    print(summary, f"at sink without a 250 (duplicate window at a kill): {len(extra)}")
    hh.assert_relays(env.daemon, env.port, env.sink)
