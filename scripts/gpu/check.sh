#!/usr/bin/env bash
# The GPU check, one run on the GPU machine (no Rust there): build first here with scripts/gpu/build.sh, carry
# gpu-bin/, then run this script there. It writes everything under $OUT (default gpu-out/):
#   env.txt        nvidia-smi, the libraries the binary resolves
#   doctor.txt     `mpcs doctor --device cuda:0`: one training step on the GPU against the CPU and a float64 truth
#   bench.txt      mpcs vs PyTorch eager training steps on the GPU, ResNet-50 224x224 and ResNet-18 64x64,
#                  batch 64, fp32 and bf16 (mpcs `--precision bf16`, PyTorch autocast), alternating
#   loader.txt     images/s the training loader delivers at 224x224 on this machine's cores (MPCS pairs and
#                  single views), to set beside the GPU step's images/s in bench.txt
#   quickstart.txt the quickstart end to end with its GPU nodes on cuda:0, two at a time (--devices 0,0)
# Each step has its own time limit so the whole stays within about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
mkdir -p "$out"
work=$(mktemp -d)
bin=$work/mpcs
xz -dc gpu-bin/mpcs.xz >"$bin" && chmod +x "$bin" || { echo "no gpu-bin/mpcs.xz: run scripts/gpu/build.sh here first" >&2; exit 2; }
# cuBLAS/cuRAND/NVRTC 13 from the machine's Python environment (PyTorch's pip packages), the driver from the system.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
libs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{ nvidia-smi; echo; ldd "$bin" | grep -E "cuda|cublas|curand|nvrtc|not found"; } >"$out/env.txt" 2>&1

timeout 180 "$bin" doctor --device cuda:0 --arch resnet18,resnet50 --size 64 --batch 8 >"$out/doctor.txt" 2>&1
echo "exit $?" >>"$out/doctor.txt"

: >"$out/bench.txt"
for round in 1 2; do
  for cfg in "resnet50 224" "resnet18 64"; do
    set -- $cfg
    echo "== round $round: $1 ${2}x$2 batch 64" >>"$out/bench.txt"
    for prec in f32 bf16; do
      [ $prec = bf16 ] && [ $round = 2 ] && continue
      torch_prec=$([ $prec = f32 ] && echo float32 || echo bfloat16)
      timeout 90 "$bin" bench train --device cuda:0 --arch "$1" --size "$2" --batch 64 --steps 10 --precision $prec 2>&1 | grep -E "^(cpu|bench train|mean|images_per_s|error)" >>"$out/bench.txt"
      timeout 90 python3 scripts/gpu/torch_step.py "$1" "$2" 64 $torch_prec 10 >>"$out/bench.txt" 2>&1
    done
  done
done

timeout 120 "$bin" bench loader --size 224 --batch 64 --steps 8 >"$out/loader.txt" 2>&1
echo "exit $?" >>"$out/loader.txt"

t0=$(date +%s)
timeout 240 "$bin" run experiments/quickstart.toml --devices 0,0 --cache "$work/cache" --plain >"$out/quickstart.txt" 2>&1
echo "exit $? after $(( $(date +%s) - t0 )) s" >>"$out/quickstart.txt"
timeout 20 "$bin" --cache "$work/cache" show table --exp experiments/quickstart.toml >>"$out/quickstart.txt" 2>&1
rm -rf "$work"
tail -n 3 "$out"/*.txt
