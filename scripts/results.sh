#!/usr/bin/env bash
# The README's results table in one run: the char n-gram TF-IDF + logistic
# regression baseline (scripts/baseline.py, trained here on the same training
# file) and each given model directory, scored with the same metrics on the
# same files. Not run by CI.
#
#   scripts/results.sh [MODEL_DIR ...]          # default: models/triagem
#   SEED_DATA=../shared/seed-data/teste.jsonl scripts/results.sh models/triagem /tmp/other
#
# Needs python3 (the baseline makes its own venv with scikit-learn) and a
# built triagem (TRIAGEM_BIN, else target/release/triagem, else target/debug/triagem).
# Prints one markdown row per model and set, and leaves the JSON reports in
# $OUT (default /tmp/triagem-results).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${TRIAGEM_BIN:-}
if [[ -z $bin ]]; then
  for b in target/release/triagem target/debug/triagem; do
    [[ -x $b ]] && bin=$b && break
  done
fi
[[ -n $bin ]] || { echo "results.sh: build triagem first (cargo build --release)" >&2; exit 1; }

train=${TRAIN:-data/treino.jsonl}
sets=(data/teste.jsonl data/realistas.jsonl)
seed_data=${SEED_DATA:-../shared/seed-data/teste.jsonl}
[[ -f $seed_data ]] && sets+=("$seed_data")
out=${OUT:-/tmp/triagem-results}
mkdir -p "$out"
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(models/triagem)

args=()
for s in "${sets[@]}"; do args+=(--data "$s"); done
python3 scripts/baseline.py --train "$train" "${args[@]}" --json >"$out/baseline.jsonl"

for m in "${models[@]}"; do
  name=$(echo "$m" | tr '/' '_')
  for s in "${sets[@]}"; do
    "$bin" eval --model "$m" --data "$s" --json |
      python3 -c 'import json,sys; r=json.load(sys.stdin); r["model"]=sys.argv[1]; r["data"]=sys.argv[2]; print(json.dumps(r, ensure_ascii=False))' "$m" "$s"
  done >"$out/$name.jsonl"
done

python3 - "$out" "${sets[@]}" -- "${models[@]}" <<'PY'
import json, sys, os
out = sys.argv[1]
dash = sys.argv.index("--")
sets, models = sys.argv[2:dash], sys.argv[dash + 1:]
def rows(path):
    return {r["data"]: r for r in map(json.loads, open(path))}
table = [("char TF-IDF + LR (baseline)", rows(os.path.join(out, "baseline.jsonl")))]
table += [(m, rows(os.path.join(out, m.replace("/", "_") + ".jsonl"))) for m in models]
head = "| model | " + " | ".join(f"{os.path.basename(s)} ({'/'.join(s.split('/')[-2:])}) acc / macro-F1 / ECE" for s in sets) + " |"
print(head)
print("|" + "---|" * (len(sets) + 1))
for name, r in table:
    cells = [f"{r[s]['accuracy']:.4f} / {r[s]['macro_f1']:.4f} / {r[s]['ece']:.4f}" for s in sets]
    print(f"| {name} | " + " | ".join(cells) + " |")
print()
print("review curve on", sets[1] if len(sets) > 1 else sets[0], "(threshold: % sent to review / % of errors caught)")
for name, r in table:
    rr = r[sets[1] if len(sets) > 1 else sets[0]]
    errors = rr["examples"] - sum(rr["confusion"]["matrix"][i][i] for i in range(len(rr["confusion"]["labels"])))
    auroc = "—" if rr.get("error_auroc") is None else f"{rr['error_auroc']:.4f}"
    print(f"  {name} ({errors} errors, error-detection AUROC {auroc}): " + "  ".join(
        f"{p['min_confidence']:.2f}: {100 * p['sent_to_review']:.1f}/{100 * p['errors_caught']:.0f}" for p in rr["review"]))
PY
