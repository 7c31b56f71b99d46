"""The state save never stalls the relay: the files of state_dir are written by a thread of their own, so a slow
disk (here every fsync of a state file sleeps, failpoint state.fsync, and a save comes every half second,
failpoint state.save_interval) leaves SMTP sessions answered at once. A save that comes while the previous one
is still being written is skipped, logged and counted (mailflow_state_errors_total{reason="save_skipped"}),
not queued; at SIGTERM the last save waits for the one in flight, is written, and the daemon exits 0 with the
windows on disk."""
import os
import shutil
import time

import pytest

import harness
import hostile_helpers as hh

FSYNC_SLEEP = 1.0  # seconds per state file: a save of the four files takes about 4 s
PROMPT = 1.0  # a banner + EHLO + message: one fsync sleep (a stalled save holds them 4 s; room for ASan and load)


@pytest.fixture(scope="module")
def env(sink_factory, workdir, mailflowd_bin):
    sink = sink_factory("store")
    started = []

    def make(name, state, failpoints=None):
        port = harness.free_port()
        cfg = harness.default_config(state, harness.free_port(), [hh.listener("in", port, "up")],
                                     [hh.plain_upstream("up", sink.port)])
        d = harness.Daemon(mailflowd_bin, workdir, cfg, name=name)
        started.append(d)
        if failpoints:
            os.environ["MAILFLOWD_FAILPOINTS"] = failpoints
        try:
            d.start()
        finally:
            os.environ.pop("MAILFLOWD_FAILPOINTS", None)
        return d, port

    yield make, sink, workdir
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(timeout=30)
        if d in harness.LIVE:
            harness.LIVE.remove(d)


SLOW = f"state.save_interval=500ms,state.fsync={int(FSYNC_SLEEP * 1000)}ms"


def saving(state):
    """A state file is being written: its temporary file exists (the fsync sleeps with it open)."""
    return any(name.endswith(".state.tmp") for name in os.listdir(state))


def timed_exchange(port, sink):
    """A fresh session's banner, EHLO and one relayed message: seconds until the final 250."""
    started = time.monotonic()
    c = hh.greeted(port, timeout=15)
    try:
        code, text = hh.transaction(c, hh.message("during a save"))
        assert code == 250, f"message refused during a save: {text!r}"
        elapsed = time.monotonic() - started
        c.cmd("QUIT")
    finally:
        c.close()
    return elapsed


def test_sessions_are_answered_promptly_while_the_state_is_written(env):
    make, sink, workdir = env
    state = workdir / "slow-state"
    state.mkdir()
    daemon, port = make("slow", state, SLOW)
    harness.wait_for(lambda: saving(state), 10, 0.01, what="a state save in flight")
    # Sessions all through saves (each file's fsync sleeps FSYNC_SLEEP): every one answered at once.
    times = []
    deadline = time.monotonic() + 3 * FSYNC_SLEEP
    while time.monotonic() < deadline:
        if saving(state):
            times.append(timed_exchange(port, sink))
        time.sleep(0.05)
    assert max(times) < PROMPT, (f"an SMTP exchange waited for the state save: slowest {max(times):.2f}s "
                                 f"(fsync sleeps {FSYNC_SLEEP}s); all: {[round(t, 2) for t in times]}")
    assert len(times) >= 5, f"too few exchanges during saves: {times}"
    print(f"exchanges during saves: {len(times)}, slowest {max(times) * 1000:.0f} ms")
    # A save comes every 500 ms and takes ~4 s: the ones that found it still running were skipped, not queued.
    skipped = harness.value(daemon.metrics(), "mailflow_state_errors_total", reason="save_skipped")
    assert skipped >= 2, f"saves skipped while one was being written: {skipped}"
    assert "state_save_skipped" in daemon.stderr()
    assert harness.value(daemon.metrics(), "mailflow_state_errors_total", reason="save_failed") == 0


def test_stop_during_a_save_waits_for_it_and_saves_last(env):
    make, sink, workdir = env
    state = workdir / "stop-state"
    state.mkdir()
    daemon, port = make("stopping", state, SLOW)
    # Messages counted while a save is being written (its windows were serialized before they came): only the
    # last save, at stop, can bring them to disk.
    harness.wait_for(lambda: saving(state), 10, 0.01, what="a state save in flight")
    delivered = 3
    for _ in range(delivered):
        timed_exchange(port, sink)
    assert saving(state), "the save in flight ended while the messages were sent"
    began = time.monotonic()
    code = daemon.stop(timeout=30)
    took = time.monotonic() - began
    assert code == 0, f"exit code after SIGTERM during a save: {code!r}\n{daemon.log_tail()}"
    # The save in flight finished (at most 4 files x FSYNC_SLEEP), then the last one was written whole.
    assert took >= 4 * FSYNC_SLEEP, f"stopped after {took:.1f}s: the final save cannot have been written"
    assert not saving(state), "a temporary state file was left behind"
    log = daemon.stderr()
    assert log.rfind("stopped") > log.rfind("draining"), log[-3000:]

    # The windows on disk hold the messages: a daemon started on the same state_dir reports them.
    again, _ = make("again", state)
    windows = harness.series(again.metrics(), "mailflow_window_messages", connector="internet",
                             direction="inbound")
    assert sum(windows.values()) == delivered, f"window after restart: {windows}"
    assert again.stop() == 0


def test_a_state_dir_deleted_while_running_is_made_again_by_the_next_save(env):
    """An operator's `rm -rf /var/lib/mailflowd` (or a tmpfiles clean-up) while mailflowd runs: the next save
    makes the directory again (as the start does) instead of failing every minute until a restart and losing
    the windows at stop."""
    make, sink, workdir = env
    state = workdir / "deleted-state"
    state.mkdir()
    daemon, port = make("deleted", state, "state.save_interval=200ms")
    timed_exchange(port, sink)
    harness.wait_for(lambda: (state / "windows.state").exists(), 10, 0.05, what="a first save")
    while state.exists():  # a save caught in the middle of it fails (counted), or makes rmtree fail: again
        shutil.rmtree(state, ignore_errors=True)
    harness.wait_for(lambda: (state / "windows.state").exists(), 10, 0.05,
                     what=f"windows.state written again after state_dir was deleted\n{daemon.log_tail()}")
    # state_dir is still this daemon's: its lock was taken again with the directory (before, it kept its lock on
    # the deleted file, and a second daemon started on the new directory, both writing the same files).
    with pytest.raises(AssertionError, match="is in use by another mailflowd process"):
        make("deleted-second", state)
    assert (state / "mailflowd.lock").read_text() == f"{daemon.proc.pid}\n"
    assert "state_dir_locked_again" in daemon.stderr()
    timed_exchange(port, sink)
    assert daemon.stop(timeout=30) == 0, daemon.log_tail()
    again, _ = make("deleted-again", state)
    windows = harness.series(again.metrics(), "mailflow_window_messages", connector="internet",
                             direction="inbound")
    assert sum(windows.values()) == 2, f"window after restart: {windows}"
    assert again.stop() == 0
