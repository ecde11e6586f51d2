#!/usr/bin/env bash
# System packages the build needs beyond a Rust toolchain and a C compiler:
# OpenSSL headers for librdkafka's SASL_SSL support. Idempotent; installs
# with apt-get only when something is missing.
set -euo pipefail
missing=()
for pkg in libssl-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
