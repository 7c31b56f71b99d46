#!/usr/bin/env bash
# sandbox.sh, which the package tests run in: what a command writes to /etc, /var and /usr there (a system user,
# /etc/mailflowd, a file under /usr and /var/lib) it sees, and the machine does not, after it ended; its exit
# status is passed on; its scratch directory is gone. Where no namespace or overlay can be made (unshare missing,
# mount refusing overlayfs: stand-ins here), the command is not run at all and sandbox.sh fails, naming why.
# Usage: test_sandbox.sh
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root (mount namespaces)"; exit 77; }
sandbox=$(cd "$(dirname "$0")" && pwd)/sandbox.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

name=mfsbx$$  # a user, group and paths of this run only
paths=(/etc/mailflowd-$name /usr/share/mailflowd-$name /var/lib/mailflowd-$name)
getent passwd "$name" >/dev/null && { echo "FAIL: user $name exists before the test"; exit 1; }

status=0
"$sandbox" bash -c "
  set -e
  useradd --system --no-create-home $name
  mkdir ${paths[0]} && touch ${paths[1]} ${paths[2]}
  getent passwd $name && ls -d ${paths[*]} && mountpoint -q \"\$MAILFLOW_PKG_SANDBOX\"
  echo \"scratch: \$MAILFLOW_PKG_SANDBOX\"
  exit 7" >"$tmp/inside.log" 2>&1 || status=$?
[ "$status" -eq 7 ] || fail "sandbox.sh exited $status, not the command's 7: $(cat "$tmp/inside.log")"
grep -q "^$name:" "$tmp/inside.log" || fail "the command did not see the user it made: $(cat "$tmp/inside.log")"
getent passwd "$name" >/dev/null && fail "user $name exists outside the sandbox"
for p in "${paths[@]}"; do [ ! -e "$p" ] || fail "$p exists outside the sandbox"; done
scratch=$(sed -n 's/^scratch: //p' "$tmp/inside.log")
[ -n "$scratch" ] || fail "the command did not see MAILFLOW_PKG_SANDBOX: $(cat "$tmp/inside.log")"
for p in "$scratch" "$scratch.entered"; do [ ! -e "$p" ] || fail "sandbox.sh left $p"; done
echo "ok: the command's user and files stayed in the sandbox, its status passed on"

# No fallback to the real root: stand-ins for unshare (missing) and mount (refusing overlayfs).
mkdir "$tmp/no-unshare" "$tmp/no-overlay"
printf '#!/bin/sh\necho "unshare: unshare failed: Operation not permitted" >&2\nexit 1\n' >"$tmp/no-unshare/unshare"
printf '#!/bin/sh\ncase "$*" in *overlay*) echo "mount: unknown filesystem type overlay" >&2; exit 32;; esac\nexec /bin/mount "$@"\n' \
  >"$tmp/no-overlay/mount"
chmod +x "$tmp/no-unshare/unshare" "$tmp/no-overlay/mount"
for case in no-unshare no-overlay; do
  status=0
  PATH="$tmp/$case:$PATH" "$sandbox" touch "$tmp/ran-$case" >"$tmp/$case.log" 2>&1 || status=$?
  [ "$status" -eq 1 ] || fail "$case: sandbox.sh exited $status, not 1: $(cat "$tmp/$case.log")"
  [ ! -e "$tmp/ran-$case" ] || fail "$case: the command ran without a sandbox"
  grep -q "FAIL: sandbox.sh: " "$tmp/$case.log" || fail "$case: sandbox.sh did not say why: $(cat "$tmp/$case.log")"
done
echo "ok: without unshare or overlayfs the command does not run, and sandbox.sh fails: $(tail -1 "$tmp/no-overlay.log")"

# A test that sources deb_lib.sh goes into the sandbox; a MAILFLOW_PKG_SANDBOX set outside one does not keep it out.
lib=$(dirname "$sandbox")/deb_lib.sh
out=$("$sandbox" bash -c "set -euo pipefail; . $lib; enter_sandbox; echo entered" 2>&1) || true
[ "$out" = entered ] || fail "enter_sandbox inside sandbox.sh: $out"
status=0
out=$(MAILFLOW_PKG_SANDBOX=/tmp bash -c "set -euo pipefail; . $lib; enter_sandbox; echo entered" 2>&1) || status=$?
[ "$status" -eq 1 ] && ! grep -q entered <<<"$out" || fail "enter_sandbox with MAILFLOW_PKG_SANDBOX set by hand: $out"
echo "ok: enter_sandbox: $out"

# Its outer shell killed (SIGKILL: no trap runs) while the command runs: unshare and the command run on, and once
# they end, nothing of the sandbox is left in /tmp (its scratch was the namespace's, not the shell's).
"$sandbox" bash -c "echo \$MAILFLOW_PKG_SANDBOX >$tmp/killed.ready; exec sleep 30" >"$tmp/killed.log" 2>&1 &
outer=$!
for _ in $(seq 100); do [ -s "$tmp/killed.ready" ] && break; sleep 0.1; done
[ -s "$tmp/killed.ready" ] || fail "the command in the sandbox did not start: $(cat "$tmp/killed.log")"
inner=$(pgrep -P "$outer" -x unshare || true)
first=$(ps -o args= -p "$inner" | sed -n 's/.* --inside \([^ ]*\) .*/\1/p')
[ -n "$inner" ] && [ -n "$first" ] || fail "no unshare under sandbox.sh ($outer): $(ps -o pid,ppid,args -e)"
kill -KILL "$outer"
wait "$outer" 2>/dev/null || true
[ -n "$inner" ] && kill -KILL "$inner"  # unshare ignores SIGTERM while it waits; --kill-child: the command with it
for _ in $(seq 100); do kill -0 "$inner" 2>/dev/null || break; sleep 0.1; done
for p in "$first" "$first.entered"; do [ ! -e "$p" ] || fail "sandbox.sh killed by SIGKILL left $p"; done
echo "ok: sandbox.sh killed by SIGKILL left nothing in /tmp (its scratch was $first)"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all sandbox checks passed"
