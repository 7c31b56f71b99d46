#!/usr/bin/env bash
# `make run`: a self-signed dev certificate, a local SMTP sink and mailflowd on config/examples/dev.yaml
# (SMTP 127.0.0.1:2525, HTTP 127.0.0.1:9725, sink 127.0.0.1:2526). Ctrl-C stops both.
# Other ports: SMTP_PORT, HTTP_PORT, SINK_PORT (make run SMTP_PORT=2535 HTTP_PORT=9735); the config with
# them is written to run/dev.yaml. If mailflowd does not come up, it says why and exits 1; so does a second run.sh
# in the same tree while one runs.
set -euo pipefail
binary=${1:?usage: run.sh path/to/mailflowd}
smtp_port=${SMTP_PORT:-2525}
http_port=${HTTP_PORT:-9725}
sink_port=${SINK_PORT:-2526}
cd "$(dirname "$0")/../.."

for port in "$smtp_port" "$http_port" "$sink_port"; do
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] ||
    { echo "run: '$port' is not a port (SMTP_PORT, HTTP_PORT, SINK_PORT: 1-65535)" >&2; exit 2; }
done
[ "$smtp_port" != "$http_port" ] && [ "$smtp_port" != "$sink_port" ] && [ "$http_port" != "$sink_port" ] ||
  { echo "run: SMTP_PORT, HTTP_PORT and SINK_PORT must differ" >&2; exit 2; }
# Something listening already (another `make run`, a real MTA): say which port, and how to pick others.
for port in "$smtp_port" "$http_port" "$sink_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "run: 127.0.0.1:$port is already in use (see: ss -ltnp 'sport = :$port')." >&2
    echo "run: stop what listens there, or choose other ports: make run SMTP_PORT=2535 HTTP_PORT=9735 SINK_PORT=2536" >&2
    exit 1
  fi
done

mkdir -p run/state run/mail
# One `make run` per tree: a second one (on other ports) would write over the running one's run/dev.yaml, which its
# printed report command and its next SIGHUP read. Held by this script (fd 9, not passed on) while it runs.
exec 9>run/run.lock
if ! flock -n 9; then
  echo "run: another \`make run\` is using $PWD/run (pid $(cat run/run.pid 2>/dev/null || echo '?'));" \
       "stop it first (Ctrl-C in its terminal)" >&2
  exit 1
fi
echo $$ >run/run.pid
if [ ! -s run/dev-cert.pem ] || [ ! -s run/dev-key.pem ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout run/dev-key.pem -out run/dev-cert.pem 2>/dev/null
  echo "run: generated run/dev-cert.pem (self-signed, localhost)"
fi
config=run/dev.yaml
# Through placeholders: replaced one after the other, a chosen port that is another default (SMTP_PORT=2526)
# would be replaced again by the next expression.
sed -e 's/127\.0\.0\.1:2525/127.0.0.1:@SMTP@/g' -e 's/127\.0\.0\.1:2526/127.0.0.1:@SINK@/g' \
    -e 's/127\.0\.0\.1:9725/127.0.0.1:@HTTP@/g' \
    -e "s/@SMTP@/$smtp_port/g; s/@SINK@/$sink_port/g; s/@HTTP@/$http_port/g" config/examples/dev.yaml >"$config"

/usr/bin/python3 tests/tools/sink.py --host 127.0.0.1 --port "$sink_port" --maildir run/mail >run/sink.log 2>&1 9>&- &
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
grep -q READY run/sink.log || { echo "run: the sink did not start:" >&2; cat run/sink.log >&2; exit 1; }

"$binary" --config "$config" 9>&- &
daemon=$!
# Up means: still running and answering /healthz (a process that died at start may leave an old listener
# answering on the port, so both are checked).
up=0
for _ in $(seq 100); do
  kill -0 "$daemon" 2>/dev/null || break
  if curl -fs "http://127.0.0.1:$http_port/healthz" >/dev/null 2>&1 && kill -0 "$daemon" 2>/dev/null; then
    up=1
    break
  fi
  sleep 0.1
done
if [ "$up" -ne 1 ]; then
  if kill -0 "$daemon" 2>/dev/null; then
    echo "run: mailflowd did not answer http://127.0.0.1:$http_port/healthz within 10 s" >&2
  else
    status=0
    wait "$daemon" || status=$?
    daemon=""
    echo "run: mailflowd failed to start (exit status $status; its messages are above)." >&2
    echo "run: if a port is taken, choose others: make run SMTP_PORT=2535 HTTP_PORT=9735 SINK_PORT=2536" >&2
  fi
  exit 1
fi

url=http://127.0.0.1:$http_port
cat <<TXT

mailflowd is relaying 127.0.0.1:$smtp_port -> sink 127.0.0.1:$sink_port (messages land in run/mail/).
Send a mail (plaintext, then TLS1.0 from partner contoso.com, which the report then shows as an insight):
  swaks --server 127.0.0.1:$smtp_port --from alice@example.com --to bob@example.org
  swaks --server 127.0.0.1:$smtp_port --tls --tls-protocol tlsv1 \\
        --tls-cipher 'DEFAULT:@SECLEVEL=0' --from partner@contoso.com --to bob@example.org
Look:
  $url/          connector report (HTML)
  $url/metrics   Prometheus metrics
  $binary report --config $config
Ctrl-C stops mailflowd and the sink.
TXT
wait "$daemon"
