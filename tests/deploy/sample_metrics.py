"""Metrics text in mailflowd's exposition format (INTERFACE.md "Metrics"), for tests that must not depend
on the daemon. Counters grow with `t` (seconds) so that rate() has something to show.

partner-contoso (inbound) has 12.5% TLS1.0 in its window (insight active); internet (inbound) and
onprem (outbound) are clean.
"""
import time

TLS = ("none", "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3")

CONNECTORS = {
    # (connector, direction): (type, forced_tls, window messages per tls_version)
    ("partner-contoso", "inbound"): ("partner", "false", {"none": 12, "TLS1.0": 128, "TLS1.1": 0, "TLS1.2": 820, "TLS1.3": 64}),
    ("internet", "inbound"): ("internet", "false", {"none": 3, "TLS1.0": 0, "TLS1.1": 1, "TLS1.2": 400, "TLS1.3": 2600}),
    ("onprem", "outbound"): ("onpremises", "true", {"none": 0, "TLS1.0": 0, "TLS1.1": 0, "TLS1.2": 0, "TLS1.3": 950}),
}

# (listener, certificate file): days from now to its notAfter; the inbound one is inside the 14 days of
# MailflowCertificateExpiring.
CERTIFICATE_DAYS_LEFT = {
    ("inbound", "/etc/mailflowd/tls/mx1.pem"): 10,
    ("http", "/etc/mailflowd/tls/http.pem"): 60,
}
# notAfter is a fixed point in time, as the daemon's gauge is (the file's, not a count down).
_LOADED = time.time()


