"""Upstream leg: STARTTLS to the sink with `tls: required` and `tls: verify` (ca_file = the test CA), and with
`tls: opportunistic` to sinks capped at each version (TLS1.0 .. TLS1.3), each counted under its own version.
The listeners are `direction: outbound`, so a message counts under the upstream leg's TLS version (the sink
is capped at TLS1.2 while the client leg is plaintext or TLS1.3). `verify` against a sink whose certificate
is not from the CA, and `required` against a sink without STARTTLS, must fail with a 4xx to the client,
count nothing, and move mailflow_upstream_errors_total. An upstream whose TLS is broken (it answers the
ClientHello with garbage) gets the mail in plaintext under `tls: opportunistic` (a new connection without
STARTTLS), and never under `required` or a `min_version`."""
import re
import types

import pytest

import harness
import hostile_helpers as hh
from harness import delta, fmt_delta

MESSAGE = b"From: out@example.test\r\nTo: rcpt@dest.test\r\nSubject: upstream leg\r\n\r\nbody\r\n.dot\r\n"


def name(version, prefix):
    """"TLS1.0" -> "out-tls10": a listener or upstream name for the sink capped at that version."""
    return f"{prefix}-tls{version[3]}{version[5]}"


@pytest.fixture(scope="module")
def env(certs, sink_factory, daemon_factory):
    good = sink_factory("good", tls_cert=certs / "sink.pem", tls_key=certs / "sink.key", tls_max_version="TLS1.2")
    rogue = sink_factory("rogue", tls_cert=certs / "rogue.pem", tls_key=certs / "rogue.key")
    plain = sink_factory("plain")
    # one sink per other version (good is capped at TLS1.2), for the version an opportunistic upstream leg records
    capped = {v: sink_factory(f"max-{v}", tls_cert=certs / "sink.pem", tls_key=certs / "sink.key", tls_max_version=v)
              for v in ("TLS1.0", "TLS1.1", "TLS1.3")}
    ca = str(certs / "ca.pem")
    routes = {  # listener -> (upstream name, sink, tls mode)
        "out-required": ("up-required", good, "required"),
        "out-verify": ("up-verify", good, "verify"),
        "out-rogue": ("up-rogue", rogue, "verify"),
        "out-plain": ("up-plain", plain, "required"),
        **{name(v, "out"): (name(v, "up"), sink, "opportunistic") for v, sink in capped.items()},
    }
    ports = {name: harness.free_port() for name in routes}
    listeners = [{"name": name, "address": f"127.0.0.1:{ports[name]}", "direction": "outbound",
                  "tls": harness.listener_tls(certs), "upstream": up}
                 for name, (up, _, _) in routes.items()]
    upstreams = [{"name": up, "address": f"127.0.0.1:{sink.port}", "tls": mode, "ca_file": ca}
                 for (up, sink, mode) in routes.values()]
    daemon = daemon_factory(listeners=listeners, upstreams=upstreams)
    capped["TLS1.2"] = good
    return types.SimpleNamespace(daemon=daemon, ports=ports, good=good, rogue=rogue, plain=plain, capped=capped)


@pytest.mark.parametrize("listener", ["out-required", "out-verify"])
@pytest.mark.parametrize("client_tls", [None, "tlsv1_3"], ids=["client-plain", "client-TLS1.3"])
def test_outbound_counts_upstream_leg(env, listener, client_tls):
    before = env.daemon.metrics()
    n = env.good.count()
    r = harness.swaks(env.ports[listener], data=MESSAGE, tls=client_tls)
    assert r.rc == 0, f"swaks failed:\n{r}"
    meta, content = env.good.wait_messages(n + 1)[-1]
    assert meta["tls_version"] == "TLSv1.2", f"upstream leg should be TLS1.2 (sink cap), sink saw {meta}"
    headers, rest = harness.split_received(content)
    assert len(headers) == 1 and rest == MESSAGE, f"message altered: {content!r}"
    harness.assert_counted(env.daemon, before, "internet", "outbound", "TLS1.2")


