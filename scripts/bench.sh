#!/usr/bin/env bash
# The benchmark, in one run, as one table plus one JSON line (the last line):
#   1. the peers on the same model directory and texts (PyTorch eager + transformers, and ONNX Runtime on
#      the same weights exported to ONNX), with scripts/peer_throughput.py, when a Python with torch,
#      transformers, onnx and onnxruntime is given in TRIAGEM_BENCH_PYTHON (skipped, with a message, when not);
#   2. the worker end to end through a real broker (triagem-test-broker, librdkafka's mock cluster in its own
#      process; BROKER=tansu for tansu): after a warm-up, a backlog sent while the worker is stopped
#      (`loadgen --backlog`: the rate the worker drains it at, how busy its model was, who used the cores, and
#      the worker's cores by thread), then
#      `triagem loadgen` as fast as possible, then at half that rate for the latency (loadgen's, end to
#      end, and the worker's own from its /metrics before and after);
#   3. `triagem bench`: triagem's model path at batch 1/8/32 and at the worker's batching, tokenisation
#      included, the FLOP ceiling and peak memory, with 1 and 2 folded into its table.
#
# Usage: scripts/bench.sh [MODEL_DIR]            (default models/triagem)
# Env:   TRIAGEM_BIN (default target/release/triagem; built when missing), TRIAGEM_BENCH_PYTHON,
#        BENCH_THREADS (2: the model's threads, and the peers'), BENCH_MESSAGES (2048),
#        BENCH_DATA (data/teste.jsonl), E2E_COUNT (20000; 0 skips the end-to-end runs),
#        E2E_LATENCY_RATE (the latency run's rate in msg/s; default half the as-fast-as-possible throughput:
#        a fixed rate compares two builds at the same load), E2E_LINGER_MS (20: loadgen's producer's linger.ms
#        in that run), E2E_READER_WAIT_MS (loadgen's reader's fetch.wait.max.ms in that run: 1 against the test
#        broker, 100 against tansu), BROKER (test | tansu; TANSU_STORAGE memory |
#        sqlite, the latter for a tansu built with --features libsql), BENCH_OUT (a directory to
#        keep the parts in), BENCH_DEVICE (cpu; cuda runs
#        the worker, `triagem bench` and the peers on the GPU), BENCH_BATCH_SIZES (1,8,32), BENCH_PEAK_GFLOPS
#        (the device's fp32 peak for the ceiling; measured on the CPU when unset), BENCH_REPEATS (3: each
#        model-path row, triagem's and the peers' alike, is timed that many times, the rows interleaved, and
#        reports the median — a single timing of batch 1 lasts ~0.1 s, and this VM's speed moves by ±20 %
#        from one such moment to the next).
# A base model without a classification head (models/base/all-MiniLM-L6-v2) is given a fresh, untrained
# two-label head first (needs TRIAGEM_BENCH_PYTHON): the speed is the forward pass's, the labels mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/triagem}
bin=${TRIAGEM_BIN:-target/release/triagem}
threads=${BENCH_THREADS:-2}
messages=${BENCH_MESSAGES:-2048}
data=${BENCH_DATA:-data/teste.jsonl}
e2e_count=${E2E_COUNT:-20000}
broker_kind=${BROKER:-test}
e2e_linger=${E2E_LINGER_MS:-20}
# The test broker answers a fetch once data arrive (or ~10 ms later: a short wait keeps that out of loadgen's
# latency); tansu holds every fetch for the whole wait, so a 1 ms wait makes loadgen's reader a busy poll —
# ~1,000 fetches a second, each listing every stored batch of the output partitions (0.2 of the two cores).
if [ "$broker_kind" = tansu ]; then e2e_reader_wait=${E2E_READER_WAIT_MS:-100}; else e2e_reader_wait=${E2E_READER_WAIT_MS:-1}; fi
python=${TRIAGEM_BENCH_PYTHON:-}
device=${BENCH_DEVICE:-cpu}
sizes=${BENCH_BATCH_SIZES:-1,8,32}
repeats=${BENCH_REPEATS:-3}
peak_args=()
[ -z "${BENCH_PEAK_GFLOPS:-}" ] || peak_args=(--peak-gflops "$BENCH_PEAK_GFLOPS")
say() { echo "bench: $*" >&2; }
# cpu_ticks PID (or PID/task/TID, one thread): its user + system CPU time so far, in clock ticks (0 once it is gone).
cpu_ticks() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  echo "${stat##*) }" | awk '{ print $12 + $13 }' # fields after "PID (COMM) ": utime and stime are 12 and 13
}
# thread_ticks PID: each thread's name, user + system CPU ticks so far, and nanoseconds spent runnable but
# waiting for a CPU (schedstat's second field; 0 without schedstats), a line each, the name's numbers
# dropped (the model's threads triagem-model-0, -1 … are one group; librdkafka's rdk:broker1, rdk:broker2 …).
thread_ticks() {
  local t name waited
  for t in /proc/"$1"/task/*; do
    name=$(tr -d '0-9' <"$t/comm" 2>/dev/null | tr ' ' _) || continue
    waited=$(awk '{ print $2 }' "$t/schedstat" 2>/dev/null) || waited=0
    echo "$name $(cpu_ticks "$1/task/${t##*/}") ${waited:-0}"
  done
}
# machine_ticks: the machine's busy and total CPU ticks so far, all cores (/proc/stat).
machine_ticks() { awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6; exit }' /proc/stat; }
# cpu_shares [LINGER_MS FETCH_WAIT_MS]: the cores the worker, the broker and the rest used between cpu_before
# and cpu_after (each: worker ticks, broker ticks, machine busy and total ticks), as `triagem bench`'s
# --cpu-shares / --drain-cpu-shares JSON; with loadgen's linger and fetch wait in that run when given, and
# the worker's cores by thread group when $threads_before and $threads_after hold thread_ticks of the two moments
# (and, by group, the cores' worth of time its threads were runnable but waiting for a CPU).
cpu_shares() {
  { [ -z "${threads_before:-}" ] || printf '%s\n' "$threads_before" | sed 's/^/before /'
    [ -z "${threads_after:-}" ] || printf '%s\n' "$threads_after" | sed 's/^/after /'; } |
  awk -v w="$((cpu_after[0] - cpu_before[0]))" -v b="$((cpu_after[1] - cpu_before[1]))" \
    -v busy="$((cpu_after[2] - cpu_before[2]))" -v total="$((cpu_after[3] - cpu_before[3]))" -v n="$(nproc)" \
    -v kind="$broker_kind${TANSU_STORAGE:+ ($TANSU_STORAGE)}" -v linger="${1:-}" -v wait="${2:-}" \
    -v hz="$(getconf CLK_TCK)" \
    '$1 == "before" { group[$2] -= $3; waited[$2] -= $4 } $1 == "after" { group[$2] += $3; waited[$2] += $4 }
    END { wall = total / n; if (wall <= 0) exit
      printf "{\"broker\": \"%s\", \"worker_cores\": %.4f, \"broker_cores\": %.4f, \"other_cores\": %.4f, \"cores\": %d, \"machine_busy\": %.4f",
        kind, w / wall, b / wall, (busy - w - b) / wall, n, busy / total
      if (linger != "") printf ", \"loadgen_linger_ms\": %d, \"loadgen_fetch_wait_ms\": %d", linger, wait
      sep = ", \"worker_threads\": {"
      for (g in group) if (group[g] > 0) { printf "%s\"%s\": %.4f", sep, g, group[g] / wall; sep = ", " }
      if (sep == ", ") printf "}"
      sep = ", \"worker_threads_waiting\": {"
      for (g in group) if (group[g] > 0) { printf "%s\"%s\": %.4f", sep, g, waited[g] / 1e9 / (wall / hz); sep = ", " }
      if (sep == ", ") printf "}"
      print "}" }'
}
# shellcheck source=scripts/bench-common.sh
. scripts/bench-common.sh

