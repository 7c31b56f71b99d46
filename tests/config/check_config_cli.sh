#!/usr/bin/env bash
# `mailflowd --check-config FILE` as a user runs it: every broken file in tests/config/broken must exit 1 and print
# each of its "# expect: LINE:COL: message" lines as "FILE:LINE:COL: message" on stderr; both shipped examples must
# exit 0 and print the summary on stdout.
# Usage: check_config_cli.sh MAILFLOWD SOURCE_DIR
set -u
bin=${1:?usage: check_config_cli.sh MAILFLOWD SOURCE_DIR}
src=${2:?usage: check_config_cli.sh MAILFLOWD SOURCE_DIR}
bin=$(readlink -f "$bin")
src=$(readlink -f "$src")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }

run() {  # run FILE: sets $status, stdout in $work/out, stderr in $work/err
  timeout 20 "$bin" --check-config "$1" >"$work/out" 2>"$work/err"
  status=$?
}

refused() {  # refused NAME FILE MESSAGE: the check of FILE exits 1 and its errors contain MESSAGE
  run "$2"
  if [ "$status" -eq 1 ] && grep -qF "$3" "$work/err"; then
    passed=$((passed + 1)); echo "ok: $1"
  else
    fail "$1: exit status $status (expected 1 and: $3)"; head -c 2000 "$work/err"; head -c 2000 "$work/out"
  fi
}