@pytest.mark.parametrize("version", ["TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"])
def test_outbound_counts_every_upstream_version(env, version):
    """tls: opportunistic offers every version: the upstream leg records what the host can do, down to TLS1.0,
    in the message's series and in the upstream leg's mailflow_sessions_total."""
    listener = "out-required" if version == "TLS1.2" else name(version, "out")
    sink = env.capped[version]
    before = env.daemon.metrics()
    n = sink.count()
    r = harness.swaks(env.ports[listener], data=MESSAGE)
    assert r.rc == 0, f"swaks failed:\n{r}"
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["tls_version"] == version.replace("TLS", "TLSv").replace("v1.0", "v1"), meta
    harness.assert_counted(env.daemon, before, "internet", "outbound", version)
    after = harness.wait_moved(env.daemon, before, "mailflow_sessions_total", at_least=2)
    moved = delta(before, after, "mailflow_sessions_total", leg="upstream")
    assert moved == {harness.series_key(leg="upstream", listener=listener, tls_version=version): 1.0}, \
        f"mailflow_sessions_total{{leg=upstream}} moved:\n{fmt_delta(moved)}"


def check_upstream_failure(env, listener, upstream, sink):
    before = env.daemon.metrics()
    conns = sink.connections()
    r = harness.swaks(env.ports[listener], data=MESSAGE)
    replies = r.final_replies()
    assert r.rc != 0, f"the transaction must not succeed:\n{r}"
    assert any(re.match(r"^4\d\d ", x) for x in replies), f"client should get a 4xx (temporary) reply:\n{r}"
    assert not any(x.startswith("250 ") and "queued" in x.lower() for x in replies), str(r)
    assert sink.count() == 0, "a message reached the sink"
    # the upstream was really tried (a refusal before even connecting would not test the TLS policy)
    assert sink.connections() > conns, f"mailflowd never connected to the {sink.name} sink"
    after = harness.assert_not_counted(env.daemon, before)
    errs = delta(before, after, "mailflow_upstream_errors_total", upstream=upstream)
    assert errs, (f"mailflow_upstream_errors_total{{upstream={upstream}}} did not move; all moves:\n"
                  f"{fmt_delta(delta(before, after, 'mailflow_upstream_errors_total'))}")


def test_verify_fails_against_foreign_ca(env):
    check_upstream_failure(env, "out-rogue", "up-rogue", env.rogue)


def test_required_fails_without_starttls(env):
    check_upstream_failure(env, "out-plain", "up-plain", env.plain)


# ------------------------------------------------------------------------------------ broken TLS, plaintext retry
BROKEN = {  # upstream (and listener) name -> what the upstream asks of TLS
    "broken-opportunistic": {"tls": "opportunistic"},
    "broken-minimum": {"tls": "opportunistic", "min_version": "TLS1.2"},
    "broken-required": {"tls": "required"},
}


def declining_sink(conn):
    """An SMTP server that offers STARTTLS and answers it 454 (its certificate is missing, say), then takes mail
    in plaintext."""
    def starttls(_line):
        conn.send(b"454 4.7.0 TLS not available due to local problem\r\n")
        return False

    conn.serve({b"STARTTLS": starttls}, ehlo=b"250-declining.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")


@pytest.fixture(scope="module")
def broken(daemon_factory):
    fake = hh.FakeUpstream("broken-tls", lambda conn: conn.broken_tls_sink())
    declining = hh.FakeUpstream("declining", declining_sink)
    ports = {name: harness.free_port() for name in [*BROKEN, "declining"]}
    listeners = [{"name": name, "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": name}
                 for name, port in ports.items()]
    upstreams = [{"name": name, "address": f"127.0.0.1:{fake.port}", **policy} for name, policy in BROKEN.items()]
    upstreams.append({"name": "declining", "address": f"127.0.0.1:{declining.port}", "tls": "opportunistic"})
    daemon = daemon_factory(listeners=listeners, upstreams=upstreams, name="broken")
    yield types.SimpleNamespace(daemon=daemon, ports=ports, fake=fake, declining=declining)
    fake.stop()
    declining.stop()


def fallback_lines(daemon, upstream):
    return [line for line in daemon.stderr().splitlines()
            if "upstream_tls_fallback" in line and f"upstream={upstream} " in line]


