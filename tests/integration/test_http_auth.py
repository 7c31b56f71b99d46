"""http.basic_auth under password guessing (issue #15 item 5): wrong guesses cost a bcrypt each, which must not
run on the event loop that relays SMTP; they are bounded, backed off per address and counted, while the right
password still works (and, once verified, is answered from the cache without a hash)."""
import base64
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
import warnings
from collections import Counter

import pytest

import harness
import hostile_helpers as hh
import http_helpers as hx

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # noqa: E402  (deprecated in 3.11, still the way to make a $2b$ hash without extra packages)

USER, PASSWORD = "prom", "correct horse"
ATTACKERS = 12


@pytest.fixture(scope="module")
def env(sink_factory, daemon_factory):
    sink = sink_factory("store")
    smtp = harness.free_port()
    # cost 12: about 0.25 s per check here, 0.46 s on the machine of the issue
    password_hash = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2 ** 12))
    assert password_hash.startswith("$2b$12$")
    d = daemon_factory(listeners=[hh.listener("inbound", smtp, "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth",
                       http={"address": f"127.0.0.1:{harness.free_port()}",
                             "basic_auth": {"user": USER, "password_hash": password_hash}},
                       # the round trips below are EHLO and NOOP for seconds on one session: junk without end
                       limits={"max_junk_commands": 0})
    port = int(d.config["http"]["address"].rsplit(":", 1)[1])
    return types.SimpleNamespace(d=d, port=port, smtp=smtp, sink=sink)


def smtp_round_trips(port, seconds):
    """Seconds per EHLO/NOOP round trip over one session, for `seconds`."""
    c = harness.RawSmtp(port, timeout=30)
    times = []
    try:
        code, _ = c.reply()
        assert code == 220
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            code, _ = c.cmd("EHLO client.example.test" if n % 2 == 0 else "NOOP")
            times.append(time.monotonic() - started)
            assert code == 250
            n += 1
            time.sleep(0.02)
        c.cmd("QUIT")
    finally:
        c.close()
    return times


def test_right_password_is_cached(env):
    """A new right credential pays one check; the next requests with it are answered without one."""
    status, _, _, first = hx.get(env.port, "/api/v1/report", source="127.0.7.1", auth=(USER, PASSWORD), timeout=10)
    assert status == 200
    assert first >= 0.1, f"the first request with new credentials took {first:.3f}s: was it checked at all?"
    later = [hx.get(env.port, "/api/v1/report", source="127.0.7.1", auth=(USER, PASSWORD), timeout=10)
             for _ in range(3)]
    assert [r[0] for r in later] == [200] * 3
    assert max(r[3] for r in later) < first / 2, (first, [round(r[3], 3) for r in later])


def test_wrong_guesses_do_not_slow_smtp(env):
    auth = (USER, PASSWORD)
    status, _, _, _ = hx.get(env.port, "/metrics", source="127.0.2.1", auth=auth)
    assert status == 200
    before = hx.rejects(hx.metrics(env.port, source="127.0.2.1", auth=auth))
    quiet = smtp_round_trips(env.smtp, 1.0)

    stop = threading.Event()
    answers = Counter()

    def guess(i):
        n = 0
        while not stop.is_set():
            n += 1
            try:
                status, _, _, _ = hx.get(env.port, "/metrics", source=f"127.0.1.{i + 1}", auth=(USER, f"guess{n}"),
                                         timeout=30)
                answers[status] += 1
            except OSError as e:
                answers[type(e).__name__] += 1
            stop.wait(0.05)

    threads = [threading.Thread(target=guess, args=(i,), daemon=True) for i in range(ATTACKERS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        under = smtp_round_trips(env.smtp, 5.0)
        # the scraper's verified credentials are answered from the cache, not queued behind the guesses
        cached = []
        for _ in range(5):
            try:
                cached.append(hx.get(env.port, "/metrics", source="127.0.2.1", auth=auth, timeout=10))
            except OSError as e:
                cached.append((repr(e), None, None, 10.0))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    median_quiet, median_under = statistics.median(quiet), statistics.median(under)
    print(f"SMTP round trip median: {median_quiet * 1000:.1f} ms quiet, {median_under * 1000:.1f} ms under "
          f"{ATTACKERS} guessers ({len(under)} round trips, max {max(under) * 1000:.0f} ms); answers {dict(answers)}")
    assert median_under < 0.1, (f"SMTP median round trip {median_under * 1000:.0f} ms under password guessing "
                                f"(quiet: {median_quiet * 1000:.1f} ms); answers {dict(answers)}")
    assert [c[0] for c in cached] == [200] * 5, cached
    assert max(c[3] for c in cached) < 0.5, [round(c[3], 3) for c in cached]
    assert answers[200] == 0, answers
    assert answers[401] >= 1, answers  # guesses were really checked (how many depends on the CPU left over)

    after = hx.rejects(hx.metrics(env.port, source="127.0.2.1", auth=auth))
    moved = {r: after[r] - before[r] for r in hx.REASONS}
    print(f"mailflow_http_rejects_total moved: {moved}")
    assert moved["auth_failed"] == answers[401], (moved, answers)
    assert moved["auth_busy"] == answers[503], (moved, answers)
    assert moved["auth_backoff"] == answers[429], (moved, answers)
    assert "http_reject reason=auth_failed client=127.0.1." in env.d.stderr()


def test_failures_back_off_per_address(env):
    """After a few free failures an address gets 429 with Retry-After without a check; other addresses do not."""
    time.sleep(1.5)  # pending checks of the previous test are done
    statuses = []
    for n in range(7):
        status, headers, _, _ = hx.get(env.port, "/metrics", source="127.0.5.1", auth=(USER, f"typo{n}"), timeout=10)
        statuses.append((status, headers.get("Retry-After")))
    assert [s for s, _ in statuses[:6]] == [401] * 6, statuses
    assert statuses[6][0] == 429 and int(statuses[6][1]) >= 1, statuses
    status, _, _, _ = hx.get(env.port, "/metrics", source="127.0.5.2", auth=(USER, PASSWORD), timeout=10)
    assert status == 200


def test_unknown_user_takes_as_long_as_a_wrong_password(env):
    """A wrong user name is answered 401 after about as long as a wrong password: its password is checked too."""
    time.sleep(0.5)
    wrong_password = [hx.get(env.port, "/metrics", source="127.0.6.1", auth=(USER, f"x{n}"), timeout=10)
                      for n in range(3)]
    wrong_user = [hx.get(env.port, "/metrics", source="127.0.6.2", auth=("admin", f"x{n}"), timeout=10)
                  for n in range(3)]
    assert [r[0] for r in wrong_password + wrong_user] == [401] * 6
    t_password = statistics.median(r[3] for r in wrong_password)
    t_user = statistics.median(r[3] for r in wrong_user)
    print(f"401 after {t_password * 1000:.0f} ms (wrong password), {t_user * 1000:.0f} ms (wrong user)")
    assert t_user >= 0.5 * t_password, (t_user, t_password)


def test_a_password_crypt_refuses_tells_no_user_name(env):
    """crypt(3) refuses a password of 512 bytes or more, or one with a NUL, at once, without a hash. With the right
    user name that was a 401 within milliseconds, while a wrong user name waited as long as the last check took
    (a delay in place of the check): one request told whether a user name was right. And the right user name's
    instant 401s set that delay to nothing, so a wrong user name with any password was then answered at once, a
    wrong password after a check. A wrong user name's password is now checked as the right one's is, so both are
    answered alike."""
    time.sleep(1.5)  # pending checks of the previous tests are done
    check = [hx.get(env.port, "/metrics", source="127.0.7.111", auth=(USER, f"y{n}"), timeout=10)[3]
             for n in range(2)]
    refused = ("z" * 600, "nul\0byte")
    times = {}
    for user, source in (("admin", "127.0.7.112"), (USER, "127.0.7.113")):
        answers = [hx.get(env.port, "/metrics", source=source, auth=(user, password), timeout=10)
                   for password in refused]
        assert [a[0] for a in answers] == [401, 401], (user, [a[0] for a in answers])
        times[user] = [a[3] for a in answers]
    status, _, _, after = hx.get(env.port, "/metrics", source="127.0.7.118", auth=("admin", "y9"), timeout=10)
    assert status == 401
    t_check = statistics.median(check)
    print(f"a check: {t_check * 1000:.0f} ms; 401 to the passwords crypt refuses: right user "
          f"{[round(t * 1000) for t in times[USER]]} ms, wrong user {[round(t * 1000) for t in times['admin']]} ms; "
          f"then a wrong user name with another password: {after * 1000:.0f} ms")
    for right, wrong in zip(times[USER], times["admin"]):
        assert abs(wrong - right) < 0.5 * t_check, (f"right user {right:.3f}s, wrong user {wrong:.3f}s, "
                                                    f"a check {t_check:.3f}s: the timing tells the user name")
    assert after >= 0.25 * t_check, (f"a wrong user name answered after {after:.3f}s, a wrong password after "
                                     f"{t_check:.3f}s")


def test_concurrent_wrong_user_names_wait_in_line_as_wrong_passwords(env):
    """Four guesses sent at once wait for one another on the one password thread: their 401s come a check apart.
    Four with a wrong user name came all at once (each waited a check's time on a timer of its own, for no check
    queued before it), so four requests at once told whether a user name was right. Counted in checks, not
    seconds: the spread of the four answers against the time of one check."""
    def spread(user, source):
        time.sleep(1.5)  # the password thread is idle
        barrier = threading.Barrier(4)
        answers = [None] * 4

        def ask(i):
            barrier.wait(5)
            started = time.monotonic()
            status = hx.get(env.port, "/metrics", source=source, auth=(user, f"w{i}"), timeout=30)[0]
            answers[i] = (status, started, time.monotonic())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert [a[0] for a in answers] == [401] * 4, (user, answers)
        first_sent = min(a[1] for a in answers)
        done = sorted(a[2] - first_sent for a in answers)
        return done[0], done[-1] - done[0]

    first_password, spread_password = spread(USER, "127.0.7.114")
    first_user, spread_user = spread("admin", "127.0.7.115")
    print(f"4 at once: wrong password first 401 after {first_password * 1000:.0f} ms, the last "
          f"{spread_password * 1000:.0f} ms later; wrong user {first_user * 1000:.0f} ms, "
          f"{spread_user * 1000:.0f} ms later")
    # Checked one after another, the last of four comes some three checks after the first (two at least, on a
    # busy machine); the four wrong user names' came within a millisecond before.
    assert spread_password >= first_password, (first_password, spread_password)
    assert spread_user >= 0.25 * spread_password, (f"4 wrong user names answered within {spread_user:.3f}s, "
                                                   f"4 wrong passwords within {spread_password:.3f}s")


def test_probes_need_no_credentials(env):
    """The kubelet's probes (deploy/kubernetes/deployment.yaml) and HAProxy's `option httpchk GET /readyz`
    (docs/scaling.md) send no credentials: /healthz and /readyz answer them, and say nothing of the data."""
    for path in ("/healthz", "/readyz"):
        status, _, body, _ = hx.get(env.port, path, source="127.0.7.9")
        assert (status, body) == (200, b"ok"), (path, status, body)
    status, _, _, _ = hx.get(env.port, "/readyz?x", source="127.0.7.9")
    assert status == 200
    for path in ("/metrics", "/", "/readyz/", "/api/v1/report", "/%6Detrics", "/api/v1/report%2Ecsv",
                 "/healthz/../metrics", "/healthz/%2E%2E/metrics", "/readyz/../api/v1/report"):
        assert hx.get(env.port, path, source="127.0.7.9")[0] == 401, path
    # The exemption and the routes see one spelling of the path: /%68ealthz is /healthz (RFC 3986 6.2.2.2), and
    # so is /metrics/../healthz (6.2.2.3).
    for path in ("/%68ealthz", "/metrics/../healthz", "/./healthz"):
        status, _, body, _ = hx.get(env.port, path, source="127.0.7.9")
        assert (status, body) == (200, b"ok"), (path, status, body)


@pytest.mark.parametrize("user, password_file", [(f"{USER}:{PASSWORD}", False), (f"{USER}:x", True)])
def test_cli_user_with_a_colon_is_refused_before_any_request(env, mailflowd_bin, workdir, user, password_file):
    """RFC 7617 2: a user-id with a colon is invalid, and http.basic_auth.user refuses one. `report --user
    USER:PASSWORD` (curl's form) was sent as the user: the daemon read "prom" and a wrong password, answered 401,
    counted an auth_failed against the administrator's address, and the CLI said "wrong user or password" (exit
    1), the password shown in ps. Refused as bad usage now (exit 2), before any request."""
    before = hx.rejects(hx.metrics(env.port, source="127.0.7.171", auth=(USER, PASSWORD)))
    argv = [str(mailflowd_bin), "report", "--url", f"http://127.0.0.1:{env.port}", "--user", user]
    if password_file:
        path = workdir / "colon-user-password"
        path.write_text(PASSWORD + "\n")
        argv += ["--password-file", str(path)]
    environment = {k: v for k, v in os.environ.items() if k != "MAILFLOWD_PASSWORD"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=environment)
    after = hx.rejects(hx.metrics(env.port, source="127.0.7.171", auth=(USER, PASSWORD)))
    assert after["auth_failed"] == before["auth_failed"], (before, after, done.stderr)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "mailflowd report: --user must contain no ':'" in done.stderr, done.stderr


@pytest.mark.parametrize("order", ["wrong first", "right first"])
def test_two_authorization_headers_are_400(env, order):
    """Authorization is no list (RFC 9110 11.6.2, 5.3): with two, the first was checked and the second ignored,
    so the same request was 401 or 200 by the order of its fields, while a proxy in front that reads the
    other one would disagree. nginx answers 400 (ngx_http_process_unique_header_line); so does mailflowd now,
    saying why, counted as bad_request, before any password check."""
    def field(user, password):
        return b"Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()) + b"\r\n"
    right, wrong = field(USER, PASSWORD), field(USER, "wrong")
    fields = wrong + right if order == "wrong first" else right + wrong
    before = hx.rejects(hx.metrics(env.port, auth=(USER, PASSWORD)))
    reply = hx.raw_request(env.port, b"GET /metrics HTTP/1.1\r\nHost: mailflowd\r\n" + fields + b"\r\n",
                           source="127.0.0.177")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"more than one Authorization header" in reply, reply[:300]
    after = hx.rejects(hx.metrics(env.port, auth=(USER, PASSWORD)))
    assert after["bad_request"] - before["bad_request"] == 1
    assert after["auth_failed"] == before["auth_failed"] and after["auth_missing"] == before["auth_missing"]


def keep_alive_get(conn, path, auth=None):
    """(status, body) of one GET on an open http.client connection (kept alive)."""
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def reload_and_wait(d, http):
    """Writes `http` as the http section, SIGHUP, and waits for the log line of the applied reload."""
    d.config["http"] = http
    d.config_path.write_text(json.dumps(d.config, indent=2) + "\n")
    before = d.stderr().count(" reloaded ")
    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: d.stderr().count(" reloaded ") > before, 5, what="the reload to be applied")


def test_a_reload_applies_to_kept_alive_connections(sink_factory, daemon_factory):
    """A reload that changes the password (one that leaked) or sets basic_auth applies to every request from then
    on, on connections kept alive from before it too: such a connection checked the old password against the
    old hash (and put it back into the cache that the reload had cleared, opening every new connection to it
    as well), or went on without credentials."""
    old, new = "old secret", "new secret"

    def auth_config(password):
        return {"address": address, "basic_auth": {"user": USER, "password_hash": crypt.crypt(
            password, crypt.mksalt(crypt.METHOD_SHA256))}}

    sink = sink_factory("store")
    address = f"127.0.0.1:{harness.free_port()}"
    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth-reload",
                       http=auth_config(old))
    port = int(address.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.8.1", 0))
    try:
        assert keep_alive_get(conn, "/api/v1/report", (USER, old))[0] == 200
        reload_and_wait(d, auth_config(new))
        assert keep_alive_get(conn, "/api/v1/report", (USER, old))[0] == 401
        assert keep_alive_get(conn, "/api/v1/report", (USER, new))[0] == 200
    finally:
        conn.close()
    assert hx.get(port, "/api/v1/report", source="127.0.8.2", auth=(USER, old))[0] == 401

    reload_and_wait(d, {"address": address})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.8.3", 0))
    try:
        assert keep_alive_get(conn, "/api/v1/report")[0] == 200
        reload_and_wait(d, auth_config(new))
        assert keep_alive_get(conn, "/api/v1/report")[0] == 401
    finally:
        conn.close()


@contextlib.contextmanager
def guessing(port, sources):
    """While the block runs, each of `sources` keeps asking for /metrics with a wrong password."""
    stop = threading.Event()

    def guess(source):
        while not stop.is_set():
            try:
                hx.get(port, "/metrics", source=source, auth=(USER, "wrong"), timeout=10)
            except OSError:
                pass

    attackers = [threading.Thread(target=guess, args=(source,), daemon=True) for source in sources]
    for t in attackers:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in attackers:
            t.join(15)


def test_a_reload_that_keeps_basic_auth_keeps_scrapes_answered(sink_factory, daemon_factory):
    """A reload that leaves basic_auth as it was (a renewed certificate, a new connector) cleared the credentials
    cache all the same: Prometheus's next scrape needed a check, and 4 addresses sending wrong passwords kept the
    4 check slots full, so its scrapes got 503 (busy) until one of them won a slot. The verified credentials (and
    the failure records) now survive such a reload; one that changes basic_auth still clears them."""
    sink = sink_factory("store")
    address = f"127.0.0.1:{harness.free_port()}"
    http = {"address": address, "basic_auth": {"user": USER, "password_hash": crypt.crypt(
        PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2 ** 12))}}
    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth-same", http=dict(http))
    port = int(address.rsplit(":", 1)[1])
    prometheus = "127.0.0.124"
    assert hx.get(port, "/metrics", source=prometheus, auth=(USER, PASSWORD), timeout=10)[0] == 200  # cached
    statuses = []
    with guessing(port, [f"127.0.0.{120 + i}" for i in range(4)]):
        time.sleep(0.5)
        reload_and_wait(d, dict(http))
        for _ in range(10):
            statuses.append(hx.get(port, "/metrics", source=prometheus, auth=(USER, PASSWORD), timeout=10)[0])
            time.sleep(0.2)
    assert statuses == [200] * 10, f"scrapes after a reload that kept basic_auth, 4 addresses guessing: {statuses}"
    assert "reason=auth_failed client=127.0.0.120" in d.stderr()


def test_after_a_password_change_a_known_scraper_gets_a_check_slot(sink_factory, daemon_factory):
    """A reload that changes the password clears the cache: Prometheus's first scrape with the new one needs a
    check, and guessers on 4 addresses (on as many as they like, from an IPv6 prefix) kept the 4 check slots
    full, so it got 503 busy for as long as they went on. An address that presented verified credentials within
    the last hour now has one more slot of its own."""
    sink = sink_factory("store")
    address = f"127.0.0.1:{harness.free_port()}"

    def auth_config(password):
        return {"address": address, "basic_auth": {"user": USER, "password_hash": crypt.crypt(
            password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2 ** 12))}}

    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth-changed",
                       http=auth_config("old secret"))
    port = int(address.rsplit(":", 1)[1])
    prometheus = "127.0.0.125"
    assert hx.get(port, "/metrics", source=prometheus, auth=(USER, "old secret"), timeout=10)[0] == 200
    reload_and_wait(d, auth_config(PASSWORD))
    statuses = []
    with guessing(port, [f"127.0.0.{120 + i}" for i in range(4)]):
        time.sleep(0.5)
        for _ in range(6):
            statuses.append(hx.get(port, "/metrics", source=prometheus, auth=(USER, PASSWORD), timeout=10)[0])
            time.sleep(0.2)
        other = hx.get(port, "/metrics", source="127.0.0.126", auth=(USER, PASSWORD), timeout=10)[0]
    assert statuses == [200] * 6, f"scrapes with the new password, 4 addresses guessing: {statuses}"
    # The new credentials are cached now: any address is answered with them, without a check.
    assert other == 200


