#!/usr/bin/env bash
# sandbox.sh COMMAND [ARG...]: runs COMMAND in a mount namespace of its own where /etc, /var and /usr (and /bin,
# /sbin, /lib* where they are directories, not links into /usr) are overlays over the machine's own: what a
# package test does there (dpkg -i, apt-get purge, a system user, /etc/mailflowd, /var/lib/mailflowd, dpkg's
# database and logs) goes to upper directories on a tmpfs mounted in that namespace alone, which the kernel frees
# when the namespace's last process ends, whatever ends it (a failure, ctest's timeout, SIGKILL). Nothing falls
# back to the real root: when a namespace or an overlay cannot be made, COMMAND is not run and sandbox.sh exits 1.
# After COMMAND, the machine is checked for traces (mailflowd's package status, /etc/mailflowd, /var/lib/mailflowd,
# /usr/sbin/mailflowd, the user and group databases, dpkg's status file): any change fails with exit 1.
# Inside, MAILFLOW_PKG_SANDBOX is set (to the tmpfs). Exits with COMMAND's status otherwise. Needs root.
set -euo pipefail
fail() { echo "FAIL: sandbox.sh: $*" >&2; exit 1; }

if [ "${1:-}" = --inside ]; then  # in the new namespace (unshare below): mount, then become COMMAND
  dir=$2
  shift 2
  touch "$dir/entered"  # outside, where unshare's own failure is told from COMMAND's; under the tmpfs below
  mount -t tmpfs -o mode=0700 mailflowd-sandbox "$dir" || fail "cannot mount a tmpfs on $dir"
  for path in /etc /var /usr /bin /sbin /lib /lib32 /lib64 /libx32; do
    [ -d "$path" ] && [ ! -L "$path" ] || continue
    mkdir -p "$dir/upper$path" "$dir/work$path"
    mount -t overlay mailflowd-sandbox -o "lowerdir=$path,upperdir=$dir/upper$path,workdir=$dir/work$path" \
      "$path" || fail "cannot mount an overlay (overlayfs) on $path: not running $1 on the real root"
  done
  # The tmpfs moves to a directory of the /var overlay (the overlays keep their upper directories: they hold
  # them, not their paths), and its mount point in the real /tmp goes now: from here on nothing of the sandbox is
  # on the machine, however its processes end. The outer shell's trap cannot promise that: SIGKILL (ctest's
  # timeout, an operator's kill -9) ends it without one, and unshare with COMMAND run on, then left the
  # directory behind.
  mkdir -p /var/tmp/mailflowd-sandbox
  mount --move "$dir" /var/tmp/mailflowd-sandbox || fail "cannot move the tmpfs from $dir"
  rm "$dir/entered"
  rmdir "$dir"
  export MAILFLOW_PKG_SANDBOX=/var/tmp/mailflowd-sandbox
  exec "$@"
fi

[ $# -ge 1 ] || fail "usage: sandbox.sh COMMAND [ARG...]"
[ "$(id -u)" -eq 0 ] || fail "needs root (a mount namespace and overlay mounts)"
command -v unshare >/dev/null || fail "unshare (util-linux) is not installed: not running $1 on the real root"

# What a package test would leave on the machine, were it not sandboxed.
traces() {
  dpkg-query -W -f='mailflowd package: ${Status} ${Version}\n' mailflowd 2>/dev/null || echo "mailflowd package: none"
  for path in /etc/mailflowd /var/lib/mailflowd /usr/sbin/mailflowd /lib/systemd/system/mailflowd.service \
              /etc/passwd /etc/group /etc/shadow /etc/gshadow /var/lib/dpkg/status; do
    stat -c '%n: %F %a %U:%G %s bytes, modified %y' "$path" 2>/dev/null || echo "$path: absent"
  done
}
before=$(traces)

dir=$(mktemp -d /tmp/mailflowd-sandbox.XXXXXX)
# The tmpfs's first mount point: the namespace removes it once its overlays are up (--inside); this removes it
# where the namespace never got that far (unshare or a mount failed), on every exit that runs traps.
trap 'rm -rf "$dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
status=0
# --fork --kill-child: COMMAND is the namespace's child, killed when unshare is (ctest's timeout).
unshare --mount --propagation private --fork --kill-child -- "$BASH" "$0" --inside "$dir" "$@" || status=$?
[ -e "$dir/entered" ] || [ ! -e "$dir" ] || fail "no mount namespace (unshare --mount exited $status): not running $1 on the real root"

after=$(traces)
if [ "$before" != "$after" ]; then
  echo "FAIL: sandbox.sh: the machine changed outside the sandbox while $1 ran (by it, or by an apt/dpkg run" \
    "beside it):" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
exit "$status"
