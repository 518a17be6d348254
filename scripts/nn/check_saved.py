"""Run by hand: checks that a safetensors checkpoint saved by the Rust code (tests/nn.rs writes one
to $MPCS_NN_EXPORT_DIR/resnet18_from_pth.safetensors when that variable is set) loads into
torchvision's ResNet-18 with strict=True and gives the golden logits.

    MPCS_NN_EXPORT_DIR=/tmp/nnx cargo test --test nn pth_roundtrip
    python scripts/nn/check_saved.py /tmp/nnx/resnet18_from_pth.safetensors
"""
import sys

import torch
import torchvision
from safetensors.torch import load_file

sd = load_file(sys.argv[1])
m = torchvision.models.resnet18(num_classes=10)
m.load_state_dict(sd, strict=True)
m.eval()
gold = load_file("tests/golden/nn/resnet18_part.safetensors")
with torch.no_grad():
    y = m(gold["x"])
err = (y - gold["logits_eval"]).abs().max().item()
scale = gold["logits_eval"].abs().max().item()
print(f"strict load ok; {len(sd)} tensors; max |logit diff| = {err:.3g} (max |logit| {scale:.3g})")
assert err <= 1e-4 * scale, "logits differ"
print("OK")
