"""/etc/resolv.conf read at a reload, for fixed upstreams' host names: its search list and its name servers
together. The real binary in a mount namespace of its own, with the test's /etc/hosts and /etc/resolv.conf bound
over the system's (no dns.servers: the name servers of resolv.conf), two real knotd on port 53 of 127.0.0.160 and
127.0.0.161, each serving rev29.example.net with its own address for store.rev29.example.net (a sink on 127.0.0.162
and one on 127.0.0.163), and the upstream "store:PORT", completed by resolv.conf's search list.

The operator moves the site to the other name server (resolv.conf rewritten) and reloads (SIGHUP): the sessions after
the reload must ask the name servers the file names now, as they use the search list it names now. Before, the
search list was read at the reload but the name servers only when an event loop made its libunbound context, which
the reload did not replace (its key held dns.* and the hosts file, not resolv.conf): the new search list was asked of
the old name server until the daemon was restarted."""
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

import harness
import hostile_helpers as hh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, udp_free  # noqa: E402

ORIGIN = "rev29.example.net"
OLD_NS, NEW_NS = "127.0.0.160", "127.0.0.161"
OLD_STORE, NEW_STORE = "127.0.0.162", "127.0.0.163"


def zone(store):
    return f"""$ORIGIN {ORIGIN}.
$TTL 300
@     SOA  ns hostmaster 1 3600 600 86400 300
@     NS   ns
ns    A    127.0.0.1
store A    {store}
"""


def deliver(port, subject):
    c = hh.greeted(port, timeout=30)
    try:
        code, text = hh.transaction(c, hh.message(subject))
        assert code == 250, text
    finally:
        c.close()


def test_a_reload_takes_resolv_conf_name_servers_with_its_search_list(workdir, mailflowd_bin, sink_factory):
    for ns in (OLD_NS, NEW_NS):
        if not udp_free(ns, 53):
            pytest.skip(f"cannot bind {ns}:53 for knotd")
    short_dir = Path(tempfile.mkdtemp(prefix="mf-rev29-"))  # knotd's control socket path must stay short
    servers = []
    daemon = None
    try:
        for ns, store in ((OLD_NS, OLD_STORE), (NEW_NS, NEW_STORE)):
            servers.append(KnotServer(short_dir, {ORIGIN: zone(store)}, host=ns, port=53,
                                      name=f"knotd-{ns}").start())
        sink_port = harness.free_port(OLD_STORE, NEW_STORE)
        sinks = {a: sink_factory(f"ns-reload-{a}", host=a, port=sink_port) for a in (OLD_STORE, NEW_STORE)}
        hosts = workdir / "ns-reload-hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        resolv = workdir / "ns-reload-resolv.conf"
        resolv.write_text(f"nameserver {OLD_NS}\nsearch {ORIGIN}\n")
        port = harness.free_port()
        state = workdir / "ns-reload-state"
        state.mkdir(exist_ok=True)
        cfg = harness.default_config(state, harness.free_port(), [hh.listener("store", port, "store")],
                                     [{"name": "store", "address": f"store:{sink_port}", "tls": "none"}],
                                     dns={"timeout": "3s"},
                                     timeouts={"upstream_connect": "5s", "upstream_open": "30s"})
        daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name="ns-reload",
                                wrapper=harness.in_own_files(hosts, resolv)).start()
        deliver(port, "before")
        sinks[OLD_STORE].wait_messages(1)
        # Rewritten in place (the bind mount shows the same file): the other name server, the same search list.
        resolv.write_text(f"nameserver {NEW_NS}\nsearch {ORIGIN}\n")
        base = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(
            lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success") > base, 10,
            what="the reload")
        for i in range(2):
            deliver(port, f"reloaded {i}")
        sinks[NEW_STORE].wait_messages(2)
        assert sinks[OLD_STORE].count() == 1, "a session after the reload asked the name server resolv.conf no " \
                                              "longer names"
    finally:
        if daemon is not None:
            harness.stop_exits_0(daemon)
        for server in servers:
            server.stop()
        shutil.rmtree(short_dir, ignore_errors=True)
