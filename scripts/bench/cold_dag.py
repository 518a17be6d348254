#!/usr/bin/env python3
"""cold_dag.py F DIR : the paper-shaped DAG (5 + 39F nodes) of benches/runner.rs as an mpcs exp.toml and an
equivalent Makefile, each node hashing its inputs with sha256sum (used by cold_vs_make.py)."""
import sys, os
F = int(sys.argv[1]); d = sys.argv[2]
os.makedirs(f"{d}/data", exist_ok=True)
open(f"{d}/data/x", "w").write("x\n")
f = ", ".join(str(i) for i in range(F))
run = 'run = ["sh", "-c", "for d in {in}; do cat $d/x; done 2>/dev/null | sha256sum > {out}/x; echo {node} >> {out}/x"]'
toml = f'''[experiment]
name = "bench{F}"

[stage.raw]
kind = "source"
path = "data"

[stage.prepare]
kind = "command"
from = "raw"
{run}

[stage.stain]
kind = "command"
from = "prepare"
{run}

[stage.folds]
kind = "command"
from = "stain"
matrix = {{ fold = [{f}] }}
{run}

[stage.pretrain]
kind = "command"
from = "folds"
matrix = {{ fold = [{f}], pair = ["FP", "OP", "RP"] }}
gpus = 1
{run}

[stage.finetune]
kind = "command"
from = ["folds", "pretrain[fold={{fold}}, pair={{init}}]?"]
matrix = {{ fold = [{f}], magnification = ["40X", "100X", "200X", "400X"], init = ["imagenet", "FP", "OP", "RP"] }}
gpus = 1
{run}

[stage.evaluate]
kind = "command"
from = "finetune"
matrix = {{ fold = [{f}], magnification = ["40X", "100X", "200X", "400X"], init = ["imagenet", "FP", "OP", "RP"] }}
{run}

[stage.table]
kind = "command"
from = "evaluate"
{run}

[stage.linear]
kind = "command"
from = "pretrain"
matrix = {{ fold = [{f}], pair = ["FP", "OP", "RP"] }}
{run}

[stage.linear_table]
kind = "command"
from = "linear"
{run}
'''
open(f"{d}/exp.toml", "w").write(toml)
R = "\tfor d in $^; do cat $$d; done 2>/dev/null | sha256sum > $@; echo $@ >> $@\n"
mk = [".PHONY: all\nall: out/table out/linear_table\nout/raw: data/x\n\tmkdir -p out && cp data/x $@\n",
      "out/prepare: out/raw\n" + R, "out/stain: out/prepare\n" + R]
evals, linears = [], []
for i in range(F):
    mk.append(f"out/folds_{i}: out/stain\n" + R)
    for p in ["FP", "OP", "RP"]:
        mk.append(f"out/pretrain_{i}_{p}: out/folds_{i}\n" + R)
        mk.append(f"out/linear_{i}_{p}: out/pretrain_{i}_{p}\n" + R)
        linears.append(f"out/linear_{i}_{p}")
    for m in ["40X", "100X", "200X", "400X"]:
        for ini in ["imagenet", "FP", "OP", "RP"]:
            dep = "" if ini == "imagenet" else f" out/pretrain_{i}_{ini}"
            mk.append(f"out/finetune_{i}_{m}_{ini}: out/folds_{i}{dep}\n" + R)
            mk.append(f"out/evaluate_{i}_{m}_{ini}: out/finetune_{i}_{m}_{ini}\n" + R)
            evals.append(f"out/evaluate_{i}_{m}_{ini}")
mk.append(f"out/table: {' '.join(evals)}\n" + R)
mk.append(f"out/linear_table: {' '.join(linears)}\n" + R)
open(f"{d}/Makefile", "w").write("".join(mk))
print(5 + 39 * F)
