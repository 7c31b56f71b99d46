"""docs/operations.md "Troubleshooting" quotes what an administrator finds in the journal when mailflowd does not
start; they grep for it. The real binary is started into each failure the table names, and its `startup_failed`
line must hold the text of one row's symptom (a code span, `...` standing for any text). The table said
`bind: Permission denied` and `bind: Address already in use`, which a listener's error never says ("listener inbound:
cannot listen on 127.0.0.1:25: Permission denied")."""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import harness

OPERATIONS = harness.HERE.parent.parent / "docs" / "operations.md"
UNPRIVILEGED = "127.0.7.61"  # a port below 1024 here, where the daemon runs as nobody: it may not bind it


def symptoms():
    """{symptom cell: [its code spans as regular expressions]} of the Troubleshooting table."""
    text = OPERATIONS.read_text(encoding="utf-8")
    table = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for row in table.splitlines():
        cells = row.split(" | ")
        if row.startswith("| ") and len(cells) > 1 and not row.startswith("| symptom"):
            rows[cells[0][2:]] = [re.compile(".*?".join(re.escape(part) for part in span.split("...")))
                                  for span in re.findall(r"`([^`]+)`", cells[0])]
    assert len(rows) >= 5, f"no Troubleshooting table read from {OPERATIONS}: {rows}"
    return rows


def assert_documented(line, row_words):
    """The row whose symptom cell has `row_words` quotes text that is in `line`."""
    rows = {cell: spans for cell, spans in symptoms().items() if row_words in cell}
    assert rows, f"no Troubleshooting row mentions {row_words!r}: {list(symptoms())}"
    assert any(s.search(line) for spans in rows.values() for s in spans), \
        f"the Troubleshooting row for {row_words!r} quotes nothing of the line the daemon logs: {line}\n" \
        f"row: {list(rows)}"


def start_failure(binary, base, listener_address, http_address, as_nobody=False, state_mode=0o777, wrapper=()):
    """Starts mailflowd on a config with one listener, expecting it to refuse; returns its startup_failed line."""
    state = base / "state"
    state.mkdir(exist_ok=True)
    state.chmod(state_mode)
    cfg = harness.default_config(state, 0, [{"name": "inbound", "address": listener_address, "upstream": "store"}],
                                 [{"name": "store", "address": "127.0.0.1:9", "tls": "none"}])
    cfg["http"] = {"address": http_address}
    config = base / "mailflowd.yaml"
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    config.chmod(0o644)
    argv = [binary, "--config", str(config)]
    if as_nobody:
        argv = [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"] + argv
    argv = [*wrapper, *argv]
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=20)
    out = p.stdout.decode("utf-8", "replace")
    harness.TRANSCRIPTS.append(f"$ {' '.join(argv)}\n(rc={p.returncode})\n{out}")
    assert p.returncode == 1, f"mailflowd did not refuse to start (exit {p.returncode}):\n{out}"
    lines = [ln for ln in out.splitlines() if "startup_failed" in ln]
    assert lines, f"no startup_failed line:\n{out}"
    return lines[0]


@pytest.fixture
def base():
    directory = Path(tempfile.mkdtemp(prefix="mailflowd-trouble-"))  # outside the 0700 pytest basetemp: nobody
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("taken", ["listener", "http"])
def test_an_address_in_use_is_in_the_table(mailflowd_bin, base, taken):
    """Another MTA (here a plain socket) listens on the listener's or http.address's port."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        free = f"127.0.0.1:{harness.free_port()}"
        line = start_failure(mailflowd_bin, base, busy if taken == "listener" else free,
                             busy if taken == "http" else free)
    finally:
        holder.close()
    assert "Address already in use" in line, line
    assert_documented(line, "already in use")


def test_a_privileged_port_without_the_capability_is_in_the_table(mailflowd_bin, base):
    """Port 25 without CAP_NET_BIND_SERVICE (the socket-activation drop-in removes it): as nobody."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv: the daemon runs as nobody, without the capability")
    line = start_failure(mailflowd_bin, base, f"{UNPRIVILEGED}:25", f"127.0.0.1:{harness.free_port()}",
                         as_nobody=True)
    assert "Permission denied" in line, line
    assert_documented(line, "port 25")


def test_a_state_dir_of_another_user_is_in_the_table(mailflowd_bin, base):
    """A state_dir owned by root, 0755: the daemon's user may not write it."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv: the daemon runs as nobody")
    line = start_failure(mailflowd_bin, base, f"127.0.0.1:{harness.free_port()}", f"127.0.0.1:{harness.free_port()}",
                         as_nobody=True, state_mode=0o755)
    assert "state_dir" in line and "Permission denied" in line, line
    assert_documented(line, "not writable: Permission denied")


def test_a_read_only_state_dir_is_in_the_table(mailflowd_bin, base):
    """state_dir on a read-only file system, as ProtectSystem=strict makes every path outside ReadWritePaths=:
    a read-only bind mount of it in a mount namespace of the daemon's own."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare --mount)")
    state = base / "state"
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(state)]
    line = start_failure(mailflowd_bin, base, f"127.0.0.1:{harness.free_port()}", f"127.0.0.1:{harness.free_port()}",
                         wrapper=wrapper)
    assert "state_dir" in line and "Read-only file system" in line, line
    assert_documented(line, "not writable: Read-only file system")
