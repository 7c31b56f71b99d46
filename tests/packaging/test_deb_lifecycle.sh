#!/usr/bin/env bash
# The package's life cycle as an administrator goes through it (docs/operations.md: Install, Upgrade,
# Uninstall): install; upgrade to a version whose shipped configuration changed (the admin's untouched one
# follows it); upgrade again after the admin edited it (kept as edited); remove (keeps configuration, state
# and user); install again (works on what remove kept); purge (removes configuration and state, keeps the
# user as documented). At every step the configuration stays 0640 root:mailflowd (it may hold a password
# hash), state_dir's files are kept, and the service is restarted, stopped or left alone as the maintainer
# scripts promise: running before an upgrade, running after it (restarted); stopped before, still stopped;
# enabled before a remove, running again after the install that follows (debhelper's behaviour).
# The later versions are the first package repacked with a higher version (and a changed example config).
# systemd does not run here: the script runs in sandbox.sh's mount namespace, where /run/systemd/system
# exists (so the maintainer scripts talk to systemd) and `systemctl`/`deb-systemd-invoke` are stand-ins that
# keep each unit's state and log every call; nothing outside the namespace sees them.
# Needs root, dpkg and a mount namespace with overlayfs: it all happens in sandbox.sh's overlays of /etc, /var and
# /usr, and this machine is left as it was (sandbox.sh checks that after the run).
# Usage: test_deb_lifecycle.sh BUILD_DIR VERSION
set -euo pipefail
build=$1 version=$2
[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root to install a package"; exit 77; }
command -v dpkg >/dev/null && command -v cpack >/dev/null || { echo "SKIP: no dpkg/cpack"; exit 77; }
. "$(dirname "$0")/deb_lib.sh"
enter_sandbox "$@"
deb_test_setup

# --- systemd, as the maintainer scripts see it ----------------------------------------------------------
mount -t tmpfs mailflowd-test /run/systemd
mkdir -p /run/systemd/system "$tmp/bin" "$tmp/units" "$tmp/enabled"
cat >"$tmp/bin/systemctl" <<EOF
#!/bin/sh
# stand-in: start/stop/restart/try-restart UNIT... and is-active UNIT act on $tmp/units, enable/disable UNIT...
# and is-enabled UNIT on $tmp/enabled; the rest only logs
echo "systemctl \$*" >>"$tmp/systemd.log"
action=\$1; shift
for unit in "\$@"; do
  case \$action in
    start) touch "$tmp/units/\$unit" ;;
    restart) [ ! -e "$tmp/units/\$unit" ] || echo "restarted \$unit" >>"$tmp/systemd.log"; touch "$tmp/units/\$unit" ;;
    stop) rm -f "$tmp/units/\$unit" ;;
    try-restart) [ ! -e "$tmp/units/\$unit" ] || echo "restarted \$unit" >>"$tmp/systemd.log" ;;
    is-active) [ -e "$tmp/units/\$unit" ] || exit 3 ;;
    enable) touch "$tmp/enabled/\$unit" ;;
    disable) rm -f "$tmp/enabled/\$unit" ;;
    is-enabled) [ -e "$tmp/enabled/\$unit" ] || exit 1 ;;
  esac
done
exit 0
EOF
# deb-systemd-invoke's own rule (Debian's init-system-helpers): start acts only on an enabled unit, restart on an
# enabled or a running one; anything else goes to systemctl as it is.
cat >"$tmp/bin/deb-systemd-invoke" <<'EOF'
#!/bin/sh
action=$1; shift
case $action in
  start|restart)
    for unit in "$@"; do
      if systemctl is-enabled "$unit" || { [ "$action" = restart ] && systemctl is-active "$unit"; }; then
        systemctl "$action" "$unit"
      fi
    done ;;
  *) exec systemctl "$action" "$@" ;;
esac
exit 0
EOF
chmod +x "$tmp/bin/systemctl" "$tmp/bin/deb-systemd-invoke"
export PATH="$tmp/bin:$PATH"
apt_get() {  # apt gives dpkg a PATH of its own (DPkg::Path): the stand-ins go first there too
  DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 -o DPkg::Path="$PATH" "$@"
}
: >"$tmp/systemd.log"
systemd_calls() { cat "$tmp/systemd.log"; : >"$tmp/systemd.log"; }  # the calls since the last look

