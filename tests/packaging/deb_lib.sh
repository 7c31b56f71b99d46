# Shared by the package tests (test_deb.sh, test_deb_lifecycle.sh), sourced after `set -euo pipefail`:
# each one runs itself again inside sandbox.sh (a mount namespace where /etc, /var and /usr are overlays that
# vanish with it), so that installing, upgrading and purging mailflowd leaves this machine as it was, and builds
# its package from the build tree the same way.

# Exits 1 (with what to do) when a mailflowd package is installed: the test's first install would be an upgrade.
refuse_if_installed() {
  if dpkg-query -W -f='${Status}' mailflowd 2>/dev/null | grep -q installed; then
    echo "FAIL: a mailflowd package is already installed here; the test needs a machine without it (it installs"
    echo "its own, in a sandbox). Remove it first:  apt-get purge mailflowd"
    exit 1
  fi
}

# enter_sandbox "$@": the calling test, run again by sandbox.sh with the same arguments; returns inside it (checked:
# a MAILFLOW_PKG_SANDBOX set by hand must not let the test loose on the real root).
enter_sandbox() {
  if [ -n "${MAILFLOW_PKG_SANDBOX:-}" ]; then
    local path
    for path in /etc /var /usr; do
      [ "$(findmnt -n -o FSTYPE --mountpoint "$path")" = overlay ] ||
        { echo "FAIL: MAILFLOW_PKG_SANDBOX is set but $path is no overlay: not in sandbox.sh"; exit 1; }
    done
    return 0
  fi
  refuse_if_installed
  exec "$(dirname "${BASH_SOURCE[0]}")/sandbox.sh" "$0" "$@"
}

apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 "$@"; }  # a test may redefine it
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# A scratch directory ($tmp), removed at exit; $failures counts fail(). The package needs no purge at exit: the
# sandbox's overlays go with it.
deb_test_setup() {
  tmp=$(mktemp -d)
  failures=0
  trap 'rm -rf "$tmp"' EXIT
}

# build_deb BUILD_DIR VERSION: cpack's .deb of the build tree, in $tmp/out; prints its path (exits 1 on failure).
build_deb() {
  (cd "$1" && cpack --config CPackConfig.cmake -G DEB -B "$tmp/out") >"$tmp/cpack.log" 2>&1 ||
    { cat "$tmp/cpack.log" >&2; echo "FAIL: cpack" >&2; exit 1; }
  local deb
  deb=$(ls "$tmp"/out/mailflowd_"$2"_*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || { cat "$tmp/cpack.log" >&2; ls -R "$tmp/out" >&2; echo "FAIL: no mailflowd_${2}_*.deb" >&2; exit 1; }
  echo "$deb"
}
