#!/usr/bin/python3
"""SMTP sink for the integration tests (aiosmtpd), run as a subprocess.

  sink.py --port P --maildir DIR [--host 127.0.0.1] [--tls-cert C --tls-key K] [--tls-max-version TLS1.2]
          [--require-tls] [--xclient] [--fail-rcpt 'addr=550 5.1.1 no such user']... [--fail-data '554 ...']

Every accepted message is stored as DIR/<id>.eml (the DATA content exactly as received, after SMTP
dot-unstuffing only: line endings and every other byte untouched) and DIR/<id>.json, written after the
.eml and atomically, with mail_from, rcpt_tos, mail_options, rcpt_options, helo, peer, tls_version
("none" or what ssl.SSLObject.version() says, e.g. "TLSv1.2"), tls_cipher, xclient (attributes of the last
XCLIENT command, or null). Every connection appends one line to DIR/connections.log.
Prints "READY <port>" on stdout when listening (port 0 picks a free one). Stops on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
import warnings

from aiosmtpd.smtp import SMTP, syntax

TLS_VERSIONS = {
    "TLS1.0": ssl.TLSVersion.TLSv1,
    "TLS1.1": ssl.TLSVersion.TLSv1_1,
    "TLS1.2": ssl.TLSVersion.TLSv1_2,
    "TLS1.3": ssl.TLSVersion.TLSv1_3,
}
XCLIENT_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO")


def xtext_decode(value):
    """RFC 1891 xtext: "+XX" is a hex-encoded byte."""
    out = bytearray()
    i = 0
    raw = value.encode("ascii", "surrogateescape")
    while i < len(raw):
        if raw[i:i + 1] == b"+" and i + 3 <= len(raw):
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "replace")


class SinkSMTP(SMTP):
    """aiosmtpd SMTP with optional XCLIENT (Postfix semantics: 220 greeting, session state reset)."""

    def __init__(self, handler, *, xclient=False, **kwargs):
        self.xclient_enabled = xclient
        super().__init__(handler, **kwargs)
        if not xclient:
            self._smtp_methods.pop("XCLIENT", None)

    def connection_made(self, transport):
        super().connection_made(transport)
        if getattr(self.session, "xclient", None) is None:
            self.session.xclient = None
        if self._original_transport is None:  # the plaintext connection, not the STARTTLS upgrade
            self.event_handler.log_connection(self.session.peer)

    @syntax("XCLIENT attribute=value ...")
    async def smtp_XCLIENT(self, arg):
        if not arg:
            await self.push("501 5.5.4 Syntax: XCLIENT attribute=value...")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs = {}
        for item in arg.split():
            name, eq, value = item.partition("=")
            if not eq or name.upper() not in XCLIENT_ATTRS + ("LOGIN", "DESTADDR", "DESTPORT"):
                await self.push(f"501 5.5.4 Bad XCLIENT attribute name: {name}")
                return
            attrs[name.upper()] = xtext_decode(value)
        self.session.xclient = attrs
        # Postfix: the session starts over as if the given client had connected; HELO= sets the helo name.
        self._set_rset_state()
        self.session.host_name = attrs.get("HELO") if attrs.get("HELO") not in (None, "[UNAVAILABLE]") else None
        self.session.extended_smtp = False
        await self.push(f"220 {self.hostname} ESMTP sink (XCLIENT)")


class SinkHandler:
    def __init__(self, args):
        self.args = args
        self.maildir = args.maildir
        self.counter = 0
        self.fail_rcpt = {}
        for spec in args.fail_rcpt:
            addr, eq, reply = spec.partition("=")
            if not eq:
                raise SystemExit(f"--fail-rcpt wants addr=reply, got {spec!r}")
            self.fail_rcpt[addr.strip().lower()] = reply.strip()

    def log_connection(self, peer):
        with open(os.path.join(self.maildir, "connections.log"), "a") as f:
            f.write(f"{time.time():.6f} {peer[0]} {peer[1]}\n")

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if server.xclient_enabled:
            responses.insert(len(responses) - 1, "250-XCLIENT " + " ".join(XCLIENT_ATTRS))
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.fail_rcpt.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.args.fail_data:
            return self.args.fail_data
        self.counter += 1
        mid = f"{time.time_ns()}-{os.getpid()}-{self.counter:06d}"
        tls_version, cipher = "none", None
        if session.ssl is not None:
            obj = session.ssl.get("ssl_object")
            if obj is not None:
                tls_version = obj.version()
                c = obj.cipher()
                cipher = c[0] if c else None
        meta = {
            "id": mid,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "helo": session.host_name,
            "peer": list(session.peer) if session.peer else None,
            "tls_version": tls_version,
            "tls_cipher": cipher,
            "xclient": getattr(session, "xclient", None),
            "size": len(envelope.original_content),
        }
        base = os.path.join(self.maildir, mid)
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json.tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(base + ".json.tmp", base + ".json")
        return f"250 2.0.0 Ok: queued as {mid}"


def make_tls_context(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS1.0 is deprecated: that is exactly what we want to measure
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    if args.tls_max_version:
        ctx.maximum_version = TLS_VERSIONS[args.tls_max_version]
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


async def main(args):
    os.makedirs(args.maildir, exist_ok=True)
    handler = SinkHandler(args)
    tls_context = make_tls_context(args) if args.tls_cert else None
    loop = asyncio.get_running_loop()

    def factory():
        return SinkSMTP(handler, xclient=args.xclient, hostname=args.hostname, ident="ESMTP sink",
                        tls_context=tls_context, require_starttls=args.require_tls,
                        data_size_limit=None, decode_data=False, loop=loop)

    server = await loop.create_server(factory, host=args.host, port=args.port)
    port = server.sockets[0].getsockname()[1]
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"READY {port}", flush=True)
    await stop
    server.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--hostname", default="sink.test")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-max-version", choices=sorted(TLS_VERSIONS))
    p.add_argument("--require-tls", action="store_true")
    p.add_argument("--xclient", action="store_true")
    p.add_argument("--fail-rcpt", action="append", default=[], metavar="ADDR=REPLY")
    p.add_argument("--fail-data", metavar="REPLY")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.require_tls and not args.tls_cert:
        p.error("--require-tls needs --tls-cert/--tls-key")
    return args


if __name__ == "__main__":
    a = parse_args()
    if a.verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    try:
        asyncio.run(main(a))
    except KeyboardInterrupt:
        pass
