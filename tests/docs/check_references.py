#!/usr/bin/env python3
"""Checks what the docs tell operators to type or grep for against what the code has (issue #17 item 10).

1. Every `mailflowd ...` command line quoted in docs/, README.md, the man pages and the alert rules' texts
   uses only options that the binary declares: `mailflowd --help` for the daemon and for each subcommand
   (its usage line `mailflowd SUB ...`), `mailflowd report --help` for the report in full.
2. The man page mailflowd(8) lists every option that these --help texts declare, and every path that the HTTP
   server answers (the string literals of daemon/http_server.cpp). The parsers accept exactly the options that
   --help declares, short forms included: every single-letter option and every "--name" literal of daemon/ is
   tried on the daemon and on each subcommand (before a last argument that none knows, so nothing runs), and
   one that is not refused as unknown must be declared by that --help (and one declared must not be refused).
3. Every log key quoted there (`key=value` outside PromQL/Alertmanager selectors, in prose, inline code and
   fenced log lines or greps) is a field that the daemon logs: the field names of every log_event/log_limited
   call in daemon/ plus what daemon/log.cpp adds itself (suppressed=).
4. Every key of a mailflowd configuration quoted in a YAML block of docs/, the man pages or README.md (a block
   whose top-level keys include one of the configuration's) is a key that docs/configuration.md documents, which
   the config unit test holds to be exactly the keys the loader accepts; other YAML (Prometheus, Kubernetes) is
   left alone.
5. mailflowd.yaml(5) describes only such keys, and every default it states is configuration.md's (which the config
   test holds to the loader's own defaults); its LIMITS and TIMEOUTS tables have a row for every limits.* and
   timeouts.* key that configuration.md documents.

6. Every event the daemon logs (the event name of every log_event/log_limited call in daemon/) is named in the docs
   (`event` or `event key=...` in backticks), and every name the docs call a log line or event ("the `reloaded`
   line", "logged `dns_unavailable`", "a `config_warning` event") is one the daemon logs.

7. Every `mailflowd report --days N` (and `?days=N` of a report path) asks for at most the default
   `telemetry.window` (configuration.md's default): more is refused with 400 ("days must be an integer from 1 to
   7"), so an example with `--days 30` fails on every daemon that did not lengthen its window.

Before it reads the docs it runs the same checks on the two mistakes that shipped (`tls_version=TLS1.0` and an
unknown report option), a misspelt configuration key and a wrong man page default, and fails if they would have
passed, so the checker itself can fail.

Usage: check_references.py --binary build/dev/daemon/mailflowd --source .
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import textwrap

import yaml

# key=value vocabularies that are not mailflowd's log: say why when adding one.
NOT_LOG_KEYS = {
    "severity": "Alertmanager routing label (docs/alerting.md: severity=critical)",
    "release": "Kubernetes/Helm label in deploy/kubernetes (release=<helm release>)",
}

# Words the docs call a log line or event that are not mailflowd's log events: say why when adding one.
NOT_EVENTS = {
    "domain": "resolv.conf's `domain` line (docs/configuration.md, upstreams[].address)",
    "search": "resolv.conf's `search` line (docs/configuration.md, upstreams[].address)",
    "nameserver": "resolv.conf's `nameserver` lines (docs/configuration.md, upstreams[].address)",
}

# `key=` as a log key: not part of a longer word, option (--days=7), URL query (?days=7, &x=), variable
# ($x=), path or selector list; not ==, =~ or a quoted PromQL/YAML value (those sit inside {...}, which
# is stripped first, or are label matchers).
LOG_KEY = re.compile(r"(?<![\w.\-$/{,\"'?&])([a-z][a-z0-9_]*)=(?![=~\"'])")
OPTION = re.compile(r"^-{1,2}[a-zA-Z][a-zA-Z0-9-]*")
# The program, also as a path (/usr/sbin/mailflowd, build/dev/daemon/mailflowd); not mailflowd.yaml,
# mailflowd.service, mailflowd@..., /usr/share/mailflowd/, mailflowd's.
MAILFLOWD_WORD = re.compile(r"(?<![\w.\-])mailflowd(?![\w.\-@:/'’(])")


def strip_selectors(line):
    """Drops {...} spans (PromQL selectors, templates, YAML flow maps), innermost first."""
    previous = None
    while previous != line:
        previous = line
        line = re.sub(r"\{[^{}]*\}", "", line)
    return line


def clean_markup(text):
    """scdoc/markdown emphasis and synopsis brackets out of the way: *--url* _URL_ [--days N] -> --url URL --days N"""
    return re.sub(r"[*_`\[\]|]", " ", text.replace("\\_", "_"))


def declared_options(help_text):
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)", help_text))


def commands_in(line, subcommands=("report",)):
    """Yields (subcommand or None, [options]) for every `mailflowd ...` command on a line."""
    for m in MAILFLOWD_WORD.finditer(line):
        before = line[:m.start()].split()
        if before and not before[-1].endswith("/") and OPTION.match(before[-1]):
            continue  # an option's value: the user or unit (journalctl -u mailflowd -f, install -o mailflowd)
        tokens = clean_markup(line[m.end():]).split()
        sub = None
        if tokens and tokens[0] in subcommands:
            sub = tokens[0]
            tokens = tokens[1:]
        options = []
        expect_value = False
        for token in tokens:
            if OPTION.match(token):
                options.append(OPTION.match(token).group(0))
                expect_value = "=" not in token
            elif expect_value and re.match(r"^[\w/.:<>@,=-]+$", token):
                expect_value = False  # the option's value
            else:
                break
        if sub or options:
            yield sub, options


def check_commands(lines, options_of):
    """options_of: {None: the daemon's options, "report": ..., other subcommands: ...}"""
    errors = []
    subcommands = tuple(s for s in options_of if s)
    for where, line in lines:
        for sub, options in commands_in(line, subcommands):
            allowed = options_of[sub]
            for option in options:
                if option not in allowed:
                    what = f"mailflowd {sub}" if sub else "mailflowd"
                    errors.append(f"{where}: {what} has no option {option} (its --help declares "
                                  f"{', '.join(sorted(allowed))}): {line.strip()}")
    return errors


def check_log_keys(lines, log_keys):
    errors = []
    for where, line in lines:
        for m in LOG_KEY.finditer(strip_selectors(line)):
            key = m.group(1)
            if key not in log_keys and key not in NOT_LOG_KEYS:
                errors.append(f"{where}: log key {key}= is not a field mailflowd logs (it logs "
                              f"{', '.join(sorted(log_keys))}); if this is not a log key, add it to "
                              f"NOT_LOG_KEYS in {os.path.basename(__file__)} with the reason: {line.strip()}")
    return errors


def source_log_keys(source):
    """The field names of every log_event/log_limited call in daemon/, and the keys log.cpp adds itself."""
    keys = set()
    for path in sorted(glob.glob(os.path.join(source, "daemon", "**", "*.[ch]pp"), recursive=True)):
        text = open(path, encoding="utf-8").read()
        for call in re.finditer(r"\blog_(?:event|limited)\s*\(", text):
            depth, i = 1, call.end()
            while depth and i < len(text):
                c = text[i]
                if c == '"':  # skip string literals (a ')' inside one is not the end)
                    i += 1
                    while text[i] != '"':
                        i += 2 if text[i] == "\\" else 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                i += 1
            keys.update(re.findall(r'\{\s*"([a-z][a-z0-9_]*)"\s*,', text[call.end():i]))
        if os.path.basename(path) == "log.cpp":
            keys.update(re.findall(r'" ([a-z][a-z0-9_]*)="', text))  # line += " suppressed=" + ...
    return keys


LOG_CALL = re.compile(r"\blog_(?:event|limited)\s*\(\s*LogLevel::")
LOG_EVENT = re.compile(r'\blog_(?:event|limited)\s*\(\s*LogLevel::\w+\s*,\s*"([a-z][a-z0-9_]*)"')
# An event named in backticks: `reload_refused`, `internal_error component=... error=...`.
EVENT_NAMED = r"`{}[` \n]"
# What the docs call a log line or event: "logged `x`", "logs a `x` warning", "the `x` line", "a `x` (level warn) event".
EVENT_REFERENCE = re.compile(r"(?:\blog(?:s|ged)?(?: as| with)?(?: an?| the| its| one)? `([a-z][a-z0-9_]*)[` ])|"
                             r"(?:`([a-z][a-z0-9_]*)`(?: \((?:level )?[a-z, -]+\))? (?:log )?(?:lines?|events?)\b)")


def source_log_events(source):
    """{event: "daemon/file.cpp:line"} of every log_event/log_limited call in daemon/; exits when a call's event is
    not a string literal (it could not be checked)."""
    events = {}
    for path in sorted(glob.glob(os.path.join(source, "daemon", "**", "*.[ch]pp"), recursive=True)):
        text = open(path, encoding="utf-8").read()
        calls = [m.start() for m in LOG_CALL.finditer(text)]
        found = list(LOG_EVENT.finditer(text))
        if len(found) != len(calls):
            unread = sorted(set(calls) - {m.start() for m in found})
            sys.exit(f"FAIL: {os.path.relpath(path, source)}:{text[:unread[0]].count(chr(10)) + 1}: a log call whose "
                     "event is not a string literal; the docs check cannot read it")
        for m in found:
            events.setdefault(m.group(1), f"{os.path.relpath(path, source)}:{text[:m.start()].count(chr(10)) + 1}")
    return events


def check_log_events(lines, events, named_in=None):
    """Every event is named in `named_in` (default: `lines`); every name that `lines` call a log line or event is
    an event."""
    errors = []
    text = "\n".join(line for _, line in (lines if named_in is None else named_in))
    for event, where in sorted(events.items()):
        if not re.search(EVENT_NAMED.format(event), text):
            errors.append(f"{where}: the daemon logs the event {event}, which no doc names (docs/operations.md "
                          "\"Logs\", or where the case it reports is described)")
    for where, line in lines:
        for m in EVENT_REFERENCE.finditer(line):
            name = m.group(1) or m.group(2)
            if name not in events and name not in NOT_EVENTS:
                errors.append(f"{where}: `{name}` is called a log line or event, but the daemon logs no such event "
                              f"(its events: {', '.join(sorted(events))}); if it is no log event, add it to "
                              f"NOT_EVENTS in {os.path.basename(__file__)} with the reason: {line.strip()}")
    return errors


# `mailflowd report ... --days N` (also --days=N), and ?days=N / &days=N in a report URL; N is group 1 or 2.
DAYS = re.compile(r"mailflowd\s+report\b[^|>;&#]*?--days[= ]+(\d+)|/api/v1/[a-z.]+\?(?:[^ `]*&)?days=(\d+)")


def window_days(config_keys):
    """The default telemetry.window in days, from configuration.md's table ("`7d`")."""
    m = re.fullmatch(r"`(\d+)d`", config_keys.get("telemetry.window", ""))
    if not m:
        sys.exit(f"FAIL: cannot read the default telemetry.window from docs/configuration.md: "
                 f"{config_keys.get('telemetry.window')!r}")
    return int(m.group(1))


def check_days(lines, window):
    """Every report command or URL that asks for days asks for no more than the default window."""
    errors = []
    for where, line in lines:
        for m in DAYS.finditer(clean_markup(line) if "mailflowd" in line else line):
            days = int(m.group(1) or m.group(2))
            if days > window:
                errors.append(f"{where}: asks for {days} days, but the report covers at most telemetry.window, "
                              f"{window} days unless the configuration sets a longer one (the daemon answers 400, "
                              f"`mailflowd report` exits 1); ask for {window} or fewer: {line.strip()}")
    return errors


def doc_lines(source):
    """(file:line, text) of everything an operator reads: docs/ (markdown and man pages), README.md and the
    shipped alert rules (their descriptions name log keys and commands)."""
    paths = sorted(glob.glob(os.path.join(source, "docs", "**", "*.md"), recursive=True))
    paths += sorted(glob.glob(os.path.join(source, "docs", "man", "*.scd")))
    paths += [os.path.join(source, "README.md")]
    paths += sorted(glob.glob(os.path.join(source, "deploy", "prometheus", "*.yml")))
    paths += [os.path.join(source, "deploy", "kubernetes", "prometheusrule.yaml")]
    for path in paths:
        if not os.path.exists(path):
            continue
        rel = os.path.relpath(path, source)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield f"{rel}:{n}", line


def documented_config_keys(source):
    """{key path: default cell} of docs/configuration.md's tables ("listeners[].tls.min_version": "`TLS1.0`")."""
    keys = {}
    with open(os.path.join(source, "docs", "configuration.md"), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^\| `([a-z0-9_.\[\]]+)` \| (?:.*?) \| (.*?) \|", line)
            if m:
                keys[m.group(1)] = m.group(2)
    return keys


def man_config_entries(text, config_keys):
    """(line, key path, stated default or None) of every key that mailflowd.yaml(5) describes: `*key*` alone on a
    line (nested by tabs under its section, or a dotted path), "*key* (default _x_)" inline, and the rows of the
    LIMITS and TIMEOUTS tables. The default is the first _literal_ after "Default:" in the key's paragraph."""
    entries = []
    prefix, stack, current = None, [], None
    lines = text.replace("\\_", "\0").splitlines()

    def literal(value):
        return value.replace("\0", "_") if value is not None else None

    def add(n, path, default=None):
        entries.append([n, path, literal(default)])
        return entries[-1]

    paragraph = []

    def close():
        if current is not None and current[2] is None:
            m = re.search(r"Default:\s*_([^_]+)_", " ".join(paragraph))
            current[2] = literal(m.group(1)) if m else None
        paragraph.clear()

    for n, line in enumerate(lines, 1):
        m = re.match(r"^# (.+)$", line)
        if m:
            close()
            current, stack = None, []
            name = m.group(1).lower().replace("-", "_").replace(" ", "_")
            prefix = "" if name == "top_level" else name + "[]" if f"{name}[].name" in config_keys else \
                name if any(k.startswith(name + ".") for k in config_keys) else None
            continue
        if prefix is None:
            continue
        m = re.match(r"^(\t*)\*([a-z_][a-z0-9_.]*)\*$", line)
        if m:
            close()
            depth, key = len(m.group(1)), m.group(2)
            while stack and stack[-1][0] >= depth:
                stack.pop()
            parent = stack[-1][1] if stack else prefix
            path = key if "." in key or not parent else f"{parent}.{key}"
            stack.append((depth, path))
            current = add(n, path)
            continue
        inline = re.findall(r"\*([a-z0-9_]+)\* \(default _([^_]+)_\)", line)
        if inline:
            depth = len(line) - len(line.lstrip("\t"))
            parent = next((p for d, p in reversed(stack) if d < depth), prefix)
            for key, default in inline:
                add(n, f"{parent}.{key}", default)
            continue
        m = re.match(r"^\|  ([a-z_]+)$", line)
        if m and n < len(lines) and lines[n].startswith(":[ "):
            add(n, f"{prefix}.{m.group(1)}", lines[n][3:].strip())
            continue
        paragraph.append(line)
    close()
    return [tuple(e) for e in entries]


def check_man_config(entries, config_keys, where):
    """The keys mailflowd.yaml(5) describes are accepted, and the defaults it states are configuration.md's."""
    errors = []
    for n, path, default in entries:
        if path not in config_keys:
            errors.append(f"{where}:{n}: describes key {path}, which docs/configuration.md does not document "
                          "(and the loader refuses)")
        elif default is not None:
            documented = re.findall(r"`([^`]+)`", config_keys[path])
            if not documented or documented[0] != default:
                errors.append(f"{where}:{n}: {path} default _{default}_, but docs/configuration.md (held to the "
                              f"loader's defaults by the config test) says: {config_keys[path]}")
    return errors


def key_paths(node, prefix=""):
    """Every key path of a parsed YAML document, lists as "[]": {"listeners": [{"name": x}]} -> listeners,
    listeners[].name."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from key_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            yield from key_paths(item, prefix + "[]")


def check_config_blocks(blocks, config_keys):
    """blocks: [(where, yaml text)]. The keys of every block that is a mailflowd configuration must be documented."""
    errors = []
    top = {k for k in config_keys if "." not in k and "[" not in k}
    for where, text in blocks:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as e:
            errors.append(f"{where}: the YAML example does not parse: {e}")
            continue
        if not isinstance(document, dict) or not set(map(str, document)) & top:
            continue  # not a mailflowd configuration
        for path in key_paths(document):
            if path not in config_keys:
                errors.append(f"{where}: the configuration example has key {path}, which docs/configuration.md "
                              "does not document (and the loader refuses)")
    return errors


def yaml_blocks(source):
    """(file:line, text) of every ```yaml block in docs/ and README.md, and the YAML blocks of the man pages."""
    paths = sorted(glob.glob(os.path.join(source, "docs", "**", "*.md"), recursive=True))
    paths += [os.path.join(source, "README.md")]
    for path in paths:
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"^([ \t]*)```ya?ml\n(.*?)^\1```", text, re.S | re.M):  # also indented in a list
            yield f"{os.path.relpath(path, source)}:{text[:m.start()].count(chr(10)) + 2}", textwrap.dedent(m.group(2))
    # mailflowd.yaml(5)'s EXAMPLE: scdoc's blocks carry no language, so those that are no YAML are left alone.
    for path in sorted(glob.glob(os.path.join(source, "docs", "man", "*.scd"))):
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"^```\n(.*?)^```", text, re.S | re.M):
            try:
                yaml.safe_load(m.group(1))
            except yaml.YAMLError:
                continue
            yield f"{os.path.relpath(path, source)}:{text[:m.start()].count(chr(10)) + 2}", m.group(1)


PROBE_END = "--zz-no-such-option"


def refused_as_unknown(output, option):
    return re.search(r"unknown argument ['\"]" + re.escape(option) + r"['\"]", output) is not None


def probe(binary, sub, *args):
    result = subprocess.run([binary, *([sub] if sub else []), *args], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout + result.stderr


def accepted_options(binary, sub, candidates):
    """{option: (exit status, output)} of the candidates that `mailflowd [SUB] OPTION probe-value
    --zz-no-such-option` does not refuse as unknown. The parsers stop at the first argument they do not know, the
    last one at the latest, so nothing is run."""
    accepted = {}
    for option in sorted(candidates | {PROBE_END}):
        code, output = probe(binary, sub, option, "probe-value", PROBE_END)
        if not refused_as_unknown(output, option):
            accepted[option] = (code, output)
    if PROBE_END in accepted:
        sys.exit(f"FAIL: `mailflowd {sub or ''} {PROBE_END}` is not refused as an unknown argument: the parser "
                 "probe cannot tell accepted options from unknown ones")
    return accepted


def check_parser_options(sub, accepted, declared):
    """Errors for options the parser takes that --help does not declare, and for declared ones it refuses."""
    what = f"mailflowd {sub}" if sub else "mailflowd"
    return ([f"{what} accepts {o}, which its --help does not declare" for o in sorted(accepted - declared)] +
            [f"{what} --help declares {o}, which it refuses as unknown" for o in sorted(declared - accepted)])


def takes_value(option, code, output):
    """Whether `OPTION probe-value ...` took probe-value as the option's value: it did not stop there at once (exit
    0: --help, --version) and did not refuse probe-value as an argument of its own."""
    return option.startswith("--") and code != 0 and not refused_as_unknown(output, "probe-value")


def check_equals_forms(sub, accepted, equals_refused):
    """Errors for the long options with a value that the parser takes as "--name value" and refuses as
    "--name=value" (every parser takes both). equals_refused: {option: whether "OPTION=probe-value" was refused
    as unknown}."""
    what = f"mailflowd {sub}" if sub else "mailflowd"
    return [f"{what} takes {o} VALUE but refuses {o}=VALUE as an unknown argument"
            for o in sorted(accepted) if takes_value(o, *accepted[o]) and equals_refused[o]]


def option_candidates(source):
    """Every single-letter option, and every "--name" string literal in daemon/."""
    letters = {f"-{c}" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names = set()
    for path in glob.glob(os.path.join(source, "daemon", "*.cpp")):
        names |= set(re.findall(r'"(--[a-z][a-z0-9-]*)', open(path, encoding="utf-8").read()))
    return letters | names


def help_of(binary, *args):
    result = subprocess.run([binary, *args, "--help"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        sys.exit(f"FAIL: {binary} {' '.join(args)} --help exited {result.returncode}: {result.stderr}")
    return result.stdout


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--source", required=True)
    args = parser.parse_args()

    main_help = help_of(args.binary)
    # `mailflowd --help` has one usage line per subcommand ("mailflowd report [--url URL] ..."): its options
    # are the subcommand's, not the daemon's. The report's own --help has them all.
    options_of = {None: set()}
    for usage_line in main_help.splitlines():
        m = re.search(r"mailflowd\s+([a-z][a-z-]*)\b", usage_line)
        options_of.setdefault(m.group(1) if m else None, set()).update(declared_options(usage_line))
    for sub in [s for s in options_of if s]:  # a subcommand's own --help, where it has one, is complete
        result = subprocess.run([args.binary, sub, "--help"], capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            options_of[sub] |= declared_options(result.stdout)
    options_of["report"] = declared_options(help_of(args.binary, "report"))
    # `mailflowd --help` says that every subcommand takes -h/--help too.
    if not {"-h", "--help"} <= options_of[None]:
        sys.exit(f"FAIL: `mailflowd --help` does not declare -h and --help:\n{main_help}")
    for sub in [s for s in options_of if s]:
        options_of[sub] |= {"--help", "-h"}
    main_options, report_options = options_of[None], options_of["report"]
    log_keys = source_log_keys(args.source)
    for required in ("--config", "--check-config", "--version"):
        if required not in main_options:
            sys.exit(f"FAIL: cannot read the options from `mailflowd --help` (no {required}):\n{main_help}")
    if "--url" not in report_options or not {"tls", "connector", "result"} <= log_keys:
        sys.exit(f"FAIL: the report options ({report_options}) or log keys ({log_keys}) were not found")

    # The checker must be able to fail: the text that shipped before issue #17 item 10 must be refused.
    old = [("old docs/alerting.md", "the per-session log lines with `tls_version=TLS1.0`, or the"),
           ("old rules", "line with tls_version=TLS1.0) and ask them"),
           ("made-up option", "`mailflowd report --days 7 --tls-only`")]
    if not check_log_keys(old[:1], log_keys) or not check_log_keys(old[1:2], log_keys) \
            or not check_commands(old[2:], options_of):
        sys.exit("FAIL: the checker accepts the known-bad texts; it could not catch a mistake")
    good = [("selector", 'mailflow_window_messages{tls_version="TLS1.0"} and `tls=TLS1.0` in the log'),
            ("options", "mailflowd report --days 7 --format csv > tls-report.csv")]
    if check_log_keys(good, log_keys) or check_commands(good, options_of):
        sys.exit("FAIL: the checker refuses known-good texts")
    events = source_log_events(args.source)
    if not {"session", "reloaded", "reload_refused", "config_warning"} <= set(events):
        sys.exit(f"FAIL: the log events were not found in daemon/: {sorted(events)}")
    known = {"reloaded": "daemon/server.cpp:1", "session": "daemon/relay_session.cpp:1"}
    if len(check_log_events([("bad", "the `reload_failed` line, then a `reloaded` event")], known)) != 2 or \
            check_log_events([("good", "the `reloaded` line; `session id=... tls=TLS1.0`; a `domain` line")], known):
        sys.exit("FAIL: the log event check cannot tell an unnamed or made-up event from named ones")
    config_keys = documented_config_keys(args.source)
    window = window_days(config_keys)
    if len(check_days([("bad", "mailflowd report --days 30 --format csv > tls.csv"),
                       ("bad man", "\tmailflowd report *--days* _30_"),
                       ("bad url", "curl -s 'http://127.0.0.1:9725/api/v1/report.csv?days=30'")], 7)) != 3 or \
            check_days([("good", "mailflowd report --days 7 --format csv; mailflowd report --days N"),
                        ("good url", "`/api/v1/report?days=7`, ?days=%37, `?days=7&days=8`")], 7):
        sys.exit("FAIL: the --days check cannot tell a request beyond the window from one within it")
    man5_text = open(os.path.join(args.source, "docs", "man", "mailflowd.yaml.5.scd"), encoding="utf-8").read()
    man5 = man_config_entries(man5_text, config_keys)
    bad_man = ("# LIMITS\n\n[[ *Key*\n:[ *Default*\n|  max_sessions\n:[ 1000\n\n"  # 10000, and a misspelt key
               "# LOG\n\n*log.levle*\n\tDefault: _info_.\n")
    if len(check_man_config(man_config_entries(bad_man, config_keys), config_keys, "bad")) != 2 or \
            len(man5) < 60 or not any(path == "listeners[].tls.min_version" and default == "TLS1.0"
                                      for _, path, default in man5):
        sys.exit(f"FAIL: cannot read the keys and defaults of mailflowd.yaml(5), or the check cannot fail: {man5}")
    if not check_config_blocks([("typo", "limits:\n  max_session: 10\n")], config_keys) or check_config_blocks(
            [("good", "limits: {max_sessions: 10}\nlisteners:\n  - {name: a, tls: {min_version: TLS1.2}}\n"),
             ("prometheus", "scrape_configs:\n  - job_name: mailflowd\n")], config_keys):
        sys.exit("FAIL: the configuration-example check cannot tell a wrong key from right ones")

    # The parsers against --help: the probe must see an undeclared short form, and a declared option refused.
    if check_parser_options(None, {"--config", "--version"}, {"--config", "--version"}) or \
            len(check_parser_options(None, {"--config", "-V"}, {"--config", "--version"})) != 2:
        sys.exit("FAIL: the parser check cannot tell an undeclared or a refused option from declared ones")
    bad_parse = {"--config": (2, "mailflowd: unexpected argument '--zz-no-such-option'"),
                 "--version": (0, "mailflowd 1.0"), "--insecure": (2, "unknown argument 'probe-value'")}
    if check_equals_forms(None, bad_parse, {"--config": False, "--version": True, "--insecure": True}) or \
            len(check_equals_forms(None, bad_parse, {"--config": True, "--version": True, "--insecure": True})) != 1:
        sys.exit("FAIL: the parser check cannot tell a refused --name=value form of an option with a value")
    candidates = option_candidates(args.source)
    parser_errors = []
    for sub, declared_by_help in options_of.items():
        accepted = accepted_options(args.binary, sub, candidates)
        parser_errors += check_parser_options(sub, set(accepted), declared_by_help)
        equals_refused = {o: refused_as_unknown(probe(args.binary, sub, f"{o}=probe-value", PROBE_END)[1],
                                                f"{o}=probe-value")
                          for o in accepted if takes_value(o, *accepted[o])}
        parser_errors += check_equals_forms(sub, accepted, equals_refused)

    lines = list(doc_lines(args.source))
    errors = parser_errors + check_commands(lines, options_of) + check_log_keys(lines, log_keys)
    # Every event is named in the docs an operator reads (the rules' texts are no place for that).
    errors += check_log_events(lines, events, [(w, ln) for w, ln in lines if not w.startswith("deploy/")])
    blocks = list(yaml_blocks(args.source))
    errors += check_config_blocks(blocks, config_keys)
    errors += check_days(lines, window)
    errors += check_man_config(man5, config_keys, "docs/man/mailflowd.yaml.5.scd")
    # Its LIMITS and TIMEOUTS tables are the whole sections: a key added to configuration.md is added there too.
    described = {path for _, path, _ in man5}
    errors += [f"docs/man/mailflowd.yaml.5.scd: the {key.split('.')[0].upper()} table has no row for {key} "
               "(docs/configuration.md documents it)" for key in config_keys
               if "." in key and key.split(".")[0] in ("limits", "timeouts") and key not in described]

    # The man page lists every option (its OPTIONS section and the report's sub-list).
    man_path = os.path.join(args.source, "docs", "man", "mailflowd.8.scd")
    man = open(man_path, encoding="utf-8").read()
    man_options = set(re.findall(r"\*(--?[a-zA-Z][a-zA-Z0-9-]*)\*", man))
    declared = set().union(*options_of.values())
    for option in sorted(declared):
        if option not in man_options:
            errors.append(f"docs/man/mailflowd.8.scd: does not list {option} (declared by --help)")

    # ...and every path the HTTP server answers (HTTP ENDPOINTS; "_/x_, _.csv_" or "_/x.json_, _.csv_" name /x.csv too).
    paths = set(re.findall(r'"(/[a-z0-9_./]*)"', open(os.path.join(args.source, "daemon", "http_server.cpp"),
                                                        encoding="utf-8").read()))
    if not {"/metrics", "/api/v1/report", "/api/v1/report.csv"} <= paths:
        sys.exit(f"FAIL: cannot read the HTTP paths from daemon/http_server.cpp (found {sorted(paths)})")
    for path in sorted(paths - {"/"}):
        base, dot, ext = path.rpartition(".")
        if f"_{path}_" not in man and f"_{path}?" not in man and \
                not (dot and any(f"_{base}" in ln and f"_.{ext}_" in ln for ln in man.splitlines())):
            errors.append(f"docs/man/mailflowd.8.scd: HTTP ENDPOINTS does not list {path} (daemon/http_server.cpp)")

    commands = sum(1 for _, line in lines for _ in commands_in(line, tuple(s for s in options_of if s)))
    for e in errors:
        print("FAIL:", e)
    print(f"checked {len(lines)} lines: {commands} mailflowd commands against the options of "
          f"{', '.join(f'mailflowd {s}' if s else 'mailflowd' for s in options_of)} "
          f"({len(declared)} in all), log keys against {len(log_keys)} fields the code logs, {len(events)} log events, "
          f"{len(blocks)} YAML examples and the {len(man5)} keys of mailflowd.yaml(5) against the documented "
          "configuration keys and defaults")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
