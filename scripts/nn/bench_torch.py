"""PyTorch peer of benches/nn.rs: torchvision ResNet-18, 64x64, batch 16, one CPU thread.

    python scripts/nn/bench_torch.py
"""
import time

import torch
import torch.nn.functional as F
import torchvision

BATCH, SIZE, ITERS = 16, 64, 5
torch.set_num_threads(1)
m = torchvision.models.resnet18(num_classes=10)
x = torch.randn(BATCH, 3, SIZE, SIZE)
labels = torch.arange(BATCH) % 10


def bench(label, fn):
    fn()
    t = time.perf_counter()
    for _ in range(ITERS):
        fn()
    s = (time.perf_counter() - t) / ITERS
    print(f"{label}: {BATCH / s:.1f} images/s ({s * 1e3:.1f} ms per batch of {BATCH})")


def fwd():
    m.eval()
    with torch.no_grad():
        m(x).sum().item()


def fwd_bwd():
    m.train()
    m.zero_grad()
    F.cross_entropy(m(x), labels).backward()


print(f"torch {torch.__version__} ResNet-18, {SIZE}x{SIZE}, batch {BATCH}, {torch.get_num_threads()} thread(s)")
bench("forward (eval)", fwd)
bench("forward+backward (train)", fwd_bwd)
