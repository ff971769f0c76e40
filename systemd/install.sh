#!/usr/bin/env bash
# Install a leukoscope service with systemd, from a checkout, as root:
#   sudo systemd/install.sh            the edge agent on a Raspberry Pi (Raspberry Pi OS Bookworm or later)
#   sudo systemd/install.sh collector  the results collector on a lab server (Debian/Ubuntu)
# Safe to run again to upgrade: configs and passwords are never overwritten.
set -euo pipefail
role=${1:-edge}
case "$role" in
  edge|collector) ;;
  -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "install.sh: unknown role '$role'; use 'edge' (default) or 'collector'" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/leukoscope

[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo $0 $role)" >&2; exit 1; }

if [ "$role" = edge ]; then
  echo "- packages: python3-venv, python3-picamera2 (Pi cameras), mosquitto-clients (for checks), rsync"
  packages="python3-venv python3-picamera2 mosquitto-clients rsync"
else
  echo "- packages: python3-venv, mosquitto-clients (for checks), rsync"
  packages="python3-venv mosquitto-clients rsync"
fi
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq $packages

echo "- user 'leukoscope'"
id leukoscope >/dev/null 2>&1 || useradd --system --home-dir /var/lib/leukoscope --shell /usr/sbin/nologin leukoscope
if [ "$role" = edge ]; then
  for group in video plugdev render; do getent group "$group" >/dev/null && usermod -aG "$group" leukoscope; done
fi

echo "- code and virtual environment in $prefix"
mkdir -p "$prefix"
rsync -a --delete --exclude .git --exclude .venv --exclude venv --exclude runs "$here/" "$prefix/"
# The edge's venv sees the system's packages: that is how it gets picamera2.
[ -x "$prefix/venv/bin/python" ] || python3 -m venv --system-site-packages "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$prefix[$role]"

echo "- config in /etc/leukoscope (kept if present)"
install -d -m 0750 -o root -g leukoscope /etc/leukoscope
# An empty credential file, so that the unit's LoadCredential= finds it; fill it if the server needs a password.
credential() { [ -f "/etc/leukoscope/$1" ] || { install -m 0600 -o root -g root /dev/null "/etc/leukoscope/$1"; echo "  $2: /etc/leukoscope/$1"; }; }
if [ "$role" = edge ]; then
  [ -f /etc/leukoscope/leukoscope.toml ] || install -m 0640 -o root -g leukoscope "$here/firmware_config/leukoscope.toml" /etc/leukoscope/leukoscope.toml
  credential mqtt-password "the broker password, if it has one, goes in"
  credential web-token "the local page's token (only if [web] listens off loopback; openssl rand -hex 16) goes in"
  unit=leukoscope-edge
else
  [ -f /etc/leukoscope/collector.toml ] || install -m 0640 -o root -g leukoscope "$here/firmware_config/collector.toml" /etc/leukoscope/collector.toml
  credential collector-mqtt-password "the broker password, if it has one, goes in"
  credential collector-db-password "the PostgreSQL password (database.url), if any, goes in"
  unit=leukoscope-collector
fi

echo "- unit $unit"
install -m 0644 "$here/systemd/$unit.service" "/etc/systemd/system/$unit.service"
systemctl daemon-reload
systemctl enable "$unit.service"
echo
if [ "$role" = edge ]; then
  echo "Edit /etc/leukoscope/leukoscope.toml (device id, broker, camera), then:"
  echo "  sudo -u leukoscope $prefix/venv/bin/edge check --config /etc/leukoscope/leukoscope.toml"
else
  echo "Edit /etc/leukoscope/collector.toml (broker; database.url for PostgreSQL, whose password_file is"
  echo "  \"db-password\"; the broker's is \"mqtt-password\"), then:"
  echo "  sudo -u leukoscope $prefix/venv/bin/collect gaps --config /etc/leukoscope/collector.toml"
fi
echo "  sudo systemctl restart $unit && journalctl -u $unit -f"
