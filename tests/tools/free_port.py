"""Free loopback ports for the tests that must write a port into a config before the server binds it.

A port picked with bind(port 0) comes from the kernel's ephemeral range, the same range every outgoing
connection (the relay's upstream legs, load generators, curl) takes its source port from: between the pick
and the server's bind another test running in parallel can take it (a CI run failed with EADDRINUSE that
way). So pick at random below the ephemeral range, where only an explicit bind can land, and check that it
binds. A server the test binds itself and keeps open (hostile_helpers' fake upstreams) can use port 0.

A port is handed out once per process: two picks for one config (a listener and http.address) met on the same
port in a CI run, and the config was refused ("already used by listener").

And once per machine while the process that picked it lives: ctest runs two test files at once (and other
checkouts run theirs), each in a pytest process of its own, and a port one of them picked but has not bound yet
(its daemon is still starting, or it is a port that must refuse connections, or a sink's that is restarted on it)
is still bindable, so the other could draw it too. Every pick is claimed by binding an abstract unix socket named
after the port: only one process can hold the name, and the kernel lets go of it when that process ends, however
it ends.
"""
import random
import socket

FLOOR = 10000
_claims = {}  # port -> the abstract unix socket that claims it for this process


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _claim(port):
    """Whether this process now holds `port` (no other process that uses free_port does)."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inherited by the daemons the tests start
    try:
        claim.bind(f"\0mailflow-test-port-{port}")
    except OSError:
        claim.close()
        return False
    _claims[port] = claim
    return True


def free_port(*hosts):
    """A port free on every one of `hosts` (default 127.0.0.1): servers on several loopback addresses can then
    share it, as the MX hosts of a test zone share upstreams[].port."""
    hosts = hosts or ("127.0.0.1",)
    ceiling = max(FLOOR + 1000, _ephemeral_low())
    for _ in range(200):
        port = random.randrange(FLOOR, ceiling)
        if port not in _claims and all(_bindable(host, port) for host in hosts) and _claim(port):
            return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)} in [{FLOOR}, {ceiling})")
