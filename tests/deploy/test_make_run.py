"""`make run` as README.md tells it: deploy/dev/run.sh (what `make run` starts after the build) brings up the sink
and mailflowd on config/examples/dev.yaml and prints what to try; each printed swaks command delivers, and after
them the printed report command shows the partner's TLS1.0 mail as an insight, the point of the exercise.

run.sh works in the repository's run/ folder, so the test runs a copy of the three files it uses in a scratch
tree (a user's own `make run` keeps its run/ untouched). The binary is the dev build (MAILFLOWD).
"""
import os
import re
import shutil
import signal
import subprocess

import deploylib as d

FILES = ("deploy/dev/run.sh", "config/examples/dev.yaml", "tests/tools/sink.py")


def printed_commands(text):
    """The indented command lines of run.sh's help text, continuation lines joined."""
    commands, current = [], ""
    for line in text.splitlines():
        if current or re.match(r"^  (swaks|\S*mailflowd) ", line):
            current += line.strip().rstrip("\\") + " "
            if not line.rstrip().endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def test_make_run_prints_commands_that_show_an_insight(tmp_path):
    binary = os.environ["MAILFLOWD"]
    tree = tmp_path / "tree"
    for f in FILES:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(d.REPO / f, tree / f)
    smtp, http, sink = d.free_port(), d.free_port(), d.free_port()
    env = dict(os.environ, SMTP_PORT=str(smtp), HTTP_PORT=str(http), SINK_PORT=str(sink))
    out = tmp_path / "run.out"
    proc = subprocess.Popen([tree / "deploy/dev/run.sh", binary], env=env, stdout=open(out, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        d.wait_for(lambda: "Ctrl-C stops" in out.read_text() or proc.poll() is not None, 30,
                   what="run.sh to print what to try")
        text = out.read_text()
        assert proc.poll() is None, text
        commands = printed_commands(text)
        swaks = [c for c in commands if c.startswith("swaks ")]
        report = [c for c in commands if " report " in c + " "]
        assert len(swaks) == 2 and len(report) == 1, text
        for command in swaks:
            p = subprocess.run(["bash", "-c", command], cwd=tree, capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, f"{command}\n{p.stdout}{p.stderr}"
        assert len(list((tree / "run/mail").glob("*.eml"))) == 2, "the sink did not get both messages"
        p = subprocess.run(["bash", "-c", report[0]], cwd=tree, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, f"{report[0]}\n{p.stdout}{p.stderr}"
        assert "significant TLS1.0 mail flow" in p.stdout, f"no insight after the printed commands:\n{p.stdout}"
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- run.sh:\n{d.tail(out)}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(20)
