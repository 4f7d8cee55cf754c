#!/bin/sh
# Write the compose secrets that are not certificates: a random PostgreSQL password and the
# matching pgpass file. Existing files are kept, so running it again changes nothing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
secrets="$here/secrets"
umask 077
mkdir -p "$secrets"
if [ ! -s "$secrets/postgres_password" ]; then
    openssl rand -hex 24 > "$secrets/postgres_password"
fi
password=$(cat "$secrets/postgres_password")
if [ ! -s "$secrets/pgpass" ]; then
    printf 'postgres:5432:defectscan:defectscan:%s\n' "$password" > "$secrets/pgpass"
fi
# The containers run as uid 10001 and must be able to read the pgpass file and the TLS key.
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$secrets/pgpass"
    if [ -f "$secrets/tls/tls.key" ]; then
        chown 10001:10001 "$secrets/tls/tls.key"
    fi
fi
echo "secrets in $secrets (keep them out of git)"
