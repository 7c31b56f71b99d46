"""Helpers shared by the hardening tests (test_hostile_*.py, test_faults*.py, test_signals*.py): listener
dicts, reject-counter assertions, a scripted fake upstream, and "a normal message still relays"."""
import socket
import struct
import threading
import time
import uuid

import harness
from harness import delta, fmt_delta

SENDER = "sender@example.test"
RCPT = "rcpt@dest.test"


def listener(name, port, upstream, certs=None, **extra):
    lst = {"name": name, "address": f"127.0.0.1:{port}", "direction": "inbound", "upstream": upstream}
    if certs is not None:
        lst["tls"] = harness.listener_tls(certs)
    lst.update(extra)
    return lst


def plain_upstream(name, port, tls="none", **extra):
    up = {"name": name, "address": f"127.0.0.1:{port}", "tls": tls}
    up.update(extra)
    return up


def message(subject="hardening", body=b"body\r\n", message_id=None):
    mid = message_id or f"<{uuid.uuid4().hex}@example.test>"
    head = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n\r\n").encode()
    return head + body


# ------------------------------------------------------------------------------------------- counters
def wait_counter(daemon, before, name, at_least=1.0, timeout=5.0, **labels):
    """The last scrape once `name{labels}` moved by `at_least` in total (or after `timeout`)."""
    holder = {}

    def moved():
        holder["m"] = daemon.metrics()
        return sum(delta(before, holder["m"], name, **labels).values()) >= at_least

    try:
        harness.wait_for(moved, timeout, what=f"{name}{labels} to move")
    except AssertionError:
        pass
    return holder["m"]


def assert_rejected(daemon, before, reason, n=1, listener_name=None, exact=True):
    """mailflow_rejects_total{reason} moved by n (exactly, unless exact=False: at least)."""
    labels = {"reason": reason}
    if listener_name:
        labels["listener"] = listener_name
    after = wait_counter(daemon, before, "mailflow_rejects_total", at_least=n, **labels)
    got = sum(delta(before, after, "mailflow_rejects_total", **labels).values())
    ok = got == n if exact else got >= n
    assert ok, (f"mailflow_rejects_total{labels} should move by {'' if exact else '>= '}{n}, moved by {got}; "
                f"all rejects that moved:\n{fmt_delta(delta(before, after, 'mailflow_rejects_total'))}")
    return after


def assert_counter(daemon, before, name, n=1, exact=True, **labels):
    after = wait_counter(daemon, before, name, at_least=n, **labels)
    got = sum(delta(before, after, name, **labels).values())
    ok = got == n if exact else got >= n
    assert ok, (f"{name}{labels} should move by {'' if exact else '>= '}{n}, moved by {got}; all moves of {name}:\n"
                f"{fmt_delta(delta(before, after, name))}")
    return after


# ------------------------------------------------------------------------------------------- sessions
def greeted(port, ehlo="client.example.test", source=None, timeout=10.0):
    """A RawSmtp past the banner and EHLO."""
    c = harness.RawSmtp(port, source=source, timeout=timeout)
    code, text = c.reply()
    assert code == 220, f"banner: {text!r}"
    code, text = c.cmd(f"EHLO {ehlo}")
    assert code == 250, f"EHLO: {text!r}"
    return c


def assert_cut_off(reply, c, after):
    """`reply` is the 421 4.7.0 of limits.max_bad_commands (after `after`), and the session ends with it."""
    code, text = reply
    assert code == 421 and text.startswith("421 4.7.0 "), f"after {after}: {text!r}"
    assert c.closed_or_error(3.0), "the connection stayed open after 421"


def deliver_to(port, rcpt, sender, subject):
    """One message to `rcpt` in a session of its own: (RCPT reply, final reply, or None where RCPT was refused)."""
    c = greeted(port)
    try:
        assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        rcpt_reply = c.cmd(f"RCPT TO:<{rcpt}>")
        if rcpt_reply[0] != 250:
            c.cmd("QUIT")
            return rcpt_reply, None
        assert c.cmd("DATA")[0] == 354
        c.send(f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
        final = c.cmd(".")
        c.cmd("QUIT")
        return rcpt_reply, final
    finally:
        c.close()


def transaction(c, data, sender=SENDER, rcpts=(RCPT,)):
    """MAIL/RCPT/DATA/content/. on an open session; returns the (code, text) after the final dot."""
    code, text = c.cmd(f"MAIL FROM:<{sender}>")
    assert code == 250, f"MAIL: {text!r}"
    for r in rcpts:
        code, text = c.cmd(f"RCPT TO:<{r}>")
        assert code == 250, f"RCPT {r}: {text!r}"
    code, text = c.cmd("DATA")
    assert code == 354, f"DATA: {text!r}"
    c.send(harness.dot_stuff(data))
    return c.cmd(".")


def unsolicited(c, wait=0.5):
    """Bytes the server sent beyond the replies read so far: what RawSmtp already buffered plus what arrives
    within `wait` seconds (b"" when nothing; None when the server closed the connection)."""
    got = c.pending(wait)
    if got is None:
        return c.buf or None
    return c.buf + got


def replies_within(c, wait=0.5):
    """Every complete reply the server sends until it is quiet for `wait` seconds: [(code, text)]."""
    out = []
    while True:
        while b"\r\n" in c.buf:
            out.append(c.reply())
        got = c.pending(wait)
        if not got:
            return out
        c.buf += got


def assert_relays(daemon, port, sink, connector="internet", tls_version="none"):
    """A normal message from a fresh session is delivered byte-exactly and counted once."""
    before = daemon.metrics()
    n = sink.count()
    data = message("still relaying")
    c = greeted(port)
    try:
        code, text = transaction(c, data)
        assert code == 250, f"a normal message after the hostile input was refused: {text!r}"
        c.cmd("QUIT")
    finally:
        c.close()
    meta, content = sink.wait_messages(n + 1)[-1]
    assert harness.split_received(content)[1] == data, f"message altered at the sink: {content!r}"
    harness.assert_counted(daemon, before, connector, "inbound", tls_version)


def read_all(sock, wait=2.0, limit=1 << 20):
    """Everything the peer sends until it closes or stays quiet for `wait` seconds -> (bytes, closed)."""
    sock.settimeout(wait)
    out = b""
    try:
        while len(out) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return out, True
            out += chunk
    except socket.timeout:
        return out, False
    except ConnectionError:
        return out, True
    return out, False


def wait_sessions_idle(daemon, timeout=5.0):
    """Waits until mailflow_sessions_active is 0 on every listener (finished sessions are released async)."""
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_sessions_active") == 0, timeout,
                     what="mailflow_sessions_active to reach 0")


