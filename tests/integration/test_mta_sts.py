"""MTA-STS (RFC 8461) end to end with the daemon's own code (`mailflowd mta-sts`): the policy fetched from a real
HTTPS server on loopback (python's ssl, a certificate from the test CA), and the _mta-sts TXT record from a
real authoritative server (knotd). Covers what the MX walk gets: a policy, or a failure as TLS-RPT names it
(sts-policy-fetch-error for redirects, wrong Content-Type, oversized bodies - also one that comes in the same
write as the head - and a slow server;
sts-webpki-invalid for a certificate that does not verify - also one that names the host in its CN only;
sts-policy-invalid), fields given twice and UTF-8 extension values (RFC 8461 3.2), and the cache in state_dir
(a policy that cannot be refreshed is kept until it expires, RFC 8461 5.1; a cached policy is refreshed before it
expires, after a day or half its max_age, RFC 8461 3.3).
(The zone is under example.net, not .test: libunbound answers .test itself with NXDOMAIN, RFC 6761.)"""
import http.server
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, SilentServer  # noqa: E402

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.ok.policy.example.net\r\nmx: *.mail.ok.policy.example.net\r\nmax_age: 86400\r\n"
# What each policy domain's server does (chosen by the Host header, so one server serves them all).
BEHAVIOUR = {
    "mta-sts.ok.policy.example.net": ("200", "text/plain; charset=utf-8", POLICY),
    "mta-sts.lf.policy.example.net": ("200", "text/plain", "version: STSv1\nmode: testing\nmx: mx.lf.policy.example.net\nmax_age: 600\n"),
    "mta-sts.redirect.policy.example.net": ("301", "text/plain", ""),
    "mta-sts.html.policy.example.net": ("200", "text/html", POLICY),
    "mta-sts.big.policy.example.net": ("200", "text/plain", POLICY + ("x-pad: " + "p" * 120 + "\r\n") * 600),
    # The same, head and body in one write (one TLS record starts with both): the limit holds there too.
    "mta-sts.bigone.policy.example.net": ("one-write", "text/plain", POLICY + ("x-pad: " + "p" * 120 + "\r\n") * 600),
    "mta-sts.slow.policy.example.net": ("slow", "text/plain", POLICY),
    "mta-sts.invalid.policy.example.net": ("200", "text/plain", "version: STSv1\r\nmode: strict\r\nmax_age: 1\r\n"),
    "mta-sts.missing.policy.example.net": ("404", "text/plain", "not found"),
    # An extension field's value may be UTF-8 (RFC 8461 3.2, sts-policy-vchar).
    "mta-sts.utf8.policy.example.net": ("200", "text/plain; charset=utf-8",
                                        "version: STSv1\nmode: enforce\nmx: mx.utf8.policy.example.net\n"
                                        "max_age: 600\ncomment: Gr\u00fc\u00dfe aus K\u00f6ln\n"),
    # RFC 8461 3.2: a field other than mx given again is ignored, the first counts.
    "mta-sts.dup.policy.example.net": ("200", "text/plain", "version: STSv1\nmode: enforce\nmode: none\n"
                                       "mx: mx.dup.policy.example.net\nmax_age: 600\nmax_age: x\n"),
}
NAMES = sorted(BEHAVIOUR)

ZONE = """$ORIGIN policy.example.net.
$TTL 300
@              SOA   ns hostmaster 1 3600 600 86400 300
@              NS    ns
ns             A     127.0.0.1
_mta-sts.ok    TXT   "v=spf1 -all"
_mta-sts.ok    TXT   "v=STSv1; id=20240101T000000;"
_mta-sts.lf    TXT   "v=STSv1; " "id=split2;"
_mta-sts.two   TXT   "v=STSv1; id=1;"
_mta-sts.two   TXT   "v=STSv1; id=2;"
_mta-sts.bad   TXT   "v=STSv1; id=not-alnum;"
_mta-sts.slow  TXT   "v=STSv1; id=1;"
_mta-sts.dup   TXT   "v=STSv1; id=first; id=second;"
"""


