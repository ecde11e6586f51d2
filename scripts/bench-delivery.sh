#!/usr/bin/env bash
# Exactly-once next to at-least-once, in one run: the worker end to end through the test broker behind its
# transaction layer (`triagem-test-broker serve --transactions`: fencing, offsets committed with their
# transaction, read_committed fetches), once per delivery mode, each on a fresh broker with the same
# topics, model and texts, `triagem loadgen --read-committed` reading the outputs as a downstream consumer
# of an exactly-once worker must:
#   1. as fast as possible (E2E_COUNT messages): end-to-end throughput;
#   2. at half that rate for HALF_FOR: latency from send to read_committed receipt (p50, p99).
# Modes: at_least_once, and exactly_once at each kafka.transaction_interval in INTERVALS.
# Prints one table; the loadgen reports and worker logs are kept in BENCH_OUT.
#
# Usage: scripts/bench-delivery.sh [MODEL_DIR]      (default models/triagem)
# Env:   TRIAGEM_BIN (default target/release/triagem; built when missing), BENCH_THREADS (2: the model's
#        threads), BENCH_DATA (data/teste.jsonl), E2E_COUNT (10000), HALF_FOR (20s),
#        INTERVALS ("50ms 100ms 500ms"), BENCH_OUT (a directory to keep the parts in).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/triagem}
bin=${TRIAGEM_BIN:-target/release/triagem}
threads=${BENCH_THREADS:-2}
data=${BENCH_DATA:-data/teste.jsonl}
e2e_count=${E2E_COUNT:-10000}
half_for=${HALF_FOR:-20s}
intervals=${INTERVALS:-50ms 100ms 500ms}
say() { echo "bench-delivery: $*" >&2; }
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh

pids=()
# The worker first (SIGTERM: it commits and exits; SIGKILL after 40 s), then the broker.
cleanup() {
  local worker=${worker_pid:-}
  if [ -n "$worker" ]; then
    kill -TERM "$worker" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$worker" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$worker" 2>/dev/null || true
  fi
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  worker_pid=
}
trap cleanup EXIT

# One mode: DELIVERY INTERVAL NAME.
run_mode() {
  local delivery=$1 interval=$2 name=$3
  start_test_broker "$name-broker" --transactions
  local metrics_port
  metrics_port=$(free_port)
  TRIAGEM__KAFKA__BROKERS="$brokers" TRIAGEM__METRICS__LISTEN="127.0.0.1:$metrics_port" \
    TRIAGEM__MODEL__PATH="$model" TRIAGEM__MODEL__THREADS="$threads" \
    TRIAGEM__KAFKA__DELIVERY="$delivery" TRIAGEM__KAFKA__TRANSACTION_INTERVAL="$interval" \
    TRIAGEM__KAFKA__TRANSACTIONAL_ID="bench-$name" \
    TRIAGEM__KAFKA__CONSUMER__FETCH__WAIT__MAX__MS=10 RUST_LOG=warn \
    "$bin" worker --config config/default.toml >"$out/$name-worker.log" 2>&1 &
  worker_pid=$!
  wait_ready "$metrics_port"
  say "$name: $e2e_count messages as fast as possible"
  "$bin" loadgen --brokers "$brokers" --data "$data" --count "$e2e_count" --settle-timeout 120s --quiet --json \
    --read-committed >"$out/$name-max.json" || true
  local half
  half=$(python3 -c "import json,sys; print(max(1, int(json.load(open(sys.argv[1]))['throughput'] / 2)))" "$out/$name-max.json")
  say "$name: $half msg/s for $half_for"
  "$bin" loadgen --brokers "$brokers" --data "$data" --rate "$half" --duration "$half_for" --settle-timeout 60s --quiet \
    --json --read-committed >"$out/$name-half.json" || true
  curl -sf "http://127.0.0.1:$metrics_port/metrics" | grep -E '^triagem_transaction' >"$out/$name-metrics.txt" || true
  cleanup
}

modes=("at_least_once 1s at-least-once")
for i in $intervals; do modes+=("exactly_once $i exactly-once-$i"); done
for m in "${modes[@]}"; do
  # shellcheck disable=SC2086
  run_mode $m
done
trap - EXIT

python3 - "$out" "${modes[@]}" <<'PY'
import json, sys, re
out, modes = sys.argv[1], sys.argv[2:]
print(f"{'mode':<28} {'max msg/s':>10} {'lost':>5} {'dup':>5} {'half rate':>10} {'p50 ms':>8} {'p99 ms':>8} {'lost':>5} {'dup':>5} {'txns':>6} {'aborted':>7}")
for m in modes:
    delivery, interval, name = m.split()
    mx = json.load(open(f"{out}/{name}-max.json"))
    hf = json.load(open(f"{out}/{name}-half.json"))
    metrics = open(f"{out}/{name}-metrics.txt").read()
    def sample(series):
        for line in metrics.splitlines():
            if line.startswith(series + " "):
                return int(float(line.split()[-1]))
        return 0
    committed = sample('triagem_transactions_total{result="committed"}')
    aborted = sample('triagem_transactions_total{result="aborted"}')
    label = "at_least_once" if delivery == "at_least_once" else f"exactly_once, {interval}"
    lat = hf.get("latency") or {}
    print(f"{label:<28} {mx['throughput']:>10.0f} {mx['missing']:>5} {mx['duplicates']:>5} {hf['send_rate']:>10.0f} "
          f"{lat.get('p50_ms', float('nan')):>8.1f} {lat.get('p99_ms', float('nan')):>8.1f} {hf['missing']:>5} "
          f"{hf['duplicates']:>5} {committed if delivery != 'at_least_once' else '-':>6} "
          f"{aborted if delivery != 'at_least_once' else '-':>7}")
PY
say "parts kept in $out"
