"""/etc/hosts and /etc/resolv.conf as the real binary reads them for a fixed upstream's host name, each test in a
mount namespace of its own with the test's files bound over the system's (harness.in_own_files), compared with what
glibc's own readers (getent, getaddrinfo) make of the same files where that decides the behaviour.

Addresses: 127.0.7.21 - 127.0.7.30 (this file's own range)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import SilentServer  # noqa: E402

HOSTS_ADDRESS = "127.0.7.22"  # what the test's hosts files say for the names in them
CRLF_NAME_SERVER = "127.0.7.23"  # named by a resolv.conf line that ends in CR: asked by neither glibc nor the relay
NOWHERE_NAME_SERVER = "127.0.7.24"  # nothing listens there


def unread_hosts_file_config(workdir, name, upstream_host):
    """A config with one listener and the fixed upstream `upstream_host`:25, and its listener port."""
    port = harness.free_port()
    state = workdir / f"{name}-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener("store", port, "store")],
                                 [{"name": "store", "address": f"{upstream_host}:25", "tls": "none"}],
                                 timeouts={"upstream_connect": "3s", "upstream_open": "10s"})
    return cfg, port


def hosts_file_lines(daemon):
    return [line for line in daemon.stderr().splitlines() if " hosts_file " in line]


@pytest.mark.parametrize("unreadable", ["mode 000", "a directory"])
def test_an_unreadable_hosts_file_is_logged_at_start_and_reload(unreadable, workdir, mailflowd_bin):
    """/etc/hosts that exists and cannot be read was taken as an empty file without a word (permissions 000 for a
    daemon without CAP_DAC_OVERRIDE, as a daemon that is not root meets a file only root may read), or refused the
    start and every reload with "basic_filebuf::underflow error reading the file: Is a directory" (a directory in its
    place: here an /etc of the test's own). glibc's lookups pass such a file over silently (files: UNAVAIL, then
    dns). Now it is logged as hosts_file, as a file that libunbound cannot take is, at the start and at each reload
    that puts it in force, and the fixed upstream's name is asked of DNS (under .test: answered NXDOMAIN by
    libunbound itself, so a 451 at once)."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    name = "unread-hosts-" + unreadable.split()[-1]
    if unreadable == "mode 000":
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            pytest.skip("needs root and setpriv: a daemon that may not read a file of mode 000")
        hosts = workdir / f"{name}-hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{HOSTS_ADDRESS} store.unread.test\n")
        hosts.chmod(0)
        resolv = workdir / f"{name}-resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
        wrapper, error = harness.in_own_files(hosts, resolv) + no_dac, "cannot open it: Permission denied"
    else:
        etc = workdir / f"{name}-etc"
        (etc / "hosts").mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" /etc && exec "$@"', str(etc)]
        error = "cannot read it: Is a directory"
    cfg, port = unread_hosts_file_config(workdir, name, "store.unread.test")
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name=name, wrapper=wrapper).start()
    try:
        harness.wait_for(lambda: len(hosts_file_lines(daemon)) == 1, 5, what="the hosts_file warning at the start")
        line = hosts_file_lines(daemon)[0]
        assert "file=/etc/hosts" in line and f"/etc/hosts: {error}" in line, line
        assert "looked up in DNS only" in line, line
        c = hh.greeted(port, timeout=30)
        try:
            assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
            code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        finally:
            c.close()
        assert code == 451, (code, text, daemon.log_tail())
        base = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total",
                                               result="success") > base, 10, what="the reload")
        harness.wait_for(lambda: len(hosts_file_lines(daemon)) == 2, 5, what="the hosts_file warning at the reload")
    finally:
        harness.stop_exits_0(daemon)