for file in "$src"/tests/config/broken/*.yaml; do
  run "$file"
  ok=1
  if [ "$status" -ne 1 ]; then
    fail "$file: exit status $status, expected 1"; ok=0
  fi
  while IFS= read -r expect; do
    if ! grep -qF -- "$file:$expect" "$work/err"; then
      fail "$file: stderr lacks: $file:$expect"; ok=0
    fi
  done < <(sed -n 's/^# expect: //p' "$file")
  if [ "$ok" -eq 0 ]; then
    echo "--- stderr:"; cat "$work/err"; echo "--- stdout:"; cat "$work/out"
  else
    passed=$((passed + 1)); echo "ok: $file"
  fi
done

# The reference example is valid anywhere.
run "$src/config/examples/mailflowd.yaml"
if [ "$status" -eq 0 ] && grep -q "listeners (2):" "$work/out"; then
  passed=$((passed + 1)); echo "ok: mailflowd.yaml"
else
  fail "mailflowd.yaml: exit status $status (expected 0 and a summary)"; cat "$work/err" "$work/out"
fi

# Certificates are loaded the way the daemon loads them, so the tests make real ones (openssl).
certs="$work/certs"
mkdir -p "$certs"
make_pair() {  # make_pair NAME: a self-signed EC certificate NAME.pem and its key NAME.key, valid for a year
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=$1.test" \
    -keyout "$certs/$1.key" -out "$certs/$1.pem" >/dev/null 2>&1 || { echo "openssl req failed"; exit 1; }
}

# The `make run` example resolves run/... against the working directory, as mailflowd does.
mkdir -p "$work/root/run"
make_pair dev
cp "$certs/dev.pem" "$work/root/run/dev-cert.pem"
cp "$certs/dev.key" "$work/root/run/dev-key.pem"
(cd "$work/root" && timeout 20 "$bin" --check-config "$src/config/examples/dev.yaml" >"$work/out" 2>"$work/err")
status=$?
if [ "$status" -eq 0 ] && grep -q "inbound 127.0.0.1:2525" "$work/out"; then
  passed=$((passed + 1)); echo "ok: dev.yaml"
else
  fail "dev.yaml: exit status $status (expected 0 and a summary)"; cat "$work/err" "$work/out"
fi

# --check-config loads every certificate and key (issue #17): garbage and a foreign key fail it (exit 1), as
# they would fail the start or the reload; an expired certificate is a warning (exit 0, the summary printed).
make_pair good
make_pair other
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=expired.test" \
  -keyout "$certs/expired.key" -out "$certs/expired.csr" >/dev/null 2>&1
mkdir -p "$certs/ca"
printf '[ca]\ndefault_ca=c\n[c]\ndatabase=%s/index\nnew_certs_dir=%s\nserial=%s/serial\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n' \
  "$certs/ca" "$certs/ca" "$certs/ca" >"$certs/ca/ca.cnf"
: >"$certs/ca/index"
echo 01 >"$certs/ca/serial"
openssl ca -batch -config "$certs/ca/ca.cnf" -selfsign -keyfile "$certs/expired.key" -in "$certs/expired.csr" \
  -out "$certs/expired.pem" -startdate 20200101000000Z -enddate 20200201000000Z >/dev/null 2>&1
echo "this is not a certificate" >"$certs/garbage.pem"
tls_config() {  # tls_config NAME CERT KEY: a configuration whose listener serves CERT/KEY (line 7, column 18)
  cat >"$work/$1.yaml" <<EOF
listeners:
  - name: inbound
    address: "127.0.0.1:2525"
    upstream: up
    tls:
      certificates:
        - {cert: $2, key: $3}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
EOF
}
check_tls() {  # check_tls NAME CERT KEY STATUS EXPECTED-STDERR-LINE
  tls_config "$1" "$2" "$3"
  run "$work/$1.yaml"
  if [ "$status" -eq "$4" ] && grep -qF -- "$work/$1.yaml:$5" "$work/err"; then
    passed=$((passed + 1)); echo "ok: certificate $1"
  else
    fail "certificate $1: exit status $status (expected $4), stderr lacks: $work/$1.yaml:$5"
    cat "$work/err" "$work/out"
  fi
}
check_tls garbage "$certs/garbage.pem" "$certs/good.key" 1 \
  "7:18: listeners[0].tls.certificates[0]: cannot load certificate $certs/garbage.pem: "
check_tls mismatch "$certs/good.pem" "$certs/other.key" 1 \
  "7:18: listeners[0].tls.certificates[0]: key $certs/other.key does not match certificate $certs/good.pem (key values mismatch)"
check_tls expired "$certs/expired.pem" "$certs/expired.key" 0 \
  "7:18: warning: listeners[0].tls.certificates[0].cert: certificate $certs/expired.pem (CN expired.test) expired on 2020-02-01 00:00:00 UTC"
if ! grep -q "listeners (1):" "$work/out"; then fail "certificate expired: no summary on stdout"; cat "$work/out"; fi
# A key protected by a passphrase: mailflowd cannot ask for one (under systemd there is no terminal, and a reload
# must never wait for a person), so it is an error that says so, and it never prompts, even from a terminal
# (OpenSSL's default prompt blocked the check, and the daemon's reload, on the controlling terminal).
openssl pkey -in "$certs/good.key" -aes256 -passout pass:secret -out "$certs/encrypted.key" 2>/dev/null
check_tls encrypted "$certs/good.pem" "$certs/encrypted.key" 1 \
  "7:18: listeners[0].tls.certificates[0]: key $certs/encrypted.key is encrypted: mailflowd cannot ask for its passphrase; store it unencrypted (openssl pkey -in KEY -out KEY.new), readable only by root and mailflowd"
timeout 10 script -qec "$bin --check-config $work/encrypted.yaml" /dev/null </dev/null >"$work/tty" 2>&1
status=$?
if [ "$status" -eq 1 ] && ! grep -qi "pass phrase" "$work/tty"; then
  passed=$((passed + 1)); echo "ok: encrypted key, from a terminal"
else
  fail "encrypted key from a terminal: exit status $status (expected 1, no prompt; 124: it waited for a passphrase)"
  cat "$work/tty"
fi
tls_config good "$certs/good.pem" "$certs/good.key"
run "$work/good.yaml"
if [ "$status" -eq 0 ] && [ ! -s "$work/err" ]; then
  passed=$((passed + 1)); echo "ok: certificate good"
else
  fail "certificate good: exit status $status, stderr:"; cat "$work/err"
fi

# A cipher list OpenSSL refuses is one error, at the `ciphers` line: it was reported once per certificate, each at
# the certificate's line, which sent the reader to files that were fine.
cat >"$work/ciphers.yaml" <<EOF
listeners:
  - name: inbound
    address: "127.0.0.1:2525"
    upstream: up
    tls:
      certificates:
        - {cert: $certs/good.pem, key: $certs/good.key}
        - {cert: $certs/other.pem, key: $certs/other.key}
      ciphers: "NOPE:ALSO-NOPE"
upstreams:
  - {name: up, address: "127.0.0.1:25"}
EOF
run "$work/ciphers.yaml"
if [ "$status" -eq 1 ] &&
   grep -qF "$work/ciphers.yaml:9:16: listeners[0].tls.ciphers: invalid ciphers 'NOPE:ALSO-NOPE': " "$work/err" &&
   grep -qF "$work/ciphers.yaml: 1 error(s)" "$work/err"; then
  passed=$((passed + 1)); echo "ok: invalid ciphers"
else
  fail "invalid ciphers: exit status $status (expected 1 and one error at 9:16 that names listeners[0].tls.ciphers)"
  cat "$work/err"
fi

# The Web PKI trust store of MTA-STS (mta_sts.ca_file) is loaded at start for every upstream with mta_sts on: a file
# that is readable but holds no certificate fails the start, so it fails the check too, at its line.
cat >"$work/webpki.yaml" <<EOF
listeners:
  - {name: out, address: "127.0.0.1:2525", direction: outbound, upstream: internet}
upstreams:
  - {name: internet, mx: true, tls: opportunistic, mta_sts: enforce}
mta_sts: {ca_file: $certs/garbage.pem}
EOF
refused "mta_sts.ca_file" "$work/webpki.yaml" \
  "$work/webpki.yaml:5:20: mta_sts.ca_file: cannot load the Web PKI trust store $certs/garbage.pem: "

# The CA files of the daemon's own HTTPS requests are loaded as those requests load them: mta_sts.ca_file for the
# policy fetches also where the upstream is tls: verify (its handshakes use its own ca_file, so the file was never
# loaded and every fetch failed), and tlsrpt.ca_file while tlsrpt.send is true (every https: report failed).
cat >"$work/verify-sts.yaml" <<EOF
listeners:
  - {name: out, address: "127.0.0.1:2525", direction: outbound, upstream: internet}
upstreams:
  - {name: internet, mx: true, tls: verify, ca_file: $certs/good.pem, mta_sts: enforce}
mta_sts: {ca_file: $certs/garbage.pem}
EOF
refused "mta_sts.ca_file beside tls: verify" "$work/verify-sts.yaml" \
  "$work/verify-sts.yaml:5:20: mta_sts.ca_file: cannot load $certs/garbage.pem: "
cat >"$work/tlsrpt-ca.yaml" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
tlsrpt: {send: true, ca_file: $certs/garbage.pem}
EOF
refused "tlsrpt.ca_file" "$work/tlsrpt-ca.yaml" \
  "$work/tlsrpt-ca.yaml:5:31: tlsrpt.ca_file: cannot load $certs/garbage.pem: "

# http.tls is loaded by the HTTP server at OpenSSL's default security level, not at a listener's @SECLEVEL=0: a
# certificate with a 512-bit key fails the start there, so it fails the check too (it passed, then the start failed).
openssl req -x509 -newkey rsa:512 -nodes -days 365 -subj "/CN=weak.test" \
  -keyout "$certs/weak.key" -out "$certs/weak.pem" >/dev/null 2>&1
cat >"$work/weakhttp.yaml" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
http:
  tls: {cert: $certs/weak.pem, key: $certs/weak.key}
EOF
refused "http.tls weak certificate" "$work/weakhttp.yaml" \
  "$work/weakhttp.yaml:6:15: http.tls: cannot load certificate $certs/weak.pem: ee key too small"

# Warnings (a connector that never matches) are printed with file:line:col and do not fail the check.
cat >"$work/shadowed.yaml" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
connectors:
  - {name: everything, direction: inbound}
  - {name: partner, direction: inbound, match: {client_cidrs: ["192.0.2.0/24"]}}
EOF
run "$work/shadowed.yaml"
if [ "$status" -eq 0 ] && grep -qF "$work/shadowed.yaml:7:12: warning: connectors[1]: connector \"partner\" never matches" "$work/err" \
  && grep -qF "$work/shadowed.yaml: 1 warning(s)" "$work/err" && grep -q "connectors" "$work/out"; then
  passed=$((passed + 1)); echo "ok: warnings"
else
  fail "warnings: exit status $status (expected 0 and the warning)"; cat "$work/err" "$work/out"
fi

# timeouts.upstream_open no longer than one connect attempt: a warning at its value, not an error.
cat >"$work/open.yaml" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
timeouts: {upstream_connect: 30s, upstream_open: 20s}
EOF
run "$work/open.yaml"
if [ "$status" -eq 0 ] && grep -qF "$work/open.yaml:5:50: warning: timeouts.upstream_open (20s) is not longer than" "$work/err"; then
  passed=$((passed + 1)); echo "ok: upstream_open warning"
else
  fail "upstream_open warning: exit status $status (expected 0 and the warning)"; cat "$work/err" "$work/out"
fi

# match.sni where no listener of the connector offers STARTTLS: no client sends an SNI there, so the connector never
# matches (the reference example's partner-contoso did, its listener's tls: commented out). A warning at match.sni;
# with a tls: listener beside the plain one it matches there, and nothing is said.
cat >"$work/sni.yaml" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", upstream: up}
  - {name: secure, address: "127.0.0.1:2526", upstream: up, tls: {certificates: [{cert: $certs/good.pem, key: $certs/good.key}]}}
upstreams:
  - {name: up, address: "127.0.0.1:25"}
connectors:
  - {name: partner, match: {listener: inbound, sni: ["mx1.example.org"]}}
  - {name: partner-any, direction: inbound, match: {sni: ["mx2.example.org"]}}
EOF
run "$work/sni.yaml"
if [ "$status" -eq 0 ] && grep -qF "$work/sni.yaml:7:53: warning: connectors[0].match.sni: listener \"inbound\" offers no STARTTLS (no tls: block), so no client sends an SNI there and connector \"partner\" never matches" "$work/err" \
  && grep -qF "$work/sni.yaml: 1 warning(s)" "$work/err"; then
  passed=$((passed + 1)); echo "ok: sni warning"
else
  fail "sni warning: exit status $status (expected 0 and one warning at connectors[0].match.sni)"; cat "$work/err" "$work/out"
fi

# A file that does not exist is an error too.
refused "missing file" "$work/missing.yaml" \
  "$work/missing.yaml: cannot read the configuration"

# A file larger than any configuration (16 MiB) is refused without being read whole: a valid one padded with a
# comment to one byte over the bound.
{ cat "$work/good.yaml"; printf '#'; head -c $((16 * 1024 * 1024)) /dev/zero | tr '\0' x; echo; } >"$work/huge.yaml"
refused "file over 16 MiB" "$work/huge.yaml" \
  "$work/huge.yaml: the configuration is larger than 16 MiB"

# An upstream that reaches one of the listeners is one check (upstream_loops, the daemon's: the loader passes the
# file) for --check-config, start and `mailflowd route`: the same line, at the address's file:line:col. connect()
# takes 0.0.0.0 as this host's loopback address: the upstream is the listener itself, its mail a loop.
loop="$work/upstream-loop.yaml"
cat >"$loop" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", upstream: up}
upstreams:
  - {name: up, address: "0.0.0.0:2525"}
EOF
loop_line="$loop:4:25: upstreams[0].address: \"0.0.0.0:2525\" reaches mailflowd's own listener \"inbound\" (\"127.0.0.1:2525\") on this host: its mail would come back to it, in a loop"
refused "upstream that is a listener" "$loop" "$loop_line"
timeout 20 "$bin" --config "$loop" >"$work/out" 2>"$work/err"
status=$?
if [ "$status" -eq 1 ] && grep -q "startup_failed" "$work/err" && grep -qF "${loop_line//\"/\\\"}" "$work/err"; then
  passed=$((passed + 1)); echo "ok: start refused on an upstream that is a listener"
else
  fail "start with an upstream that is a listener: exit status $status (expected 1, startup_failed and the line)"
  head -c 2000 "$work/err"
fi
timeout 20 "$bin" route --config "$loop" --recipient user@example.org >"$work/out" 2>"$work/err"
status=$?
if [ "$status" -eq 1 ] && grep -qxF "$loop_line" "$work/err" && [ ! -s "$work/out" ]; then
  passed=$((passed + 1)); echo "ok: route refused on an upstream that is a listener"
else
  fail "route with an upstream that is a listener: exit status $status (expected 1 and the line)"
  head -c 2000 "$work/err"; head -c 2000 "$work/out"
fi

# An upstream at an address of this host on a 0.0.0.0 listener's port is mailflowd itself: its mail would loop.
# The loader cannot see the interfaces (the daemon reads them), so this needs one of the host's own addresses;
# nothing connects to it.
own=$(ip -o -4 addr show scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
if [ -n "$own" ]; then
  cat >"$work/own-address.yaml" <<EOF
listeners:
  - {name: inbound, address: "0.0.0.0:2525", upstream: up}
upstreams:
  - {name: up, address: "$own:2525"}
EOF
  refused "upstream at an address of this host" "$work/own-address.yaml" \
    "$work/own-address.yaml:4:25: upstreams[0].address: \"$own:2525\" reaches mailflowd's own listener \"inbound\" (\"0.0.0.0:2525\") on this host: its mail would come back to it, in a loop"
  # The daemon refuses to start on it too, before it binds anything (the check comes with the configuration).
  timeout 20 "$bin" --config "$work/own-address.yaml" >"$work/out" 2>"$work/err"
  status=$?
  if [ "$status" -eq 1 ] && grep -q "startup_failed" "$work/err" &&
     grep -qF "$work/own-address.yaml:4:25: upstreams[0].address: \\\"$own:2525\\\" reaches mailflowd's own listener" "$work/err"; then
    passed=$((passed + 1)); echo "ok: start refused on an upstream at an address of this host"
  else
    fail "start with an upstream at an address of this host: exit status $status (expected 1 and startup_failed)"
    head -c 2000 "$work/err"
  fi
else
  fail "upstream at an address of this host: the host has no global IPv4 address (ip -o -4 addr)"
fi

# A second file (or anything else) after --check-config FILE is a usage error, not silently left unchecked.
timeout 20 "$bin" --check-config "$work/good.yaml" "$work/garbage.yaml" >"$work/out" 2>"$work/err"
status=$?
if [ "$status" -eq 2 ] && grep -qF "unexpected argument '$work/garbage.yaml' after --check-config FILE" "$work/err"; then
  passed=$((passed + 1)); echo "ok: argument after the file"
else
  fail "argument after the file: exit status $status (expected 2)"; cat "$work/err" "$work/out"
fi

# An empty file name is a missing value, as no value at all is: a usage error (2), not "cannot read the
# configuration: No such file or directory" (1) for a file named "".
for args in "--config=" "--check-config=" "--config ''" "--check-config ''" "-c ''"; do
  eval "timeout 20 \"\$bin\" $args" >"$work/out" 2>"$work/err"
  status=$?
  name=${args%%[= ]*}
  if [ "$status" -eq 2 ] && grep -qxF "mailflowd: $name needs a value" "$work/err"; then
    passed=$((passed + 1)); echo "ok: empty value of $args refused"
  else
    fail "empty value of $args: exit status $status (expected 2 and \"$name needs a value\")"; cat "$work/err"
  fi
done

# The subcommands that read the daemon's configuration take an empty --config/-c as a missing one too (before:
# ": cannot read the configuration: No such file or directory", "cannot use --config ", exit 1).
for args in "report --config=" "tlsrpt -c ''" "mta-sts --domain example.org --config="; do
  eval "timeout 20 \"\$bin\" $args" >"$work/out" 2>"$work/err"
  status=$?
  sub=${args%% *}
  case "$args" in *-c\ *) name=-c ;; *) name=--config ;; esac
  if [ "$status" -eq 2 ] && grep -qxF "mailflowd $sub: $name needs a value" "$work/err"; then
    passed=$((passed + 1)); echo "ok: empty value of $args refused"
  else
    fail "empty value of $args: exit status $status (expected 2 and \"$name needs a value\")"; cat "$work/err"
  fi
done

# So do report's and tlsrpt's --ca-file, --password-file and --user: an empty --ca-file fell back to the system trust
# store without a word, an empty --password-file said "cannot read a password from --password-file " (exit 1), an
# empty --user replaced --config's http.basic_auth user with "" and sent the password as ":password" (exit 1 on
# the 401, or 0 against a daemon without basic_auth, the mistake unseen).
for args in "report --ca-file=" "tlsrpt --ca-file ''" "report --password-file=" "tlsrpt --password-file ''" \
  "report --user=" "tlsrpt --user ''"; do
  eval "timeout 20 \"\$bin\" $args" >"$work/out" 2>"$work/err"
  status=$?
  sub=${args%% *}
  name=${args#* }
  name=${name%%[= ]*}
  if [ "$status" -eq 2 ] && grep -qxF "mailflowd $sub: $name needs a value" "$work/err"; then
    passed=$((passed + 1)); echo "ok: empty value of $args refused"
  else
    fail "empty value of $args: exit status $status (expected 2 and \"$name needs a value\")"; cat "$work/err"
  fi
done

# route's --listener and --client too: an empty --listener routed as the default listener (the first outbound one,
# else the first), an empty --client as mail from no address, exit 0, the route of other mail shown.
two="$work/two-listeners.yaml"
cat >"$two" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", direction: inbound, upstream: up}
  - {name: outbound, address: "127.0.0.1:2526", direction: outbound, upstream: up}
upstreams:
  - {name: up, address: "192.0.2.1:25"}
EOF
for args in "--listener=" "--listener ''" "--client=" "--client ''"; do
  eval "timeout 20 \"\$bin\" route --config \"\$two\" --recipient user@example.org $args" >"$work/out" 2>"$work/err"
  status=$?
  name=${args%%[= ]*}
  if [ "$status" -eq 2 ] && grep -qxF "mailflowd route: $name needs a value" "$work/err" && [ ! -s "$work/out" ]; then
    passed=$((passed + 1)); echo "ok: empty value of route $args refused"
  else
    fail "empty value of route $args: exit status $status (expected 2 and \"$name needs a value\")"
    cat "$work/err" "$work/out"
  fi
done

# What it echoes of a file name or an argument is text: a control byte (an escape sequence that would clear the
# terminal) is shown as \xNN, as the commands show theirs.
esc=$(printf '\033')
refused "control bytes of a file name shown" "$work/${esc}[2J.yaml" \
  "$work/\x1b[2J.yaml: cannot read the configuration"
timeout 20 "$bin" "--${esc}[2J" >"$work/out" 2>"$work/err"
status=$?
if [ "$status" -eq 2 ] && grep -qF "unknown argument '--\x1b[2J'" "$work/err" && ! grep -q "$esc" "$work/err"; then
  passed=$((passed + 1)); echo "ok: control bytes of an argument shown"
else
  fail "control bytes of an argument: exit status $status (expected 2 and \\x1b)"; cat -v "$work/err"
fi

# A password hash whose one check takes longer than a scrape may wait: $2b$31 is days of one CPU, holding the
# password thread and the exit at SIGTERM (it was taken, exit 0). Refused with its cost and the bound; 15 is taken.
for cost in 31 16 15; do
  cat >"$work/cost.yaml" <<EOF
listeners:
  - {name: inbound, address: "127.0.0.1:2525", direction: inbound, upstream: up}
upstreams:
  - {name: up, address: "192.0.2.1:25"}
http:
  address: "127.0.0.1:9025"
  basic_auth: {user: prom, password_hash: "\$2b\$$cost\$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS"}
EOF
  if [ "$cost" -gt 15 ]; then
    refused "bcrypt cost $cost refused" "$work/cost.yaml" \
      "http.basic_auth.password_hash: bcrypt cost $cost is over 15, the most a password check may take"
  else
    run "$work/cost.yaml"
    if [ "$status" -eq 0 ]; then
      passed=$((passed + 1)); echo "ok: bcrypt cost $cost taken"
    else
      fail "bcrypt cost $cost: exit status $status (expected 0)"; cat "$work/err"
    fi
  fi
done

echo "check-config: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
