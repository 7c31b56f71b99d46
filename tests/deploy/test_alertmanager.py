"""The example Alertmanager config's inhibitions, in a real Alertmanager (amtool cannot test inhibitions).

The alerts posted carry the labels the shipped rules give them (deploy/prometheus/tests/ops_alerts.test.yml checks
those): MailflowUpstreamDown and MailflowTLSHandshakeFailures each carry the job and instance of a relay that
sees the problem.
"""
import time

import pytest

import deploylib as d

CONFIG = d.REPO / "deploy" / "alertmanager" / "alertmanager.example.yml"


@pytest.fixture
def procs(tmp_path):
    p = d.Procs(tmp_path)
    yield p
    p.stop_all()


def status(am):
    """{(alertname, instance, leg): (state, inhibitedBy)} of every alert Alertmanager holds."""
    return {(a["labels"]["alertname"], a["labels"].get("instance"), a["labels"].get("leg")):
            (a["status"]["state"], a["status"]["inhibitedBy"]) for a in am.alerts()}


def test_an_upstream_down_silences_upstream_handshake_failures_on_its_own_relay_only(procs, tmp_path):
    am = d.Alertmanager(procs, tmp_path, config=CONFIG)
    relay = {"job": "mailflowd", "severity": "warning", "listener": "inbound"}
    am.post({"alertname": "MailflowUpstreamDown", "job": "mailflowd", "instance": "r1:9725", "upstream": "mailstore",
             "severity": "critical"},
            {"alertname": "MailflowTLSHandshakeFailures", "instance": "r1:9725", "leg": "upstream", **relay},
            {"alertname": "MailflowTLSHandshakeFailures", "instance": "r1:9725", "leg": "client", **relay},
            {"alertname": "MailflowTLSHandshakeFailures", "instance": "r2:9725", "leg": "upstream", **relay})
    key = ("MailflowTLSHandshakeFailures", "r1:9725", "upstream")
    try:
        d.wait_for(lambda: status(am).get(key, ("",))[0] == "suppressed", 15,
                   what="r1's upstream-leg handshake alert inhibited by r1's MailflowUpstreamDown")
        time.sleep(1)  # the inhibitor has seen every alert
        got = status(am)
        assert got[key][1], got
        # The client leg, and the upstream leg of a relay whose upstreams are fine, still notify.
        assert got[("MailflowTLSHandshakeFailures", "r1:9725", "client")] == ("active", []), got
        assert got[("MailflowTLSHandshakeFailures", "r2:9725", "upstream")] == ("active", []), got
        assert got[("MailflowUpstreamDown", "r1:9725", None)] == ("active", []), got
        procs.check_alive()
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
