"""The HTTP side under hostile connections (issue #15 items 4 and 10): slowloris from one address must not take
out /metrics and /healthz for everyone else (per-address cap, a deadline for the whole request head), at the
total cap the connection idle longest makes room for a new one, a Transfer-Encoding not ending in chunked gets 400,
a refused body's 413 reaches a client still sending it (lingering close), and every refusal is counted in
mailflow_http_rejects_total{reason}."""
import re
import socket
import subprocess
import threading
import time
import types

import pytest

import harness
import hostile_helpers as hh
import http_helpers as hx

HEAD_TIMEOUT = 5.0      # daemon/http_server.cpp kHeadTimeout
PER_ADDRESS = 16        # kMaxConnectionsPerAddress
# A scrape's own deadline during the floods below. Under ASan the slowest of 20 took 0.9 to 1.6 s (load 8) and one
# went over the 2 s this was (load 15); what the floods broke was worse: scrapes stuck behind renders for 8 s and
# more, or refused with 503.
SCRAPE_TIMEOUT = 5.0
TOTAL = 256             # kMaxConnections
STALLED_WRITE = 5.0     # kStalledWrite
MARGIN = 2.5


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    smtp = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", smtp, "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-limits")
    port = int(d.config["http"]["address"].rsplit(":", 1)[1])
    return types.SimpleNamespace(d=d, port=port, sink=sink)


