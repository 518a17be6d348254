"""PyTorch's eager training step on a GPU, the peer of `mpcs bench train --device cuda:0`: torchvision ResNet with a
10-class head, cross-entropy, Adam, random input; prints one line with images/s over the timed steps.

    python3 scripts/gpu/torch_step.py ARCH SIZE BATCH DTYPE STEPS     # e.g. resnet50 224 64 float32 10

DTYPE bfloat16 runs the step under autocast (weights and optimiser in float32), as mixed precision does.
"""
import sys
import time

import torch
import torchvision

arch, size, batch, dtype, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
dev = torch.device("cuda:0")
model = getattr(torchvision.models, arch)(num_classes=10).to(dev).train()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.randn(batch, 3, size, size, device=dev)
y = torch.arange(batch, device=dev) % 10


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


for _ in range(2):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
for _ in range(steps):
    step()
torch.cuda.synchronize()
el = time.perf_counter() - t
peak = torch.cuda.max_memory_allocated() / 2**20
print(f"torch {torch.__version__} {arch} {size}x{size} batch {batch} {dtype}: {batch * steps / el:.1f} images/s, "
      f"peak {peak:.0f} MiB")
