//! The augmentation pipeline of the reference code (albumentations), with its parameter ranges
//! and sampling rules, driven by [`Rng`]. Semantics follow albumentations 2.0.8 (read from the
//! wheel's source) where it agrees with the 1.x releases the paper used; the two 1.x behaviours
//! it changed are kept as the paper had them and said so below (`Flip`, Rotate's border).
//!
//! Order, as the reference `Compose`: ColorJitter → Flip → Rotate → Affine → Resize → RandomCrop.

use serde::{Deserialize, Serialize};

use super::color::{self, Jitter};
use super::geometry::{self, Border, FlipCode};
use super::image::Rgb8;
use super::rng::Rng;
use super::LoaderError;

/// `ColorJitter(brightness, contrast, saturation, hue, p)`: factors drawn uniformly from
/// [max(0, 1 - b), 1 + b] (same for contrast and saturation) and hue from [-h, h]; the four
/// operations applied in a random order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColorJitterCfg {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    pub p: f64,
}

/// `Rotate(limit, p)`: angle uniform in [-limit, limit] degrees, bilinear.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateCfg {
    pub limit: f64,
    pub p: f64,
    /// albumentations 1.x default `BORDER_REFLECT_101` (2.x changed it to constant 0).
    #[serde(default = "reflect101")]
    pub border: Border,
}

fn reflect101() -> Border {
    Border::Reflect101
}

fn constant() -> Border {
    Border::Constant
}

/// `Affine(translate_percent=t, p)`: shift fractions drawn uniformly from [-t, t] per axis,
/// applied as `int(f * size)` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffineCfg {
    pub translate: f64,
    pub p: f64,
    /// albumentations default: constant 0.
    #[serde(default = "constant")]
    pub border: Border,
}

/// Probability of a transform that has no parameters to draw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prob {
    pub p: f64,
}

/// The whole per-view pipeline; `None` skips a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    pub color_jitter: Option<ColorJitterCfg>,
    /// albumentations 1.x `Flip`: one of vertical / horizontal / both, uniformly.
    pub flip: Option<Prob>,
    pub horizontal_flip: Option<Prob>,
    pub vertical_flip: Option<Prob>,
    pub rotate: Option<RotateCfg>,
    pub affine: Option<AffineCfg>,
    /// `Resize(height, width)` as [width, height], always applied.
    pub resize: Option<[usize; 2]>,
    /// `RandomCrop(height, width)` as [width, height], always applied.
    pub random_crop: Option<[usize; 2]>,
}

impl AugmentConfig {
    /// MPCS pretraining (METHOD.md): ColorJitter(0.1 ×4, p 0.3), Flip(p 0.3),
    /// Rotate(±90°, p 0.3), Affine(translate 5%, p 0.2), Resize(size × size).
    pub fn mpcs_pretrain(size: usize) -> AugmentConfig {
        AugmentConfig {
            color_jitter: Some(ColorJitterCfg { brightness: 0.1, contrast: 0.1, saturation: 0.1, hue: 0.1, p: 0.3 }),
            flip: Some(Prob { p: 0.3 }),
            rotate: Some(RotateCfg { limit: 90.0, p: 0.3, border: Border::Reflect101 }),
            affine: Some(AffineCfg { translate: 0.05, p: 0.2, border: Border::Constant }),
            resize: Some([size, size]),
            ..AugmentConfig::default()
        }
    }

    /// Fine-tuning "low" augmentation: as pretraining with Affine p 0.3, Resize(resize),
    /// RandomCrop(crop) (the paper: 341 and 252).
    pub fn finetune_low(resize: usize, crop: usize) -> AugmentConfig {
        let mut c = AugmentConfig::mpcs_pretrain(resize);
        c.affine = Some(AffineCfg { translate: 0.05, p: 0.3, border: Border::Constant });
        c.random_crop = Some([crop, crop]);
        c
    }

    /// Evaluation: resize only.
    pub fn eval(size: usize) -> AugmentConfig {
        AugmentConfig { resize: Some([size, size]), ..AugmentConfig::default() }
    }

    /// Rejects values albumentations would reject, and crops that cannot fit after the resize.
    pub fn validate(&self) -> Result<(), LoaderError> {
        let bad = |what: &str| Err(LoaderError::BadConfig(what.to_string()));
        let prob_ok = |p: f64| (0.0..=1.0).contains(&p);
        if let Some(c) = &self.color_jitter {
            let ok = [c.brightness, c.contrast, c.saturation].iter().all(|v| v.is_finite() && *v >= 0.0)
                && c.hue.is_finite()
                && (0.0..=0.5).contains(&c.hue)
                && prob_ok(c.p);
            if !ok {
                return bad("color_jitter: brightness/contrast/saturation must be >= 0, hue in [0, 0.5], p in [0, 1]");
            }
        }
        for (name, p) in
            [("flip", &self.flip), ("horizontal_flip", &self.horizontal_flip), ("vertical_flip", &self.vertical_flip)]
        {
            if let Some(p) = p {
                if !prob_ok(p.p) {
                    return bad(&format!("{name}: p must be in [0, 1]"));
                }
            }
        }
        if let Some(r) = &self.rotate {
            if !(r.limit.is_finite() && r.limit >= 0.0 && prob_ok(r.p)) {
                return bad("rotate: limit must be a finite number of degrees >= 0 and p in [0, 1]");
            }
        }
        if let Some(a) = &self.affine {
            if !(a.translate.is_finite() && (0.0..=1.0).contains(&a.translate) && prob_ok(a.p)) {
                return bad("affine: translate must be a fraction in [0, 1] and p in [0, 1]");
            }
        }
        if let Some([w, h]) = self.resize {
            if w == 0 || h == 0 {
                return bad("resize: width and height must be > 0");
            }
        }
        if let Some([cw, ch]) = self.random_crop {
            if cw == 0 || ch == 0 {
                return bad("random_crop: width and height must be > 0");
            }
            if let Some([w, h]) = self.resize {
                if cw > w || ch > h {
                    return bad(&format!("random_crop {cw}x{ch} is larger than the resize {w}x{h}; make it smaller"));
                }
            }
        }
        Ok(())
    }

