#!/usr/bin/env bash
# Runs the Rust stain bench and the Python references alternately, ROUNDS times, in one run on the
# same image, so that both see the same machine load. From the repo root:
#
#   scripts/stain/bench_alternate.sh [ROUNDS]     (PY: python with torchstain etc.; default python3)
#
# BEFORE=path/to/an/older/stain-bench-binary adds its rows (prefixed "before") to each round.
set -euo pipefail
rounds=${1:-3}
py=${PY:-python3}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
cargo bench --bench stain --no-run >/dev/null 2>&1
bin=$(cargo bench --bench stain --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\/deps\/stain-[0-9a-f]*\)".*/\1/p' | tail -1)
grep -m1 "model name" /proc/cpuinfo || true
for r in $(seq 1 "$rounds"); do
  echo "== round $r"
  if [[ -n "${BEFORE:-}" ]]; then "$BEFORE" --bench --no-rayon | sed 's/^rs /before /'; fi
  "$bin" --bench --no-rayon
  "$py" scripts/stain/bench_torchstain.py
done
