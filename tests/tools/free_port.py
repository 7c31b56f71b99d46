"""Free loopback ports for the tests that must write a port into a config before the server binds it.

A port picked with bind(port 0) comes from the kernel's ephemeral range, the same range every outgoing
connection (the relay's upstream legs, load generators, curl) takes its source port from: between the pick
and the server's bind another test running in parallel can take it (a CI run failed with EADDRINUSE that
way). So pick at random below the ephemeral range, where only an explicit bind can land, and check that it
binds. A server the test binds itself and keeps open (hostile_helpers' fake upstreams) can use port 0.

A port is handed out once per process: two picks for one config (a listener and http.address) met on the same
port in a CI run, and the config was refused ("already used by listener").
"""
import random
import socket

FLOOR = 10000
_handed_out = set()


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


def free_port(*hosts):
    """A port free on every one of `hosts` (default 127.0.0.1): servers on several loopback addresses can then
    share it, as the MX hosts of a test zone share upstreams[].port."""
    hosts = hosts or ("127.0.0.1",)
    ceiling = max(FLOOR + 1000, _ephemeral_low())
    for _ in range(200):
        port = random.randrange(FLOOR, ceiling)
        if port not in _handed_out and all(_bindable(host, port) for host in hosts):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)} in [{FLOOR}, {ceiling})")