class Handler(http.server.BaseHTTPRequestHandler):
    requests = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        host = self.headers.get("Host", "")
        Handler.requests.append((host, self.path))
        status, content_type, body = BEHAVIOUR.get(host, ("404", "text/plain", ""))
        if status == "slow":
            time.sleep(4)
            status = "200"
        data = body.encode()
        if status == "one-write":
            self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                             "Connection: close\r\n\r\n".encode() + data)
            return
        self.send_response(int(status))
        if status == "301":
            self.send_header("Location", "https://elsewhere.test/.well-known/mta-sts.txt")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(cert, key):
    return harness.https_server(Handler, cert, key)


@pytest.fixture(scope="module")
def policy_cert(certs, workdir):
    """A certificate from the test CA for every mta-sts.<domain> name above."""
    return harness.ca_signed_cert(certs, workdir, "policy", NAMES)


@pytest.fixture(scope="module")
def https(policy_cert):
    server = serve(*policy_cert)
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def wrong_name_https(certs):
    """A valid certificate from the test CA, but for other names (mx.test, localhost)."""
    server = serve(certs / "server.pem", certs / "server.key")
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def cn_only_https(certs, workdir):
    """A certificate from the test CA whose only name is its subject CN, mta-sts.ok.policy.example.net: no
    subjectAltName (RFC 8461 3.3: only DNS-IDs count)."""
    cert = harness.ca_signed_cert(certs, workdir, "cn-only", ["mta-sts.ok.policy.example.net"], san=False)
    server = serve(*cert)
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def wildcard_https(certs, workdir):
    """A certificate from the test CA for *.ok.policy.example.net: a wildcard as the whole left-most label is
    valid for mta-sts.ok.policy.example.net (RFC 8461 3.3)."""
    server = serve(*harness.ca_signed_cert(certs, workdir, "wildcard", ["*.ok.policy.example.net"]))
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def rogue_https(certs):
    """A certificate for the right names from a CA that is not trusted."""
    server = serve(certs / "rogue.pem", certs / "rogue.key")
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def knot(workdir):
    server = KnotServer(workdir, {"policy.example.net": ZONE}).start()
    yield server
    server.stop()


def write_config(path, state, certs, dns_server, dns_timeout):
    """The commands' configuration: an enforce mx upstream, `dns_server` as the resolver, state in `state`."""
    state.mkdir(exist_ok=True)
    path.write_text("\n".join([
        f"state_dir: {state}",
        "listeners:",
        '  - {name: out, address: "127.0.0.1:2587", direction: outbound, upstream: internet}',
        "upstreams:",
        "  - {name: internet, mx: true, mta_sts: enforce}",
        "dns: " + json.dumps({"servers": [dns_server], "timeout": dns_timeout}),
        "mta_sts: " + json.dumps({"ca_file": str(certs / "ca.pem"), "fetch_timeout": "1500ms"}),
    ]) + "\n")
    return path


@pytest.fixture(scope="module")
def config(workdir, certs, knot):
    return write_config(workdir / "mta-sts.yaml", workdir / "state", certs, knot.address, "3s")


