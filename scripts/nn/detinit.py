"""Deterministic parameter values shared bit-for-bit with the Rust tests (tests/nn.rs, `det_init`).

Golden files stay small because model weights are not stored: both sides regenerate them from the
tensor's name and shape with integer hashing and IEEE float32 arithmetic (no libm), so they agree
exactly. Values: u = (h % 2001 - 1000) in [-1000, 1000], then per kind
  conv / linear weight (rank 4 / 2):  u * (sqrt(6 / fan_in) / 1000)          (He uniform)
  rank-1 `weight`:                    u * (0.1 / 1000) + 1
  rank-1 `bias`, `running_mean`:      u * (0.1 / 1000)
  `running_var`:                      (u + 1000) * (0.25 / 1000) + 1
  `num_batches_tracked`:              left as is
"""
import math

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def fnv1a(name: str) -> int:
    h = 0x811C9DC5
    for b in name.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def hash_u(name: str, n: int) -> np.ndarray:
    """u in [-1000, 1000] as float32, the murmur3 finaliser of seed ^ (i * 0x9E3779B1)."""
    seed = np.uint64(fnv1a(name))
    i = np.arange(n, dtype=np.uint64)
    h = (seed ^ ((i * np.uint64(0x9E3779B1)) & M32)) & M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & M32
    h ^= h >> np.uint64(16)
    return ((h % np.uint64(2001)).astype(np.int64) - 1000).astype(np.float32)


def value(name: str, shape) -> np.ndarray:
    n = int(np.prod(shape)) if len(shape) else 1
    u = hash_u(name, n)
    rank = len(shape)
    if rank in (2, 4):
        fan_in = int(np.prod(shape[1:]))
        c = np.float32(math.sqrt(6.0 / fan_in) / 1000.0)
        v = u * c
    elif name.endswith("running_var"):
        v = (u + np.float32(1000.0)) * np.float32(0.25 / 1000.0) + np.float32(1.0)
    elif name.endswith("weight"):
        v = u * np.float32(0.1 / 1000.0) + np.float32(1.0)
    else:
        v = u * np.float32(0.1 / 1000.0)
    return v.astype(np.float32).reshape(shape)


def det_init(module, prefix: str = "") -> None:
    """Overwrites every float parameter and buffer of `module` in place."""
    import torch

    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            t.copy_(torch.from_numpy(value(prefix + name, tuple(t.shape))))