def render(t):
    t = float(t)
    out = []

    def family(name, kind, help_text):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    def sample(name, labels, value):
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        number = str(value) if isinstance(value, int) else f"{value:g}"  # timestamps keep every digit
        out.append(f"{name}{{{text}}} {number}" if labels else f"{name} {number}")

    family("mailflow_messages_total", "counter", "Messages delivered (2xx to end-of-data)")
    for (c, d), (_, _, window) in CONNECTORS.items():
        for v in TLS:
            sample("mailflow_messages_total", {"connector": c, "direction": d, "tls_version": v},
                   window[v] + (int(t) * (window[v] > 0)))
    family("mailflow_message_bytes_total", "counter", "Bytes of delivered messages")
    for (c, d), (_, _, window) in CONNECTORS.items():
        for v in TLS:
            sample("mailflow_message_bytes_total", {"connector": c, "direction": d, "tls_version": v},
                   (window[v] + int(t) * (window[v] > 0)) * 4096)
    family("mailflow_recipients_total", "counter", "Recipients of delivered messages")
    for (c, d), (_, _, window) in CONNECTORS.items():
        for v in TLS:
            sample("mailflow_recipients_total", {"connector": c, "direction": d, "tls_version": v}, window[v] * 2)
    family("mailflow_sessions_total", "counter", "Finished sessions by leg and TLS version")
    for listener in ("inbound", "outbound"):
        for leg in ("client", "upstream"):
            for v in TLS:
                sample("mailflow_sessions_total", {"listener": listener, "leg": leg, "tls_version": v},
                       10 + int(t) * 3 if v in ("TLS1.2", "TLS1.3") else 2)
    family("mailflow_sessions_active", "gauge", "Open sessions")
    sample("mailflow_sessions_active", {"listener": "inbound"}, 3 + int(t) % 4)
    sample("mailflow_sessions_active", {"listener": "outbound"}, 1)
    family("mailflow_tls_handshake_failures_total", "counter", "Failed TLS handshakes")
    sample("mailflow_tls_handshake_failures_total", {"listener": "inbound", "leg": "client", "reason": "tlsv1_alert_protocol_version"}, int(t))
    sample("mailflow_tls_handshake_failures_total", {"listener": "inbound", "leg": "client", "reason": "no_shared_cipher"}, int(t) // 2)
    family("mailflow_tls_handshake_refused_total", "counter", "Failed client handshakes by connector and offered version")
    sample("mailflow_tls_handshake_refused_total", {"listener": "inbound", "connector": "partner-contoso", "offered": "TLS1.0"}, int(t))
    sample("mailflow_tls_handshake_refused_total", {"listener": "inbound", "connector": "internet", "offered": "TLS1.1"}, int(t) // 2)
    family("mailflow_upstream_errors_total", "counter", "Upstream errors")
    sample("mailflow_upstream_errors_total", {"upstream": "mailstore", "reason": "connect_failed"}, int(t) // 3)
    family("mailflow_outbound_policy_total", "counter", "Outbound sessions under a TLS policy")
    sample("mailflow_outbound_policy_total", {"connector": "onprem", "policy": "mta-sts", "result": "success"}, int(t) * 4)
    sample("mailflow_outbound_policy_total",
           {"connector": "onprem", "policy": "mta-sts", "result": "certificate-host-mismatch"}, int(t))
    family("mailflow_tlsrpt_deliveries_total", "counter", "TLS-RPT reports tried per rua")
    sample("mailflow_tlsrpt_deliveries_total", {"method": "mailto", "result": "success"}, int(t) // 5)
    sample("mailflow_tlsrpt_deliveries_total", {"method": "https", "result": "temporary_failure"}, 0)
    family("mailflow_rejects_total", "counter", "Refused commands, sessions and messages")
    sample("mailflow_rejects_total", {"listener": "inbound", "reason": "unrecognized_command"}, int(t))
    sample("mailflow_rejects_total", {"listener": "inbound", "reason": "tls_required"}, 4)
    family("mailflow_window_messages", "gauge", "Messages in the rolling window")
    for (c, d), (_, _, window) in CONNECTORS.items():
        for v in TLS:
            sample("mailflow_window_messages", {"connector": c, "direction": d, "tls_version": v}, window[v])
    family("mailflow_window_tls_share", "gauge", "Share of the window's messages")
    for (c, d), (_, _, window) in CONNECTORS.items():
        total = sum(window.values())
        for v in TLS:
            sample("mailflow_window_tls_share", {"connector": c, "direction": d, "tls_version": v},
                   window[v] / total if total else 0)
    family("mailflow_connector_info", "gauge", "Configured connectors")
    for (c, d), (kind, forced, _) in CONNECTORS.items():
        sample("mailflow_connector_info", {"connector": c, "direction": d, "type": kind, "forced_tls": forced}, 1)
    family("mailflow_alert_threshold", "gauge", "Alert thresholds per connector")
    for (c, d) in CONNECTORS:
        sample("mailflow_alert_threshold", {"connector": c, "direction": d, "kind": "tls10_share"}, 0.05)
        sample("mailflow_alert_threshold", {"connector": c, "direction": d, "kind": "tls11_share"}, 0.05)
        sample("mailflow_alert_threshold", {"connector": c, "direction": d, "kind": "no_tls_share"}, 0.05)
        sample("mailflow_alert_threshold", {"connector": c, "direction": d, "kind": "min_messages"}, 100)
    family("mailflow_insight_active", "gauge", "Connector insights")
    for (c, d), (_, _, window) in CONNECTORS.items():
        total = sum(window.values())
        sample("mailflow_insight_active", {"connector": c, "direction": d, "insight": "significant_tls10"},
               1 if total >= 100 and window["TLS1.0"] / total > 0.05 else 0)
        sample("mailflow_insight_active", {"connector": c, "direction": d, "insight": "significant_tls11"},
               1 if total >= 100 and window["TLS1.1"] / total > 0.05 else 0)
        sample("mailflow_insight_active", {"connector": c, "direction": d, "insight": "significant_no_tls"},
               1 if total >= 100 and window["none"] / total > 0.05 else 0)
    family("mailflow_below_tls12_total", "counter", "Messages below TLS1.2")
    for (c, d), (_, _, window) in CONNECTORS.items():
        sample("mailflow_below_tls12_total", {"connector": c, "direction": d},
               window["none"] + window["TLS1.0"] + window["TLS1.1"])
    family("mailflow_session_duration_seconds", "histogram", "Session duration")
    for le, n in (("0.1", 5), ("1", 40), ("10", 90), ("+Inf", 100)):
        sample("mailflow_session_duration_seconds_bucket", {"listener": "inbound", "le": le}, n + int(t))
    sample("mailflow_session_duration_seconds_sum", {"listener": "inbound"}, 250 + t)
    sample("mailflow_session_duration_seconds_count", {"listener": "inbound"}, 100 + int(t))
    family("mailflow_config_reloads_total", "counter", "Configuration reloads")
    sample("mailflow_config_reloads_total", {"result": "success"}, 1)
    sample("mailflow_config_reloads_total", {"result": "failure"}, 0)
    family("mailflow_config_last_reload_successful", "gauge", "1 when the last reload was applied")
    sample("mailflow_config_last_reload_successful", {}, 1)
    family("mailflow_certificate_expiry_timestamp_seconds", "gauge", "notAfter of each served certificate")
    for (listener, certificate), days in CERTIFICATE_DAYS_LEFT.items():
        sample("mailflow_certificate_expiry_timestamp_seconds", {"listener": listener, "certificate": certificate},
               int(_LOADED) + days * 86400)
    family("mailflow_build_info", "gauge", "Build")
    sample("mailflow_build_info", {"version": "0.1.0"}, 1)
    family("process_resident_memory_bytes", "gauge", "RSS")
    sample("process_resident_memory_bytes", {}, 12345678)
    family("process_start_time_seconds", "gauge", "Start time")
    sample("process_start_time_seconds", {}, 1.7e9)
    return "\n".join(out) + "\n"
