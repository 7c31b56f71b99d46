#!/usr/bin/env bash
# `cpack -G DEB` from the current build tree gives a package that installs on this machine and works:
# files where a Debian admin looks for them (copyright, changelog, docs whose links resolve), shlib
# dependencies, a stripped binary, a control file lintian accepts (no error or warning), the config as a
# conffile that passes --check-config (as root and as the service user), --version, man pages, units that
# `systemd-analyze verify` accepts at their installed paths. Then it is purged, and purge must leave nothing
# behind.
# Under `make test` this packs the dev tree (Debug: the content is what is checked); `make deb` packs the
# release tree the same way.
# Needs root, dpkg and a mount namespace with overlayfs: it all happens in sandbox.sh's overlays of /etc, /var and
# /usr, and this machine is left as it was (sandbox.sh checks that after the run).
# Usage: test_deb.sh BUILD_DIR SOURCE_DIR VERSION
set -euo pipefail
build=$1 src=$2 version=$3
[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root to install a package"; exit 77; }
command -v dpkg >/dev/null && command -v cpack >/dev/null || { echo "SKIP: no dpkg/cpack"; exit 77; }
. "$(dirname "$0")/deb_lib.sh"
enter_sandbox "$@"
deb_test_setup

# --- build --------------------------------------------------------------------------------------
deb=$(build_deb "$build" "$version")
echo "ok: built $(basename "$deb") ($(du -h "$deb" | cut -f1))"

# --- contents -----------------------------------------------------------------------------------
dpkg-deb -c "$deb" | awk '{ print $NF }' | sed 's#^\./#/#' >"$tmp/files"
expect=(/usr/sbin/mailflowd /lib/systemd/system/mailflowd.service /lib/systemd/system/mailflowd.socket
  /usr/lib/sysusers.d/mailflowd.conf /usr/lib/tmpfiles.d/mailflowd.conf /etc/mailflowd/mailflowd.yaml
  /usr/share/man/man8/mailflowd.8.gz /usr/share/man/man5/mailflowd.yaml.5.gz
  /usr/share/mailflowd/systemd/socket-activation.conf
  /usr/share/doc/mailflowd/operations.md /usr/share/doc/mailflowd/security.md
  /usr/share/doc/mailflowd/copyright /usr/share/doc/mailflowd/changelog.gz /usr/share/doc/mailflowd/README.md
  /usr/share/mailflowd/prometheus/examples/prometheus.example.yml /usr/share/lintian/overrides/mailflowd)
for f in "$src"/docs/*.md "$src"/docs/*.png; do [ -e "$f" ] && expect+=("/usr/share/doc/mailflowd/$(basename "$f")"); done
for f in "$src"/deploy/prometheus/*.yml; do [ -e "$f" ] && expect+=("/usr/share/mailflowd/prometheus/$(basename "$f")"); done
for f in "$src"/deploy/grafana/*.json; do [ -e "$f" ] && expect+=("/usr/share/mailflowd/grafana/$(basename "$f")"); done
for f in "${expect[@]}"; do grep -qxF "$f" "$tmp/files" || fail "package lacks $f"; done
dpkg-deb -f "$deb" Depends >"$tmp/depends"
for dep in libc6 libstdc++6 libssl3 libsystemd0; do
  grep -q "$dep" "$tmp/depends" || fail "Depends lacks $dep (shlibdeps): $(cat "$tmp/depends")"
done
dpkg-deb -e "$deb" "$tmp/control"
grep -qx /etc/mailflowd/mailflowd.yaml "$tmp/control/conffiles" || fail "mailflowd.yaml is not a conffile"
dpkg-deb -f "$deb" Recommends | grep -qw whois || fail "Recommends lacks whois (mkpasswd makes the password hash)"
# Description: the synopsis once, then the extended text, every line indented by exactly one space.
dpkg-deb -f "$deb" Description >"$tmp/description"
synopsis=$(head -1 "$tmp/description")
tail -n +2 "$tmp/description" | grep -qiF "$synopsis" && fail "the extended description repeats the synopsis"
tail -n +2 "$tmp/description" | grep -vq '^ [^ ]' && fail "description lines not indented by one space: $(cat "$tmp/description")"
dpkg-deb -x "$deb" "$tmp/root"
# Stripped: no DWARF in the shipped binary (the build tree keeps the symbols).
readelf -S "$tmp/root/usr/sbin/mailflowd" | grep -q '\.debug_info' && fail "/usr/sbin/mailflowd is not stripped"
zcat "$tmp/root/usr/share/doc/mailflowd/changelog.gz" | head -1 | grep -qF "mailflowd ($version)" ||
  fail "changelog.gz does not start with mailflowd ($version): $(zcat "$tmp/root/usr/share/doc/mailflowd/changelog.gz" | head -1)"
# Every relative link and image of the shipped README resolves inside the package's doc folder.
grep -o '](\([^)]*\))' "$tmp/root/usr/share/doc/mailflowd/README.md" | sed 's/^](//; s/)$//; s/#.*//' |
  grep -v -e '^[a-z]*://' -e '^$' | while read -r link; do
    [ -e "$tmp/root/usr/share/doc/mailflowd/$link" ] || echo "$link"
  done >"$tmp/broken"
[ -s "$tmp/broken" ] && fail "the shipped README links to what is not shipped: $(tr '\n' ' ' <"$tmp/broken")"
echo "ok: contents checked (${#expect[@]} paths, binary $(stat -c %s "$tmp/root/usr/sbin/mailflowd") bytes stripped, Depends: $(cat "$tmp/depends"))"

# --- lintian: no error or warning (tags overridden on purpose: cmake/debian/lintian-overrides, with reasons) --
if command -v lintian >/dev/null; then
  if lintian --fail-on error,warning -I "$deb" >"$tmp/lintian" 2>&1; then
    echo "ok: lintian$(grep -c '^[IPX]:' "$tmp/lintian" | sed 's/^0$//; s/^[1-9].*/ (& info tags)/')"
  else
    cat "$tmp/lintian"
    fail "lintian reports errors or warnings (fix them, or override with a reason in cmake/debian/lintian-overrides)"
  fi
else
  fail "lintian is not installed (deploy/dev/deps.sh test installs it)"
fi

# --- install --------------------------------------------------------------------------------------
apt_get install --no-install-recommends "$deb" >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log"; echo "FAIL: install"; exit 1; }
dpkg-query -W -f='${Status}' mailflowd | grep -q 'install ok installed' || { echo "FAIL: not installed"; exit 1; }
echo "ok: installed"

out=$(/usr/sbin/mailflowd --version 2>&1) || fail "mailflowd --version exited $?: $out"
grep -qF "$version" <<<"$out" || fail "--version does not show $version: $out"
out=$(mailflowd --check-config /etc/mailflowd/mailflowd.yaml 2>&1) || fail "--check-config as root: $out"
id mailflowd >/dev/null 2>&1 || fail "user mailflowd was not created"
# The service reads its config as the mailflowd user.
out=$(runuser -u mailflowd -- /usr/sbin/mailflowd --check-config /etc/mailflowd/mailflowd.yaml 2>&1) ||
  fail "--check-config as user mailflowd: $out"
[ "$(stat -c '%a %U %G' /etc/mailflowd/mailflowd.yaml)" = "640 root mailflowd" ] ||
  fail "config is $(stat -c '%a %U %G' /etc/mailflowd/mailflowd.yaml), expected 640 root mailflowd"
[ "$(stat -c '%a %U' /var/lib/mailflowd 2>/dev/null)" = "750 mailflowd" ] || fail "/var/lib/mailflowd is not 750 mailflowd"
# Under the unit /etc/mailflowd is mounted writable (ConfigurationDirectory=): the permissions alone keep the
# service from changing its configuration, certificates and keys (security.md).
[ "$(stat -c '%a %U %G' /etc/mailflowd)" = "755 root root" ] || fail "/etc/mailflowd is $(stat -c '%a %U %G' /etc/mailflowd)"
[ "$(stat -c '%a %U %G' /etc/mailflowd/tls 2>&1)" = "750 root mailflowd" ] ||
  fail "/etc/mailflowd/tls is $(stat -c '%a %U %G' /etc/mailflowd/tls 2>&1), expected 750 root mailflowd"
for p in /etc/mailflowd/new /etc/mailflowd/tls/new /etc/mailflowd/mailflowd.yaml; do
  runuser -u mailflowd -- sh -c ": >>$p" 2>/dev/null && fail "user mailflowd can write $p"
done
[ ! -e /etc/mailflowd/new ] && [ ! -e /etc/mailflowd/tls/new ] || fail "user mailflowd created a file in /etc/mailflowd"
runuser -u mailflowd -- sh -c ': >>/var/lib/mailflowd/probe' && rm /var/lib/mailflowd/probe ||
  fail "user mailflowd cannot write in /var/lib/mailflowd (so the checks above prove nothing)"
[ "$(man -w mailflowd 2>&1)" = /usr/share/man/man8/mailflowd.8.gz ] || fail "man -w mailflowd: $(man -w mailflowd 2>&1)"
[ "$(man -w mailflowd.yaml 2>&1)" = /usr/share/man/man5/mailflowd.yaml.5.gz ] || fail "man -w mailflowd.yaml: $(man -w mailflowd.yaml 2>&1)"
zcat /usr/share/man/man8/mailflowd.8.gz | grep -q '^\.TH "mailflowd" "8"' || fail "mailflowd.8.gz is not a section 8 man page"
if command -v systemd-analyze >/dev/null; then
  out=$(systemd-analyze verify /lib/systemd/system/mailflowd.service /lib/systemd/system/mailflowd.socket 2>&1) ||
    fail "systemd-analyze verify of the installed units: $out"
  [ -z "$out" ] || fail "systemd-analyze verify of the installed units complained: $out"
fi
echo "ok: installed package checked"

# --- purge ----------------------------------------------------------------------------------------
apt_get purge mailflowd >"$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log"; fail "purge"; }
! dpkg-query -W -f='${Status}' mailflowd 2>/dev/null | grep -q installed || fail "still installed after purge"
for p in /usr/sbin/mailflowd /etc/mailflowd /var/lib/mailflowd /lib/systemd/system/mailflowd.service \
         /usr/share/man/man8/mailflowd.8.gz /usr/share/mailflowd; do
  [ ! -e "$p" ] || fail "$p left behind by purge"
done
echo "ok: purged"

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all package checks passed"
