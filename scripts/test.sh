#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need
# (the tansu broker, promtool) from this repository's own scripts, then runs
# every unit and integration test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
for setup in scripts/install-build-deps.sh scripts/install-tansu.sh scripts/install-promtool.sh; do
  if [ -x "$setup" ]; then "$setup"; fi
done
python3 scripts/check_data.py
cargo test --locked "$@"
