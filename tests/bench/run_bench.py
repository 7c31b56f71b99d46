#!/usr/bin/python3
"""mailflowd benchmark harness (`make bench`; `--smoke` is the short ctest version).

In one run, on loopback, it measures the same SMTP conversations through:
  direct    load generator -> smtp-sink
  mailflowd load generator -> mailflowd (its defaults: busy_poll off, one event loop) -> smtp-sink
  nginx     load generator -> nginx mail proxy (smtp, STARTTLS, xclient off, static auth_http) -> smtp-sink
  haproxy   load generator -> HAProxy (mode tcp) -> smtp-sink          (plaintext only: no STARTTLS in TCP mode)
with two load generators for the plaintext runs: the project's (tests/bench/loadgen.cpp) and Postfix's
smtp-source, so that no result depends on one of them.

The gated figure (issue #16) is the proxy's own CPU time per relayed message: utime + stime from
/proc/PID/stat (the whole process, all its threads; nginx: master + worker) over the whole run of the load
generator, divided by every message it completed. It is measured in four CPU placements (see Layout):
  pinned      proxy on CPU 1; load generator, smtp-sink, auth_http on CPU 0
  shared      nothing pinned: the kernel places every process
  server_cpu  smtp-sink joins the proxy on CPU 1; the load generator is alone on CPU 0
  client_cpu  the proxy joins the load generator on CPU 0; smtp-sink is alone on CPU 1
and, on a machine with >= 8 usable CPUs, a fifth, "dedicated cores" (proxy, sink, auth_http and several
load processes each on CPUs of their own), where msgs/s vs direct is gated (>= 0.90). `--force-dedicated`
runs that placement on fewer CPUs as info rows (it proves the code path, its numbers mean little).

Every figure is measured in --rounds interleaved rounds: each round runs every path once, in an order rotated
from round to round, so slow drift of a shared machine hits all paths alike; ratios come from one run.

The table has two parts: gated rows (target, ratio per load generator, PASS/MISS) and info rows (no target).
A missed target does not change the exit status (unless --strict); it is non-zero when the harness itself
broke (a server did not start, a run had SMTP errors or no numbers). docs/performance.md explains every row.
"""
import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from free_port import free_port  # noqa: E402  (tests/tools is not a package)

SINK_USER = "nobody"
DEDICATED_MIN_CPUS = 8  # issue #16 decision 5: ">= 0.90x direct" is gated only with this many usable CPUs
NOISE = 0.05            # run-to-run noise of a ratio on the bench machine: results this close to a target get a '*'
MODES = (("reused", 0), ("single", 1))  # messages per session for the load generator (0: until the run ends)
MODE_LABEL = {"reused": "reused", "single": "1 msg/session"}
GENERATORS = ("loadgen", "smtp-source")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- processes and ports -----------------------------------------------------------------------------------

def wait_port(port, proc, name, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout}s")


def pin(cpu, argv):
    return argv if cpu is None else ["taskset", "-c", str(cpu)] + argv


class Layout:
    """One CPU placement: the CPU of each role (None: the kernel places it) and one CPU per load process."""

    def __init__(self, tag, label, proxy=None, sink=None, auth=None, load=(None,), forced=False, note=""):
        self.tag, self.label, self.forced, self.note = tag, label, forced, note
        self.cpus = {"proxy": proxy, "sink": sink, "auth": auth}
        self.load = list(load)

    def describe(self):
        if all(c is None for c in list(self.cpus.values()) + self.load):
            return f"{self.label}: nothing pinned{self.note}"
        load = ",".join("-" if c is None else str(c) for c in self.load)
        return (f"{self.label}: proxy CPU {self.cpus['proxy']}, smtp-sink CPU {self.cpus['sink']}, auth_http CPU "
                f"{self.cpus['auth']}, load process(es) on CPU {load}{self.note}")

    def used_cpus(self):
        return {c for c in list(self.cpus.values()) + self.load if c is not None}


def make_layouts(cpus, can_pin, force_dedicated):
    """The placements this machine allows: {tag: Layout}, in run order, and the dedicated one (or None)."""
    layouts = {}
    if can_pin and len(cpus) >= 2:
        c0, c1 = cpus[0], cpus[1]
        layouts["pinned"] = Layout("pinned", "pinned", proxy=c1, sink=c0, auth=c0, load=[c0])
        layouts["shared"] = Layout("shared", "CPUs shared")
        layouts["server_cpu"] = Layout("server_cpu", "sink on proxy CPU", proxy=c1, sink=c1, auth=c0, load=[c0])
        layouts["client_cpu"] = Layout("client_cpu", "proxy on load CPU", proxy=c0, sink=c1, auth=c0, load=[c0])
    else:  # one CPU or no taskset: the pinned runs (idle, TLS, latency) run unpinned, the other placements not
        layouts["pinned"] = Layout("pinned", "pinned", note=" (cannot pin: fewer than 2 CPUs or no taskset)")
    dedicated = None
    if can_pin and (len(cpus) >= DEDICATED_MIN_CPUS or force_dedicated):
        # CPU 0 (cpus[0]) is left to the harness and the kernel's housekeeping; with fewer CPUs than roles
        # (--force-dedicated) the roles wrap around the CPUs there are, so the rows are info only.
        def pick(i):
            return cpus[i % len(cpus)]
        forced = len(cpus) < DEDICATED_MIN_CPUS
        processes = min(4, len(cpus) - 4) if not forced else 2
        dedicated = Layout("dedicated", "dedicated cores", proxy=pick(1), sink=pick(2), auth=pick(3),
                           load=[pick(4 + i) for i in range(processes)], forced=forced,
                           note=f" (forced on {len(cpus)} CPUs: info only)" if forced else "")
    return layouts, dedicated


