"""`mailflowd report` against a daemon with http.tls, as mailflowd(8) has an administrator run it: `--config` takes
the address from http.address (https:// since http.tls is set), `--ca-file` the CA that signed the certificate.
A certificate that is trusted but not for the address asked (a certificate for the host's name, the daemon reached
on 127.0.0.1) must be refused, and the message must say that the name is what is wrong: it said "certificate
verify failed (--ca-file FILE to trust its certificate, ...)" to an administrator who had given that very CA."""
import json
import signal
import types

import pytest

import harness
import hostile_helpers as hh
import report_helpers as rh


@pytest.fixture(scope="module")
def env(certs, workdir, sink_factory, daemon_factory):
    sink = sink_factory("store")
    # Signed by the test CA for a host name only: no IP address in it.
    name_cert, name_key = harness.ca_signed_cert(certs, workdir, "http-name-only", ["mailflowd.example.test"])
    made = {}
    for which, (cert, key) in {"ip": (certs / "server.pem", certs / "server.key"),
                               "name": (name_cert, name_key)}.items():
        d = daemon_factory(listeners=[hh.listener("inbound", harness.free_port(), "store")],
                           upstreams=[hh.plain_upstream("store", sink.port)], name=f"report-https-{which}")
        # The harness waits for a plain /healthz at the start: http.tls comes with a reload.
        d.config["http"]["tls"] = {"cert": str(cert), "key": str(key)}
        d.config_path.write_text(json.dumps(d.config, indent=2) + "\n")
        d.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: " reloaded " in d.stderr(), 10, what="the reload that sets http.tls")
        made[which] = d
    return types.SimpleNamespace(bin=made["ip"].binary, ca=certs / "ca.pem", **made)


def test_config_and_ca_file_verify_a_certificate_for_the_address(env):
    """The test CA's server certificate names 127.0.0.1: --config with that CA gets the report."""
    res = rh.run_cli(env.bin, "--config", str(env.ip.config_path), "--ca-file", str(env.ca), "--format", "csv")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(rh.CSV_HEADER), res.stdout[:300]


def test_an_untrusted_certificate_says_why_and_points_at_ca_file(env):
    """Without --ca-file (the system's trust store knows no test CA) the reason is OpenSSL's verify result, and the
    hint is --ca-file."""
    res = rh.run_cli(env.bin, "--config", str(env.ip.config_path))
    assert res.returncode == 1 and res.stdout == "", (res.returncode, res.stdout[:300])
    assert "certificate verify failed: unable to get local issuer certificate" in res.stderr, res.stderr
    assert "--ca-file FILE to trust its certificate" in res.stderr, res.stderr


@pytest.mark.parametrize("host, why", [("127.0.0.1", "IP address mismatch"), ("localhost", "hostname mismatch")])
def test_a_certificate_for_another_name_says_so(env, host, why):
    """Trusted, but not for the address asked: refused, and the message names the mismatch and the address, and
    does not send the administrator to --ca-file, which was given."""
    port = env.name.config["http"]["address"].rsplit(":", 1)[1]
    args = ["--config", str(env.name.config_path), "--ca-file", str(env.ca)]
    if host != "127.0.0.1":
        args += ["--url", f"https://{host}:{port}"]
    res = rh.run_cli(env.bin, *args)
    assert res.returncode == 1 and res.stdout == "", (res.returncode, res.stdout[:300])
    assert f"certificate verify failed: {why}" in res.stderr, res.stderr
    assert f"its certificate is not for {host}" in res.stderr, res.stderr
    assert "--url https://NAME:" in res.stderr, res.stderr
    assert "--ca-file" not in res.stderr, res.stderr
    # The same daemon with verification off: it was the name, nothing else.
    res = rh.run_cli(env.bin, *args, "--insecure", "--format", "csv")
    assert res.returncode == 0 and res.stdout.startswith(rh.CSV_HEADER), res.stderr
