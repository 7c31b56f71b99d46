"""DANE for outbound SMTP (RFC 7672, issue #19 item 1): an mx upstream with `tls: dane`, a DNSSEC-signed zone
served by a real knotd (it signs the zone itself; its key is libunbound's trust anchor), MX hosts on 127.0.0.x
that are real aiosmtpd sinks, and TLSA records made from the sinks' real certificates.

- DANE-EE(3) SPKI SHA2-256 matching the MX host's key: delivered over TLS without a name check (the sink's
  certificate does not name the MX host), and the session log says "/dane";
- a DANE-EE record that matches nothing: that host is not used (tlsa-invalid); the next MX host (matching)
  takes the mail, and where there is none the RCPT gets 451 4.4.1 naming tls_policy;
- the same signed zone with a trust anchor for another zone only (so its answers are insecure): DANE does not
  apply, the mail goes out with opportunistic TLS;
- secure TLSA records on a host without STARTTLS: TLS is mandatory, the host is not used;
- no TLSA records: opportunistic, delivered in plaintext to a host without STARTTLS;
- only unusable records (PKIX-EE): TLS without authentication (delivered over TLS), and the domain's TLS report
  names those records as the tlsa policy's policy-string;
- DANE-TA(2): a certificate chain from the test CA whose TLSA names the CA, with the MX host name in the leaf
  (delivered), one whose leaf does not name the MX host (not used: DANE-TA keeps the name check; reported as
  certificate-host-mismatch), one whose leaf has expired (not used; certificate-expired) and one whose leaf is
  not valid yet (not used; validation-failure, not tlsa-invalid: the record matched);
- MX host names that are secure CNAMEs (RFC 7672 2.2.3): the TLSA records at the expanded name are used (a
  matching DANE-EE delivers under DANE, a mismatching one keeps the host from being used even though the alias's
  own record would match); where the expanded name has none, the alias's own are; DANE-TA accepts a leaf that
  names only the alias (3.2.2);
- fixed upstreams with tls: dane (host names in the signed zone, one a CNAME): their TLS sessions are counted in
  mailflow_outbound_policy_total under dane or none, as the MX walk counts them, zero series from the start;
- the config checker refuses `tls: dane` without dns.trust_anchor_file."""
import datetime
import hashlib
import json
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

import harness
import report_helpers as rh
from harness import delta, series_key
from hostile_helpers import deliver_to

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dns_server import KnotServer, TamperingProxy  # noqa: E402

# The TLS reports asked for are those of the UTC day each test began on (report_helpers.day_clear_of_midnight).
pytestmark = pytest.mark.usefixtures("utc_day")

SENDER = "app@corp.example"
ADDR = {
    "good": "127.0.0.61",      # TLS; DANE-EE matches its key
    "wrong": "127.0.0.62",     # TLS; its DANE-EE record matches nothing
    "notls": "127.0.0.63",     # no STARTTLS, secure TLSA
    "plain": "127.0.0.64",     # no STARTTLS, no TLSA
    "unusable": "127.0.0.65",  # TLS; only a PKIX-EE record (unusable for SMTP)
    "ta": "127.0.0.66",        # TLS, chain from the test CA, leaf names mx.ta.example.net; DANE-TA names the CA
    "taname": "127.0.0.67",    # TLS, chain from the test CA, leaf names sink.test only; DANE-TA names the CA
    "tacname": "127.0.0.68",   # TLS, chain from the test CA, leaf names the alias mx.tacname.example.net only
    "badkey": "127.0.0.69",    # TLS; only a DANE-EE record whose full key (matching type 0) is no key at all
    "taexp": "127.0.0.115",    # TLS, chain from the test CA, leaf names mx.taexp.example.net but has expired
    "tafuture": "127.0.0.170",  # TLS, chain from the test CA, leaf names mx.tafuture.example.net, valid from tomorrow
}


def der_of(pem_path):
    return ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text().split("-----END CERTIFICATE-----")[0]
                                    + "-----END CERTIFICATE-----\n")


