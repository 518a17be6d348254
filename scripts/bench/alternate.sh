#!/usr/bin/env bash
# mpcs and PyTorch, job by job, alternating, several times: on a noisy machine a ratio is only
# worth reading off runs that were this close in time. Run by hand from the repository root:
#
#   scripts/bench/alternate.sh                       # ResNet-18 3 times, ResNet-50 twice, layers once; 1 and 2 threads
#   REPS=5 THREADS=1 JOBS=infer-r18 scripts/bench/alternate.sh
#   LANES_OFF=1 JOBS=convs-r18 scripts/bench/alternate.sh   # also mpcs with MPCS_NN_LANES=0 each time
#   LANES_AVX2=1 JOBS=convs-r18 scripts/bench/alternate.sh  # also mpcs with MPCS_NN_LANES=avx2 (AVX-512 CPUs)
#   JOBS=train-b2,infer-b2 scripts/bench/alternate.sh       # EfficientNet-b2 (needs pip efficientnet-pytorch)
#
# Prints the rows of benches/train_step.rs and scripts/bench/bench_torch.py as they come.
set -euo pipefail
cargo bench --bench train_step --no-run >/dev/null 2>&1
bench=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/train_step-* | grep -v '\.d$' | head -1)
threads=${THREADS:-1 2}
run() { # jobs reps
  for rep in $(seq "$2"); do
    for t in $threads; do
      echo "== $1, run $rep, $t thread(s)"
      BENCH_THREADS=$t BENCH_JOBS=$1 "$bench" --bench | grep -v '^=='
      if [ -n "${LANES_OFF:-}" ]; then # the same binary without the batch-in-lanes convolutions
        echo "(MPCS_NN_LANES=0)"
        MPCS_NN_LANES=0 BENCH_THREADS=$t BENCH_JOBS=$1 "$bench" --bench | grep -v '^=='
      fi
      if [ -n "${LANES_AVX2:-}" ]; then # the lane convolutions on 256-bit kernels only
        echo "(MPCS_NN_LANES=avx2)"
        MPCS_NN_LANES=avx2 BENCH_THREADS=$t BENCH_JOBS=$1 "$bench" --bench | grep -v '^=='
      fi
      BENCH_THREADS=$t BENCH_JOBS=$1 python3 scripts/bench/bench_torch.py | grep -v '^=='
    done
  done
}
if [ -n "${JOBS:-}" ]; then
  run "$JOBS" "${REPS:-3}"
else
  run train-r18,infer-r18 "${REPS:-3}"
  run train-r50,infer-r50 "${REPS_R50:-2}"
  run conv3x3,conv1x1,stem,maxpool 1
fi
