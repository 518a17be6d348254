"""Generate the stain-normalisation golden files in tests/golden/stain/ (run ONCE, from the repo root).

Peer libraries (from PyPI): torchstain 1.4.1 (numpy backend), histomicstk 1.4.0, staintools 2.1.2 with
spams-bin 2.6.14. HistomicsTK's package __init__ pulls in heavy optional dependencies (large_image,
slicer_cli_web, ...), so its color_conversion package and color_normalization/reinhard.py are loaded
straight from the installed wheel's files below: the code that runs is HistomicsTK's own, unmodified.

  python -m venv venv && . venv/bin/activate
  pip install numpy pillow torchstain==1.4.1 spams-bin matplotlib opencv-python-headless
  pip install --no-deps staintools==2.1.2 histomicstk==1.4.0
  python scripts/stain/make_golden.py
"""
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer


def load_histomicstk():
    root = Path(importlib.util.find_spec("numpy").origin).parent.parent / "histomicstk"
    for name, path in [("histomicstk", root), ("histomicstk.preprocessing", root / "preprocessing")]:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    import histomicstk.preprocessing.color_conversion as cc  # noqa: E402

    spec = importlib.util.spec_from_file_location(
        "htk_reinhard", root / "preprocessing" / "color_normalization" / "reinhard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return cc, mod.reinhard


FIX = Path("tests/fixtures/stain")
OUT = Path("tests/golden/stain")
OUT.mkdir(parents=True, exist_ok=True)
INPUTS = ["ts_source", "henorm1", "henorm2", "bh_dc", "bh_pt"]
BACH_MU = np.array([8.74108109, -0.12440419, 0.0444982])
BACH_SIGMA = np.array([0.6135447, 0.10989545, 0.0286032])


def rgb(name):
    # RGBA fixtures: drop alpha, as the Rust loader does
    return np.asarray(Image.open(FIX / f"{name}.png").convert("RGB"))


def save(arr, name):
    Image.fromarray(arr).save(OUT / f"{name}.png")


def main():
    cc, htk_reinhard = load_histomicstk()
    target = rgb("ts_target")
    params = {"target": "ts_target"}

    # ---- Macenko, torchstain numpy backend (Io=240, alpha=1, beta=0.15 defaults)
    default = NumpyMacenkoNormalizer()
    out, _, _ = default.normalize(I=rgb("ts_source"), stains=False)
    save(out, "macenko_default_ts_source")
    mac = NumpyMacenkoNormalizer()
    mac.fit(target)
    params["macenko_target"] = {"he": mac.HERef.tolist(), "max_c": mac.maxCRef.tolist()}
    params["macenko_sources"] = {}
    for name in INPUTS:
        out, _, _ = mac.normalize(I=rgb(name), stains=False)
        save(out, f"macenko_{name}")
        probe = NumpyMacenkoNormalizer()
        probe.fit(rgb(name))
        params["macenko_sources"][name] = {"he": probe.HERef.tolist(), "max_c": probe.maxCRef.tolist()}

    # ---- Reinhard in CIE LAB, torchstain numpy backend
    rl = NumpyReinhardNormalizer()
    rl.fit(target)
    params["reinhard_lab_target"] = {"mean": rl.target_means.astype(float).tolist(),
                                     "std": rl.target_stds.astype(float).tolist()}
    for name in INPUTS:
        save(rl.normalize(rgb(name)), f"reinhard_lab_{name}")

    # ---- Reinhard in Ruderman l-alpha-beta, HistomicsTK; BACH preset and fitted target
    for name in INPUTS:
        save(htk_reinhard(rgb(name), BACH_MU, BACH_SIGMA), f"reinhard_bach_{name}")
    mu, sigma = cc.lab_mean_std(target)
    params["reinhard_target"] = {"mean": mu.tolist(), "std": sigma.tolist()}
    save(htk_reinhard(rgb("ts_source"), mu, sigma), "reinhard_fit_ts_source")

    # ---- Vahadane stain matrices, staintools (spams.trainDL is stochastic: keep several runs)
    from staintools.stain_extraction.vahadane_stain_extractor import VahadaneStainExtractor
    params["vahadane"] = {}
    for name in INPUTS + ["ts_target", "bh_f_full"]:
        runs = [VahadaneStainExtractor.get_stain_matrix(rgb(name).copy()).tolist() for _ in range(5)]
        params["vahadane"][name] = runs
    # full staintools Vahadane normalisation. Its stain extraction is stochastic; with henorm1 as
    # target (well separated stains) repeat runs differ by ~0.3-0.6 grey levels mean abs, whereas
    # ts_target's two stains are almost parallel (cos 0.99) and repeat runs differ by up to ~2.8.
    from staintools import StainNormalizer
    vn = StainNormalizer("vahadane")
    vn.fit(rgb("henorm1").copy())
    params["vahadane_target"] = {"stains": vn.stain_matrix_target.tolist(),
                                 "max_c": vn.maxC_target.ravel().tolist()}
    for name in ["ts_source", "bh_dc"]:
        save(vn.transform(rgb(name).copy()), f"vahadane_{name}")
    (OUT / "params.json").write_text(json.dumps(params, indent=1))


if __name__ == "__main__":
    main()
