#!/usr/bin/python3
"""Instructions per relayed message (docs/performance.md, "Instructions per message").

  instructions.py [--build build/release] [--mailflowd PATH] [--runs reused,single] [--top 25] [--keep DIR]

mailflowd (release build) runs under `valgrind --tool=callgrind` and relays plaintext 10 KiB messages from the
bench's load generator to smtp-sink. After a warm-up the counters are zeroed (`callgrind_control -z`), a run
is relayed, and the counters are dumped (`callgrind_control -d`): the instructions of that run, total and by
function (inclusive and self, `callgrind_annotate`), divided by the messages the load generator completed.
The load generator finishes each session's message in flight before it QUITs, so every counted instruction
belongs to a completed message or to its session's start and end. Instruction counts do not depend on how
busy the machine is: this is how a change to the per-message work is judged on a shared machine.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from run_bench import Server, make_cert, mailflowd_config, wait_port  # noqa: E402
sys.path.insert(0, os.path.join(here, "..", "tools"))
from free_port import free_port  # noqa: E402

# run name -> loadgen arguments: few sessions, so that a session's start and end weigh little in "reused"
RUNS = {"reused": ["--concurrency", "4", "--messages", "0"], "single": ["--concurrency", "4", "--messages", "1"]}


def callgrind_control(*args):
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def annotate(path, inclusive, top):
    """(total, [(instructions, function)]) of a callgrind dump, the `top` first functions."""
    argv = ["callgrind_annotate", "--auto=no", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", path]
    text = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    total, rows = 0, []
    for line in text.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(.*?\)\s+PROGRAM TOTALS", line) or re.match(r"^\s*([\d,]+)\s+PROGRAM TOTALS", line)
        if m:
            total = int(m.group(1).replace(",", ""))
            continue
        m = re.match(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?):(.*)$", line)
        # the frames that were active when the counters were zeroed show the whole run as their own cost
        if m and total and len(rows) < top and (inclusive or int(m.group(1).replace(",", "")) < total // 2):
            rows.append((int(m.group(1).replace(",", "")), m.group(3).split(" [")[0].strip()))
    return total, rows


def main():
    root = os.path.abspath(os.path.join(here, "..", ".."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(root, "build/release"))
    p.add_argument("--mailflowd")
    p.add_argument("--loadgen")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--duration", type=float, default=8.0, help="loadgen seconds per run (under callgrind)")
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--top", type=int, default=25, help="functions listed per run (inclusive and self)")
    p.add_argument("--keep", help="copy the callgrind dumps here")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    mailflowd = args.mailflowd or os.path.join(args.build, "daemon/mailflowd")
    loadgen = args.loadgen or os.path.join(args.build, "tests/bench/mailflow_loadgen")

    work = tempfile.mkdtemp(prefix="instructions-")
    cert, key = make_cert(work)
    sink_port = free_port()
    sink = Server("smtp-sink", ["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
                  os.path.join(work, "sink.log"), sink_port)
    port, http_port = free_port(), free_port()
    config = mailflowd_config(work, "cg", port, http_port, sink_port, cert, key)
    out = os.path.join(work, "callgrind.out")
    log = open(os.path.join(work, "mailflowd.log"), "ab")
    daemon = subprocess.Popen(["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}",
                               mailflowd, "--config", config], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    figures = {}
    try:
        wait_port(http_port, daemon, "mailflowd (callgrind)", timeout=120)
        subprocess.run([loadgen, "--connect", f"127.0.0.1:{port}", "--concurrency", "4", "--duration", "2",
                        "--warmup", "0", "--size", str(args.size)], check=True, stdout=subprocess.DEVNULL)
        for run in filter(None, args.runs.split(",")):
            callgrind_control("-z", str(daemon.pid))
            done = subprocess.run([loadgen, "--connect", f"127.0.0.1:{port}", *RUNS[run], "--size", str(args.size),
                                   "--duration", str(args.duration), "--warmup", "0"],
                                  check=True, capture_output=True, text=True)
            callgrind_control("-d", run, str(daemon.pid))
            r = json.loads(done.stdout)
            if r["errors"]:
                raise RuntimeError(f"{run}: {r['errors']} errors")
            messages = r["messages_total"]
            dump = max(glob.glob(out + "*"), key=os.path.getmtime)
            total, inclusive = annotate(dump, True, args.top)
            _, self_ = annotate(dump, False, args.top)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                shutil.copy(dump, os.path.join(args.keep, f"callgrind.{run}"))
            figures[run] = {"messages": messages, "instructions_per_message": round(total / messages),
                            "inclusive": [(round(n / messages), f) for n, f in inclusive],
                            "self": [(round(n / messages), f) for n, f in self_]}
            print(f"{run}: {messages} messages, {total / messages:,.0f} instructions per message")
            for kind in ("inclusive", "self"):
                print(f"  {kind}, per message:")
                for n, f in figures[run][kind]:
                    print(f"  {n:>10,}  {f[:150]}")
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
