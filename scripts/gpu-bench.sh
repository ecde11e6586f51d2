#!/usr/bin/env bash
# Issue 8's GPU figures in one run, on a GPU host (an NVIDIA driver >= 580, the CUDA 13 libraries of a CUDA
# image or of NVIDIA's wheels under its python3) with a binary built elsewhere by scripts/build-cuda.sh:
#   1. the GPU's name, and the default model's predictions of data/teste.jsonl on cuda against the CPU
#      (same binary): labels that differ, largest score difference;
#   2. scripts/bench.sh on the device for the default model, a MiniLM-L6-shaped and a BERT-base-shaped
#      classifier: `triagem bench --device cuda` (batch 1 / 8 / 32 / 128 and the worker's batching,
#      tokenisation included), the peers on the same device and texts (PyTorch on cuda; ONNX Runtime only
#      where its CUDA provider is installed), and for the default model the worker end to end on cuda through
#      the test broker (triagem-test-broker beside BIN). The shaped ones are made here by `transformers` with
#      random weights (seed 0) and the default model's tokenizer, so their figures are the forward pass's
#      speed at those sizes, and their labels mean nothing.
#
# Usage: scripts/gpu-bench.sh [BIN]   (default .gpu/triagem; .gpu/triagem.xz is unpacked first)
# Env:   DEVICE (cuda; `cpu` checks the script's plumbing on a machine without a GPU), PYTHON (python3, with
#        torch and transformers), OUT (a directory for the JSON reports; default a fresh one), PEAK_GFLOPS
#        (the GPU's fp32 peak for the ceiling; 67000, an H100/H200 SXM's non-tensor-core fp32), MESSAGES
#        (texts per bench row, 4096), THREADS (CPU threads for tokenising and the peers, 8), E2E_COUNT
#        (the default model's end-to-end messages, 20000; 0 skips the worker).
# The binary is about 61 MiB stripped and 9 MiB as xz, so it travels as `.gpu/triagem.xz`
# (`strip -o .gpu/triagem target/cuda/release/triagem && xz -T0 .gpu/triagem`), and the test broker beside it
# as `.gpu/triagem-test-broker.xz` (built by `scripts/build-cuda.sh --bin triagem-test-broker`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.gpu/triagem}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
peak=${PEAK_GFLOPS:-67000}
messages=${MESSAGES:-4096}
threads=${THREADS:-8}
e2e_count=${E2E_COUNT:-20000}
say() { echo "gpu-bench: $*" >&2; }
mkdir -p "$out"

for b in "$bin" "$(dirname "$bin")/triagem-test-broker"; do
  if [ ! -x "$b" ] && [ -f "$b.xz" ]; then
    xz -dkf "$b.xz" && chmod +x "$b"
  fi
done
[ -x "$bin" ] || { say "no $bin (build it with scripts/build-cuda.sh, see the header)"; exit 2; }
[ -f models/triagem/config.json ] || { say "no models/triagem (carry it, or train it: triagem train)"; exit 2; }

# The CUDA 13 libraries from the python's NVIDIA wheels, when the loader does not find them by itself.
if ldd "$bin" | grep -q 'libcudart.so.13 => not found'; then
  libs=$("$python" -c 'import nvidia, os; print(":".join(p for d in nvidia.__path__ for p in (os.path.join(d, "cu13", "lib"), os.path.join(d, "cu13", "lib64")) if os.path.isdir(p)))' 2>/dev/null || true)
  [ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "CUDA libraries from $python's wheels: ${libs:-none found}"
fi
missing=$(ldd "$bin" | grep 'not found' || true)
[ -z "$missing" ] || { say "libraries not found:"; echo "$missing" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || true

say "1. the default model on $device against the CPU, data/teste.jsonl"
"$python" -c 'import json,sys; [print(json.loads(l)["prompt"]) for l in open("data/teste.jsonl") if l.strip()]' >"$out/texts.txt"
"$bin" classify --json --device cpu <"$out/texts.txt" >"$out/cpu.jsonl"
"$bin" classify --json --device "$device" <"$out/texts.txt" >"$out/$device.jsonl"
"$python" - "$out/cpu.jsonl" "$out/$device.jsonl" <<'PY' | tee "$out/parity.txt"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b), (len(a), len(b))
differ = sum(x["label"] != y["label"] for x, y in zip(a, b))
worst = max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b) for k in x["scores"])
print(f"{len(a)} texts: {differ} labels differ, largest score difference {worst:.2e}")
PY

say "2. shaped classifiers with random weights (transformers, seed 0)"
"$python" - "$out" <<'PY'
import os, shutil, sys, torch
from transformers import BertConfig, BertForSequenceClassification
out = sys.argv[1]
for name, hidden, layers, heads in (("minilm-l6-shaped", 384, 6, 12), ("bert-base-shaped", 768, 12, 12)):
    d = os.path.join(out, name)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=2,
                     id2label={0: "suporte", 1: "venda"}, label2id={"suporte": 0, "venda": 1})
    BertForSequenceClassification(cfg).eval().save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join("models/triagem", f), d)
    print(d, file=sys.stderr)
PY

# 3. Each model through scripts/bench.sh on $device: `triagem bench` (batch 1/8/32/128 and the worker's
# batching), the peers on the same device and texts (PyTorch; ONNX Runtime where the installed onnxruntime has
# the CUDA provider), and for the default model the worker end to end through the test broker.
for model in models/triagem "$out/minilm-l6-shaped" "$out/bert-base-shaped"; do
  name=$(basename "$model")
  e2e=0
  [ "$model" = models/triagem ] && e2e=$e2e_count
  say "bench $name on $device (end to end: $e2e messages)"
  # Each row timed once unless BENCH_REPEATS says otherwise: the device's time is lent by the minute.
  TRIAGEM_BIN="$bin" TRIAGEM_BENCH_PYTHON="$python" BENCH_DEVICE="$device" BENCH_BATCH_SIZES=1,8,32,128 \
    BENCH_REPEATS="${BENCH_REPEATS:-1}" BENCH_MESSAGES="$messages" BENCH_PEAK_GFLOPS="$peak" BENCH_THREADS="$threads" E2E_COUNT="$e2e" \
    BENCH_OUT="$out/parts-$name" scripts/bench.sh "$model" >"$out/bench-$name.txt" 2>"$out/bench-$name.log" ||
    { tail -15 "$out/bench-$name.log" >&2; exit 1; }
  grep -v '^{' "$out/bench-$name.txt"
  tail -1 "$out/bench-$name.txt" >"$out/bench-$name.json"
done
say "reports in $out"
