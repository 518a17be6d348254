"""Generates tests/golden/nn/* ONCE with PyTorch/torchvision (CPU). Run from the repo root:

    pip install torch torchvision safetensors numpy
    python scripts/nn/make_golden.py

Model weights are not stored: scripts/nn/detinit.py regenerates them bit-for-bit on both sides.
Inputs, outputs, gradients and updated BatchNorm statistics are stored as safetensors.
"""
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from detinit import det_init  # noqa: E402

OUT = "tests/golden/nn"
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
torch.set_num_threads(1)


def save(name, d):
    # Large gradients are stored as their first 8 rows only ("grad8." keys) to keep files small.
    d = {(k.replace("grad.", "grad8.", 1) if k.startswith("grad.") and v.numel() > 100_000 else k):
         (v[:8] if k.startswith("grad.") and v.numel() > 100_000 else v) for k, v in d.items()}
    d = {k: v.detach().contiguous().clone() for k, v in d.items()}
    save_file(d, os.path.join(OUT, name))
    print(name, {k: tuple(v.shape) for k, v in d.items()})


x64 = torch.randn(2, 3, 64, 64)

# 1. ResNet-18 (10 classes): eval logits, then one train-mode step (logits, grads, new stats).
m = torchvision.models.resnet18(num_classes=10)
det_init(m)
m.eval()
with torch.no_grad():
    logits_eval = m(x64)
m.train()
x = x64.clone().requires_grad_(True)
logits_train = m(x)
g = torch.randn_like(logits_train)
(logits_train * g).sum().backward()
sd = m.state_dict()
out = {"x": x64, "logits_eval": logits_eval, "logits_train": logits_train, "upstream": g, "grad.x": x.grad}
for n in ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
          "layer4.1.conv2.weight", "layer4.1.bn2.weight", "fc.weight", "fc.bias"]:
    out["grad." + n] = dict(m.named_parameters())[n].grad
for n in ["bn1", "layer1.0.bn1", "layer2.0.downsample.1", "layer4.1.bn2"]:
    out[f"state.{n}.running_mean"] = sd[f"{n}.running_mean"]
    out[f"state.{n}.running_var"] = sd[f"{n}.running_var"]
save("resnet18.safetensors", out)

# 2. ResNet-50 eval: logits (10 classes) and pooled 2048-d features.
m = torchvision.models.resnet50(num_classes=10)
det_init(m)
m.eval()
with torch.no_grad():
    logits = m(x64)
    body = nn.Sequential(*list(m.children())[:-1])
    feats = body(x64).flatten(1)
save("resnet50.safetensors", {"x": x64, "logits_eval": logits, "features_eval": feats})

# 3. Dilated ResNet-50 features (no fc), output stride 16 and 8, eval and train mode.
out = {"x": x64}
for os_, rs in [(16, [False, False, True]), (8, [False, True, True])]:
    m = torchvision.models.resnet50(replace_stride_with_dilation=rs)
    m.fc = nn.Identity()
    det_init(m)
    body = nn.Sequential(*list(m.children())[:-2])
    m.eval()
    with torch.no_grad():
        fmap = body(x64)
        out[f"os{os_}.features_eval"] = fmap.mean((2, 3))
        out[f"os{os_}.map_eval_first16"] = fmap[:, :16]
    m.train()
    with torch.no_grad():
        out[f"os{os_}.features_train"] = body(x64).mean((2, 3))
save("resnet50_dilated.safetensors", out)

# 4. Max pool 3x3 / stride 2 / padding 1 with gradient, odd and even sizes.
out = {}
for s in [9, 8]:
    x = torch.randn(2, 3, s, s, requires_grad=True)
    y = F.max_pool2d(x, 3, 2, 1)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    out.update({f"s{s}.x": x, f"s{s}.y": y, f"s{s}.upstream": g, f"s{s}.grad.x": x.grad})
save("maxpool.safetensors", out)

