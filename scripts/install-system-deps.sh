#!/usr/bin/env bash
# Installs the Debian packages that streamd and its tests use. Idempotent: does nothing
# when all are present. Needs root (or sudo) and Debian's package archive.
set -euo pipefail
# nats-server (2.9: MQTT on JetStream) and haproxy (2.6): the scale-out tests and
# `make cluster` (docs/scale-out.md).
PACKAGES=(libportaudio2 libsndfile1 mosquitto pulseaudio pulseaudio-utils libasound2-plugins
          chromium systemd nats-server haproxy)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing system packages: ${missing[*]}" >&2
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
