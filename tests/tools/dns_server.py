"""A real authoritative DNS server for the tests: Debian's knotd (package knot) in the foreground, on a free
loopback port, with its own temporary config, run and storage directories, serving the zones the test
gives it. Optionally the zones are DNSSEC-signed by knot itself (automatic signing) and the DS records are
written to a trust anchor file that mailflowd's dns.trust_anchor_file can point at.

    from dns_server import KnotServer
    dns = KnotServer(workdir, {"example.net": ZONE_TEXT}).start()
    ... dns.address  -> "127.0.0.1:PORT" for dns.servers
    dns.stop()

Also runnable by hand, to poke at a zone with kdig or mailflowd route:
    python3 tests/tools/dns_server.py --zone example.net=FILE [--dnssec] [--dir DIR]
"""
import argparse
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from free_port import free_port  # noqa: E402

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KEYMGR = shutil.which("keymgr") or "/usr/sbin/keymgr"
KDIG = shutil.which("kdig") or "/usr/bin/kdig"


def udp_free(host, port):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class KnotServer:
    """knotd serving `zones` ({"example.net": "zone file text", ...}) on host:port (UDP and TCP)."""

    def __init__(self, workdir, zones, host="127.0.0.1", port=0, dnssec=False, name="knotd"):
        self.name = name
        self.dir = Path(workdir) / name
        self.zones = dict(zones)
        self.host = host
        self.port = port
        self.dnssec = dnssec
        self.proc = None
        self.log_path = self.dir / "knotd.log"
        # knotd's control socket lives in rundir, and a unix socket path is limited to 107 bytes: a deep build
        # or CI directory would break it, so rundir is always a short directory of its own under /tmp.
        self.rundir = Path(tempfile.mkdtemp(prefix="knot-"))

    @property
    def address(self):
        """For dns.servers: "127.0.0.1:PORT" or "[::1]:PORT"."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _config(self):
        lines = [
            "server:",
            f'    rundir: "{self.rundir}"',
            f"    listen: {self.host}@{self.port}",
            "    udp-workers: 1",
            "    tcp-workers: 1",
            "    background-workers: 1",
            "database:",
            f'    storage: "{self.dir / "db"}"',
            "log:",
            "  - target: stderr",
            "    any: info",
        ]
        if self.dnssec:
            # Fast, deterministic keys for tests: one ECDSA P-256 CSK per zone, no rollovers during a test.
            lines += ["policy:", "  - id: tests", "    algorithm: ecdsap256sha256", "    single-type-signing: on",
                      "    ksk-lifetime: 0", "    zsk-lifetime: 0"]
        lines += ["template:", "  - id: default", f'    storage: "{self.dir / "zones"}"',
                  "    zonefile-sync: -1", "    journal-content: none"]
        if self.dnssec:
            lines += ["    dnssec-signing: on", "    dnssec-policy: tests"]
        lines.append("zone:")
        for zone in self.zones:
            lines += [f"  - domain: {zone}.", f"    file: {zone}.zone"]
        return "\n".join(lines) + "\n"

    def start(self, timeout=15.0):
        for sub in ("run", "db", "zones"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for zone, text in self.zones.items():
            (self.dir / "zones" / f"{zone}.zone").write_text(text)
        if not self.port:
            for _ in range(50):
                port = free_port(self.host)
                if udp_free(self.host, port):
                    self.port = port
                    break
        self.conf = self.dir / "knot.conf"
        self.conf.write_text(self._config())
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([KNOTD, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        pending = set(self.zones)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"knotd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"knotd did not serve {sorted(pending)} within {timeout}s:\n{self.log_tail()}")
            for zone in list(pending):
                want = "RRSIG" if self.dnssec else "SOA"
                if want in self.dig(zone, "SOA", "+dnssec" if self.dnssec else "+nodnssec"):
                    pending.discard(zone)
            time.sleep(0.1)
        if self.dnssec:
            self.trust_anchor_file = self.dir / "trust-anchors.ds"
            self.trust_anchor_file.write_text("".join(self.ds(zone) for zone in self.zones))
        return self

    def dig(self, name, rrtype, *options):
        """kdig's answer section, "" when there is none or no answer at all."""
        argv = [KDIG, "@" + self.host, "-p", str(self.port), name, rrtype, "+norec", "+time=1", "+retry=0",
                "+noall", "+answer", *options]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
        except subprocess.TimeoutExpired:
            return ""

    def ds(self, zone):
        """The zone's DS records (zone-file lines), from knot's key store."""
        out = subprocess.run([KEYMGR, "-c", str(self.conf), f"{zone}.", "ds"], capture_output=True, text=True,
                             check=True).stdout
        return "".join(line + "\n" for line in out.splitlines() if " DS " in line)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def log_tail(self, limit=6000):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<{e}>"
        return text if len(text) <= limit else "...\n" + text[-limit:]


