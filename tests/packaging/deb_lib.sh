# Shared by the package tests (test_deb.sh, test_deb_lifecycle.sh), sourced after `set -euo pipefail`:
# they install mailflowd into this machine's dpkg database and purge it at the end, so each one first refuses
# to run where a mailflowd package is installed already, and builds its package from the build tree the same way.

# Exits 1 (with what to do) when a mailflowd package is installed: the test would purge it.
refuse_if_installed() {
  if dpkg-query -W -f='${Status}' mailflowd 2>/dev/null | grep -q installed; then
    echo "FAIL: a mailflowd package is already installed here; this test would purge it. Remove it first:"
    echo "  apt-get purge mailflowd"
    exit 1
  fi
}

apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 "$@"; }  # a test may redefine it
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# A scratch directory ($tmp), removed at exit, and the package purged at exit while $installed is 1 (with
# whichever apt_get is defined then); $failures counts fail().
deb_test_setup() {
  tmp=$(mktemp -d)
  installed=0
  failures=0
  trap deb_test_cleanup EXIT
}
deb_test_cleanup() {
  if [ "$installed" -eq 1 ]; then
    echo "trap: purging mailflowd"
    apt_get purge mailflowd >/dev/null 2>&1 || dpkg --purge mailflowd || true
  fi
  rm -rf "$tmp"
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
