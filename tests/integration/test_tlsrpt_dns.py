"""The TLS report of a domain whose _smtp._tls record cannot be had for a while: knotd serves the zone behind a
proxy (tests/tools/dns_server.py TamperingProxy) that stops answering the record's queries when told (a lookup
that can only time out, as in a DNS outage or under a resolver's SERVFAIL); the MX host is a real aiosmtpd sink
with STARTTLS on 127.0.0.219. A session whose lookup failed goes to the rua the domain's record named for the
day's earlier sessions; the first session of a day whose lookup fails has no rua to go to and is not recorded.
A session to a domain past the store's 10,000 domains of the day is in no report, and counted."""
import json
import sys
from pathlib import Path

import pytest

import harness
import report_helpers as rh
from hostile_helpers import deliver_to

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, TamperingProxy  # noqa: E402

# The TLS reports asked for are those of the UTC day each test began on (report_helpers.day_clear_of_midnight).
pytestmark = pytest.mark.usefixtures("utc_day")

ORIGIN = "rptdns.example.net"
MX = "127.0.0.219"
RUA = "mailto:tls-reports@example.org"
# TTL 0 on the _smtp._tls records: every route asks the proxy again, none is answered from the resolver's cache.
ZONE = f"""$ORIGIN {ORIGIN}.
$TTL 300
@                  SOA   ns hostmaster 1 3600 600 86400 300
@                  NS    ns
ns                 A     127.0.0.1
mx                 A     {MX}
flaky              MX    10 mx
_smtp._tls.flaky 0 TXT   "v=TLSRPTv1; rua={RUA}"
down               MX    10 mx
_smtp._tls.down  0 TXT   "v=TLSRPTv1; rua={RUA}"
full               MX    10 mx
_smtp._tls.full    TXT   "v=TLSRPTv1; rua={RUA}"
"""


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    knot = KnotServer(workdir, {ORIGIN: ZONE}).start()
    proxy = TamperingProxy(knot.address)
    try:
        port = harness.free_port("127.0.0.1", MX)
        sink = sink_factory("mx-rptdns", host=MX, port=port, tls_cert=certs / "sink.pem",
                            tls_key=certs / "sink.key")
        listeners = [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                      "upstream": "internet"}]
        daemon = daemon_factory(listeners, [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic"}],
                                name="rptdns", dns={"servers": [proxy.address], "timeout": "1s"})
        yield daemon, proxy, sink, port, daemon_factory
    finally:
        proxy.close()
        knot.stop()


def report(daemon, domain):
    today = rh.test_day()  # the day the test began, before its traffic
    status, body = daemon.get(f"/api/v1/tlsrpt?date={today}")
    assert status == 200, body
    return {r["domain"]: r for r in json.loads(body)["reports"]}.get(domain)


def successes(entry):
    return sum(p["summary"]["total-successful-session-count"] for p in entry["report"]["policies"])


def send(daemon, sink, port, rcpt):
    n = sink.count()
    rcpt_reply, final = deliver_to(port, rcpt, "app@corp.example", "rptdns")
    assert rcpt_reply[0] == 250 and final[0] == 250, (rcpt_reply, final, daemon.log_tail())
    assert sink.wait_messages(n + 1)[-1][0]["tls_version"] in ("TLSv1.2", "TLSv1.3")


def test_a_session_whose_record_lookup_fails_goes_to_the_days_rua(env):
    """Before: a route whose _smtp._tls lookup failed recorded nothing, so a DNS outage (which is when sessions
    fail, and when the domain most wants its reports) took those sessions out of the domain's report: here 1
    session reported of 3."""
    daemon, proxy, sink, port, _ = env
    name = f"_smtp._tls.flaky.{ORIGIN}"
    send(daemon, sink, port, f"a@flaky.{ORIGIN}")
    entry = harness.wait_for(lambda: report(daemon, f"flaky.{ORIGIN}"), 5, what="the day's report")
    assert entry["rua"] == [RUA] and successes(entry) == 1
    proxy.drop.add(name)
    dropped = proxy.dropped
    for n in range(2):
        send(daemon, sink, port, f"b{n}@flaky.{ORIGIN}")
    assert proxy.dropped > dropped, "the record's lookup was answered"
    harness.wait_for(lambda: successes(report(daemon, f"flaky.{ORIGIN}")) == 3, 5,
                     what="the sessions whose lookup failed in the report")
    assert report(daemon, f"flaky.{ORIGIN}")["rua"] == [RUA]
    assert "_smtp._tls lookup failed (timeout): the rua recorded for the domain today are used" in daemon.stderr()


def test_without_a_rua_known_for_the_day_a_failed_lookup_records_nothing(env):
    daemon, proxy, sink, port, _ = env
    proxy.drop.add(f"_smtp._tls.down.{ORIGIN}")
    send(daemon, sink, port, f"c@down.{ORIGIN}")
    harness.wait_for(lambda: "no rua recorded for the domain today" in daemon.stderr(), 5,
                     what="the failed lookup logged")
    assert report(daemon, f"down.{ORIGIN}") is None


def test_a_session_past_the_days_bound_of_domains_is_counted(env, workdir):
    """The store keeps 10,000 domains a day (TlsRptLimits::max_domains_per_day): a session to a further domain
    that day is in no report. It was logged for the first one of the day and counted in a member nobody read:
    the sessions of every further domain that day went unseen (no metric said how many, or that it went on)."""
    _, _, sink, port, daemon_factory = env
    today = rh.test_day()
    state = workdir / "rptfull-state"
    state.mkdir(exist_ok=True)
    (state / "tlsrpt.state").write_text("mailflowd-tlsrpt 1\n" + "".join(
        f"day {today} d{n:05}.example mailto:r@d{n:05}.example\npolicy no-policy-found - - 1 0 0\n"
        for n in range(10000)))
    listeners = [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
                  "upstream": "internet"}]
    daemon = daemon_factory(listeners, [{"name": "internet", "mx": True, "port": port, "tls": "opportunistic"}],
                            name="rptfull", dns={"servers": [env[1].address], "timeout": "1s"})
    dropped = lambda: harness.value(daemon.metrics(), "mailflow_tlsrpt_sessions_dropped_total")  # noqa: E731
    assert dropped() == 0
    listener_port = int(listeners[0]["address"].rsplit(":", 1)[1])
    for n in range(2):
        send(daemon, sink, listener_port, f"e{n}@full.{ORIGIN}")
    harness.wait_for(lambda: dropped() == 2, 5, what="the two sessions counted")
    assert report(daemon, f"full.{ORIGIN}") is None
    assert f"tlsrpt_store_full date={today} domains=10000 dropped=full.{ORIGIN}" in daemon.stderr()
