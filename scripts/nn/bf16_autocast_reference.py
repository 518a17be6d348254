"""How far PyTorch's own bf16 autocast lands from float32 on one training step of a randomly initialised
torchvision ResNet (batch 8, 64x64, 10 classes): the yardstick for tests/nn_precision.rs's bounds, which
check mpcs's `precision = "bf16"` against its f32 step in the same way.

    python3 scripts/nn/bf16_autocast_reference.py      # needs torch, torchvision (CPU is enough)

Measured with PyTorch 2.15 on the CPU (2026-12-05): resnet18 loss rel 8.3e-4, gradient cosine 0.939;
resnet50 loss rel 1.3e-2, gradient cosine 0.18 (bf16 rounding in 50 layers of BatchNorm over 8 images at
random initialisation: the gradient direction is not reproducible at that precision, in PyTorch either).
"""
import torch
import torchvision

torch.manual_seed(0)
for arch in ["resnet18", "resnet50"]:
    model = getattr(torchvision.models, arch)(num_classes=10).train()
    x = torch.rand(8, 3, 64, 64) * 4 - 2
    y = torch.arange(8) % 10
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = {}
    for precision in ["f32", "bf16"]:
        model.load_state_dict(state)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        result[precision] = (loss.item(), grads)
    (l32, g32), (l16, g16) = result["f32"], result["bf16"]
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    print(f"{arch}: loss f32 {l32:.5f} bf16 {l16:.5f} (rel {abs(l16 - l32) / l32:.2e}); gradient cosine {cos:.4f}")
