#!/usr/bin/env bash
# The shipped systemd files are valid and the service is locked down:
#  - `systemd-analyze verify` is silent for mailflowd.service + mailflowd.socket, both as shipped
#    (capability variant) and with the socket-activation drop-in; Documentation= man pages resolve;
#  - `systemd-analyze security --offline=true` rates both variants 1.5 or lower, the socket variant
#    holds no capability, and a copy stripped of its sandboxing rates worse (the parse can fail);
#  - sysusers and tmpfiles files create the user and directories in a scratch root.
# Works without systemd as PID 1: verify/security --offline only read files. The unit's ExecStart
# binary must exist for verify, so a temp copy points at the built binary.
# Usage: test_units.sh MAILFLOWD_BINARY SYSTEMD_SOURCE_DIR MAN_DIR
set -euo pipefail
bin=$1 src=$2 mandir=$3
max_exposure=1.5
command -v systemd-analyze >/dev/null || { echo "SKIP: systemd-analyze not installed"; exit 77; }
[ -x "$bin" ] || { echo "FAIL: $bin is not an executable"; exit 1; }
[ -f "$mandir/man8/mailflowd.8" ] || { echo "FAIL: man pages not built in $mandir (scdoc missing?)"; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# lay_out DIR [DROPIN]: a unit directory with ExecStart/ExecReload rewritten to the built binary.
lay_out() {
  local dir=$1
  mkdir -p "$dir"
  sed "s#/usr/sbin/mailflowd#$bin#g" "$src/mailflowd.service" >"$dir/mailflowd.service"
  cp "$src/mailflowd.socket" "$dir/"
  grep -q "^ExecStart=$bin --config /etc/mailflowd/mailflowd.yaml\$" "$dir/mailflowd.service" ||
    fail "ExecStart is not /usr/sbin/mailflowd --config /etc/mailflowd/mailflowd.yaml"
  if [ $# -gt 1 ]; then
    mkdir -p "$dir/mailflowd.service.d"
    cp "$2" "$dir/mailflowd.service.d/"
  fi
}

verify() {  # verify DIR: must exit 0 and say nothing at all
  local out
  if ! out=$(cd "$1" && MANPATH=$mandir systemd-analyze verify ./mailflowd.service ./mailflowd.socket 2>&1); then
    fail "systemd-analyze verify failed for $1: $out"
  elif [ -n "$out" ]; then
    fail "systemd-analyze verify complained for $1: $out"
  else
    echo "ok: verify $(basename "$1")"
  fi
}

# exposure UNITFILE -> prints the overall exposure number, e.g. 1.5
exposure() {
  local report
  report=$(cd "$(dirname "$1")" && systemd-analyze security --offline=true "./$(basename "$1")" 2>&1) || true
  echo "$report" >"$1.security"
  sed -n 's/^.*Overall exposure level for [^:]*: \([0-9][0-9.]*\) .*$/\1/p' <<<"$report"
}

check_exposure() {  # check_exposure UNITFILE LABEL
  local e
  e=$(exposure "$1")
  if [ -z "$e" ]; then
    fail "$2: no exposure level in: $(cat "$1.security")"
  elif awk -v e="$e" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }'; then
    echo "ok: $2 exposure $e <= $max_exposure"
  else
    grep '✗' "$1.security" || true
    fail "$2: exposure $e > $max_exposure"
  fi
  echo "${e:-99}"  >"$1.exposure"
}

# 1. As shipped: binds port 25 itself with CAP_NET_BIND_SERVICE, nothing more.
lay_out "$tmp/cap"
verify "$tmp/cap"
check_exposure "$tmp/cap/mailflowd.service" "capability variant"
grep -q '✗ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE' "$tmp/cap/mailflowd.service.security" ||
  fail "capability variant: expected exactly CAP_NET_BIND_SERVICE to be flagged"
if grep -E '✗ CapabilityBoundingSet=~CAP_(SYS_ADMIN|SETUID|DAC|CHOWN|NET_ADMIN)' "$tmp/cap/mailflowd.service.security"; then
  fail "capability variant holds more than CAP_NET_BIND_SERVICE"
fi

# 2. Socket activation: systemd binds, the drop-in removes the capability.
lay_out "$tmp/socket" "$src/socket-activation.conf"
verify "$tmp/socket"
check_exposure "$tmp/socket/mailflowd.service" "socket-activation variant"
for line in '✓ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE' '✓ AmbientCapabilities=' '✓ PrivateUsers='; do
  grep -qF "$line" "$tmp/socket/mailflowd.service.security" || fail "socket variant: missing '$line'"
done
awk -v a="$(cat "$tmp/socket/mailflowd.service.exposure")" -v b="$(cat "$tmp/cap/mailflowd.service.exposure")" \
  'BEGIN { exit !(a < b) }' || fail "socket variant is not rated better than the capability variant"
grep -q '^ListenStream=' "$src/mailflowd.socket" || fail "mailflowd.socket has no ListenStream="

# 3. Control: without its sandboxing the same unit must rate above the limit, or the parse proves nothing.
mkdir -p "$tmp/bare"
grep -vE '^(Protect|Private|Restrict|SystemCall|Capability|Ambient|NoNewPriv|MemoryDeny|LockPers|UMask|DevicePolicy|RemoveIPC|ProcSubset)' \
  "$tmp/cap/mailflowd.service" >"$tmp/bare/mailflowd.service"
e=$(exposure "$tmp/bare/mailflowd.service")
if [ -n "$e" ] && awk -v e="$e" -v m="$max_exposure" 'BEGIN { exit !(e > m) }'; then
  echo "ok: control without sandboxing rates $e"
else
  fail "control without sandboxing rated '${e}', expected > $max_exposure"
fi

# 4. sysusers + tmpfiles in a scratch root.
mkdir -p "$tmp/root/etc"
systemd-sysusers --root="$tmp/root" "$src/mailflowd.sysusers" >/dev/null 2>&1 || fail "systemd-sysusers failed"
grep -q '^mailflowd:x:[0-9]*:[0-9]*:.*:/var/lib/mailflowd:/usr/sbin/nologin$' "$tmp/root/etc/passwd" ||
  fail "sysusers did not create a nologin system user mailflowd: $(cat "$tmp/root/etc/passwd" 2>/dev/null)"
systemd-tmpfiles --root="$tmp/root" --create "$src/mailflowd.tmpfiles" || fail "systemd-tmpfiles failed"
uid=$(awk -F: '$1 == "mailflowd" { print $3 }' "$tmp/root/etc/passwd")
[ "$(stat -c '%a %u' "$tmp/root/var/lib/mailflowd" 2>/dev/null)" = "750 $uid" ] ||
  fail "state dir is not 0750 mailflowd"
[ "$(stat -c '%a %u' "$tmp/root/etc/mailflowd/tls" 2>/dev/null)" = "750 0" ] ||
  fail "tls dir is not 0750 root"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all unit checks passed"
