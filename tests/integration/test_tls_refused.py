"""A handshake refused by a listener's `min_version` is attributed (issue #18 item 5): the `tls_failed` log line and
mailflow_tls_handshake_refused_total{listener, connector, offered} name the connector known before the handshake
(listener, client address, the EHLO name given before STARTTLS) and the highest version the client offered; the
session's own log line keeps that EHLO name.
Real clients: `openssl s_client -tls1 -starttls smtp` (its -name is the EHLO name) and Python's ssl module from
another loopback address."""
import re
import ssl
import subprocess
import types

import pytest

import harness
import hostile_helpers as hh
import report_helpers as rh

REFUSED = "mailflow_tls_handshake_refused_total"


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    sink = sink_factory("store")
    modern, other = harness.free_port(), harness.free_port()
    modern_tls = {"certificates": harness.listener_tls(certs)["certificates"], "min_version": "TLS1.2",
                  "ciphers": "DEFAULT:@SECLEVEL=0"}
    daemon = daemon_factory(
        listeners=[hh.listener("modern", modern, "store", tls=modern_tls),
                   hh.listener("other", other, "store", certs)],
        upstreams=[hh.plain_upstream("store", sink.port)],
        connectors=[
            {"name": "legacy-partner", "type": "partner", "direction": "inbound",
             "match": {"listener": "modern", "ehlo": ["*.legacy.test"]}},
            {"name": "cidr-partner", "type": "partner", "direction": "inbound",
             "match": {"client_cidrs": ["127.0.0.2/32"]}},
            {"name": "elsewhere", "type": "partner", "direction": "inbound", "match": {"listener": "other"}},
        ])
    return types.SimpleNamespace(sink=sink, daemon=daemon, modern=modern)


def tls_failed_lines(daemon):
    return [line for line in daemon.stderr().splitlines() if "tls_failed" in line and "leg=client" in line]


def field(line, name):
    m = re.search(rf'\b{name}=("([^"]*)"|\S*)', line)
    return None if m is None else (m.group(2) if m.group(2) is not None else m.group(1))


def assert_log_names(daemon, seen_before, connector, offered, helo):
    lines = harness.wait_for(lambda: tls_failed_lines(daemon)[seen_before:] or None, timeout=5,
                             what="a tls_failed log line")
    assert len(lines) == 1, f"want one new tls_failed line, got {lines}"
    line = lines[0]
    assert field(line, "connector") == connector, f"connector not named: {line}"
    assert field(line, "offered") == offered, f"offered version not named: {line}"
    assert field(line, "helo") == helo, f"EHLO name before STARTTLS not named: {line}"
    assert field(line, "listener") == "modern", f"listener not named: {line}"
    # The session's one line names the client by the same EHLO name (what an operator greps for).
    session_id = field(line, "id")
    session = harness.wait_for(
        lambda: [x for x in daemon.stderr().splitlines() if " session " in x and field(x, "id") == session_id] or None,
        timeout=5, what="the session line")[0]
    assert field(session, "result") == "tls_failed", session
    assert field(session, "helo") == helo, f"the session line lost the EHLO name given before STARTTLS: {session}"


def test_zeros_exported_for_the_connectors_a_listener_can_match(env):
    m = env.daemon.metrics()
    for connector in ("legacy-partner", "cidr-partner", "internet"):
        for offered in ("TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3", "other", "no_hello"):
            assert harness.series(m, REFUSED, listener="modern", connector=connector, offered=offered), \
                f"{REFUSED}{{listener=modern, connector={connector}, offered={offered}}} is not exported"
    # A connector restricted to another listener cannot be refused on this one.
    assert not harness.series(m, REFUSED, listener="modern", connector="elsewhere")
    assert harness.series(m, REFUSED, listener="other", connector="elsewhere", offered="TLS1.0")


