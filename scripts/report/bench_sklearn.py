"""Peer figure for benches/report.rs: scikit-learn's exact t-SNE on the same kind of data (1000 iterations,
perplexity 30, 50-d, 5 offset clusters). Run: python scripts/report/bench_sklearn.py"""
import time

import numpy as np
from sklearn.manifold import TSNE

rng = np.random.default_rng(1)
for n in [250, 500, 1000]:
    x = rng.uniform(-1, 1, (n, 50)).astype(np.float32)
    x[np.arange(n), np.arange(n) % 5] += 6
    t = time.time()
    r = TSNE(perplexity=30.0, method="exact", init="random", random_state=0, max_iter=1000).fit(x)
    print(f"sklearn exact n={n}: {time.time() - t:.2f} s (final KL {r.kl_divergence_:.3f})")