def test_a_known_scrapers_check_runs_ahead_of_queued_guesses(sink_factory, daemon_factory):
    """The slot kept for an address that logged in recently let Prometheus's check in after a password change, but
    at the back of the password thread's line: it waited for the 4 guesses queued before it, each a whole hash at
    nice 10 (under ASan, beside a busy loop, its scrape timed out after 10 s). Its check now runs ahead of those
    queued for other addresses. Counted, not timed: the guesses answered 401 while the scrape waited are the
    checks that ran before its own (at most the one running when it came, and one answered as it was sent)."""
    sink = sink_factory("store")
    address = f"127.0.0.1:{harness.free_port()}"

    def auth_config(password):
        return {"address": address, "basic_auth": {"user": USER, "password_hash": crypt.crypt(
            password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2 ** 12))}}

    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth-ahead",
                       http=auth_config("first secret"))
    port = int(address.rsplit(":", 1)[1])
    prometheus = "127.0.7.61"
    # 8 addresses: the 4 slots stay full while some of them wait out their backoff (after 5 failures)
    guessers = [f"127.0.7.{62 + i}" for i in range(8)]
    assert hx.get(port, "/metrics", source=prometheus, auth=(USER, "first secret"), timeout=10)[0] == 200
    answers = []  # (when, status) of each guess
    lock = threading.Lock()
    stop = threading.Event()

    def guess(source):
        while not stop.is_set():
            try:
                status = hx.get(port, "/metrics", source=source, auth=(USER, "wrong"), timeout=30)[0]
            except OSError:
                status = None
            with lock:
                answers.append((time.monotonic(), status))
            if status != 401:
                time.sleep(0.02)  # busy or backing off: ask again soon, the slots are to stay full

    def busy_since(since):
        with lock:
            return any(when > since and status == 503 for when, status in answers)

    attackers = [threading.Thread(target=guess, args=(source,), daemon=True) for source in guessers]
    for t in attackers:
        t.start()
    checks_before = []
    try:
        for password in ("second secret", "third secret", "fourth secret"):
            reload_and_wait(d, auth_config(password))  # clears the cache: the scrape needs a check
            since = time.monotonic()
            harness.wait_for(lambda: busy_since(since), 15, interval=0.01, what="the 4 check slots full of guesses")
            sent = time.monotonic()
            status = hx.get(port, "/metrics", source=prometheus, auth=(USER, password), timeout=30)[0]
            answered = time.monotonic()
            assert status == 200, f"the scrape with the new password got {status}"
            with lock:
                checks_before.append(sum(1 for when, s in answers if sent < when < answered and s == 401))
    finally:
        stop.set()
        for t in attackers:
            t.join(35)
    assert max(checks_before) <= 2, f"guesses checked while the known scraper's check waited: {checks_before}"



