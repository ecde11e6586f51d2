#!/usr/bin/env bash
# `cargo build --release --features cuda` of the triagem binary, with the CUDA
# toolkit from PyPI wheels (scripts/setup-cuda.sh), into target/cuda so the CPU
# build in target/release is left alone. Arguments go to cargo build.
# The binary is target/cuda/release/triagem; it needs the env file's
# LD_LIBRARY_PATH at run time (see the README's "GPU build").
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=$(scripts/setup-cuda.sh)
# shellcheck disable=SC1090
source "$env_file"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CARGO_TARGET_DIR=$CARGO_TARGET_DIR" >&2
cargo build --release --locked --features cuda --bin triagem "$@"
