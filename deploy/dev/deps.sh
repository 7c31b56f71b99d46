#!/usr/bin/env bash
# Installs, with apt, exactly the Debian 12 packages that are missing. Idempotent.
# Usage: deps.sh build|test   (test includes build)
set -euo pipefail
build_pkgs=(g++ cmake ninja-build ccache pkg-config make libboost-dev libssl-dev openssl
  libyaml-cpp-dev libspdlog-dev libfmt-dev doctest-dev libsystemd-dev libcrypt-dev libunbound-dev zlib1g-dev
  python3 python3-aiosmtpd swaks libnet-ssleay-perl curl ca-certificates scdoc dpkg-dev)
test_pkgs=(python3-pytest valgrind linux-perf postfix prometheus prometheus-alertmanager haproxy nginx-full libnginx-mod-mail
  python3-yaml chromium clang libclang-rt-14-dev iproute2 procps systemd man-db knot knot-dnsutils lintian strace)
want=("${build_pkgs[@]}")
[ "${1:-build}" = test ] && want+=("${test_pkgs[@]}")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
# postfix asks which configuration to write; we only need its smtp-sink/smtp-source tools.
echo 'postfix postfix/main_mailer_type select No configuration' | $SUDO debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
# Debian starts daemons (postfix, nginx, knot, ...) when it installs them; the tests run their own
# instances on loopback. A policy-rc.d that says "no" for the length of this install keeps them from
# starting at all, so a service the user already runs is never touched.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
installed() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" { print $2 }' | sort; }
before=$(installed)
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian also enables those daemons for the next boot (policy-rc.d only kept them from starting now): nginx on
# port 80, knot on 53, Prometheus, Alertmanager, HAProxy would come up at every boot of a machine that only ran
# the tests. Disabled again, for the packages this install added (with their dependencies: nginx.service is
# nginx-common's); the units of packages that were there before are the user's and stay as they are.
for p in $(comm -13 <(echo "$before") <(installed)); do
  for unit in $(dpkg -L "$p" | grep -E '^(/usr)?/lib/systemd/system/[^/@]+\.(service|socket|timer)$' || true); do
    unit=${unit##*/}
    # Only "enabled": is-enabled also says yes (exit 0) for static, indirect and generated units, which have
    # nothing to disable (man-db.service, started by its timer), and "disabled" would be untrue for them.
    if [ "$(systemctl is-enabled "$unit" 2>/dev/null)" = enabled ]; then
      $SUDO systemctl disable --quiet "$unit" && echo "deps: disabled $unit (installed now; the tests start their own)"
    fi
  done
done
