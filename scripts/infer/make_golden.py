"""Generates tests/fixtures/infer/*.png and tests/golden/infer/golden.safetensors ONCE with PyTorch/torchvision.
Run from the repo root:

    pip install torch torchvision safetensors numpy pillow
    python scripts/infer/make_golden.py

Fixtures: three crops of the committed BreakHis fixtures (two 128x128, one 112x96 in a sub-folder, so
`mpcs predict` must run the odd-sized one on its own). Model: torchvision resnet18 with 3 outputs, weights from
scripts/nn/detinit.py (the Rust test rebuilds them bit for bit, so no weights are stored). Input: RGB / 255,
ImageNet mean/std, no resize.

Stored per image NAME (a, b, c):
  logits.NAME     (3,)      eval-mode outputs
  cam_weights.NAME (512,)   Grad-CAM channel weights for class 0 (spatial mean of d logit_0 / d layer4 output)
  cam_raw.NAME    (h, w)    ReLU(sum_c w_c A_c) at layer4 resolution
  cam_map.NAME    (H, W)    cam_raw upsampled with F.interpolate(bilinear, align_corners=False), then min-max to [0, 1]
  cam2_weights.NAME, cam2_raw.NAME, cam2_map.NAME   the same on layer2's output (128 channels; the layer Grad-CAM
                            uses when the input is so small that layer4's map is 1x1)
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "nn"))
from detinit import det_init  # noqa: E402

FIX = "tests/fixtures/infer"
BH = "tests/fixtures/data/breakhis/BreaKHis_v1/histology_slides/breast"
SOURCES = {
    "a.png": (f"{BH}/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png", (200, 100, 328, 228)),
    "b.png": (f"{BH}/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/SOB_M_DC-14-2523-40-010.png",
              (300, 200, 428, 328)),
    "sub/c.png": (f"{BH}/benign/SOB/fibroadenoma/SOB_B_F_14-25197/100X/SOB_B_F-14-25197-100-001.png",
                  (50, 60, 162, 156)),
}
os.makedirs(f"{FIX}/sub", exist_ok=True)
os.makedirs("tests/golden/infer", exist_ok=True)
torch.set_num_threads(1)

m = torchvision.models.resnet18(num_classes=3)
det_init(m)
m.eval()
feats = {}
m.layer4.register_forward_hook(lambda mod, i, o: feats.__setitem__("a", o))
m.layer2.register_forward_hook(lambda mod, i, o: feats.__setitem__("a2", o))

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
out = {}
for rel, (src, box) in SOURCES.items():
    img = Image.open(src).convert("RGB").crop(box)
    img.save(f"{FIX}/{rel}")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - MEAN) / STD
    logits = m(x)
    a, a2 = feats["a"], feats["a2"]
    a.retain_grad()
    a2.retain_grad()
    # Class 0 has the positive evidence here (class 1's map is all zero after the ReLU: nothing to compare).
    logits[0, 0].backward()
    name = rel.split("/")[-1].split(".")[0]
    out[f"logits.{name}"] = logits[0].detach()
    for prefix, act in (("cam", a), ("cam2", a2)):
        w = act.grad.mean(dim=(2, 3))[0]
        raw = F.relu((w.view(1, -1, 1, 1) * act).sum(1))[0]
        up = F.interpolate(raw[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
        assert raw.max() > 0, f"{name}: {prefix} map is all zero"
        up = (up - up.min()) / (up.max() - up.min())
        out[f"{prefix}_weights.{name}"] = w.detach()
        out[f"{prefix}_raw.{name}"] = raw.detach()
        out[f"{prefix}_map.{name}"] = up.detach()
    m.zero_grad()
    print(rel, img.size, logits[0].tolist(), tuple(a.shape), tuple(a2.shape))

save_file({k: v.contiguous() for k, v in out.items()}, "tests/golden/infer/golden.safetensors")
