#!/usr/bin/env bash
# Installs promtool, which checks and unit-tests the alert rules
# (deploy/prometheus/rules; `cargo test --test deploy` runs it), and the
# prometheus server that tests/prometheus.rs starts on a free port, when they
# are not already on PATH. Both come from Debian's `prometheus` package; the
# package's own daemon is kept from starting. Idempotent: run it
# as often as you like (CI runs it on every fresh machine).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "promtool is installed: $(promtool --version 2>&1 | head -n1)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is missing and this is not a Debian/Ubuntu machine: install Prometheus's promtool by other means." >&2
  exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi

# policy-rc.d answering 101 forbids service starts during the install
# (invoke-rc.d and deb-systemd-invoke honour it). Only ours is removed.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 0755 "$policy"
  created_policy=1
fi
cleanup() {
  if [ -n "$created_policy" ]; then
    $sudo rm -f "$policy"
  fi
}
trap cleanup EXIT

echo "installing promtool (Debian package prometheus)..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# Where systemd runs, keep the daemon from starting at the next boot too.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

command -v promtool >/dev/null 2>&1 || { echo "prometheus installed but promtool is not on PATH" >&2; exit 1; }
echo "promtool is installed: $(promtool --version 2>&1 | head -n1)"
