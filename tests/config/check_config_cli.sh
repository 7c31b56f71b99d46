#!/usr/bin/env bash
# `mailflowd --check-config FILE` as a user runs it: every broken file in tests/config/broken must exit 1 and print
# each of its "# expect: LINE:COL: message" lines as "FILE:LINE:COL: message" on stderr; both shipped examples must
# exit 0 and print the summary on stdout.
# Usage: check_config_cli.sh MAILFLOWD SOURCE_DIR
set -u
bin=${1:?usage: check_config_cli.sh MAILFLOWD SOURCE_DIR}
src=${2:?usage: check_config_cli.sh MAILFLOWD SOURCE_DIR}
bin=$(readlink -f "$bin")
src=$(readlink -f "$src")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }

run() {  # run FILE: sets $status, stdout in $work/out, stderr in $work/err
  timeout 20 "$bin" --check-config "$1" >"$work/out" 2>"$work/err"
  status=$?
}

for file in "$src"/tests/config/broken/*.yaml; do
  run "$file"
  ok=1
  if [ "$status" -ne 1 ]; then
    fail "$file: exit status $status, expected 1"; ok=0
  fi
  while IFS= read -r expect; do
    if ! grep -qF -- "$file:$expect" "$work/err"; then
      fail "$file: stderr lacks: $file:$expect"; ok=0
    fi
  done < <(sed -n 's/^# expect: //p' "$file")
  if [ "$ok" -eq 0 ]; then
    echo "--- stderr:"; cat "$work/err"; echo "--- stdout:"; cat "$work/out"
  else
    passed=$((passed + 1)); echo "ok: $file"
  fi
done

# The reference example is valid anywhere.
run "$src/config/examples/mailflowd.yaml"
if [ "$status" -eq 0 ] && grep -q "listeners (2):" "$work/out"; then
  passed=$((passed + 1)); echo "ok: mailflowd.yaml"
else
  fail "mailflowd.yaml: exit status $status (expected 0 and a summary)"; cat "$work/err" "$work/out"
fi

# The `make run` example resolves run/... against the working directory, as mailflowd does.
mkdir -p "$work/root/run"
echo cert >"$work/root/run/dev-cert.pem"
echo key >"$work/root/run/dev-key.pem"
(cd "$work/root" && timeout 20 "$bin" --check-config "$src/config/examples/dev.yaml" >"$work/out" 2>"$work/err")
status=$?
if [ "$status" -eq 0 ] && grep -q "inbound 127.0.0.1:2525" "$work/out"; then
  passed=$((passed + 1)); echo "ok: dev.yaml"
else
  fail "dev.yaml: exit status $status (expected 0 and a summary)"; cat "$work/err" "$work/out"
fi

# A file that does not exist is an error too.
run "$work/missing.yaml"
if [ "$status" -eq 1 ] && grep -qF "$work/missing.yaml: cannot read the configuration" "$work/err"; then
  passed=$((passed + 1)); echo "ok: missing file"
else
  fail "missing file: exit status $status"; cat "$work/err"
fi

echo "check-config: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
