#!/usr/bin/env bash
# Install streamd as a systemd service.
#
#   sudo systemd/install.sh [--prefix /opt/streamd] [--root DIR] [--no-venv] [--no-enable]
#
# Creates a virtual environment under PREFIX with this checkout installed, installs the
# units streamd.service and streamd@.service (ExecStart pointed at PREFIX) and, if absent, /etc/streamd/streamd.toml from
# streamd.example.toml, then enables and starts the service. --root stages everything
# under DIR instead of / (packaging, tests); --no-venv skips the environment;
# --no-enable skips systemctl.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=/opt/streamd
root=""
make_venv=1
enable=1
python="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --root) root="$2"; shift 2 ;;
    --no-venv) make_venv=0; shift ;;
    --no-enable) enable=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or stage with --root DIR)" >&2
  exit 1
fi

if [ "$make_venv" = 1 ]; then
  "$python" -m venv "$root$prefix/venv"
  "$root$prefix/venv/bin/pip" install --upgrade pip
  "$root$prefix/venv/bin/pip" install "$repo"
fi

unit_dir="$root/etc/systemd/system"
install -d -m 0755 "$unit_dir" "$root/etc/streamd"
# streamd.service: the daemon; streamd@.service: one of several nodes (docs/scale-out.md).
for unit in streamd.service streamd@.service; do
  sed "s|^ExecStart=/opt/streamd/venv/bin/streamd |ExecStart=$prefix/venv/bin/streamd |" \
    "$repo/systemd/$unit" > "$unit_dir/$unit"
  chmod 0644 "$unit_dir/$unit"
done
if [ ! -e "$root/etc/streamd/streamd.toml" ]; then
  install -m 0644 "$repo/streamd.example.toml" "$root/etc/streamd/streamd.toml"
fi

if [ "$enable" = 1 ] && [ -z "$root" ]; then
  systemctl daemon-reload
  systemctl enable --now streamd.service
  echo "streamd installed; logs: journalctl -u streamd -f"
else
  echo "streamd staged under ${root:-/} (not enabled)"
fi
