"""The host's interface addresses, which tell an upstream or MX host on this host's own address (behind a 0.0.0.0 or
[::] listener) as mailflowd itself: when getifaddrs(3) fails (tests/tools/getifaddrs_fail.c, LD_PRELOAD, as glibc's
fails where no netlink socket can be made), the daemon logs it as `interface_addresses` (level warn, with the
error) at its start and at each reload that goes in force, and --check-config and `mailflowd route`, whose loop
checks then know loopback and the listeners' own addresses only, print it as a warning."""
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh

EVENT = " interface_addresses "
WILDCARD = '"0.0.0.0:'


@pytest.fixture(scope="module")
def shim(workdir, mailflowd_bin):
    if harness.sanitized(mailflowd_bin):
        pytest.skip("LD_PRELOAD of a shim before the sanitizer runtime aborts the daemon")
    if not shutil.which("cc"):
        pytest.skip("needs a C compiler for tests/tools/getifaddrs_fail.c")
    lib = workdir / "getifaddrs_fail.so"
    source = Path(__file__).resolve().parents[1] / "tools" / "getifaddrs_fail.c"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return ["env", f"LD_PRELOAD={lib}"]


def events(text):
    return [line for line in text.splitlines() if EVENT in line]


def test_a_failed_getifaddrs_is_logged_at_start_and_at_each_reload(workdir, mailflowd_bin, sink_factory, shim):
    sink = sink_factory("ifaddrs-store")
    port, http_port = harness.free_port(), harness.free_port()
    state = workdir / "ifaddrs-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, http_port, [hh.listener("in", port, "up")], [hh.plain_upstream("up", sink.port)])
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="ifaddrs", wrapper=shim)
    try:
        daemon.start()
        lines = events(daemon.stderr())
        assert len(lines) == 1, f"start: {len(lines)} interface_addresses lines, expected 1:\n{daemon.log_tail()}"
        assert " warning " in lines[0] and 'error="getifaddrs: Address family not supported by protocol"' in lines[0] \
            and "only loopback" in lines[0], lines[0]
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: " reloaded " in daemon.stderr(), 10, what="the reload")
        assert len(events(daemon.stderr())) == 2, f"no interface_addresses line at the reload:\n{daemon.log_tail()}"
        hh.assert_relays(daemon, port, sink)  # the relay goes on
    finally:
        harness.stop_exits_0(daemon)


def test_interface_addresses_is_logged_only_for_a_configuration_that_goes_in_force(workdir, mailflowd_bin,
                                                                                   sink_factory, shim):
    """getifaddrs(3) that works at the start and fails from a reload on (GETIFADDRS_FAIL_IF_EXISTS: a seccomp
    profile applied later, descriptors or memory short at that moment). A reload that a later step refuses (here the
    failpoint reload.apply; a listener address taken, a certificate that does not load) keeps the running
    configuration, whose loop check read this host's addresses at the start: Runtime::build logged interface_addresses
    all the same, saying that only loopback now counts as this host's, which was not so (as hosts_file was, 6befe7d).
    It is said by the reload that puts the configuration in force, after that reload's begin."""
    sink = sink_factory("ifaddrs-later-store")
    port, http_port = harness.free_port(), harness.free_port()
    state = workdir / "ifaddrs-later-state"
    state.mkdir(exist_ok=True)
    failing = workdir / "ifaddrs-later-failing"
    failing.unlink(missing_ok=True)
    cfg = harness.default_config(state, http_port, [hh.listener("in", port, "up")], [hh.plain_upstream("up", sink.port)])
    wrapper = [*shim, f"GETIFADDRS_FAIL_IF_EXISTS={failing}", "MAILFLOWD_FAILPOINTS=reload.apply=1"]
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="ifaddrs-later", wrapper=wrapper)
    try:
        daemon.start()
        assert not events(daemon.stderr()), f"start (addresses read):\n{daemon.log_tail()}"
        failing.touch()
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: " reload_refused " in daemon.stderr(), 10, what="the refused reload")
        assert not events(daemon.stderr()), \
            f"a refused reload logged the interface addresses of a configuration never in force:\n{daemon.log_tail()}"
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: " reloaded " in daemon.stderr(), 10, what="the second reload")
        lines = daemon.stderr().splitlines()
        said = [i for i, line in enumerate(lines) if EVENT in line]
        begun = [i for i, line in enumerate(lines) if " reload config=" in line]
        assert len(said) == 1 and len(begun) == 2 and begun[1] < said[0], daemon.log_tail()
        hh.assert_relays(daemon, port, sink)
    finally:
        failing.unlink(missing_ok=True)
        harness.stop_exits_0(daemon)


def test_check_config_says_that_it_could_not_see_this_hosts_addresses(workdir, mailflowd_bin, shim):
    """An upstream at this host's own address on a 0.0.0.0 listener's port: --check-config refuses the loop where it
    can read the addresses; where it cannot, it passes the file (it cannot know) and says why."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    own = [line.split()[3].split("/")[0] for line in out.splitlines()]
    if not own:
        pytest.skip(f"the host has no global IPv4 address (ip -o -4 addr): {out!r}")
    wild = harness.free_port()
    cfg = harness.default_config(workdir, harness.free_port(),
                                 [{"name": "any", "address": f"0.0.0.0:{wild}", "direction": "inbound",
                                   "upstream": "self"}],
                                 [{"name": "self", "address": f"{own[0]}:{wild}", "tls": "none"}])
    path = workdir / "ifaddrs-check.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    check = [mailflowd_bin, "--check-config", str(path)]
    seen = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert seen.returncode == 1 and "in a loop" in seen.stdout + seen.stderr and not events(seen.stderr), \
        f"with the addresses read: exit {seen.returncode}\n{seen.stdout}{seen.stderr}"
    blind = subprocess.run([*shim, *check], capture_output=True, text=True, timeout=30)
    assert blind.returncode == 0, f"without them: exit {blind.returncode}\n{blind.stdout}{blind.stderr}"
    warning = f"{path}:{wildcard_position(path)}: warning: this host's interface addresses could not be read " \
              "(getifaddrs: Address family not supported by protocol): only loopback"
    assert warning in blind.stderr and "1 warning(s)" in blind.stderr, blind.stderr
    assert not events(blind.stdout), f"a log line in the summary:\n{blind.stdout}"
    # mailflowd route checks the same loop: it warns on standard error, its answer on standard output stays whole.
    route = subprocess.run([*shim, mailflowd_bin, "route", "--config", str(path), "--recipient", "a@b.example",
                            "--format", "json"], capture_output=True, text=True, timeout=30)
    assert "mailflowd route: warning: this host's interface addresses could not be read" in route.stderr, \
        route.stderr
    json.loads(route.stdout)


def wildcard_position(path):
    """"LINE:COLUMN" of the 0.0.0.0 listener's address value."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if WILDCARD in line:
            return f"{n}:{line.index(WILDCARD) + 1}"
    raise AssertionError(f"no 0.0.0.0 listener in {path}")
