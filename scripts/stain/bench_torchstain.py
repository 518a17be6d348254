"""Time the Python references on the image and target the Rust bench uses (benches/stain.rs).

  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/stain/bench_torchstain.py [--quick]

from the repo root. One thread: the BLAS variables above keep numpy/spams on the calling thread, so
`time.thread_time()` counts all the work (compare with the Rust "1-thread pool" rows). Prints, per
row, ms/image of wall and thread-CPU time:

* torchstain 1.4.1 numpy backend: Macenko and Reinhard (CIE LAB), fitted on ts_target.png;
* HistomicsTK 1.4.0 Reinhard (Ruderman lαβ), fitted on the same target (`lab_mean_std`), loaded as
  in make_golden.py; skipped with a message when not installed;
* staintools 2.1.2 Vahadane (`StainNormalizer("vahadane")`), fit once, `transform` timed;
* PIL PNG decode (bytes in memory to an RGB array) and encode (default settings, to memory),
  apart from the maths, as the Rust `png` rows.
"""
import io
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer  # noqa: E402

QUICK = "--quick" in sys.argv
FIX = Path("tests/fixtures/stain")
png_bytes = (FIX / "bh_f_full.png").read_bytes()
img = np.asarray(Image.open(FIX / "bh_f_full.png").convert("RGB"))
target = np.asarray(Image.open(FIX / "ts_target.png").convert("RGB"))
assert img.shape == (460, 700, 3)


def bench(name, fn, n=20):
    n = max(2, n // 4) if QUICK else n
    fn()  # warm-up
    t, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    dcpu = (time.thread_time() - cpu) / n
    # thread CPU time is steadier than wall time on a shared machine
    print(f"py {name:<30} {dt * 1000:8.2f} ms/image wall {dcpu * 1000:8.2f} ms/image thread-CPU", flush=True)


mac = NumpyMacenkoNormalizer()
mac.fit(target)
bench("torchstain macenko", lambda: mac.normalize(I=img, stains=False))
rl = NumpyReinhardNormalizer()
rl.fit(target)
bench("torchstain reinhard-lab", lambda: rl.normalize(img))
try:
    sys.path.insert(0, str(Path(__file__).parent))
    import make_golden  # noqa: E402  (same folder)

    cc, reinhard = make_golden.load_histomicstk()
    mu, sd = cc.lab_mean_std(target)
    bench("histomicstk reinhard (lab-beta)", lambda: reinhard(img, mu, sd))
except Exception as e:  # histomicstk is optional here
    print("histomicstk not timed:", e)
try:
    from staintools import StainNormalizer

    vn = StainNormalizer("vahadane")
    vn.fit(target.copy())
    bench("staintools vahadane", lambda: vn.transform(img.copy()), n=4)
except Exception as e:  # staintools/spams are optional here
    print("staintools not timed:", e)


def decode():
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))


def encode():
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getbuffer().nbytes


bench("PIL png decode", decode)
bench("PIL png encode", encode)
print(f"py PIL png encode size {encode()} bytes (input file {len(png_bytes)} bytes)")