def test_a_check_that_outlasts_a_reload_is_answered_under_the_new_password(sink_factory, daemon_factory):
    """A reload that changes the password (one that leaked) applies to the next request, and an old password stops
    working at once; a request whose check was queued or running when the reload came was still checked against
    the old hash, and answered 200 after the reload with the old password. Its check now counts only if
    basic_auth is still what it was checked against; else it is checked again under the new one."""
    old, new = "leaked secret", "new secret"
    address = f"127.0.0.1:{harness.free_port()}"

    def auth_config(password, rounds):
        return {"address": address, "basic_auth": {"user": USER, "password_hash": crypt.crypt(
            password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=rounds))}}

    sink = sink_factory("store")
    # cost 15: a check takes some 2 s here, long enough for a reload to come in the middle of it
    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth-midcheck",
                       http=auth_config(old, 2 ** 15))
    port = int(address.rsplit(":", 1)[1])
    answer = {}

    def scrape():
        answer["status"] = hx.get(port, "/api/v1/report", source="127.0.7.116", auth=(USER, old), timeout=60)[0]
        answer["at"] = time.monotonic()

    scraper = threading.Thread(target=scrape)
    scraper.start()
    time.sleep(0.3)
    reload_and_wait(d, auth_config(new, 2 ** 4))
    reloaded = time.monotonic()
    scraper.join(60)
    assert answer["at"] > reloaded, "the check ended before the reload was applied: nothing tested"
    assert answer["status"] == 401, f"the old password after the reload that replaced it: {answer['status']}"
    assert hx.get(port, "/api/v1/report", source="127.0.7.117", auth=(USER, new), timeout=10)[0] == 200
    assert hx.get(port, "/api/v1/report", source="127.0.7.117", auth=(USER, old), timeout=10)[0] == 401


