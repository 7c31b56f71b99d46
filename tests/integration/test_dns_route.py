"""DNS for mx upstreams against a real authoritative server: knotd (tests/tools/dns_server.py) serves
example.net, DNSSEC-signed by knot, and `mailflowd route` (the daemon's own Resolver, plan_mx and
match_connector) says where mail for each recipient goes: MX hosts by preference, equal preferences shuffled,
implicit MX, IPv6 and IPv4 addresses alternating, null MX (556), NXDOMAIN (550), no address (550), an address
literal (550, nothing looked up), a silent
and a stopped DNS server (451 within dns.timeout), a forged trust anchor (bogus, 451), connectors by
recipient domain, and the lookups counted in mailflow_dns_lookups_total."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness
from hostile_helpers import greeted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, SilentServer, TamperingProxy  # noqa: E402

MX_PORT = 2526
ZONE = """$ORIGIN example.net.
$TTL 300
@              SOA   ns hostmaster 1 3600 600 86400 300
@              NS    ns
ns             A     127.0.0.1
; one partner, one MX host
partner-a      MX    10 mx.partner-a
mx.partner-a   A     127.0.0.11
; two MX hosts: the first (preference 10) is down, the second takes the mail
two-mx         MX    20 up.two-mx
two-mx         MX    10 down.two-mx
down.two-mx    A     127.0.0.12
up.two-mx      A     127.0.0.13
; equal preferences are shuffled; 5 always first, 30 always last
shuffle        MX    5  first.shuffle
shuffle        MX    10 a.shuffle
shuffle        MX    10 b.shuffle
shuffle        MX    10 c.shuffle
shuffle        MX    30 last.shuffle
first.shuffle  A     127.0.0.21
a.shuffle      A     127.0.0.22
b.shuffle      A     127.0.0.23
c.shuffle      A     127.0.0.24
last.shuffle   A     127.0.0.25
; no MX: the domain's own addresses (implicit MX)
implicit       A     127.0.0.14
implicit       AAAA  ::1
; a host with two addresses of each family
dual           MX    10 host.dual
host.dual      AAAA  fd00::1
host.dual      AAAA  fd00::2
host.dual      A     127.0.0.15
host.dual      A     127.0.0.16
; RFC 7505 null MX: accepts no mail
nullmx         MX    0 .
; two null MX records (at different preferences): still no host at all
nullmx2        MX    0 .
nullmx2        MX    10 .
; an MX host that does not exist
nohost         MX    10 missing.example.net.
; MX hosts on mailflowd's own listener (127.0.0.1:2587 with port 2587): a loop, or only the better ones tried
loop           MX    10 mx.loop
mx.loop        A     127.0.0.1
; an MX host at the unspecified address: a connect() there reaches this host's loopback (127.0.0.1)
anyaddr        MX    10 mx.anyaddr
mx.anyaddr     A     0.0.0.0
selfpref       MX    10 other.selfpref
selfpref       MX    20 mx.loop
selfpref       MX    30 after.selfpref
other.selfpref A     127.0.0.31
after.selfpref A     127.0.0.32
; the preferred MX host's addresses cannot be looked up now (a zone nobody serves here: SERVFAIL); the next is us
selffail       MX    10 mx.unserved.org.
selffail       MX    20 mx.loop
; four MX hosts whose address queries a proxy drops (they can only time out)
slowmx         MX    10 a.slowmx
slowmx         MX    20 b.slowmx
slowmx         MX    30 c.slowmx
slowmx         MX    40 d.slowmx
a.slowmx       A     127.0.0.41
b.slowmx       A     127.0.0.42
c.slowmx       A     127.0.0.43
d.slowmx       A     127.0.0.44
; seven MX hosts: at most 5 addresses are tried, and no more hosts looked up than give them (h2 has none)
many           MX    10 h1.many
many           MX    20 h2.many
many           MX    30 h3.many
many           MX    40 h4.many
many           MX    50 h5.many
many           MX    60 h6.many
many           MX    70 h7.many
h1.many        A     127.0.0.51
h1.many        AAAA  fd00::51
h3.many        A     127.0.0.53
h4.many        A     127.0.0.54
h5.many        A     127.0.0.55
h6.many        A     127.0.0.56
h7.many        A     127.0.0.57
"""


@pytest.fixture(scope="module")
def knot(workdir):
    server = KnotServer(workdir, {"example.net": ZONE}, dnssec=True).start()
    yield server
    server.stop()


def write_config(workdir, name, dns, connectors=(), mx_port=MX_PORT):
    lines = [
        "listeners:",
        '  - {name: out, address: "127.0.0.1:2587", direction: outbound, upstream: internet}',
        '  - {name: in, address: "127.0.0.1:2525", direction: inbound, upstream: store}',
        "upstreams:",
        f"  - {{name: internet, mx: true, port: {mx_port}}}",
        "  - {name: partner-a-mx, mx: true, port: 2527, tls: required, min_version: TLS1.2}",
        '  - {name: store, address: "127.0.0.1:2600", tls: none}',
        "dns: " + json.dumps(dns),
    ]
    if connectors:
        lines.append("connectors:")
        lines += ["  - " + json.dumps(c) for c in connectors]
    path = Path(workdir) / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def route(mailflowd_bin, config, recipient, *extra, timeout=30):
    started = time.monotonic()
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", recipient, "--format", "json",
                        *extra], capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - started
    assert p.stdout, f"no output (exit {p.returncode}):\n{p.stderr}"
    out = json.loads(p.stdout)
    out["exit"], out["wall"], out["stderr"] = p.returncode, elapsed, p.stderr
    return out


@pytest.fixture(scope="module")
def config(workdir, knot):
    return write_config(workdir, "knot", {"servers": [knot.address], "timeout": "3s",
                                          "trust_anchor_file": str(knot.trust_anchor_file)},
                        connectors=[{"name": "partner-a", "type": "partner", "direction": "outbound",
                                     "match": {"recipient_domains": ["partner-a.example.net"]},
                                     "upstream": "partner-a-mx"},
                                    {"name": "to-dual", "type": "partner", "direction": "outbound",
                                     "match": {"recipient_domains": ["*.example.net"], "sender_domains": ["apps.example"]},
                                     "upstream": "store"}])


def test_mx_host_of_a_partner_and_the_lookups_counted(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@Partner-A.example.net")
    assert r["exit"] == 0, r
    assert r["domain"] == "partner-a.example.net"
    assert (r["connector"], r["connector_matched"], r["upstream"]) == ("partner-a", True, "partner-a-mx")
    assert r["mx_lookup"] == {"status": "hosts", "outcome": "success", "secure": True, "detail": "", "plan": "mx"}
    assert [(h["name"], h["preference"], h["addresses"]) for h in r["hosts"]] == \
        [("mx.partner-a.example.net", 10, ["127.0.0.11"])]
    assert r["attempts"] == ["127.0.0.11:2527"]  # the connector's upstream and its port
    assert r["result"] == "deliver" and r["reply"] == ""
    # mailflow_dns_lookups_total as the daemon exports it: one MX, one A, one AAAA (none there: nodata).
    assert r["dns_lookups"] == {"MX success": 1, "A success": 1, "AAAA nodata": 1}


def test_a_trailing_dot_does_not_route_around_the_connector(mailflowd_bin, config):
    """user@partner-a.example.net. is the same domain as user@partner-a.example.net (the command parser accepts the
    trailing dot, as seen in the wild): it must get the partner's connector and its upstream's TLS policy, not
    fall through to internet's opportunistic TLS."""
    r = route(mailflowd_bin, config, "user@Partner-A.example.net.")
    assert r["domain"] == "partner-a.example.net", r
    assert (r["connector"], r["upstream"]) == ("partner-a", "partner-a-mx"), r
    assert r["attempts"] == ["127.0.0.11:2527"], r


