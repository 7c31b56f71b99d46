#!/usr/bin/python3
"""mailflowd benchmark harness (`make bench`; `--smoke` is the short ctest version).

In one run, on loopback, it measures the same SMTP conversations through:
  direct    load generator -> smtp-sink
  mailflowd load generator -> mailflowd -> smtp-sink
  nginx     load generator -> nginx mail proxy (smtp, STARTTLS, xclient off, static auth_http) -> smtp-sink
  haproxy   load generator -> HAProxy (mode tcp) -> smtp-sink          (plaintext only: no STARTTLS in TCP mode)
and prints one table (figure, mailflowd, anchor, ratio, target, pass/fail), also written as JSON.

CPU placement (2 cores): the proxy under test (mailflowd, nginx or HAProxy) is pinned to CPU 1; the load
generator, smtp-sink, the auth_http responder and curl share CPU 0. The direct path runs with the same
placement (CPU 1 idle), so every path gets the same environment.

A missed target is shown as FAIL; the exit status is 0 unless the harness itself broke (a server did not
start, a run produced errors or no numbers). docs/performance.md explains every figure.
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


class Placement:
    """taskset prefixes: proxies on one CPU, everything else on another (when there are >= 2 CPUs)."""

    def __init__(self):
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = len(cpus) >= 2 and shutil.which("taskset") is not None
        self.env_cpu = str(cpus[0]) if cpus else "0"
        self.proxy_cpu = str(cpus[1]) if len(cpus) >= 2 else self.env_cpu
        self.proxy_on_env = False  # the "client_cpu" placement: proxies join the load generator

    def env(self, argv):
        return ["taskset", "-c", self.env_cpu] + argv if self.enabled else argv

    def proxy(self, argv):
        cpu = self.env_cpu if self.proxy_on_env else self.proxy_cpu
        return ["taskset", "-c", cpu] + argv if self.enabled else argv

    def describe(self):
        if not self.enabled:
            return "no pinning (fewer than 2 CPUs or no taskset)"
        return f"proxy under test on CPU {self.proxy_cpu}; load generator, smtp-sink, auth_http, curl on CPU {self.env_cpu}"

    def start_pollers(self):
        """One SCHED_IDLE busy loop per CPU in use: keeps (virtual) CPUs from halting between events.

        On a VM an idle vCPU halts, and waking it for the next packet costs up to milliseconds: a proxy that
        sleeps between events then measures the hypervisor, while one that happens to stay busy does not. A
        SCHED_IDLE task runs only when nothing else wants the CPU and is preempted at once, so it takes no CPU
        from the bench or from anything else; it only keeps the CPU polling instead of halting.
        """
        self.pollers = []
        if shutil.which("chrt") is None:
            return
        for cpu in sorted({self.env_cpu, self.proxy_cpu}):
            argv = ["chrt", "--idle", "0", "/bin/sh", "-c", "while :; do :; done"]
            if self.enabled:
                argv = ["taskset", "-c", cpu] + argv
            self.pollers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))

    def stop_pollers(self):
        for p in getattr(self, "pollers", []):
            p.kill()
            p.wait()
        self.pollers = []


class Server:
    def __init__(self, name, argv, logfile, port, cwd=None):
        self.name = name
        self.port = port
        self.log = open(logfile, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=cwd)
        wait_port(port, self.proc, name)

    @property
    def pid(self):
        return self.proc.pid

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
    """utime + stime of a process (all its threads)."""
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


def haproxy_config(workdir, port, sink_port):
    path = os.path.join(workdir, "haproxy.cfg")
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

class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.place = Placement()
        self.workdir = args.workdir
        os.makedirs(self.workdir, exist_ok=True)
        self.servers = []
        self.raw = {}
        self.problems = []  # harness problems (errors in runs): make the exit status non-zero
        # durations: full run vs smoke
        if self.smoke:
            self.duration, self.warmup, self.latency_duration = 0.4, 0.1, 0.4
            self.idle_sessions, self.connectors, self.callgrind_messages = 200, 20, 3
        else:
            self.duration, self.warmup, self.latency_duration = args.duration, 0.5, 5.0
            self.idle_sessions, self.connectors, self.callgrind_messages = args.idle_sessions, args.connectors, 51
        self.concurrency = args.concurrency
        self.size = args.size
        self.have_nginx = shutil.which("nginx") is not None and os.path.exists(
            "/usr/lib/nginx/modules/ngx_mail_module.so")
        self.have_haproxy = shutil.which("haproxy") is not None
        self.cert, self.key = make_cert(self.workdir)

    # -- servers
    def start(self, name, argv, port, proxy=True, cwd=None):
        argv = self.place.proxy(argv) if proxy else self.place.env(argv)
        server = Server(name, argv, os.path.join(self.workdir, f"{name}.log"), port, cwd=cwd)
        self.servers.append(server)
        return server

    def stop(self, server):
        server.stop()
        self.servers.remove(server)

    def stop_all(self):
        self.place.stop_pollers()
        for server in list(self.servers):
            self.stop(server)

    def start_sink(self, on_proxy_cpu=False):
        smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.sink_port = free_port()
        argv = [smtp_sink, "-m", "2000"]
        if os.geteuid() == 0:
            argv += ["-u", SINK_USER]
        argv += [f"127.0.0.1:{self.sink_port}", "2000"]
        self.sink = self.start("smtp-sink", argv, self.sink_port, proxy=on_proxy_cpu)

    def plain_reused_placed(self, tag):
        """Plaintext, reused sessions through every path with a fresh sink, in placement `tag` (see run())."""
        log(f"plaintext reused, placement {tag}")
        self.place.enabled = tag != "shared"
        try:
            self.start_sink(on_proxy_cpu=tag in ("server_cpu", "client_cpu"))
            self.place.proxy_on_env = tag == "client_cpu"  # after the sink: it keeps the other CPU to itself
            if self.have_nginx:
                self.start_auth()
            paths = [("direct", self.sink), ("mailflowd", self.start_mailflowd(tag))]
            if tag == "shared":  # one loop per CPU instead of the default one: what the default saves
                paths.append(("mailflowd_auto", self.start_mailflowd(f"{tag}-auto", event_loops="auto")))
            if self.have_nginx:
                paths.append(("nginx", self.start_nginx(tag)))
            if self.have_haproxy:
                paths.append(("haproxy", self.start_haproxy()))
            runs = {name: self.loadgen(server.port, f"{name}.plain_reused_{tag}", server=server)
                    for name, server in paths}
            for _, server in paths[1:]:
                self.stop(server)
            return runs
        finally:
            self.place.enabled = True
            self.place.proxy_on_env = False

    def start_mailflowd(self, tag, connectors=0, outbound=False, busy_poll=None, event_loops=1):
        port, http_port = free_port(), free_port()
        out_port = free_port() if outbound else None
        config = mailflowd_config(self.workdir, tag, port, http_port, self.sink_port, self.cert, self.key,
                                  connectors, out_port, busy_poll, event_loops)
        server = self.start(f"mailflowd-{tag}", [self.args.mailflowd, "--config", config], port)
        wait_port(http_port, server.proc, server.name)
        server.http_port = http_port
        server.out_port = out_port
        server.rss_pid = server.pid
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
        return server

    def start_auth(self):
        self.auth_port = free_port()
        config, d = nginx_auth_config(self.workdir, self.auth_port, self.sink_port)
        self.auth = self.start("nginx-auth", ["nginx", "-p", d, "-c", config], self.auth_port, proxy=False)

    def start_haproxy(self):
        port = free_port()
        config = haproxy_config(self.workdir, port, self.sink_port)
        server = self.start("haproxy", ["haproxy", "-db", "-f", config], port)
        server.rss_pid = server.pid
        return server

    # -- load generator
    def loadgen(self, port, label, tls="none", messages=0, concurrency=None, interval_ms=0, duration=None,
                sender_domains=1, server=None):
        argv = [self.args.loadgen, "--connect", f"127.0.0.1:{port}", "--tls", tls, "--messages", str(messages),
                "--concurrency", str(concurrency or self.concurrency), "--size", str(self.size),
                "--duration", str(duration or self.duration), "--warmup", str(self.warmup),
                "--interval-ms", str(interval_ms), "--sender-domains", str(sender_domains)]
        cpu_pid = getattr(server, "rss_pid", None) if server is not None and server.name != "smtp-sink" else None
        cpu_before, wall_before = (cpu_seconds(cpu_pid) if cpu_pid else 0.0), time.monotonic()
        sink_before, children_before = cpu_seconds(self.sink.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(self.place.env(argv), capture_output=True, text=True, timeout=120)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        loadgen_cpu = (children_after.ru_utime + children_after.ru_stime - children_before.ru_utime
                       - children_before.ru_stime)
        load_cpu = loadgen_cpu + cpu_seconds(self.sink.pid) - sink_before
        if out.returncode != 0:
            raise RuntimeError(f"loadgen {label} failed ({out.returncode}): {out.stderr.strip()}")
        result = json.loads(out.stdout)
        # The load side (load generator + smtp-sink), whole run: near 100 % of its CPU means the load, not the
        # path under test, limited the rate.
        result["load_cpu_percent"] = round(100.0 * load_cpu / (time.monotonic() - wall_before), 1)
        if cpu_pid:
            # The proxy's CPU time over the whole run (warm-up included), per message at the measured rate.
            cpu, wall = cpu_seconds(cpu_pid) - cpu_before, time.monotonic() - wall_before
            result["proxy_cpu_percent"] = round(100.0 * cpu / wall, 1)
            rate = result["msgs_per_s"] * wall
            result["proxy_cpu_us_per_msg"] = round(1e6 * cpu / rate, 1) if rate else None
        self.raw[label] = result
        if result["errors"]:
            self.problems.append(f"{label}: {result['errors']} errors, first: {result['first_error']}")
        if result["messages"] == 0:
            self.problems.append(f"{label}: no message completed")
        log(f"  {label:34s} {result['msgs_per_s']:10.1f} msgs/s {result['sessions_per_s']:9.1f} sessions/s "
            f"p50 {result['p50_us']}us p99 {result['p99_us']}us errors {result['errors']} "
            f"load CPU {result['load_cpu_percent']}%"
            + (f" proxy CPU {result['proxy_cpu_percent']}% {result['proxy_cpu_us_per_msg']}us/msg" if cpu_pid else ""))
        return result

    def idle_rss(self, server, label, tls):
        """RSS growth of the server per idle session (banner + EHLO, or + STARTTLS + EHLO) over N sessions."""
        # Warm up allocator and TLS context with a few complete sessions first.
        self.loadgen(server.port, f"{label}.warmup", tls=tls, messages=1, concurrency=2, duration=0.3)
        time.sleep(0.3)
        before = rss_kib(server.rss_pid)
        argv = [self.args.loadgen, "--connect", f"127.0.0.1:{server.port}", "--mode", "idle", "--tls", tls,
                "--idle", str(self.idle_sessions)]
        proc = subprocess.Popen(self.place.env(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
        log(f"  {label:34s} {opened} sessions, RSS {before} -> {after} KiB = {per_session / 1024:.2f} KiB/session")
        return per_session

    def http_ms(self, port, path, label, repeat=5):
        times = []
        size = 0
        for _ in range(repeat):
            out = subprocess.run(self.place.env(["curl", "-s", "-o", "/dev/null", "-w",
                                                 "%{http_code} %{size_download} %{time_total}",
                                                 f"http://127.0.0.1:{port}{path}"]),
                                 capture_output=True, text=True, timeout=30)
            code, size, seconds = out.stdout.split()
            if code != "200":
                raise RuntimeError(f"GET {path} answered {code}")
            times.append(float(seconds) * 1000.0)
            size = int(size)
        self.raw[label] = {"ms": times, "median_ms": statistics.median(times), "max_ms": max(times), "bytes": size}
        log(f"  {label:34s} median {statistics.median(times):.2f} ms, max {max(times):.2f} ms, {size} bytes")
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
        log(f"  {'callgrind proto engines':34s} {per_message:,.0f} instructions per 10 KiB message")
        return per_message

    # -- the figures
    def run(self):
        figures = []

        def ratio_row(fid, name, unit, ours, anchor_name, anchor, target):
            ratio = ours / anchor if ours is not None and anchor else None
            passed = None if target is None or ratio is None else ratio >= target
            figures.append({"id": fid, "figure": name, "unit": unit, "mailflowd": ours, "anchor_name": anchor_name,
                            "anchor": anchor, "ratio": ratio,
                            "target": None if target is None else f"ratio >= {target:.2f}", "pass": passed})

        def limit_row(fid, name, unit, ours, anchor_name, anchor, limit):
            ratio = ours / anchor if ours is not None and anchor else None
            passed = None if limit is None or ours is None else ours <= limit
            figures.append({"id": fid, "figure": name, "unit": unit, "mailflowd": ours, "anchor_name": anchor_name,
                            "anchor": anchor, "ratio": ratio,
                            "target": None if limit is None else f"<= {limit:g} {unit}", "pass": passed})

        log(f"bench: {self.place.describe()}; workdir {self.workdir}")
        if not self.args.no_pollers and not self.smoke:
            self.place.start_pollers()
        self.start_sink()
        if self.have_nginx:
            self.start_auth()

        # 1. Idle sessions: fresh processes, so that memory freed by earlier runs cannot hide the growth.
        log("idle sessions (RSS)")
        idle = {}
        for tls, tag in (("none", "plain"), ("1.3", "tls")):
            m = self.start_mailflowd(f"idle-{tag}")
            idle[("mailflowd", tag)] = self.idle_rss(m, f"mailflowd.idle_{tag}", tls)
            self.stop(m)
            if self.have_nginx:
                n = self.start_nginx(f"idle-{tag}")
                idle[("nginx", tag)] = self.idle_rss(n, f"nginx.idle_{tag}", tls)
                self.stop(n)

        # 2. Throughput and latency: one daemon of each kind, runs interleaved per figure.
        log("throughput and latency")
        mf = self.start_mailflowd("relay")
        ng = self.start_nginx("relay") if self.have_nginx else None
        ha = self.start_haproxy() if self.have_haproxy else None
        paths = [("direct", self.sink), ("mailflowd", mf)] + ([("nginx", ng)] if ng else []) + (
            [("haproxy", ha)] if ha else [])
        r = {}
        for mode, messages in (("reused", 0), ("single", 1)):
            for name, server in paths:
                r[(name, "plain", mode)] = self.loadgen(server.port, f"{name}.plain_{mode}", messages=messages,
                                                        server=server)
        for version in ("1.2", "1.3"):
            for mode, messages in (("reused", 0), ("single", 1)):
                for name, server in paths:
                    if name in ("direct", "haproxy"):
                        continue  # smtp-sink has no STARTTLS; HAProxy in TCP mode cannot terminate it
                    r[(name, version, mode)] = self.loadgen(server.port, f"{name}.tls{version}_{mode}",
                                                            tls=version, messages=messages, server=server)
        for name, server in paths:
            r[(name, "latency")] = self.loadgen(server.port, f"{name}.latency", messages=0, concurrency=1,
                                                interval_ms=2, duration=self.latency_duration, server=server)
        self.stop(mf)
        if ng:
            self.stop(ng)
        if ha:
            self.stop(ha)
        # The same daemon with performance.busy_poll on (default off): what polling buys (info rows).
        polling = self.start_mailflowd("relay-poll", busy_poll=True)
        r[("mailflowd_poll", "plain", "reused")] = self.loadgen(polling.port, "mailflowd_poll.plain_reused",
                                                                messages=0, server=polling)
        r[("mailflowd_poll", "latency")] = self.loadgen(polling.port, "mailflowd_poll.latency", messages=0,
                                                        concurrency=1, interval_ms=2,
                                                        duration=self.latency_duration, server=polling)
        self.stop(polling)

        # 2b. Plaintext, reused sessions once more in three other placements, informational (docs/performance.md):
        #   shared      nothing pinned: the kernel places every process, as on an unconfigured server;
        #   server_cpu  smtp-sink moves to the proxy's CPU, the load generator is alone on the other: proxy and
        #               sink saturate their CPU, so the rates compare what each proxy costs per message;
        #   client_cpu  the proxy moves to the load generator's CPU, smtp-sink is alone on the other: a proxy
        #               cheap enough leaves the sink as the limit.
        placed = {}
        if self.place.enabled:
            for tag in ("shared", "server_cpu", "client_cpu"):
                placed[tag] = self.plain_reused_placed(tag)

        def get(name, *key):
            v = r.get((name,) + key)
            return v

        def msgs(name, *key):
            v = get(name, *key)
            return v["msgs_per_s"] if v else None

        def sess(name, *key):
            v = get(name, *key)
            return v["sessions_per_s"] if v else None

        ratio_row("plain_reused_vs_direct", "plaintext msgs/s, reused sessions", "msgs/s",
                  msgs("mailflowd", "plain", "reused"), "direct", msgs("direct", "plain", "reused"), 0.90)
        ratio_row("plain_reused_vs_nginx", "plaintext msgs/s, reused sessions", "msgs/s",
                  msgs("mailflowd", "plain", "reused"), "nginx", msgs("nginx", "plain", "reused"), 1.05)
        ratio_row("plain_single_vs_nginx", "plaintext msgs/s, 1 message/session", "msgs/s",
                  msgs("mailflowd", "plain", "single"), "nginx", msgs("nginx", "plain", "single"), 1.05)
        for version in ("1.2", "1.3"):
            ratio_row(f"tls{version.replace('.', '')}_reused_vs_nginx", f"STARTTLS TLS{version} msgs/s, reused",
                      "msgs/s", msgs("mailflowd", version, "reused"), "nginx", msgs("nginx", version, "reused"), 1.05)
        for version in ("1.2", "1.3"):
            ratio_row(f"tls{version.replace('.', '')}_new_sessions_vs_nginx",
                      f"new STARTTLS TLS{version} sessions/s (1 msg)", "sessions/s",
                      sess("mailflowd", version, "single"), "nginx", sess("nginx", version, "single"), 1.05)

        direct_p99 = get("direct", "latency")["p99_us"]

        def added(name):
            v = get(name, "latency")
            return None if v is None else v["p99_us"] - direct_p99

        ours_added, nginx_added = added("mailflowd"), added("nginx")
        figures.append({"id": "p99_added_latency_vs_nginx", "figure": "p99 added latency/msg, 1 session, low load",
                        "unit": "us", "mailflowd": ours_added, "anchor_name": "nginx", "anchor": nginx_added,
                        "ratio": (ours_added / nginx_added) if nginx_added else None,
                        "target": "<= nginx's", "pass": None if nginx_added is None else ours_added <= nginx_added})

        limit_row("rss_idle_plain", "RSS per idle session, plaintext", "KiB",
                  idle[("mailflowd", "plain")] / 1024, "nginx", idle.get(("nginx", "plain"), 0) / 1024 or None, 8)
        limit_row("rss_idle_tls", "RSS per idle session, after STARTTLS (TLS1.3)", "KiB",
                  idle[("mailflowd", "tls")] / 1024, "nginx", idle.get(("nginx", "tls"), 0) / 1024 or None, 32)

        # 3. HTTP: /metrics and the report with many connectors, after traffic through some of them.
        log(f"http with {self.connectors} connectors per direction")
        big = self.start_mailflowd("connectors", connectors=self.connectors, outbound=True)
        domains = min(100, self.connectors)
        self.loadgen(big.port, "connectors.traffic_inbound", messages=5, sender_domains=domains, duration=0.5)
        self.loadgen(big.out_port, "connectors.traffic_outbound", messages=5, sender_domains=domains, duration=0.5)
        metrics_ms = self.http_ms(big.http_port, "/metrics", "metrics_scrape")
        report_ms = self.http_ms(big.http_port, "/api/v1/report?days=7", "report_7d")
        self.stop(big)
        limit_row("metrics_scrape", f"/metrics scrape, {self.connectors} connectors x 2 directions", "ms",
                  metrics_ms, None, None, 20)
        limit_row("report_7d", f"/api/v1/report?days=7, {self.connectors} connectors x 2 directions", "ms",
                  report_ms, None, None, 50)

        # 4. Informational: HAProxy (a pure TCP proxy: the floor of what any relay can cost).
        if self.have_haproxy:
            ratio_row("plain_reused_vs_haproxy", "plaintext msgs/s, reused (info)", "msgs/s",
                      msgs("mailflowd", "plain", "reused"), "haproxy", msgs("haproxy", "plain", "reused"), None)
            ratio_row("plain_single_vs_haproxy", "plaintext msgs/s, 1 msg/session (info)", "msgs/s",
                      msgs("mailflowd", "plain", "single"), "haproxy", msgs("haproxy", "plain", "single"), None)
            ha_added = added("haproxy")
            figures.append({"id": "p99_added_latency_vs_haproxy", "figure": "p99 added latency/msg (info)",
                            "unit": "us", "mailflowd": ours_added, "anchor_name": "haproxy", "anchor": ha_added,
                            "ratio": (ours_added / ha_added) if ha_added else None, "target": None, "pass": None})
        ratio_row("plain_single_vs_direct", "plaintext msgs/s, 1 msg/session (info)", "msgs/s",
                  msgs("mailflowd", "plain", "single"), "direct", msgs("direct", "plain", "single"), None)
        ratio_row("plain_reused_poll_vs_direct", "plaintext msgs/s, reused, busy_poll on (info)", "msgs/s",
                  msgs("mailflowd_poll", "plain", "reused"), "direct", msgs("direct", "plain", "reused"), None)
        poll_added = added("mailflowd_poll")
        figures.append({"id": "p99_added_latency_poll_vs_nginx",
                        "figure": "p99 added latency/msg, busy_poll on (info)", "unit": "us",
                        "mailflowd": poll_added, "anchor_name": "nginx", "anchor": nginx_added,
                        "ratio": (poll_added / nginx_added) if nginx_added else None, "target": None,
                        "pass": None})
        for tag, label in (("shared", "CPUs shared"), ("server_cpu", "sink on proxy CPU"),
                           ("client_cpu", "proxy on load CPU")):
            runs = placed.get(tag, {})
            for anchor in ("direct", "nginx", "haproxy"):
                if anchor in runs:
                    ratio_row(f"plain_reused_{tag}_vs_{anchor}", f"plaintext msgs/s, reused, {label} (info)",
                              "msgs/s", runs["mailflowd"]["msgs_per_s"], anchor, runs[anchor]["msgs_per_s"], None)
            if "mailflowd_auto" in runs:
                ratio_row(f"plain_reused_{tag}_auto_vs_direct",
                          f"plaintext msgs/s, reused, {label}, event_loops auto (info)", "msgs/s",
                          runs["mailflowd_auto"]["msgs_per_s"], "direct", runs["direct"]["msgs_per_s"], None)

        # 5. callgrind: instructions per message in the proto engines (stable across machines and noise).
        log("callgrind")
        per_message = self.callgrind()
        figures.append({"id": "proto_instructions_per_message", "figure": "proto engines, instr/10 KiB message",
                        "unit": "instr", "mailflowd": per_message, "anchor_name": None, "anchor": None,
                        "ratio": None, "target": "track", "pass": None})
        return figures


# ---- output -----------------------------------------------------------------------------------------------

def fmt_value(v, unit):
    if v is None:
        return "n/a"
    if unit in ("KiB", "ms"):
        return f"{v:.2f} {unit}"
    if unit == "us":
        return f"{v:.0f} us"
    if unit == "instr":
        return f"{v:,.0f}"
    return f"{v:,.0f}"


def table(figures):
    header = ("figure", "mailflowd", "anchor", "ratio", "target", "result")
    rows = []
    for f in figures:
        anchor = "-" if f["anchor_name"] is None else f"{fmt_value(f['anchor'], f['unit'])} ({f['anchor_name']})"
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}"
        result = "info" if f["pass"] is None else ("PASS" if f["pass"] else "FAIL")
        if f["target"] is not None and f["pass"] is None and f["target"] != "track":
            result = "n/a"
        rows.append((f["figure"], fmt_value(f["mailflowd"], f["unit"]), anchor, ratio, f["target"] or "-", result))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="short runs; checks that every figure is sane")
    p.add_argument("--mailflowd", default=os.path.join(root, "build/release/daemon/mailflowd"))
    p.add_argument("--loadgen", default=os.path.join(root, "build/release/tests/bench/mailflow_loadgen"))
    p.add_argument("--proto-driver", default=os.path.join(root, "build/release/tests/bench/mailflow_proto_driver"))
    p.add_argument("--workdir", default=None, help="configs, logs, certificates (default: a temporary directory)")
    p.add_argument("--json", default=os.path.join(root, "bench/results.json"))
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per throughput figure")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent sessions for throughput figures")
    p.add_argument("--size", type=int, default=10240, help="message size in octets")
    p.add_argument("--idle-sessions", type=int, default=10000)
    p.add_argument("--connectors", type=int, default=1000, help="connectors per direction for the HTTP figures")
    p.add_argument("--no-pollers", action="store_true", help="let idle CPUs halt (see Placement.start_pollers)")
    args = p.parse_args()

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
    for exe in (args.mailflowd, args.loadgen, args.proto_driver):
        if not os.access(exe, os.X_OK):
            log(f"bench: {exe} is missing: build first (make bench builds the release preset)")
            return 2
    bench = Bench(args)
    started = time.monotonic()
    try:
        figures = bench.run()
    except Exception as e:  # a broken harness must fail loudly
        log(f"bench: harness error: {e}")
        bench.stop_all()
        return 1
    finally:
        bench.stop_all()
    elapsed = time.monotonic() - started

    text = table(figures)
    print(text)
    fails = [f["figure"] for f in figures if f["pass"] is False]
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "smoke": args.smoke, "elapsed_s": round(elapsed, 1), "placement": bench.place.describe(),
        "pollers": not args.no_pollers and not args.smoke,
        "load_average_before": round(load1, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "settings": {"duration_s": bench.duration, "warmup_s": bench.warmup, "concurrency": bench.concurrency,
                     "message_size": bench.size, "idle_sessions": bench.idle_sessions,
                     "connectors_per_direction": bench.connectors},
        "figures": figures, "fails": fails, "problems": bench.problems, "raw": {k: v for k, v in bench.raw.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{len(figures)} figures in {elapsed:.0f}s; written to {args.json}")
    if fails:
        print(f"FAIL: {len(fails)} target(s) missed: " + "; ".join(fails))
    if bench.problems:
        print("harness problems:\n  " + "\n  ".join(bench.problems))
    if cleanup:
        shutil.rmtree(args.workdir, ignore_errors=True)

    if args.smoke:
        # Sane numbers: every measured figure is present and positive (latency differences may be <= 0).
        insane = [f["id"] for f in figures
                  if f["mailflowd"] is None or (f["unit"] != "us" and not f["mailflowd"] > 0)]
        if insane or bench.problems:
            print("smoke: FAILED: " + ", ".join(insane + bench.problems))
            return 1
        print("smoke: the harness works")
        return 0
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
