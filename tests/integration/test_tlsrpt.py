"""TLS-RPT (RFC 8460) reports served by the real daemon: aggregates kept in state_dir/tlsrpt.state (written here in
the daemon's own format, as a previous run leaves them: the MX walk that records live sessions is wired later),
/api/v1/tlsrpt?date=D as JSON checked field by field against RFC 8460 section 4's schema, the gzip body that a
report is sent as (decompressed with python's zlib), and the state saved again at shutdown."""
import gzip
import json
import re
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

import harness

DATE = "2026-01-02"
STATE = """mailflowd-tlsrpt 1
day 2026-01-02 a.example.net mailto:tlsrpt@a.example.net,https://reports.a.example.net/v1
policy sts version:%20STSv1,mode:%20enforce,mx:%20*.a.example.net,max_age:%2086400 *.a.example.net 5326 303 0
failure certificate-expired 192.0.2.1 mx1.a.example.net 198.51.100.7 - 100
failure starttls-not-supported 192.0.2.1 mx2.a.example.net 2001:db8::7 STARTTLS%20not%20offered 203
policy no-policy-found - - 7 0 0
day 2026-01-02 b.example mailto:x@b.example
policy no-policy-found - - 2 0 0
day 2026-01-03 a.example.net mailto:tlsrpt@a.example.net
policy no-policy-found - - 1 0 0
"""


@pytest.fixture(scope="module")
def daemon(daemon_factory, workdir):
    state = workdir / "mailflowd-state"
    state.mkdir(exist_ok=True)
    (state / "tlsrpt.state").write_text(STATE)
    return daemon_factory(
        [{"name": "out", "address": f"127.0.0.1:{harness.free_port()}", "direction": "outbound",
          "upstream": "internet"}],
        [{"name": "internet", "mx": True}],
        tlsrpt={"organization_name": "Example Sender", "contact_info": "tls@sender.example",
                "submitter": "mx.sender.example"})


