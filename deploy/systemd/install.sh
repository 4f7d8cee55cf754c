#!/bin/sh
# Install defectscan on a bare-metal line PC: a service user, a virtual environment, TLS files,
# the Dask units and one timer per job spec. Run as root from the repository root:
#   deploy/systemd/install.sh [GPU_COUNT]
# It does not start anything that is not enabled below, and never writes a password.
set -eu

gpus=${1:-1}
prefix=/opt/defectscan
etc=/etc/defectscan
units=/etc/systemd/system

if [ "$(id -u)" != 0 ]; then
    echo "run as root" >&2
    exit 1
fi

if ! id defectscan >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/defectscan --create-home --shell /usr/sbin/nologin defectscan
fi
install -d -m 0755 "$etc" "$etc/jobs" /srv/defectscan
install -d -m 0750 -g defectscan "$etc/tls"
chown defectscan:defectscan /srv/defectscan

python3.11 -m venv "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet ".[gpu]" "croniter>=6,<8"

if [ ! -f "$etc/tls/tls.crt" ]; then
    deploy/tls/make-certs.sh "$etc/tls" localhost 127.0.0.1 "$(hostname)"
    chgrp defectscan "$etc/tls/tls.key"
    chmod 0640 "$etc/tls/tls.key"
fi
if [ ! -f "$etc/defectscan.env" ]; then
    install -m 0640 -g defectscan deploy/systemd/defectscan.env.example "$etc/defectscan.env"
    echo "edit $etc/defectscan.env (database URL), then run this script again" >&2
fi
install -m 0644 jobs/*.yaml "$etc/jobs/"

install -m 0644 deploy/systemd/defectscan-dask-scheduler.service "deploy/systemd/defectscan-dask-worker@.service" "$units/"
"$prefix/bin/defectscan" jobs --jobs-dir "$etc/jobs" render systemd --output-dir "$units" \
    --executable "$prefix/bin/defectscan" --deployed-jobs-dir "$etc/jobs" --env-file "$etc/defectscan.env"
systemctl daemon-reload

set -a
# shellcheck disable=SC1091
. "$etc/defectscan.env"
set +a
runuser -u defectscan -- "$prefix/bin/defectscan" db upgrade

systemctl enable --now defectscan-dask-scheduler.service
gpu=0
while [ "$gpu" -lt "$gpus" ]; do
    systemctl enable --now "defectscan-dask-worker@$gpu.service"
    gpu=$((gpu + 1))
done
for timer in "$units"/defectscan-job-*.timer; do
    systemctl enable --now "$(basename "$timer")"
done
systemctl list-timers 'defectscan-job-*'