# --- the packages: the build tree's, then two later versions ----------------------------------------------
v1=$(build_deb "$build" "$version")
repack() {  # repack FROM TO NEW_VERSION [LINE appended to the shipped mailflowd.yaml]
  rm -rf "$tmp/repack" && dpkg-deb -R "$1" "$tmp/repack"
  sed -i "s/^Version: .*/Version: $3/" "$tmp/repack/DEBIAN/control"
  [ $# -lt 4 ] || echo "$4" >>"$tmp/repack/etc/mailflowd/mailflowd.yaml"
  (cd "$tmp/repack" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
  dpkg-deb -b -Zxz "$tmp/repack" "$2" >/dev/null
}
repack "$v1" "$tmp/v2.deb" "$version.2" "# shipped with $version.2"
repack "$tmp/v2.deb" "$tmp/v3.deb" "$version.3"
dpkg --compare-versions "$version.3" gt "$version.2" && dpkg --compare-versions "$version.2" gt "$version" ||
  { echo "FAIL: the test's versions do not sort"; exit 1; }

install_deb() {  # install_deb DEB WHAT
  apt_get install --no-install-recommends "$1" >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log"; echo "FAIL: $2"; exit 1; }
}
config=/etc/mailflowd/mailflowd.yaml
state=/var/lib/mailflowd/windows.state
check_kept() {  # check_kept STEP: configuration (mode, owner, content) and state_dir's file as they were
  [ "$(stat -c '%a %U %G' "$config" 2>/dev/null)" = "640 root mailflowd" ] ||
    fail "$1: $config is $(stat -c '%a %U %G' "$config" 2>&1), expected 640 root mailflowd (it may hold a password hash)"
  cmp -s "$config" "$tmp/config.expected" || fail "$1: $config changed: $(diff "$tmp/config.expected" "$config" | head -5)"
  cmp -s "$state" "$tmp/state.expected" || fail "$1: $state was not kept"
  [ "$(stat -c '%a %U' /var/lib/mailflowd 2>/dev/null)" = "750 mailflowd" ] ||
    fail "$1: /var/lib/mailflowd is $(stat -c '%a %U' /var/lib/mailflowd 2>&1), expected 750 mailflowd"
  id mailflowd >/dev/null 2>&1 || fail "$1: user mailflowd is gone"
}
is_active() { systemctl is-active mailflowd.service; }

# --- install: configured, not started ---------------------------------------------------------------------
install_deb "$v1" "install $version"
calls=$(systemd_calls)
grep -qE ' (start|restart) ' <<<"$calls" && fail "a first install started the service: $calls"
# The service has run a while: it wrote its windows (as the daemon does: mailflowd's, 0600).
printf 'mailflowd windows state (test)\n' >"$state"
chown mailflowd:mailflowd "$state" && chmod 0600 "$state"
cp -p "$state" "$tmp/state.expected"
cp "$config" "$tmp/config.expected"
check_kept "install"
echo "ok: installed $version, not started"

# --- upgrade, running: the untouched configuration follows the package; restarted, still running ---------
systemctl start mailflowd.service && systemd_calls >/dev/null
install_deb "$tmp/v2.deb" "upgrade to $version.2"
calls=$(systemd_calls)
grep -qx "restarted mailflowd.service" <<<"$calls" || fail "the upgrade did not restart the running service: $calls"
is_active || fail "the service is not running after the upgrade: $calls"
dpkg-deb --fsys-tarfile "$tmp/v2.deb" | tar -xOf - ./etc/mailflowd/mailflowd.yaml >"$tmp/config.expected"
check_kept "upgrade to $version.2 (untouched config)"
echo "ok: upgraded to $version.2 while running: restarted; the untouched config follows the package"

# --- upgrade, stopped, after the admin edited the configuration: kept as edited, not started --------------
systemctl stop mailflowd.service && systemd_calls >/dev/null
sed -i 's/^hostname: .*/hostname: relay.admin.example/' "$config"
grep -q '^hostname: relay.admin.example' "$config" || fail "the test's edit did not apply: no hostname: line in $config"
cp "$config" "$tmp/config.expected"
install_deb "$tmp/v3.deb" "upgrade to $version.3"
calls=$(systemd_calls)
is_active && fail "the upgrade started the stopped service: $calls"
check_kept "upgrade to $version.3 (edited config)"
runuser -u mailflowd -- /usr/sbin/mailflowd --check-config "$config" >/dev/null 2>&1 ||
  fail "--check-config as mailflowd after the upgrade: $(runuser -u mailflowd -- /usr/sbin/mailflowd --check-config "$config" 2>&1)"
echo "ok: upgraded to $version.3 while stopped: still stopped; the edited config kept"

# --- remove: stopped; configuration, state, user and the units' enablement kept ----------------------------
systemctl enable mailflowd.service mailflowd.socket && systemctl start mailflowd.service mailflowd.socket &&
  systemd_calls >/dev/null
apt_get remove mailflowd >"$tmp/remove.log" 2>&1 || { cat "$tmp/remove.log"; fail "remove"; }
calls=$(systemd_calls)
is_active && fail "remove left the service running: $calls"
systemctl is-active mailflowd.socket && fail "remove left the socket listening: $calls"
systemd_calls >/dev/null
dpkg-query -W -f='${Status}' mailflowd | grep -q 'config-files' ||
  fail "after remove the package is $(dpkg-query -W -f='${Status}' mailflowd), expected config-files"
[ ! -e /usr/sbin/mailflowd ] || fail "remove left /usr/sbin/mailflowd"
check_kept "remove"
echo "ok: removed: stopped; config, state and user kept"

# --- install again on what remove kept ----------------------------------------------------------------------
install_deb "$tmp/v3.deb" "install $version.3 after remove"
calls=$(systemd_calls)
check_kept "install after remove"
# Enabled before the remove, which keeps the enablement (the wants/ links go at purge): running again, as
# debhelper's postinst has it (deb-systemd-invoke starts enabled units only).
is_active || fail "install after remove left the enabled service stopped: $calls"
systemctl is-active mailflowd.socket >/dev/null || fail "install after remove left the enabled socket stopped: $calls"
runuser -u mailflowd -- /usr/sbin/mailflowd --check-config "$config" >/dev/null 2>&1 ||
  fail "--check-config as mailflowd after install on a removed package: $(runuser -u mailflowd -- /usr/sbin/mailflowd --check-config "$config" 2>&1)"
echo "ok: installed again after remove: the enabled service and socket run again"

# --- purge: configuration and state gone, the user stays (operations.md: Uninstall) -------------------------
apt_get purge mailflowd >"$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log"; fail "purge"; }
! dpkg-query -W -f='${Status}' mailflowd 2>/dev/null | grep -q 'installed\|config-files' ||
  fail "after purge the package is $(dpkg-query -W -f='${Status}' mailflowd)"
for p in /etc/mailflowd /var/lib/mailflowd /usr/sbin/mailflowd; do
  [ ! -e "$p" ] || fail "$p left behind by purge"
done
id mailflowd >/dev/null 2>&1 || fail "purge removed the user mailflowd (operations.md says it stays)"
echo "ok: purged: config and state gone, user kept"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all life cycle checks passed"
