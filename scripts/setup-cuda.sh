#!/usr/bin/env bash
# The CUDA toolkit for `cargo build --features cuda`, from PyPI wheels, on a
# machine with no system toolkit and no GPU. Idempotent; prints the path of an
# env file to `source` (build and run environment), which it (re)writes.
#
#   env=$(scripts/setup-cuda.sh) && source "$env"
#
# What it makes, under $TRIAGEM_CUDA_VENV (default target/cuda-venv):
# - a venv with NVIDIA's CUDA 13.0 wheels. Only the CUDA 13 wheels
#   (`nvidia-cuda-nvcc`, no -cu12 suffix) carry the nvcc driver, cudafe++ and
#   cicc; nvidia-cuda-nvcc-cu12 has only ptxas and libnvvm. 13.0 rather than
#   a later 13.x because candle JIT-compiles its PTX in the driver, which must
#   be at least as new as the nvcc that wrote it: 13.0 needs driver >= 580.
#   They all install into one tree, site-packages/nvidia/cu13 (bin, include,
#   lib, nvvm), which is CUDA_HOME.
# - cuda-link/: the unversioned names the linker asks for (-lcublas, ...),
#   which the wheels do not ship (only libcublas.so.13, ...), as symlinks.
# - cuda-link/stubs/libcuda.so: a link-time stand-in for the driver
#   (libcuda.so.1, which no wheel carries: it comes with the NVIDIA driver).
#   candle's cudarc links the driver API dynamically, so the linker needs a
#   libcuda.so exporting its symbols. The stand-in is built here from cuda.h
#   (and cudarc's bindings when cargo has fetched them); every function returns
#   CUDA_ERROR_STUB_LIBRARY (34), like the stub in NVIDIA's toolkit. It is
#   never on LD_LIBRARY_PATH by default: on a GPU host the real driver must win.
#   On a host with no driver, TRIAGEM_CUDA_STUBS names its folder, for running
#   the cuda binary on CPU (see the README's "GPU build").
# - cuda.env: PATH (nvcc), CUDA_HOME/CUDA_PATH/CUDA_ROOT, LIBRARY_PATH (link),
#   LD_LIBRARY_PATH (the wheels' libraries at run time), CUDA_COMPUTE_CAP
#   (default 90 = H100/H200: there is no nvidia-smi to ask), TRIAGEM_CUDA_STUBS.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TRIAGEM_CUDA_VENV:-target/cuda-venv}
mkdir -p "$(dirname "$venv")"
venv=$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")

wheels=(
  'nvidia-cuda-nvcc==13.0.88'
  'nvidia-cuda-crt==13.0.88'
  'nvidia-nvvm==13.0.88'
  'nvidia-cuda-runtime==13.0.96'
  'nvidia-cuda-nvrtc==13.0.88'
  'nvidia-cuda-cccl==13.0.85'
  'nvidia-cublas==13.0.2.14'
  'nvidia-curand==10.4.0.35'
)
stamp="$venv/.wheels"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check --only-binary=:all: "${wheels[@]}" >&2
  echo "${wheels[*]}" >"$stamp"
fi

purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda="$purelib/nvidia/cu13"
if [ ! -x "$cuda/bin/nvcc" ]; then
  echo "setup-cuda: $cuda/bin/nvcc is missing after installing ${wheels[*]}" >&2
  exit 1
fi

link="$venv/cuda-link"
mkdir -p "$link/stubs"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(ls "$cuda/lib/lib$lib.so."* 2>/dev/null | grep -E "lib$lib\.so\.[0-9]+$" | head -n1)
  if [ -z "$real" ]; then
    echo "setup-cuda: no lib$lib.so.N in $cuda/lib" >&2
    exit 1
  fi
  ln -sfn "$real" "$link/lib$lib.so"
done

# The driver stand-in: every cu* function of cuda.h (after its version macros,
# so cuCtxCreate is cuCtxCreate_v4) plus every name cudarc's driver bindings
# link, returning CUDA_ERROR_STUB_LIBRARY; cuGetErrorName/String answer so
# that error can be printed.
stub="$link/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$cuda/include/cuda.h" -nt "$stub" ] || [ "$0" -nt "$stub" ]; then
  names=$(mktemp)
  echo '#include <cuda.h>' | gcc -E -I"$cuda/include" - | grep -oE '\bcu[A-Za-z0-9_]+ *\(' | tr -d ' (' >"$names"
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null || true)
  if [ -n "$cudarc" ]; then
    grep -hoE '^ +fn cu[A-Za-z0-9_]+' $cudarc | awk '{print $2}' >>"$names"
  fi
  src=$(mktemp --suffix=.c)
  {
    echo '/* Link-time stand-in for libcuda.so.1, made by scripts/setup-cuda.sh. */'
    echo 'int cuGetErrorName(int e, const char **s) { *s = e == 34 ? "CUDA_ERROR_STUB_LIBRARY" : "CUDA_ERROR_UNKNOWN"; return 0; }'
    echo 'int cuGetErrorString(int e, const char **s) { *s = e == 34 ? "CUDA driver is a stub library" : "unknown error"; return 0; }'
    sort -u "$names" | grep -vE '^(cuuint|cudaError|cuda[A-Z]|cuGetErrorName$|cuGetErrorString$)' |
      awk '{printf "int %s(void) { return 34; }\n", $1}'
  } >"$src"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub" "$src"
  ln -sfn libcuda.so "$link/stubs/libcuda.so.1"
  rm -f "$names" "$src"
fi

env_file="$venv/cuda.env"
cat >"$env_file" <<EOF
# Made by scripts/setup-cuda.sh; \`source\` it to build or run triagem --features cuda.
export CUDA_HOME="$cuda"
export CUDA_PATH="$cuda"
export CUDA_ROOT="$cuda"
export PATH="$cuda/bin:\${PATH}"
export LIBRARY_PATH="$link:$link/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
# Only on a host with no NVIDIA driver, to start the cuda binary for CPU work:
#   LD_LIBRARY_PATH="\$TRIAGEM_CUDA_STUBS:\$LD_LIBRARY_PATH" triagem ...
export TRIAGEM_CUDA_STUBS="$link/stubs"
EOF
echo "$env_file"
