#!/usr/bin/env bash
# A release `mpcs` with CUDA for the GPU machine, which has no Rust toolchain: built here against the CUDA 13.0
# wheels (scripts/gpu/cuda_env.sh --link), stripped and xz-compressed to travel (about 65 MB stripped, 9 MB
# compressed). At run time it needs the GPU machine's driver (libcuda.so.1) and cuBLAS/cuRAND/NVRTC 13 on the
# loader path: scripts/gpu/check.sh finds them in that machine's Python environment.
#
#   scripts/gpu/build.sh [OUT_DIR]    -> OUT_DIR/mpcs.xz (default: gpu-bin/, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu-bin}
cargo fetch --locked
eval "$(scripts/gpu/cuda_env.sh --link)"
cargo build --locked --release --features cuda --bin mpcs --target-dir target/gpu-build
mkdir -p "$out"
strip -o "$out/mpcs" target/gpu-build/release/mpcs
xz -T0 -6 -f "$out/mpcs"
ls -l "$out/mpcs.xz"