have_python=0
if [ -n "$python" ] && "$python" -c 'import torch, transformers, onnx, onnxruntime' 2>/dev/null; then
  have_python=1
elif [ -n "$python" ]; then
  say "$python lacks torch, transformers, onnx or onnxruntime: no peers"
else
  say "TRIAGEM_BENCH_PYTHON not set: no peers (PyTorch, ONNX Runtime) in this run"
fi

# A base checkpoint without a head: save it as BertForSequenceClassification with a fresh 2-label head.
if ! grep -q '"id2label"' "$model/config.json" || ! "$bin" classify --model "$model" --threads 1 ok >/dev/null 2>&1; then
  [ "$have_python" = 1 ] || { say "$model has no classification head and there is no Python to add one"; exit 2; }
  say "$model has no classification head: benchmarking it with a fresh, untrained one"
  "$python" - "$model" "$out/with-head" <<'PY'
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = AutoModelForSequenceClassification.from_pretrained(
    src, num_labels=2, id2label={0: "suporte", 1: "venda"}, label2id={"suporte": 0, "venda": 1})
m.save_pretrained(dst, safe_serialization=True)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
PY
  model="$out/with-head"
fi

peer_args=()
if [ "$have_python" = 1 ]; then
  say "peers: PyTorch and ONNX Runtime on $device, $threads threads"
  "$python" scripts/peer_throughput.py "$model" "$data" --threads "$threads" --n "$messages" \
    --device "$device" --batch-sizes "$sizes" --repeats "$repeats" \
    >"$out/peers.txt" 2>"$out/peers.log" || { say "peer script failed, see $out/peers.log"; tail -5 "$out/peers.log" >&2; exit 1; }
  peer_args=(--peers "$out/peers.txt")
