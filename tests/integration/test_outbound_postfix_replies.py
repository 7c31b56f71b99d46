"""What a real sending Postfix makes of mailflowd's reply to each outbound failure (docs/outbound.md).

Postfix, with mailflowd's outbound listener as its relayhost and one recipient per delivery (the transport of
docs/outbound.md), sends one message to a recipient at each kind of destination that knotd describes. Each
outcome is read from Postfix's own log (status and dsn), as an administrator reads it:

- the domain does not exist (NXDOMAIN): bounced, 5.1.2;
- a null MX (RFC 7505): bounced, 5.1.10;
- MX hosts without an address: bounced, 5.1.2;
- the only MX host refuses the connection: deferred, 4.4.1 (the sending MTA keeps the mail);
- the MX host refuses the recipient with 550 5.1.1 / 450 4.2.0: bounced 5.1.1 / deferred 4.2.0, its own words;
- a domain that works: sent, counted once under the connector.

A deferral here is per recipient ("in reply to RCPT TO command"): none of them may suspend delivery to the
relayhost ("delivery temporarily suspended"), through which all of the MTA's outbound mail goes.
"""
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
from postfix_helpers import PostfixInstance, postfix_usable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

_why = postfix_usable()
if _why:
    pytest.skip(f"Postfix cannot run here: {_why}", allow_module_level=True)

SENDER = "app@corp.example"
# This file's fixed loopback addresses (tests/integration/README.md): 127.0.7.131 - 127.0.7.140.
ADDR = {"ok": "127.0.7.131", "down": "127.0.7.132", "picky": "127.0.7.133"}
ZONE = """$ORIGIN example.net.
$TTL 300
@          SOA  ns hostmaster 1 3600 600 86400 300
@          NS   ns
ns         A    127.0.0.1
ok         MX   10 mx.ok
mx.ok      A    {ok}
down       MX   10 mx.down
mx.down    A    {down}
picky      MX   10 mx.picky
mx.picky   A    {picky}
nullmx     MX   0 .
noaddr     MX   10 mx.noaddr
mx.noaddr  TXT  "no address here"
""".format(**ADDR)

# recipient -> (Postfix's status, its dsn, a piece of the reply text it quotes)
EXPECTED = {
    "a@ok.example.net": ("sent", "2.0.0", None),
    "b@nx.example.net": ("bounced", "5.1.2", "does not exist"),
    "c@nullmx.example.net": ("bounced", "5.1.10", "null MX"),
    "d@noaddr.example.net": ("bounced", "5.1.2", "no address for the mail hosts"),
    "e@down.example.net": ("deferred", "4.4.1", "No mail host of down.example.net could be used"),
    "nouser@picky.example.net": ("bounced", "5.1.1", "no such user"),
    "full@picky.example.net": ("deferred", "4.2.0", "try later"),
}


@pytest.fixture(scope="module")
def env(workdir, sink_factory, daemon_factory):
    knot_dir = tempfile.mkdtemp(prefix="mf-pfr-")
    knot = KnotServer(knot_dir, {"example.net": ZONE})
    try:
        knot.start()
        mx_port = harness.free_port(*ADDR.values())
        sinks = {
            "ok": sink_factory("mx-ok", host=ADDR["ok"], port=mx_port),
            "picky": sink_factory("mx-picky", host=ADDR["picky"], port=mx_port,
                                  fail_rcpt=["nouser@picky.example.net=550 5.1.1 no such user",
                                             "full@picky.example.net=450 4.2.0 mailbox busy, try later"]),
        }
        out_port = harness.free_port()
        daemon = daemon_factory([{"name": "out", "address": f"127.0.0.1:{out_port}", "direction": "outbound",
                                  "upstream": "internet"}],
                                [{"name": "internet", "mx": True, "port": mx_port, "tls": "opportunistic",
                                  "mta_sts": "off"}],
                                dns={"servers": [knot.address], "timeout": "2s"})
        yield types.SimpleNamespace(daemon=daemon, sinks=sinks, relayhost=f"[127.0.0.1]:{out_port}",
                                    workdir=workdir)
    finally:
        knot.stop()
        shutil.rmtree(knot_dir, ignore_errors=True)


def status_lines(log, rcpt):
    return [line for line in log.splitlines() if f"to=<{rcpt}>" in line and "status=" in line]


def test_postfix_bounces_or_defers_each_outbound_failure_as_its_reply_says(env):
    before = env.daemon.metrics()
    pf = PostfixInstance(env.workdir, "pf-replies", env.relayhost,
                         {"default_transport": "mailflowd", "mailflowd_destination_recipient_limit": "1"})
    pf.start()
    try:
        rcpts = list(EXPECTED)
        msg = (f"From: {SENDER}\r\nTo: undisclosed-recipients:;\r\nSubject: failures\r\n"
               f"Message-ID: <{uuid.uuid4().hex}@corp.example>\r\n\r\nhello\r\n").encode()
        pf.submit(SENDER, rcpts, msg)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = pf.log()
            if all(status_lines(log, r) for r in rcpts):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # a second status line (a retry, a suspension) would show up here
        log = pf.log()
    finally:
        pf.stop()
    problems = []
    for rcpt, (status, dsn, text) in EXPECTED.items():
        lines = status_lines(log, rcpt)
        if not lines:
            problems.append(f"{rcpt}: no status line")
            continue
        line = lines[0]
        got = re.search(r"dsn=(\S+), status=(\S+)", line)
        if not got or got.groups() != (dsn, status):
            problems.append(f"{rcpt}: want dsn={dsn}, status={status}: {line}")
        elif text and text not in line:
            problems.append(f"{rcpt}: the reply does not say {text!r}: {line}")
        elif status != "sent" and "in reply to RCPT TO command" not in line:
            problems.append(f"{rcpt}: not a reply to its RCPT TO: {line}")
    assert not problems, "\n".join(problems) + f"\n\nPostfix log:\n{log[-8000:]}"
    assert "delivery temporarily suspended" not in log, log
    assert "timed out" not in log and "lost connection" not in log, log
    # The one that went through arrived once and counts once, under the outbound connector internet.
    assert env.sinks["ok"].count() == 1
    after = harness.wait_moved(env.daemon, before, at_least=1)
    moved = harness.delta(before, after, "mailflow_messages_total")
    assert sum(moved.values()) == 1.0, harness.fmt_delta(moved)