class SilentServer:
    """A UDP socket that is bound (so no ICMP port unreachable comes back) and never answers: the resolver can
    only give up at its deadline. `port` 0 is a free one; 53 where a resolv.conf names the host (it cannot say
    another port). `queries`: when each query came (time.monotonic()), in order."""

    def __init__(self, host="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)  # close() stops the reader within this
        self.host, self.port = host, self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.queries = []
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while self._running:
            try:
                self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.queries.append(time.monotonic())

    def close(self):
        self._running = False
        self._thread.join(2)
        self.sock.close()


class HoldingProxy:
    """A UDP DNS forwarder in front of `upstream` ("HOST:PORT", e.g. a KnotServer's address) that holds every query
    unanswered until release(), then forwards the held ones (the resolver's retries among them) and every later
    one at once: a lookup that is still in flight when the test decides, and then gets its answer."""

    def __init__(self, upstream, host="127.0.0.1"):
        up_host, up_port = upstream.rsplit(":", 1)
        self.upstream = (up_host.strip("[]"), int(up_port))
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.queries = 0
        self._held = []
        self._released = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _forward(self, query, client):
        def ask():
            with socket.socket(self.sock.family, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                try:
                    s.sendto(query, self.upstream)
                    answer, _ = s.recvfrom(65535)
                    self.sock.sendto(answer, client)
                except OSError:
                    pass
        threading.Thread(target=ask, daemon=True).start()

    def _serve(self):
        while True:
            try:
                query, client = self.sock.recvfrom(65535)
            except OSError:
                return
            with self._lock:
                self.queries += 1
                if not self._released:
                    self._held.append((query, client))
                    continue
            self._forward(query, client)

    def release(self):
        with self._lock:
            self._released = True
            held, self._held = self._held, []
        for query, client in held:
            self._forward(query, client)

    def close(self):
        self.sock.close()


class TamperingProxy:
    """A UDP DNS forwarder in front of `upstream` ("127.0.0.1:PORT") that changes one byte of every AAAA
    record it passes for the names in `names` (lower case, no final dot), leaving their RRSIGs as they are: a
    validating resolver then finds those answers bogus, as it would where an attacker forged them. Queries for
    the names in `drop` get no answer at all (a lookup that can only time out; only those of the query types in
    `drop_types` where it is given, 28 for AAAA: a name server that drops AAAA queries). Everything else passes
    unchanged. `questions`: the (name, type) of every query it got, in order; `asked_at`: when (time.monotonic())."""

    def __init__(self, upstream, names=(), host="127.0.0.1", drop=(), drop_types=()):
        up_host, _, up_port = upstream.rpartition(":")
        self.upstream = (up_host.strip("[]"), int(up_port))
        self.names = {n.lower().rstrip(".") for n in names}
        self.drop = {n.lower().rstrip(".") for n in drop}
        self.drop_types = set(drop_types)
        self.tampered = 0
        self.dropped = 0
        self.questions = []
        self.asked_at = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _skip_name(packet, at):
        while True:
            length = packet[at]
            if length & 0xC0 == 0xC0:
                return at + 2
            if length == 0:
                return at + 1
            at += 1 + length

    @staticmethod
    def _question(packet):
        """(name, type, offset after the question) of a one-question packet."""
        if struct.unpack("!H", packet[4:6])[0] != 1:
            return None, None, None
        at, labels = 12, []
        while packet[at]:
            labels.append(packet[at + 1:at + 1 + packet[at]].decode("ascii", "replace").lower())
            at += 1 + packet[at]
        return ".".join(labels), struct.unpack("!H", packet[at + 1:at + 3])[0], at + 5

    def _tamper(self, packet):
        ancount = struct.unpack("!H", packet[6:8])[0]
        name, qtype, at = self._question(packet)
        if qtype != 28 or name not in self.names:
            return packet
        out = bytearray(packet)
        for _ in range(ancount):
            at = self._skip_name(packet, at)
            rtype, _, _, rdlength = struct.unpack("!HHIH", packet[at:at + 10])
            at += 10
            if rtype == 28:
                out[at + rdlength - 1] ^= 0x01
                self.tampered += 1
            at += rdlength
        return bytes(out)

    def _answer(self, query, client):
        try:
            name, qtype, _ = self._question(query)
            self.questions.append((name, qtype))
            self.asked_at.append(time.monotonic())
            if name in self.drop and (not self.drop_types or qtype in self.drop_types):
                self.dropped += 1
                return
        except (IndexError, struct.error):
            pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(3)
            try:
                up.sendto(query, self.upstream)
                reply = up.recv(65535)
            except OSError:
                return
            try:
                reply = self._tamper(reply)
            except (IndexError, struct.error, UnicodeError):
                pass  # not a packet this proxy understands: passed on as it came
            try:
                self.sock.sendto(reply, client)
            except OSError:
                pass

    def _serve(self):
        while not self.closed:
            try:
                query, client = self.sock.recvfrom(65535)
            except OSError:
                return
            threading.Thread(target=self._answer, args=(query, client), daemon=True).start()

    def close(self):
        self.closed = True
        self.sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zone", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--dnssec", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    zones = {}
    for spec in args.zone:
        name, _, path = spec.partition("=")
        zones[name.rstrip(".")] = Path(path).read_text()
    workdir = args.dir or tempfile.mkdtemp(prefix="mailflow-dns-")
    server = KnotServer(workdir, zones, host=args.host, port=args.port, dnssec=args.dnssec).start()
    print(f"READY {server.address}" + (f" trust_anchor_file={server.trust_anchor_file}" if args.dnssec else ""),
          flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
