#!/usr/bin/env bash
# An nvcc for `cargo check --features cuda` in CI (NVCC=this): candle-kernels' PTX kernels, the ones mpcs runs, are
# compiled for real, but the GGUF-quantised and MoE kernels it builds into a static library (libmoe.a: ten minutes
# of nvcc on two cores, needed only when linking, and never called by mpcs) become empty objects. `cargo check`
# links nothing, so this checks every line of mpcs behind `cfg(feature = "cuda")`; scripts/gpu/build.sh builds the
# real thing with the real nvcc.
set -euo pipefail
real=$(command -v nvcc)
compile=0; stub=0; out=
prev=
for a in "$@"; do
  case "$a" in
    -c) compile=1 ;;
    *mmq_*.cu|*moe_*.cu|*mmvq_gguf.cu|*/moe/*.cu) stub=1 ;;
  esac
  [ "$prev" = "-o" ] && out=$a
  prev=$a
done
if [ "$compile" = 1 ] && [ "$stub" = 1 ] && [ -n "$out" ]; then
  exec cc -c -x c /dev/null -o "$out"
fi
exec "$real" "$@"