def test_route_says_that_the_hosts_file_cannot_be_read(workdir, mailflowd_bin):
    """`mailflowd route` says that /etc/hosts cannot be read (here a directory in its place: an /etc of the test's
    own in a mount namespace), as it says that libunbound cannot take it; its JSON on standard output unchanged."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    etc = workdir / "route-dir-etc"
    (etc / "hosts").mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    cfg, _ = unread_hosts_file_config(workdir, "route-dir", "store.unread.test")
    path = workdir / "route-dir.yaml"
    path.write_text(json.dumps(cfg) + "\n")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$0" /etc && exec "$@"', str(etc), mailflowd_bin, "route",
                        "--config", str(path), "--recipient", "user@example.org", "--format", "json"],
                       capture_output=True, text=True, timeout=30)
    assert p.stderr.splitlines() == ["mailflowd route: /etc/hosts: cannot read it: Is a directory (names looked up "
                                     "in DNS only)"], p
    route = json.loads(p.stdout)
    assert route["name_lookup"]["asked"] == ["store.unread.test"], route


def test_a_resolv_conf_with_crlf_line_ends_is_read_as_glibc_reads_it(workdir, mailflowd_bin):
    """/etc/resolv.conf written with CRLF line ends (on Windows, by a provisioning template): glibc's res_init splits
    words at blanks and tabs only, so "nameserver 127.0.7.23\\r" is no address (the line is skipped: getent asks
    127.0.0.1, as with no name server) and "search corp.test\\r" a domain under which no name is found. The relay
    took the CR for a blank: it asked 127.0.7.23, which every other program on the host never asks, and completed
    "store" under corp.test (`mailflowd route` asked ["store.corp.test", "store"]). Now it reads the file as glibc:
    nothing to 127.0.7.23, "store" asked as written."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    try:
        dns = SilentServer(CRLF_NAME_SERVER, 53)
    except OSError as e:
        pytest.skip(f"cannot bind {CRLF_NAME_SERVER}:53: {e}")
    try:
        hosts = workdir / "crlf-hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        resolv = workdir / "crlf-resolv.conf"
        resolv.write_bytes(f"nameserver {CRLF_NAME_SERVER}\r\nsearch corp.test\r\noptions timeout:1 attempts:1\r\n"
                           .encode())
        getent = subprocess.run(harness.in_own_files(hosts, resolv) + ["getent", "ahosts", "store"],
                                capture_output=True, text=True, timeout=20)
        assert getent.returncode != 0, getent
        assert len(dns.queries) == 0, "glibc asked the name server of a line that ends in CR"
        cfg, _ = unread_hosts_file_config(workdir, "crlf", "store")
        cfg["dns"] = {"timeout": "1s"}
        path = workdir / "crlf.yaml"
        path.write_text(json.dumps(cfg) + "\n")
        p = subprocess.run(harness.in_own_files(hosts, resolv) + [
            mailflowd_bin, "route", "--config", str(path), "--recipient", "user@example.org", "--format", "json"],
            capture_output=True, text=True, timeout=30)
        route = json.loads(p.stdout)
        assert route["name_lookup"]["asked"] == ["store"], (route, p.stderr)
        assert len(dns.queries) == 0, f"the relay asked {CRLF_NAME_SERVER}: {route}"
    finally:
        dns.close()


def test_hosts_file_names_are_matched_as_glibc_matches_them(workdir, mailflowd_bin, sink_factory):
    """glibc's files service is asked the name as written, and matches it whole (any case): "plain.files.test." with
    the root's final dot is not the file's "plain.files.test", and "store", completed by the search list to
    store.corp.files.test, is not looked up in the file at all (the search list is DNS's; `getent ahosts` finds
    neither in such a file). The relay answered both from the file (it compared names without their final dot and
    took the file's records for every name the search list makes): 250 from a host that no other program on the
    machine would reach by those names. Now both are asked of DNS (under .test: NXDOMAIN, a 451), while a name as
    the file writes it is still answered from it."""
    hosts = workdir / "match-hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{HOSTS_ADDRESS} plain.files.test store.corp.files.test other.files.test\n")
    resolv = workdir / "match-resolv.conf"
    resolv.write_text(f"nameserver {NOWHERE_NAME_SERVER}\nsearch corp.files.test\noptions timeout:1 attempts:1\n")
    wrapper = harness.in_own_files(hosts, resolv)
    for name, found in (("plain.files.test", True), ("plain.files.test.", False), ("store", False),
                        ("other.files.test", True)):
        getent = subprocess.run(wrapper + ["getent", "ahosts", name], capture_output=True, text=True, timeout=20)
        assert (HOSTS_ADDRESS in getent.stdout) == found, (name, getent)
    sink_port = harness.free_port(HOSTS_ADDRESS)
    sink_factory("match-sink", host=HOSTS_ADDRESS, port=sink_port)
    # Not "plain.files.test" beside "plain.files.test.": one resolver answers every fixed upstream's name, and the
    # file's record of one spelling would answer the other too (configuration.md).
    written = {"other": "other.files.test", "dotted": "plain.files.test.", "short": "store"}
    ports = {key: harness.free_port() for key in written}
    state = workdir / "match-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener(key, ports[key], key) for key in written],
                                 [{"name": key, "address": f"{host}:{sink_port}", "tls": "none"}
                                  for key, host in written.items()],
                                 dns={"timeout": "1s"},
                                 timeouts={"upstream_connect": "3s", "upstream_open": "10s"})
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="match", wrapper=wrapper).start()
    try:
        replies = {}
        for key, port in ports.items():
            c = hh.greeted(port, timeout=30)
            try:
                assert c.cmd(f"MAIL FROM:<{hh.SENDER}>")[0] == 250
                replies[key] = c.cmd(f"RCPT TO:<{hh.RCPT}>")[0]
            finally:
                c.close()
        assert replies == {"other": 250, "dotted": 451, "short": 451}, (replies, daemon.log_tail())
    finally:
        harness.stop_exits_0(daemon)


