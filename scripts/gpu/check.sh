#!/usr/bin/env bash
# The GPU check, one run on the GPU machine (no Rust there): build first here with scripts/gpu/build.sh, carry
# gpu-bin/, then run this script there. It writes everything under $OUT (default gpu-out/):
#   env.txt     nvidia-smi, the libraries the binary resolves
#   doctor.txt  `mpcs doctor --device cuda:0`: one training step on the GPU against the CPU and a float64 truth
#   bench.txt   mpcs vs PyTorch eager training steps on the GPU, ResNet-50 224x224 and ResNet-18 64x64,
#               batch 64, fp32 and bf16 (mpcs `--precision bf16`, PyTorch autocast), alternating
#   loader.txt  images/s the training loader delivers at 224x224 on this machine's cores (MPCS pairs and
#               single views), to set beside the GPU step's images/s in bench.txt
#   table2.txt  the paper's experiments/wacv_table2.toml end to end with its GPU nodes on cuda:0, two at a time
#               (--devices 0,0), cut down with --set to fold 0, 200X and one epoch at the paper's image sizes and
#               batch sizes (so each node's memory is the full run's), on a synthetic BreakHis archive (206 images,
#               350x230) and seeded ImageNet-layout weights (`mpcs init-weights`: there is no network there),
#               then the table and each GPU node's peak memory (scripts/gpu/node_memory.py)
# The whole stays within BUDGET_S seconds (default 540, under the device's 600 s per command): each step gets its
# own limit, cut to what is left, and a step with under 20 s left is skipped and says so.
# Locally, without a GPU: MPCS_BIN=target/release/mpcs DEVICES=cpu STEPS=table2 TABLE2_SIZE=32 scripts/gpu/check.sh
# (TABLE2_SIZE: every image size to that, batches of 4, so the CPU gets through it in seconds)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
steps=${STEPS:-doctor bench loader table2}
devices=${DEVICES:-0,0}
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin=${MPCS_BIN:-$work/mpcs}
if [ -z "${MPCS_BIN:-}" ]; then
  xz -dc gpu-bin/mpcs.xz >"$bin" && chmod +x "$bin" || { echo "no gpu-bin/mpcs.xz: run scripts/gpu/build.sh here first" >&2; exit 2; }
fi
want() { [[ " $steps " == *" $1 "* ]]; }

# `within LIMIT CMD...`: CMD under `timeout`, its limit cut to the time left in the budget.
within() {
  local limit=$1 left=$(( deadline - $(date +%s) ))
  shift
  if (( left < 20 )); then echo "skipped: the ${BUDGET_S:-540} s budget is spent ($*)"; return 124; fi
  (( limit > left )) && limit=$left
  timeout "$limit" "$@"
}

# cuBLAS/cuRAND/NVRTC 13 from the machine's Python environment (PyTorch's pip packages), the driver from the system.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
libs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{ nvidia-smi; echo; ldd "$bin" | grep -E "cuda|cublas|curand|nvrtc|not found"; } >"$out/env.txt" 2>&1

if want doctor; then
  within 180 "$bin" doctor --device cuda:0 --arch resnet18,resnet50 --size 64 --batch 8 >"$out/doctor.txt" 2>&1
  echo "exit $?" >>"$out/doctor.txt"
fi

bench_round() {
  for cfg in "resnet50 224" "resnet18 64"; do
    set -- $cfg
    echo "== round $round: $1 ${2}x$2 batch 64" >>"$out/bench.txt"
    for prec in f32 bf16; do
      [ $prec = bf16 ] && [ $round = 2 ] && continue
      torch_prec=$([ $prec = f32 ] && echo float32 || echo bfloat16)
      within 90 "$bin" bench train --device cuda:0 --arch "$1" --size "$2" --batch 64 --steps 10 --precision $prec 2>&1 | grep -E "^(cpu|bench train|mean|images_per_s|error|skipped)" >>"$out/bench.txt"
      within 90 python3 scripts/gpu/torch_step.py "$1" "$2" 64 $torch_prec 10 >>"$out/bench.txt" 2>&1
    done
  done
}
if want bench; then
  : >"$out/bench.txt"
  round=1 bench_round