    /// The output size for an input of `w`×`h`.
    pub fn output_size(&self, w: usize, h: usize) -> (usize, usize) {
        let (w, h) = self.resize.map_or((w, h), |[rw, rh]| (rw, rh));
        self.random_crop.map_or((w, h), |[cw, ch]| (cw.min(w), ch.min(h)))
    }
}

/// The parameters drawn for one view (all `None` = identity); exposed so tests can check the
/// sampling and the trainer can log what happened.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Drawn {
    pub jitter: Option<Jitter>,
    pub flip: Option<FlipCode>,
    pub horizontal_flip: bool,
    pub vertical_flip: bool,
    pub rotate: Option<f64>,
    /// Whole-pixel shift (dx, dy).
    pub translate: Option<(i64, i64)>,
    /// Top-left corner of the crop.
    pub crop: Option<(usize, usize)>,
}

/// Draws every step's coin and parameters for an input of `w`×`h`. Each step always consumes
/// the same number of draws whether or not it fires, so one step's probability does not shift
/// the others' randomness.
pub fn draw(cfg: &AugmentConfig, w: usize, h: usize, rng: &mut Rng) -> Drawn {
    let mut d = Drawn::default();
    if let Some(c) = &cfg.color_jitter {
        let fire = rng.chance(c.p);
        let factor = |rng: &mut Rng, v: f64| rng.uniform((1.0 - v).max(0.0), 1.0 + v);
        let brightness = factor(rng, c.brightness);
        let contrast = factor(rng, c.contrast);
        let saturation = factor(rng, c.saturation);
        let hue = rng.uniform(-c.hue, c.hue);
        let mut order = [0u8, 1, 2, 3];
        rng.shuffle(&mut order);
        if fire {
            d.jitter = Some(Jitter { brightness, contrast, saturation, hue, order });
        }
    }
    if let Some(p) = &cfg.flip {
        let fire = rng.chance(p.p);
        let code = FlipCode::from_cv(rng.below(3) as i32 - 1);
        if fire {
            d.flip = Some(code);
        }
    }
    if let Some(p) = &cfg.horizontal_flip {
        d.horizontal_flip = rng.chance(p.p);
    }
    if let Some(p) = &cfg.vertical_flip {
        d.vertical_flip = rng.chance(p.p);
    }
    if let Some(r) = &cfg.rotate {
        let fire = rng.chance(r.p);
        let angle = rng.uniform(-r.limit, r.limit);
        if fire {
            d.rotate = Some(angle);
        }
    }
    if let Some(a) = &cfg.affine {
        let fire = rng.chance(a.p);
        // Python's int() truncates toward zero.
        let tx = (rng.uniform(-a.translate, a.translate) * w as f64).trunc() as i64;
        let ty = (rng.uniform(-a.translate, a.translate) * h as f64).trunc() as i64;
        if fire {
            d.translate = Some((tx, ty));
        }
    }
    if let Some([cw, ch]) = cfg.random_crop {
        let (rw, rh) = cfg.resize.map_or((w, h), |[rw, rh]| (rw, rh));
        let (cw, ch) = (cw.min(rw), ch.min(rh));
        // albumentations `get_crop_coords`: h_start, w_start uniform in [0, 1).
        let hs = rng.next_f64();
        let ws = rng.next_f64();
        let y = ((rh - ch + 1) as f64 * hs) as usize;
        let x = ((rw - cw + 1) as f64 * ws) as usize;
        d.crop = Some((x.min(rw - cw), y.min(rh - ch)));
    }
    d
}

/// Applies drawn parameters in the pipeline's order.
pub fn apply(cfg: &AugmentConfig, d: &Drawn, img: Rgb8) -> Rgb8 {
    let mut img = img;
    if let Some(j) = &d.jitter {
        color::jitter(&mut img, j);
    }
    if let Some(code) = d.flip {
        img = geometry::flip(&img, code);
    }
    if d.horizontal_flip {
        img = geometry::flip(&img, FlipCode::Horizontal);
    }
    if d.vertical_flip {
        img = geometry::flip(&img, FlipCode::Vertical);
    }
    if let (Some(angle), Some(r)) = (d.rotate, &cfg.rotate) {
        img = geometry::rotate(&img, angle, r.border);
    }
    if let (Some((dx, dy)), Some(a)) = (d.translate, &cfg.affine) {
        img = geometry::translate(&img, dx, dy, a.border);
    }
    if let Some([w, h]) = cfg.resize {
        img = geometry::resize(&img, w, h);
    }
    if let (Some((x, y)), Some([cw, ch])) = (d.crop, cfg.random_crop) {
        let (cw, ch) = (cw.min(img.width), ch.min(img.height));
        img = geometry::crop(&img, x, y, cw, ch);
    }
    img
}

/// Draws and applies in one go.
pub fn augment(cfg: &AugmentConfig, img: Rgb8, rng: &mut Rng) -> Rgb8 {
    let d = draw(cfg, img.width, img.height, rng);
    apply(cfg, &d, img)
}
