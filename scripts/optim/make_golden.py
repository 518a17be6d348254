"""Generate tests/golden/optim/optim_golden.safetensors with PyTorch (CPU, float32). Run ONCE:

    python3 scripts/optim/make_golden.py

A small model (Linear(4,3) -> tanh -> Linear(3,2), MSE loss on a fixed batch) is trained for 3 steps with
each optimiser. At every step we save the exact gradients PyTorch computed and the parameters after the
step, so the Rust tests can feed the same gradients and compare the parameters (isolating the optimiser).

Keys:  init/<p>                  initial parameters (p in w1, b1, w2, b2)
       <case>/<k>/grad/<p>       gradient fed at step k (k = 0, 1, 2)
       <case>/<k>/param/<p>      parameters after step k
       plateau/<name>/metrics    metric fed to ReduceLROnPlateau (float64)
       plateau/<name>/lrs        learning rate after each scheduler step (float64)
"""

import os

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
torch.set_num_threads(1)


class Lars(torch.optim.Optimizer):
    """LARS exactly as in facebookresearch/barlowtwins main.py (also what the MPCS code uses).

    Parameters that the filter excludes (1-D: biases and BatchNorm) get no weight decay and no
    trust-ratio adaptation. The momentum buffer starts at zero, so the first buffer equals the update.
    """

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue
                if g['weight_decay_filter'] is None or not g['weight_decay_filter'](p):
                    dp = dp.add(p, alpha=g['weight_decay'])
                if g['lars_adaptation_filter'] is None or not g['lars_adaptation_filter'](p):
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0,
                                                (g['eta'] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


def exclude_bias_and_norm(p):
    return p.ndim == 1


def make_model():
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    return m


NAMES = ["w1", "b1", "w2", "b2"]


def params_of(m):
    return [m[0].weight, m[0].bias, m[2].weight, m[2].bias]


torch.manual_seed(2)
X = torch.randn(5, 4)
Y = torch.randn(5, 2)

out = {}
for n, p in zip(NAMES, params_of(make_model())):
    out[f"init/{n}"] = p.detach().clone()


def lars_opt(ps, lr_w, lr_b, wd, eta):
    weights = [p for p in ps if p.ndim > 1]
    biases = [p for p in ps if p.ndim == 1]
    groups = [{"params": weights, "lr": lr_w}, {"params": biases, "lr": lr_b}]
    return Lars(groups, lr=0, weight_decay=wd, momentum=0.9, eta=eta,
                weight_decay_filter=exclude_bias_and_norm,
                lars_adaptation_filter=exclude_bias_and_norm)


CASES = {
    # The paper's pretraining config (Adam, weight decay 1e-6); a large lr so that the steps are visible.
    "adam_wd1e-6": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-6, foreach=False),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                           foreach=False),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True,
                                               foreach=False),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3,
                                                foreach=False),
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False),
    # The paper's LARS config (lr weights 0.2, biases 0.0048, momentum 0.9, eta 0.001, wd 1e-6) ...
    "lars_paper": lambda ps: lars_opt(ps, 0.2, 0.0048, 1e-6, 0.001),
    # ... and one where decay and adaptation move the weights visibly.
    "lars_strong": lambda ps: lars_opt(ps, 0.5, 0.05, 0.05, 0.02),
}

for case, make_opt in CASES.items():
    m = make_model()
    ps = params_of(m)
    opt = make_opt(ps)
    for k in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(X), Y)
        loss.backward()
        for n, p in zip(NAMES, ps):
            out[f"{case}/{k}/grad/{n}"] = p.grad.detach().clone()
        opt.step()
        for n, p in zip(NAMES, ps):
            out[f"{case}/{k}/param/{n}"] = p.detach().clone()

# ReduceLROnPlateau: two configs, the learning rate after each step.
PLATEAU = {
    # mode min, factor 0.1, patience 2, threshold 1e-4 rel, cooldown 1, min_lr 1e-4
    "min_rel": (dict(mode="min", factor=0.1, patience=2, threshold=1e-4, threshold_mode="rel", cooldown=1,
                     min_lr=1e-4),
                [1.0, 0.9, 0.89995, 0.9, 0.91, 0.8, 0.8, 0.79999, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7,
                 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, -1.0, -1.0, -1.00005, -1.0, -1.0]),
    # mode max, factor 0.5, patience 0, threshold 0.01 abs, cooldown 0, min_lr 0
    "max_abs": (dict(mode="max", factor=0.5, patience=0, threshold=0.01, threshold_mode="abs", cooldown=0,
                     min_lr=0.0),
                [0.1, 0.2, 0.205, 0.3, 0.3, 0.311, 0.32, 0.5, 0.49, 0.51, 0.52]),
}
for name, (cfg, metrics) in PLATEAU.items():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **cfg)
    lrs = []
    for v in metrics:
        sched.step(v)
        lrs.append(opt.param_groups[0]["lr"])
    out[f"plateau/{name}/metrics"] = torch.tensor(metrics, dtype=torch.float64)
    out[f"plateau/{name}/lrs"] = torch.tensor(lrs, dtype=torch.float64)

here = os.path.dirname(os.path.abspath(__file__))
dst = os.path.join(here, "..", "..", "tests", "golden", "optim", "optim_golden.safetensors")
tmp = dst + ".tmp"
save_file({k: v.contiguous() for k, v in out.items()}, tmp,
          metadata={"torch": torch.__version__, "script": "scripts/optim/make_golden.py"})
os.replace(tmp, dst)
print(f"wrote {len(out)} tensors to {os.path.normpath(dst)} (torch {torch.__version__})")
for name in PLATEAU:
    print(name, out[f"plateau/{name}/lrs"].tolist())
