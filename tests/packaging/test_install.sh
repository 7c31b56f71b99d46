#!/usr/bin/env bash
# The install from source of docs/operations.md (`cmake --install BUILD --prefix /usr`), run again to upgrade,
# keeps the administrator's /etc/mailflowd/mailflowd.yaml, as the package's conffile does; a first install puts
# the example there. Installs into a scratch DESTDIR (the same paths below it).
# Usage: test_install.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
config=$tmp/root/etc/mailflowd/mailflowd.yaml

install_tree() {  # install_tree WHAT
  DESTDIR=$tmp/root cmake --install "$build" --prefix /usr >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log"; echo "FAIL: cmake --install ($1)"; exit 1; }
}

install_tree "first install"
cmp -s "$config" "$src/config/examples/mailflowd.yaml" ||
  fail "a first install did not put the example configuration at /etc/mailflowd/mailflowd.yaml"
[ -x "$tmp/root/usr/sbin/mailflowd" ] || fail "no /usr/sbin/mailflowd"
echo "ok: first install"

sed -i 's/^hostname: .*/hostname: relay.admin.example/' "$config"
cp "$config" "$tmp/edited"
install_tree "install again"
cmp -s "$config" "$tmp/edited" ||
  fail "installing again replaced the edited configuration: $(diff "$tmp/edited" "$config" | head -5)"
grep -q 'mailflowd.yaml' "$tmp/install.log" || fail "the install log does not say what it did with the configuration"
echo "ok: install again kept the edited configuration"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all install checks passed"
