#!/bin/sh
# Make a private CA and one certificate signed by it for the Dask scheduler, workers and clients.
#
#   deploy/tls/make-certs.sh OUT_DIR [NAME ...]
#
# NAMEs are host names or IP addresses the scheduler is reached by (default: localhost and
# 127.0.0.1); they go into the certificate's subjectAltName. Writes OUT_DIR/ca.crt, tls.crt and
# tls.key (the key and the CA key readable by the owner only). Dask verifies peers against the CA
# in both directions, so a client or worker without a certificate from this CA cannot connect.
# Keep ca.key offline after use: whoever holds it can mint certificates the cluster accepts.
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: $0 OUT_DIR [NAME ...]" >&2
    exit 2
fi
out=$1
shift
if [ "$#" -eq 0 ]; then
    set -- localhost 127.0.0.1
fi
days=${DEFECTSCAN_CERT_DAYS:-825}

san=""
for name in "$@"; do
    case $name in
        *[!0-9.]*) entry="DNS:$name" ;;
        *) entry="IP:$name" ;;
    esac
    san="${san:+$san,}$entry"
done

umask 077
mkdir -p "$out"
cat > "$out/san.ext" <<EXT
subjectAltName=$san
extendedKeyUsage=serverAuth,clientAuth
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
EXT

openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj "/CN=defectscan-dask-ca" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=$1" -keyout "$out/tls.key" -out "$out/tls.csr" 2>/dev/null
openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
    -extfile "$out/san.ext" -out "$out/tls.crt" 2>/dev/null
rm -f "$out/tls.csr" "$out/san.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/tls.crt"
chmod 600 "$out/ca.key" "$out/tls.key"
echo "wrote $out/ca.crt $out/tls.crt $out/tls.key (CA key: $out/ca.key) for $san"
