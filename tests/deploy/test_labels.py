"""The closed label vocabularies (reasons, results, offered versions) in the deploy tests' own data are the
daemon's: daemon/reasons.hpp for reasons and results, proto/tlsrpt.cpp for the RFC 8460 result types of
mailflow_outbound_policy_total. A rule test fed with a reason no relay sends (reason="connect" where the daemon
says connect_failed) proves nothing about what a real relay's series do; this test keeps the rule tests'
input series (deploy/prometheus/tests/*.yml) and the dashboard test's sample metrics (sample_metrics.py) honest.
"""
import re

import yaml

import deploylib as d
import sample_metrics

REASONS_HPP = d.REPO / "daemon" / "reasons.hpp"
TLSRPT_CPP = d.REPO / "proto" / "tlsrpt.cpp"
RULE_TESTS = sorted((d.REPO / "deploy" / "prometheus" / "tests").glob("*.yml"))


def reasons_lists():
    """{list name: values} of every std::to_array<std::string_view> list in daemon/reasons.hpp."""
    text = re.sub(r"//[^\n]*", "", REASONS_HPP.read_text())
    lists = {name: re.findall(r'"([^"]*)"', body) for name, body in re.findall(
        r"inline constexpr auto (\w+)\s*=\s*std::to_array<std::string_view>\(\s*\{(.*?)\}\s*\);", text, re.S)}
    assert {"rejects", "tls_handshake_failures", "upstream_errors", "mx_attempts"} <= set(lists), lists
    return lists


def rfc8460_result_types():
    """The result types proto/tlsrpt.cpp writes (its to_string(ResultType))."""
    body = re.search(r"to_string\(ResultType[^)]*\)\s*\{(.*?)\n\}", TLSRPT_CPP.read_text(), re.S)
    assert body, "to_string(ResultType) not found in proto/tlsrpt.cpp"
    types = re.findall(r'return "([a-z-]+)";', body.group(1))
    assert "sts-policy-fetch-error" in types, types
    return types


def vocabulary():
    """{(metric, label): allowed values}."""
    r = reasons_lists()
    return {
        ("mailflow_rejects_total", "reason"): r["rejects"],
        ("mailflow_tls_handshake_failures_total", "reason"): r["tls_handshake_failures"],
        ("mailflow_upstream_errors_total", "reason"): r["upstream_errors"],
        ("mailflow_state_errors_total", "reason"): r["state_errors"],
        ("mailflow_mx_attempts_total", "result"): r["mx_attempts"],
        ("mailflow_tlsrpt_deliveries_total", "method"): r["tlsrpt_methods"],
        ("mailflow_tlsrpt_deliveries_total", "result"): r["tlsrpt_results"],
        ("mailflow_tls_handshake_refused_total", "offered"): r["tls_offered"],
        ("mailflow_outbound_policy_total", "policy"): r["outbound_policies"],
        ("mailflow_outbound_policy_total", "result"): ["success"] + rfc8460_result_types(),
    }


SERIES = re.compile(r"^(\w+)\{(.*)\}")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def unknown_values(name, series_text, allowed):
    """'NAME: metric{label="value"}' for each label value of a closed vocabulary that the daemon never exports."""
    m = SERIES.match(series_text)
    if not m:
        return []
    metric = m.group(1)
    return [f'{name}: {metric}{{{label}="{value}"}}' for label, value in LABEL.findall(m.group(2))
            if (metric, label) in allowed and value not in allowed[(metric, label)]]


def test_the_vocabulary_is_read():
    allowed = vocabulary()
    assert "connect_failed" in allowed[("mailflow_upstream_errors_total", "reason")]
    assert "tls_required" in allowed[("mailflow_rejects_total", "reason")]
    # The check below finds what it is meant to find.
    assert unknown_values("x", 'mailflow_upstream_errors_total{upstream="a",reason="connect"}', allowed) == [
        'x: mailflow_upstream_errors_total{reason="connect"}']


def test_rule_tests_feed_only_labels_the_daemon_exports():
    allowed = vocabulary()
    problems, checked = [], 0
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for series in case.get("input_series", []):
                checked += 1
                problems += unknown_values(f"{path.name} ({case['name']})", series["series"], allowed)
    assert checked > 50, checked
    assert not problems, "label values no relay exports:\n" + "\n".join(problems)


def test_sample_metrics_carry_only_labels_the_daemon_exports():
    allowed = vocabulary()
    lines = [line for line in sample_metrics.render(60).splitlines() if not line.startswith("#")]
    families = {SERIES.match(line).group(1) for line in lines if SERIES.match(line)}
    assert {"mailflow_rejects_total", "mailflow_tls_handshake_failures_total", "mailflow_upstream_errors_total",
            "mailflow_outbound_policy_total"} <= families, families
    problems = [p for line in lines for p in unknown_values("sample_metrics.py", line, allowed)]
    assert not problems, "label values no relay exports:\n" + "\n".join(problems)
