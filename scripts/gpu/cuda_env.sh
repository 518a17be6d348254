#!/usr/bin/env bash
# The CUDA 13.0 toolkit pieces that candle's `cuda` feature builds with, from PyPI wheels (no CUDA in Debian's
# archive here, and no GPU needed to compile): nvcc for candle's kernels, the headers, and cuBLAS/cuRAND/NVRTC/
# cudart to link against. Prints the environment to build with:
#
#   eval "$(scripts/gpu/cuda_env.sh)" && cargo check --features cuda
#
# VENV (first argument) defaults to $MPCS_CUDA_VENV or ~/.cache/mpcs/cuda-13.0; a second call reuses it.
# With --link it also makes what a full build links against: unversioned lib*.so names (the wheels ship only
# lib*.so.N) and a stub libcuda.so (SONAME libcuda.so.1) exporting the driver functions cudarc declares; no wheel
# ships the driver, and at run time the GPU machine's own libcuda.so.1 is used.
set -euo pipefail

link=0
args=()
for a in "$@"; do
  case "$a" in
    --link) link=1 ;;
    *) args+=("$a") ;;
  esac
done
venv=${args[0]:-${MPCS_CUDA_VENV:-$HOME/.cache/mpcs/cuda-13.0}}
# Matched to the GPU machine's driver (CUDA 13.0): a newer nvcc can emit PTX that driver refuses.
packages=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)

if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "${packages[*]}" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "${packages[@]}" >&2
  echo "${packages[*]}" >"$venv/.installed"
fi
cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "cuda_env.sh: no nvcc in $cu/bin after installing ${packages[*]}" >&2; exit 1; }

if [ "$link" = 1 ]; then
  for lib in cudart cublas cublasLt nvrtc curand; do
    if [ ! -e "$cu/lib/lib$lib.so" ]; then
      versioned=$(ls "$cu/lib/lib$lib.so."* 2>/dev/null | sort | head -1)
      [ -n "$versioned" ] || { echo "cuda_env.sh: no lib$lib.so.* in $cu/lib" >&2; exit 1; }
      ln -sf "$(basename "$versioned")" "$cu/lib/lib$lib.so"
    fi
  done
  if [ ! -e "$cu/stub/libcuda.so" ]; then
    # The driver API's functions as cudarc declares them (every CUDA version it knows: extra names are harmless).
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort | tail -1)
    [ -n "$cudarc" ] || { echo "cuda_env.sh: cudarc's source is not in the cargo registry; run 'cargo fetch' first" >&2; exit 1; }
    mkdir -p "$cu/stub"
    grep -rhoE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$cudarc/src/driver/sys/" | awk '{print $NF}' | sort -u \
      | awk '{print "void " $1 "(void) {}"}' >"$cu/stub/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/stub/libcuda.so" "$cu/stub/libcuda.c"
  fi
fi

echo "export PATH=\"$cu/bin:\$PATH\""
echo "export CUDA_HOME=\"$cu\""
echo "export CUDA_ROOT=\"$cu\""
# Hopper (the H200); set CUDA_COMPUTE_CAP before to build for another GPU.
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
echo "export LIBRARY_PATH=\"$cu/lib:$cu/stub\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
