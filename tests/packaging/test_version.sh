#!/usr/bin/env bash
# The version that `mailflowd --version` and the package carry names the commit that was built
# (cmake/Version.cmake): a commit after the configure step makes the next build configure again, in a clone
# and in a `git worktree` (whose branch refs live in the main repository's git dir, not in its own).
# Configures scratch trees without tests (seconds), commits an empty commit, and asks ninja to bring
# build.ninja up to date, which re-runs the configure step when a dependency moved. The versions of two
# commits sort in the order of the commits, also on one day (Debian's order, what apt upgrades by).
# Usage: test_version.sh SOURCE_DIR
set -euo pipefail
src=$1
command -v git >/dev/null || { echo "SKIP: no git"; exit 77; }
[ -e "$src/.git" ] || { echo "SKIP: $src is not a git checkout"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
g() { git -c user.name=test -c user.email=test@example.org -c advice.detachedHead=false "$@"; }

# A clone with the files of the tree under test (committed or not) as its last commit, and a worktree of it.
g clone -q --no-hardlinks "$src" "$tmp/clone"
(cd "$src" && git ls-files -z -co --exclude-standard | xargs -0 tar -cf - --) | tar -xf - -C "$tmp/clone"
g -C "$tmp/clone" add -A
g -C "$tmp/clone" commit -q --allow-empty -m "the tree under test"
g -C "$tmp/clone" worktree add -q -b wt "$tmp/worktree" HEAD

check() {  # check NAME SOURCE: configure, commit, regenerate; the version must follow HEAD
  local name=$1 tree=$2 build=$tmp/build-$1 out rev
  out=$(cmake -S "$tree" -B "$build" -G Ninja -DMAILFLOW_BUILD_TESTS=OFF -DCMAKE_DISABLE_FIND_PACKAGE_doctest=ON 2>&1) ||
    { echo "$out"; fail "$name: configure failed"; return; }
  rev=$(git -C "$tree" rev-parse --short=7 HEAD)
  grep -q "mailflowd version .*\.$rev " <<<"$out" || fail "$name: configure did not name $rev: $(grep 'mailflowd version' <<<"$out")"
  g -C "$tree" commit -q --allow-empty -m "a commit after configure"
  rev=$(git -C "$tree" rev-parse --short=7 HEAD)
  out=$(cmake --build "$build" --target build.ninja 2>&1) || { echo "$out"; fail "$name: regenerate failed"; return; }
  if grep -q "mailflowd version .*\.$rev " <<<"$out"; then
    echo "ok: $name: the commit re-ran configure, version names $rev"
  else
    fail "$name: after a commit the build still carries the old revision (wanted $rev): $(grep 'mailflowd version' <<<"$out" || echo 'configure did not run again')"
  fi
}
check clone "$tmp/clone"
check worktree "$tmp/worktree"

# Two commits of one day, the later one's hash the "smaller": its package must still sort after the earlier
# one's in Debian's order, or `apt-get install ./mailflowd_<new>.deb` is a downgrade that apt refuses.
if command -v dpkg >/dev/null; then
  version_of() {  # version_of TREE: what the configure step names
    cmake -S "$1" -B "$tmp/build-order" -G Ninja -DMAILFLOW_BUILD_TESTS=OFF -DCMAKE_DISABLE_FIND_PACKAGE_doctest=ON 2>&1 |
      sed -n 's/.*mailflowd version \([^ ]*\) .*/\1/p'
  }
  at() { GIT_COMMITTER_DATE="$1" GIT_AUTHOR_DATE="$1" g -C "$tmp/clone" commit -q --allow-empty -m "$2"; }
  at "2026-12-01T09:00:00Z" "morning"
  morning=$(git -C "$tmp/clone" rev-parse --short=7 HEAD)
  earlier=$(version_of "$tmp/clone")
  for i in $(seq 1 64); do  # an afternoon commit whose hash alone would sort before the morning's
    at "2026-12-01T15:00:00Z" "afternoon $i"
    afternoon=$(git -C "$tmp/clone" rev-parse --short=7 HEAD)
    dpkg --compare-versions "0+$afternoon" lt "0+$morning" && break
    g -C "$tmp/clone" reset -q --hard HEAD~1
  done
  later=$(version_of "$tmp/clone")
  if [ -z "$earlier" ] || [ -z "$later" ]; then
    fail "no version from configure (earlier '$earlier', later '$later')"
  elif dpkg --compare-versions "$later" gt "$earlier"; then
    echo "ok: a later commit of the same day sorts after the earlier one ($later > $earlier)"
  else
    fail "the package of a later commit of the same day sorts before the earlier one's: $later <= $earlier"
  fi
fi

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all version checks passed"