def test_the_exit_does_not_wait_for_the_checks_in_line(sink_factory, daemon_factory):
    """SIGTERM while wrong passwords wait for the password thread: their connections are closed at the stop, but
    each check in line still ran after "stopped", one after the other, and the exit waited for all of them (4
    guesses at $2b$14, some 1.5 s a check here: the exit came 6.6 s after the signal, drain_timeout 1s, with 4
    auth_failed lines after "stopped"). The checks in line are dropped at the stop; the one running ends."""
    address = f"127.0.0.1:{harness.free_port()}"
    password_hash = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2 ** 14))
    started = time.monotonic()
    crypt.crypt("wrong", password_hash)
    check = time.monotonic() - started
    sink = sink_factory("store")
    d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="http-auth-stop",
                       http={"address": address, "basic_auth": {"user": USER, "password_hash": password_hash}},
                       limits={"drain_timeout": "1s"})
    port = int(address.rsplit(":", 1)[1])
    answers = []

    def guess(source):
        try:
            answers.append(hx.get(port, "/metrics", source=source, auth=(USER, "wrong"), timeout=120)[0])
        except OSError as e:  # the stop closes the connection: no answer
            answers.append(type(e).__name__)

    guesses = [threading.Thread(target=guess, args=(f"127.0.7.{161 + i}",)) for i in range(5)]
    for g in guesses:
        g.start()
    harness.wait_for(lambda: 503 in answers, 10, what="the fifth guess refused busy: 4 checks pending")
    signalled = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(120) == 0
    took = time.monotonic() - signalled
    harness.LIVE.remove(d)
    for g in guesses:
        g.join(10)
    after_stop = d.stderr().split(" info stopped ", 1)[1]
    checked = after_stop.count("reason=auth_failed")
    print(f"a check {check:.2f} s here; exit {took:.2f} s after SIGTERM; {checked} checks after 'stopped'; {answers}")
    assert checked <= 1, f"{checked} checks ran after 'stopped' (the exit waited for them: {took:.1f} s)"