def slow_connection(port, source):
    """A connection that sends the start of a request head and never finishes it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n")
    except OSError:
        pass
    return s


def wait_all_closed(socks, timeout):
    deadline = time.monotonic() + timeout
    while True:
        still_open = [s for s in socks if hx.state_of(s) == "open"]
        if not still_open or time.monotonic() > deadline:
            return still_open
        time.sleep(0.2)


def test_metrics_and_healthz_answer_under_slowloris(env):
    """300 slow connections from 127.0.0.1, reopened as soon as they are closed, trickling header bytes: /metrics
    and /healthz from 127.0.0.2 still answer, and the slow ones are closed HEAD_TIMEOUT after they opened even
    though they keep sending (the deadline covers the head, activity does not extend it)."""
    before = hx.rejects(hx.metrics(env.port))
    socks = [slow_connection(env.port, "127.0.0.1") for _ in range(300)]
    stop = threading.Event()
    reopening = threading.Event()
    reopening.set()

    def trickle():
        while not stop.is_set():
            for i, s in enumerate(socks):
                try:
                    s.send(b"X")  # one more byte of a header name, never a complete head
                except OSError:
                    if reopening.is_set():
                        s.close()
                        try:
                            socks[i] = slow_connection(env.port, "127.0.0.1")
                        except OSError:
                            pass
            stop.wait(0.3)

    attacker = threading.Thread(target=trickle, daemon=True)
    attacker.start()
    answered, failures = 0, []
    try:
        started = time.monotonic()
        for i in range(100):
            path = "/metrics" if i % 2 == 0 else "/healthz"
            try:
                status, _, _, _ = hx.get(env.port, path, source="127.0.0.2", timeout=2.0)
                answered += status == 200
                if status != 200:
                    failures.append(status)
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.06)  # spread over ~7 s: longer than the head deadline, so reopened ones are included
        attack_span = time.monotonic() - started
        reopening.clear()
        last_reopen = time.monotonic()
        time.sleep(0.5)  # let the trickler finish its round
        still_open = wait_all_closed(socks, HEAD_TIMEOUT + MARGIN - 0.5)
        closed_after = time.monotonic() - last_reopen
    finally:
        stop.set()
        attacker.join(5)
        for s in socks:
            s.close()
    print(f"slowloris: {answered} of 100 answered from 127.0.0.2 over {attack_span:.1f}s; all slow connections "
          f"closed {closed_after:.1f}s after the last reopen")
    assert answered >= 95, (f"only {answered} of 100 /metrics and /healthz requests from another address were "
                            f"answered during the slowloris ({attack_span:.1f}s); failures: {failures[:10]}")
    assert not still_open, (f"{len(still_open)} slow connections still open {closed_after:.1f}s after the last "
                            f"reopen (head deadline {HEAD_TIMEOUT}s)")

    after = hx.rejects(hx.metrics(env.port))
    moved = {r: after.get(r, 0) - before.get(r, 0) for r in hx.REASONS}
    assert moved["address_limit"] >= 300 - PER_ADDRESS, moved
    assert moved["head_timeout"] >= PER_ADDRESS, moved
    assert moved["connection_limit"] == 0, moved
    log = env.d.stderr()
    assert "http_reject reason=address_limit client=127.0.0.1" in log
    assert "http_reject reason=head_timeout client=127.0.0.1" in log


def test_every_reason_is_exported_from_the_start(env):
    assert set(hx.rejects(hx.metrics(env.port))) == set(hx.REASONS)


def fill_the_cap(port, request=b""):
    """16 addresses x 16 connections, opened in this order, each sending `request` (nothing: idle)."""
    held = []
    for a in range(TOTAL // PER_ADDRESS):
        for _ in range(PER_ADDRESS):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.3.{a + 1}", 0))
            if request:
                s.sendall(request)
            held.append(s)
    return held


def test_at_the_total_cap_the_longest_idle_connection_makes_room(env):
    """16 addresses x 16 idle connections fill the total cap of 256: a scrape from a 17th address got 503 until
    the head deadline closed them. Now each new connection closes the connection that has been waiting longest
    without a complete request (nginx reuses its idle connections the same way when worker_connections run
    out), logged and counted as connection_limit, and is served."""
    before = hx.rejects(hx.metrics(env.port))
    held = fill_the_cap(env.port)
    time.sleep(0.3)  # all accepted
    newcomers = []
    try:
        for _ in range(4):  # idle themselves, held open: each one closes one of the oldest
            newcomers.append(socket.create_connection(("127.0.0.1", env.port), timeout=5,
                                                      source_address=("127.0.3.200", 0)))
            time.sleep(0.05)
        time.sleep(0.3)
        states = [hx.state_of(s) for s in held]
        status, _, body, took = hx.get(env.port, "/metrics", source="127.0.3.201", timeout=5)
        time.sleep(0.3)
        fifth = hx.state_of(held[4])
        newcomers_open = [hx.state_of(s) for s in newcomers]
        still_open = wait_all_closed(held + newcomers, HEAD_TIMEOUT + MARGIN)
    finally:
        for s in held + newcomers:
            s.close()
    assert states[:4] == ["closed"] * 4 and set(states[4:]) == {"open"}, \
        f"the 4 oldest should have made room, the others stay: {states[:8]}, {states.count('closed')} closed"
    assert status == 200 and took < 1.0 and body.startswith(b"# "), (status, took, body[:100])
    assert fifth == "closed" and newcomers_open == ["open"] * 4, (fifth, newcomers_open)
    assert not still_open, f"{len(still_open)} idle connections outlived the head deadline"
    after = hx.rejects(hx.metrics(env.port))
    assert after["connection_limit"] - before["connection_limit"] == 5
    assert after["head_timeout"] - before["head_timeout"] >= TOTAL - 5
    assert "http_reject reason=connection_limit client=127.0.3.1" in env.d.stderr()


def test_scrapes_get_in_while_16_addresses_hold_the_cap(env):
    """The lockout: 16 addresses trickle request heads on 256 connections and reopen each as soon as it is
    closed. Every /metrics from another address got 503 for as long as that went on (2 of 30 answered). Now
    each scrape makes room by closing the connection idle longest."""
    slow = b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n"
    held = fill_the_cap(env.port, slow)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            for i, s in enumerate(held):
                try:
                    s.send(b"X")
                except OSError:
                    s.close()
                    try:
                        held[i] = socket.create_connection(("127.0.0.1", env.port), timeout=5,
                                                           source_address=(f"127.0.3.{i // PER_ADDRESS + 1}", 0))
                        held[i].sendall(slow)
                    except OSError:
                        pass
            stop.wait(0.2)

    attacker = threading.Thread(target=trickle, daemon=True)
    attacker.start()
    results = []
    try:
        time.sleep(0.5)
        for _ in range(30):
            try:
                status, _, _, _ = hx.get(env.port, "/metrics", source="127.0.3.200", timeout=2.0)
                results.append(status)
            except OSError as e:
                results.append(repr(e))
            time.sleep(0.2)  # 6 s and more: past the head deadline, so reopened connections are in it
    finally:
        stop.set()
        attacker.join(5)
        for s in held:
            s.close()
    answered = results.count(200)
    print(f"lockout: {answered} of 30 scrapes answered while 16 addresses held the cap")
    assert answered >= 28, f"only {answered} of 30 scrapes answered: {results}"


@pytest.mark.parametrize("head, body", [
    (b"Transfer-Encoding: gzip\r\n", b""),
    (b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
    (b"Transfer-Encoding: gzip\r\nContent-Length: 0\r\n", b""),
])
def test_transfer_encoding_not_ending_in_chunked_is_400(env, head, body):
    """RFC 9112 6.3: the body length of such a request cannot be known: 400 and close, never 'no body'."""
    before = hx.rejects(hx.metrics(env.port))
    reply = hx.raw_request(env.port, b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\n" + head + b"\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    after = hx.rejects(hx.metrics(env.port))
    assert after["bad_request"] - before["bad_request"] == 1


def test_transfer_encoding_ending_in_chunked_is_served(env):
    reply = hx.raw_request(env.port, b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nTransfer-Encoding: gzip, chunked\r\n"
                                     b"Connection: close\r\n\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_idle_keep_alive_is_closed_but_not_counted(env):
    """A kept-alive connection that sends nothing more is closed after the head deadline (it holds a slot);
    that is no refusal."""
    before = hx.rejects(hx.metrics(env.port))
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5, source_address=("127.0.0.5", 0))
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 "), first
        started = time.monotonic()
        s.settimeout(HEAD_TIMEOUT + MARGIN)
        try:
            rest = s.recv(4096)
        except OSError:
            rest = b""
        waited = time.monotonic() - started
    finally:
        s.close()
    assert rest == b"" and HEAD_TIMEOUT - 0.5 <= waited <= HEAD_TIMEOUT + MARGIN, (rest, waited)
    after = hx.rejects(hx.metrics(env.port))
    assert after["head_timeout"] == before["head_timeout"]


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/api/v1/report.csv"])
def test_head_is_the_get_head_without_a_body(env, path):
    """RFC 9110 9.1 and 9.3.2: a server supports HEAD (curl -I, uptime probes): the status and headers that a GET
    gets, Content-Length included, and no body, so that a request pipelined behind it is answered in order."""
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: mailflowd\r\n\r\n"
                  f"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    finally:
        s.close()
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply[:300]
    length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
    assert length and int(length[0].split(b":")[1]) > 0, head
    # Straight after the HEAD reply's head: the GET's reply, and nothing of a body between them.
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\nok"), rest[:300]


def test_other_methods_are_405_naming_get_and_head(env):
    reply = hx.raw_request(env.port, b"DELETE /metrics HTTP/1.1\r\nHost: mailflowd\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405 "), reply
    assert b"\r\nAllow: GET, HEAD\r\n" in reply, reply


@pytest.mark.parametrize("data, status, words", [
    # A browser sends every localhost cookie to this port too: what it gets must say what was too big.
    (b"GET / HTTP/1.1\r\nHost: mailflowd\r\nCookie: " + b"a" * 9000 + b"\r\n\r\n", 431, b"request head over 8 KiB"),
    (b"POST /healthz HTTP/1.1\r\nHost: mailflowd\r\nContent-Length: 9000\r\n\r\n" + b"a" * 9000, 413,
     b"request body over 8 KiB"),
    (b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
     b"Transfer-Encoding must end in chunked"),
    (b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n", 400,
     b"bad request: "),
    # RFC 9112 3.2: an HTTP/1.1 request without a Host header, or with two, gets 400.
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400, b"needs one Host header"),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"needs one Host header"),
], ids=["head_over_limit", "body_over_limit", "transfer_encoding", "two_lengths", "no_host", "two_hosts"])
def test_a_refused_request_is_told_why(env, data, status, words):
    before = hx.rejects(hx.metrics(env.port))
    reply = hx.raw_request(env.port, data)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head and words in body, reply
    after = hx.rejects(hx.metrics(env.port))
    assert after["bad_request"] - before["bad_request"] == 1


def test_expect_100_continue_gets_a_100(env, tmp_path):
    """RFC 9110 10.1.1: a client that sends Expect: 100-continue waits for a 100 before it sends its body. None
    came: curl waited its 1 s before each such request, and a client that waits longer met the 5 s body deadline,
    closed and counted as head_timeout. A 100 Continue now goes out before the body is read, as nginx sends it
    before it reads or discards one; the request is then answered as before (POST: 405) on the same connection."""
    before = hx.rejects(hx.metrics(env.port))
    body = tmp_path / "body"
    body.write_bytes(b"a" * 2000)
    curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-H",
                           "Expect: 100-continue", "--data-binary", f"@{body}", f"http://127.0.0.1:{env.port}/metrics"],
                          capture_output=True, text=True, timeout=10)
    status, took = curl.stdout.split()
    assert status == "405" and float(took) < 0.5, curl.stdout
    s = socket.create_connection(("127.0.0.1", env.port), timeout=HEAD_TIMEOUT + MARGIN,
                                 source_address=("127.0.0.7", 0))
    try:
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: mailflowd\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = s.recv(4096)
        s.sendall(b"hello")
        reply = b""
        while b"method not allowed\n" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\n\r\n")
        again = s.recv(4096)
    finally:
        s.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
    assert reply.startswith(b"HTTP/1.1 405 ") and b"Connection: close" not in reply, reply
    assert again.startswith(b"HTTP/1.1 200 "), again
    assert hx.rejects(hx.metrics(env.port)) == before


@pytest.mark.parametrize("data", [
    b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n",  # the head, unfinished
    b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nContent-Length: 100\r\n\r\nabc",  # the body, unfinished
    b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
], ids=["in_the_head", "in_the_body", "in_a_chunk"])
def test_a_client_that_closes_mid_request_is_no_bad_request(env, data):
    """A client that stops mid-request and closes (a killed curl, a scrape that gave up, a port check that sent a
    few bytes) sent nothing wrong: the request was counted as bad_request, which docs/security.md defines as a
    400, 413 or 431 for what was sent, and answered with a 400 'partial message' that nobody could read. It is
    closed without an answer, not counted, as a TLS connection closed without a word is."""
    before = hx.rejects(hx.metrics(env.port))
    s = socket.create_connection(("127.0.0.1", env.port), timeout=HEAD_TIMEOUT + MARGIN,
                                 source_address=("127.0.0.6", 0))
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        took = time.monotonic() - started
    finally:
        s.close()
    assert reply == b"" and took < 1.0, (reply, took)
    after = hx.rejects(hx.metrics(env.port))
    assert after == before, {r: after[r] - before[r] for r in after if after[r] != before[r]}


@pytest.mark.parametrize("chunked", [  # neither is ever finished: the answer must come before its end
    b"1;" + b"e" * 60000,  # one chunk extension
    b"1\r\nx\r\n0\r\n" + b"X-T: y\r\n" * 7500,  # trailer fields
], ids=["chunk_extension", "trailers"])
def test_a_chunked_body_is_limited_as_sent(env, chunked):
    """The 8 KiB body limit counts the body as sent, chunk framing, extensions and trailer fields included: it
    counted the payload only, so megabytes of trailer fields (each kept in memory) were taken; 4 requests of 24 MB
    took the RSS from 25 MB to 489 MB and held the HTTP thread for 16 s each, past the body deadline, while
    /metrics and /healthz waited."""
    before = hx.rejects(hx.metrics(env.port))
    reply = hx.raw_request(env.port, b"GET /healthz HTTP/1.1\r\nHost: mailflowd\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + chunked)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"request body over 8 KiB" in reply, reply[:300]
    after = hx.rejects(hx.metrics(env.port))
    assert after["bad_request"] - before["bad_request"] == 1


def send_body_then_read(port, head, body_size, piece=8192, pause=0.002, source="127.0.0.1"):
    """Sends `head` and then `body_size` bytes in pieces, as a client uploading a body does (curl, a script with
    requests), and reads the answer only after the whole body went out. (answer bytes, body bytes sent, the send
    error or None, the read error or None)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sent, send_error, read_error, answer = 0, None, None, b""
    try:
        s.sendall(head)
        while sent < body_size:
            try:
                s.sendall(b"x" * piece)
            except OSError as e:
                send_error = e
                break
            sent += piece
            time.sleep(pause)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError as e:
            read_error = e
    finally:
        s.close()
    return answer, sent, send_error, read_error


