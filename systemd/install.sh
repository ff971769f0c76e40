#!/usr/bin/env bash
# Install the leukoscope edge agent as a systemd service on Raspberry Pi OS (Bookworm or later).
# Run as root from a checkout:  sudo systemd/install.sh
# Safe to run again to upgrade: the config and the password are never overwritten.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/leukoscope

[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo $0)" >&2; exit 1; }

echo "- packages: python3-venv, python3-picamera2 (Pi cameras), mosquitto-clients (for checks), rsync"
apt-get update -qq
apt-get install -y -qq python3-venv python3-picamera2 mosquitto-clients rsync

echo "- user 'leukoscope' (groups video, plugdev, render)"
id leukoscope >/dev/null 2>&1 || useradd --system --home-dir /var/lib/leukoscope --shell /usr/sbin/nologin leukoscope
for group in video plugdev render; do getent group "$group" >/dev/null && usermod -aG "$group" leukoscope; done

echo "- code and virtual environment in $prefix (system site packages give it picamera2)"
mkdir -p "$prefix"
rsync -a --delete --exclude .git --exclude .venv --exclude runs "$here/" "$prefix/"
[ -x "$prefix/venv/bin/python" ] || python3 -m venv --system-site-packages "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$prefix[edge]"

echo "- config in /etc/leukoscope (kept if present)"
install -d -m 0750 -o root -g leukoscope /etc/leukoscope
[ -f /etc/leukoscope/leukoscope.toml ] || install -m 0640 -o root -g leukoscope "$here/firmware_config/leukoscope.toml" /etc/leukoscope/leukoscope.toml
[ -f /etc/leukoscope/mqtt-password ] || { install -m 0600 -o root -g root /dev/null /etc/leukoscope/mqtt-password; echo "  put the broker password in /etc/leukoscope/mqtt-password"; }

echo "- unit"
install -m 0644 "$here/systemd/leukoscope-edge.service" /etc/systemd/system/leukoscope-edge.service
systemctl daemon-reload
systemctl enable leukoscope-edge.service
echo
echo "Edit /etc/leukoscope/leukoscope.toml (device id, broker, camera), then:"
echo "  sudo -u leukoscope $prefix/venv/bin/edge check --config /etc/leukoscope/leukoscope.toml"
echo "  sudo systemctl restart leukoscope-edge && journalctl -u leukoscope-edge -f"
