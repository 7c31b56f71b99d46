"""What mailflowd tells systemd (Type=notify, INTERFACE.md: READY=1, RELOADING=1, STOPPING=1), read from a
NOTIFY_SOCKET of the test's own as systemd would: READY=1 once it serves; RELOADING=1 then READY=1 around a
SIGHUP; at SIGTERM STOPPING=1 with EXTEND_TIMEOUT_USEC covering limits.drain_timeout and what follows it (closing
what is left, a TLS-RPT mail in flight, saving the windows), so that a drain_timeout above the unit's
TimeoutStopSec=60s is not cut by systemd's SIGKILL before the windows are saved (sd_notify(3))."""
import re
import signal
import socket
import time
from pathlib import Path

import pytest

import harness

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mailflowd.service"


@pytest.fixture
def notify_socket(workdir, monkeypatch):
    """A datagram socket where the daemon started next sends its sd_notify messages; yields a reader."""
    path = workdir / "notify.sock"
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    def until(predicate, timeout=10.0):
        """Messages received until one satisfies predicate (each message: its assignments as a dict)."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(4096).decode()
            except socket.timeout:
                break
            message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            seen.append(message)
            if predicate(message):
                return seen
        raise AssertionError(f"no such sd_notify message within {timeout}s; got {seen}")

    yield until
    sock.close()


def unit_timeout_stop_s():
    m = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.M)
    assert m, f"{UNIT} has no TimeoutStopSec=Ns"
    return int(m.group(1))


def test_ready_reloading_and_a_stop_that_outlasts_the_units_timeout(daemon_factory, sink_factory, notify_socket):
    drain_s = unit_timeout_stop_s() + 60  # an admin's longer drain: the unit's TimeoutStopSec alone would cut it
    sink = sink_factory(name="notify-sink")
    daemon = daemon_factory([{"name": "in", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
                              "upstream": "up"}],
                            [{"name": "up", "address": f"127.0.0.1:{sink.port}", "tls": "none"}],
                            name="notify", limits={"drain_timeout": f"{drain_s}s"})
    notify_socket(lambda m: m.get("READY") == "1")

    daemon.proc.send_signal(signal.SIGHUP)
    seen = notify_socket(lambda m: m.get("READY") == "1")
    assert any(m.get("RELOADING") == "1" for m in seen), f"no RELOADING=1 before READY=1 at SIGHUP: {seen}"

    daemon.proc.send_signal(signal.SIGTERM)
    seen = notify_socket(lambda m: m.get("STOPPING") == "1")
    stopping = seen[-1]
    assert "EXTEND_TIMEOUT_USEC" in stopping, \
        f"STOPPING=1 without EXTEND_TIMEOUT_USEC: systemd kills a drain of {drain_s}s after TimeoutStopSec=" \
        f"{unit_timeout_stop_s()}s, before the windows are saved: {stopping}"
    extend_s = int(stopping["EXTEND_TIMEOUT_USEC"]) / 1e6
    assert extend_s >= drain_s + 10, f"EXTEND_TIMEOUT_USEC={extend_s}s does not cover drain_timeout {drain_s}s " \
                                     "plus the 5 s closing and 5 s TLS-RPT waits after it"
    assert daemon.proc.wait(15) == 0  # no session: the drain ends at once
    assert "stopped messages=" in daemon.stderr()
