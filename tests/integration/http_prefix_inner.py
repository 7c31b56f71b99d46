"""Run by test_http_auth.py::test_an_ipv6_client_is_counted_by_its_64 under `unshare -n`: a network namespace of
its own, whose loopback carries fd00:7:161::/64 (addresses no other test can see). Starts the daemon there, guesses
passwords from two addresses of the /64, opens connections from 24 of them, and prints what it saw as JSON.
Usage: http_prefix_inner.py WORKDIR (MAILFLOWD in the environment)."""
import base64
import json
import os
import pathlib
import socket
import subprocess
import sys
import warnings

import harness

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # noqa: E402

PREFIX = "fd00:7:161::"
SERVER = PREFIX + "1"
PORT = 9725


def status_of(sock):
    """The status code of the one answer read from `sock`; "reset" when the connection was reset before it."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return "reset"
    return int(data.split(b" ", 2)[1])


def connect(source):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((SERVER, PORT))
    return sock


def get(source, path, password=None):
    sock = connect(source)
    try:
        auth = ""
        if password is not None:
            auth = "Authorization: Basic " + base64.b64encode(f"prom:{password}".encode()).decode() + "\r\n"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())
        return status_of(sock)
    finally:
        sock.close()


def main():
    work = pathlib.Path(sys.argv[1])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for i in range(1, 0x40):
        subprocess.run(["ip", "-6", "addr", "add", f"{PREFIX}{i:x}/64", "dev", "lo", "nodad"], check=True)
    state = work / "state"
    state.mkdir(exist_ok=True)
    config = harness.default_config(
        state, PORT, [{"name": "in", "address": f"[{SERVER}]:2525", "direction": "inbound", "upstream": "store"}],
        [{"name": "store", "address": "127.0.0.1:2"}])
    config["http"] = {"address": f"[{SERVER}]:{PORT}", "basic_auth": {
        "user": "prom", "password_hash": crypt.crypt("right", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2 ** 4))}}
    daemon = harness.Daemon(os.environ["MAILFLOWD"], work, config, name="prefix").start()
    seen = {}
    try:
        # The backoff: 6 failures from ::2 (5 free, the 6th starts the wait), then a guess from ::3 of the /64.
        seen["first_guesses"] = [get(PREFIX + "2", "/metrics", "wrong") for _ in range(6)]
        seen["guess_from_a_neighbour"] = get(PREFIX + "3", "/metrics", "wrong")
        # The per-address cap (16): a connection each from 24 addresses of the /64, kept open.
        held = []
        statuses = []
        for i in range(24):
            sock = connect(f"{PREFIX}{0x10 + i:x}")
            held.append(sock)
            # Over a cap the daemon answers 503 at once, without reading: taken before the request is sent,
            # which would have the close of the unread request reset the connection.
            sock.settimeout(0.1)
            try:
                early = status_of(sock)
            except socket.timeout:
                early = None
            sock.settimeout(10)
            if early is None:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                early = status_of(sock)
            statuses.append(early)
        seen["connections"] = statuses
        for sock in held:
            sock.close()
    finally:
        seen["exit"] = daemon.stop()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
