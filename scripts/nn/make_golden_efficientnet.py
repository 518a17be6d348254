"""Generates tests/golden/nn/efficientnet_b2*.{safetensors,pth,json} ONCE with efficientnet_pytorch 0.7.1,
the package the paper's code builds its Eff-net b2 encoder from. Run from the repo root:

    pip install torch efficientnet-pytorch==0.7.1 safetensors numpy pillow
    python scripts/nn/make_golden_efficientnet.py

Weights are not stored: scripts/nn/detinit.py regenerates them bit-for-bit on both sides. Inputs are the
committed real crops tests/fixtures/infer/{a,b}.png (128x128) and sub/c.png (112x96, not square),
normalised with ImageNet mean/std. The static "same" padding is computed for 260 px, as
`EfficientNet.from_name("efficientnet-b2")` does, so 128 and 112x96 check it at sizes it was not computed for.

Stored: eval logits for both sizes; one train-mode forward/backward at 128 (drop-connect and head dropout
off, so it is deterministic) with its logits, the input gradient, parameter gradients and the BatchNorm
running statistics after it; the full state dict's names and shapes (for the strict round-trip check); and a
part of the state dict as .pth and .safetensors (loading both formats by name).
"""
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
from efficientnet_pytorch import EfficientNet
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from detinit import det_init  # noqa: E402

OUT = "tests/golden/nn"
FIX = "tests/fixtures/infer"
torch.set_num_threads(1)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load(rel):
    img = Image.open(f"{FIX}/{rel}").convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - MEAN) / STD


def model():
    # 5 classes keeps `_fc` small; no dropout and no drop-connect so that a train step is deterministic.
    m = EfficientNet.from_name("efficientnet-b2", num_classes=5, dropout_rate=0.0, drop_connect_rate=0.0)
    det_init(m)
    return m


x128 = torch.cat([load("a.png"), load("b.png")])
x_rect = load("sub/c.png")
m = model()
m.eval()
out = {"x128": x128, "x_rect": x_rect}
with torch.no_grad():
    out["logits_eval128"] = m(x128)
    out["features_eval128"] = m.extract_features(x128).mean((2, 3))
    out["logits_eval_rect"] = m(x_rect)

m.train()
x = x128.clone().requires_grad_(True)
logits = m(x)
upstream = torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)
(logits * upstream).sum().backward()
out["logits_train128"] = logits.detach()
out["upstream"] = upstream
out["grad.x"] = x.grad
params = dict(m.named_parameters())
for n in ["_conv_stem.weight", "_bn0.weight", "_blocks.0._depthwise_conv.weight", "_blocks.0._se_reduce.weight",
          "_blocks.0._se_reduce.bias", "_blocks.0._se_expand.bias", "_blocks.4._expand_conv.weight",
          "_blocks.4._depthwise_conv.weight", "_blocks.4._bn1.bias", "_blocks.9._depthwise_conv.weight",
          "_blocks.22._project_conv.weight", "_conv_head.weight", "_bn1.weight", "_fc.weight", "_fc.bias"]:
    g = params[n].grad
    out["grad." + n] = g[:8] if g.numel() > 100_000 else g
sd = m.state_dict()
for n in ["_bn0", "_blocks.0._bn1", "_blocks.4._bn0", "_blocks.22._bn2", "_bn1"]:
    out[f"state.{n}.running_mean"] = sd[f"{n}.running_mean"]
    out[f"state.{n}.running_var"] = sd[f"{n}.running_var"]
save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, f"{OUT}/efficientnet_b2.safetensors")

shapes = OrderedDict((k, list(v.shape)) for k, v in model().state_dict().items())
with open(f"{OUT}/efficientnet_b2_state_dict.json", "w") as f:
    json.dump(shapes, f, indent=0)
    f.write("\n")

# A part of the state dict in both formats: the stem and the first block, values distinct from det_init.
m = model()
with torch.no_grad():
    m._conv_stem.weight.mul_(1.5)
    m._blocks[0]._se_reduce.bias.add_(0.25)
part = OrderedDict((k, v.clone()) for k, v in m.state_dict().items()
                   if k.startswith("_conv_stem.") or k.startswith("_bn0.") or k.startswith("_blocks.0."))
torch.save(part, f"{OUT}/efficientnet_b2_part.pth")
# The pre-1.6 (non-zip) format that efficientnet_pytorch's 2019 ImageNet files are in.
torch.save(part, f"{OUT}/efficientnet_b2_part_legacy.pth", _use_new_zipfile_serialization=False)
save_file({k: v.contiguous() for k, v in part.items()}, f"{OUT}/efficientnet_b2_part.safetensors")
print({k: tuple(v.shape) for k, v in out.items()})
print("part keys:", len(part), "state dict keys:", len(shapes))
