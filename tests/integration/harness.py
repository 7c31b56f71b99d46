"""Integration harness: the real mailflowd binary, the aiosmtpd sink, real SMTP clients (swaks, openssl
s_client, raw sockets). Imported by conftest.py and by the test modules.

Everything that runs is registered in LIVE so that a failing test's report carries the daemon's stderr,
the sinks' logs and the SMTP transcripts (see conftest.pytest_runtest_makereport).
"""
import contextlib
import http.server
import json
import os
import re
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SINK = HERE.parent / "tools" / "sink.py"
sys.path.insert(0, str(SINK.parent))
from free_port import free_port  # noqa: E402  (tests/tools is not a package)
MAKE_CERTS = HERE.parent / "certs" / "make-certs.sh"
PYTHON = "/usr/bin/python3"
HOSTNAME = "mx.test"
TLS_LABELS = ("none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3")

# How long a sink or a daemon may take to come up: only an upper bound, for one that never does. The sanitizer
# builds on a busy machine are several times slower than Debug (test_signals' daemon with 20 CA bundles to load took
# 10 to 17 s to answer /healthz under ASan, 4 to 5 s in Debug), and a start that merely took long is no failure of
# what a test checks.
START_TIMEOUT = 60.0

# Things whose logs a failure report should show: objects with .name and .log_tail().
LIVE = []
# SMTP transcripts of the current test (cleared by conftest before each test).
TRANSCRIPTS = []


def make_certs(directory):
    subprocess.run([str(MAKE_CERTS), str(directory)], check=True)
    return Path(directory)


def ca_signed_cert(certs, directory, name, names, chain=False, san=True, ca="ca"):
    """A server certificate from the test CA (certs/ca.pem) for `names` (the first is the CN): (cert, key) files in
    `directory`. `chain`: the cert file holds the leaf, then the CA (a server that sends its chain, as DANE-TA
    needs). `san=False`: the names are not in a subjectAltName, the first is only the subject's CN. `ca`: another
    CA in `certs` (CA.pem and CA.key, e.g. one made with make_ca)."""
    directory = Path(directory)
    key, csr, crt, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", f"/CN={names[0]}"], check=True, capture_output=True)
    ext.write_text(("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n" if san else "") +
                   "extendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(Path(certs) / f"{ca}.pem"), "-CAkey",
                    str(Path(certs) / f"{ca}.key"), "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out",
                    str(crt)], check=True, capture_output=True)
    if not chain:
        return crt, key
    pem = directory / f"{name}-chain.pem"
    pem.write_text(crt.read_text() + (Path(certs) / f"{ca}.pem").read_text())
    return pem, key


def make_ca(directory, name, cn):
    """A CA of its own (DIRECTORY/NAME.pem and NAME.key), e.g. a private CA apart from the test CA."""
    directory = Path(directory)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-keyout",
                    str(directory / f"{name}.key"), "-out", str(directory / f"{name}.pem"), "-subj", f"/CN={cn}",
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True)
    return directory / f"{name}.pem"


