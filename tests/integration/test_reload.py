"""Reloads are all or nothing: a reload refused at its last step (a fault injected where every setting is loaded
and none is applied yet) leaves the HTTP settings as they were too, and the same file at the next reload puts
them in force."""
import json
import signal
import warnings

import harness
import hostile_helpers as hh
import http_helpers as hx

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # noqa: E402  (deprecated in 3.11, as test_http_auth makes its hashes)

USER, PASSWORD = "prom", "reload secret"


def reloads(daemon, result, auth=None):
    metrics = hx.metrics(daemon_http_port(daemon), auth=auth)
    return (harness.value(metrics, "mailflow_config_reloads_total", result=result),
            harness.value(metrics, "mailflow_config_last_reload_successful"))


def daemon_http_port(daemon):
    return int(daemon.config["http"]["address"].rsplit(":", 1)[1])


def test_a_reload_refused_at_its_last_step_keeps_the_http_settings_too(daemon_factory, sink_factory, monkeypatch):
    """The reload put http.basic_auth (and http.tls) in force before steps that could still refuse it: a reload
    refused after that left /metrics asking for the new password while the relay ran the old configuration and
    mailflow_config_last_reload_successful said 0 ("nothing of the new file is in force",
    MailflowConfigReloadFailed). The failpoint reload.apply fails the first reload where everything is loaded and
    nothing applied yet."""
    sink = sink_factory("store")
    monkeypatch.setenv("MAILFLOWD_FAILPOINTS", "reload.apply=1")
    port = harness.free_port()
    d = daemon_factory(listeners=[hh.listener("inbound", port, "store")],
                       upstreams=[hh.plain_upstream("store", sink.port)], name="all-or-nothing")
    http_port = daemon_http_port(d)
    assert reloads(d, "failure") == (0, 1)
    cfg = json.loads(d.config_path.read_text())
    cfg["http"]["basic_auth"] = {"user": USER,
                                 "password_hash": crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_SHA256))}
    d.config_path.write_text(json.dumps(cfg))

    d.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: "reload_refused" in d.stderr(), 10, what="the reload to be refused")
    status = hx.get(http_port, "/metrics")[0]
    assert status == 200, f"a refused reload put the new basic_auth in force: /metrics answered {status}"
    assert reloads(d, "failure") == (1, 0)
    hh.assert_relays(d, port, sink)

    d.proc.send_signal(signal.SIGHUP)  # the same file: the failpoint is spent, all of it applies now
    harness.wait_for(lambda: d.stderr().count(" reloaded ") == 1, 10, what="the second reload")
    assert hx.get(http_port, "/metrics")[0] == 401
    assert reloads(d, "success", auth=(USER, PASSWORD)) == (1, 1)