fi

if want loader; then
  within 120 "$bin" bench loader --size 224 --batch 64 --steps 8 >"$out/loader.txt" 2>&1
  echo "exit $?" >>"$out/loader.txt"
fi

# One reading per GPU every quarter second, `<unix s> <gpu> <MiB>`, until killed or the budget ends.
sample_gpus() {
  while (( $(date +%s) < deadline )); do
    local t
    t=$(date +%s.%N)
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits 2>/dev/null | sed "s/^/$t /; s/,//"
    sleep 0.25
  done
}

table2() {
  local log=$out/table2.txt data=$work/data
  "$bin" synth breakhis --out "$data/root" --patients 16 --size 350x230 >>"$log" 2>&1 || return 1
  tar czf "$data/BreaKHis_v1.tar.gz" -C "$data/root" . || return 1
  "$bin" init-weights --arch resnet50 --seed 1 --out "$data/resnet50-imagenet.safetensors" >>"$log" 2>&1 || return 1
  "$bin" init-weights --arch efficientnet_b2 --seed 2 --out "$data/efficientnet-b2-imagenet.safetensors" >>"$log" 2>&1 || return 1
  local sets=(
    "stage.breakhis.url=\"file://$data/BreaKHis_v1.tar.gz\""
    "stage.imagenet.url=\"file://$data/resnet50-imagenet.safetensors\""
    "stage.imagenet.sha256=\"$(sha256sum "$data/resnet50-imagenet.safetensors" | cut -d' ' -f1)\""
    "stage.imagenet_b2.url=\"file://$data/efficientnet-b2-imagenet.safetensors\""
    "stage.imagenet_b2.sha256=\"$(sha256sum "$data/efficientnet-b2-imagenet.safetensors" | cut -d' ' -f1)\""
    'stage.pretrain_b2.matrix.pair=["RP"]'
    'stage.finetune_b2.matrix.init=["imagenet", "RP"]'
    'stage.evaluate_b2.matrix.init=["imagenet", "RP"]'
  )
  local b2 s
  for b2 in "" _b2; do
    local cut=('pretrain.matrix.fold=[0]' 'finetune.matrix.fold=[0]' 'evaluate.matrix.fold=[0]'
      'finetune.matrix.magnification=["200X"]' 'evaluate.matrix.magnification=["200X"]'
      pretrain.epochs=1 finetune.epochs=1)
    if [ -n "${TABLE2_SIZE:-}" ]; then
      cut+=("pretrain.size=$TABLE2_SIZE" pretrain.batch_size=4 pretrain.projector_hidden=64
        "finetune.size=$TABLE2_SIZE" finetune.batch_size=4 "evaluate.size=$TABLE2_SIZE")
    fi
    for s in "${cut[@]}"; do
      sets+=("stage.${s%%.*}$b2.${s#*.}")
    done
  done
  local args=() t0 sampler=
  for s in "${sets[@]}"; do args+=(--set "$s"); done
  if command -v nvidia-smi >/dev/null; then
    sample_gpus >"$work/gpu_samples.txt" &
    sampler=$!
  fi
  t0=$(date +%s)
  within 300 "$bin" run experiments/wacv_table2.toml --devices "$devices" --cache "$work/cache" --plain "${args[@]}" >>"$log" 2>&1
  echo "exit $? after $(( $(date +%s) - t0 )) s" >>"$log"
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
  within 20 "$bin" --cache "$work/cache" show table --exp experiments/wacv_table2.toml "${args[@]}" >>"$log" 2>&1
  if [ -n "$sampler" ]; then
    echo "== peak GPU memory per node" >>"$log"
    python3 scripts/gpu/node_memory.py "$work/gpu_samples.txt" "$work/cache" >>"$log" 2>&1
  fi
}
if want table2; then
  : >"$out/table2.txt"
  table2 || echo "table2: preparing the inputs failed (see above)" >>"$out/table2.txt"
fi

# A second round of the f32 steps, time permitting: the spread between rounds is the noise of the figures.
if want bench; then
  round=2 bench_round
fi
tail -n 3 "$out"/*.txt
