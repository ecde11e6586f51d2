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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the
# last of which is the doc-tests' "0 passed").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
exit "$status"
