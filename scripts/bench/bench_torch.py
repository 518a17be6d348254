"""PyTorch peer of benches/train_step.rs: the same rows, the same shapes, same thread count.

    python3 scripts/bench/bench_torch.py            # 1 thread
    BENCH_THREADS=1,2 python3 scripts/bench/bench_torch.py

Run by hand (not in CI). Each configuration runs in a child process so its peak RSS is its own.
Rows: train step (forward, backward, Adam) of ResNet-18 64x64, ResNet-50 224x224 and EfficientNet-b2 128x128
(efficientnet_pytorch 0.7.1, as the paper's code builds it), batch 16;
forward-only inference (eval, no_grad); single layers at ResNet-50 shapes, forward and
forward+backward (3x3 conv 64->64 56x56, 1x1 conv 256->64 56x56, the 7x7/s2 stem on 224x224,
max-pool 3x3/s2/p1 on 64x112x112); every convolution shape of ResNet-18 at 64x64 as eval inference
runs it (convs-r18).
"""
import os
import resource
import subprocess
import sys
import time

BATCH = 16


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def peak_mb():
    # ru_maxrss is in kB on Linux: the same figure as VmHWM.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(job):
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.set_num_threads(int(os.environ.get("BENCH_T", "1")))
    r18_steps = env_int("BENCH_R18_STEPS", 5)
    r50_steps = env_int("BENCH_R50_STEPS", 2)
    b2_steps = env_int("BENCH_B2_STEPS", 3)

    def model_for(arch):
        if arch == "efficientnet_b2":
            from efficientnet_pytorch import EfficientNet

            return EfficientNet.from_name("efficientnet-b2", num_classes=10)
        return getattr(torchvision.models, arch)(num_classes=10)

    if job.startswith("train-") or job.startswith("infer-"):
        arch, size, steps = {
            "r18": ("resnet18", 64, r18_steps),
            "r50": ("resnet50", 224, r50_steps),
            "b2": ("efficientnet_b2", 128, b2_steps),
        }[job.split("-")[1]]
        m = model_for(arch)
        x = torch.randn(BATCH, 3, size, size)
        labels = torch.arange(BATCH) % 10
        if job.startswith("train-"):
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            m.train()

            def step():
                t0 = time.perf_counter()
                loss = F.cross_entropy(m(x), labels)
                loss.item()
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                return t1 - t0, t2 - t1, t3 - t2

            step()
            ts = [step() for _ in range(steps)]
            f, b, o = (sum(t[i] for t in ts) / len(ts) for i in range(3))
            print(
                f"train {arch:>9} {size:3}x{size:<3} b{BATCH}: {BATCH / (f + b + o):7.2f} images/s | forward {f * 1e3:8.1f} ms, "
                f"backward {b * 1e3:8.1f} ms, optimizer {o * 1e3:6.1f} ms | peak {peak_mb():6.0f} MB"
            )
        else:
            m.eval()

            def run():
                with torch.no_grad():
                    m(x).sum().item()

            run()
            t = time.perf_counter()
            for _ in range(steps):
                run()
            s = (time.perf_counter() - t) / steps
            print(
                f"infer {arch:>9} {size:3}x{size:<3} b{BATCH}: {BATCH / s:7.2f} images/s | forward {s * 1e3:8.1f} ms | peak {peak_mb():6.0f} MB"
            )
        return

    if job == "convs-r18":
        # Every convolution shape of ResNet-18 at 64x64, as eval inference runs it: conv, BN, ReLU.
        shapes = [(3, 64, 64, 7, 2, 3, 1), (64, 16, 64, 3, 1, 1, 4), (64, 16, 128, 3, 2, 1, 1),
                  (64, 16, 128, 1, 2, 0, 1), (128, 8, 128, 3, 1, 1, 3), (128, 8, 256, 3, 2, 1, 1),
                  (128, 8, 256, 1, 2, 0, 1), (256, 4, 256, 3, 1, 1, 3), (256, 4, 512, 3, 2, 1, 1),
                  (256, 4, 512, 1, 2, 0, 1), (512, 2, 512, 3, 1, 1, 3)]
        iters = env_int("BENCH_CONV_ITERS", 100)
        total = 0.0
        with torch.no_grad():
            for c, size, o, k, stride, pad, calls in shapes:
                x = torch.randn(BATCH, c, size, size)
                w = torch.randn(o, c, k, k) * 0.05
                bn = torch.nn.BatchNorm2d(o).eval()

                def run():
                    F.relu(bn(F.conv2d(x, w, stride=stride, padding=pad)))

                run()
                t = time.perf_counter()
                for _ in range(iters):
                    run()
                ms = (time.perf_counter() - t) / iters * 1e3
                total += ms * calls
                print(f"conv  {c:3}->{o:3} {k}x{k}/s{stride} on {size:2}x{size:<2}: {ms:7.3f} ms x{calls}")
        print(f"conv  resnet18 64x64 b{BATCH}, all convolutions: {total:7.2f} ms")
        return

    shapes = {
        "conv3x3": ((BATCH, 64, 56, 56), ((64, 64, 3, 3), 1, 1)),
        "conv1x1": ((BATCH, 256, 56, 56), ((64, 256, 1, 1), 1, 0)),
        "stem": ((BATCH, 3, 224, 224), ((64, 3, 7, 7), 2, 3)),
        "maxpool": ((BATCH, 64, 112, 112), None),
    }
    x_shape, conv = shapes[job]
    x = torch.randn(*x_shape, requires_grad=job != "stem")
    if conv is not None:
        w_shape, stride, pad = conv
        w = (torch.randn(*w_shape) * 0.05).requires_grad_()

        def run(inp):
            return F.conv2d(inp, w, stride=stride, padding=pad)
    else:

        def run(inp):
            return F.max_pool2d(inp, 3, 2, 1)

    iters = env_int("BENCH_LAYER_ITERS", 3)

    def timed(fn):
        fn()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters

    def fwd():
        with torch.no_grad():
            run(x)

    def fwd_bwd():
        y = run(x)
        y.backward(torch.ones_like(y))

    f = timed(fwd)
    fb = timed(fwd_bwd)
    print(
        f"layer {job:>8} {x_shape}: forward {f * 1e3:7.1f} ms, forward+backward {fb * 1e3:7.1f} ms | peak {peak_mb():6.0f} MB"
    )


JOBS = ["conv3x3", "conv1x1", "stem", "maxpool", "convs-r18", "train-r18", "infer-r18", "train-r50", "infer-r50",
        "train-b2", "infer-b2"]


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    import torch

    only = os.environ.get("BENCH_JOBS")
    for t in [s.strip() for s in os.environ.get("BENCH_THREADS", "1").split(",") if s.strip()]:
        print(f"== torch {torch.__version__}, {t} thread(s), batch {BATCH} ==", flush=True)
        for job in JOBS:
            if only and job not in only.split(","):
                continue
            env = dict(os.environ, BENCH_T=t, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t)
            subprocess.run([sys.executable, __file__, "--child", job], env=env, check=True)


if __name__ == "__main__":
    main()
