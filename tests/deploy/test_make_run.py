"""`make run` as README.md tells it: deploy/dev/run.sh (what `make run` starts after the build) brings up the sink
and mailflowd on config/examples/dev.yaml and prints what to try; each printed swaks command delivers, and after
them the printed report command shows the partner's TLS1.0 mail as an insight, the point of the exercise.

run.sh works in the repository's run/ folder, so the test runs a copy of the three files it uses in a scratch
tree (a user's own `make run` keeps its run/ untouched). The binary is the dev build (MAILFLOWD).
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess

import pytest

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


@contextlib.contextmanager
def run_sh(tmp_path, ports):
    """run.sh with the dev binary on a copy of its files, ports {"SMTP_PORT": n, ...}; yields (tree, output file)
    once it printed what to try (or ended), stops it at the end. Assertion messages get run.sh's output."""
    tree = tmp_path / "tree"
    for f in FILES:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(d.REPO / f, tree / f)
    env = dict(os.environ, **{name: str(port) for name, port in ports.items()})
    out = tmp_path / "run.out"
    proc = subprocess.Popen([tree / "deploy/dev/run.sh", os.environ["MAILFLOWD"]], env=env,
                            stdout=open(out, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        d.wait_for(lambda: "Ctrl-C stops" in out.read_text() or proc.poll() is not None, 30,
                   what="run.sh to print what to try")
        assert proc.poll() is None, "run.sh ended"
        yield tree, out
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- run.sh:\n{d.tail(out)}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(20)


def test_make_run_prints_commands_that_show_an_insight(tmp_path):
    ports = {"SMTP_PORT": d.free_port(), "HTTP_PORT": d.free_port(), "SINK_PORT": d.free_port()}
    with run_sh(tmp_path, ports) as (tree, out):
        text = out.read_text()
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


def bindable(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# A port of dev.yaml replaced by another of its defaults (2525 SMTP, 2526 sink, 9725 HTTP), as a user picks
# `make run SMTP_PORT=2526 SINK_PORT=2527` when 2525 is taken: each must end up where it was asked for.
@pytest.mark.parametrize("given", [{"SMTP_PORT": 2526}, {"SMTP_PORT": 9725}, {"SINK_PORT": 9725},
                                   {"HTTP_PORT": 2525}, {"HTTP_PORT": 2526}])
def test_make_run_listens_on_the_ports_given(tmp_path, given):
    if not all(bindable(port) for port in given.values()):
        pytest.skip(f"a default port of `make run` is in use here: {given}")
    ports = {name: given.get(name) or d.free_port() for name in ("SMTP_PORT", "HTTP_PORT", "SINK_PORT")}
    with run_sh(tmp_path, ports) as (tree, _):
        config = (tree / "run/dev.yaml").read_text()
        addresses = re.findall(r'address: "127\.0\.0\.1:(\d+)"', config)
        assert addresses == [str(ports["SMTP_PORT"]), str(ports["SINK_PORT"]), str(ports["HTTP_PORT"])], \
            f"run/dev.yaml's listener, sink and http ports for {ports}: {addresses}"
        status, _ = d.http_get(f"http://127.0.0.1:{ports['HTTP_PORT']}/healthz")
        assert status == 200


def test_a_second_make_run_leaves_the_running_one_alone(tmp_path):
    """A second `make run` in the same tree, on ports of its own, is refused before it touches run/: the first's
    run/dev.yaml (which its printed report command and its SIGHUP read) and its sink stay as they were."""
    ports = {"SMTP_PORT": d.free_port(), "HTTP_PORT": d.free_port(), "SINK_PORT": d.free_port()}
    with run_sh(tmp_path, ports) as (tree, out):
        config = (tree / "run/dev.yaml").read_text()
        report = [c for c in printed_commands(out.read_text()) if " report " in c + " "]
        other = {name: d.free_port() for name in ports}
        second = subprocess.run([tree / "deploy/dev/run.sh", os.environ["MAILFLOWD"]],
                                env=dict(os.environ, **{name: str(port) for name, port in other.items()}),
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert second.returncode == 1, f"the second run.sh: {second.returncode}\n{second.stdout}{second.stderr}"
        assert "another `make run`" in second.stderr, second.stderr
        assert (tree / "run/dev.yaml").read_text() == config, "the second run.sh rewrote the first's run/dev.yaml"
        for port in other.values():
            assert bindable(port), f"the second run.sh left something listening on {port}"
        p = subprocess.run(["bash", "-c", report[0]], cwd=tree, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, f"the first's printed {report[0]} after the second run.sh:\n{p.stdout}{p.stderr}"
