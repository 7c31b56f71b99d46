"""Upstream unreachable -> 421/451 to the client, nothing counted, mailflow_upstream_errors_total moved.
Upstream 5xx to RCPT and to end-of-data -> the exact upstream reply text reaches the client; a message
with one refused and one accepted recipient is delivered to the accepted one and counted once."""
import re
import types

import pytest

import harness
from harness import delta, fmt_delta, value

MESSAGE = b"From: s@example.test\r\nTo: r@dest.test\r\nSubject: failures\r\n\r\nbody\r\n"
RCPT_REFUSAL = "550 5.1.1 <nobody@dest.test>: Recipient address rejected: no such user"
DATA_REFUSAL = "554 5.7.1 Message rejected by upstream policy (id 42)"


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    picky = sink_factory("picky", fail_rcpt=[f"nobody@dest.test={RCPT_REFUSAL}"])
    refusing = sink_factory("refusing", fail_data=DATA_REFUSAL)
    dead_port = harness.free_port()  # nothing listens there
    routes = {"to-dead": ("dead", dead_port), "to-picky": ("picky", picky.port),
              "to-refusing": ("refusing", refusing.port)}
    ports = {name: harness.free_port() for name in routes}
    daemon = daemon_factory(
        listeners=[{"name": name, "address": f"127.0.0.1:{ports[name]}", "direction": "inbound",
                    "tls": harness.listener_tls(certs), "upstream": up} for name, (up, _) in routes.items()],
        upstreams=[{"name": up, "address": f"127.0.0.1:{port}", "tls": "opportunistic"}
                   for up, port in routes.values()])
    return types.SimpleNamespace(daemon=daemon, ports=ports, picky=picky, refusing=refusing)


def test_upstream_down_gives_4xx(env):
    before = env.daemon.metrics()
    r = harness.swaks(env.ports["to-dead"], data=MESSAGE)
    replies = r.final_replies()
    assert r.rc != 0, f"the transaction must fail:\n{r}"
    assert any(re.match(r"^(421|451)[ -]", x) for x in replies), f"expected 421 or 451:\n{r}"
    assert not any(re.match(r"^5\d\d", x) for x in replies), f"a down upstream is temporary, not 5xx:\n{r}"
    after = harness.assert_not_counted(env.daemon, before)
    errs = delta(before, after, "mailflow_upstream_errors_total", upstream="dead")
    assert errs, ("mailflow_upstream_errors_total{upstream=dead} did not move; all moves:\n"
                  + fmt_delta(delta(before, after, "mailflow_upstream_errors_total")))


def test_rcpt_refusal_text_relayed(env):
    before = env.daemon.metrics()
    r = harness.swaks(env.ports["to-picky"], to="nobody@dest.test", data=MESSAGE)
    assert RCPT_REFUSAL in r.final_replies(), f"upstream's RCPT reply not relayed verbatim:\n{r}"
    assert env.picky.count() == 0
    harness.assert_not_counted(env.daemon, before)


def test_partial_recipients(env):
    before = env.daemon.metrics()
    n = env.picky.count()
    c = harness.RawSmtp(env.ports["to-picky"])
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<r@dest.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<nobody@dest.test>")
        assert text == RCPT_REFUSAL, f"upstream's RCPT reply not relayed verbatim: {text!r}"
        assert c.cmd("DATA")[0] == 354
        c.send(harness.dot_stuff(MESSAGE))
        assert c.cmd(".")[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()
    meta, content = env.picky.wait_messages(n + 1)[-1]
    assert meta["rcpt_tos"] == ["r@dest.test"]
    assert harness.split_received(content)[1] == MESSAGE
    after = harness.assert_counted(env.daemon, before, "internet", "inbound", "none")
    rcpts = value(after, "mailflow_recipients_total", tls_version="none") - \
        value(before, "mailflow_recipients_total", tls_version="none")
    assert rcpts == 1, f"one recipient was accepted, mailflow_recipients_total moved by {rcpts}"


def test_data_refusal_text_relayed(env):
    before = env.daemon.metrics()
    r = harness.swaks(env.ports["to-refusing"], data=MESSAGE)
    replies = r.final_replies()
    after_354 = [replies[i + 1] for i, x in enumerate(replies[:-1]) if x.startswith("354")]
    assert after_354 == [DATA_REFUSAL], f"upstream's end-of-data reply not relayed verbatim:\n{r}"
    assert env.refusing.count() == 0
    harness.assert_not_counted(env.daemon, before)
