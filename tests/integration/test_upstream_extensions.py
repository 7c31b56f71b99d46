"""MAIL parameters and the upstream's SMTP service extensions. mailflowd announces SIZE and 8BITMIME itself, so
a client (Postfix's smtp client does, RFC 1870) sends "MAIL FROM:<...> SIZE=n" and, for 8-bit content,
"BODY=8BITMIME". Those are parameters of extensions, and an SMTP client may use an extension only where the
server announced it in its EHLO reply (RFC 5321 2.2.1, 4.1.1.11: a server that does not know a parameter
answers 555): an upstream that answers EHLO without SIZE, or that knows only HELO, is not sent them, as
Postfix's smtp client sends SIZE= and BODY= only where its server announced SIZE and 8BITMIME.

Each scripted upstream here behaves as RFC 5321 4.1.1.11 says (555 5.5.4 to a MAIL parameter it did not
announce) and keeps the MAIL lines it got."""
import socket
import types

import pytest

import harness
import hostile_helpers as hh

EHLO_BARE = b"250-bare.test\r\n250 PIPELINING\r\n"
EHLO_FULL = b"250-full.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"


def strict_server(ehlo, helo_only=False):
    """A mail server announcing `ehlo` (or, `helo_only`, no EHLO at all: 500 to it, 250 to HELO, no extensions)
    that refuses a MAIL parameter of an extension it did not announce with 555 and keeps every MAIL line."""
    announced = set() if helo_only else {line[4:].split(b" ")[0].upper() for line in ehlo.split(b"\r\n")[1:]}
    keyword = {b"SIZE": b"SIZE", b"BODY": b"8BITMIME"}

    def script(conn):
        def ehlo_handler(_line):
            if not helo_only:
                return None
            conn.send(b"500 5.5.2 EHLO not understood\r\n")
            return False

        def mail(line):
            conn.server.mail_lines.append(line)
            params = line.split(b">", 1)[1].split()
            unknown = [p for p in params if keyword.get(p.split(b"=")[0].upper()) not in announced]
            conn.send(b"555 5.5.4 unsupported parameter %s\r\n" % unknown[0] if unknown else b"250 2.1.0 ok\r\n")
            return False

        conn.serve({b"EHLO": ehlo_handler, b"MAIL": mail}, ehlo=ehlo)
    return script


def restarted_server():
    """Connection 0 announces SIZE and 8BITMIME, takes a message and then, at the next MAIL, closes without a word
    (an upstream restarted with other settings, or an idle close that shows only at the next command); the
    connections after it announce neither and are strict_server(EHLO_BARE)'s."""
    bare = strict_server(EHLO_BARE)

    def script(conn):
        if conn.idx > 0:
            bare(conn)
            return

        def mail(line):
            conn.server.mail_lines.append(line)
            if not conn.server.delivered:
                conn.send(b"250 2.1.0 ok\r\n")
                return False
            conn.sock.shutdown(socket.SHUT_WR)
            while conn.sock.recv(65536):
                pass
            conn.sock.close()
            return True

        conn.serve({b"MAIL": mail}, ehlo=EHLO_FULL)
    return script


FAKES = {
    "bare": strict_server(EHLO_BARE),
    "heloonly": strict_server(b"", helo_only=True),
    "full": strict_server(EHLO_FULL),
    "restarted": restarted_server(),
}


@pytest.fixture(scope="module")
def env(daemon_factory):
    fakes = {name: hh.FakeUpstream(name, script) for name, script in FAKES.items()}
    for fake in fakes.values():
        fake.mail_lines = []
    ports = {name: harness.free_port() for name in FAKES}
    listeners = [hh.listener(name, ports[name], name) for name in FAKES]
    upstreams = [hh.plain_upstream(name, fake.port) for name, fake in fakes.items()]
    daemon = daemon_factory(listeners=listeners, upstreams=upstreams,
                            timeouts={"command": "3s", "upstream_connect": "2s", "data_end": "3s"})
    yield types.SimpleNamespace(daemon=daemon, ports=ports, fakes=fakes)
    for f in fakes.values():
        f.stop()