def test_unmatched_recipient_goes_to_the_listeners_mx_upstream(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@two-mx.example.net")
    assert (r["connector"], r["connector_matched"], r["upstream"]) == ("internet", False, "internet")


def test_preference_order_first_host_down_is_still_tried_first(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@two-mx.example.net")
    assert r["exit"] == 0, r
    assert [(h["name"], h["preference"]) for h in r["hosts"]] == [("down.two-mx.example.net", 10),
                                                                   ("up.two-mx.example.net", 20)]
    assert r["attempts"] == [f"127.0.0.12:{MX_PORT}", f"127.0.0.13:{MX_PORT}"]


def test_equal_preferences_are_shuffled_across_runs(mailflowd_bin, config):
    leaders = set()
    middles = set()
    for _ in range(24):  # a given host never leading in 24 runs: (2/3)^24, about 6e-5
        r = route(mailflowd_bin, config, "user@shuffle.example.net")
        assert r["exit"] == 0, r
        names = [h["name"].split(".")[0] for h in r["hosts"]]
        assert names[0] == "first" and names[-1] == "last", names
        assert sorted(names[1:4]) == ["a", "b", "c"], names
        assert [h["preference"] for h in r["hosts"]] == [5, 10, 10, 10, 30]
        leaders.add(names[1])
        middles.add(tuple(names[1:4]))
    assert leaders == {"a", "b", "c"}, middles
    # A fixed seed fixes the order.
    once = route(mailflowd_bin, config, "user@shuffle.example.net", "--seed", "42")
    again = route(mailflowd_bin, config, "user@shuffle.example.net", "--seed", "42")
    assert once["attempts"] == again["attempts"]


def test_implicit_mx_ipv6_first(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@implicit.example.net")
    assert r["exit"] == 0, r
    assert r["mx_lookup"]["outcome"] == "nodata" and r["mx_lookup"]["plan"] == "implicit"
    assert [(h["name"], h["preference"]) for h in r["hosts"]] == [("implicit.example.net", 0)]
    assert r["attempts"] == [f"[::1]:{MX_PORT}", f"127.0.0.14:{MX_PORT}"]
    assert r["dns_lookups"] == {"MX nodata": 1, "A success": 1, "AAAA success": 1}


def test_addresses_alternate_between_families(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@dual.example.net")
    assert r["exit"] == 0, r
    addresses = r["hosts"][0]["addresses"]
    # The families alternate, whatever the order within each (DNS order).
    assert [":" in a for a in addresses] == [True, False, True, False], addresses
    assert sorted(addresses) == ["127.0.0.15", "127.0.0.16", "fd00::1", "fd00::2"]
    assert r["attempts"] == [f"[{a}]:{MX_PORT}" if ":" in a else f"{a}:{MX_PORT}" for a in addresses]


def test_connector_by_recipient_and_sender_domain_with_a_fixed_upstream(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@dual.example.net", "--sender", "app@apps.example")
    assert (r["connector"], r["upstream"], r["mx"]) == ("to-dual", "store", False)
    assert r["attempts"] == ["127.0.0.1:2600"] and r["exit"] == 0
    assert r["dns_lookups"] == {}  # a fixed address needs no DNS


def test_null_mx_is_556(mailflowd_bin, config):
    for domain in ("nullmx", "nullmx2"):
        r = route(mailflowd_bin, config, f"user@{domain}.example.net")
        assert r["exit"] == 3, r
        assert r["mx_lookup"]["status"] == "null_mx" and r["hosts"] == [] and r["attempts"] == [], r
        assert r["result"] == "null_mx" and r["reply"].startswith("556 5.1.10 "), r


def test_nxdomain_is_550_and_validated(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@nope.example.net")
    assert r["exit"] == 3, r
    assert r["mx_lookup"]["status"] == "nxdomain" and r["mx_lookup"]["secure"] is True
    assert r["reply"].startswith("550 5.1.2 ")
    assert r["dns_lookups"] == {"MX nxdomain": 1}


def test_address_literal_is_550_without_a_lookup(mailflowd_bin, config):
    """An mx upstream delivers to a domain's MX hosts: an address literal has none, and is not looked up as a name."""
    r = route(mailflowd_bin, config, "user@[192.0.2.1]")
    assert (r["exit"], r["result"], r["mx_lookup"], r["attempts"]) == (3, "address_literal", None, []), r
    assert r["reply"] == "550 5.1.2 Recipient address rejected: address literal [192.0.2.1] is not routed through " \
                         "MX delivery"
    assert r["dns_lookups"] == {}
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", "user@[IPv6:2001:db8::1]"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 3, p.stderr
    assert "MX lookup:  none (an address literal has no MX hosts)" in p.stdout, p.stdout
    assert "result:     address_literal (550 5.1.2 " in p.stdout, p.stdout
    assert p.stdout.endswith("lookups:    none\n"), p.stdout  # not "0 ms: " and nothing after it


def test_mx_host_without_address_is_550(mailflowd_bin, config):
    r = route(mailflowd_bin, config, "user@nohost.example.net")
    assert r["exit"] == 3, r
    assert r["hosts"][0]["name"] == "missing.example.net"
    assert (r["hosts"][0]["aaaa"], r["hosts"][0]["a"]) == ("nxdomain", "nxdomain")
    assert r["result"] == "no_addresses" and r["reply"].startswith("550 5.1.2 ")


def test_mx_on_our_own_listener_is_a_loop(mailflowd_bin, workdir, knot):
    # Port 2526: 127.0.0.1 is just another host; port 2587 is the "out" listener's: that MX host is us.
    other = write_config(workdir, "other-port", {"servers": [knot.address]})
    assert route(mailflowd_bin, other, "user@loop.example.net")["attempts"] == [f"127.0.0.1:{MX_PORT}"]
    ours = write_config(workdir, "own-port", {"servers": [knot.address]}, mx_port=2587)
    r = route(mailflowd_bin, ours, "user@loop.example.net")
    assert r["exit"] == 3, r
    assert r["hosts"][0]["self"] is True and r["attempts"] == []
    assert r["result"] == "loop" and r["reply"].startswith("554 5.4.6 ")
    # RFC 5321 5.1: only the hosts preferred over ourselves are tried.
    r = route(mailflowd_bin, ours, "user@selfpref.example.net")
    assert r["exit"] == 0, r
    assert [(h["preference"], h["self"], h["skipped"]) for h in r["hosts"]] == \
        [(10, False, False), (20, True, True), (30, False, True)]
    assert r["attempts"] == ["127.0.0.31:2587"]


def test_mx_at_the_unspecified_address_reaches_our_loopback_listener_a_loop(mailflowd_bin, workdir, knot):
    """A hostile domain's MX host at 0.0.0.0: Linux connects that to 127.0.0.1, where the "out" listener is
    (127.0.0.1:2587), so the mail would come back to ourselves: a loop, as for 127.0.0.1 itself."""
    ours = write_config(workdir, "own-port-any", {"servers": [knot.address]}, mx_port=2587)
    r = route(mailflowd_bin, ours, "user@anyaddr.example.net")
    assert r["hosts"][0]["self"] is True and r["attempts"] == [], r
    assert (r["exit"], r["result"]) == (3, "loop"), r
    assert r["reply"].startswith("554 5.4.6 "), r["reply"]


def test_preferred_host_that_failed_to_resolve_is_temporary_not_a_loop(mailflowd_bin, workdir, knot):
    """We are MX 20; the MX 10 host's address lookup failed temporarily: it may well take the mail once DNS
    answers, so the recipient gets 451 4.4.3 (try again), not 554 5.4.6 (a bounce for a DNS hiccup)."""
    ours = write_config(workdir, "own-port-fail", {"servers": [knot.address], "timeout": "2s"}, mx_port=2587)
    r = route(mailflowd_bin, ours, "user@selffail.example.net")
    assert [(h["preference"], h["self"], h["skipped"]) for h in r["hosts"]] == [(10, False, False), (20, True, True)]
    assert r["hosts"][0]["status"] == "failed", r["hosts"][0]
    assert r["attempts"] == []
    assert (r["exit"], r["result"]) == (4, "dns_failure"), r
    assert r["reply"].startswith("451 4.4.3 "), r["reply"]


def test_forged_trust_anchor_is_bogus_and_temporary(mailflowd_bin, workdir, knot):
    forged = Path(workdir) / "forged.ds"
    text = Path(knot.trust_anchor_file).read_text().splitlines()[0]
    digest = text.split()[-1]
    forged.write_text(text[: -len(digest)] + ("0" if digest[0] != "0" else "1") + digest[1:] + "\n")
    cfg = write_config(workdir, "forged", {"servers": [knot.address], "timeout": "3s",
                                           "trust_anchor_file": str(forged)})
    r = route(mailflowd_bin, cfg, "user@partner-a.example.net")
    assert r["exit"] == 4, r
    assert r["mx_lookup"]["outcome"] == "bogus" and r["mx_lookup"]["status"] == "failed"
    assert r["reply"].startswith("451 4.4.3 ")
    assert r["dns_lookups"] == {"MX bogus": 1}


def test_silent_dns_server_times_out_within_dns_timeout(mailflowd_bin, workdir):
    silent = SilentServer()
    try:
        cfg = write_config(workdir, "silent", {"servers": [silent.address], "timeout": "1500ms"})
        r = route(mailflowd_bin, cfg, "user@partner-a.example.net")
    finally:
        silent.close()
    assert r["exit"] == 4, r
    assert r["mx_lookup"] == {"status": "failed", "outcome": "timeout", "secure": False,
                              "detail": "no answer within 1s500ms", "plan": ""}
    assert r["reply"].startswith("451 4.4.3 ")
    assert r["dns_lookups"] == {"MX timeout": 1}
    assert 1.5 <= r["elapsed_ms"] / 1000 < 2.5, r["elapsed_ms"]
    assert r["wall"] < 5.0


def test_mx_hosts_that_time_out_cost_one_dns_timeout_not_one_each(mailflowd_bin, workdir, knot):
    """dns.timeout bounds each lookup; the MX hosts' address lookups run at once, so a domain whose four MX hosts
    never answer costs one dns.timeout before its 451, not four (a hostile domain with many MX hosts would
    otherwise hold the RCPT for N x dns.timeout before any connection is even tried)."""
    hosts = [f"{h}.slowmx.example.net" for h in "abcd"]
    proxy = TamperingProxy(knot.address, drop=hosts)
    try:
        cfg = write_config(workdir, "slowmx", {"servers": [proxy.address], "timeout": "1s"})
        r = route(mailflowd_bin, cfg, "user@slowmx.example.net")
    finally:
        proxy.close()
    assert [h["name"] for h in r["hosts"]] == hosts
    assert all((h["status"], h["aaaa"], h["a"]) == ("failed", "timeout", "timeout") for h in r["hosts"]), r["hosts"]
    assert (r["exit"], r["result"]) == (4, "dns_failure"), r
    # The reply says which host could not be looked up, and why.
    assert r["reply"] == "451 4.4.3 Temporary DNS failure for the MX hosts of slowmx.example.net " \
        "(a.slowmx.example.net: AAAA: no answer within 1s)", r["reply"]
    assert r["dns_lookups"] == {"MX success": 1, "A timeout": 4, "AAAA timeout": 4}
    assert r["elapsed_ms"] / 1000 < 2.0, r["elapsed_ms"]


def test_at_most_five_addresses_and_no_more_hosts_looked_up(mailflowd_bin, config):
    """Postfix's smtp_mx_address_limit (5): h1 (two addresses), h3, h4 and h5 are tried; h2 has no address and does
    not count. h1..h5 are looked up at once (five addresses wanted), h6 and h7 not at all."""
    r = route(mailflowd_bin, config, "user@many.example.net")
    assert r["exit"] == 0, r
    assert [h["name"].split(".")[0] for h in r["hosts"]] == ["h1", "h2", "h3", "h4", "h5"], r["hosts"]
    assert r["not_looked_up"] == ["h6.many.example.net", "h7.many.example.net"] and r["address_limited"], r
    assert r["attempts"] == [f"[fd00::51]:{MX_PORT}", f"127.0.0.51:{MX_PORT}", f"127.0.0.53:{MX_PORT}",
                             f"127.0.0.54:{MX_PORT}", f"127.0.0.55:{MX_PORT}"], r["attempts"]
    assert r["dns_lookups"] == {"MX success": 1, "A success": 4, "AAAA success": 1, "AAAA nodata": 3,
                                "A nxdomain": 1, "AAAA nxdomain": 1}, r["dns_lookups"]
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", "user@many.example.net"],
                       capture_output=True, text=True, timeout=30)
    assert "not looked up: h6.many.example.net, h7.many.example.net\n" in p.stdout, p.stdout
    assert "limit:      at most 5 addresses are tried (smtp_mx_address_limit)\n" in p.stdout, p.stdout


def test_stopped_dns_server_fails_temporarily_within_dns_timeout(mailflowd_bin, workdir):
    stopped = KnotServer(workdir, {"example.net": ZONE}, name="knotd-stopped").start()
    assert stopped.dig("partner-a.example.net", "MX")  # it served...
    stopped.stop()  # ...and is gone: nothing listens on its port any more
    cfg = write_config(workdir, "stopped", {"servers": [stopped.address], "timeout": "2s"})
    r = route(mailflowd_bin, cfg, "user@partner-a.example.net")
    assert r["exit"] == 4, r
    assert r["mx_lookup"]["outcome"] in ("servfail", "timeout"), r
    assert r["reply"].startswith("451 4.4.3 ")
    assert r["elapsed_ms"] / 1000 < 2.5, r["elapsed_ms"]


def test_text_output_names_the_route(mailflowd_bin, config):
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", "user@two-mx.example.net"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "connector:  internet (no connector matched)" in p.stdout
    assert "  1. down.two-mx.example.net  preference 10  127.0.0.12" in p.stdout
    assert f"try:        127.0.0.12:{MX_PORT}, 127.0.0.13:{MX_PORT}" in p.stdout
    assert "result:     deliver" in p.stdout


def test_usage_errors(mailflowd_bin, config):
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "--recipient are required" in p.stderr
    p = subprocess.run([mailflowd_bin, "route", "--config", "/nonexistent.yaml", "--recipient", "a@b"],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 1 and "cannot read the configuration" in p.stderr
    # A listener the file does not have: the message names those it has, as match.listener's error does.
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", "a@example.net",
                        "--listener", "inbound"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert f"no listener named 'inbound' in {config} (its listeners: out, in)" in p.stderr, p.stderr


@pytest.mark.parametrize("recipient, reply", [
    ("<>", "501 5.1.3"),                      # the null path is a sender, never a recipient
    ("user@x\x1b[31mred.example", "500 5.5.2"),  # a terminal escape: the relay refuses the whole line
    ("user name@example.net", "501 5.1.3"),
])
def test_a_recipient_the_relay_refuses_is_not_routed(mailflowd_bin, config, recipient, reply):
    """route answers what the relay would: an address whose RCPT the relay refuses is a usage error, not a route."""
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", recipient],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == ""
    assert "the relay answers RCPT TO:<" in p.stderr and reply in p.stderr, p.stderr
    assert "\x1b" not in p.stderr


def test_a_sender_the_relay_refuses_is_a_usage_error(mailflowd_bin, config):
    p = subprocess.run([mailflowd_bin, "route", "--config", str(config), "--recipient", "user@example.net",
                        "--sender", "a b@apps.example"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "the relay answers MAIL FROM:<a b@apps.example> with 501 5.1.7" in p.stderr, p.stderr


def test_trust_anchor_is_the_one_read_at_start_until_a_reload(daemon_factory, workdir, knot):
    """dns.trust_anchor_file is read once per start or reload: an event loop that makes its resolver later (at its
    first lookup) uses what was read then, not the file as it is now. The anchor is replaced by a forged one after
    the start: lookups stay secure (nullmx.example.net's null MX: 556) until SIGHUP, then they are bogus (451
    4.4.3)."""
    anchor = Path(workdir) / "swapped.ds"
    good = Path(knot.trust_anchor_file).read_text()
    anchor.write_text(good)
    port = harness.free_port()
    d = daemon_factory([{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                         "upstream": "internet"}],
                       [{"name": "internet", "mx": True, "port": MX_PORT}], name="anchor-swap",
                       dns={"servers": [knot.address], "timeout": "3s", "trust_anchor_file": str(anchor)})
    line = good.splitlines()[0]
    digest = line.split()[-1]
    anchor.write_text(line[: -len(digest)] + ("0" if digest[0] != "0" else "1") + digest[1:] + "\n")

    def rcpt():
        c = greeted(port)
        try:
            assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
            return c.cmd("RCPT TO:<user@nullmx.example.net>")
        finally:
            c.close()

    code, text = rcpt()
    assert code == 556 and "5.1.10" in text, f"the anchor read at start must hold until a reload: {text!r}"
    base = harness.value(d.metrics(), "mailflow_config_reloads_total", result="success")
    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(d.metrics(), "mailflow_config_reloads_total", result="success") > base,
                     10, what="the reload")
    code, text = rcpt()
    assert code == 451 and text.startswith("451 4.4.3"), f"after the reload the forged anchor applies: {text!r}"
