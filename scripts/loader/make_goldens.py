#!/usr/bin/env python3
"""Golden images for tests/loader_parity.rs, made ONCE with the peer library.

Pinned versions (the ones read and run): albumentations 2.0.8, albucore 0.0.24,
opencv-python-headless 4.x (cv2.__version__ is recorded in the manifest), numpy 2.x, Pillow.
    pip install albumentations==2.0.8 opencv-python-headless pillow
    python3 scripts/loader/make_goldens.py /path/to/SOB_M_DC-14-2523-40-010.png

Writes tests/fixtures/loader/breakhis_small.png (the source downscaled to 175x115 with PIL) and,
under tests/golden/loader/, one PNG per transform with FIXED parameters plus manifest.json that
lists each golden's operation and parameters (the Rust test reads it, so the two cannot drift).
Transforms are called through albumentations' own classes with degenerate ranges (e.g.
brightness=(0.9, 0.9), limit=(30, 30)) so the parameter is fixed but the code path is the real
one. albumentations 2.x has no `Flip`; 1.x `Flip` was `cv2.flip(img, d)` with d in {-1, 0, 1},
so that is what the flip goldens call.
"""
import json
import os
import sys

import albumentations as A
import cv2
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "loader", "breakhis_small.png")
OUT = os.path.join(ROOT, "tests", "golden", "loader")


def main(src):
    os.makedirs(os.path.dirname(FIX), exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    Image.open(src).convert("RGB").resize((175, 115), Image.LANCZOS).save(FIX, optimize=True)
    img = np.asarray(Image.open(FIX).convert("RGB")).copy()
    h, w = img.shape[:2]
    cases = []

    def save(name, out, op, **params):
        Image.fromarray(out).save(os.path.join(OUT, name + ".png"), optimize=True)
        cases.append({"name": name, "op": op, **params})

    def cj(b=1.0, c=1.0, s=1.0, hue=0.0):
        return A.ColorJitter(brightness=(b, b), contrast=(c, c), saturation=(s, s), hue=(hue, hue), p=1.0)

    for f in (0.9, 1.1):
        save(f"brightness_{f}", cj(b=f)(image=img)["image"], "brightness", factor=f)
        save(f"contrast_{f}", cj(c=f)(image=img)["image"], "contrast", factor=f)
        save(f"saturation_{f}", cj(s=f)(image=img)["image"], "saturation", factor=f)
    for f in (-0.1, 0.05, 0.1):
        save(f"hue_{f}", cj(hue=f)(image=img)["image"], "hue", factor=f)
    # The full jitter with a chosen order (order is the only random part left; pass it to apply).
    t = A.ColorJitter(p=1.0)
    order = [3, 0, 2, 1]
    out = t.apply(img.copy(), brightness=1.07, contrast=0.93, saturation=1.08, hue=-0.06, order=order)
    save("jitter", out, "jitter", brightness=1.07, contrast=0.93, saturation=1.08, hue=-0.06, order=order)

    for d in (-1, 0, 1):
        save(f"flip_{d}", cv2.flip(img, d), "flip", code=d)
    save("hflip", A.HorizontalFlip(p=1.0)(image=img)["image"], "flip", code=1)
    save("vflip", A.VerticalFlip(p=1.0)(image=img)["image"], "flip", code=0)

    for angle in (30.0, -75.0, 90.0):
        t = A.Rotate(limit=(angle, angle), border_mode=cv2.BORDER_REFLECT_101, p=1.0)
        save(f"rotate_{angle}", t(image=img)["image"], "rotate", angle=angle, border="reflect101")
    t = A.Rotate(limit=(17.0, 17.0), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
    save("rotate_17.0_constant", t(image=img)["image"], "rotate", angle=17.0, border="constant")

    for tx, ty in ((0.05, -0.05), (-0.03, 0.02)):
        t = A.Affine(translate_percent={"x": (tx, tx), "y": (ty, ty)}, p=1.0)
        # albumentations: int(t * size) whole pixels.
        save(f"affine_{tx}_{ty}", t(image=img)["image"], "translate", dx=int(tx * w), dy=int(ty * h))

    for rw, rh in ((96, 64), (341, 224), (64, 64)):
        save(f"resize_{rw}x{rh}", A.Resize(rh, rw, p=1.0)(image=img)["image"], "resize", width=rw, height=rh)

    x, y, cw, ch = 20, 10, 100, 80
    save("crop", A.Crop(x_min=x, y_min=y, x_max=x + cw, y_max=y + ch, p=1.0)(image=img)["image"],
         "crop", x=x, y=y, width=cw, height=ch)

    manifest = {"albumentations": A.__version__, "opencv": cv2.__version__, "fixture": "breakhis_small.png",
                "cases": cases}
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(cases)} goldens in {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
