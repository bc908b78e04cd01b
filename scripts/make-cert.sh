#!/usr/bin/env bash
# A self-signed TLS certificate for `fedsea server --ssl-certfile/--ssl-keyfile`, valid for
# the given host names / IP addresses.  Edges trust it with `--server-ca DIR/cert.pem`.
#   scripts/make-cert.sh DIR NAME [NAME...]     e.g. scripts/make-cert.sh certs gpu-box 10.0.0.5
# For a server that clients reach by a public name, a certificate from a public CA needs no
# --server-ca at all (the system trust store verifies it).
set -euo pipefail
dir=${1:?usage: make-cert.sh DIR NAME [NAME...]}; shift
[ $# -ge 1 ] || { echo "usage: make-cert.sh DIR NAME [NAME...]" >&2; exit 2; }
san=""
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
mkdir -p "$dir"
umask 077  # the private key is readable by its owner only
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
  -subj "/CN=$1" -addext "subjectAltName=${san%,}" \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
chmod 644 "$dir/cert.pem"
echo "wrote $dir/cert.pem (give it to edges: --server-ca) and $dir/key.pem (server only)"
