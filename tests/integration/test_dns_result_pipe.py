"""The wait on libunbound's result pipe (the descriptor its worker thread hands answers back through) that fails
with anything other than a cancel: the resolver is spoiled, so that the event loop's next lookup gets a fresh one,
and it is logged (dns_resolver_failed). Before, the wait ended silently; with a descriptor that stayed unusable
every later lookup on that loop waited for dns.timeout, was counted as a DNS timeout and answered 451 4.4.3, and
the resolver was never replaced.

The lookups in flight on the resolver when its wait failed end at once, as the relay's own failure: before, each
waited for its own deadline first (the RCPT held for all of dns.timeout, 8 s here, for a 451 known at once).

The real binary against knotd (tests/tools/dns_server.py) with the failpoint resolver.result_pipe (Debug builds):
at its N-th call (one per wait of the pump, which starts when a lookup finds none outstanding) it gives the pipe's
descriptor up under the wait, as a descriptor that went bad would be, so that this wait and every later one on
that resolver fail (EBADF). The MX host is a sink on 127.0.7.21 (this file's range is 127.0.7.21-30)."""
import os
import time
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import harness
from hostile_helpers import greeted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

MX_HOST = "127.0.7.21"
ZONE = f"""$ORIGIN pipe.example.
$TTL 300
@      SOA  ns hostmaster 1 3600 600 86400 300
@      NS   ns
ns     A    127.0.0.1
@      MX   10 mx
two    MX   10 mx
mx     A    {MX_HOST}
"""


@pytest.fixture(scope="module")
def knot():
    short = Path(tempfile.mkdtemp(prefix="mf-pipe-"))  # knotd's control socket path is limited to 107 bytes
    server = KnotServer(short, {"pipe.example": ZONE}).start()
    yield server
    server.stop()
    shutil.rmtree(short, ignore_errors=True)


DNS_TIMEOUT = 8  # seconds: a lookup that waited for it is told from one that ended at once


def start_daemon(knot, sink_factory, workdir, mailflowd_bin, name, failpoint):
    """A daemon with MAILFLOWD_FAILPOINTS=`failpoint` (a bare number: the pump's wait that fails,
    resolver.result_pipe), and the port of its listener."""
    mx_port = harness.free_port(MX_HOST)
    sink = sink_factory(name, host=MX_HOST, port=mx_port)
    port = harness.free_port()
    state = workdir / f"{name}-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(
        state, harness.free_port(),
        [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
        [{"name": "internet", "mx": True, "port": sink.port, "tls": "none", "mta_sts": "off"}],
        dns={"servers": [knot.address], "timeout": f"{DNS_TIMEOUT}s"})
    os.environ["MAILFLOWD_FAILPOINTS"] = failpoint if "=" in str(failpoint) else f"resolver.result_pipe={failpoint}"
    try:
        daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name=name).start(timeout=60)
    finally:
        del os.environ["MAILFLOWD_FAILPOINTS"]
    return daemon, port


def timed_rcpt(c, rcpt):
    started = time.monotonic()
    code, text = c.cmd(rcpt)
    return code, text, time.monotonic() - started


def test_a_failed_result_pipe_wait_is_logged_and_the_resolver_replaced(knot, sink_factory, workdir, mailflowd_bin):
    daemon, port = start_daemon(knot, sink_factory, workdir, mailflowd_bin, "pipe", 1)
    try:
        c = greeted(port, timeout=3 * DNS_TIMEOUT)
        assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
        # The lookup in flight when the wait failed gets no answer: a failure of the relay's own resolver, not of
        # the domain's DNS (nor a timeout of it): the reply, the counters and the log say so, as for a lookup
        # that could not be sent for want of descriptors (test_dns_local.py). At once: it waited for
        # dns.timeout before.
        start = daemon.metrics()
        code, text, took = timed_rcpt(c, "RCPT TO:<a@pipe.example>")
        assert text == "451 4.4.3 DNS resolver unavailable, try again later", f"{text!r}\n{daemon.log_tail()}"
        assert took < DNS_TIMEOUT / 2, f"the MX lookup in flight was answered after {took:.1f} s"
        before = daemon.metrics()
        moved = harness.delta(start, before, "mailflow_dns_lookups_total")
        assert moved == {harness.series_key(type="MX", result="local_resources"): 1}, harness.fmt_delta(moved)
        moved = harness.delta(start, before, "mailflow_upstream_errors_total", upstream="internet")
        assert moved == {harness.series_key(upstream="internet", reason="local_resources"): 1}, \
            harness.fmt_delta(moved)
        moved = harness.delta(start, before, "mailflow_rejects_total")
        assert not moved, "counted as the domain's DNS failure:\n" + harness.fmt_delta(moved)
        # The next lookup has a fresh resolver: the MX is found and the sink takes the recipient. (Another domain:
        # the session does not look up again a domain whose route failed in the transaction.)
        code, text = c.cmd("RCPT TO:<b@two.pipe.example>")
        assert code == 250, f"RCPT after the failed wait: {text!r}\n{daemon.log_tail()}"
        after = daemon.metrics()
        moved = harness.delta(before, after, "mailflow_dns_lookups_total")
        assert moved.get(harness.series_key(type="MX", result="success")) == 1, harness.fmt_delta(moved)
        assert not harness.delta(before, after, "mailflow_dns_lookups_total", result="timeout"), \
            harness.fmt_delta(moved)
        c.cmd("QUIT")
    finally:
        assert daemon.stop() == 0
    failed = [line for line in daemon.stderr().splitlines() if "dns_resolver_failed" in line]
    assert len(failed) == 1, daemon.log_tail()
    assert ' error dns_resolver_failed error="result pipe: Bad file descriptor"' in failed[0], failed[0]
    unavailable = [line for line in daemon.stderr().splitlines() if " dns_unavailable " in line]
    assert len(unavailable) == 1, daemon.log_tail()
    assert "domain=pipe.example" in unavailable[0] and "reason=local_resources" in unavailable[0], unavailable[0]
    assert "result pipe" in unavailable[0], unavailable[0]
    assert not [line for line in daemon.stderr().splitlines() if " mx_route " in line and "dns_failure" in line], \
        daemon.log_tail()


