"""pytest fixtures for the integration tests: the mailflowd binary comes from env MAILFLOWD (set by ctest),
certificates are generated once per session, sinks and daemons are started per module by the test files
through the `sink_factory` / `daemon_factory` fixtures and stopped (SIGTERM, exit code 0 asserted) at the
end of the module. A failing test's report carries the SMTP transcripts and the daemon/sink logs."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import harness
import report_helpers


@pytest.fixture(scope="session")
def mailflowd_bin():
    path = os.environ.get("MAILFLOWD")
    if not path:
        pytest.fail("env MAILFLOWD is not set (ctest sets it to the built mailflowd)", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"MAILFLOWD={path} is not an executable file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    for tool in ("swaks", "openssl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (deploy/dev/deps.sh test)", pytrace=False)
    if subprocess.run(["perl", "-MNet::SSLeay", "-e1"], capture_output=True).returncode != 0:
        pytest.fail("swaks needs Net::SSLeay for --tls: apt-get install libnet-ssleay-perl", pytrace=False)
    return harness.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    return tmp_path_factory.mktemp(Path(request.module.__file__).stem)


@pytest.fixture(scope="module")
def sink_factory(workdir):
    started = []

    def make(name="sink", **kwargs):
        s = harness.Sink(workdir, name=name, **kwargs).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def daemon_factory(workdir, mailflowd_bin):
    """make(listeners, upstreams, connectors=(), **extra) -> started harness.Daemon."""
    started = []

    def make(listeners, upstreams, connectors=(), name="mailflowd", **extra):
        state = workdir / f"{name}-state"
        state.mkdir(exist_ok=True)
        cfg = harness.default_config(state, harness.free_port(), listeners, upstreams, connectors, **extra)
        d = harness.Daemon(mailflowd_bin, workdir, cfg, name=name)
        started.append(d)
        return d.start()

    yield make
    failures = []
    for d in started:
        code = d.stop()
        if d in harness.LIVE:
            harness.LIVE.remove(d)
        if code != 0:
            failures.append(f"{d.name}: exit code after SIGTERM = {code!r}\nstderr:\n{d.log_tail()}")
    assert not failures, "\n".join(failures)


@pytest.fixture(autouse=True)
def _clear_transcripts():
    harness.TRANSCRIPTS.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for t in harness.TRANSCRIPTS:
            rep.sections.append(("SMTP transcript", t if isinstance(t, str) else "\n".join(map(str, t))))
        for live in list(harness.LIVE):
            rep.sections.append((f"{live.name} log (tail)", live.log_tail()))


@pytest.fixture
def utc_day():
    """The UTC day of what the test records and checks (report_helpers.day_clear_of_midnight), taken before the
    test records anything; report_helpers.test_day() says it to the test's helpers."""
    report_helpers.TEST_DAY = report_helpers.day_clear_of_midnight()
    yield report_helpers.TEST_DAY
    report_helpers.TEST_DAY = None
