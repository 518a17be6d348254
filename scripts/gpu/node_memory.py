#!/usr/bin/env python3
"""Peak GPU memory while each node of a run was executing.

usage: node_memory.py SAMPLES CACHE_DIR

SAMPLES holds lines `<unix seconds> <gpu index> <memory.used MiB>` (scripts/gpu/check.sh writes them from
nvidia-smi every quarter second during the run); CACHE_DIR is the run's cache, whose entry manifests say when each
node started, how long it ran and on which device. For every node that ran on a GPU it prints the highest
device-wide memory seen on that GPU while the node ran, and the other nodes that overlapped it on the same GPU:
nvidia-smi sees the device, not the node, so with two nodes on one GPU (`--devices 0,0`) the figure is theirs
together. candle's CUDA allocator returns freed blocks to the driver's pool lazily, so a figure is an upper bound
on what the node itself needed.
"""
import glob
import json
import os
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    samples = []
    with open(sys.argv[1]) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                try:
                    samples.append((float(parts[0]), parts[1].strip(","), float(parts[2])))
                except ValueError:
                    pass  # a line nvidia-smi wrote as an error
    nodes = []
    for path in glob.glob(os.path.join(sys.argv[2], "v2", "entries", "*", "*", "manifest.json")):
        with open(path) as f:
            m = json.load(f)
        gpus = [d.split(":", 1)[1] for d in m.get("device", "").split(",") if d.startswith("cuda:")]
        if gpus:
            nodes.append((m["started_unix"], m["started_unix"] + m["duration_s"], m["node"], gpus))
    if not nodes:
        sys.exit("no node of this cache ran on a GPU")
    nodes.sort()
    t_first = nodes[0][0]
    print(f"{'node':<58} {'gpu':>4} {'start_s':>8} {'dur_s':>7} {'peak_MiB':>9} {'samples':>7}  overlapping")
    for start, end, name, gpus in nodes:
        for gpu in gpus:
            seen = [mem for t, g, mem in samples if g == gpu and start <= t <= end]
            peak = f"{max(seen):.0f}" if seen else "-"
            others = [n for s, e, n, g in nodes if n != name and gpu in g and s < end and e > start]
            print(f"{name:<58} {gpu:>4} {start - t_first:>8.1f} {end - start:>7.1f} {peak:>9} {len(seen):>7}  "
                  f"{', '.join(others) or '-'}")
    if samples:
        print(f"whole run: peak {max(m for _, _, m in samples):.0f} MiB over {len(samples)} samples")


if __name__ == "__main__":
    main()
