"""Copy small crops of the real fixture images into tests/fixtures/stain/.

Run once from the repository root:  python scripts/stain/make_fixtures.py ../shared/fixtures/real
Crops keep the committed test data small; the RGBA torchstain images stay RGBA so the
alpha-dropping path is exercised. One BreakHis image is copied whole (700x460) for the bench.
"""
import shutil
import sys
from pathlib import Path

from PIL import Image

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/fixtures/real")
dst = Path("tests/fixtures/stain")
dst.mkdir(parents=True, exist_ok=True)

BH = "breakhis/BreaKHis_v1/histology_slides/breast"
crops = {
    # name: (source file, left, top, width, height)
    "ts_source.png": ("torchstain/source.png", 160, 90, 256, 256),
    "ts_target.png": ("torchstain/target.png", 160, 90, 256, 256),
    "henorm1.png": ("henorm/example1.png", 384, 384, 256, 256),
    "henorm2.png": ("henorm/example2.png", 384, 384, 256, 256),
    "bh_dc.png": (f"{BH}/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/SOB_M_DC-14-2523-40-010.png", 222, 102, 256, 256),
    "bh_pt.png": (f"{BH}/benign/SOB/phyllodes_tumor/SOB_B_PT_14-21998AB/40X/SOB_B_PT-14-21998AB-40-001.png", 222, 102, 256, 256),
}
for name, (rel, x, y, w, h) in crops.items():
    im = Image.open(src / rel)
    im.crop((x, y, x + w, y + h)).save(dst / name, optimize=True)

# whole 700x460 BreakHis image: the bench input and a full-size parity case
shutil.copyfile(src / f"{BH}/benign/SOB/fibroadenoma/SOB_B_F_14-25197/40X/SOB_B_F-14-25197-40-023.png", dst / "bh_f_full.png")
