#!/usr/bin/env bash
# Generates the test PKI into DIR (idempotent: does nothing when everything is already there).
#   ca.pem / ca.key              test CA ("mailflow test CA")
#   server.pem / server.key      "mx.test", "localhost", IP 127.0.0.1 (RSA 2048: TLS1.0/1.1 ciphers exist)
#   other.pem / other.key        "other.test" (SNI tests)
#   sink.pem / sink.key          upstream sink: "localhost", "sink.test", IP 127.0.0.1, signed by the CA
#   rogue-ca.pem, rogue.pem / rogue.key   same names as sink.pem, but from another CA (verify must fail)
# Nothing here is committed: keys are made at test time.
# Usage: make-certs.sh DIR
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"

all=(ca.pem ca.key server.pem server.key other.pem other.key sink.pem sink.key rogue-ca.pem rogue.pem rogue.key)
complete=1
for f in "${all[@]}"; do [ -s "$f" ] || complete=0; done
[ "$complete" = 1 ] && exit 0

# Build in a temp dir inside DIR, then move into place: concurrent callers never see half-written files.
tmp=$(mktemp -d "$dir/.make-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

quiet() { "$@" >/dev/null 2>&1 || { echo "make-certs: failed: $*" >&2; "$@"; exit 1; }; }

make_ca() {  # name cn
  quiet openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -keyout "$1.key" -out "$1.pem" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

make_leaf() {  # name ca cn san
  quiet openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$1.key" -out "$1.csr" -subj "/CN=$3"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$4" >"$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -sha256 -days 3650 \
    -extfile "$1.ext" -out "$1.pem"
  rm -f "$1.csr" "$1.ext"
}

make_ca ca "mailflow test CA"
make_ca rogue-ca "mailflow rogue CA"
make_leaf server ca mx.test "DNS:mx.test,DNS:localhost,IP:127.0.0.1"
make_leaf other ca other.test "DNS:other.test"
make_leaf sink ca sink.test "DNS:sink.test,DNS:localhost,IP:127.0.0.1"
make_leaf rogue rogue-ca sink.test "DNS:sink.test,DNS:localhost,IP:127.0.0.1"
chmod 600 ./*.key

for f in "${all[@]}"; do mv -f "$f" "$dir/$f"; done
