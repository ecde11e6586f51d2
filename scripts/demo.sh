#!/usr/bin/env bash
# The first command on a fresh machine: builds triagem, trains the default
# model into models/triagem when it is missing, and runs `triagem demo`
# (the worker on librdkafka's in-memory mock cluster, with data/teste.jsonl
# sent through it). Arguments are passed to `triagem demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-build-deps.sh
cargo build --release --locked
exec target/release/triagem demo "$@"