def get(daemon, path):
    with urllib.request.urlopen(daemon.http + path, timeout=5) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def test_reports_of_a_day_follow_rfc8460_section4(daemon):
    status, content_type, body = get(daemon, f"/api/v1/tlsrpt?date={DATE}")
    assert (status, content_type) == (200, "application/json")
    doc = json.loads(body)
    assert doc["date"] == DATE
    assert [r["domain"] for r in doc["reports"]] == ["a.example.net", "b.example"]
    a = doc["reports"][0]
    assert a["rua"] == ["mailto:tlsrpt@a.example.net", "https://reports.a.example.net/v1"]
    report = a["report"]
    assert set(report) == {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    assert report["organization-name"] == "Example Sender"
    assert report["contact-info"] == "tls@sender.example"
    assert report["date-range"] == {"start-datetime": "2026-01-02T00:00:00Z", "end-datetime": "2026-01-02T23:59:59Z"}
    assert report["report-id"] == "2026-01-02.a.example.net@mx.sender.example"
    for field in ("start-datetime", "end-datetime"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["date-range"][field])
    sts, none = report["policies"]
    assert sts["policy"] == {"policy-type": "sts",
                             "policy-string": ["version: STSv1", "mode: enforce", "mx: *.a.example.net",
                                               "max_age: 86400"],
                             "policy-domain": "a.example.net", "mx-host": ["*.a.example.net"]}
    assert sts["summary"] == {"total-successful-session-count": 5326, "total-failure-session-count": 303}
    details = sorted(sts["failure-details"], key=lambda d: d["result-type"])
    assert details == [
        {"result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1",
         "receiving-mx-hostname": "mx1.a.example.net", "receiving-ip": "198.51.100.7", "failed-session-count": 100},
        {"result-type": "starttls-not-supported", "sending-mta-ip": "192.0.2.1",
         "receiving-mx-hostname": "mx2.a.example.net", "receiving-ip": "2001:db8::7", "failed-session-count": 203,
         "failure-reason-code": "STARTTLS not offered"},
    ]
    assert none == {"policy": {"policy-type": "no-policy-found", "policy-domain": "a.example.net"},
                    "summary": {"total-successful-session-count": 7, "total-failure-session-count": 0}}


def test_other_days_and_bad_dates(daemon):
    assert [r["domain"] for r in json.loads(get(daemon, "/api/v1/tlsrpt?date=2026-01-03")[2])["reports"]] == \
        ["a.example.net"]
    assert json.loads(get(daemon, "/api/v1/tlsrpt?date=2025-01-01")[2]) == {"date": "2025-01-01", "reports": []}
    for date in ("yesterday", "----------", "2026-13-01", "2026-02-30", "2026-00-10"):  # no day of the calendar
        with pytest.raises(urllib.error.HTTPError) as bad:
            get(daemon, f"/api/v1/tlsrpt?date={date}")
        assert bad.value.code == 400, date
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(daemon, f"/api/v1/tlsrpt?date={DATE}&domain=nowhere.example&format=gzip")
    assert missing.value.code == 404


def test_the_report_as_sent_is_gzip_of_the_json(daemon):
    status, content_type, body = get(daemon, f"/api/v1/tlsrpt?date={DATE}&domain=a.example.net&format=gzip")
    assert (status, content_type) == (200, "application/tlsrpt+gzip")
    assert body[:2] == b"\x1f\x8b"
    report = json.loads(gzip.decompress(body))
    day = json.loads(get(daemon, f"/api/v1/tlsrpt?date={DATE}")[2])
    assert report == day["reports"][0]["report"]


def test_query_parameters_are_percent_decoded(daemon):
    """RFC 3986 2.1: %2D is '-', %2E is '.' (a client library may escape them)."""
    plain = get(daemon, f"/api/v1/tlsrpt?date={DATE}&domain=b.example&format=json")
    escaped = get(daemon, "/api/v1/tlsrpt?date=2026%2D01%2D02&domain=b%2Eexample&%66ormat=json")
    assert escaped[0] == 200 and escaped[2] == plain[2], escaped


def tlsrpt_cli(mailflowd_bin, daemon, *args, stdout=subprocess.PIPE):
    return subprocess.run([mailflowd_bin, "tlsrpt", "--url", daemon.http, *args], stdout=stdout,
                          stderr=subprocess.PIPE, timeout=20)


def test_cli_prints_the_day_and_one_domain(mailflowd_bin, daemon):
    day = tlsrpt_cli(mailflowd_bin, daemon, "--date", DATE)
    assert day.returncode == 0, day.stderr
    assert json.loads(day.stdout) == json.loads(get(daemon, f"/api/v1/tlsrpt?date={DATE}")[2])
    one = tlsrpt_cli(mailflowd_bin, daemon, "--date", DATE, "--domain", "b.example")
    assert one.returncode == 0, one.stderr
    report = json.loads(one.stdout)
    assert report["report-id"] == "2026-01-02.b.example@mx.sender.example"


@pytest.mark.parametrize("date", ["2026-02-30", "2026-13-01", "----------"])
def test_cli_refuses_a_date_that_is_no_day(mailflowd_bin, daemon, date):
    r = tlsrpt_cli(mailflowd_bin, daemon, "--date", date)
    assert r.returncode == 2 and b"--date must be" in r.stderr, r.stderr


def test_a_domain_is_found_whatever_its_case_or_trailing_dot(mailflowd_bin, daemon):
    """Domain names compare without case (the store keeps them lower-case): A.Example.NET. is a.example.net."""
    want = get(daemon, f"/api/v1/tlsrpt?date={DATE}&domain=a.example.net&format=gzip")[2]
    assert get(daemon, f"/api/v1/tlsrpt?date={DATE}&domain=A.Example.NET.&format=gzip")[2] == want
    one = tlsrpt_cli(mailflowd_bin, daemon, "--date", DATE, "--domain", "B.Example")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["report-id"] == "2026-01-02.b.example@mx.sender.example"


def test_cli_gzip_is_the_report_as_sent(mailflowd_bin, daemon, workdir):
    path = workdir / "a.json.gz"
    with open(path, "wb") as f:
        r = tlsrpt_cli(mailflowd_bin, daemon, "--date", DATE, "--domain", "a.example.net", "--format", "gzip", stdout=f)
    assert r.returncode == 0, r.stderr
    sent = get(daemon, f"/api/v1/tlsrpt?date={DATE}&domain=a.example.net&format=gzip")[2]
    assert path.read_bytes() == sent
    assert json.loads(gzip.decompress(sent))["policies"][0]["summary"]["total-successful-session-count"] == 5326


@pytest.mark.parametrize("args, message", [
    (["--date", "yesterday"], "--date must be YYYY-MM-DD"),
    (["--format", "gzip"], "--format gzip needs --domain"),
    (["--format", "xml", "--domain", "a.example.net"], "--format must be json or gzip"),
    (["--domain", "a example"], "--domain must be a domain name"),
    (["--bogus"], "unknown argument"),
    (["--url"], "--url needs a value"),
])
def test_cli_usage_errors(mailflowd_bin, daemon, args, message):
    r = subprocess.run([mailflowd_bin, "tlsrpt", *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r
    assert message in r.stderr and "usage: mailflowd tlsrpt" in r.stderr


ESC = "\x1b"


@pytest.mark.parametrize("command, args", [
    ("tlsrpt", ["--date", ESC + "[2J"]),
    ("tlsrpt", ["--domain", "a" + ESC + "]0;owned" + "\x07"]),
    ("tlsrpt", ["--format", ESC + "[5m", "--domain", "a.example.net"]),
    ("tlsrpt", ["--bogus" + ESC + "[31m"]),
    ("tlsrpt", ["--url", "http://h" + ESC + "[2J:1"]),
    ("report", ["--days", ESC + "[2J"]),
    ("report", ["--format", ESC + "[5m"]),
    ("report", ["--connector", "a" + ESC + "[31m"]),
    ("report", ["--bogus" + ESC + "[31m"]),
    ("report", ["--url", "http://h" + ESC + "[2J:1"]),
    ("report", ["--url", "http://127.0.0.1:1", "--user", "u", "--password-file", "/nonexistent/" + ESC + "[2J"]),
    ("report", ["--config", "/nonexistent/" + ESC + "[2J.yaml"]),  # the loader's error names the file too
    ("tlsrpt", ["--config", "/nonexistent/" + ESC + "[2J.yaml"]),
    ("route", ["--config", "/nonexistent/" + ESC + "[2J.yaml", "--recipient", "a@example.net"]),
    ("mta-sts", ["--config", "/nonexistent/" + ESC + "[2J.yaml", "--domain", "example.net"]),
])
def test_cli_shows_control_bytes_of_a_bad_argument(mailflowd_bin, command, args):
    """A bad argument is echoed as route and mta-sts echo it: its control bytes as \\xNN, never sent to the
    terminal (an escape sequence would clear it, retitle it or recolour it)."""
    r = subprocess.run([mailflowd_bin, command, *args], capture_output=True, timeout=20)
    assert r.returncode in (1, 2) and r.stdout == b"", r
    assert b"\\x1b" in r.stderr, r.stderr
    assert not any((b < 0x20 and b != 0x0A) or b >= 0x7F for b in r.stderr), r.stderr


def test_cli_shows_control_bytes_of_a_servers_answer(mailflowd_bin):
    """An error answer from whatever listens at --url (a proxy, another service) is printed for the user to read:
    its control bytes as \\xNN, its lines still lines."""
    body = b"no" + ESC.encode() + b"[2J such report\r\nsecond" + ESC.encode() + b"]0;t\x07 line\n"
    answer = (b"HTTP/1.1 404 Not\x9b31m Found\r\nContent-Type: text/plain\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def serve():
            for _ in range(2):
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(5)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        for command in ("tlsrpt", "report"):
            r = subprocess.run([mailflowd_bin, command, "--url", f"http://127.0.0.1:{port}"], capture_output=True,
                               timeout=20)
            assert r.returncode == 1 and r.stdout == b"", r
            assert b"answered 404 Not\\x9b31m Found" in r.stderr, r.stderr  # 0x9b: a CSI on 8-bit terminals
            assert b"no\\x1b[2J such report" in r.stderr and b"\nsecond\\x1b]0;t\\x07 line" in r.stderr, r.stderr
            assert not any((b < 0x20 and b != 0x0A) or b >= 0x7F for b in r.stderr), r.stderr
        thread.join(5)


def test_cli_unknown_domain_and_no_daemon(mailflowd_bin, daemon):
    r = tlsrpt_cli(mailflowd_bin, daemon, "--date", DATE, "--domain", "nowhere.example")
    assert r.returncode == 1
    assert b"answered 404" in r.stderr and b"no report for that date and domain" in r.stderr
    down = subprocess.run([mailflowd_bin, "tlsrpt", "--url", f"http://127.0.0.1:{harness.free_port()}"],
                          capture_output=True, text=True, timeout=20)
    assert down.returncode == 1 and "is mailflowd running" in down.stderr, down
    assert subprocess.run([mailflowd_bin, "tlsrpt", "--help"], capture_output=True, timeout=20).returncode == 0


def test_state_is_saved_again_at_shutdown(daemon, workdir):
    daemon.stop()
    saved = (workdir / "mailflowd-state" / "tlsrpt.state").read_text()
    assert saved.startswith("mailflowd-tlsrpt 2\nday 2026-01-02 a.example.net ")
    assert saved.endswith("\nend\n"), "a file cut at a line end could not be told from a whole one"
    assert "failure starttls-not-supported 192.0.2.1 mx2.a.example.net 2001:db8::7 STARTTLS%20not%20offered 203" in saved
