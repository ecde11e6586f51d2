#!/usr/bin/env bash
# Installs `tansu`, the Apache Kafka compatible broker the worker's integration
# tests (tests/worker_*.rs) start as a real broker process over TCP, with
# in-memory storage. Skips the install when `tansu` is already on PATH or in
# ~/.cargo/bin. Building it takes 15–20 minutes on 2 cores; cache ~/.cargo/bin/tansu.
set -euo pipefail
TANSU_VERSION=0.6.0
if command -v tansu >/dev/null 2>&1; then
  echo "tansu already installed: $(command -v tansu) ($(tansu --version))"
  exit 0
fi
if [ -x "$HOME/.cargo/bin/tansu" ]; then
  echo "tansu already installed: $HOME/.cargo/bin/tansu ($("$HOME/.cargo/bin/tansu" --version)); add ~/.cargo/bin to PATH"
  exit 0
fi
echo "installing tansu $TANSU_VERSION (cargo install, ~20 min on 2 cores)…"
cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked
echo "installed: $(command -v tansu || echo "$HOME/.cargo/bin/tansu")"
