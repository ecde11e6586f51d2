#!/usr/bin/env python3
# Copied from the project brief's /work/shared/bench/peer_throughput.py, so that scripts/bench.sh works from a
# clean clone; added here: --device (PyTorch on cuda, and ONNX Runtime's CUDA provider when the installed
# onnxruntime has one, else no ONNX Runtime rows), --batch-sizes and --repeats (each batch size timed N times, the
# sizes interleaved, the median reported and the runs listed as NAME_bN_runs). With none given it runs as the original.
"""Peer throughput anchors on one HF model directory (e.g. the project's default
model): PyTorch eager (transformers) and ONNX Runtime (exported from the same
weights), same texts, batch sizes 1/8/32, tokenisation included, argmax only.
Also checks that both agree with each other on labels.

Usage: python peer_throughput.py MODEL_DIR EVAL.jsonl [--threads N] [--n 2048] [--device cpu|cuda]
       [--batch-sizes 1,8,32] [--repeats 1]
Prints one line per (runtime, batch) and a JSON line at the end."""
import argparse, json, os, tempfile, time

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("data")
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--n", type=int, default=2048)
ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
ap.add_argument("--batch-sizes", default="1,8,32")
ap.add_argument("--repeats", type=int, default=1)
a = ap.parse_args()
sizes = [int(s) for s in a.batch_sizes.split(",")]
dev = torch.device(a.device)
torch.set_num_threads(a.threads)
xs = [json.loads(l)["prompt"] for l in open(a.data, encoding="utf-8") if l.strip()]
xs = (xs * (a.n // len(xs) + 1))[: a.n]
tok = AutoTokenizer.from_pretrained(a.model)
m = AutoModelForSequenceClassification.from_pretrained(a.model).eval().to(dev)
ntok = sum(len(tok(x)["input_ids"]) for x in xs) / len(xs)
res = {"model": a.model, "threads": a.threads, "avg_tokens": ntok, "params": sum(p.numel() for p in m.parameters())}
if a.device == "cuda":
    res["device"] = torch.cuda.get_device_name(0)


def bench(name, fn):
    runs = {bs: [] for bs in sizes}
    for _ in range(max(1, a.repeats)):
        for bs in sizes:
            n = min(len(xs), 512) if bs == 1 else len(xs)
            fn(xs[:bs])  # warm-up
            t0 = time.perf_counter()
            for i in range(0, n, bs):
                fn(xs[i : i + bs])
            runs[bs].append(n / (time.perf_counter() - t0))
    for bs in sizes:
        r = float(np.median(runs[bs]))
        res[f"{name}_b{bs}"] = round(r)
        if len(runs[bs]) > 1:
            res[f"{name}_b{bs}_runs"] = [round(v) for v in runs[bs]]
        print(f"{name:8s} threads={a.threads} batch={bs:2d}: {r:8.0f} msg/s", flush=True)


def torch_fn(batch):
    with torch.inference_mode():
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt").to(dev)
        return m(**enc).logits.argmax(-1).cpu().numpy()


bench("torch", torch_fn)

import onnxruntime as ort

provider = "CUDAExecutionProvider" if a.device == "cuda" else "CPUExecutionProvider"
if provider not in ort.get_available_providers():
    print(f"onnxrt: this onnxruntime has no {provider} (only {ort.get_available_providers()}): no ONNX Runtime rows", flush=True)
    print(json.dumps(res))
    raise SystemExit(0)
m = m.cpu()
d = tempfile.mkdtemp()
path = os.path.join(d, "m.onnx")
enc = tok(["exemplo de mensagem", "outra"], padding=True, return_tensors="pt")
names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
torch.onnx.export(
    m, tuple(enc[k] for k in names), path, input_names=names, output_names=["logits"],
    dynamic_axes={k: {0: "b", 1: "s"} for k in names} | {"logits": {0: "b"}}, opset_version=17, dynamo=False,
)
so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(path, so, providers=[provider])
m = m.to(dev)


def ort_fn(batch):
    e = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="np")
    return sess.run(None, {k: e[k].astype(np.int64) for k in names})[0].argmax(-1)


agree = np.mean([(torch_fn(xs[i : i + 32]) == ort_fn(xs[i : i + 32])).all() for i in range(0, min(256, len(xs)), 32)])
res["ort_torch_agree"] = float(agree)
bench("onnxrt", ort_fn)
print(json.dumps(res))