class Server:
    def __init__(self, name, argv, logfile, port, cwd=None):
        self.name = name
        self.port = port
        self.log = open(logfile, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=cwd)
        self.rss_pid = self.proc.pid
        self.cpu_pids = [self.proc.pid]  # the processes whose CPU time is the proxy's (nginx: master + worker)
        wait_port(port, self.proc, name)

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        return sum(cpu_seconds(pid) for pid in self.cpu_pids)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid):
    """utime + stime of a process (/proc/PID/stat: all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# ---- configurations ---------------------------------------------------------------------------------------

def make_cert(workdir):
    cert, key = os.path.join(workdir, "bench-cert.pem"), os.path.join(workdir, "bench-key.pem")
    if not os.path.exists(cert):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "7", "-subj", "/CN=bench.localhost",
                        "-addext", "subjectAltName=DNS:bench.localhost"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


CIPHERS = "DEFAULT:@SECLEVEL=0"


def mailflowd_config(workdir, tag, port, http_port, sink_port, cert, key, connectors=0, out_port=None,
                     busy_poll=None, event_loops=1):
    state = os.path.join(workdir, f"state-{tag}")
    lines = [
        "hostname: bench.localhost",
        f"state_dir: {state}",
        "listeners:",
        "  - name: inbound",
        f'    address: "127.0.0.1:{port}"',
        "    direction: inbound",
        "    tls:",
        f"      certificates: [{{cert: {cert}, key: {key}}}]",
        "      min_version: TLS1.0",
        f'      ciphers: "{CIPHERS}"',
        "    upstream: sink",
    ]
    if out_port is not None:
        lines += [
            "  - name: outbound",
            f'    address: "127.0.0.1:{out_port}"',
            "    direction: outbound",
            "    upstream: sink",
        ]
    lines += [
        "upstreams:",
        "  - name: sink",
        f'    address: "127.0.0.1:{sink_port}"',
        "    tls: none",
        "    xclient: off",
    ]
    if connectors:
        lines.append("connectors:")
        listeners = ["inbound"] + (["outbound"] if out_port is not None else [])
        for listener in listeners:
            for i in range(connectors):
                lines += [
                    f"  - name: {listener[:3]}-{i:04d}",
                    "    type: partner",
                    f"    match: {{listener: {listener}, sender_domains: [d{i}.bench.example]}}",
                ]
    lines += [
        f'http: {{address: "127.0.0.1:{http_port}"}}',
        # The bench opens 10,000 sessions from 127.0.0.1; the defaults (10000 / 50 per IP) would refuse them.
        "limits: {max_sessions: 20000, max_sessions_per_ip: 20000, drain_timeout: 1s}",
        "log: {level: info, format: text}",  # the production default: one line per session
        # busy_poll None: mailflowd's default (off), as users run it; the info rows set it explicitly.
        "performance: {"
        + ("" if busy_poll is None else f"busy_poll: {'true' if busy_poll else 'false'}, ")
        + f"event_loops: {event_loops}}}",
    ]
    path = os.path.join(workdir, f"mailflowd-{tag}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def nginx_mail_config(workdir, tag, port, auth_port, cert, key, big_buffers):
    d = os.path.join(workdir, f"nginx-{tag}")
    os.makedirs(d, exist_ok=True)
    # nginx's mail proxy never sets TCP_NODELAY, and it moves a message in buffer-sized writes: with the default
    # one-page buffers a 10 KiB message leaves in three writes and the last one waits for the sink's delayed ACK
    # (~40 ms per message). For the throughput and latency figures the buffers are made larger than the bench
    # message, so that the anchor measures nginx's CPU cost rather than that stall. The idle-session (RSS) anchor
    # keeps the defaults (smtp_client_buffer is allocated for every session).
    buffers = "  smtp_client_buffer 64k;\n  proxy_buffer 64k;\n" if big_buffers else ""
    conf = f"""
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 19000; }}
mail {{
  server_name bench.localhost;
  auth_http 127.0.0.1:{auth_port}/auth;
  xclient off;
  smtp_auth none;
  smtp_capabilities PIPELINING "SIZE 36700160" 8BITMIME ENHANCEDSTATUSCODES;
{buffers}  ssl_certificate {cert};
  ssl_certificate_key {key};
  ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
  ssl_ciphers {CIPHERS};
  ssl_prefer_server_ciphers on;
  server {{
    listen 127.0.0.1:{port};
    protocol smtp;
    starttls on;
  }}
}}
"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path, d


def nginx_auth_config(workdir, port, sink_port):
    """The tiny static auth_http responder: every session goes to the sink."""
    d = os.path.join(workdir, "nginx-auth")
    os.makedirs(d, exist_ok=True)
    conf = f"""
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location = /auth {{
      add_header Auth-Status OK;
      add_header Auth-Server 127.0.0.1;
      add_header Auth-Port {sink_port};
      return 204;
    }}
  }}
}}
"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path, d


def haproxy_config(workdir, tag, port, sink_port):
    path = os.path.join(workdir, f"haproxy-{tag}.cfg")
    with open(path, "w") as f:
        f.write(f"""global
  maxconn 4000
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend smtp
  bind 127.0.0.1:{port}
  default_backend sink
backend sink
  server sink 127.0.0.1:{sink_port}