# 5. BatchNorm2d / BatchNorm1d in train mode, standalone.
out = {}
for tag, bn, shape in [("bn2d", nn.BatchNorm2d(5), (4, 5, 3, 3)), ("bn1d", nn.BatchNorm1d(5), (6, 5))]:
    det_init(bn)
    bn.train()
    x = (torch.randn(*shape) * 2 + 0.5).requires_grad_(True)
    y = bn(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    out.update({f"{tag}.x": x, f"{tag}.y": y, f"{tag}.upstream": g, f"{tag}.grad.x": x.grad,
                f"{tag}.grad.weight": bn.weight.grad, f"{tag}.grad.bias": bn.bias.grad,
                f"{tag}.running_mean": bn.running_mean, f"{tag}.running_var": bn.running_var})
    bn.eval()
    with torch.no_grad():
        out[f"{tag}.y_eval_after"] = bn(x)
save("batchnorm.safetensors", out)

# 6. MPCS projector, eval then train (with gradients and new running statistics).
proj = nn.Sequential(nn.Linear(2048, 1024, bias=False), nn.BatchNorm1d(1024), nn.ReLU(),
                     nn.Linear(1024, 128, bias=False), nn.BatchNorm1d(128, affine=False))
det_init(proj)
h = torch.randn(6, 2048)
proj.eval()
with torch.no_grad():
    z_eval = F.normalize(proj(h), dim=1)
proj.train()
hh = h.clone().requires_grad_(True)
z_train = F.normalize(proj(hh), dim=1)
g = torch.randn_like(z_train)
(z_train * g).sum().backward()
sd = proj.state_dict()
save("projector.safetensors", {
    "h": h, "z_eval": z_eval, "z_train": z_train, "upstream": g, "grad.h": hh.grad,
    "grad.0.weight": proj[0].weight.grad, "grad.3.weight": proj[3].weight.grad, "grad.1.weight": proj[1].weight.grad,
    "state.1.running_mean": sd["1.running_mean"], "state.1.running_var": sd["1.running_var"],
    "state.4.running_mean": sd["4.running_mean"], "state.4.running_var": sd["4.running_var"]})

# 7. Head: Dropout(0.3) + Linear(2048, 3): eval (dropout off) and its gradient.
lin = nn.Linear(2048, 3)
det_init(lin)
head = nn.Sequential(nn.Dropout(0.3), lin)
head.eval()
hh = h.clone().requires_grad_(True)
y = head(hh)
g = torch.randn_like(y)
(y * g).sum().backward()
save("head.safetensors", {"h": h, "y_eval": y, "upstream": g, "grad.h": hh.grad, "grad.weight": lin.weight.grad,
                          "grad.bias": lin.bias.grad})


# 8. Losses in float64, written the way the reference SupCon code computes them (independent of ours).
def supcon_one_anchor(features, temperature):
    b = features.shape[0]
    mask = torch.eye(b, dtype=features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor = features[:, 0]
    logits = torch.matmul(anchor, contrast.T) / temperature
    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()
    mask = mask.repeat(1, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(b).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos.mean()


def nt_xent(features, temperature):
    b = features.shape[0]
    z = torch.cat([features[:, 0], features[:, 1]], 0)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


out = {}
f = F.normalize(torch.randn(8, 2, 128, dtype=torch.float64), dim=2)
for tag, fn in [("mpcs", supcon_one_anchor), ("sym", nt_xent)]:
    ff = f.clone().requires_grad_(True)
    loss = fn(ff, 0.1)
    loss.backward()
    out[f"{tag}.loss"] = loss.reshape(1)
    out[f"{tag}.grad"] = ff.grad
out["f"] = f
save("loss.safetensors", out)

# 9. A torchvision ResNet-18 .pth (conv1, bn1, layer1, fc: a partial state dict keeps it small)
#    whose values differ from det_init (three train-mode passes move the statistics, conv1 is
#    rescaled), and the eval logits of det_init + that partial state dict.
m = torchvision.models.resnet18(num_classes=10)
det_init(m)
m.train()
with torch.no_grad():
    for _ in range(3):
        m(torch.randn(4, 3, 32, 32))
    m.conv1.weight.mul_(1.5)
part = OrderedDict((k, v.clone()) for k, v in m.state_dict().items()
                   if k.split(".")[0] in ("conv1", "bn1", "layer1", "fc"))
torch.save(part, os.path.join(OUT, "resnet18_part.pth"))
m2 = torchvision.models.resnet18(num_classes=10)
det_init(m2)
missing, unexpected = m2.load_state_dict(part, strict=False)
assert not unexpected
m2.eval()
with torch.no_grad():
    save("resnet18_part.safetensors", {"x": x64, "logits_eval": m2(x64)})
print("pth keys:", len(part))
