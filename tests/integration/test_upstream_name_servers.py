"""/etc/resolv.conf read at a reload, for fixed upstreams' host names: its search list and its name servers
together. The real binary in a mount namespace of its own, with the test's /etc/hosts and /etc/resolv.conf bound
over the system's (no dns.servers: the name servers of resolv.conf), two real knotd on port 53 of 127.0.0.160 and
127.0.0.161, each serving rev29.example.net with its own address for store.rev29.example.net (a sink on 127.0.0.162
and one on 127.0.0.163), and the upstream "store:PORT", completed by resolv.conf's search list.

The operator moves the site to the other name server (resolv.conf rewritten) and reloads (SIGHUP): the sessions after
the reload must ask the name servers the file names now, as they use the search list it names now. Before, the
search list was read at the reload but the name servers only when an event loop made its libunbound context, which
the reload did not replace (its key held dns.* and the hosts file, not resolv.conf): the new search list was asked of
the old name server until the daemon was restarted.

A name written with the root's final dot ("mail.rev29.example.net.:PORT") is asked as written, never completed by the
search list: with Kubernetes' `options ndots:5` a name of fewer dots is asked under each search domain first, where a
wildcard record (here *.rev29.example.net, 127.0.0.163) answers "mail.rev29.example.net.rev29.example.net" before the
name itself is ever asked. The final dot is how glibc's users keep a name from that; the configuration refused it
("invalid host name"), so nothing kept the relay from delivering to the wildcard's host."""
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import types
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
mail  A    {OLD_STORE}
*     A    {NEW_STORE}
"""


@pytest.fixture(scope="module")
def env(workdir, sink_factory):
    for ns in (OLD_NS, NEW_NS):
        if not udp_free(ns, 53):
            pytest.skip(f"cannot bind {ns}:53 for knotd")
    short_dir = Path(tempfile.mkdtemp(prefix="mf-rev29-"))  # knotd's control socket path must stay short
    servers = []
    try:
        for ns, store in ((OLD_NS, OLD_STORE), (NEW_NS, NEW_STORE)):
            servers.append(KnotServer(short_dir, {ORIGIN: zone(store)}, host=ns, port=53,
                                      name=f"knotd-{ns}").start())
        sink_port = harness.free_port(OLD_STORE, NEW_STORE)
        sinks = {a: sink_factory(f"ns-{a}", host=a, port=sink_port) for a in (OLD_STORE, NEW_STORE)}
        yield types.SimpleNamespace(sinks=sinks, sink_port=sink_port)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(short_dir, ignore_errors=True)


def start(workdir, mailflowd_bin, name, resolv_text, upstream_host, sink_port):
    """A daemon with its own /etc/hosts (localhost only) and /etc/resolv.conf, one listener and the upstream
    `upstream_host`:`sink_port`; returns (daemon, listener port, resolv.conf path)."""
    hosts = workdir / f"{name}-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    resolv = workdir / f"{name}-resolv.conf"
    resolv.write_text(resolv_text)
    port = harness.free_port()
    state = workdir / f"{name}-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener("store", port, "store")],
                                 [{"name": "store", "address": f"{upstream_host}:{sink_port}", "tls": "none"}],
                                 dns={"timeout": "3s"},
                                 timeouts={"upstream_connect": "5s", "upstream_open": "30s"})
    daemon = harness.Daemon(mailflowd_bin, workdir, cfg, name=name,
                            wrapper=harness.in_own_files(hosts, resolv)).start()
    return daemon, port, resolv


def deliver(port, subject):
    c = hh.greeted(port, timeout=30)
    try:
        code, text = hh.transaction(c, hh.message(subject))
        assert code == 250, text
    finally:
        c.close()


def test_a_reload_takes_resolv_conf_name_servers_with_its_search_list(env, workdir, mailflowd_bin):
    daemon, port, resolv = start(workdir, mailflowd_bin, "ns-reload", f"nameserver {OLD_NS}\nsearch {ORIGIN}\n",
                                 "store", env.sink_port)
    old, new = env.sinks[OLD_STORE], env.sinks[NEW_STORE]
    try:
        base_old, base_new = old.count(), new.count()
        deliver(port, "before")
        old.wait_messages(base_old + 1)
        # Rewritten in place (the bind mount shows the same file): the other name server, the same search list.
        resolv.write_text(f"nameserver {NEW_NS}\nsearch {ORIGIN}\n")
        base = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
        daemon.proc.send_signal(signal.SIGHUP)
        harness.wait_for(
            lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success") > base, 10,
            what="the reload")
        for i in range(2):
            deliver(port, f"reloaded {i}")
        new.wait_messages(base_new + 2)
        assert old.count() == base_old + 1, "a session after the reload asked the name server resolv.conf no " \
                                            "longer names"
    finally:
        harness.stop_exits_0(daemon)


def test_a_name_with_the_final_dot_is_asked_as_written_not_under_the_search_list(env, workdir, mailflowd_bin):
    resolv_text = f"nameserver {OLD_NS}\nsearch {ORIGIN}\noptions ndots:5\n"
    # The reference: glibc asks the wildcard's name first without the dot, the name itself with it.
    hosts = workdir / "ns-dot-getent-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    resolv = workdir / "ns-dot-getent-resolv.conf"
    resolv.write_text(resolv_text)
    for name, address in ((f"mail.{ORIGIN}", NEW_STORE), (f"mail.{ORIGIN}.", OLD_STORE)):
        getent = subprocess.run(harness.in_own_files(hosts, resolv) + ["getent", "ahostsv4", name],
                                capture_output=True, text=True, timeout=20)
        assert getent.stdout.split()[:1] == [address], (name, getent)
    daemon, port, _ = start(workdir, mailflowd_bin, "ns-dot", resolv_text, f"mail.{ORIGIN}.", env.sink_port)
    old, new = env.sinks[OLD_STORE], env.sinks[NEW_STORE]
    try:
        base_old, base_new = old.count(), new.count()
        deliver(port, "absolute")
        old.wait_messages(base_old + 1)
        assert new.count() == base_new, "the name was completed by the search list (the wildcard's host)"
    finally:
        harness.stop_exits_0(daemon)


def test_ndots_is_read_as_glibc_reads_it(env, workdir, mailflowd_bin):
    """`options ndots:5x` is ndots 5 for glibc (atoi of what follows the colon): "mail.rev29.example.net" (3 dots) is
    asked under the search domain first, where the wildcard answers (127.0.0.163), as getent shows. The relay skipped
    the option as no number and kept ndots 1: it asked the name first and reached 127.0.0.162, another host than
    getaddrinfo's. A search line with no name keeps the list before it, for glibc and now for the relay too."""
    resolv_text = f"nameserver {OLD_NS}\nsearch {ORIGIN}\nsearch\noptions ndots:5x\n"
    hosts = workdir / "ns-ndots-getent-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    resolv = workdir / "ns-ndots-getent-resolv.conf"
    resolv.write_text(resolv_text)
    getent = subprocess.run(harness.in_own_files(hosts, resolv) + ["getent", "ahostsv4", f"mail.{ORIGIN}"],
                            capture_output=True, text=True, timeout=20)
    assert getent.stdout.split()[:1] == [NEW_STORE], getent
    daemon, port, _ = start(workdir, mailflowd_bin, "ns-ndots", resolv_text, f"mail.{ORIGIN}", env.sink_port)
    old, new = env.sinks[OLD_STORE], env.sinks[NEW_STORE]
    try:
        base_old, base_new = old.count(), new.count()
        deliver(port, "ndots")
        new.wait_messages(base_new + 1)
        assert old.count() == base_old, "the relay asked the name before the search list, as glibc does not"
    finally:
        harness.stop_exits_0(daemon)