""")
    return path



# ---- the harness ------------------------------------------------------------------------------------------

def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rotate(items, n):
    n %= max(1, len(items))
    return items[n:] + items[:n]


class Meter:
    """CPU time of the proxy (all its processes), of auth_http and smtp-sink, and of the load processes, from
    before the load starts until every load process has exited: the whole run, warm-up and tail included."""

    def __init__(self, bench, server):
        self.bench = bench
        self.proxy = server if server is not None and server is not bench.sink else None
        self.wall = time.monotonic()
        self.proxy_cpu = self.proxy.cpu() if self.proxy else 0.0
        self.sink_cpu = bench.sink.cpu()
        self.auth_cpu = bench.auth.cpu() if bench.auth is not None else 0.0
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def stop(self, result):
        wall = time.monotonic() - self.wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = (after.ru_utime + after.ru_stime - self.children.ru_utime - self.children.ru_stime
                + self.bench.sink.cpu() - self.sink_cpu)
        result["wall_s"] = round(wall, 3)
        # The load side (load processes + smtp-sink): near 100 % of its CPU(s) means the load, not the path
        # under test, limited the rate.
        result["load_cpu_percent"] = round(100.0 * load / wall, 1)
        if self.proxy is not None:
            cpu = self.proxy.cpu() - self.proxy_cpu
            result["proxy_cpu_s"] = round(cpu, 3)
            result["proxy_cpu_percent"] = round(100.0 * cpu / wall, 1)
            m, s = result.get("messages_total"), result.get("sessions_opened_total")
            result["proxy_cpu_us_per_msg"] = round(1e6 * cpu / m, 1) if m else None
            result["proxy_cpu_us_per_session"] = round(1e6 * cpu / s, 1) if s else None
            if self.proxy.name.startswith("nginx") and self.bench.auth is not None:
                # nginx asks auth_http once per session; that responder's CPU is reported, not counted as nginx's.
                result["auth_cpu_s"] = round(self.bench.auth.cpu() - self.auth_cpu, 3)
        return result


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.workdir = args.workdir
        os.makedirs(self.workdir, exist_ok=True)
        self.servers = []
        self.pollers = []
        self.sink = None
        self.auth = None
        self.raw = {}       # label -> the result of one run (every round of every figure)
        self.runs = {}      # (placement, kind, mode, generator, path) -> [result per round]
        self.idle = {}      # (path, "plain" | "tls") -> bytes per idle session
        self.latency = {}   # path -> [result of its 1-session latency run, per round]
        self.http = {}
        self.instructions = None
        self.problems = []  # harness problems (errors in runs): make the exit status non-zero
        if self.smoke:
            self.duration, self.warmup, self.latency_duration, self.rounds = 0.25, 0.05, 0.3, 1
            self.idle_sessions, self.connectors, self.callgrind_messages = 200, 20, 3
            self.min_source_messages = 40
        else:
            self.duration, self.warmup, self.latency_duration = args.duration, 0.5, 5.0
            self.rounds = args.rounds
            self.idle_sessions, self.connectors, self.callgrind_messages = args.idle_sessions, args.connectors, 51
            self.min_source_messages = 500
        # The smoke checks the harness, not speed: 4 sessions, whose STARTTLS handshakes complete within its 0.25-s
        # runs on a loaded machine (with 32, every TLS run of the Debug build completed nothing at load 20).
        self.concurrency = 4 if self.smoke else args.concurrency
        self.size = args.size
        self.have_nginx = shutil.which("nginx") is not None and os.path.exists(
            "/usr/lib/nginx/modules/ngx_mail_module.so")
        self.have_haproxy = shutil.which("haproxy") is not None
        self.smtp_source = shutil.which("smtp-source") or (
            "/usr/sbin/smtp-source" if os.access("/usr/sbin/smtp-source", os.X_OK) else None)
        if args.no_smtp_source:
            self.smtp_source = None
        self.cpus = sorted(os.sched_getaffinity(0))
        self.layouts, self.dedicated = make_layouts(self.cpus, shutil.which("taskset") is not None,
                                                    args.force_dedicated)
        self.layout = self.layouts["pinned"]
        self.cert, self.key = make_cert(self.workdir)

    # -- servers
    def start(self, name, argv, port, role="proxy", cwd=None):
        argv = pin(self.layout.cpus[role], argv)
        server = Server(name, argv, os.path.join(self.workdir, f"{name}.log"), port, cwd=cwd)
        self.servers.append(server)
        return server

    def stop(self, server):
        server.stop()
        self.servers.remove(server)

    def stop_servers(self):
        for server in reversed(list(self.servers)):
            self.stop(server)
        self.sink = self.auth = None

    def stop_all(self):
        self.stop_pollers()
        self.stop_servers()

    def start_pollers(self):
        """One SCHED_IDLE busy loop per CPU in use: keeps (virtual) CPUs from halting between events.

        On a VM an idle vCPU halts, and waking it for the next packet costs up to milliseconds: a proxy that
        sleeps between events then measures the hypervisor, while one that happens to stay busy does not. A
        SCHED_IDLE task runs only when nothing else wants the CPU and is preempted at once, so it takes no CPU
        from the bench or from anything else; it only keeps the CPU polling instead of halting.
        """
        if shutil.which("chrt") is None:
            return
        cpus = set()
        for layout in list(self.layouts.values()) + ([self.dedicated] if self.dedicated else []):
            cpus |= layout.used_cpus()
        for cpu in sorted(cpus):
            argv = pin(cpu, ["chrt", "--idle", "0", "/bin/sh", "-c", "while :; do :; done"])
            self.pollers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))

    def stop_pollers(self):
        for p in self.pollers:
            p.kill()
            p.wait()
        self.pollers = []

    def start_sink(self):
        smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.sink_port = free_port()
        argv = [smtp_sink, "-m", "2000"]
        if os.geteuid() == 0:
            argv += ["-u", SINK_USER]
        argv += [f"127.0.0.1:{self.sink_port}", "2000"]
        self.sink = self.start("smtp-sink", argv, self.sink_port, role="sink")

    def start_auth(self):
        self.auth_port = free_port()
        config, d = nginx_auth_config(self.workdir, self.auth_port, self.sink_port)
        self.auth = self.start("nginx-auth", ["nginx", "-p", d, "-c", config], self.auth_port, role="auth")

    def start_mailflowd(self, tag, connectors=0, outbound=False, busy_poll=None, event_loops=1, binary=None):
        port, http_port = free_port(), free_port()
        out_port = free_port() if outbound else None
        config = mailflowd_config(self.workdir, tag, port, http_port, self.sink_port, self.cert, self.key,
                                  connectors, out_port, busy_poll, event_loops)
        server = self.start(f"mailflowd-{tag}", [binary or self.args.mailflowd, "--config", config], port)
        wait_port(http_port, server.proc, server.name)
        server.http_port = http_port
        server.out_port = out_port
        return server

    def start_nginx(self, tag):
        port = free_port()
        config, d = nginx_mail_config(self.workdir, tag, port, self.auth_port, self.cert, self.key,
                                      big_buffers=not tag.startswith("idle"))
        server = self.start(f"nginx-{tag}", ["nginx", "-p", d, "-c", config], port)
        deadline = time.monotonic() + 5
        while not children(server.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = children(server.pid)
        if len(workers) != 1:
            raise RuntimeError(f"nginx-{tag}: expected one worker process, found {workers}")
        server.rss_pid = workers[0]
        server.cpu_pids = [server.pid, workers[0]]
        return server

    def start_haproxy(self, tag):
        port = free_port()
        config = haproxy_config(self.workdir, tag, port, self.sink_port)
        return self.start(f"haproxy-{tag}", ["haproxy", "-db", "-f", config], port)

    def open_placement(self, layout, extras=()):
        """A fresh sink (and auth_http) and one proxy of each kind in `layout`; returns [(path, server)], and
        the extra mailflowd instances ("poll": busy_poll on, "auto": event_loops auto) as [(path, server)]."""
        self.layout = layout
        self.start_sink()
        if self.have_nginx:
            self.start_auth()
        paths = [("direct", self.sink), ("mailflowd", self.start_mailflowd(layout.tag))]
        if self.have_nginx:
            paths.append(("nginx", self.start_nginx(layout.tag)))
        if self.have_haproxy:
            paths.append(("haproxy", self.start_haproxy(layout.tag)))
        more = []
        if "poll" in extras:
            more.append(("mailflowd_poll", self.start_mailflowd(f"{layout.tag}-poll", busy_poll=True)))
        if "auto" in extras:
            more.append(("mailflowd_auto", self.start_mailflowd(f"{layout.tag}-auto", event_loops="auto")))
        if "alt" in extras:
            more.append(("mailflowd_alt", self.start_mailflowd(f"{layout.tag}-alt", binary=self.args.mailflowd_alt)))
        return paths, more

    # -- load generators
    def run_load(self, argvs, server, parse):
        """Runs one load process per load CPU of the layout (argvs[i] on load CPU i) and meters the run."""
        meter = Meter(self, server)
        procs = [subprocess.Popen(pin(cpu, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
                 for cpu, argv in zip(self.layout.load, argvs)]
        outs = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=180)
                outs.append((p.returncode, out, err))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return meter.stop(parse(outs))

    def loadgen(self, server, label, tls="none", messages=0, concurrency=None, interval_ms=0, duration=None,
                sender_domains=1):
        argv = [self.args.loadgen, "--connect", f"127.0.0.1:{server.port}", "--tls", tls,
                "--messages", str(messages), "--concurrency", str(concurrency or self.concurrency),
                "--size", str(self.size), "--duration", str(duration or self.duration),
                "--warmup", str(self.warmup), "--interval-ms", str(interval_ms),
                "--sender-domains", str(sender_domains)]

        def parse(outs):
            parts = []
            for rc, out, err in outs:
                if rc != 0:
                    raise RuntimeError(f"loadgen {label} failed ({rc}): {err.strip()}")
                parts.append(json.loads(out))
            merged = dict(parts[0])
            for key in ("messages", "sessions", "errors", "msgs_per_s", "sessions_per_s", "messages_total",
                        "sessions_opened_total"):
                merged[key] = sum(p[key] for p in parts)
            for key in ("p50_us", "p99_us", "max_us"):
                merged[key] = max(p[key] for p in parts)
            merged["first_error"] = next((p["first_error"] for p in parts if p["first_error"]), "")
            merged["generator"], merged["processes"] = "loadgen", len(parts)
            return merged

        result = self.run_load([argv] * len(self.layout.load), server, parse)
        self.check(label, result)
        return result

    def source(self, server, label, messages, count):
        """Postfix's smtp-source: `count` messages in all (split over the load processes), --concurrency
        sessions per process; -d (reused) keeps sending over each session, without it one message per session.
        It has no warm-up and no time limit: the rate is messages / wall time of the whole run."""
        per_process = max(1, count // len(self.layout.load))
        argv = [self.smtp_source, "-s", str(self.concurrency), "-m", str(per_process), "-l", str(self.size),
                "-M", "bench.localhost", "-f", "bench@d0.bench.example", "-t", "sink@sink.example"]
        if messages == 0:
            argv.append("-d")
        argv.append(f"127.0.0.1:{server.port}")
        started = time.monotonic()

        def parse(outs):
            wall = time.monotonic() - started
            failed = [(rc, err.strip()) for rc, out, err in outs if rc != 0]
            total = per_process * len(outs)
            sessions = total if messages else min(self.concurrency, per_process) * len(outs)
            return {"generator": "smtp-source", "processes": len(outs), "messages": total, "sessions": sessions,
                    "messages_total": total, "sessions_opened_total": sessions, "errors": len(failed),
                    "first_error": failed[0][1] if failed else "", "msgs_per_s": round(total / wall, 1),
                    "sessions_per_s": round(sessions / wall, 1), "concurrency": self.concurrency,
                    "messages_per_session": messages, "size": self.size}

        result = self.run_load([argv] * len(self.layout.load), server, parse)
        self.check(label, result)
        return result

    def check(self, label, result):
        self.raw[label] = result
        if result["errors"]:
            self.problems.append(f"{label}: {result['errors']} errors, first: {result['first_error']}")
        if result["messages"] == 0:
            self.problems.append(f"{label}: no message completed")
        extra = ""
        if "proxy_cpu_s" in result:
            extra = (f" proxy CPU {result['proxy_cpu_percent']}% {result['proxy_cpu_us_per_msg']}us/msg"
                     f" {result['proxy_cpu_us_per_session']}us/session")
        latency = f" p50 {result['p50_us']}us p99 {result['p99_us']}us" if "p99_us" in result else ""
        log(f"  {label:44s} {result['msgs_per_s']:10.1f} msgs/s {result['sessions_per_s']:9.1f} sessions/s"
            f"{latency} errors {result['errors']} load CPU {result['load_cpu_percent']}%{extra}")

    def record(self, key, result):
        self.runs.setdefault(key, []).append(result)

    def plaintext_rounds(self, layout, paths, extras):
        """Plaintext, reused and 1 msg/session, every path, both load generators, in interleaved rounds."""
        for rnd in range(self.rounds):
            order = rotate(paths, rnd)
            for mode, messages in MODES:
                for name, server in order + (extras if mode == "reused" else []):
                    self.record((layout.tag, "plain", mode, "loadgen", name),
                                self.loadgen(server, f"{layout.tag}.plain_{mode}.loadgen.{name}.r{rnd}",
                                             messages=messages))
                if self.smtp_source is None:
                    continue
                for name, server in order:
                    # As many messages as the path relayed in the load generator's run of this round: a run of
                    # about the same length.
                    rate = self.runs[(layout.tag, "plain", mode, "loadgen", name)][-1]["msgs_per_s"]
                    count = max(self.min_source_messages, int(rate * self.duration))
                    self.record((layout.tag, "plain", mode, "smtp-source", name),
                                self.source(server, f"{layout.tag}.plain_{mode}.smtp-source.{name}.r{rnd}",
                                            messages, count))

    def tls_rounds(self, layout, paths):
        tls_paths = [(n, s) for n, s in paths if n in ("mailflowd", "nginx")]  # sink/HAProxy: no STARTTLS
        for rnd in range(self.rounds):
            for version in ("1.2", "1.3"):
                for mode, messages in MODES:
                    for name, server in rotate(tls_paths, rnd):
                        self.record((layout.tag, f"tls{version}", mode, "loadgen", name),
                                    self.loadgen(server, f"{layout.tag}.tls{version}_{mode}.{name}.r{rnd}",
                                                 tls=version, messages=messages))

    def agg(self, tag, kind, mode, gen, name):
        """One figure over the rounds: mean rate; CPU per message/session = CPU time / count over all rounds.
        A round in which no message completed (a stalled run, listed among the harness problems) is left out: its
        zero rate would pull the mean down as if the path were slower."""
        runs = [r for r in self.runs.get((tag, kind, mode, gen, name), []) if r["messages"]]
        if not runs:
            return None
        out = {"rounds": len(runs), "msgs_per_s": mean(r["msgs_per_s"] for r in runs),
               "sessions_per_s": mean(r["sessions_per_s"] for r in runs),
               "load_cpu_percent": mean(r["load_cpu_percent"] for r in runs)}
        if all("proxy_cpu_s" in r for r in runs):
            cpu = sum(r["proxy_cpu_s"] for r in runs)
            msgs = sum(r["messages_total"] for r in runs)
            sessions = sum(r["sessions_opened_total"] for r in runs)
            out["proxy_cpu_us_per_msg"] = 1e6 * cpu / msgs if msgs else None
            out["proxy_cpu_us_per_session"] = 1e6 * cpu / sessions if sessions else None
            out["proxy_cpu_percent"] = 100.0 * cpu / sum(r["wall_s"] for r in runs)
        return out

    def latency_rounds(self, paths):
        """p99 latency of one session at low load (one message every 2 ms), every path once per round, in an
        order rotated from round to round, as the throughput figures are: a p99 of one 5-s run (~2,300 samples,
        its 23 slowest decide it) moves by more than the gaps it is compared with."""
        for rnd in range(self.rounds):
            for name, server in rotate(paths, rnd):
                self.latency.setdefault(name, []).append(
                    self.loadgen(server, f"pinned.latency.{name}.r{rnd}", messages=0, concurrency=1, interval_ms=2,
                                 duration=self.latency_duration))

    def added_latency(self, name, field="p99_us"):
        """What `name` adds to direct's latency: per round (path - direct of the same round), and their median."""
        ours, direct = self.latency.get(name), self.latency.get("direct")
        if not ours or not direct:
            return None, []
        # A round in which either run completed no message (stalled) has no latency: its 0 read as 236 us faster
        # than direct in a run at 7102fbc.
        per_round = [a[field] - d[field] for a, d in zip(ours, direct) if a["messages"] and d["messages"]]
        if not per_round:
            return None, []
        return median(per_round), per_round

    # -- other measurements
    def idle_rss(self, server, label, tls):
        """RSS growth of the server per idle session (banner + EHLO, or + STARTTLS + EHLO) over N sessions."""
        # Warm up allocator and TLS context with a few complete sessions first.
        self.loadgen(server, f"{label}.warmup", tls=tls, messages=1, concurrency=2, duration=0.3)
        time.sleep(0.3)
        before = rss_kib(server.rss_pid)
        argv = [self.args.loadgen, "--connect", f"127.0.0.1:{server.port}", "--mode", "idle", "--tls", tls,
                "--idle", str(self.idle_sessions)]
        proc = subprocess.Popen(pin(self.layout.load[0], argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            line = proc.stdout.readline().split(maxsplit=3)
            if not line or line[0] != "READY":
                raise RuntimeError(f"idle loadgen for {label} said {line!r}")
            opened, failed = int(line[1]), int(line[2])
            time.sleep(0.5)
            after = rss_kib(server.rss_pid)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
        per_session = (after - before) * 1024.0 / max(1, opened)
        self.raw[label] = {"sessions": opened, "failed": failed, "rss_before_kib": before, "rss_after_kib": after,
                           "bytes_per_session": per_session}
        if failed or opened != self.idle_sessions:
            self.problems.append(f"{label}: {failed} of {self.idle_sessions} idle sessions failed "
                                 f"({' '.join(line[3:])})")
        log(f"  {label:44s} {opened} sessions, RSS {before} -> {after} KiB = {per_session / 1024:.2f} KiB/session")
        return per_session

    def http_ms(self, port, path, label, repeat=5):
        times = []
        size = 0
        for _ in range(repeat):
            out = subprocess.run(pin(self.layout.load[0], ["curl", "-s", "-o", "/dev/null", "-w",
                                                           "%{http_code} %{size_download} %{time_total}",
                                                           f"http://127.0.0.1:{port}{path}"]),
                                 capture_output=True, text=True, timeout=30)
            code, size, seconds = out.stdout.split()
            if code != "200":
                raise RuntimeError(f"GET {path} answered {code}")
            times.append(float(seconds) * 1000.0)
            size = int(size)
        self.raw[label] = {"ms": times, "median_ms": statistics.median(times), "max_ms": max(times), "bytes": size}
        log(f"  {label:44s} median {statistics.median(times):.2f} ms, max {max(times):.2f} ms, {size} bytes")
        return statistics.median(times)

    def callgrind(self):
        if shutil.which("valgrind") is None:
            return None
        totals = {}
        for n in (1, self.callgrind_messages):
            out_file = os.path.join(self.workdir, f"callgrind.out.{n}")
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                            self.args.proto_driver, str(n)], check=True, capture_output=True, timeout=300)
            with open(out_file) as f:
                for line in f:
                    if line.startswith("summary:") or line.startswith("totals:"):
                        totals[n] = int(line.split()[1])
        per_message = (totals[self.callgrind_messages] - totals[1]) / (self.callgrind_messages - 1)
        self.raw["callgrind"] = {"totals": totals, "instructions_per_message": per_message,
                                 "message_size": 10240}
        log(f"  {'callgrind proto engines':44s} {per_message:,.0f} instructions per 10 KiB message")
        return per_message

    # -- the run
    def run(self):
        log(f"bench: {len(self.cpus)} usable CPUs; {self.rounds} round(s) of {self.duration}s runs; "
            f"smtp-source: {self.smtp_source or 'not found (loadgen only)'}; workdir {self.workdir}")
        for layout in list(self.layouts.values()) + ([self.dedicated] if self.dedicated else []):
            log(f"  placement {layout.describe()}")
        if not self.dedicated:
            log(f"  placement dedicated cores: not run ({len(self.cpus)} usable CPUs, needs "
                f"{DEDICATED_MIN_CPUS}; --force-dedicated runs it as info)")
        if not self.args.no_pollers and not self.smoke:
            self.start_pollers()
        pinned = self.layouts["pinned"]
        if self.args.only == "latency":
            # Only the latency rows (and, with --mailflowd-alt, a second build beside the first): ~30 s a round.
            log("pinned: latency only")
            extras = ("poll",) + (("alt",) if self.args.mailflowd_alt else ())
            paths, extras = self.open_placement(pinned, extras=extras)
            self.latency_rounds(paths + extras)
            self.stop_servers()
            return self.figures()

        # 1. Idle sessions: fresh processes, so that memory freed by earlier runs cannot hide the growth.
        log("idle sessions (RSS), pinned")
        self.layout = pinned
        self.start_sink()
        if self.have_nginx:
            self.start_auth()
        for tls, tag in (("none", "plain"), ("1.3", "tls")):
            m = self.start_mailflowd(f"idle-{tag}")
            self.idle[("mailflowd", tag)] = self.idle_rss(m, f"mailflowd.idle_{tag}", tls)
            self.stop(m)
            if self.have_nginx:
                n = self.start_nginx(f"idle-{tag}")
                self.idle[("nginx", tag)] = self.idle_rss(n, f"nginx.idle_{tag}", tls)
                self.stop(n)
        self.stop_servers()

        # 2. Pinned: plaintext (both generators), STARTTLS, latency; busy_poll on as an extra path (info).
        log("pinned: plaintext, STARTTLS, latency")
        paths, extras = self.open_placement(pinned, extras=("poll",))
        self.plaintext_rounds(pinned, paths, extras)
        self.tls_rounds(pinned, paths)
        self.latency_rounds(paths + extras)
        self.stop_servers()

        # 3. The other placements, plaintext only; with the CPUs shared mailflowd runs once more with a loop
        #    per CPU (event_loops auto) as info.
        for tag in ("shared", "server_cpu", "client_cpu"):
            layout = self.layouts.get(tag)
            if layout is None:
                continue
            log(f"placement {layout.label}: plaintext")
            paths, extras = self.open_placement(layout, extras=("auto",) if tag == "shared" else ())
            self.plaintext_rounds(layout, paths, extras)
            self.stop_servers()

        # 4. Dedicated cores (>= 8 CPUs, or forced as info).
        if self.dedicated:
            log(f"placement {self.dedicated.describe()}: plaintext")
            paths, _ = self.open_placement(self.dedicated)
            self.plaintext_rounds(self.dedicated, paths, [])
            self.stop_servers()

        # 5. HTTP: /metrics and the report with many connectors, after traffic through some of them.
        log(f"http with {self.connectors} connectors per direction")
        self.layout = pinned
        self.start_sink()
        big = self.start_mailflowd("connectors", connectors=self.connectors, outbound=True)
        domains = min(100, self.connectors)
        self.loadgen(big, "connectors.traffic_inbound", messages=5, sender_domains=domains, duration=0.5)
        big.port, inbound_port = big.out_port, big.port
        self.loadgen(big, "connectors.traffic_outbound", messages=5, sender_domains=domains, duration=0.5)
        big.port = inbound_port
        self.http["metrics"] = self.http_ms(big.http_port, "/metrics", "metrics_scrape")
        self.http["report"] = self.http_ms(big.http_port, "/api/v1/report?days=7", "report_7d")
        self.stop_servers()

        # 6. callgrind: instructions per message in the proto engines (stable across machines and noise).
        log("callgrind")
        self.instructions = self.callgrind()
        return self.figures()

    # -- the figures
    def figures(self):
        figures = []
        placed = list(self.layouts.values())
        labels = {l.tag: l.label for l in list(self.layouts.values()) + [self.dedicated] if l is not None}

        def value(tag, kind, mode, field):
            def get(gen, name):
                a = self.agg(tag, kind, mode, gen, name)
                return None if a is None else a.get(field)
            return get

        def row(fid, figure, unit, get, anchor_name, op=None, target=None, gated=False, generators=GENERATORS,
                skipped=None):
            """One row: mailflowd and the anchor per load generator (get(generator, path)), their ratio, and for a
            gated row PASS only if every load generator's ratio meets the target."""
            f = {"id": fid, "figure": figure, "unit": unit, "anchor_name": anchor_name, "gated": gated,
                 "target": None if target is None else f"{op} {target:.2f}", "skipped": skipped, "by_generator": {}}
            verdicts = []
            for gen in generators:
                ours = get(gen, "mailflowd")
                anchor = get(gen, anchor_name) if anchor_name else None
                if ours is None and anchor is None:
                    continue
                ratio = ours / anchor if ours is not None and anchor else None
                ok = None
                if target is not None and ours is not None and anchor is not None:
                    # compared as values, so that a negative anchor (latency below direct's) stays meaningful
                    ok = ours <= anchor * target if op == "<=" else ours >= anchor * target
                    verdicts.append((gen, ok, ratio))
                f["by_generator"][gen] = {"mailflowd": ours, "anchor": anchor, "ratio": ratio, "pass": ok}
            first = f["by_generator"].get(generators[0], {})
            f["mailflowd"], f["anchor"], f["ratio"] = first.get("mailflowd"), first.get("anchor"), first.get("ratio")
            f["pass"] = None if not verdicts else all(ok for _, ok, _ in verdicts)
            f["missed_by"] = [gen for gen, ok, _ in verdicts if not ok]
            f["near_target"] = any(r is not None and abs(r / target - 1) < NOISE for _, _, r in verdicts)
            figures.append(f)

        def limit(fid, figure, unit, ours, bound):
            figures.append({"id": fid, "figure": figure, "unit": unit, "anchor_name": None, "gated": True,
                            "target": f"<= {bound:g} {unit}", "skipped": None, "mailflowd": ours, "anchor": None,
                            "ratio": None, "by_generator": {},
                            "pass": None if ours is None else ours <= bound, "missed_by": [],
                            "near_target": ours is not None and abs(ours / bound - 1) < NOISE})

        # -- gated (issue #16)
        for layout in placed:
            for mode, _ in MODES:
                row(f"cpu_per_msg_{layout.tag}_{mode}_vs_nginx",
                    f"proxy CPU/msg, plaintext, {MODE_LABEL[mode]}, {layout.label}", "us",
                    value(layout.tag, "plain", mode, "proxy_cpu_us_per_msg"), "nginx", "<=", 1.00, gated=True)
        for missing in ("shared", "server_cpu", "client_cpu"):
            if missing not in self.layouts:
                for mode, _ in MODES:
                    row(f"cpu_per_msg_{missing}_{mode}_vs_nginx", f"proxy CPU/msg, plaintext, {MODE_LABEL[mode]}, "
                        f"{missing}", "us", lambda g, n: None, "nginx", "<=", 1.00, gated=True,
                        skipped="cannot pin here")
        for version in ("1.2", "1.3"):
            row(f"cpu_per_tls{version.replace('.', '')}_session_vs_nginx",
                f"proxy CPU/new STARTTLS TLS{version} session (1 msg), pinned", "us",
                value("pinned", f"tls{version}", "single", "proxy_cpu_us_per_session"), "nginx", "<=", 1.00,
                gated=True, generators=("loadgen",))
        shared = "shared" if "shared" in self.layouts else "pinned"
        for mode, _ in MODES:
            row(f"plain_{mode}_shared_vs_nginx", f"plaintext msgs/s, {MODE_LABEL[mode]}, {labels[shared]}", "msgs/s",
                value(shared, "plain", mode, "msgs_per_s"), "nginx", ">=", 1.05, gated=True)
        def added(gen, name):
            return self.added_latency(name)[0]

        row("p99_added_latency_vs_nginx", "p99 added latency/msg, 1 session, low load, pinned", "us", added,
            "nginx", "<=", 1.00, gated=True, generators=("loadgen",))
        for tag, label in (("plain", "plaintext"), ("tls", "after STARTTLS (TLS1.3)")):
            row(f"rss_idle_{tag}_vs_nginx", f"RSS per idle session, {label}", "KiB",
                lambda g, n, tag=tag: None if (n, tag) not in self.idle else self.idle[(n, tag)] / 1024, "nginx",
                "<=", 1.00, gated=True, generators=("loadgen",))
        dedicated_gated = self.dedicated is not None and not self.dedicated.forced
        for mode, _ in MODES:
            if dedicated_gated or self.dedicated is None:
                row(f"plain_{mode}_dedicated_vs_direct",
                    f"plaintext msgs/s, {MODE_LABEL[mode]}, dedicated cores, 1 event loop", "msgs/s",
                    value("dedicated", "plain", mode, "msgs_per_s"), "direct", ">=", 0.90, gated=True,
                    skipped=None if self.dedicated else f"{len(self.cpus)} CPUs < {DEDICATED_MIN_CPUS}")
        limit("metrics_scrape", f"/metrics scrape, {self.connectors} connectors x 2 directions", "ms",
              self.http.get("metrics"), 20)
        limit("report_7d", f"/api/v1/report?days=7, {self.connectors} connectors x 2 directions", "ms",
              self.http.get("report"), 50)

        # -- info
        if self.dedicated is not None and self.dedicated.forced:
            for mode, _ in MODES:
                row(f"plain_{mode}_dedicated_vs_direct",
                    f"plaintext msgs/s, {MODE_LABEL[mode]}, dedicated cores FORCED on {len(self.cpus)} CPUs",
                    "msgs/s", value("dedicated", "plain", mode, "msgs_per_s"), "direct")
        if self.dedicated is not None:
            forced = f" FORCED on {len(self.cpus)} CPUs" if self.dedicated.forced else ""
            for mode, _ in MODES:
                row(f"cpu_per_msg_dedicated_{mode}_vs_nginx",
                    f"proxy CPU/msg, plaintext, {MODE_LABEL[mode]}, dedicated cores{forced}", "us",
                    value("dedicated", "plain", mode, "proxy_cpu_us_per_msg"), "nginx")
        for layout in placed:
            for mode, _ in MODES:
                below = " (gated only with dedicated cores)" if layout.tag == "pinned" else ""
                row(f"plain_{mode}_{layout.tag}_vs_direct",
                    f"plaintext msgs/s, {MODE_LABEL[mode]}, {layout.label}{below}", "msgs/s",
                    value(layout.tag, "plain", mode, "msgs_per_s"), "direct")
        for layout in placed:
            if layout.tag == shared:
                continue
            for mode, _ in MODES:
                row(f"plain_{mode}_{layout.tag}_vs_nginx", f"plaintext msgs/s, {MODE_LABEL[mode]}, {layout.label}",
                    "msgs/s", value(layout.tag, "plain", mode, "msgs_per_s"), "nginx")
        if self.have_haproxy:
            for layout in placed:
                for mode, _ in MODES:
                    row(f"cpu_per_msg_{layout.tag}_{mode}_vs_haproxy",
                        f"proxy CPU/msg, plaintext, {MODE_LABEL[mode]}, {layout.label}", "us",
                        value(layout.tag, "plain", mode, "proxy_cpu_us_per_msg"), "haproxy")
        for version in ("1.2", "1.3"):
            row(f"tls{version.replace('.', '')}_reused_vs_nginx", f"STARTTLS TLS{version} msgs/s, reused, pinned",
                "msgs/s", value("pinned", f"tls{version}", "reused", "msgs_per_s"), "nginx",
                generators=("loadgen",))
            row(f"tls{version.replace('.', '')}_new_sessions_vs_nginx",
                f"new STARTTLS TLS{version} sessions/s (1 msg), pinned", "sessions/s",
                value("pinned", f"tls{version}", "single", "sessions_per_s"), "nginx", generators=("loadgen",))

        def poll(field):
            def get(gen, name):
                a = self.agg("pinned", "plain", "reused", gen, "mailflowd_poll" if name == "mailflowd" else name)
                return None if a is None else a.get(field)
            return get

        row("cpu_per_msg_pinned_reused_poll_vs_nginx", "proxy CPU/msg, plaintext, reused, pinned, busy_poll on",
            "us", poll("proxy_cpu_us_per_msg"), "nginx", generators=("loadgen",))
        row("plain_reused_pinned_poll_vs_direct", "plaintext msgs/s, reused, pinned, busy_poll on", "msgs/s",
            poll("msgs_per_s"), "direct", generators=("loadgen",))
        row("p99_added_latency_poll_vs_nginx", "p99 added latency/msg, 1 session, low load, busy_poll on", "us",
            lambda g, n: added(g, "mailflowd_poll" if n == "mailflowd" else n), "nginx", generators=("loadgen",))
        if self.have_haproxy:
            row("p99_added_latency_vs_haproxy", "p99 added latency/msg, 1 session, low load", "us", added,
                "haproxy", generators=("loadgen",))
        if self.args.mailflowd_alt:
            row("p99_added_latency_alt_vs_nginx", "p99 added latency/msg, 1 session, low load, --mailflowd-alt",
                "us", lambda g, n: added(g, "mailflowd_alt" if n == "mailflowd" else n), "nginx",
                generators=("loadgen",))
        if "shared" in self.layouts:
            def auto(field):
                def get(gen, name):
                    a = self.agg("shared", "plain", "reused", gen, "mailflowd_auto" if name == "mailflowd" else name)
                    return None if a is None else a.get(field)
                return get
            row("cpu_per_msg_shared_reused_auto_vs_nginx", "proxy CPU/msg, plaintext, reused, CPUs shared, "
                "event_loops auto", "us", auto("proxy_cpu_us_per_msg"), "nginx", generators=("loadgen",))
            row("plain_reused_shared_auto_vs_nginx", "plaintext msgs/s, reused, CPUs shared, event_loops auto",
                "msgs/s", auto("msgs_per_s"), "nginx", generators=("loadgen",))
        row("proto_instructions_per_message", "proto engines, instr/10 KiB message (track)", "instr",
            lambda g, n: self.instructions if n == "mailflowd" else None, None, generators=("loadgen",))
        return figures