def test_s_client_tls1_refused_names_connector_and_version(env):
    before = env.daemon.metrics()
    seen = len(tls_failed_lines(env.daemon))
    argv = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{env.modern}", "-tls1",
            "-cipher", "DEFAULT:@SECLEVEL=0", "-name", "mx2.legacy.test"]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    assert p.returncode != 0, f"the TLS1.0 handshake should fail on a TLS1.2 listener:\n{p.stdout[-2000:]!r}"
    hh.assert_counter(env.daemon, before, REFUSED, listener="modern", connector="legacy-partner", offered="TLS1.0")
    after = env.daemon.metrics()
    moved = harness.delta(before, after, REFUSED)
    assert sum(moved.values()) == 1, f"exactly one refusal counted:\n{harness.fmt_delta(moved)}"
    hh.assert_counter(env.daemon, before, "mailflow_tls_handshake_failures_total", listener="modern", leg="client")
    assert_log_names(env.daemon, seen, "legacy-partner", "TLS1.0", "mx2.legacy.test")


def refuse_with_python(port, version, ehlo, source=None):
    c = hh.greeted(port, ehlo=ehlo, source=source)
    try:
        assert c.cmd("STARTTLS")[0] == 220
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.starttls(version)
            c.cmd("EHLO " + ehlo)
    finally:
        c.close()


def test_client_address_attributes_and_tls11_is_named(env):
    before = env.daemon.metrics()
    seen = len(tls_failed_lines(env.daemon))
    refuse_with_python(env.modern, "TLS1.1", "mail.unknown.test", source="127.0.0.2")
    hh.assert_counter(env.daemon, before, REFUSED, listener="modern", connector="cidr-partner", offered="TLS1.1")
    assert_log_names(env.daemon, seen, "cidr-partner", "TLS1.1", "mail.unknown.test")


def test_unmatched_client_is_internet(env):
    before = env.daemon.metrics()
    seen = len(tls_failed_lines(env.daemon))
    refuse_with_python(env.modern, "TLS1.0", "mail.unknown.test")
    hh.assert_counter(env.daemon, before, REFUSED, listener="modern", connector="internet", offered="TLS1.0")
    assert_log_names(env.daemon, seen, "internet", "TLS1.0", "mail.unknown.test")


def test_not_a_tls_client_is_no_hello_and_a_modern_client_is_not_counted(env):
    before = env.daemon.metrics()
    c = hh.greeted(env.modern, ehlo="mx1.legacy.test")
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
        assert c.closed_or_error()
    finally:
        c.close()
    hh.assert_counter(env.daemon, before, REFUSED, listener="modern", connector="legacy-partner", offered="no_hello")
    before = env.daemon.metrics()
    n = env.sink.count()
    c = hh.greeted(env.modern, ehlo="mx1.legacy.test")
    try:
        assert c.cmd("STARTTLS")[0] == 220
        assert c.starttls("TLS1.3") == "TLSv1.3"
        assert c.cmd("EHLO mx1.legacy.test")[0] == 250
        code, text = hh.transaction(c, hh.message("modern"))
        assert code == 250, text
    finally:
        c.close()
    env.sink.wait_messages(n + 1)
    moved = harness.delta(before, env.daemon.metrics(), REFUSED)
    assert not moved, f"a successful handshake was counted as refused:\n{harness.fmt_delta(moved)}"


def test_drilldown_says_no_version_for_a_client_that_offered_none(env):
    # A client that sent no ClientHello offered no version: its drill-down row has refused_version null, not "none"
    # (which is the name of plaintext mail in every other column).
    before = env.daemon.metrics()
    c = hh.greeted(env.modern, ehlo="scanner.unknown.test", source="127.0.0.5")
    try:
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
        assert c.closed_or_error()
    finally:
        c.close()
    hh.assert_counter(env.daemon, before, REFUSED, listener="modern", connector="internet", offered="no_hello")
    report = rh.report_json(env.daemon)
    rows = [r for c in report["connectors"] if (c["connector"], c["direction"]) == ("internet", "inbound")
            for r in c["remotes"]["rows"] if r["address"] == "127.0.0.5"]
    assert len(rows) == 1, report["connectors"]
    assert (rows[0]["refused"], rows[0]["refused_version"]) == (1, None), rows[0]
