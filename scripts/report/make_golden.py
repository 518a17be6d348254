"""Generates tests/golden/report/tsne_p.safetensors ONCE with scikit-learn. Run from the repo root:

    pip install scikit-learn safetensors numpy
    python scripts/report/make_golden.py

Stores x (40 points in 8-d, two offset Gaussian blobs, float32), the joint P of sklearn's exact t-SNE at
perplexity 10 (`_joint_probabilities` on squared Euclidean distances, as `TSNE(method="exact")` calls it), as a
full 40x40 matrix, and the KL divergence sklearn's exact TSNE reaches on x (init="random", 1000 iterations, for
a loose comparison only: the random start differs from ours).
"""
import numpy as np
import sklearn
from safetensors.numpy import save_file
from scipy.spatial.distance import squareform
from sklearn.manifold import TSNE
from sklearn.manifold._t_sne import _joint_probabilities
from sklearn.metrics import pairwise_distances

rng = np.random.default_rng(0)
x = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(3, 1, (20, 8))]).astype(np.float32)
d = pairwise_distances(x, metric="euclidean", squared=True)
p = squareform(_joint_probabilities(d, 10.0, 0))
kl = TSNE(n_components=2, perplexity=10.0, method="exact", init="random", random_state=0, max_iter=1000).fit(x).kl_divergence_
print("sklearn", sklearn.__version__, "P sum", p.sum(), "KL", kl)
save_file({"x": x, "p": p.astype(np.float64), "kl": np.array([kl], dtype=np.float64)}, "tests/golden/report/tsne_p.safetensors")