def test_name_servers_are_read_as_glibc_reads_them(env, workdir, mailflowd_bin):
    """A `nameserver` line without an address (or with a word that is none, "localhost") is skipped by glibc's
    res_init, which asks the name servers of the other lines; getent finds the upstream through them. libunbound's
    ub_ctx_resolvconf, which read the file for each resolver, refused the whole file for it ("syntax error"): the
    daemon did not start ("dns: reading /etc/resolv.conf: syntax error"), and a file so edited before a reload
    refused the reload. The name servers are now read at start and reload as glibc reads them."""
    resolv_text = f"nameserver\nnameserver localhost\nnameserver {OLD_NS} # the site's resolver\nsearch {ORIGIN}\n"
    hosts = workdir / "ns-glibc-getent-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    resolv = workdir / "ns-glibc-getent-resolv.conf"
    resolv.write_text(resolv_text)
    getent = subprocess.run(harness.in_own_files(hosts, resolv) + ["getent", "ahostsv4", "store"],
                            capture_output=True, text=True, timeout=20)
    assert getent.stdout.split()[:1] == [OLD_STORE], getent
    daemon, port, _ = start(workdir, mailflowd_bin, "ns-glibc", resolv_text, "store", env.sink_port)
    old = env.sinks[OLD_STORE]
    try:
        base_old = old.count()
        deliver(port, "glibc name servers")
        old.wait_messages(base_old + 1)
    finally:
        harness.stop_exits_0(daemon)


