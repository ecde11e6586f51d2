#!/usr/bin/env bash
# Rebuilds the base model that `triagem train` starts from by default,
# models/base/triagem-ptbr (committed, so that a fresh clone trains without
# this step): Brazilian Portuguese text from five Debian packages
# (scripts/pretrain-corpus.py, which installs them with apt and records their
# licences) plus the texts of data/treino.jsonl, then masked-language
# modelling with `triagem pretrain`. About 28 minutes on 2 quiet cores.
# OUT=DIR writes elsewhere; extra arguments go to `triagem pretrain` (e.g. --steps 12000).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/pretrain-corpus.py target/corpus
scripts/install-build-deps.sh
cargo build --release --locked
out=${OUT:-models/base/triagem-ptbr}
target/release/triagem pretrain --corpus target/corpus/corpus.txt --texts data/treino.jsonl --out "$out" "$@"
cp target/corpus/SOURCES.md "$out/SOURCES.md"
