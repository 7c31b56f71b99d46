#!/usr/bin/env bash
# `make run`: a self-signed dev certificate, a local SMTP sink on 127.0.0.1:2526 and mailflowd on
# config/examples/dev.yaml (SMTP 127.0.0.1:2525, HTTP 127.0.0.1:9725). Ctrl-C stops both.
set -euo pipefail
binary=${1:?usage: run.sh path/to/mailflowd}
cd "$(dirname "$0")/../.."
mkdir -p run/state run/mail
if [ ! -s run/dev-cert.pem ] || [ ! -s run/dev-key.pem ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout run/dev-key.pem -out run/dev-cert.pem 2>/dev/null
  echo "run: generated run/dev-cert.pem (self-signed, localhost)"
fi

/usr/bin/python3 tests/tools/sink.py --host 127.0.0.1 --port 2526 --maildir run/mail >run/sink.log 2>&1 &
sink=$!
daemon=""
stop() {
  trap - INT TERM EXIT
  [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  kill -TERM "$sink" 2>/dev/null && wait "$sink" 2>/dev/null || true
  echo "run: stopped"
}
trap stop INT TERM EXIT
for _ in $(seq 50); do grep -q READY run/sink.log 2>/dev/null && break; sleep 0.1; done
grep -q READY run/sink.log || { echo "run: the sink did not start:"; cat run/sink.log; exit 1; }

"$binary" --config config/examples/dev.yaml &
daemon=$!
for _ in $(seq 50); do curl -fs http://127.0.0.1:9725/healthz >/dev/null 2>&1 && break; sleep 0.1; done

cat <<'TXT'

mailflowd is relaying 127.0.0.1:2525 -> sink 127.0.0.1:2526 (messages land in run/mail/).
Send a mail (plaintext, then TLS1.0 from a "partner" address):
  swaks --server 127.0.0.1:2525 --from alice@example.com --to bob@example.org
  swaks --server 127.0.0.1:2525 --local-interface 127.0.0.2 --tls --tls-protocol tlsv1 \
        --tls-cipher 'DEFAULT:@SECLEVEL=0' --from partner@contoso.com --to bob@example.org
Look:
  http://127.0.0.1:9725/          connector report (HTML)
  http://127.0.0.1:9725/metrics   Prometheus metrics
  build/dev/daemon/mailflowd report
Ctrl-C stops mailflowd and the sink.
TXT
wait "$daemon"
