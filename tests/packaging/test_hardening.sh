#!/usr/bin/env bash
# The binary carries the hardening that Debian builds its packages with (dpkg-buildflags on Debian 12 amd64:
# -fstack-protector-strong, -D_FORTIFY_SOURCE=2 with -O2, -Wl,-z,relro; PIE and -z now as lintian wants them), read
# from the ELF file: a position-independent executable, full RELRO (GNU_RELRO and BIND_NOW), a stack that is not
# executable, stack protector canaries (__stack_chk_fail), and, where the build is optimized, fortified libc calls
# (__*_chk). lintian checks PIE, RELRO, BIND_NOW and fortify, but no longer the stack protector.
# Usage: test_hardening.sh MAILFLOWD_BINARY BUILD_TYPE
set -euo pipefail
bin=$1 build_type=$2
command -v readelf >/dev/null || { echo "SKIP: no readelf (binutils)"; exit 77; }
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

readelf -h "$bin" | grep -q 'Type: *DYN' || fail "not a position-independent executable: $(readelf -h "$bin" | grep Type:)"
readelf -d "$bin" | grep -q 'FLAGS_1.*PIE' || fail "no PIE flag in the dynamic section"
readelf -d "$bin" | grep -qE 'BIND_NOW|FLAGS.*NOW' || fail "no BIND_NOW (-Wl,-z,now)"
readelf -lW "$bin" | grep -q 'GNU_RELRO' || fail "no GNU_RELRO segment (-Wl,-z,relro)"
stack=$(readelf -lW "$bin" | awk '$1 == "GNU_STACK" { print $(NF-1) }')
[ "$stack" = RW ] || fail "the stack is not RW only: GNU_STACK flags '$stack'"
imports=$(readelf --dyn-syms -W "$bin" | awk '$7 == "UND" { sub(/@.*/, "", $8); print $8 }')
grep -qx '__stack_chk_fail' <<<"$imports" || fail "no stack protector: __stack_chk_fail is not imported (-fstack-protector-strong)"
if [ "$build_type" != Debug ]; then
  grep -qE '^__[a-z_]+_chk$' <<<"$imports" || fail "no fortified libc calls in a $build_type build (-D_FORTIFY_SOURCE=2)"
fi

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "ok: PIE, full RELRO, non-executable stack, stack protector$([ "$build_type" != Debug ] && echo ', fortify') ($build_type)"
