"""What libunbound itself says goes into mailflowd's log, in its format: with log.format json every line of standard
error is one JSON object, libunbound's messages included, as the event dns_library (level warn, the text in a field,
rate-limited like the other events a peer or a broken network can repeat), also after a resolver was replaced
(libunbound forgets where it logs when any context is deleted). Before, libunbound wrote its own lines
("[1733450000] libunbound[1234:0] error: can't create socket: Too many open files", about five per lookup) straight
to standard error, which broke a log shipper's JSON parser and was not rate-limited.

The real binary, with the daemon's RLIMIT_NOFILE lowered (prlimit) for one RCPT so that libunbound cannot make the
socket for its query. The name server is an address of this file's range, 127.0.0.145-149, where nothing listens."""
import json

import harness
from hostile_helpers import greeted

NAME_SERVER = "127.0.0.145"


def json_events(daemon):
    """Every line of the daemon's standard error, after it stopped, as a JSON object (each one must be)."""
    assert daemon.stop() == 0
    events = []
    for line in daemon.stderr().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a line of standard error is no JSON object: {line!r}\n{daemon.log_tail()}")
    return events


def start(daemon_factory, name):
    port = harness.free_port()
    daemon = daemon_factory(
        [{"name": "out", "address": f"127.0.0.1:{port}", "direction": "outbound", "upstream": "internet"}],
        [{"name": "internet", "mx": True, "port": 25, "tls": "opportunistic", "mta_sts": "off"}],
        name=name, dns={"servers": [f"{NAME_SERVER}:53"], "timeout": "1s"},
        log={"level": "info", "format": "json"})
    c = greeted(port)
    assert c.cmd("MAIL FROM:<app@corp.example>")[0] == 250
    return daemon, c


def test_libunbound_lines_are_json_log_events(daemon_factory, mailflowd_bin):
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, c = start(daemon_factory, "dnslog")
    # The first lookup makes the loop's resolver (its name server does not answer: a 4xx after dns.timeout).
    assert c.cmd("RCPT TO:<a@first.example>")[0] // 100 == 4
    for domain in ("second.example", "fourth.example"):
        with harness.out_of_descriptors(daemon):
            code, text = c.cmd(f"RCPT TO:<b@{domain}>")
        assert text.startswith("451 4.4.3"), f"RCPT with no descriptor for the MX lookup: {text!r}\n{daemon.log_tail()}"
        if domain == "second.example":
            # The next lookup replaces the resolver whose cache holds that SERVFAIL: the old context is deleted
            # after the new one was made, which libunbound takes for the end of its log setting.
            assert c.cmd("RCPT TO:<c@third.example>")[0] // 100 == 4
    c.cmd("QUIT")
    events = json_events(daemon)
    library = [e for e in events if e["event"] == "dns_library"]
    assert all(e["level"] == "warning" for e in library), library
    # Each lookup that could not be sent said so, the one after the resolver was replaced too.
    unavailable = [i for i, e in enumerate(events) if e["event"] == "dns_unavailable"]
    assert [events[i]["domain"] for i in unavailable] == ["second.example", "fourth.example"], events
    for first, last in ((0, unavailable[0]), (unavailable[0], unavailable[1])):
        said = [e["message"] for e in events[first:last] if e["event"] == "dns_library"]
        assert any("can't create socket: Too many open files" in m for m in said), \
            f"libunbound's messages before {events[last]}: {said}\n{daemon.log_tail()}"


def test_a_resolver_that_cannot_be_made_says_so_in_a_json_log_event(daemon_factory, mailflowd_bin):
    """The loop's first lookup at the descriptor limit: the libunbound context itself cannot be made (its
    socketpair), which libunbound says before any context of this process set where it logs."""
    harness.skip_out_of_descriptors_if_sanitized(mailflowd_bin)
    daemon, c = start(daemon_factory, "dnslog-new")
    with harness.out_of_descriptors(daemon):
        code, text = c.cmd("RCPT TO:<a@first.example>")
    assert text.startswith("451 4.4.3 DNS resolver unavailable"), f"{text!r}\n{daemon.log_tail()}"
    c.cmd("QUIT")
    said = [e["message"] for e in json_events(daemon) if e["event"] == "dns_library"]
    assert any(m.startswith("error: socketpair: ") for m in said), f"{said}\n{daemon.log_tail()}"
