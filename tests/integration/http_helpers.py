"""Helpers for the HTTP hardening tests (test_http_limits.py, test_http_auth.py): requests from a chosen
loopback source address (the HTTP side caps connections per client address; all of 127.0.0.0/8 is local),
optionally with basic auth, and the mailflow_http_rejects_total counters."""
import base64
import http.client
import socket
import time

import harness

REASONS = ("connection_limit", "address_limit", "head_timeout", "bad_request", "auth_missing", "auth_failed",
           "auth_busy", "auth_backoff", "write_timeout", "accept_failed")


def get(port, path, source="127.0.0.2", auth=None, timeout=5.0):
    """(status, headers dict, body bytes, seconds) of one GET over a fresh connection from `source`."""
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        return r.status, dict(r.getheaders()), body, time.monotonic() - started
    finally:
        conn.close()


def metrics(port, source="127.0.0.2", auth=None):
    status, _, body, _ = get(port, "/metrics", source=source, auth=auth)
    assert status == 200, f"/metrics answered {status}: {body[:200]!r}"
    return harness.parse_metrics(body.decode())


def rejects(m):
    """{reason: value} of mailflow_http_rejects_total."""
    return {dict(labels)["reason"]: v for labels, v in harness.series(m, "mailflow_http_rejects_total").items()}


def raw_request(port, data, source="127.0.0.2", timeout=5.0):
    """Sends `data` as is and returns everything the server sent until it closed (or `timeout`)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    try:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and b"Connection: close" not in out and b"connection: close" not in out:
                break  # a kept-alive answer: the head is enough
        return out
    finally:
        s.close()


def state_of(sock):
    """"open" while the server keeps the connection open without sending; else "closed" (EOF or reset,
    whatever it sent before)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed"
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