def test_address_lookups_in_flight_when_the_result_pipe_fails_end_at_once(knot, sink_factory, workdir,
                                                                          mailflowd_bin):
    """The pump's second wait fails: the MX lookup was answered, the MX host's AAAA and A queries are in flight
    (both at once). Both end at once as the relay's own failure; before, the AAAA lookup waited for dns.timeout
    and the A lookup then found the pipe failed."""
    daemon, port = start_daemon(knot, sink_factory, workdir, mailflowd_bin, "pipe2", 2)
    try:
        c = greeted(port, timeout=3 * DNS_TIMEOUT)
        assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
        start = daemon.metrics()
        code, text, took = timed_rcpt(c, "RCPT TO:<a@pipe.example>")
        assert text == "451 4.4.3 DNS resolver unavailable, try again later", f"{text!r}\n{daemon.log_tail()}"
        assert took < DNS_TIMEOUT / 2, f"the address lookups in flight were answered after {took:.1f} s"
        after = daemon.metrics()
        moved = harness.delta(start, after, "mailflow_dns_lookups_total")
        assert moved == {harness.series_key(type="MX", result="success"): 1,
                         harness.series_key(type="AAAA", result="local_resources"): 1,
                         harness.series_key(type="A", result="local_resources"): 1}, harness.fmt_delta(moved)
        assert not harness.delta(start, after, "mailflow_rejects_total"), daemon.log_tail()
        # The next lookup has a fresh resolver.
        code, text = c.cmd("RCPT TO:<b@two.pipe.example>")
        assert code == 250, f"RCPT after the failed wait: {text!r}\n{daemon.log_tail()}"
        c.cmd("QUIT")
    finally:
        assert daemon.stop() == 0
    unavailable = [line for line in daemon.stderr().splitlines() if " dns_unavailable " in line]
    assert len(unavailable) == 1, daemon.log_tail()
    assert "domain=pipe.example" in unavailable[0] and "result pipe" in unavailable[0], unavailable[0]


def test_a_result_message_that_cannot_be_read_whole_fails_the_resolver_at_once(knot, sink_factory, workdir,
                                                                              mailflowd_bin):
    """ub_process() that says UB_PIPE: a message could not be read whole off the result pipe (libunbound's "tube
    read out of memory" leaves its length read and its body in the pipe), the pipe ended, or a message made no
    sense. The reads are out of step with the messages after it, and the next ub_process() would take a piece of
    a message for the length of the next. Before, its result was ignored: the pump read on so, and the MX lookup
    got no answer until dns.timeout (or the event loop hung in a blocking read of a garbage length). Now it fails
    the resolver as a failed wait does: logged dns_resolver_failed, the lookup in flight ends at once as the
    relay's own failure, the next lookup gets a fresh resolver. Failpoint resolver.result_message: the first
    message's length is read off the pipe before ub_process(), as libunbound's read that ran out of memory
    left it."""
    daemon, port = start_daemon(knot, sink_factory, workdir, mailflowd_bin, "pipe3", "resolver.result_message=1")
    try:
        c = greeted(port, timeout=3 * DNS_TIMEOUT)
        assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
        start = daemon.metrics()
        code, text, took = timed_rcpt(c, "RCPT TO:<a@pipe.example>")
        assert text == "451 4.4.3 DNS resolver unavailable, try again later", f"{text!r}\n{daemon.log_tail()}"
        assert took < DNS_TIMEOUT / 2, f"the MX lookup in flight was answered after {took:.1f} s"
        after = daemon.metrics()
        moved = harness.delta(start, after, "mailflow_dns_lookups_total")
        assert moved == {harness.series_key(type="MX", result="local_resources"): 1}, harness.fmt_delta(moved)
        code, text = c.cmd("RCPT TO:<b@two.pipe.example>")
        assert code == 250, f"RCPT after the failed read: {text!r}\n{daemon.log_tail()}"
        c.cmd("QUIT")
    finally:
        assert daemon.stop() == 0
    failed = [line for line in daemon.stderr().splitlines() if "dns_resolver_failed" in line]
    assert len(failed) == 1, daemon.log_tail()
    assert 'error="result pipe: error in pipe communication with async"' in failed[0], failed[0]
