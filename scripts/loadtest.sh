#!/usr/bin/env bash
# End-to-end load test on one machine: a tansu broker (in memory) on a free
# local port, the topics, one `triagem worker` with the model in
# models/triagem, and `triagem loadgen` sending COUNT messages through it.
# Prints loadgen's report (JSON with --json); exits non-zero if any message is
# missing. Usage: scripts/loadtest.sh [COUNT] [extra loadgen flags…]
# Env: TRIAGEM_BIN (default target/release/triagem), PARTITIONS (default 6).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
shift || true
bin=${TRIAGEM_BIN:-target/release/triagem}
partitions=${PARTITIONS:-6}
[ -x "$bin" ] || { echo "no $bin: run cargo build --release (or set TRIAGEM_BIN)" >&2; exit 2; }
command -v tansu >/dev/null || { echo "tansu missing: run scripts/install-tansu.sh" >&2; exit 2; }
[ -f models/triagem/model.safetensors ] || "$bin" train --quiet

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
tansu topic create --broker "tcp://127.0.0.1:$port" --partitions "$partitions" atendimento.mensagens >/dev/null
for t in atendimento.venda atendimento.suporte atendimento.revisao atendimento.dlq; do
  tansu topic create --broker "tcp://127.0.0.1:$port" --partitions 1 "$t" >/dev/null
done

TRIAGEM__KAFKA__BROKERS="127.0.0.1:$port" TRIAGEM__METRICS__LISTEN="127.0.0.1:$metrics_port" \
  RUST_LOG=warn "$bin" worker --config config/default.toml >"$work/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

"$bin" loadgen --brokers "127.0.0.1:$port" --count "$count" --settle-timeout 120s "$@"
echo "worker metrics at the end:" >&2
curl -sf "http://127.0.0.1:$metrics_port/metrics" | grep -E '^triagem_(batch_size|inference_seconds)_(sum|count)|^triagem_process_resident_memory_bytes' >&2 || true
