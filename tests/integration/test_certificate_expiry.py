"""mailflow_certificate_expiry_timestamp_seconds{listener, certificate} as Prometheus scrapes it from the real
binary: one sample per listener and certificate file, the notAfter that `openssl x509 -enddate` reads from the
file, also where a listener lists the same certificate twice (a series twice in one scrape is a duplicate sample
that Prometheus drops with an error); a
SIGHUP after a renewal moves it, a reload refused for a key that does not match its certificate leaves it (and the
served certificate) as they were; a renewal that lands while a reload runs is reported as what each side serves."""
import calendar
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request

import harness
import hostile_helpers as hh
from test_signals import pem_der, served_certificate, sighup_and_wait

EXPIRY = "mailflow_certificate_expiry_timestamp_seconds"


def not_after(path):
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-enddate"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return calendar.timegm(time.strptime(out.split("=", 1)[1], "%b %d %H:%M:%S %Y %Z"))


def live_pair(certs, workdir, directory, renewed):
    """A certificate pair in a directory of its own, as certbot's live/ (server.pem and its key), and a renewal
    for the same name with another notAfter: (directory, the pair's config, renewed cert, renewed key)."""
    live = workdir / directory
    live.mkdir()
    shutil.copy(certs / "server.pem", live / "cert.pem")
    shutil.copy(certs / "server.key", live / "key.pem")
    renewed_cert, renewed_key = harness.ca_signed_cert(certs, workdir, renewed, ["mx.test"])
    assert not_after(renewed_cert) != not_after(certs / "server.pem")
    return live, {"cert": str(live / "cert.pem"), "key": str(live / "key.pem")}, renewed_cert, renewed_key


def renew(live, cert, key):
    """The renewal in place: each file written beside and renamed over the old one, the key first."""
    shutil.copy(cert, live / "cert.pem.new")
    shutil.copy(key, live / "key.pem.new")
    (live / "key.pem.new").rename(live / "key.pem")
    (live / "cert.pem.new").rename(live / "cert.pem")


def expiry_lines(daemon):
    return [line for line in daemon.get("/metrics")[1].splitlines() if line.startswith(EXPIRY + "{")]


def test_expiry_is_one_valid_sample_per_certificate_and_follows_reloads(daemon_factory, sink_factory, certs,
                                                                        workdir):
    sink = sink_factory("store")
    live, pair, renewed_cert, renewed_key = live_pair(certs, workdir, "live", "renewed")
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
    renew(live, renewed_cert, renewed_key)
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


def served_http_certificate(port):
    """DER of the certificate the HTTPS server serves."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def der_not_after(der):
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-enddate"], input=der, check=True,
                         capture_output=True).stdout.decode().strip()
    return calendar.timegm(time.strptime(out.split("=", 1)[1], "%b %d %H:%M:%S %Y %Z"))


def https_metrics(port):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5, context=context) as r:
        return harness.parse_metrics(r.read().decode())


def test_expiry_is_of_the_certificate_served_when_the_files_change_during_the_reload(daemon_factory, sink_factory,
                                                                                   certs, workdir):
    """The gauge is the notAfter of the certificate each listener and the HTTP server loaded, not of a second read
    of the files once the reload is done: a renewal that lands while a reload runs (here 20 tls: verify upstreams,
    each with its own copy of the system bundle, make it last about a second) left the listener serving the
    certificate read at the start of the reload and the gauge saying the renewed one's date (or the series gone,
    where the second read failed). The listener and http.tls (turned on by this reload) use the same files: the
    listener read them before the renewal, the HTTP server after it, and each series says what its side serves."""
    sink = sink_factory("store")
    live, pair, renewed_cert, renewed_key = live_pair(certs, workdir, "live-during-reload", "renewed-during")
    bundles = workdir / "expiry-bundles"
    bundles.mkdir()
    many = []
    for i in range(20):
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", bundles / f"ca{i}.pem")
        many.append({"name": f"partner{i}", "address": f"192.0.2.{i + 1}:25", "tls": "verify",
                     "ca_file": str(bundles / f"ca{i}.pem")})
    port = harness.free_port()
    tls = {"certificates": [pair], "min_version": "TLS1.0", "ciphers": "DEFAULT:@SECLEVEL=0"}
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store", tls=tls)],
                       upstreams=[hh.plain_upstream("store", sink.port)] + many, name="expiry-during-reload")
    http_port = int(d.config["http"]["address"].rsplit(":", 1)[1])
    cfg = json.loads(d.config_path.read_text())
    cfg["http"]["tls"] = dict(pair)
    d.config_path.write_text(json.dumps(cfg, indent=2) + "\n")

    began = d.stderr().count(" reload config=")
    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: d.stderr().count(" reload config=") > began, 10, interval=0.01, what="the reload")
    time.sleep(0.15)  # the listener has its pair; the CA bundles are being read
    renew(live, renewed_cert, renewed_key)
    harness.wait_for(lambda: d.stderr().count(" reloaded ") >= 1, 30, what="the reload's end")

    metrics = https_metrics(http_port)
    for listener, served in (("inbound", served_certificate(port)), ("http", served_http_certificate(http_port))):
        got = harness.series(metrics, EXPIRY, listener=listener)
        assert list(got.values()) == [float(der_not_after(served))], \
            f"{EXPIRY}{{listener={listener}}}: {got}, the certificate served expires at {der_not_after(served)} " \
            f"(renewed: {not_after(renewed_cert)}, before: {not_after(certs / 'server.pem')})"