fi

e2e_args=()
if [ "$e2e_count" -gt 0 ]; then
  pids=()
  cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; kill -CONT "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
  trap cleanup EXIT
  if [ "$broker_kind" = tansu ]; then
    command -v tansu >/dev/null || { say "tansu missing: scripts/install-tansu.sh"; exit 2; }
    port=$(free_port)
    case "${TANSU_STORAGE:-memory}" in
      memory) storage=memory://tansu/ ;;
      sqlite) rm -f "$out/tansu.db"; storage=sqlite://tansu.db ;; # a path relative to tansu's directory: $out
      *) say "TANSU_STORAGE=$TANSU_STORAGE: expected memory or sqlite"; exit 2 ;;
    esac
    (cd "$out" && exec tansu broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$storage") >"$out/broker.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
    tansu topic create --broker "tcp://127.0.0.1:$port" --partitions 6 atendimento.mensagens >/dev/null
    for t in "${topics[@]}"; do tansu topic create --broker "tcp://127.0.0.1:$port" --partitions 1 "$t" >/dev/null; done
    brokers="127.0.0.1:$port"
  else
    start_test_broker broker
  fi
  metrics_port=$(free_port)
  TRIAGEM__KAFKA__BROKERS="$brokers" TRIAGEM__METRICS__LISTEN="127.0.0.1:$metrics_port" \
    TRIAGEM__MODEL__PATH="$model" TRIAGEM__MODEL__THREADS="$threads" TRIAGEM__MODEL__DEVICE="$device" \
    TRIAGEM__KAFKA__CONSUMER__FETCH__WAIT__MAX__MS=10 RUST_LOG=warn \
    "$bin" worker --config config/default.toml >"$out/worker.log" 2>&1 &
  worker_pid=$!
  pids+=("$worker_pid")
  wait_ready "$metrics_port"
  "$bin" loadgen --brokers "$brokers" --data "$data" --count 2000 --quiet >/dev/null # warm-up
  # A backlog sent while the worker is stopped (SIGSTOP), then resumed: the rate it drains at is the
  # worker's alone, loadgen's producer no longer sharing the cores (its reader still does, as does the broker).
  say "worker end to end: a backlog of $e2e_count messages, sent while the worker is stopped"
  curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$out/metrics-before-backlog.txt"
  kill -STOP "$worker_pid"
  "$bin" loadgen --brokers "$brokers" --data "$data" --count "$e2e_count" --backlog "$out/backlog.sent" \
    --settle-timeout 120s --quiet --json >"$out/e2e-backlog.json" &
  backlog_pid=$!
  for _ in $(seq 12000); do [ -f "$out/backlog.sent" ] || ! kill -0 "$backlog_pid" 2>/dev/null && break; sleep 0.01; done
  # Who uses the cores while the worker drains: its rate is its model's on what the rest leaves it.
  threads_before=$(thread_ticks "$worker_pid")
  cpu_before=("$(cpu_ticks "$worker_pid")" "$(cpu_ticks "${pids[0]}")" $(machine_ticks))
  kill -CONT "$worker_pid"
  [ -f "$out/backlog.sent" ] || { say "loadgen did not send the backlog"; wait "$backlog_pid"; exit 1; }
  wait "$backlog_pid"
  cpu_after=("$(cpu_ticks "$worker_pid")" "$(cpu_ticks "${pids[0]}")" $(machine_ticks))
  threads_after=$(thread_ticks "$worker_pid")
  cpu_shares >"$out/cpu-drain.json"
  threads_before='' threads_after=''
  curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$out/metrics-after-backlog.txt"
  say "worker end to end through the $broker_kind broker: $e2e_count messages as fast as possible"
  "$bin" loadgen --brokers "$brokers" --data "$data" --count "$e2e_count" --settle-timeout 120s --quiet --json \
    >"$out/e2e-max.json"
  half=$(python3 -c "import json,sys; print(max(1, int(json.load(open(sys.argv[1]))['throughput'] / 2)))" "$out/e2e-max.json")
  rate=${E2E_LATENCY_RATE:-$half}
  if [ -n "${E2E_LATENCY_RATE:-}" ]; then
    say "worker end to end at a fixed rate (E2E_LATENCY_RATE): $rate msg/s for 20 s"
  else
    say "worker end to end at half that rate: $rate msg/s for 20 s"
  fi
  # loadgen's reader asks for outputs every E2E_READER_WAIT_MS (above): with librdkafka's default
  # fetch.wait.max.ms (500) the test broker may hold its fetch ~10 ms past an output's arrival, which is the
  # reader's latency, not the worker's.
  # The worker's own latency over this run: its /metrics before and after.
  curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$out/metrics-before-half.txt"
  # Who used the cores meanwhile: the worker shares them with the broker and loadgen, and its latency tail
  # depends on what they leave it.
  cpu_before=("$(cpu_ticks "$worker_pid")" "$(cpu_ticks "${pids[0]}")" $(machine_ticks))
  # loadgen's producer lingers E2E_LINGER_MS (20) rather than librdkafka's 5 ms: at ~4,000 msg/s over six
  # partitions, 5 ms means batches of ~3 messages and over a thousand produce requests a second for a broker
  # on the worker's two cores (tansu's memory engine also stores each batch as an object that every fetch of
  # its partition lists). Upstream of the worker's receipt, so not in its own latency; in loadgen's, yes.
  "$bin" loadgen --brokers "$brokers" --data "$data" --rate "$rate" --duration 20s --settle-timeout 60s --quiet \
    --consumer "fetch.wait.max.ms=$e2e_reader_wait" --producer "linger.ms=$e2e_linger" --json >"$out/e2e-half.json"
  cpu_after=("$(cpu_ticks "$worker_pid")" "$(cpu_ticks "${pids[0]}")" $(machine_ticks))
  curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$out/metrics-after-half.txt"
  # In `triagem bench`'s table and JSON (--cpu-shares below).
  cpu_shares "$e2e_linger" "$e2e_reader_wait" >"$out/cpu-latency-run.json"
  grep -E '^triagem_(batch_size|batch_tokens|inference_seconds)_(sum|count)' "$out/metrics-after-half.txt" \
    >"$out/worker-metrics.txt" || true
  cleanup
  trap - EXIT
  e2e_args=(--end-to-end "$out/e2e-backlog.json" --end-to-end "$out/e2e-max.json" --end-to-end "$out/e2e-half.json"
    --worker-metrics "$out/metrics-before-half.txt" --worker-metrics "$out/metrics-after-half.txt"
    --drain-metrics "$out/metrics-before-backlog.txt" --drain-metrics "$out/metrics-after-backlog.txt")
  if [ -s "$out/cpu-latency-run.json" ]; then e2e_args+=(--cpu-shares "$out/cpu-latency-run.json"); fi
  if [ -s "$out/cpu-drain.json" ]; then e2e_args+=(--drain-cpu-shares "$out/cpu-drain.json"); fi
fi

say "triagem's model path on $device, $threads threads"
"$bin" bench --model "$model" --data "$data" --messages "$messages" --threads "$threads" --device "$device" \
  --batch-sizes "$sizes" --repeats "$repeats" "${peak_args[@]}" "${peer_args[@]}" "${e2e_args[@]}"
[ -s "$out/worker-metrics.txt" ] && { echo; echo "worker batches during the end-to-end runs:"; cat "$out/worker-metrics.txt"; } >&2
say "parts kept in $out"
