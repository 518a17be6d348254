#!/usr/bin/env python3
"""cold_vs_make.py REPS F... : cold runs of the paper-shaped DAG (5 + 39·F nodes, each node `sh` + `sha256sum`
over its inputs, scripts/bench/cold_dag.py) by mpcs and by GNU make, `-j2`, alternating. Every run gets a
brand-new folder and nothing is deleted until the end (on ext4 without a journal, creating files right after
deleting many is slow, which would bias whichever runs next). Binaries from VARIANTS="name:path:ENV=1,...;..."
(default: this checkout's target/release/mpcs); make is always included. Prints medians and ms per node.
Example: VARIANTS="base:/tmp/old-mpcs:;new:target/release/mpcs:" python3 scripts/bench/cold_vs_make.py 5 5 45"""
import sys, subprocess, time, shutil, os, statistics, itertools
reps = int(sys.argv[1]); Fs = [int(x) for x in sys.argv[2:]]
here = os.path.dirname(os.path.abspath(__file__))
variants = [v.split(":") for v in os.environ.get("VARIANTS", "mpcs:" + os.path.join(here, "../../target/release/mpcs") + ":").split(";")]
variants = [[n, os.path.abspath(b), e] for n, b, e in variants]
import tempfile
root = tempfile.mkdtemp(prefix="mpcs-cold-")
for F in Fs:
    subprocess.run([sys.executable, os.path.join(here, "cold_dag.py"), str(F), f"{root}/d{F}"], check=True)
res = {}; k = itertools.count()
for r in range(reps):
    for F in Fs:
        for name, binp, envs in variants + [["make", "", ""]]:
            d = f"{root}/r{next(k)}"; shutil.copytree(f"{root}/d{F}", d, ignore=shutil.ignore_patterns("out"))
            env = dict(os.environ); [env.__setitem__(*e.split("=")) for e in envs.split(",") if e]
            cmd = ["make", "-s", "-j2"] if name == "make" else [binp, "run", "exp.toml", "--jobs", "2", "--plain", "--cache", f"{d}/cache"]
            t = time.perf_counter(); p = subprocess.run(cmd, cwd=d, capture_output=True, env=env); el = time.perf_counter() - t
            assert p.returncode == 0, p.stderr[-1500:]
            res.setdefault((name, F), []).append(el)
            print(f"rep {r} F={F} {name} {el:.3f}", flush=True)
print(f"{'variant':8s} " + " ".join(f"{'F='+str(F)+' s':>9s} {'ms/node':>8s}" for F in Fs))
for name, *_ in variants + [["make"]]:
    row = []
    for F in Fs:
        m = statistics.median(res[(name, F)]); row.append(f"{m:9.3f} {1e3*m/(5+39*F):8.2f}")
    print(f"{name:8s} " + " ".join(row))
print("folders (delete when done):", root)
