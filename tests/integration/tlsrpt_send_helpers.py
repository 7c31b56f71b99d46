"""What test_tlsrpt_send.py and test_tlsrpt_send_timeouts.py share (TLS-RPT reports sent by the real daemon): the
report day DATE and SUBMITTER, the zone rpt.example.net that knotd (tests/tools/dns_server.py) serves with every
rua domain's MX hosts on 127.0.0.x and the https rua hosts, the https rua server that takes the POSTs (Collector,
with a certificate from the test CA), a port that takes connections and never answers, and the helpers that write
a daemon's tlsrpt.state and read its reports and deliveries. The fixtures are imported by name into each test
file (pytest finds them there); each file runs in its own process, so each has its own knotd, server and posts."""
import http.server
import json
import socket
import sys
import time
from pathlib import Path

import pytest

import harness

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

DATE = "2026-01-02"
ADDR = {"ok": "127.0.0.51", "busy": "127.0.0.52"}
LEDGER_ADDR = {"took": "127.0.0.53", "later": "127.0.0.54"}  # the restart test's own rua hosts
STALL_ADDR = "127.0.0.55"  # an MX host that takes the connection and never greets
AGAIN_ADDR = "127.0.0.150"  # the one-report-per-day test's rua host
TURN_ADDR = {"stuck": "127.0.0.116", "next": "127.0.0.117"}  # the first-try-first test's rua hosts
FQDN_ADDR = "127.0.0.118"  # the fully qualified mailto: rua's MX host
HANG_ADDR = {"hang": "127.0.5.1", "take": "127.0.5.2"}  # the hanging mailto: rua test's MX hosts
# The walk test's MX hosts: one that hangs, then one where nothing listens (refused), and the other rua's host
WALK_ADDR = {"hang": "127.0.7.11", "refuse": "127.0.7.12", "take": "127.0.7.13", "defer": "127.0.7.14"}
ZONE = f"""$ORIGIN rpt.example.net.
$TTL 300
@              SOA   ns hostmaster 1 3600 600 86400 300
@              NS    ns
ns             A     127.0.0.1
ok             MX    10 mx.ok
mx.ok          A     {ADDR["ok"]}
busy           MX    10 mx.busy
mx.busy        A     {ADDR["busy"]}
took           MX    10 mx.took
mx.took        A     {LEDGER_ADDR["took"]}
later          MX    10 mx.later
mx.later       A     {LEDGER_ADDR["later"]}
stall          MX    10 mx.stall
again          MX    10 mx.again
mx.again       A     {AGAIN_ADDR}
mx.stall       A     {STALL_ADDR}
stuck          MX    10 mx.stuck
mx.stuck       A     {TURN_ADDR["stuck"]}
next           MX    10 mx.next
mx.next        A     {TURN_ADDR["next"]}
fq             MX    10 mx.fq
mx.fq          A     {FQDN_ADDR}
hang           MX    10 mx.hang
mx.hang        A     {HANG_ADDR["hang"]}
take           MX    10 mx.take
mx.take        A     {HANG_ADDR["take"]}
walk           MX    10 mx.walkhang
walk           MX    20 mx.walkrefuse
mx.walkhang    A     {WALK_ADDR["hang"]}
mx.walkrefuse  A     {WALK_ADDR["refuse"]}
wtake          MX    10 mx.wtake
walkdefer      MX    10 mx.walkhang
walkdefer      MX    20 mx.walkdefer
mx.walkdefer   A     {WALK_ADDR["defer"]}
mx.wtake       A     {WALK_ADDR["take"]}
lookdrop       MX    10 mx.lookdrop
mx.lookdrop    A     {WALK_ADDR["take"]}
addrdrop       MX    10 mx.addrdrop
mx.addrdrop    A     {WALK_ADDR["take"]}
addrwalk       MX    10 mx.addrdrop
addrwalk       MX    20 mx.walkrefuse
hdrop          A     127.0.0.1
hpart          A     127.0.0.1
reports        A     127.0.0.1
wrong          A     127.0.0.1
silent         A     127.0.0.1
"""
SUBMITTER = "mx.sender.example"


class Collector(http.server.BaseHTTPRequestHandler):
    posts = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Collector.posts.append((self.path, dict(self.headers), body))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def report_cert(certs, workdir):
    """A certificate from the test CA for reports.rpt.example.net."""
    return harness.ca_signed_cert(certs, workdir, "reports", ["reports.rpt.example.net"])


@pytest.fixture(scope="module")
def https_port(report_cert):
    server = harness.https_server(Collector, *report_cert)
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def silent_port():
    """Takes connections (the kernel's backlog completes them) and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture(scope="module")
def knot(workdir):
    server = KnotServer(workdir, {"rpt.example.net": ZONE}).start()
    yield server
    server.stop()


def reports_of(daemon, date):
    return [r["domain"] for r in json.loads(daemon.get(f"/api/v1/tlsrpt?date={date}")[1])["reports"]]


def state_dir_and_config(workdir, name, tlsrpt_state, knot, tlsrpt, **extra):
    """For a daemon the test starts (and starts again) itself: state_dir NAME-state holding tlsrpt.state, and a
    config on it with one outbound listener to the MX upstream, knotd for DNS, `tlsrpt` and the `extra` keys."""
    state_dir = workdir / f"{name}-state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "tlsrpt.state").write_text(tlsrpt_state)
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    config = harness.default_config(state_dir, harness.free_port(), listeners, [{"name": "internet", "mx": True}],
                                    dns={"servers": [knot.address], "timeout": "3s"}, tlsrpt=tlsrpt, **extra)
    return state_dir, config


def deliveries(daemon, result):
    return harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="mailto", result=result)


def wait_https_successes(daemon, count):
    """The https rua server has a POST before it answers it, and the daemon counts the try once it has read the
    answer: a test that saw the POST waits here until the daemon has counted `count` https successes."""
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_tlsrpt_deliveries_total", method="https",
                                           result="success") >= count, 10, what=f"{count} https successes counted")


def settled(read, expected, timeout=10):
    """read() once it returns `expected`, or what it returns after `timeout` (for the caller's assert): the daemon
    counts a try after the server or sink has what it sent, and logs a run's tlsrpt_deferred after its last try."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def log_with(daemon, text, timeout=10):
    """The daemon's log once it has `text` (or after `timeout`, for the caller's assert)."""
    settled(lambda: text in daemon.stderr(), True, timeout)
    return daemon.stderr()
