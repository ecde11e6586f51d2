#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need
# (build dependencies, promtool, a venv with kafka-python) from this
# repository's own scripts, then runs, in this order:
#   1. tests/broker_conformance.rs — the test broker (triagem-test-broker,
#      librdkafka's mock cluster in its own process) returns what is asked
#      for: with rdkafka, and with kafka-python when the venv could be made.
#      If it fails, nothing else runs: the delivery tests would prove nothing.
#   2. every other unit and integration test;
#   3. the doc-tests.
# `.ci/run` calls exactly this. Arguments go to the cargo test of step 2.
# The tests no longer need tansu (see the README's known issues);
# scripts/install-tansu.sh stays for scripts/loadtest.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
for setup in scripts/install-build-deps.sh scripts/install-promtool.sh; do
  if [ -x "$setup" ]; then "$setup"; fi
done
python3 scripts/check_data.py

# kafka-python, the independent client of the conformance test, in a venv
# under target/ (kept between runs).
venv=target/test-venv
conformance=()
python_skip=""
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import kafka' 2>/dev/null; then
  :
elif ! command -v python3 >/dev/null 2>&1; then
  python_skip="python3 is not installed"
elif ! python3 -m venv "$venv" >/dev/null 2>&1; then
  python_skip="python3 -m venv failed (Debian: apt-get install python3-venv)"
elif ! "$venv/bin/pip" install -q --disable-pip-version-check 'kafka-python==3.0.12'; then
  python_skip="pip could not install kafka-python"
fi
if [ -z "$python_skip" ]; then
  export TRIAGEM_PYTHON="$PWD/$venv/bin/python"
  conformance=(-- --include-ignored --skip tansu)
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
summary() {
  # One closing line for the whole run (cargo prints one per test binary).
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
       END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
}

set +e
# Everything is built first, so that a build that fails says so (and is not
# taken for a failing broker below).
echo "== build"
cargo test --locked --no-run --all-targets 2>&1 | tee "$log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "BUILD FAILED: the tests were not run."
  summary
  exit 1
fi
echo "== broker conformance (the broker every delivery test runs on)"
if [ -n "$python_skip" ]; then
  echo "kafka-python conformance check SKIPPED: $python_skip (the rdkafka checks still run)"
fi
cargo test --locked --test broker_conformance "${conformance[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "BROKER CONFORMANCE FAILED: the test broker loses or misplaces records; the delivery tests would prove nothing on it, so they were not run."
  summary
  exit "$status"
fi

echo "== every other test"
targets=(--lib --bins)
for t in tests/*.rs; do
  name=$(basename "$t" .rs)
  [ "$name" = broker_conformance ] || targets+=(--test "$name")
done
cargo test --locked "${targets[@]}" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
cargo test --locked --doc 2>&1 | tee -a "$log"
doc_status=${PIPESTATUS[0]}
set -e
summary
[ "$status" -eq 0 ] && exit "$doc_status"
exit "$status"