@pytest.mark.parametrize("size", [256 * 1024, 2 * 1024 * 1024])
def test_a_413_reaches_a_client_still_sending_its_body(env, size):
    """A body over 8 KiB gets 413 once 8 KiB have come, while the client is still sending. The connection was
    closed with the rest unread: the kernel answered the next bytes with a reset, the client's send failed and
    its read got ECONNRESET, the 413 lost (nginx's lingering_close). Now the server reads and drops what
    follows (bounded: 5 s, 4 MiB) until the client closes, so the client reads the 413."""
    head = b"POST /healthz HTTP/1.1\r\nHost: mailflowd\r\nContent-Length: %d\r\n\r\n" % size
    answer, sent, send_error, read_error = send_body_then_read(env.port, head, size)
    print(f"413 test: sent {sent} of {size} body bytes; send error {send_error!r}, read error {read_error!r}")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"request body over 8 KiB" in answer, (
        f"no 413 read: {answer[:200]!r}; sent {sent} of {size}; send error {send_error!r}, read error {read_error!r}")
    assert send_error is None and read_error is None, (send_error, read_error)


def test_a_refused_head_has_no_body(env):
    """A refused HEAD (here a Transfer-Encoding that is not chunked) gets the status and its length, no body."""
    reply = hx.raw_request(env.port, b"HEAD /metrics HTTP/1.1\r\nHost: mailflowd\r\nTransfer-Encoding: gzip\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), reply
    assert body == b"", reply
    assert re.search(rb"\r\nContent-Length: [1-9][0-9]*", head), reply


@pytest.mark.parametrize("target", [b"http://mailflowd/healthz", b"HTTP://mailflowd:9100/healthz?x=1"])
def test_absolute_form_is_served(env, target):
    """RFC 9112 3.2.2: a server takes the absolute form of the target (what a client sends to a proxy), and an
    HTTP/1.0 request needs no Host header."""
    reply = hx.raw_request(env.port, b"GET " + target + b" HTTP/1.1\r\nHost: mailflowd\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok"), reply
    reply = hx.raw_request(env.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200 ") and reply.endswith(b"\r\n\r\nok"), reply


@pytest.mark.parametrize("target, plain", [
    ("/%6Detrics", "/metrics"),
    ("/%68%65%61%6c%74%68%7A", "/healthz"),  # hex digits in either case
    ("/api/v1/report%2Ecsv?days=1", "/api/v1/report.csv?days=1"),
    ("/api/v1/%72eport.txt?d%61ys=%31", "/api/v1/report.txt?days=1"),
    ("/api/v1/connectors%2etxt", "/api/v1/connectors.txt"),
])
def test_an_escaped_unreserved_character_is_that_character(env, target, plain):
    """RFC 3986 6.2.2.2: a percent-encoded unreserved character (ALPHA, DIGIT, '-', '.', '_', '~') is the same
    URI as the character itself, as nginx decodes before it matches a location: the same answer as the plain
    spelling. It was 404 (the path was compared as sent, while the query was decoded)."""
    assert_same_answer(env, target, plain)


def assert_same_answer(env, target, plain):
    """`target` answers as `plain` does: 200, the same media type and, but for what moves between two requests,
    the same body."""
    status, headers, body, _ = hx.get(env.port, target)
    plain_status, plain_headers, plain_body, _ = hx.get(env.port, plain)
    assert plain_status == 200, (plain, plain_status, plain_body[:200])
    assert status == 200 and headers["Content-Type"] == plain_headers["Content-Type"], (target, status, body[:200])
    if plain == "/metrics":  # counters move between the two scrapes
        assert body.startswith(b"# HELP mailflow_") and b"\nmailflow_build_info{" in body, body[:200]
    elif plain != "/":  # the page says when it was made; a report's time may differ by a second (seen under ASan)
        assert undated(body) == undated(plain_body), (target, body[:300], plain_body[:300])


def undated(report):
    return re.sub(rb'generated(_at)?("?: "?| )[0-9TZ:.-]+', b"generated", report)


@pytest.mark.parametrize("target", ["/api%2Fv1%2Freport", "/api/v1%2freport.csv", "/%2Fmetrics", "/metrics%20"])
def test_an_escaped_reserved_or_other_character_is_no_path_of_ours(env, target):
    """RFC 3986 2.2: a percent-encoded reserved character is data, not a delimiter: %2F is no '/', so these are no
    path the daemon serves (nginx would decode %2F; Go's ServeMux keeps it apart, as here)."""
    status, _, body, _ = hx.get(env.port, target)
    assert (status, body) == (404, b"not found\n"), (target, status, body)


@pytest.mark.parametrize("target, plain", [
    ("/api/v1/../../metrics", "/metrics"),
    ("/./metrics", "/metrics"),
    ("/../metrics", "/metrics"),  # above the root: dropped (RFC 3986 5.2.4; curl sends it as /metrics)
    ("/api/./v1/report.csv?days=1", "/api/v1/report.csv?days=1"),
    ("/api/v1/x/%2E%2E/report.txt", "/api/v1/report.txt"),  # %2E is '.' (6.2.2.2), then the dot segment
    ("/metrics/../healthz", "/healthz"),
    ("/metrics/..", "/"),  # the report page
])
def test_dot_segments_are_removed_before_the_routes(env, target, plain):
    """RFC 3986 6.2.2.3 and 5.2.4: '.' and '..' segments are removed before a path is compared, as curl does
    before it sends (unless --path-as-is) and nginx before it matches a location (ngx_http_parse_complex_uri).
    Sent as is (a script, Go's client, Prometheus with such a metrics_path) they got 404."""
    assert_same_answer(env, target, plain)


@pytest.mark.parametrize("target", ["/api%2F..%2Fmetrics", "/.metrics", "/api/v1/...", "/..metrics"])
def test_what_only_looks_like_a_dot_segment_is_no_path_of_ours(env, target):
    """An escaped '/' is no separator, so /api%2F..%2Fmetrics has no dot segment; '...' and '.metrics' are
    segments of their own."""
    status, _, body, _ = hx.get(env.port, target)
    assert (status, body) == (404, b"not found\n"), (target, status, body)


@pytest.mark.parametrize("target", ["/metrics%", "/metrics%4", "/%zzmetrics", "/metrics%00", "/healthz%00"])
def test_a_bad_escape_or_nul_in_the_path_is_400(env, target):
    """A '%' that does not start %XX is no URI (RFC 3986 2.1), and %00 is refused as nginx refuses it
    (ngx_http_parse_complex_uri): 400 saying why, as a bad escape in the query gets. Both were 404. Counted as
    every refused request is (a 400 of the API was not counted at all)."""
    before = hx.rejects(hx.metrics(env.port)).get("bad_request", 0)
    status, _, body, _ = hx.get(env.port, target)
    assert status == 400 and body.startswith(b"bad %-escape in the path"), (target, status, body)
    assert hx.rejects(hx.metrics(env.port)).get("bad_request", 0) == before + 1


WRITE_TIMEOUT = 30.0    # kWriteTimeout


def test_a_response_not_taken_within_the_write_deadline_is_counted(env):
    """A client that asks and never reads: the answers fill the socket buffers, the write deadline closes the
    connection, and that is logged and counted (a scraper too slow to take /metrics lost its scrapes without a
    trace on this side)."""
    before = hx.rejects(hx.metrics(env.port))
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.bind(("127.0.0.6", 0))
    s.connect(("127.0.0.1", env.port))
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n\r\n" * 2000)  # ~50 MB of answers, never read
        harness.wait_for(lambda: hx.rejects(hx.metrics(env.port)).get("write_timeout", 0) > before.get(
            "write_timeout", 0), WRITE_TIMEOUT + 10, interval=0.5, what="write_timeout to be counted")
    finally:
        s.close()
    assert "http_reject reason=write_timeout client=127.0.0.6" in env.d.stderr()


KEEP_ALIVE_TIME = 30.0  # kKeepAliveTime


def take_answer_slowly(s, seconds):
    """The head and body of one answer on `s`, the body read in 20 pieces over `seconds`; None when the
    server closed the connection first."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            return None
        head += chunk
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    body = b""
    while len(body) < length:
        chunk = s.recv(min(max(1, length // 20), length - len(body)))
        if not chunk:
            return None
        body += chunk
        time.sleep(seconds / 20)
    return head, body


def test_a_kept_alive_connection_takes_new_requests_for_30s_then_closes(env):
    """A client that takes each /metrics answer a few bytes at a time in 2 s (under the 5 s that make an
    answer stalled at the cap, well within the 30 s write deadline) and asks again at once is never idle,
    never stalled and never timed out: it held its connection, and a rendered answer, for as long as it went on
    (96 such clients held 133 MB of 1.4 MB answers for 70 s and more, nothing closed or counted). Now the first
    answer after KEEP_ALIVE_TIME from the accept says Connection: close, whole, and the connection ends, as
    nginx's keepalive_time ends one; nothing is counted, no answer is lost."""
    before = hx.rejects(hx.metrics(env.port))
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10, source_address=("127.0.0.175", 0))
    opened = time.monotonic()
    heads = []
    try:
        while time.monotonic() - opened < KEEP_ALIVE_TIME + 12:
            try:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n\r\n")
            except OSError:
                break
            answer = take_answer_slowly(s, 2.0)
            if answer is None:
                break
            head, body = answer
            assert head.startswith(b"HTTP/1.1 200 ") and body.startswith(b"# HELP "), (head, body[:100])
            heads.append(head)
            if b"connection: close" in head.lower():
                s.settimeout(5)
                assert s.recv(1) == b"", "the server went on after its Connection: close"
                break
        held = time.monotonic() - opened
    finally:
        s.close()
    assert heads and b"connection: close" in heads[-1].lower(), \
        f"still kept alive after {held:.1f}s and {len(heads)} answers"
    assert all(b"connection: close" not in h.lower() for h in heads[:-1])
    assert KEEP_ALIVE_TIME <= held <= KEEP_ALIVE_TIME + 2 * 2.0 + MARGIN, f"closed after {held:.1f}s"
    after = hx.rejects(hx.metrics(env.port))
    assert after == before, (before, after)


def cpu_seconds(port):
    return harness.value(hx.metrics(port, source="127.0.0.121"), "process_cpu_seconds_total")


def test_scrapes_are_answered_while_240_connections_pipeline_metrics_unread(env):
    """15 addresses x 16 connections, each with a 4 KiB receive window, each pipelining 200 GET /metrics that it
    never reads. A write completes once the kernel has the bytes, and the send buffers grow to megabytes: the
    one HTTP thread rendered /metrics some 150 times per connection until they were full (seconds of CPU), and
    scrapes from another address timed out (2 s) behind those renders for 8 s and more. Now what an answer may
    leave unsent is bounded (TCP_NOTSENT_LOWAT): a connection that does not read gets a few answers, the
    scrapes are answered at once and the flood costs little CPU."""
    pipelined = b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n\r\n" * 200
    held = []
    results, took = [], []
    cpu_before = cpu_seconds(env.port)
    try:
        for a in range(15):
            for _ in range(PER_ADDRESS):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
                s.bind((f"127.0.4.{a + 1}", 0))
                s.connect(("127.0.0.1", env.port))
                s.setblocking(False)
                try:
                    s.send(pipelined)
                except BlockingIOError:
                    pass
                held.append(s)
        started = time.monotonic()
        for _ in range(20):
            try:
                status, _, body, seconds = hx.get(env.port, "/metrics", source="127.0.0.120",
                                                  timeout=SCRAPE_TIMEOUT)
                results.append(status if status != 200 or body.startswith(b"# ") else "bad body")
                took.append(seconds)
            except OSError as e:
                results.append(repr(e))
            time.sleep(0.2)
        span = time.monotonic() - started
        cpu = cpu_seconds(env.port) - cpu_before
    finally:
        for s in held:
            s.close()
    answered = results.count(200)
    print(f"pipelined flood: {answered} of 20 scrapes answered over {span:.1f}s (slowest "
          f"{max(took, default=0):.2f}s), the daemon used {cpu:.1f}s of CPU")
    assert answered == 20, f"only {answered} of 20 scrapes answered over {span:.1f}s: {results}"
    assert cpu < 3.0, f"the daemon used {cpu:.1f}s of CPU on 240 connections that read nothing"


def test_at_the_total_cap_an_answer_untaken_for_5s_makes_room(env):
    """16 addresses x 16 connections with a 4 KiB receive window pipeline GET /metrics and read nothing: all 256
    are in a write, none waits for a request, so every scrape from a 17th address got 503 until the 30 s write
    deadline closed them. Now at the cap the connection whose answer has gone untaken longest (5 s at least) is
    closed to make room, logged and counted as connection_limit."""
    before = hx.rejects(hx.metrics(env.port))
    pipelined = b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n\r\n" * 50
    held, results = [], []
    try:
        for a in range(TOTAL // PER_ADDRESS):
            for _ in range(PER_ADDRESS):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.bind((f"127.0.4.{a + 1}", 0))
                s.connect(("127.0.0.1", env.port))
                s.sendall(pipelined)
                held.append(s)
        time.sleep(STALLED_WRITE + 1.0)
        for _ in range(10):
            try:
                status, _, body, _ = hx.get(env.port, "/metrics", source="127.0.0.122", timeout=2.0)
                results.append(status)
            except OSError as e:
                results.append(repr(e))
            time.sleep(0.1)
        closed = sum(hx.state_of(s) == "closed" for s in held)
    finally:
        for s in held:
            s.close()
    assert results == [200] * 10, results
    assert 1 <= closed <= 10, f"{closed} of the 256 writers closed"
    after = hx.rejects(hx.metrics(env.port))
    assert after["connection_limit"] - before["connection_limit"] == closed
    assert after["write_timeout"] == before["write_timeout"]
    assert "closed to make room: its answer untaken longest at the cap" in env.d.stderr()


def test_at_the_total_cap_the_connection_open_longest_makes_room(env):
    """16 addresses x 16 connections with a 4 KiB receive window pipeline GET /metrics and take each answer a KiB
    at a time, in well under 5 s, and a closed one is opened again at once: all 256 are in a write, none waits
    for a request and none has left an answer untaken for 5 s, so 26 of 30 scrapes from a 17th address got 503
    for as long as that went on (each connection ends after 30 s and one answer, and is back at once). Now at the
    cap, when none waits and none stalls, the connection open longest is closed to make room, logged and counted
    as connection_limit; a scrape, the newest, is served."""
    pipelined = b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n\r\n" * 50
    stop = threading.Event()

    def busy(source):
        while not stop.is_set():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(5)
                s.bind((source, 0))
                s.connect(("127.0.0.1", env.port))
                s.sendall(pipelined)
                while not stop.is_set() and s.recv(1024):
                    stop.wait(0.05)
            except OSError:
                stop.wait(0.05)
            finally:
                s.close()

    before = hx.rejects(hx.metrics(env.port))
    readers = [threading.Thread(target=busy, args=(f"127.0.4.{a + 1}",), daemon=True)
               for a in range(TOTAL // PER_ADDRESS) for _ in range(PER_ADDRESS)]
    results = []
    try:
        for t in readers:
            t.start()
        time.sleep(2.0)  # all 256 connected and in a write, none for 5 s
        for _ in range(10):
            try:
                status, _, body, _ = hx.get(env.port, "/metrics", source="127.0.0.123", timeout=SCRAPE_TIMEOUT)
                results.append(status if status != 200 or body.startswith(b"# ") else "bad body")
            except OSError as e:
                results.append(repr(e))
            time.sleep(0.2)
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert results == [200] * 10, results
    after = hx.rejects(hx.metrics(env.port))
    assert after["connection_limit"] > before["connection_limit"]
    assert after["write_timeout"] == before["write_timeout"]
    assert "closed to make room: open longest at the cap" in env.d.stderr()