def mta_sts(mailflowd_bin, config, domain, *extra):
    started = time.monotonic()
    p = subprocess.run([mailflowd_bin, "mta-sts", "--config", str(config), "--domain", domain, *extra],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout, f"no output (exit {p.returncode}):\n{p.stderr}"
    out = json.loads(p.stdout)
    out["exit"], out["wall"], out["stderr"] = p.returncode, time.monotonic() - started, p.stderr
    return out


def fetch(mailflowd_bin, config, domain, connect):
    return mta_sts(mailflowd_bin, config, domain, "--fetch-only", "--connect", connect)


def test_policy_fetched_verified_and_parsed(mailflowd_bin, config, https):
    Handler.requests.clear()
    r = fetch(mailflowd_bin, config, "OK.policy.example.net", https)
    assert r["exit"] == 0, r
    assert r["fetch"] == "ok"
    assert r["policy"] == {"mode": "enforce", "max_age": 86400, "mx": ["mx1.ok.policy.example.net", "*.mail.ok.policy.example.net"]}
    assert Handler.requests == [("mta-sts.ok.policy.example.net", "/.well-known/mta-sts.txt")]
    lf = fetch(mailflowd_bin, config, "lf.policy.example.net", https)
    assert lf["policy"] == {"mode": "testing", "max_age": 600, "mx": ["mx.lf.policy.example.net"]}
    utf8 = fetch(mailflowd_bin, config, "utf8.policy.example.net", https)
    assert (utf8["exit"], utf8["fetch"]) == (0, "ok"), utf8
    assert utf8["policy"] == {"mode": "enforce", "max_age": 600, "mx": ["mx.utf8.policy.example.net"]}


@pytest.mark.parametrize("domain, detail", [
    ("redirect.policy.example.net", "answered 301 (redirects are not followed)"),
    ("missing.policy.example.net", "answered 404"),
    ("html.policy.example.net", "is not text/plain: \"text/html\""),
    ("big.policy.example.net", "policy larger than 64 KiB"),
    ("bigone.policy.example.net", "policy larger than 64 KiB"),
])
def test_fetch_errors(mailflowd_bin, config, https, domain, detail):
    r = fetch(mailflowd_bin, config, domain, https)
    assert r["exit"] == 3, r
    assert r["fetch"] == "fetch_error"
    assert r["policy"] is None
    assert detail in r["detail"]


def test_invalid_policy(mailflowd_bin, config, https):
    r = fetch(mailflowd_bin, config, "invalid.policy.example.net", https)
    assert (r["exit"], r["fetch"], r["policy"]) == (3, "invalid", None)
    assert "mode must be enforce, testing or none" in r["detail"]


def test_slow_server_is_bounded_by_fetch_timeout(mailflowd_bin, config, https):
    r = fetch(mailflowd_bin, config, "slow.policy.example.net", https)
    assert (r["exit"], r["fetch"]) == (3, "fetch_error"), r
    assert r["detail"] == "timed out reading the policy from mta-sts.slow.policy.example.net", r
    assert 1400 <= r["elapsed_ms"] < 3500


def test_fetch_with_no_descriptor_left_is_a_local_error(mailflowd_bin, config, https):
    """A fetch that cannot make its socket (RLIMIT_NOFILE reached: EMFILE) failed for a reason of this host's, not
    the domain's: "local_error", exit 4, in the system's words; never an sts-policy-fetch-error (exit 3), which the
    relay would report to the domain. The limit is raised one descriptor at a time from where the configuration
    cannot even be read: the first run that gets as far as the fetch has none left for its socket."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    Handler.requests.clear()
    runs = []
    for limit in range(4, 64):
        p = subprocess.run([mailflowd_bin, "mta-sts", "--config", str(config), "--domain", "ok.policy.example.net",
                            "--fetch-only", "--connect", https], capture_output=True, text=True, timeout=30,
                           preexec_fn=lambda n=limit: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
        if p.returncode == 1 and not p.stdout:
            continue  # the configuration (or the CA file it names) could not be read yet
        runs.append((limit, p.returncode, json.loads(p.stdout) if p.stdout else p.stderr))
        if p.returncode == 0:
            break
    assert runs and runs[-1][1] == 0, f"never fetched the policy: {runs}"
    short = [(limit, code, out) for limit, code, out in runs if code != 0]
    assert short, f"the first run past the configuration fetched the policy: {runs}"
    for limit, code, out in short:
        assert (code, out["fetch"]) == (4, "local_error"), f"RLIMIT_NOFILE {limit}: {out}"
        assert "Too many open files" in out["detail"], f"RLIMIT_NOFILE {limit}: {out}"
    assert len(Handler.requests) == 1, Handler.requests


def test_the_usage_says_what_exit_4_means(mailflowd_bin):
    """--help is where a script's author reads the exit codes: the 4 of a fetch that failed for a reason of this
    host's own (above, and mailflowd(8)) was missing there, which named only the failed TXT lookup."""
    p = subprocess.run([mailflowd_bin, "mta-sts", "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p
    exits = p.stdout[p.stdout.index("exit:"):]
    four = re.sub(r"\s+", " ", exits[exits.index(" 4 "):])
    assert "TXT lookup" in four and "fetch that failed for a reason of this host's own" in four, exits


@pytest.mark.parametrize("server", ["wrong_name_https", "rogue_https", "cn_only_https"])
def test_certificate_that_does_not_verify_is_webpki_invalid(mailflowd_bin, config, server, request):
    r = fetch(mailflowd_bin, config, "ok.policy.example.net", request.getfixturevalue(server))
    assert (r["exit"], r["fetch"], r["policy"]) == (3, "webpki_invalid", None), r


def test_wildcard_certificate_for_the_policy_host_is_valid(mailflowd_bin, config, wildcard_https):
    r = fetch(mailflowd_bin, config, "ok.policy.example.net", wildcard_https)
    assert (r["exit"], r["fetch"]) == (0, "ok"), r


def test_lookup_txt_then_policy_and_the_cache_in_state_dir(mailflowd_bin, config, https, workdir):
    Handler.requests.clear()
    r = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", https, "--state")
    assert r["exit"] == 0, r
    assert (r["mode"], r["id"], r["from_cache"], r["failure"]) == ("enforce", "20240101T000000", False, None)
    assert len(Handler.requests) == 1
    cache = (workdir / "state" / "mta-sts.state").read_text()
    assert cache.startswith("mailflowd-mta-sts 2\nok.policy.example.net\t20240101T000000\t")
    assert cache.endswith("\nend\n"), "a cache file cut at a line end could not be told from a whole one"
    again = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", https, "--state")
    assert (again["mode"], again["from_cache"]) == ("enforce", True), again
    assert len(Handler.requests) == 1  # same id, not expired: not fetched again
    # A multi-string TXT record ("v=STSv1; " "id=split2;") is one record.
    lf = mta_sts(mailflowd_bin, config, "lf.policy.example.net", "--connect", https)
    assert (lf["mode"], lf["id"]) == ("testing", "split2"), lf
    # A field given again, in the TXT record or the policy: the first counts (RFC 8461 3.2).
    dup = mta_sts(mailflowd_bin, config, "dup.policy.example.net", "--connect", https)
    assert (dup["exit"], dup["mode"], dup["id"], dup["failure"]) == (0, "enforce", "first", None), dup
    assert dup["policy"] == {"mode": "enforce", "max_age": 600, "mx": ["mx.dup.policy.example.net"]}, dup


@pytest.mark.parametrize("cached", [False, True])
def test_a_txt_lookup_that_times_out_is_said_and_exits_4(mailflowd_bin, workdir, certs, https, cached):
    """A DNS server that never answers: the relay goes on as without a TXT record (the cached policy, else none),
    but whoever runs the command must not take that fallback for the domain's answer: exit 4 (as `route` exits for
    a temporary DNS failure), the outcome in "txt", and the lookup that failed named on stderr."""
    silent = SilentServer()
    state = workdir / f"silent-state-{cached}"
    path = write_config(workdir / f"mta-sts-silent-{cached}.yaml", state, certs, silent.address, "1s")
    now = int(time.time())
    if cached:
        cache_policy(state, "ok.policy.example.net", "kept1", now - 100, now + 3600, "enforce", 86400)
    try:
        r = mta_sts(mailflowd_bin, path, "ok.policy.example.net", "--connect", https,
                    *(["--state"] if cached else []))
    finally:
        silent.close()
    assert (r["exit"], r["txt"], r["failure"]) == (4, "timeout", None), r
    assert (r["mode"], r["from_cache"], r["id"]) == (("enforce", True, "kept1") if cached else ("none", False, "")), r
    assert "the _mta-sts.ok.policy.example.net TXT lookup failed (timeout" in r["stderr"], r["stderr"]
    assert ("cached under id kept1" if cached else "no policy") in r["stderr"], r["stderr"]
    assert r["wall"] < 10


def test_lookup_failures_as_tlsrpt_names_them(mailflowd_bin, config, https, rogue_https):
    none = mta_sts(mailflowd_bin, config, "nothing.policy.example.net", "--connect", https)
    assert (none["exit"], none["mode"], none["failure"], none["txt"]) == (0, "none", None, "nxdomain"), none
    two = mta_sts(mailflowd_bin, config, "two.policy.example.net", "--connect", https)
    assert (two["exit"], two["mode"], two["failure"]) == (3, "none", "sts-policy-invalid"), two
    bad = mta_sts(mailflowd_bin, config, "bad.policy.example.net", "--connect", https)
    assert (bad["mode"], bad["failure"]) == ("none", "sts-policy-invalid"), bad
    slow = mta_sts(mailflowd_bin, config, "slow.policy.example.net", "--connect", https)
    assert (slow["mode"], slow["failure"]) == ("none", "sts-policy-fetch-error"), slow
    rogue = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", rogue_https)
    assert (rogue["mode"], rogue["failure"]) == ("none", "sts-webpki-invalid"), rogue


def cache_policy(state, domain, policy_id, fetched, expires, mode, max_age, mx="mx1.ok.policy.example.net"):
    """state/mta-sts.state with one cached policy, as the daemon writes it (fetched and expires in Unix time)."""
    (state / "mta-sts.state").write_text(
        "mailflowd-mta-sts 1\n"
        f"{domain}\t{policy_id}\t{fetched}\t{expires}\t"
        f"version: STSv1\tmode: {mode}\tmx: {mx}\tmax_age: {max_age}\n")


@pytest.mark.parametrize("expires_in, mode, from_cache", [(3600, "enforce", True), (-1, "none", False)])
def test_a_policy_that_cannot_be_refreshed_is_kept_until_it_expires(mailflowd_bin, config, workdir, expires_in,
                                                                     mode, from_cache):
    """RFC 8461 5.1: the TXT record names a new id and the fetch fails (nothing listens at --connect): an unexpired
    cached policy stays in force and the failure is reported; an expired one is gone (no policy)."""
    state = workdir / "state"
    now = int(time.time())
    cache_policy(state, "ok.policy.example.net", "old", now - 100, now + expires_in, "enforce", 86400)
    closed = harness.free_port("127.0.0.1")
    r = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", f"127.0.0.1:{closed}", "--state")
    assert (r["exit"], r["mode"], r["from_cache"], r["failure"]) == (3, mode, from_cache,
                                                                     "sts-policy-fetch-error"), r
    assert r["id"] == ("old" if from_cache else ""), r


@pytest.mark.parametrize("age, max_age, refreshed", [
    (100, 7 * 86400, False),         # young: used as cached, the policy host is not asked
    (86400 + 60, 7 * 86400, True),   # older than a day, though valid for six more days
    (1900, 3600, True),              # older than half its max_age (shorter than a day)
])
def test_a_cached_policy_is_refreshed_before_it_expires(mailflowd_bin, config, https, workdir, age, max_age,
                                                        refreshed):
    """RFC 8461 3.3: a cached policy is fetched again before it expires (the TXT record still names its id), so
    that one blocked fetch at expiry does not end the protection. The cached one says mode testing, the policy
    host serves enforce: which one the lookup gives says whether it was refreshed."""
    state = workdir / "state"
    now = int(time.time())
    cache_policy(state, "ok.policy.example.net", "20240101T000000", now - age, now - age + max_age, "testing",
                 max_age)
    Handler.requests.clear()
    r = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", https, "--state")
    assert r["exit"] == 0, r
    assert (r["mode"], r["from_cache"], r["failure"]) == (("enforce", False, None) if refreshed else
                                                          ("testing", True, None)), r
    assert len(Handler.requests) == (1 if refreshed else 0)
    saved = (state / "mta-sts.state").read_text().split("\t")
    assert ("mode: enforce" in saved) == refreshed, saved
    assert int(saved[2]) >= now if refreshed else int(saved[2]) == now - age


def test_a_cached_policy_is_refreshed_without_a_txt_record(mailflowd_bin, config, https, workdir):
    """No _mta-sts record for utf8.policy.example.net (removed, or kept from us): the cached policy stays in force
    until it expires and is refreshed under its own id (its policy host serves enforce, the cache says testing)."""
    state = workdir / "state"
    now = int(time.time())
    cache_policy(state, "utf8.policy.example.net", "cached1", now - 86460, now + 86400, "testing", 172860,
                 mx="mx.utf8.policy.example.net")
    r = mta_sts(mailflowd_bin, config, "utf8.policy.example.net", "--connect", https, "--state")
    assert (r["exit"], r["mode"], r["from_cache"], r["id"], r["failure"]) == (0, "enforce", False, "cached1", None), r


def test_a_refresh_that_fails_keeps_the_cached_policy(mailflowd_bin, config, workdir):
    """The refresh of a day-old policy fails (nothing listens at --connect): the cached policy stays in force
    and the failure is reported (RFC 8461 5.1)."""
    state = workdir / "state"
    now = int(time.time())
    cache_policy(state, "ok.policy.example.net", "20240101T000000", now - 90000, now + 86400, "enforce", 176400)
    closed = harness.free_port("127.0.0.1")
    r = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", f"127.0.0.1:{closed}", "--state")
    assert (r["exit"], r["mode"], r["from_cache"], r["id"], r["failure"]) == (
        3, "enforce", True, "20240101T000000", "sts-policy-fetch-error"), r


def test_corrupt_cache_is_moved_aside(mailflowd_bin, config, https, workdir):
    state = workdir / "state"
    (state / "mta-sts.state").write_text("garbage\n")
    r = mta_sts(mailflowd_bin, config, "ok.policy.example.net", "--connect", https, "--state")
    assert r["mode"] == "enforce" and not r["from_cache"], r
    assert "is unusable" in r["stderr"] and "moved to" in r["stderr"]
    assert any(p.name.startswith("mta-sts.state.corrupt-") for p in state.iterdir())
    assert (state / "mta-sts.state").read_text().startswith("mailflowd-mta-sts 2\n")


def test_domain_is_taken_as_the_relay_takes_it_from_rcpt(mailflowd_bin, config, https):
    """The relay looks a policy up for the domain of an RCPT address: lower-cased, without a trailing dot."""
    Handler.requests.clear()
    r = fetch(mailflowd_bin, config, "OK.policy.example.net.", https)
    assert (r["exit"], r["fetch"], r["domain"]) == (0, "ok", "ok.policy.example.net"), r
    assert Handler.requests == [("mta-sts.ok.policy.example.net", "/.well-known/mta-sts.txt")]


@pytest.mark.parametrize("domain, says", [
    ("ex\x1bample.net", "ex\\x1bample.net"),  # the relay refuses the RCPT: no policy is ever looked up for it
    ("a b.example.net", "a b.example.net"),
    ("[192.0.2.1]", "an address literal"),     # not routed through MX delivery
])
def test_a_domain_the_relay_never_looks_up_is_a_usage_error(mailflowd_bin, config, domain, says):
    p = subprocess.run([mailflowd_bin, "mta-sts", "--config", str(config), "--domain", domain],
                       capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stdout) == (2, ""), (p.stdout, p.stderr)
    assert says in p.stderr and "\x1b" not in p.stderr, p.stderr