def route(workdir, mailflowd_bin, name, upstream_host, sink_port, hosts, resolv):
    """`mailflowd route --format json` for a configuration whose one upstream is `upstream_host`:`sink_port`, run
    with `hosts` and `resolv` bound over /etc/hosts and /etc/resolv.conf as the daemon runs."""
    state = workdir / f"{name}-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener("store", harness.free_port(), "store")],
                                 [{"name": "store", "address": f"{upstream_host}:{sink_port}", "tls": "none"}],
                                 dns={"timeout": "3s"})
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(cfg) + "\n")
    p = subprocess.run(harness.in_own_files(hosts, resolv) + [mailflowd_bin, "route", "--config", str(path),
                                                              "--recipient", "user@example.org", "--format", "json"],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout, f"no output (exit {p.returncode}):\n{p.stderr}"
    out = json.loads(p.stdout)
    out["exit"] = p.returncode
    return out


def test_route_looks_up_a_fixed_upstreams_name_as_the_daemon_does(env, workdir, mailflowd_bin):
    """`mailflowd route` showed a fixed upstream's address as written ("store:PORT", result deliver, exit 0) and
    looked nothing up, where the daemon asks /etc/hosts, then DNS under resolv.conf's search list: it said
    "deliver" for a name that has no address (every RCPT 451), and could not show which host a short name or a
    name only /etc/hosts knows reaches. It now looks the name up with the daemon's code and settings
    (resolve_upstream_name, fixed_upstream_settings)."""
    resolv_text = f"nameserver {OLD_NS}\nsearch {ORIGIN}\n"
    daemon, port, resolv = start(workdir, mailflowd_bin, "ns-route", resolv_text, "store", env.sink_port)
    old = env.sinks[OLD_STORE]
    hosts = workdir / "ns-route-hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{NEW_STORE} onlyhosts\n")
    try:
        base_old = old.count()
        deliver(port, "where route says")
        old.wait_messages(base_old + 1)  # the daemon reached store.rev29.example.net's address
    finally:
        harness.stop_exits_0(daemon)
    r = route(workdir, mailflowd_bin, "ns-route-store", "store", env.sink_port, hosts, resolv)
    assert (r["exit"], r["result"], r["attempts"]) == (0, "deliver", [f"{OLD_STORE}:{env.sink_port}"]), r
    assert r["name_lookup"]["asked"] == [f"store.{ORIGIN}"], r
    r = route(workdir, mailflowd_bin, "ns-route-hosts", "onlyhosts", env.sink_port, hosts, resolv)
    assert (r["exit"], r["attempts"], r["name_lookup"]["asked"]) == (0, [f"{NEW_STORE}:{env.sink_port}"],
                                                                      ["onlyhosts"]), r
    assert r["dns_lookups"] == {"AAAA nodata": 1, "A success": 1}, r  # answered by the hosts file alone
    # No address (an RFC 6761 name, NXDOMAIN without a query): the RCPT would get 451, exit 4.
    r = route(workdir, mailflowd_bin, "ns-route-none", "nowhere.invalid.", env.sink_port, hosts, resolv)
    assert (r["exit"], r["result"], r["attempts"]) == (4, "no_addresses", []), r
    assert r["reply"].startswith("451 4.4.1"), r
    # An IP address: nothing looked up, as before.
    r = route(workdir, mailflowd_bin, "ns-route-ip", OLD_STORE, env.sink_port, hosts, resolv)
    assert (r["exit"], r["attempts"], r["name_lookup"], r["dns_lookups"]) == \
        (0, [f"{OLD_STORE}:{env.sink_port}"], None, {}), r


def test_route_without_resolv_conf_says_so_once(workdir, mailflowd_bin):
    """Without dns.servers and without /etc/resolv.conf (an empty /etc in a mount namespace of its own) no resolver
    can be made, as the daemon's start and reload say. `mailflowd route` said so, and before it that the hosts file
    could not be taken and fixed upstreams' names were "looked up in DNS only", which was not so: nothing is."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    state = workdir / "no-resolv-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener("store", harness.free_port(), "store")],
                                 [{"name": "store", "address": "store:25", "tls": "none"}])
    path = workdir / "no-resolv.yaml"
    path.write_text(json.dumps(cfg) + "\n")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs none /etc && exec "$0" "$@"', mailflowd_bin, "route", "--config", str(path),
                        "--recipient", "user@example.org"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p
    assert p.stderr.splitlines() == ["mailflowd route: dns: /etc/resolv.conf: cannot open it: No such file or "
                                     "directory (without dns.servers "
                                     "its name servers are asked)"], p.stderr
