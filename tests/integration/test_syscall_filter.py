"""The shipped unit's SystemCallFilter= (systemd/mailflowd.service) against every system call that mailflowd makes,
traced with `strace -f -c` through what a relay does in service: start (state loaded, listeners bound, the HTTP
and password threads), a STARTTLS session relayed to an upstream over TLS, an MX lookup through the resolver
library (a real knotd) with delivery to the MX host, a /metrics scrape, a SIGHUP reload, and the stop's drain and
state save. A call outside the filter fails with EPERM under systemd (SystemCallErrorNumber=EPERM), where nothing
here would show it: the filter is expanded with `systemd-analyze syscall-filter` (the groups as systemd 252 has
them) and every call traced must be in it, and every socket()'s family in RestrictAddressFamilies=, except those listed in
ALLOWED_TO_FAIL with what its failure does."""
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer  # noqa: E402

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mailflowd.service"
ORIGIN = "filter.example.net"

# A call (or socket family) the daemon makes knowing that the unit refuses it, and what that costs.
ALLOWED_TO_FAIL = {
    "setpriority": "the password thread's nice 10 (daemon/http_server.cpp): under the unit it keeps the default "
                   "priority, as security.md says; allowing it would rate the unit 1.5 in systemd-analyze security",
}


def expand(group, seen=None):
    """The system calls of a systemd-analyze syscall-filter group (or a single call), nested groups included."""
    if not group.startswith("@"):
        return {group}
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"systemd-analyze syscall-filter {group}: {out.stderr}"
    calls = set()
    for line in out.stdout.splitlines()[1:]:
        name = line.strip()
        if name and not name.startswith("#"):
            calls |= expand(name)
    return calls


def unit_filter():
    """The calls SystemCallFilter= lets through, applying the unit's lines in order as systemd does: the first
    (an allow list) sets the calls, a later `~` line takes its groups away, a later plain line adds again."""
    allowed = None
    for line in re.findall(r"^SystemCallFilter=(.*)$", UNIT.read_text(), re.M):
        deny = line.startswith("~")
        calls = set().union(*(expand(g) for g in line.lstrip("~").split()))
        assert allowed is not None or not deny, "the test reads an allow-list filter only"
        allowed = (allowed or set()) - calls if deny else (allowed or set()) | calls
    assert allowed and "read" in allowed and "setuid" not in allowed, f"cannot read the filter of {UNIT}"
    return allowed


def traced_calls(text):
    """The system call names of the summary that `strace -C` appends to its trace."""
    calls = set()
    summary = text[text.rindex("% time"):] if "% time" in text else ""
    for line in summary.splitlines()[2:]:
        fields = line.split()
        if len(fields) >= 5 and re.match(r"^[0-9.]+$", fields[0]) and fields[-1] != "total":
            calls.add(fields[-1])
    return calls


def socket_families(text):
    """The address families of every socket() call in the trace."""
    return set(re.findall(r"\bsocket\((AF_[A-Z0-9]+|\d+),", text))


def unit_families():
    m = re.search(r"^RestrictAddressFamilies=(.*)$", UNIT.read_text(), re.M)
    assert m and not m.group(1).startswith("~"), f"cannot read RestrictAddressFamilies= of {UNIT}"
    return set(m.group(1).split())


def daemon_pid(strace_pid):
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    assert len(children) == 1, f"strace has children {children}"
    return int(children[0])


def test_every_system_call_the_daemon_makes_passes_the_units_filter(workdir, certs, sink_factory, mailflowd_bin):
    for tool in ("strace", "systemd-analyze"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (deploy/dev/deps.sh test)", pytrace=False)
    if harness.sanitized(mailflowd_bin):
        pytest.skip("the sanitizers' runtime makes calls of its own")
    allowed = unit_filter()
    short_dir = Path(tempfile.mkdtemp(prefix="mf-scf-"))  # knotd's control socket path must stay short
    knot = KnotServer(short_dir, {ORIGIN: f"""$ORIGIN {ORIGIN}.
$TTL 300
@   SOA  ns hostmaster 1 3600 600 86400 300
@   NS   ns
ns  A    127.0.0.1
@   MX   10 mx
mx  A    127.0.0.1
"""}).start()
    daemon = None
    try:
        sink = sink_factory(name="filter-sink", tls_cert=certs / "sink.pem", tls_key=certs / "sink.key")
        state = workdir / "filter-state"
        state.mkdir(exist_ok=True)
        cfg = harness.default_config(
            state, harness.free_port(),
            [{"name": "in", "address": f"127.0.0.1:{harness.free_port()}", "direction": "inbound",
              "upstream": "store", "tls": harness.listener_tls(certs)},
             {"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
              "upstream": "internet"}],
            [{"name": "store", "address": f"127.0.0.1:{sink.port}", "tls": "opportunistic"},
             {"name": "internet", "mx": True, "port": sink.port, "tls": "opportunistic", "mta_sts": "off"}],
            dns={"servers": [knot.address], "timeout": "3s"})
        trace = workdir / "strace.txt"
        daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="filter",
                                wrapper=["strace", "-f", "-qq", "-C", "-o", str(trace)]).start(timeout=60)
        pid = daemon_pid(daemon.proc.pid)

        r = harness.swaks(daemon.listener_port("in"), tls="starttls")
        assert r.rc == 0, r
        c = hh.greeted(daemon.listener_port("out"))
        try:
            assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
            code, text = c.cmd(f"RCPT TO:<user@{ORIGIN}>")
            assert code == 250, text
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: filter\r\n\r\nbody\r\n")
            assert c.cmd(".")[0] == 250
        finally:
            c.close()
        sink.wait_messages(2, timeout=30)
        daemon.metrics()
        reloads = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
        subprocess.run(["kill", "-HUP", str(pid)], check=True)
        harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total",
                                               result="success") > reloads, 30, what="the reload")
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        assert daemon.proc.wait(60) == 0, daemon.log_tail()
        assert (state / "windows.state").exists(), "no state saved at the stop"
    finally:
        if daemon and daemon.proc and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        knot.stop()
        shutil.rmtree(short_dir, ignore_errors=True)

    text = trace.read_text()
    calls = traced_calls(text)
    assert {"read", "write", "openat", "execve"} <= calls, f"cannot read the calls from {trace}: {calls}"
    unexplained = sorted(c for c in calls - allowed if c not in ALLOWED_TO_FAIL)
    assert not unexplained, (
        f"mailflowd makes system calls that the unit's SystemCallFilter= refuses (EPERM under systemd): "
        f"{unexplained}\n{text[text.rindex('% time'):]}")
    families = socket_families(text)
    assert "AF_INET" in families, f"cannot read the socket() calls from {trace}: {families}"
    unexplained = sorted(f for f in families - unit_families() if f not in ALLOWED_TO_FAIL)
    assert not unexplained, (f"mailflowd opens sockets of families that the unit's RestrictAddressFamilies= "
                             f"refuses (EAFNOSUPPORT under systemd): {unexplained}; see {trace}")
