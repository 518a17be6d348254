"""Time torchstain 1.4.1's numpy backend on the image the Rust bench uses (benches/stain.rs).

  python scripts/stain/bench_torchstain.py            # from the repo root
Prints images/s for Macenko and Reinhard (LAB), fit once on ts_target.png, normalise many; and,
for the lαβ Reinhard, HistomicsTK's reinhard() loaded as in make_golden.py when it is installed.
numpy here is single-threaded for these element-wise operations (BLAS only enters eigh/lstsq on
tiny matrices), so compare with the Rust single-thread figure.
"""
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

FIX = Path("tests/fixtures/stain")
img = np.asarray(Image.open(FIX / "bh_f_full.png").convert("RGB"))
target = np.asarray(Image.open(FIX / "ts_target.png").convert("RGB"))
assert img.shape == (460, 700, 3)


def bench(name, fn, n=20):
    fn()  # warm-up
    t, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    dcpu = (time.thread_time() - cpu) / n
    # thread CPU time is steadier than wall time on a shared machine
    print(f"{name:<28} {1 / dt:8.1f} images/s ({dt * 1000:7.2f} ms/image wall, "
          f"{dcpu * 1000:7.2f} ms/image thread CPU)")


mac = NumpyMacenkoNormalizer()
mac.fit(target)
bench("torchstain numpy macenko", lambda: mac.normalize(I=img, stains=False))
rl = NumpyReinhardNormalizer()
rl.fit(target)
bench("torchstain numpy reinhard", lambda: rl.normalize(img))
try:
    import make_golden  # noqa: E402  (same folder)

    _, reinhard = make_golden.load_histomicstk()
    mu = np.array([8.74108109, -0.12440419, 0.0444982])
    sd = np.array([0.6135447, 0.10989545, 0.0286032])
    bench("histomicstk reinhard (lab)", lambda: reinhard(img, mu, sd))
except Exception as e:  # histomicstk is optional here
    print("histomicstk not timed:", e)
