#!/usr/bin/python3
"""System calls and heap allocations per relayed message (docs/performance.md, "Per message").

Figures that do not depend on how busy the machine is: mailflowd (release build) relays a plaintext load from
the bench's load generator or Postfix's smtp-source to smtp-sink; `perf stat` counts mailflowd's system calls
by kind (every syscalls:sys_enter_* tracepoint the kernel has, so that no kind of call goes uncounted, plus the
receives that failed with EAGAIN; raw_syscalls:sys_enter counts them all once more, as a check), and an
LD_PRELOAD counter (tests/bench/alloc_count.c, compiled on the fly) its heap allocations. Each is divided by the messages
the load generator completed while they were counted. Placement: mailflowd on CPU 1, load and sink on CPU 0
(--no-pin: nothing pinned). A low-load latency check (1 session, one message every 2 ms, no counters
attached) prints p50/p99 of mailflowd and of the direct path.

  per_message.py [--build build/release] [--mailflowd PATH] [--runs loadgen-reused,loadgen-single,...]
                 [--direction outbound]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from run_bench import Server, make_cert, mailflowd_config, wait_port  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "tools"))
from free_port import free_port  # noqa: E402

TRACING = next((d for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
                if os.path.isdir(os.path.join(d, "events/syscalls"))), "/sys/kernel/tracing")
RUNS = ("loadgen-reused", "loadgen-single", "source-reused", "source-single")


def pinned(cpu, argv, pin):
    return ["taskset", "-c", str(cpu)] + argv if pin else argv


def syscall_kinds():
    """Every system call the kernel has an entry tracepoint for (about 360 on x86-64)."""
    names = os.listdir(os.path.join(TRACING, "events/syscalls"))
    return sorted(n[len("sys_enter_"):] for n in names if n.startswith("sys_enter_"))


def perf_counters(pid, out):
    # All of them, not a list of the calls one expects: a call that nobody thought of is counted too. perf opens
    # one counter per event and thread (a few thousand descriptors); raw_syscalls:sys_enter counts every call
    # once more, so that a call without a tracepoint of its own would show as the difference.
    argv = ["perf", "stat", "-x,", "-o", out, "-p", str(pid), "-e", "raw_syscalls:sys_enter"]
    for kind in syscall_kinds():
        argv += ["-e", f"syscalls:sys_enter_{kind}"]
    argv += ["-e", "syscalls:sys_exit_recvfrom", "--filter", "ret == -11"]
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Counting starts once perf has opened its counters, one per event and thread: wait for that many descriptors
    # (a fixed pause was enough for two dozen events, not for 360).
    wanted = argv.count("-e") * len(os.listdir(f"/proc/{pid}/task"))
    deadline = time.monotonic() + 20
    while len(os.listdir(f"/proc/{perf.pid}/fd")) < wanted and perf.poll() is None:
        if time.monotonic() > deadline:
            sys.exit(f"perf stat opened {len(os.listdir(f'/proc/{perf.pid}/fd'))} of {wanted} counters in 20 s")
        time.sleep(0.05)
    # ... and then enables them one by one (a few thousand ioctls): before that the first counters count and the
    # last do not (seen: socket 0.978 per session, the total 0.16 per message short of raw_syscalls).
    time.sleep(1.0)
    return perf


def read_perf(out):
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 3 or not parts[0].isdigit():
                continue
            name = parts[2]
            if name == "raw_syscalls:sys_enter":
                name = "all (raw_syscalls)"
            elif name == "syscalls:sys_exit_recvfrom":
                name = "recvfrom EAGAIN"
            counts[name.replace("syscalls:sys_enter_", "")] = int(parts[0])
    if not counts:
        sys.exit(f"perf stat counted nothing ({out}): perf and tracefs ({TRACING}) are needed, as root")
    return counts


def read_allocs(path):
    with open(path, "rb") as f:
        allocations, reallocations, frees, nbytes = struct.unpack("4Q", f.read(32))
    return {"allocations": allocations, "reallocations": reallocations, "frees": frees, "bytes": nbytes}


def main():
    root = os.path.abspath(os.path.join(here, "..", ".."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(root, "build/release"))
    p.add_argument("--mailflowd")
    p.add_argument("--loadgen")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--duration", type=float, default=3.0, help="loadgen seconds per run")
    p.add_argument("--messages", type=int, default=20000, help="smtp-source messages per run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--direction", choices=("inbound", "outbound"), default="inbound",
                   help="relay through the config's inbound listener (the bench's) or an outbound one")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    mailflowd = args.mailflowd or os.path.join(args.build, "daemon/mailflowd")
    loadgen = args.loadgen or os.path.join(args.build, "tests/bench/mailflow_loadgen")
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    cpus = sorted(os.sched_getaffinity(0))
    load_cpu, proxy_cpu = (cpus[0], cpus[1]) if pin else (None, None)

    work = tempfile.mkdtemp(prefix="per-message-")
    lib = os.path.join(work, "alloc_count.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, os.path.join(here, "alloc_count.c")], check=True)
    cert, key = make_cert(work)
    sink_port = free_port()
    sink = Server("smtp-sink", pinned(load_cpu, ["smtp-sink", "-m", "2000", "-u", "nobody",
                                                   f"127.0.0.1:{sink_port}", "2000"], pin),
                  os.path.join(work, "sink.log"), sink_port)
    port, http_port, out_port = free_port(), free_port(), free_port()
    config = mailflowd_config(work, "pm", port, http_port, sink_port, cert, key,
                              out_port=out_port if args.direction == "outbound" else None)
    if args.direction == "outbound":
        port = out_port
    counter_file = os.path.join(work, "allocs")
    env = dict(os.environ, LD_PRELOAD=lib, ALLOC_COUNT_FILE=counter_file)
    log = open(os.path.join(work, "mailflowd.log"), "ab")
    daemon = subprocess.Popen(pinned(proxy_cpu, [mailflowd, "--config", config], pin), env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    figures = {}
    try:
        wait_port(http_port, daemon, "mailflowd")
        # warm-up: a short run, so that first-use allocations (pools, loop state) are not counted
        subprocess.run(pinned(load_cpu, [loadgen, "--connect", f"127.0.0.1:{port}", "--concurrency", "8",
                                         "--duration", "0.5", "--warmup", "0"], pin),
                       check=True, stdout=subprocess.DEVNULL)
        for run in filter(None, args.runs.split(",")):
            gen, mode = run.split("-")
            if gen == "loadgen":
                argv = [loadgen, "--connect", f"127.0.0.1:{port}", "--concurrency", str(args.concurrency),
                        "--messages", "0" if mode == "reused" else "1", "--size", str(args.size),
                        "--duration", str(args.duration), "--warmup", "0"]
            else:
                argv = ["smtp-source", "-s", str(args.concurrency), "-m", str(args.messages), "-l", str(args.size),
                        "-M", "bench.localhost", "-f", "bench@d0.bench.example", "-t", "sink@sink.example"]
                argv += ["-d"] if mode == "reused" else []
                argv.append(f"127.0.0.1:{port}")
            perf_out = os.path.join(work, f"perf-{run}.txt")
            perf = perf_counters(daemon.pid, perf_out)
            allocs_before = read_allocs(counter_file)
            started = time.monotonic()
            done = subprocess.run(pinned(load_cpu, argv, pin), check=True, capture_output=True, text=True)
            wall = time.monotonic() - started
            time.sleep(0.2)  # the last sessions' QUIT and close
            allocs_after = read_allocs(counter_file)
            perf.send_signal(2)
            perf.wait()
            result = json.loads(done.stdout) if gen == "loadgen" else {}
            messages = result.get("messages_total", args.messages)
            # smtp-source's sessions: one per message without -d; with it, not known
            sessions = result.get("sessions_opened_total", messages if mode == "single" else 0)
            counts = read_perf(perf_out)
            raw = counts.pop("all (raw_syscalls)", 0)
            eagain = counts.pop("recvfrom EAGAIN", 0)
            # Every kind that occurred, the most frequent first. Three decimals: a call once per session shows in
            # the reused runs too (about 100 messages per session).
            kinds = [(k, v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v]
            kinds += [("recvfrom EAGAIN", eagain), ("total syscalls", sum(counts.values())),
                      ("all (raw_syscalls)", raw)]
            kinds += [(k, allocs_after[k] - allocs_before[k]) for k in ("allocations", "reallocations", "frees")]
            per = {k: round(v / messages, 3) for k, v in kinds}
            per["bytes allocated"] = round((allocs_after["bytes"] - allocs_before["bytes"]) / messages)
            per_session = {k: round(v / sessions, 3) for k, v in kinds} if sessions else {}
            figures[run] = {"messages": messages, "sessions": sessions, "msgs_per_s": round(messages / wall),
                            "per_message": per, "per_session": per_session}
            print(f"{run}: {messages} messages, {sessions or '?'} sessions, {messages / wall:,.0f} msgs/s "
                  "(counters attached)")
            if raw != sum(counts.values()):
                print(f"  warning: the kinds sum to {sum(counts.values())} calls, raw_syscalls counted {raw}")
            print(f"  {'':22} {'per message':>12} {'per session':>12}")
            for k, v in per.items():
                print(f"  {k:22} {v:>12} {per_session.get(k, ''):>12}")
        if not args.no_latency:
            for name, target in (("direct", sink_port), ("mailflowd", port)):
                done = subprocess.run(pinned(load_cpu, [loadgen, "--connect", f"127.0.0.1:{target}",
                                                        "--concurrency", "1", "--interval-ms", "2",
                                                        "--duration", "3", "--size", str(args.size)], pin),
                                      check=True, capture_output=True, text=True)
                r = json.loads(done.stdout)
                figures[f"latency-{name}"] = {k: r[k] for k in ("p50_us", "p99_us", "max_us")}
                print(f"latency {name}: p50 {r['p50_us']} us, p99 {r['p99_us']} us, max {r['max_us']} us")
    finally:
        daemon.terminate()
        daemon.wait()
        sink.stop()
        log.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