def send(env, name, mail_params, body=b"body\r\n"):
    """One message through listener `name` with `mail_params` on MAIL FROM; the replies to RCPT and to the end."""
    c = hh.greeted(env.ports[name])
    try:
        code, text = c.cmd(f"MAIL FROM:<{hh.SENDER}> {mail_params}")
        assert code == 250, f"MAIL: {text!r}"
        rcpt = c.cmd(f"RCPT TO:<{hh.RCPT}>")
        if rcpt[0] != 250:
            return rcpt, None
        code, text = c.cmd("DATA")
        assert code == 354, f"DATA: {text!r}"
        c.send(harness.dot_stuff(hh.message("extensions", body)))
        end = c.cmd(".")
        c.cmd("QUIT")
        return rcpt, end
    finally:
        c.close()


@pytest.mark.parametrize("name", ["bare", "heloonly"])
def test_size_and_body_7bit_not_sent_where_not_announced(env, name):
    """SIZE= to an upstream without SIZE (and BODY=7BIT, the default, without 8BITMIME) was sent as the client
    wrote it: the upstream answered 555, which the client got for its RCPT, and the message was refused."""
    before = env.daemon.metrics()
    fake = env.fakes[name]
    lines = len(fake.mail_lines)
    rcpt, end = send(env, name, "SIZE=200 BODY=7BIT")
    sent = fake.mail_lines[lines:]
    assert rcpt[0] == 250, f"RCPT got {rcpt[1]!r}; the upstream got {sent!r}\n{fake.log_tail()}"
    assert end is not None and end[0] == 250, f"end of data: {end!r}"
    assert sent == [f"MAIL FROM:<{hh.SENDER}>".encode()], sent
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none")


def test_announced_extensions_get_the_parameters(env):
    """An upstream that announces SIZE and 8BITMIME gets them as the client sent them."""
    fake = env.fakes["full"]
    lines = len(fake.mail_lines)
    rcpt, end = send(env, "full", "SIZE=200 BODY=8BITMIME", body="b\u00e4dy\r\n".encode())
    assert rcpt[0] == 250 and end[0] == 250, (rcpt, end)
    assert fake.mail_lines[lines:] == [f"MAIL FROM:<{hh.SENDER}> SIZE=200 BODY=8BITMIME".encode()]


def test_body_8bitmime_still_goes_where_8bitmime_was_not_announced(env):
    """mailflowd cannot convert a message to 7 bits (RFC 6152 3: a relay converts or refuses), and dropping the
    parameter would hand the upstream 8-bit data undeclared: BODY=8BITMIME is sent (SIZE= is not), the upstream
    refuses it, the client hears that at its RCPT, and nothing is delivered or counted."""
    before = env.daemon.metrics()
    fake = env.fakes["bare"]
    lines = len(fake.mail_lines)
    rcpt, end = send(env, "bare", "SIZE=200 BODY=8BITMIME", body="b\u00e4dy\r\n".encode())
    assert end is None and rcpt[1].startswith("555 5.5.4"), (rcpt, end)
    assert fake.mail_lines[lines:] == [f"MAIL FROM:<{hh.SENDER}> BODY=8BITMIME".encode()]
    harness.assert_not_counted(env.daemon, before, settle=0.2)


def test_replay_on_a_new_connection_gets_the_new_connections_mail_line(env):
    """A kept connection that the upstream closes at the next MAIL has the transaction replayed on a new
    connection. The replay sent the bytes built for the old connection, whose EHLO announced SIZE: the new one,
    which does not, got SIZE= and answered 555, which the client got for its RCPT. MAIL is built again for the
    connection it goes to."""
    before = env.daemon.metrics()
    fake = env.fakes["restarted"]
    c = hh.greeted(env.ports["restarted"])
    try:
        for subject in ("first", "second"):
            assert c.cmd(f"MAIL FROM:<{hh.SENDER}> SIZE=200")[0] == 250
            code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
            assert code == 250, f"RCPT of the {subject} message: {text!r}; MAIL lines {fake.mail_lines!r}"
            assert c.cmd("DATA")[0] == 354
            c.send(harness.dot_stuff(hh.message(subject)))
            code, text = c.cmd(".")
            assert code == 250, f"end of the {subject} message: {text!r}"
        c.cmd("QUIT")
    finally:
        c.close()
    assert fake.connections() == 2, fake.log_tail()
    mail = f"MAIL FROM:<{hh.SENDER}>".encode()
    assert fake.mail_lines == [mail + b" SIZE=200", mail + b" SIZE=200", mail], fake.mail_lines
    assert b"Subject: second" in fake.delivered[-1]
    harness.assert_counted(env.daemon, before, "internet", "inbound", "none", n=2)