class PolicyHost(http.server.BaseHTTPRequestHandler):
    """An MTA-STS policy host (RFC 8461 3.3) for https_server: a GET gets the policy of the Host it names
    (`policies`: host -> policy text) as 200 text/plain, else 404, and a host in `silent` says nothing for 5 s
    (longer than the daemon's fetch_timeout). Every GET's Host is recorded in `requests`. A test subclasses it
    with class attributes of its own."""
    policies = {}
    silent = ()
    requests = []

    def do_GET(self):  # noqa: N802
        host = self.headers.get("Host", "")
        self.requests.append(host)
        if host in self.silent:
            time.sleep(5)
            return
        body = self.policies.get(host)
        data = (body or "not found").encode()
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def https_server(handler, cert, key, address=("127.0.0.1", 0)):
    """An HTTPS server of `handler` (an http.server handler class) on `address`, serving from a thread of its own
    (its server_address has the port; shutdown() stops it)."""
    server = http.server.ThreadingHTTPServer(address, handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def in_own_files(hosts, resolv=None):
    """A Daemon wrapper that runs the daemon with `hosts` bound over /etc/hosts (and `resolv` over
    /etc/resolv.conf), in a mount namespace of its own; skips the test where none can be made."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount) for a hosts file of its own")
    if resolv is None:
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && shift && exec "$@"',
            str(hosts), str(resolv)]


def stop_exits_0(daemon):
    """Stops a daemon that a module fixture started itself: it must exit 0 after SIGTERM."""
    code = daemon.stop()
    if daemon in LIVE:
        LIVE.remove(daemon)
    assert code == 0, f"{daemon.name}: exit code after SIGTERM = {code!r}\n{daemon.log_tail()}"


def sanitized(binary):
    """Whether `binary` is a sanitizer build (the asan preset: ASan and UBSan)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return "libasan" in out or "libubsan" in out


def thread_sanitized(binary):
    """Whether `binary` is a ThreadSanitizer build (the tsan preset)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return "libtsan" in out


@contextlib.contextmanager
def out_of_descriptors(daemon):
    """While in it, the daemon cannot make a new descriptor: a new one gets the lowest free number, and every number
    below 3 is taken (stdin, stdout, stderr), whatever else closes meanwhile; the open ones go on. Its limit is
    given back on the way out."""
    pid = daemon.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def skip_out_of_descriptors_if_sanitized(binary):
    """A test that drives mailflowd to its descriptor limit cannot run under the sanitizers: their runtime needs
    descriptors of its own (UBSan's vptr check probes memory through a pipe), and at the limit it reports a false
    "invalid vptr" and halts the daemon. Such tests run in the Debug suite."""
    if sanitized(binary):
        pytest.skip("at the descriptor limit the sanitizer runtime cannot open its own pipe (false 'invalid vptr')")


def tail(path, limit=12000):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"<{e}>"
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------- sink
class Sink:
    """tests/tools/sink.py as a subprocess."""

    def __init__(self, workdir, name="sink", port=0, tls_cert=None, tls_key=None, tls_max_version=None,
                 require_tls=False, xclient=False, fail_rcpt=(), fail_data=None, host="127.0.0.1"):
        self.name = name
        self.maildir = Path(workdir) / f"{name}-maildir"
        self.maildir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(workdir) / f"{name}.log"
        self.host = host  # any 127.x address: MX hosts of a test zone share one port on different addresses
        self.port = port or free_port(host)  # fixed across restarts (test_faults_noloss)
        self.argv = [PYTHON, str(SINK), "--host", host, "--port", str(self.port), "--maildir", str(self.maildir),
                     "--verbose"]
        if tls_cert:
            self.argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        if tls_max_version:
            self.argv += ["--tls-max-version", tls_max_version]
        if require_tls:
            self.argv.append("--require-tls")
        if xclient:
            self.argv.append("--xclient")
        for spec in fail_rcpt:
            self.argv += ["--fail-rcpt", spec]
        if fail_data:
            self.argv += ["--fail-data", fail_data]
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log)
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"sink {self.name} did not start: {line!r}\n{tail(self.log_path)}")
        LIVE.append(self)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self in LIVE:
            LIVE.remove(self)

    def log_tail(self):
        return tail(self.log_path, 6000)

    def messages(self):
        """[(meta dict, content bytes)] in arrival order."""
        out = []
        for meta_path in sorted(self.maildir.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            out.append((meta, meta_path.with_suffix(".eml").read_bytes()))
        return out

    def count(self):
        return len(list(self.maildir.glob("*.json")))

    def connections(self):
        p = self.maildir / "connections.log"
        return len(p.read_text().splitlines()) if p.exists() else 0

    def wait_messages(self, n, timeout=10.0):
        wait_for(lambda: self.count() >= n, timeout, what=f"{n} message(s) at sink {self.name}")
        return self.messages()


# ------------------------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_metrics(text):
    """Prometheus text exposition -> {(name, frozenset(labels.items())): float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if not m:
            raise AssertionError(f"unparsable metrics line: {line!r}")
        name, labels_text, value = m.groups()
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                if not lm:
                    raise AssertionError(f"unparsable labels in: {line!r}")
                labels[lm.group(1)] = lm.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                pos = lm.end()
        out[(name, frozenset(labels.items()))] = float(value)
    return out


def series(metrics, name, **labels):
    """{frozenset(labels): value} of every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in metrics.items() if n == name and want <= lab}


def value(metrics, name, **labels):
    """Sum of the samples of `name` matching `labels` (0 when there is none)."""
    return sum(series(metrics, name, **labels).values())


def delta(before, after, name, **labels):
    """{labels dict as sorted tuple: change} of every series of `name` (matching labels) that moved."""
    moved = {}
    keys = set(series(before, name, **labels)) | set(series(after, name, **labels))
    for lab in keys:
        d = after.get((name, lab), 0.0) - before.get((name, lab), 0.0)
        if d:
            moved[tuple(sorted(lab))] = d
    return moved


def fmt_delta(moved):
    return "\n".join(f"  {dict(k)}: {v:+g}" for k, v in sorted(moved.items())) or "  (nothing moved)"


# ------------------------------------------------------------------------------------------- daemon
def default_config(state_dir, http_port, listeners, upstreams, connectors=(), **extra):
    cfg = {
        "hostname": HOSTNAME,
        "state_dir": str(state_dir),
        "listeners": list(listeners),
        "upstreams": list(upstreams),
        "http": {"address": f"127.0.0.1:{http_port}"},
        "limits": {"drain_timeout": "3s"},
        "timeouts": {"upstream_connect": "5s", "tls_handshake": "10s"},
        "log": {"level": "debug", "format": "text"},
    }
    if connectors:
        cfg["connectors"] = list(connectors)
    cfg.update(extra)
    return cfg


def listener_tls(certs, extra_certs=()):
    pairs = [{"cert": str(certs / "server.pem"), "key": str(certs / "server.key")}]
    pairs += [{"cert": str(certs / f"{n}.pem"), "key": str(certs / f"{n}.key")} for n in extra_certs]
    return {"certificates": pairs, "min_version": "TLS1.0", "ciphers": "DEFAULT:@SECLEVEL=0"}


class Daemon:
    """mailflowd --config FILE, with a JSON (= YAML flow) config written from a dict."""

    def __init__(self, binary, workdir, config, name="mailflowd", wrapper=(), env=None):
        self.binary = binary
        self.wrapper = list(wrapper)  # runs the binary, e.g. setpriv as another user
        self.env = dict(env or {})  # added to the daemon's environment, e.g. MAILFLOWD_FAILPOINTS
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.stderr"
        self.http = "http://" + config["http"]["address"]
        self.proc = None
        self.exit_code = None

    def listener_port(self, name):
        for lst in self.config["listeners"]:
            if lst["name"] == name:
                return int(lst["address"].rsplit(":", 1)[1])
        raise KeyError(name)

    def launch(self, stderr=None):
        """Writes the config and starts the daemon, not waiting for it to be up (start() does). Its standard output
        and error go to the log file; with `stderr` (subprocess.PIPE) its standard error goes there instead, for the
        test to read (self.proc.stderr), and standard output nowhere."""
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        if stderr is None:
            self.log = open(self.log_path, "ab")
            out = err = self.log
        else:
            out, err = subprocess.DEVNULL, stderr
        self.proc = subprocess.Popen([*self.wrapper, self.binary, "--config", str(self.config_path)],
                                     stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env} if self.env else None)
        LIVE.append(self)
        return self

    def start(self, timeout=None):
        timeout = timeout or START_TIMEOUT
        self.launch()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mailflowd exited with {self.proc.returncode} during startup\n"
                                     f"config {self.config_path}:\n{self.config_path.read_text()}\n"
                                     f"stderr:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.http + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mailflowd /healthz not up after {timeout}s\nstderr:\n{tail(self.log_path)}")
            time.sleep(0.05)

    def get(self, path):
        with urllib.request.urlopen(self.http + path, timeout=5) as r:
            return r.status, r.read().decode("utf-8", "replace")

    def metrics(self):
        status, text = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return parse_metrics(text)

    def stop(self, timeout=15.0):
        """SIGTERM; returns the exit code (the caller asserts it)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = "killed after SIGTERM timeout"
                return self.exit_code
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_tail(self):
        return tail(self.log_path)

    def stderr(self):
        return tail(self.log_path, 10 ** 9)

    def queue_clients(self, count, connect, then):
        """`count` clients from `connect()` made while the daemon is stopped (SIGSTOP), so that they wait in the
        kernel's accept queue; signal `then` is sent before it resumes (SIGCONT). Returns the clients."""
        clients = []
        self.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(count):
                clients.append(connect())
            self.proc.send_signal(then)
        finally:
            self.proc.send_signal(signal.SIGCONT)
        return clients


# ---------------------------------------------------------------------------------------- SMTP clients
class SwaksResult:
    def __init__(self, argv, rc, out):
        self.argv, self.rc, self.out = argv, rc, out

    def replies(self):
        """Server reply lines ("250 ...", "550 ...") in order, from swaks' transcript markers."""
        out = []
        for line in self.out.splitlines():
            m = re.match(r"^(?:<-|<~|<\*\*|<~\*)\s+(\d{3}[ -].*)$", line)
            if m:
                out.append(m.group(1))
        return out

    def final_replies(self):
        return [r for r in self.replies() if r[3] == " "]

    def __str__(self):
        return f"$ {' '.join(self.argv)}\n(rc={self.rc})\n{self.out}"


def swaks(port, *, to="rcpt@dest.test", sender="sender@example.test", data=None, tls=None, local=None,
          ehlo="client.example.test", quit_after=None, extra=(), timeout=20, server="127.0.0.1"):
    """Runs swaks. `data` (bytes, CRLF line ends, unstuffed) is sent byte-exactly; `tls` is None (plaintext),
    "starttls" (any version) or a swaks protocol name: tlsv1, tlsv1_1, tlsv1_2, tlsv1_3."""
    argv = ["swaks", "--server", server, "--port", str(port), "--to", to, "--from", sender,
            "--ehlo", ehlo, "--timeout", "15"]
    if data is not None:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"swaks-data-{os.getpid()}-{time.monotonic_ns()}"
        path.write_bytes(dot_stuff(data) + b".")  # swaks -ndf sends it verbatim and adds the last CRLF
        argv += ["--data", f"@{path}", "--no-data-fixup"]
    if tls:
        argv += ["--tls", "--tls-cipher", "DEFAULT:@SECLEVEL=0"]
        if tls != "starttls":
            argv += ["--tls-protocol", tls]
    if local:
        argv += ["--local-interface", local]
    if quit_after:
        argv += ["--quit-after", quit_after]
    argv += list(extra)
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    res = SwaksResult(argv, p.returncode, p.stdout.decode("utf-8", "replace"))
    TRANSCRIPTS.append(str(res))
    if data is not None:
        path.unlink(missing_ok=True)
    return res


def dot_stuff(data):
    assert data.endswith(b"\r\n"), "message data must end with CRLF"
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


def client_tls_context(version=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        if version:
            v = {"TLS1.0": ssl.TLSVersion.TLSv1, "TLS1.1": ssl.TLSVersion.TLSv1_1,
                 "TLS1.2": ssl.TLSVersion.TLSv1_2, "TLS1.3": ssl.TLSVersion.TLSv1_3}[version]
            ctx.minimum_version = v
            ctx.maximum_version = v
    return ctx


class RawSmtp:
    """A raw SMTP client over a socket (optionally bound to a source address), with a transcript."""

    def __init__(self, port, host="127.0.0.1", source=None, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.transcript = []
        TRANSCRIPTS.append(self.transcript)

    def send(self, data):
        self.transcript.append("C: " + data.decode("latin-1").replace("\r\n", "\\r\\n"))
        self.sock.sendall(data)

    def _recv(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by server")
        self.buf += chunk

    def reply(self):
        """One (possibly multi-line) reply -> (code, text with lines joined by \\n)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                self._recv()
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            self.transcript.append("S: " + text)
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, version=None, server_hostname=None):
        """After a 220 to STARTTLS: handshake. Any plaintext already buffered is an error by itself."""
        if self.buf:
            self.transcript.append(f"!! plaintext bytes left before handshake: {self.buf!r}")
        ctx = client_tls_context(version)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        self.transcript.append(f"-- TLS {self.sock.version()} {self.sock.cipher()[0]}")
        return self.sock.version()

    def pending(self, wait=0.5):
        """Bytes the server sent without being asked, within `wait` seconds (b"" if none; None at EOF)."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.transcript.append(f"S(unsolicited): {chunk!r}")
            return chunk
        except (socket.timeout, ssl.SSLWantReadError):
            return b""
        finally:
            self.sock.settimeout(10.0)

    def closed_or_error(self, wait=5.0):
        """True when the server closes the connection (or resets it) within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.transcript.append(f"S: {chunk!r}")
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class SClient:
    """openssl s_client -starttls smtp, driven line by line over stdin, replies read from stdout."""

    def __init__(self, port, version_flag="-tls1_2", host="127.0.0.1", extra=()):
        self.argv = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{host}:{port}", version_flag,
                     "-cipher", "DEFAULT:@SECLEVEL=0", "-quiet", "-crlf", "-ign_eof", "-name", "client.example.test",
                     *extra]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.transcript = [f"$ {' '.join(self.argv)}"]
        TRANSCRIPTS.append(self.transcript)
        self.lines = []
        self.cv = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            with self.cv:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self.cv.notify_all()
        with self.cv:
            self.lines.append(None)
            self.cv.notify_all()

    def reply(self, timeout=10.0):
        got = []
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                while not self.lines:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.cv.wait(left):
                        raise AssertionError("s_client: no reply in time\n" + "\n".join(map(str, self.transcript)))
                line = self.lines.pop(0)
                if line is None:
                    raise ConnectionError("s_client: connection closed")
                self.transcript.append("S: " + line)
                got.append(line)
                if re.match(r"^\d{3}( |$)", line):
                    return int(line[:3]), "\n".join(got)

    def send_line(self, line):
        self.transcript.append("C: " + line)
        self.proc.stdin.write(line.encode() + b"\n")  # -crlf turns LF into CRLF
        self.proc.stdin.flush()

    def cmd(self, line):
        self.send_line(line)
        return self.reply()

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.transcript.append("stderr: " + self.proc.stderr.read().decode("utf-8", "replace")[-2000:])


# ------------------------------------------------------------------------------------------ messages
def split_received(content):
    """(list of leading Received header blocks as bytes, rest). Folded continuation lines included."""
    headers = []
    rest = content
    while rest[:9].lower() == b"received:":
        end = 0
        while True:
            nl = rest.find(b"\r\n", end)
            if nl < 0:
                raise AssertionError(f"unterminated Received header in {content[:400]!r}")
            end = nl + 2
            if rest[end:end + 1] not in (b" ", b"\t"):
                break
        headers.append(rest[:end])
        rest = rest[end:]
    return headers, rest


def tls_mentions(header):
    """TLS versions named in a header, normalised to label form ("TLS1.2"), whether written TLS1.2 or TLSv1.2."""
    text = header.decode("latin-1")
    return sorted({f"TLS1.{m}" for m in re.findall(r"TLS\s?v?1\.([0-3])\b", text)})


# ------------------------------------------------------------------------------------- count checks
def series_key(**labels):
    return tuple(sorted(labels.items()))


def wait_moved(daemon, before, name="mailflow_messages_total", timeout=5.0, at_least=1.0):
    """Metrics once `name` moved by `at_least` in total (counting may trail the client's reply by a moment);
    the last scrape when it did not within `timeout` (the caller's assertion then says what is wrong)."""
    holder = {}

    def moved():
        holder["m"] = daemon.metrics()
        return sum(delta(before, holder["m"], name).values()) >= at_least

    try:
        wait_for(moved, timeout, what=f"{name} to move")
    except AssertionError:
        pass
    return holder["m"]


def assert_counted(daemon, before, connector, direction, tls_version, n=1):
    """mailflow_messages_total moved by exactly n, only in {connector, direction, tls_version}."""
    after = wait_moved(daemon, before, at_least=n)
    moved = delta(before, after, "mailflow_messages_total")
    want = {series_key(connector=connector, direction=direction, tls_version=tls_version): float(n)}
    assert moved == want, (f"mailflow_messages_total should move by exactly {n} under connector={connector} "
                           f"direction={direction} tls_version={tls_version}; moved:\n{fmt_delta(moved)}")
    return after


def assert_not_counted(daemon, before, settle=0.5):
    time.sleep(settle)
    after = daemon.metrics()
    moved = delta(before, after, "mailflow_messages_total")
    assert not moved, f"nothing should have been counted; mailflow_messages_total moved:\n{fmt_delta(moved)}"
    return after


def proxy_v1(src, dst, sport, dport):
    return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(src, dst, sport, dport):
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    body = socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return sig + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body