def test_opportunistic_retries_in_plaintext_after_a_failed_handshake(broken):
    """tls: opportunistic, a host that offers STARTTLS and then fails the handshake: the failure is counted as
    before (handshake failure, upstream error tls_failed), logged as upstream_tls_fallback, and the same host
    gets the mail over a new connection without STARTTLS (Postfix's "may" level does the same), counted under
    tls_version none."""
    d, fake, name = broken.daemon, broken.fake, "broken-opportunistic"
    before = d.metrics()
    conns, n = fake.connections(), len(fake.delivered)
    r = harness.swaks(broken.ports[name], data=MESSAGE)
    assert r.rc == 0, f"the message should reach the upstream in plaintext:\n{r}\n{fake.log_tail()}"
    assert len(fake.delivered) == n + 1 and b"Subject: upstream leg" in fake.delivered[-1], fake.log_tail()
    assert fake.connections() == conns + 2, f"want the TLS attempt and one plaintext retry:\n{fake.log_tail()}"
    tls_try, plain_try = fake.received[conns], fake.received[conns + 1]
    assert b"STARTTLS" in tls_try and b"STARTTLS" not in plain_try and b"DATA" in plain_try, fake.log_tail()
    harness.assert_counted(d, before, "internet", "outbound", "none")
    # the retry's upstream leg ends (and counts) when mailflowd sends QUIT after the client's QUIT: the client
    # leg and both upstream legs
    after = harness.wait_moved(d, before, "mailflow_sessions_total", at_least=3)
    hh.assert_counter(d, before, "mailflow_tls_handshake_failures_total", listener=name, leg="upstream")
    hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream=name, reason="tls_failed")
    legs = delta(before, after, "mailflow_sessions_total", leg="upstream")
    assert legs == {harness.series_key(leg="upstream", listener=name, tls_version="none"): 2.0}, fmt_delta(legs)
    lines = harness.wait_for(lambda: fallback_lines(d, name), 5, what="an upstream_tls_fallback line")
    assert " host=127.0.0.1 " in lines[-1] and " reason=" in lines[-1], lines


@pytest.mark.parametrize("name", ["broken-minimum", "broken-required"])
def test_no_plaintext_retry_where_tls_is_asked_for(broken, name):
    """tls: required, and opportunistic with a min_version (no host below it is used): a failed handshake is
    a 451 as before, and the host is not tried again without TLS."""
    d, fake = broken.daemon, broken.fake
    before = d.metrics()
    conns, n = fake.connections(), len(fake.delivered)
    r = harness.swaks(broken.ports[name], data=MESSAGE)
    assert r.rc != 0 and any(x.startswith("451 ") for x in r.final_replies()), str(r)
    hh.assert_counter(d, before, "mailflow_upstream_errors_total", upstream=name, reason="tls_failed")
    harness.assert_not_counted(d, before)
    assert len(fake.delivered) == n, "a message went in plaintext where TLS was asked for"
    assert fake.connections() == conns + 1, f"the host was tried again:\n{fake.log_tail()}"
    assert not fallback_lines(d, name)


def test_opportunistic_starttls_refused_goes_on_in_plaintext_and_says_so(broken):
    """tls: opportunistic, a host that offers STARTTLS and answers it 454: the mail goes on the same connection in
    plaintext (RFC 3207 4.1 lets the client go on), counted under none as before, and logged as
    upstream_tls_fallback with reason=starttls_rejected and what the host said, so that it is seen for what it is
    and not only as tls_version="none"."""
    d, fake, name = broken.daemon, broken.declining, "declining"
    before = d.metrics()
    conns, n = fake.connections(), len(fake.delivered)
    r = harness.swaks(broken.ports[name], data=MESSAGE)
    assert r.rc == 0, f"the message should reach the upstream in plaintext:\n{r}\n{fake.log_tail()}"
    assert len(fake.delivered) == n + 1, fake.log_tail()
    assert fake.connections() == conns + 1, fake.log_tail()
    harness.assert_counted(d, before, "internet", "outbound", "none")
    lines = harness.wait_for(lambda: fallback_lines(d, name), 5, what="an upstream_tls_fallback line")
    assert " reason=starttls_rejected " in lines[-1] and "TLS not available" in lines[-1], lines
    assert " host=127.0.0.1 " in lines[-1] and f" address=127.0.0.1:{fake.port}" in lines[-1], lines