def test_an_ipv6_client_is_counted_by_its_64(tmp_path, mailflowd_bin):
    """A host or customer is given a whole /64 (RFC 6177) and picks addresses in it at will (RFC 8981): the password
    backoff and the 16 connections per address were keyed by the full IPv6 address, so a guesser with a /64 went on
    guessing from the next address after each 6 failures (401, never 429) and held connections from 24 addresses
    (24 of 24 answered). Run in a network namespace of its own (unshare -n), whose loopback carries
    fd00:7:161::/64, by http_prefix_inner.py."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespace here: {probe.stderr.decode().strip()}")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "MAILFLOWD": str(mailflowd_bin), "PYTHONPATH": here}
    run = subprocess.run(["unshare", "-n", sys.executable, os.path.join(here, "http_prefix_inner.py"), str(tmp_path)],
                         env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    seen = json.loads(run.stdout.decode().strip().splitlines()[-1])
    print(seen)
    assert seen["first_guesses"] == [401] * 6
    assert seen["guess_from_a_neighbour"] == 429, "a guess from the /64 after its 6 failures was checked (no backoff)"
    answered = seen["connections"].count(200)
    assert answered <= 16 and set(seen["connections"][16:]) <= {503, "reset"}, seen["connections"]
    assert seen["exit"] == 0