# ---- output -----------------------------------------------------------------------------------------------

def fmt_value(v, unit):
    if v is None:
        return "n/a"
    if unit in ("KiB", "ms"):
        return f"{v:.2f} {unit}"
    if unit == "us":
        return f"{v:.1f} us" if abs(v) < 100 else f"{v:.0f} us"
    return f"{v:,.0f}"


def result_of(f):
    if not f["gated"]:
        return "info"
    if f["skipped"]:
        return f"not run ({f['skipped']})"
    if f["pass"] is None:
        return "n/a"
    text = "PASS" if f["pass"] else "MISS"
    if f["missed_by"] and len(f["by_generator"]) > 1 and len(f["missed_by"]) < len(f["by_generator"]):
        text += f" ({', '.join(f['missed_by'])})"
    return text + ("*" if f["near_target"] else "")


def table(figures, gated):
    header = ("figure", "target", "mailflowd", "anchor", "ratio", "smtp-source: mailflowd", "anchor", "ratio",
              "result")
    rows = []
    for f in figures:
        if f["gated"] != gated:
            continue
        cells = [f["figure"], f["target"] or "-"]
        for gen in GENERATORS:
            g = f["by_generator"].get(gen)
            if gen == "loadgen" and g is None:
                g = {"mailflowd": f["mailflowd"], "anchor": f["anchor"], "ratio": f["ratio"]}
            if g is None:
                cells += ["", "", ""]
                continue
            anchor = "-" if f["anchor_name"] is None else f"{fmt_value(g['anchor'], f['unit'])} ({f['anchor_name']})"
            cells += [fmt_value(g["mailflowd"], f["unit"]), anchor, "-" if g["ratio"] is None else f"{g['ratio']:.2f}"]
        cells.append(result_of(f))
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="short runs; checks that every figure is sane")
    p.add_argument("--build", default=os.path.join(root, "build/release"),
                   help="build tree of the binaries below (default: build/release, what `make bench` builds)")
    p.add_argument("--mailflowd", default=None, help="default: BUILD/daemon/mailflowd")
    p.add_argument("--loadgen", default=None, help="default: BUILD/tests/bench/mailflow_loadgen")
    p.add_argument("--proto-driver", default=None, help="default: BUILD/tests/bench/mailflow_proto_driver")
    p.add_argument("--workdir", default=None, help="configs, logs, certificates (default: a temporary directory)")
    p.add_argument("--json", default=os.path.join(root, "bench/results.json"))
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent sessions per load process")
    p.add_argument("--size", type=int, default=10240, help="message size in octets")
    p.add_argument("--idle-sessions", type=int, default=10000)
    p.add_argument("--connectors", type=int, default=1000, help="connectors per direction for the HTTP figures")
    p.add_argument("--no-pollers", action="store_true", help="let idle CPUs halt (see Bench.start_pollers)")
    p.add_argument("--no-smtp-source", action="store_true", help="only the project's load generator")
    p.add_argument("--force-dedicated", action="store_true",
                   help=f"run the dedicated-cores placement with fewer than {DEDICATED_MIN_CPUS} CPUs (info rows)")
    p.add_argument("--strict", action="store_true", help="exit status 3 when a gated target is missed")
    p.add_argument("--only", choices=("latency",), default=None,
                   help="run only these rows: latency (the p99 added latency rows, --rounds interleaved rounds of "
                        "every path, ~30 s a round; the machine need not be idle for long)")
    p.add_argument("--mailflowd-alt", default=None,
                   help="a second mailflowd binary, measured beside the first as path mailflowd_alt (with --only "
                        "latency: an interleaved A/B of two builds)")
    args = p.parse_args()
    args.mailflowd = args.mailflowd or os.path.join(args.build, "daemon/mailflowd")
    args.loadgen = args.loadgen or os.path.join(args.build, "tests/bench/mailflow_loadgen")
    args.proto_driver = args.proto_driver or os.path.join(args.build, "tests/bench/mailflow_proto_driver")
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds >= 1 and --duration > 0")

    # The machine may be shared (builds, other tests): every process of the bench, proxies and load generator
    # alike, runs at a higher priority than that background work (inherited by the children).
    # The smoke test runs among other tests: it keeps normal priority and no pollers (its numbers mean nothing).
    if not args.smoke:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -15)
        except OSError:
            log("bench: cannot raise priority (not root): background load will show in the figures")
    load1 = os.getloadavg()[0]
    if load1 > 1.0:
        log(f"bench: WARNING: load average {load1:.1f} before the run: figures will be noisy")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.idle_sessions + 500 > hard and not args.smoke:
        args.idle_sessions = max(100, hard - 500)
        log(f"bench: RLIMIT_NOFILE hard limit {hard}: idle sessions lowered to {args.idle_sessions}")

    cleanup = args.workdir is None
    if cleanup:
        args.workdir = tempfile.mkdtemp(prefix="mailflow-bench-")
    for exe in [args.mailflowd, args.loadgen, args.proto_driver] + ([args.mailflowd_alt] if args.mailflowd_alt else []):
        if not os.access(exe, os.X_OK):
            log(f"bench: {exe} is missing: build first (make bench builds the release preset; --build DIR)")
            return 2
    bench = Bench(args)
    started = time.monotonic()
    try:
        figures = bench.run()
    except Exception as e:  # a broken harness must fail loudly
        log(f"bench: harness error: {e!r}")
        bench.stop_all()
        return 1
    finally:
        bench.stop_all()
    elapsed = time.monotonic() - started

    placements = [l.describe() for l in bench.layouts.values()] + (
        [bench.dedicated.describe()] if bench.dedicated else
        [f"dedicated cores: not run ({len(bench.cpus)} usable CPUs < {DEDICATED_MIN_CPUS})"])
    print(f"mailflowd {args.mailflowd}; {len(bench.cpus)} usable CPUs; {bench.rounds} interleaved round(s) of "
          f"{bench.duration:g} s per figure; load average {load1:.2f} before the run")
    print("placements:\n  " + "\n  ".join(placements))
    if args.only:
        figures = [f for f in figures if args.only in f["id"]]
    print("\nGATED (issue #16): PASS only if every load generator's ratio meets the target")
    print(table(figures, True))
    print("\nINFO (no target)")
    print(table(figures, False))
    if bench.latency:
        print("\nlatency, 1 session, one message every 2 ms, per round (p50 / p99 us; added p99 = p99 - direct's "
              "p99 of the same round); the rows above take the median of the added p99s")
        for name, runs in bench.latency.items():
            rounds = "  ".join(f"{r['p50_us']}/{r['p99_us']}" for r in runs)
            med, added = bench.added_latency(name)
            spread = "" if name == "direct" or not added else (f"  added p99 {' '.join(str(a) for a in added)}"
                                                                f" (median {med:.0f}, {min(added)}..{max(added)})")
            print(f"  {name:16s} {rounds}{spread}")
    print(f"\n* within {NOISE:.0%} of the target: inside the run-to-run noise of this machine")
    fails = [f["id"] for f in figures if f["gated"] and f["pass"] is False]
    aggregates = {"|".join(k): bench.agg(*k) for k in bench.runs}
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mailflowd": args.mailflowd, "smoke": args.smoke, "elapsed_s": round(elapsed, 1),
        "usable_cpus": len(bench.cpus), "placements": placements,
        "dedicated": None if bench.dedicated is None else ("forced (info)" if bench.dedicated.forced else "gated"),
        "smtp_source": bench.smtp_source, "pollers": not args.no_pollers and not args.smoke,
        "load_average_before": round(load1, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "settings": {"duration_s": bench.duration, "warmup_s": bench.warmup, "rounds": bench.rounds,
                     "concurrency": bench.concurrency, "message_size": bench.size,
                     "idle_sessions": bench.idle_sessions, "connectors_per_direction": bench.connectors},
        "figures": figures, "misses": fails, "problems": bench.problems,
        "aggregates": aggregates,  # "placement|kind|mode|generator|path" -> the figure over all rounds
        "raw": bench.raw,          # every single run (label ends in .rN: round N)
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{len(figures)} figures in {elapsed:.0f}s; written to {args.json}")
    if fails:
        print(f"MISS: {len(fails)} gated target(s) missed: " + "; ".join(fails))
    if bench.problems:
        print("harness problems:\n  " + "\n  ".join(bench.problems))
    if cleanup:
        shutil.rmtree(args.workdir, ignore_errors=True)

    if args.smoke:
        # Sane numbers: every row that ran has mailflowd's figure, positive (latency differences may be <= 0).
        insane = [f["id"] for f in figures if not f["skipped"] and f["id"] != "proto_instructions_per_message"
                  and (f["mailflowd"] is None or (f["unit"] != "us" and not f["mailflowd"] > 0))]
        if insane or bench.problems:
            print("smoke: FAILED: " + ", ".join(insane + bench.problems))
            return 1
        print("smoke: the harness works")
        return 0
    if bench.problems:
        return 1
    return 3 if args.strict and fails else 0


if __name__ == "__main__":
    sys.exit(main())
