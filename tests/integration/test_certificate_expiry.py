"""mailflow_certificate_expiry_timestamp_seconds{listener, certificate} as Prometheus scrapes it from the real
binary: one sample per listener and certificate file, the notAfter that `openssl x509 -enddate` reads from the
file, also where a listener lists the same certificate twice (a series twice in one scrape is a duplicate sample
that Prometheus drops with an error); a
SIGHUP after a renewal moves it, a reload refused for a key that does not match its certificate leaves it (and the
served certificate) as they were."""
import calendar
import shutil
import subprocess
import time

import harness
import hostile_helpers as hh
from test_signals import pem_der, served_certificate, sighup_and_wait

EXPIRY = "mailflow_certificate_expiry_timestamp_seconds"


def not_after(path):
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-enddate"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return calendar.timegm(time.strptime(out.split("=", 1)[1], "%b %d %H:%M:%S %Y %Z"))


def expiry_lines(daemon):
    return [line for line in daemon.get("/metrics")[1].splitlines() if line.startswith(EXPIRY + "{")]


def test_expiry_is_one_valid_sample_per_certificate_and_follows_reloads(daemon_factory, sink_factory, certs,
                                                                        workdir):
    sink = sink_factory("store")
    live = workdir / "live"
    live.mkdir()
    shutil.copy(certs / "server.pem", live / "cert.pem")
    shutil.copy(certs / "server.key", live / "key.pem")
    renewed_cert, renewed_key = harness.ca_signed_cert(certs, workdir, "renewed", ["mx.test"])
    assert not_after(renewed_cert) != not_after(certs / "server.pem")
    pair = {"cert": str(live / "cert.pem"), "key": str(live / "key.pem")}
    # The same pair twice (the second is never chosen, the first matches every name it does): a configuration
    # the daemon takes, so its metrics must still be valid.
    tls = {"certificates": [pair, dict(pair)], "min_version": "TLS1.0", "ciphers": "DEFAULT:@SECLEVEL=0"}
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store", tls=tls)],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="expiry")

    def check(cert_file):
        lines = expiry_lines(d)
        assert len(lines) == 1, f"want one {EXPIRY} sample for the listener's one certificate file, got:\n" + \
            "\n".join(lines)
        want = frozenset({"listener": "inbound", "certificate": str(live / "cert.pem")}.items())
        got = {k: v for k, v in d.metrics().items() if k[0] == EXPIRY}
        assert got == {(EXPIRY, want): float(not_after(cert_file))}, got

    check(certs / "server.pem")
    # A renewal (new files at the same paths) and SIGHUP: the gauge follows at once.
    shutil.copy(renewed_cert, live / "cert.pem.new")
    shutil.copy(renewed_key, live / "key.pem.new")
    (live / "key.pem.new").rename(live / "key.pem")
    (live / "cert.pem.new").rename(live / "cert.pem")
    sighup_and_wait(d, "success")
    check(renewed_cert)
    assert served_certificate(port) == pem_der(renewed_cert)
    # A half-done renewal (the new certificate, the old key): the reload is refused, the running pair keeps serving
    # and the gauge keeps its notAfter.
    shutil.copy(certs / "other.pem", live / "cert.pem")
    sighup_and_wait(d, "failure")
    assert any("reload_refused" in line and "does not match certificate" in line
               for line in d.stderr().splitlines()), d.stderr()[-2000:]
    check(renewed_cert)
    assert served_certificate(port) == pem_der(renewed_cert)