def test_a_resolv_conf_that_is_a_directory_is_said_not_aborted_on(workdir, mailflowd_bin):
    """Without dns.servers the name servers come from /etc/resolv.conf; a directory in its place (here an /etc of the
    test's own) made `--check-config` abort (terminate on std::ios_base::failure, "basic_filebuf::underflow error
    reading the file: Is a directory", status 134, a core dump) and the start fail with that text. Now both say
    "/etc/resolv.conf: cannot read it: Is a directory" as they say that the file cannot be opened: --check-config
    exits 1, the daemon does not start."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    etc = workdir / "resolv-dir-etc"
    (etc / "resolv.conf").mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    cfg, _ = unread_hosts_file_config(workdir, "resolv-dir", "store.unread.test")
    path = workdir / "resolv-dir.yaml"
    path.write_text(json.dumps(cfg) + "\n")
    in_etc = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc && exec "$@"',
              str(etc), mailflowd_bin]
    said = "/etc/resolv.conf: cannot read it: Is a directory (without dns.servers its name servers are asked)"
    check = subprocess.run(in_etc + ["--check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and said in check.stdout + check.stderr, check
    start = subprocess.run(in_etc + ["--config", str(path)], capture_output=True, text=True, timeout=30)
    assert start.returncode == 1 and "startup_failed" in start.stderr and said in start.stderr, start


def resolv_conf_lines(daemon):
    return [line for line in daemon.stderr().splitlines() if " resolv_conf " in line]


def test_an_unreadable_resolv_conf_with_dns_servers_is_logged_at_start_and_reload(workdir, mailflowd_bin):
    """With dns.servers the name servers do not come from /etc/resolv.conf, but a fixed upstream's host name is
    still completed by its search list. A file that cannot be read (here a directory in its place, in an /etc of the
    test's own) has no search list, as glibc's res_init passes it over; that was silent, while without dns.servers
    it refuses the start. Now it is logged as resolv_conf (level warn, as hosts_file) at the start and at each
    reload that puts it in force, and `mailflowd route` says it on standard error."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    etc = workdir / "resolv-servers-etc"
    (etc / "resolv.conf").mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    cfg, port = unread_hosts_file_config(workdir, "resolv-servers", "store")
    cfg["dns"] = {"servers": [f"{NOWHERE_NAME_SERVER}:53"], "timeout": "1s"}
    in_etc = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc && exec "$@"',
              str(etc)]
    said = "/etc/resolv.conf: cannot read it: Is a directory"
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="resolv-servers", wrapper=in_etc).start()
    try:
        harness.wait_for(lambda: len(resolv_conf_lines(daemon)) == 1, 5, what="the resolv_conf warning at the start")
        line = resolv_conf_lines(daemon)[0]
        assert " warning resolv_conf " in line and "file=/etc/resolv.conf" in line and said in line, line
        assert "no search list" in line, line
        base = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total",
                                               result="success") > base, 10, what="the reload")
        harness.wait_for(lambda: len(resolv_conf_lines(daemon)) == 2, 5, what="the resolv_conf warning at the reload")
    finally:
        harness.stop_exits_0(daemon)
    path = workdir / "resolv-servers.yaml"
    path.write_text(json.dumps(cfg) + "\n")
    p = subprocess.run(in_etc + [mailflowd_bin, "route", "--config", str(path), "--recipient", "user@example.org",
                                 "--format", "json"], capture_output=True, text=True, timeout=30)
    assert f"mailflowd route: {said}" in p.stderr, p
    assert json.loads(p.stdout)["name_lookup"]["asked"] == ["store"], p