# ------------------------------------------------------------------------------------------ fake upstream
class FakeUpstream:
    """A raw TCP server on loopback that runs `script(conn, self)` for every accepted connection in its own
    thread. Scripts use the helpers below; received bytes are kept per connection in self.received."""

    def __init__(self, name, script, host="127.0.0.1", port=0):
        self.name = name
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # any 127.x address: MX hosts of a test zone share one port
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self.delivered = []  # message contents, for scripts that take mail (Conn.serve)
        self.log = []
        self.stopped = False
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        harness.LIVE.append(self)

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            idx = len(self.received)
            self.received.append(b"")
            threading.Thread(target=self._run, args=(conn, idx), daemon=True).start()

    def _run(self, conn, idx):
        try:
            self.script(Conn(conn, self, idx))
        except Exception as e:  # noqa: BLE001 - logged for the failure report
            self.log.append(f"conn {idx}: script ended: {e!r}")

    def connections(self):
        return len(self.received)

    def stop(self):
        self.stopped = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        if self in harness.LIVE:
            harness.LIVE.remove(self)

    def log_tail(self):
        return "\n".join(self.log[-50:] + [f"conn {i} received: {r[:2000]!r}" for i, r in enumerate(self.received)])


class Conn:
    def __init__(self, sock, server, idx):
        self.sock, self.server, self.idx = sock, server, idx
        self.buf = b""
        sock.settimeout(30)

    def send(self, data):
        self.server.log.append(f"conn {self.idx} S: {data!r}")
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("peer closed")
            self.buf += chunk
            self.server.received[self.idx] += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.server.log.append(f"conn {self.idx} C: {line!r}")
        return line

    def message(self):
        """After a 354: the message's content up to its terminator (None when the peer goes away first)."""
        while b"\r\n.\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        content, self.buf = self.buf.split(b"\r\n.\r\n", 1)
        return content

    def recv_some(self, n=65536):
        if self.buf:
            out, self.buf = self.buf, b""
            return out
        chunk = self.sock.recv(n)
        self.server.received[self.idx] += chunk
        return chunk

    def smtp_until(self, verb):
        """Greets and answers EHLO (with STARTTLS offered) and everything else with 250, until `verb` arrives
        (returned as the full line) or the peer goes away (None)."""
        self.send(b"220 fake.test ESMTP fake\r\n")
        while True:
            try:
                line = self.line()
            except (ConnectionError, OSError):
                return None
            word = line.split(b" ", 1)[0].upper()
            if word == verb:
                return line
            if word == b"EHLO":
                self.send(b"250-fake.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif word == b"QUIT":
                self.send(b"221 bye\r\n")
                return None
            elif word == b"DATA":
                self.send(b"354 go on\r\n")
            else:
                self.send(b"250 ok\r\n")

    def serve(self, on=None, ehlo=b"250-fake.test\r\n250 PIPELINING\r\n"):
        """A mail server for scripts: greets, answers EHLO with `ehlo`, takes each message (DATA, 354, content
        appended to server.delivered, 250), QUIT with 221 and anything else with 250, until the peer goes away.
        `on` maps a command word (b"RCPT") to handler(line) for the script's own behaviour: it returns True when
        the conversation is over, and a false value to go on; None means "as by default" for this line."""
        self.send(b"220 fake.test ESMTP fake\r\n")
        while True:
            try:
                line = self.line()
            except (ConnectionError, OSError):
                return
            word = line.split(b" ", 1)[0].upper()
            handler = (on or {}).get(word)
            verdict = handler(line) if handler else None
            if verdict:
                return
            if verdict is not None:
                continue
            if word == b"EHLO":
                self.send(ehlo)
            elif word == b"DATA":
                self.send(b"354 go on\r\n")
                content = self.message()
                if content is None:
                    return
                self.server.delivered.append(content)
                self.send(b"250 2.0.0 queued\r\n")
            elif word == b"QUIT":
                self.send(b"221 bye\r\n")
                return
            else:
                self.send(b"250 ok\r\n")

    def broken_tls_sink(self):
        """An SMTP server whose TLS is broken: it offers STARTTLS, answers 220 to it and then sends garbage for a
        ServerHello (and closes); without STARTTLS it takes mail (serve())."""
        def starttls(_line):
            self.send(b"220 2.0.0 Ready to start TLS\r\n")
            self.recv_some()  # the ClientHello
            self.send(b"this is not a TLS server hello\r\n" * 4)
            self.sock.close()
            return True

        self.serve({b"STARTTLS": starttls}, ehlo=b"250-broken-tls.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")

    def reset(self):
        """Closes with an RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def hang(self, seconds=30):
        """Reads and ignores whatever comes, never answers, until the peer closes or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return
            except OSError:
                return
            if not chunk:
                return
            self.server.received[self.idx] += chunk