def spki_sha256(pem_path):
    pub = subprocess.run(["openssl", "x509", "-in", str(pem_path), "-noout", "-pubkey"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, check=True,
                         capture_output=True).stdout
    return hashlib.sha256(der).hexdigest()


def expired_ca_signed_chain(certs, directory, name, host, days=(-10, -1)):
    """A leaf for `host` from the test CA valid from and to `days` from now (by default: it expired yesterday), then
    the CA: (chain, key) files in `directory`."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_pem = (Path(certs) / "ca.pem").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((Path(certs) / "ca.key").read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain, key_file = Path(directory) / f"{name}-chain.pem", Path(directory) / f"{name}.key"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return chain, key_file


def zone(port, sink_spki, ca_sha256):
    tlsa = f"_{port}._tcp"
    return f"""$ORIGIN example.net.
$TTL 300
@            SOA   ns hostmaster 1 3600 600 86400 300
@            NS    ns
ns           A     127.0.0.1
good         MX    10 mx.good
mx.good      A     {ADDR['good']}
{tlsa}.mx.good    TLSA  3 1 1 {sink_spki}
wrong        MX    10 mx.wrong
wrong        MX    20 mx.good
mx.wrong     A     {ADDR['wrong']}
{tlsa}.mx.wrong   TLSA  3 1 1 {'00' * 32}
onlywrong    MX    10 mx.wrong
notls        MX    10 mx.notls
mx.notls     A     {ADDR['notls']}
{tlsa}.mx.notls   TLSA  3 1 1 {sink_spki}
plain        MX    10 mx.plain
mx.plain     A     {ADDR['plain']}
unusable     MX    10 mx.unusable
mx.unusable  A     {ADDR['unusable']}
{tlsa}.mx.unusable TLSA 1 1 1 {'00' * 32}
_smtp._tls.unusable TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.net"
badkey       MX    10 mx.badkey
mx.badkey    A     {ADDR['badkey']}
{tlsa}.mx.badkey  TLSA  3 1 0 {'00' * 40}
_smtp._tls.badkey TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.net"
ta           MX    10 mx.ta
mx.ta        A     {ADDR['ta']}
{tlsa}.mx.ta      TLSA  2 0 1 {ca_sha256}
taname       MX    10 mx.taname
mx.taname    A     {ADDR['taname']}
{tlsa}.mx.taname  TLSA  2 0 1 {ca_sha256}
taexp        MX    10 mx.taexp
mx.taexp     A     {ADDR['taexp']}
{tlsa}.mx.taexp   TLSA  2 0 1 {ca_sha256}
tafuture     MX    10 mx.tafuture
mx.tafuture  A     {ADDR['tafuture']}
{tlsa}.mx.tafuture TLSA 2 0 1 {ca_sha256}
; MX host names that are aliases (RFC 7672 2.2.3): TLSA records at the CNAME target first, then at the alias.
alias        MX    10 mx.alias
mx.alias     CNAME host.alias
host.alias   A     {ADDR['good']}
{tlsa}.host.alias TLSA 3 1 1 {sink_spki}
aliaswrong   MX    10 mx.aliaswrong
mx.aliaswrong CNAME host.aliaswrong
host.aliaswrong A  {ADDR['good']}
{tlsa}.host.aliaswrong TLSA 3 1 1 {'00' * 32}
{tlsa}.mx.aliaswrong TLSA 3 1 1 {sink_spki}
aliasfb      MX    10 mx.aliasfb
mx.aliasfb   CNAME host.aliasfb
host.aliasfb A     {ADDR['good']}
{tlsa}.mx.aliasfb TLSA 3 1 1 {sink_spki}
aliasfbwrong MX    10 mx.aliasfbwrong
mx.aliasfbwrong CNAME host.aliasfb
{tlsa}.mx.aliasfbwrong TLSA 3 1 1 {'00' * 32}
tacname      MX    10 mx.tacname
mx.tacname   CNAME host.tacname
host.tacname A     {ADDR['tacname']}
{tlsa}.host.tacname TLSA 2 0 1 {ca_sha256}
; an MX host with A and AAAA records whose AAAA answer a DNS proxy forges (bogus); its DANE-EE record matches nothing
bogus6       MX    10 mx.bogus6
mx.bogus6    A     {ADDR['wrong']}
mx.bogus6    AAAA  fd00::63
{tlsa}.mx.bogus6  TLSA  3 1 1 {'00' * 32}
; a walk of three hosts: one that connects and fails DANE, one whose TLSA lookup a DNS proxy drops (never
; connected to), one that takes the mail
skipped      MX    10 mx.wrong
skipped      MX    20 mx.tlsafail
skipped      MX    30 mx.good
mx.tlsafail  A     {ADDR['good']}
{tlsa}.mx.tlsafail TLSA 3 1 1 {sink_spki}
_smtp._tls.skipped TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.net"
"""


@pytest.fixture(scope="module")
def short_dir():
    path = tempfile.mkdtemp(prefix="mf-dane-")  # knotd's control socket path must stay short
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(certs, workdir, short_dir, sink_factory, daemon_factory):
    port = harness.free_port("127.0.0.1", *ADDR.values())
    ca_sha256 = hashlib.sha256(der_of(certs / "ca.pem")).hexdigest()
    other = "$ORIGIN other.example.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\nns A 127.0.0.1\n"
    knot = KnotServer(short_dir, {"example.net": zone(port, spki_sha256(certs / "sink.pem"), ca_sha256),
                                  "other.example": other}, dnssec=True).start()
    try:
        tls = {"tls_cert": certs / "sink.pem", "tls_key": certs / "sink.key"}
        ta_chain, ta_key = harness.ca_signed_cert(certs, workdir, "mx-ta", ["mx.ta.example.net"], chain=True)
        taname_chain, taname_key = harness.ca_signed_cert(certs, workdir, "mx-taname", ["sink.test"], chain=True)
        tacname_chain, tacname_key = harness.ca_signed_cert(certs, workdir, "mx-tacname", ["mx.tacname.example.net"],
                                                            chain=True)
        taexp_chain, taexp_key = expired_ca_signed_chain(certs, workdir, "mx-taexp", "mx.taexp.example.net")
        tafuture_chain, tafuture_key = expired_ca_signed_chain(certs, workdir, "mx-tafuture",
                                                               "mx.tafuture.example.net", days=(1, 30))
        sinks = {
            "good": sink_factory("mx-good", host=ADDR["good"], port=port, **tls),
            "wrong": sink_factory("mx-wrong", host=ADDR["wrong"], port=port, **tls),
            "notls": sink_factory("mx-notls", host=ADDR["notls"], port=port),
            "plain": sink_factory("mx-plain", host=ADDR["plain"], port=port),
            "unusable": sink_factory("mx-unusable", host=ADDR["unusable"], port=port, **tls),
            "badkey": sink_factory("mx-badkey", host=ADDR["badkey"], port=port, **tls),
            "ta": sink_factory("mx-ta", host=ADDR["ta"], port=port, tls_cert=ta_chain, tls_key=ta_key),
            "taname": sink_factory("mx-taname", host=ADDR["taname"], port=port, tls_cert=taname_chain,
                                   tls_key=taname_key),
            "tacname": sink_factory("mx-tacname", host=ADDR["tacname"], port=port, tls_cert=tacname_chain,
                                    tls_key=tacname_key),
            "taexp": sink_factory("mx-taexp", host=ADDR["taexp"], port=port, tls_cert=taexp_chain, tls_key=taexp_key),
            "tafuture": sink_factory("mx-tafuture", host=ADDR["tafuture"], port=port, tls_cert=tafuture_chain,
                                     tls_key=tafuture_key),
        }
        listeners = [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound",
                      "upstream": "dane-mx"}]
        upstreams = [{"name": "dane-mx", "mx": True, "port": port, "tls": "dane"}]
        connectors = [{"name": "partners", "type": "partner", "direction": "outbound",
                       "match": {"recipient_domains": ["*.example.net", "example.net"]}}]
        daemon = daemon_factory(listeners, upstreams, connectors,
                                dns={"servers": [knot.address], "timeout": "2s",
                                     "trust_anchor_file": str(knot.trust_anchor_file)})
        yield types.SimpleNamespace(daemon=daemon, port=port, sinks=sinks, knot=knot)
    finally:
        knot.stop()


def deliver(env, rcpt):
    """One message to `rcpt`: (RCPT reply, final reply or None)."""
    return deliver_to(env.port, rcpt, SENDER, "dane")


def session_upstreams(daemon):
    """The `upstream` field of every session line so far ("name/TLS1.3/cipher[/dane]")."""
    out = []
    for line in daemon.stderr().splitlines():
        if " session " in line or '"event":"session"' in line:
            for part in line.split():
                if part.startswith("upstream="):
                    out.append(part.split("=", 1)[1].strip('"'))
    return out


def dane_sessions(daemon):
    """How many session lines so far say that DANE authenticated their upstream leg."""
    return sum(u.endswith("/dane") for u in session_upstreams(daemon))


def wait_dane_sessions(daemon, count):
    """The session line is written when the session ends, a moment after the client's QUIT."""
    harness.wait_for(lambda: dane_sessions(daemon) >= count, what=f"{count} session lines saying /dane")
    assert dane_sessions(daemon) == count, session_upstreams(daemon)


def policy_moved(before, after):
    return {(dict(k)["connector"], dict(k)["policy"], dict(k)["result"]): v
            for k, v in delta(before, after, "mailflow_outbound_policy_total").items()}


def attempts(before, after):
    return {dict(k)["result"]: v for k, v in delta(before, after, "mailflow_mx_attempts_total").items()}


def test_dane_ee_match_delivers_over_tls_without_a_name_check(env):
    sink = env.sinks["good"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "alice@good.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["tls_version"] in ("TLSv1.2", "TLSv1.3")
    after = harness.wait_moved(env.daemon, before)
    assert attempts(before, after) == {"success": 1.0}
    assert delta(before, after, "mailflow_dns_lookups_total", type="TLSA", result="success") == \
        {series_key(type="TLSA", result="success"): 1.0}
    harness.wait_for(lambda: any(u.endswith("/dane") for u in session_upstreams(env.daemon)),
                     what="a session line whose upstream leg says /dane")


def test_dane_ee_mismatch_skips_the_host_next_mx_takes_it(env):
    good, wrong = env.sinks["good"], env.sinks["wrong"]
    n_good, n_wrong = good.count(), wrong.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "bob@wrong.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    good.wait_messages(n_good + 1)
    assert wrong.count() == n_wrong, "the host whose certificate matches no TLSA record got the message"
    after = harness.wait_moved(env.daemon, before)
    assert attempts(before, after) == {"tls_policy": 1.0, "success": 1.0}
    assert policy_moved(before, after) == {("partners", "dane", "tlsa-invalid"): 1.0,
                                           ("partners", "dane", "success"): 1.0}


def test_dane_ee_mismatch_on_the_only_mx_is_451_tls_policy(env):
    wrong = env.sinks["wrong"]
    n = wrong.count()
    rcpt, final = deliver(env, "carol@onlywrong.example.net")
    assert rcpt[0] == 451 and "4.4.1" in rcpt[1] and "tls_policy" in rcpt[1], rcpt
    assert final is None and wrong.count() == n


def test_secure_tlsa_makes_tls_mandatory(env):
    notls = env.sinks["notls"]
    n = notls.count()
    rcpt, _ = deliver(env, "dave@notls.example.net")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    assert notls.count() == n


def test_no_tlsa_records_is_opportunistic(env):
    plain = env.sinks["plain"]
    n = plain.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "erin@plain.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    meta, _ = plain.wait_messages(n + 1)[-1]
    assert meta["tls_version"] == "none"
    # No TLSA records: DANE does not govern the session.
    assert policy_moved(before, harness.wait_moved(env.daemon, before)) == {("partners", "none", "success"): 1.0}


def daemon_with_other_anchor(env, daemon_factory, anchor, name):
    """A daemon whose trust anchor (written to `anchor`) is another zone's: every answer for example.net is
    insecure. Its outbound port and the daemon."""
    anchor.write_text(env.knot.ds("other.example"))
    port = harness.free_port()
    daemon = daemon_factory([{"name": f"out-{name}", "address": f"127.0.0.1:{port}", "direction": "outbound",
                              "upstream": f"dane-{name}"}],
                            [{"name": f"dane-{name}", "mx": True, "port": env.port, "tls": "dane"}],
                            name=f"mailflowd-{name}",
                            dns={"servers": [env.knot.address], "timeout": "2s", "trust_anchor_file": str(anchor)})
    return port, daemon


def test_zone_outside_the_trust_anchor_falls_back(env, daemon_factory, workdir):
    """The same signed zone, but a trust anchor for another zone only: every answer for example.net is
    insecure, so its TLSA records (here: one that matches nothing) do not apply, and the mail goes out with
    opportunistic TLS."""
    anchor = Path(workdir) / "other-anchor.ds"
    port, daemon = daemon_with_other_anchor(env, daemon_factory, anchor, "insecure")
    wrong = env.sinks["wrong"]
    n = wrong.count()
    before = daemon.metrics()
    rcpt, final = deliver(types.SimpleNamespace(port=port), "ivan@onlywrong.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert wrong.wait_messages(n + 1)[-1][0]["tls_version"] != "none"
    after = harness.wait_moved(daemon, before)
    assert policy_moved(before, after) == {("internet", "none", "success"): 1.0}


def test_a_trust_anchor_rolled_at_the_same_path_applies_at_the_reload(env, daemon_factory, workdir):
    """dns.trust_anchor_file rewritten in place (a rolled anchor) and SIGHUP: the reload reads the new content,
    as the start does. First an anchor for another zone only: example.net is insecure, DANE does not apply and
    the mail goes out to the host whose TLSA record matches nothing. Then the zone's own anchor at the same path
    and a reload: the answers are secure, DANE applies and that host is not used (the resolvers were kept by
    path, so the old anchor held until a restart)."""
    anchor = Path(workdir) / "rolled-anchor.ds"
    port, daemon = daemon_with_other_anchor(env, daemon_factory, anchor, "anchor-roll")
    wrong = env.sinks["wrong"]
    n = wrong.count()
    rcpt, final = deliver(types.SimpleNamespace(port=port), "rita@onlywrong.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert wrong.wait_messages(n + 1)
    anchor.write_text(Path(env.knot.trust_anchor_file).read_text())
    reloaded = harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
    daemon.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: harness.value(daemon.metrics(), "mailflow_config_reloads_total", result="success")
                     > reloaded, 10, what="the reload")
    rcpt, final = deliver(types.SimpleNamespace(port=port), "rita@onlywrong.example.net")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], (rcpt, final)
    assert wrong.count() == n + 1, "the old trust anchor still held after the reload"


def test_a_forged_address_answer_does_not_turn_dane_off(env, daemon_factory):
    """An attacker on the DNS path forges the MX host's AAAA answer (bogus); its A answer and TLSA records are
    secure. A bogus answer is not used, and it is no reason to treat the host as unsigned: DANE still governs the
    host, whose certificate matches no TLSA record, so it is not used (a downgrade to opportunistic TLS would
    hand the mail to whoever answers on that address)."""
    proxy = TamperingProxy(env.knot.address, ["mx.bogus6.example.net"])
    try:
        port = harness.free_port()
        daemon = daemon_factory([{"name": "out-forged", "address": f"127.0.0.1:{port}", "direction": "outbound",
                                  "upstream": "dane-forged"}],
                                [{"name": "dane-forged", "mx": True, "port": env.port, "tls": "dane"}],
                                name="mailflowd-forged-aaaa",
                                dns={"servers": [proxy.address], "timeout": "2s",
                                     "trust_anchor_file": str(env.knot.trust_anchor_file)})
        wrong = env.sinks["wrong"]
        n = wrong.count()
        before = daemon.metrics()
        rcpt, final = deliver(types.SimpleNamespace(port=port), "olga@bogus6.example.net")
        assert proxy.tampered >= 1
        after = harness.wait_moved(daemon, before, "mailflow_dns_lookups_total")
        assert delta(before, after, "mailflow_dns_lookups_total", type="AAAA", result="bogus") == \
            {series_key(type="AAAA", result="bogus"): 1.0}
        assert rcpt[0] == 451 and "tls_policy" in rcpt[1], (rcpt, final)
        assert wrong.count() == n, "DANE was dropped for the host: its mismatching certificate got the message"
        assert policy_moved(before, daemon.metrics()) == {("internet", "dane", "tlsa-invalid"): 1.0}
    finally:
        proxy.close()


def test_a_host_skipped_at_its_tlsa_lookup_has_no_sending_mta_ip_in_the_tls_report(env, daemon_factory):
    """RFC 8460 4.3: sending-mta-ip is the address of the sending MTA that attempted the STARTTLS connection. The
    walk of skipped.example.net connects to mx.wrong (its certificate matches no TLSA record: tlsa-invalid, from
    our side of that connection), then skips mx.tlsafail, whose TLSA lookup gets no answer (a DNS proxy drops it;
    RFC 7672 2.2: not used, dnssec-invalid), and delivers to mx.good. No connection was made to mx.tlsafail, so
    its failure has no sending-mta-ip; it carried mx.wrong's connection's (127.0.0.1)."""
    proxy = TamperingProxy(env.knot.address, drop=[f"_{env.port}._tcp.mx.tlsafail.example.net"])
    try:
        port = harness.free_port()
        daemon = daemon_factory([{"name": "out-skipped", "address": f"127.0.0.1:{port}", "direction": "outbound",
                                  "upstream": "dane-skipped"}],
                                [{"name": "dane-skipped", "mx": True, "port": env.port, "tls": "dane"}],
                                name="mailflowd-tlsa-skipped",
                                dns={"servers": [proxy.address], "timeout": "1s",
                                     "trust_anchor_file": str(env.knot.trust_anchor_file)})
        good = env.sinks["good"]
        n = good.count()
        rcpt, final = deliver(types.SimpleNamespace(port=port), "pia@skipped.example.net")
        assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
        good.wait_messages(n + 1)
        assert proxy.dropped >= 1
        failures = {d["receiving-mx-hostname"]: d for p in tls_report(daemon, "skipped.example.net")["policies"]
                    for d in p.get("failure-details", [])}
        assert set(failures) == {"mx.wrong.example.net", "mx.tlsafail.example.net"}, failures
        assert failures["mx.wrong.example.net"]["result-type"] == "tlsa-invalid"
        assert failures["mx.wrong.example.net"]["sending-mta-ip"] == "127.0.0.1", failures
        skipped = failures["mx.tlsafail.example.net"]
        assert skipped["result-type"] == "dnssec-invalid", skipped
        assert "sending-mta-ip" not in skipped, skipped
    finally:
        proxy.close()


def test_only_unusable_records_is_tls_without_authentication(env):
    sink = env.sinks["unusable"]
    n = sink.count()
    rcpt, final = deliver(env, "frank@unusable.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    meta, _ = sink.wait_messages(n + 1)[-1]
    assert meta["tls_version"] != "none"


def test_a_malformed_full_key_record_is_unusable_tls_without_authentication(env):
    """A DANE-EE record with matching type 0 carries the full key (or certificate); here its data is no DER key.
    It is malformed, so unusable (RFC 7672 3.1), and with no other record the host gets TLS without
    authentication, as with only PKIX records. (OpenSSL refuses to load such a record; with none loaded it
    verified the certificate against the Web PKI store instead, and the host was not used.)"""
    sink = env.sinks["badkey"]
    n, authenticated = sink.count(), dane_sessions(env.daemon)
    sessions = len(session_upstreams(env.daemon))
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "fred@badkey.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert sink.wait_messages(n + 1)[-1][0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("partners", "dane", "success"): 1.0}
    harness.wait_for(lambda: len(session_upstreams(env.daemon)) > sessions, what="the session line")
    assert dane_sessions(env.daemon) == authenticated, "a session DANE did not authenticate says /dane"


def tls_report(daemon, domain):
    """Today's TLS report (RFC 8460 JSON) of `domain`, as the daemon serves it."""
    date = rh.test_day()  # the day the test began, before its traffic
    reports = json.loads(daemon.get(f"/api/v1/tlsrpt?date={date}")[1])["reports"]
    return next(r["report"] for r in reports if r["domain"] == domain)


@pytest.mark.parametrize("name, record", [("unusable", f"1 1 1 {'00' * 32}"), ("badkey", f"3 1 0 {'00' * 40}")])
def test_the_tls_report_of_unusable_records_names_them(env, name, record):
    """A secure RRset of unusable records (PKIX-EE, a full key that is none) still makes TLS mandatory (RFC 7672
    2.2): the session is under the domain's DANE policy, and its TLS report says which (RFC 8460 4.1: "the DANE
    TLSA record applied ... with each RR entry of the RR set listed"). It said policy-string [], a TLSA policy of
    no record at all, where the domain's administrator needs to see the records that no sender can use."""
    rcpt, final = deliver(env, f"uma@{name}.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    (policy,) = tls_report(env.daemon, f"{name}.example.net")["policies"]
    assert policy["policy"] == {"policy-type": "tlsa", "policy-string": [record],
                                "policy-domain": f"{name}.example.net"}
    assert policy["summary"]["total-successful-session-count"] >= 1
    assert policy["summary"]["total-failure-session-count"] == 0


def test_dane_ta_chain_with_the_mx_name_delivers(env):
    sink = env.sinks["ta"]
    n = sink.count()
    rcpt, final = deliver(env, "grace@ta.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)


@pytest.mark.parametrize("sink_name, rcpt, result", [
    ("taname", "heidi@taname.example.net", "certificate-host-mismatch"),
    ("taexp", "ivy@taexp.example.net", "certificate-expired"),
    ("tafuture", "ida@tafuture.example.net", "validation-failure"),
])
def test_dane_ta_chain_that_matched_but_failed_its_own_checks(env, sink_name, rcpt, result):
    """The DANE-TA record matches the chain's CA, but the certificate fails a check of its own: the leaf does not
    name the MX host (taname), it has expired (taexp; DANE-TA keeps the validity check, RFC 7672 3.1.2), or it is
    valid only from tomorrow (tafuture). Not used, and said as RFC 8460 4.3 (and the IANA registry) name it:
    certificate-host-mismatch for a certificate outside the DANE policy's name constraints, certificate-expired,
    and the general validation-failure for a certificate not valid yet, which has no type of its own. Never
    tlsa-invalid, which says that no record of the RRset matched and sends the domain's administrator to TLSA
    records that are right."""
    sink = env.sinks[sink_name]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt_reply, _ = deliver(env, rcpt)
    assert rcpt_reply[0] == 451 and "tls_policy" in rcpt_reply[1], rcpt_reply
    assert sink.count() == n
    after = harness.wait_moved(env.daemon, before, "mailflow_mx_attempts_total")
    assert policy_moved(before, after) == {("partners", "dane", result): 1.0}


def test_alias_mx_host_uses_the_tlsa_records_of_its_cname_target(env):
    """mx.alias is a secure CNAME to host.alias, which carries the DANE-EE record (mx.alias has none): the TLSA
    base domain is the expanded name (RFC 7672 2.2.3), so DANE authenticates the session."""
    sink = env.sinks["good"]
    n, authenticated = sink.count(), dane_sessions(env.daemon)
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "judy@alias.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert sink.wait_messages(n + 1)[-1][0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("partners", "dane", "success"): 1.0}
    wait_dane_sessions(env.daemon, authenticated + 1)


def test_alias_mx_host_with_a_mismatching_tlsa_at_its_target_is_not_used(env):
    """The CNAME target's DANE-EE record matches nothing; the alias's own (matching) record is not looked at,
    because the target has records: the host is not used."""
    sink = env.sinks["good"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "ken@aliaswrong.example.net")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    assert final is None and sink.count() == n
    after = harness.wait_moved(env.daemon, before, "mailflow_mx_attempts_total")
    assert policy_moved(before, after) == {("partners", "dane", "tlsa-invalid"): 1.0}


def test_alias_mx_host_falls_back_to_its_own_tlsa_when_the_target_has_none(env):
    """host.aliasfb publishes no TLSA records (secure NODATA): the alias's own are used, a matching one
    delivers under DANE and a mismatching one keeps the host from being used."""
    sink = env.sinks["good"]
    n, authenticated = sink.count(), dane_sessions(env.daemon)
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "leo@aliasfb.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("partners", "dane", "success"): 1.0}
    wait_dane_sessions(env.daemon, authenticated + 1)

    rcpt, final = deliver(env, "mia@aliasfbwrong.example.net")
    assert rcpt[0] == 451 and "tls_policy" in rcpt[1], rcpt
    assert final is None and sink.count() == n + 1


def test_dane_ta_accepts_the_alias_name_when_the_records_are_at_the_target(env):
    """RFC 7672 3.2.2: with the TLSA records at the CNAME target, a DANE-TA chain whose leaf names only the
    MX host name (the alias) still matches: both names are reference identifiers."""
    sink = env.sinks["tacname"]
    n = sink.count()
    before = env.daemon.metrics()
    rcpt, final = deliver(env, "nina@tacname.example.net")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    sink.wait_messages(n + 1)
    after = harness.wait_moved(env.daemon, before)
    assert policy_moved(before, after) == {("partners", "dane", "success"): 1.0}


FIXED = {  # connector/upstream name: the fixed upstream's host (its recipient domain is NAME.fixed.example)
    "fixed-good": "mx.good.example.net",      # DANE-EE matches
    "fixed-wrong": "mx.wrong.example.net",    # DANE-EE matches nothing
    "fixed-plain": "mx.plain.example.net",    # no TLSA records, no STARTTLS
    "fixed-alias": "mx.alias.example.net",    # a CNAME whose target has the matching DANE-EE record
}


@pytest.fixture(scope="module")
def fixed(env, daemon_factory):
    """A second daemon whose routes are fixed upstreams with tls: dane (host names in the signed zone), one
    outbound connector per upstream, chosen by recipient domain."""
    port = harness.free_port()
    daemon = daemon_factory(
        [{"name": "out-fixed", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "fixed-good"}],
        [{"name": name, "address": f"{host}:{env.port}", "tls": "dane"} for name, host in FIXED.items()],
        [{"name": name, "type": "partner", "direction": "outbound", "upstream": name,
          "match": {"recipient_domains": [f"{name}.fixed.example"]}} for name in FIXED],
        name="mailflowd-fixed",
        dns={"servers": [env.knot.address], "timeout": "2s", "trust_anchor_file": str(env.knot.trust_anchor_file)})
    return types.SimpleNamespace(daemon=daemon, port=port, sinks=env.sinks)


def test_fixed_dane_upstream_sessions_are_counted_under_their_policy(fixed):
    """mailflow_outbound_policy_total counts a fixed upstream's TLS sessions under tls: dane as the MX walk counts
    them: dane/success, dane/tlsa-invalid, none/success where no TLSA records apply; every series is there (zero)
    before the first message."""
    before = fixed.daemon.metrics()
    for name in FIXED:
        for policy in ("dane", "mta-sts", "none"):
            for result in ("success", "tlsa-invalid", "dnssec-invalid"):
                key = ("mailflow_outbound_policy_total",
                       frozenset({"connector": name, "policy": policy, "result": result}.items()))
                assert before.get(key) == 0.0, key
    good, plain = fixed.sinks["good"], fixed.sinks["plain"]
    n_good, n_plain = good.count(), plain.count()

    rcpt, final = deliver(fixed, "olga@fixed-good.fixed.example")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    rcpt, final = deliver(fixed, "pat@fixed-alias.fixed.example")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    good.wait_messages(n_good + 2)
    rcpt, final = deliver(fixed, "quinn@fixed-plain.fixed.example")
    assert rcpt[0] == 250 and final[0] == 250, (rcpt, final)
    assert plain.wait_messages(n_plain + 1)[-1][0]["tls_version"] == "none"
    rcpt, final = deliver(fixed, "rita@fixed-wrong.fixed.example")
    assert rcpt[0] == 451 and final is None, rcpt

    after = harness.wait_moved(fixed.daemon, before, "mailflow_outbound_policy_total", at_least=4.0)
    assert policy_moved(before, after) == {("fixed-good", "dane", "success"): 1.0,
                                           ("fixed-alias", "dane", "success"): 1.0,
                                           ("fixed-plain", "none", "success"): 1.0,
                                           ("fixed-wrong", "dane", "tlsa-invalid"): 1.0}
    wait_dane_sessions(fixed.daemon, 2)


def test_fixed_dane_upstream_whose_tlsa_lookup_fails_counts_an_upstream_error(env, daemon_factory):
    """A fixed tls: dane upstream whose TLSA lookup gets no answer (a DNS proxy drops it): the host is not used
    (RFC 7672 2.2), every RCPT gets a temporary refusal, and that counts in mailflow_upstream_errors_total (the
    series MailflowUpstreamDown watches for a fixed upstream), as a certificate that matches no TLSA record does;
    it counted nothing there."""
    proxy = TamperingProxy(env.knot.address, drop=[f"_{env.port}._tcp.mx.good.example.net"])
    try:
        port = harness.free_port()
        daemon = daemon_factory(
            [{"name": "out-tlsafail", "address": f"127.0.0.1:{port}", "direction": "outbound",
              "upstream": "fixed-tlsafail"}],
            [{"name": "fixed-tlsafail", "address": f"mx.good.example.net:{env.port}", "tls": "dane"}],
            name="mailflowd-fixed-tlsafail",
            dns={"servers": [proxy.address], "timeout": "1s", "trust_anchor_file": str(env.knot.trust_anchor_file)})
        good = env.sinks["good"]
        n = good.count()
        before = daemon.metrics()
        rcpt, final = deliver(types.SimpleNamespace(port=port), "tim@tlsafail.example")
        assert rcpt[0] in (421, 451) and final is None, rcpt
        assert proxy.dropped >= 1 and good.count() == n
        after = harness.wait_moved(daemon, before, "mailflow_dns_lookups_total")
        assert delta(before, after, "mailflow_dns_lookups_total", type="TLSA", result="timeout") == \
            {series_key(type="TLSA", result="timeout"): 1.0}
        assert delta(before, after, "mailflow_upstream_errors_total") == \
            {series_key(upstream="fixed-tlsafail", reason="tls_policy"): 1.0}
    finally:
        proxy.close()


def test_fixed_dane_upstream_whose_host_has_no_address_says_so(env, daemon_factory):
    """A fixed tls: dane upstream whose host name does not exist (NXDOMAIN): the RCPT gets a temporary refusal,
    and the upstream_error line says why (it said error="" where the same upstream without DANE names the DNS
    answer)."""
    port = harness.free_port()
    daemon = daemon_factory(
        [{"name": "out-gone", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "fixed-gone"}],
        [{"name": "fixed-gone", "address": f"mx.gone.example.net:{env.port}", "tls": "dane"}],
        name="mailflowd-fixed-gone",
        dns={"servers": [env.knot.address], "timeout": "2s", "trust_anchor_file": str(env.knot.trust_anchor_file)})
    rcpt, final = deliver(types.SimpleNamespace(port=port), "sam@gone.example")
    assert rcpt[0] in (421, 451) and final is None, rcpt
    harness.wait_for(lambda: "upstream_error" in daemon.stderr(), what="the upstream_error line")
    line = next(x for x in daemon.stderr().splitlines() if "upstream_error" in x)
    assert "reason=connect_failed" in line, line
    assert 'error=""' not in line and "nxdomain" in line.lower(), line


def test_dane_without_a_trust_anchor_is_a_config_error(mailflowd_bin, workdir):
    cfg = Path(workdir) / "dane-no-anchor.yaml"
    cfg.write_text("""listeners:
  - name: out
    address: 127.0.0.1:2599
    direction: outbound
    upstream: dane-mx
upstreams:
  - name: dane-mx
    mx: true
    tls: dane
""")
    run = subprocess.run([str(mailflowd_bin), "--check-config", str(cfg)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "tls: dane needs dns.trust_anchor_file" in run.stderr + run.stdout
    assert ":9:" in run.stderr + run.stdout or "line 9" in run.stderr + run.stdout, run.stderr + run.stdout
