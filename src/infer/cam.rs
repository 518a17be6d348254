//! Grad-CAM (Selvaraju et al. 2017) on a convolutional feature map A (C × h × w) of the encoder: by default the
//! deepest one at least [`MIN_CAM_SIDE`] cells on each side (a ResNet's `layer4` output at the usual input sizes,
//! an earlier stage when the input is so small that layer4 is 1×1 and carries no position; EfficientNet's head
//! activations after `_conv_head`, `_bn1` and swish): channel weights w_c = spatial mean of ∂y_class/∂A_c,
//! map = ReLU(Σ_c w_c A_c), upsampled bilinearly to the input size (PyTorch `interpolate(align_corners=False)`,
//! which is also what cv2.resize does when enlarging), then scaled to [0, 1] by its min and max, and drawn over the
//! image with the jet colour map.
//!
//! The gradient is taken by candle's backward pass from the class logit to A, with A held as a variable so
//! the backward pass stops there (nothing below A is needed).

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor, Var};

use super::error::{InferError, Result};
use super::images::{image_tensor, load_image, write_atomic, InputOptions};
use super::model::{load_model_with, Model};
use crate::loader::Rgb8;
use crate::nn::{no_grad, Arch};
use image::ImageEncoder;

/// The automatic layer choice wants a map at least this many cells high and wide: fewer cannot say where in
/// the image the evidence is (a 2×2 map only says which quarter).
pub const MIN_CAM_SIDE: usize = 4;

/// One image's Grad-CAM.
#[derive(Clone, Debug, PartialEq)]
pub struct Cam {
    /// The layer whose map is explained (`layer4`, `layer2`, `head`, ...).
    pub layer: String,
    /// The class explained (the given one, or the top-scoring one).
    pub class: usize,
    pub logits: Vec<f32>,
    /// Channel weights w_c (C).
    pub weights: Vec<f32>,
    /// ReLU(Σ w_c A_c) at feature-map resolution, row major (fh × fw), not normalised.
    pub raw: Vec<f32>,
    pub fh: usize,
    pub fw: usize,
    /// The map at input resolution, row major (height × width), in [0, 1].
    pub map: Vec<f32>,
    pub width: usize,
    pub height: usize,
}

/// Grad-CAM of a (1, 3, H, W) input for `class` (default: the top logit) on `layer` (one of the encoder's
/// `cam_layers()`; default: the deepest whose map is at least [`MIN_CAM_SIDE`] on each side, else the shallowest).
pub fn grad_cam(model: &Model, x: &Tensor, class: Option<usize>, layer: Option<&str>) -> Result<Cam> {
    let Some(fc) = &model.fc else {
        return Err(InferError::Usage("Grad-CAM needs a classifier (fc) in the weights".into()));
    };
    let (n, _, height, width) = x.dims4()?;
    if n != 1 {
        return Err(InferError::Usage(format!("Grad-CAM takes one image at a time, got a batch of {n}")));
    }
    let names = model.net.cam_layers();
    let maps = no_grad(|| model.net.cam_layer_maps_t(x, false))?;
    let index = match layer {
        Some(name) => names.iter().position(|l| *l == name).ok_or_else(|| {
            InferError::Usage(format!(
                "{} has no layer '{name}' for Grad-CAM; use one of: {}",
                model.net.arch(),
                names.join(", ")
            ))
        })?,
        None => {
            let big_enough = |m: &Tensor| m.dims().iter().skip(2).all(|&d| d >= MIN_CAM_SIDE);
            maps.iter().rposition(big_enough).unwrap_or(0)
        }
    };
    let a = Var::from_tensor(&maps[index])?;
    let last = model.net.last_map_from_t(a.as_tensor(), index, false)?;
    let logits = fc.forward_t(&last.mean((2, 3))?, false)?;
    let logit_values = logits.i(0)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let class = match class {
        Some(c) if c >= model.outputs => return Err(InferError::ClassOutOfRange { class: c, outputs: model.outputs }),
        Some(c) => c,
        None => argmax(&logit_values),
    };
    let grads = logits.i((0, class))?.backward()?;
    let g = grads
        .get(a.as_tensor())
        .ok_or_else(|| InferError::Usage("internal: no gradient reached the feature map".into()))?;
    let weights = g.mean((2, 3))?; // (1, C)
    let (_, c, fh, fw) = a.dims4()?;
    let cam = weights.reshape((1, c, 1, 1))?.broadcast_mul(a.as_tensor())?.sum(1)?.relu()?;
    let raw = cam.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let mut map = upsample_bilinear(&raw, fh, fw, height, width);
    normalise(&mut map);
    Ok(Cam {
        layer: names[index].to_string(),
        class,
        logits: logit_values,
        weights: weights.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
        raw,
        fh,
        fw,
        map,
        width,
        height,
    })
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

/// Bilinear resize of a single-channel map with PyTorch's `align_corners=False` (half-pixel centres, edges
/// clamped).
pub fn upsample_bilinear(src: &[f32], sh: usize, sw: usize, dh: usize, dw: usize) -> Vec<f32> {
    let taps = |d: usize, s: usize| -> Vec<(usize, usize, f32)> {
        let scale = s as f64 / d as f64;
        (0..d)
            .map(|i| {
                let pos = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (pos.floor() as usize).min(s - 1);
                let i1 = (i0 + 1).min(s - 1);
                (i0, i1, (pos - i0 as f64) as f32)
            })
            .collect()
    };
    let (ys, xs) = (taps(dh, sh), taps(dw, sw));
    let mut out = Vec::with_capacity(dh * dw);
    for &(y0, y1, ly) in &ys {
        for &(x0, x1, lx) in &xs {
            let top = src[y0 * sw + x0] * (1.0 - lx) + src[y0 * sw + x1] * lx;
            let bottom = src[y1 * sw + x0] * (1.0 - lx) + src[y1 * sw + x1] * lx;
            out.push(top * (1.0 - ly) + bottom * ly);
        }
    }
    out
}

/// Scales to [0, 1] by min and max; a flat map (e.g. all zero after the ReLU: no positive evidence) becomes 0.
fn normalise(v: &mut [f32]) {
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    let range = hi - lo;
    for x in v.iter_mut() {
        *x = if range > 0.0 && range.is_finite() { (*x - lo) / range } else { 0.0 };
    }
}

/// matplotlib's `jet` colour map at t in [0, 1] (its piecewise-linear segment data).
pub fn jet(t: f32) -> [u8; 3] {
    fn seg(t: f32, pts: &[(f32, f32)]) -> f32 {
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if t <= x1 {
                return y0 + (y1 - y0) * (t - x0) / (x1 - x0);
            }
        }
        pts[pts.len() - 1].1
    }
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let r = seg(t, &[(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)]);
    let g = seg(t, &[(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)]);
    let b = seg(t, &[(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)]);
    [r, g, b].map(|v| (v * 255.0).round() as u8)
}

/// The image blended with the jet-coloured map: (1 − alpha)·image + alpha·jet(map).
pub fn overlay(img: &Rgb8, map: &[f32], alpha: f32) -> Rgb8 {
    let mut out = img.clone();
    for (px, &v) in out.data.chunks_exact_mut(3).zip(map) {
        let c = jet(v);
        for k in 0..3 {
            px[k] = ((1.0 - alpha) * px[k] as f32 + alpha * c[k] as f32).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[derive(Clone, Debug)]
pub struct CamOptions {
    pub arch: Arch,
    /// Dilated last stages, as the model was trained (default none).
    pub dilation: crate::nn::Dilation,
    /// Weights with a classifier (a fine-tuned `model.safetensors` or a torchvision checkpoint).
    pub weights: PathBuf,
    pub images: Vec<PathBuf>,
    /// Output folder: `<image stem>.cam.png` per image.
    pub out: PathBuf,
    /// Class to explain; `None` = each image's top class.
    pub class: Option<usize>,
    /// Layer to explain (see [`grad_cam`]); `None` = automatic.
    pub layer: Option<String>,
    pub input: InputOptions,
    /// Opacity of the heat map over the image.
    pub alpha: f32,
    pub device: Device,
}

impl CamOptions {
    pub fn new(arch: Arch, weights: PathBuf, images: Vec<PathBuf>, out: PathBuf) -> Self {
        CamOptions {
            dilation: crate::nn::Dilation::None,
            arch,
            weights,
            images,
            out,
            class: None,
            layer: None,
            input: InputOptions::default(),
            alpha: 0.4,
            device: Device::Cpu,
        }
    }
}

/// Writes one overlay PNG per image (at the network's input size); returns (PNG path, the image's Grad-CAM).
pub fn cam_files(opts: &CamOptions) -> Result<Vec<(PathBuf, Cam)>> {
    if opts.images.is_empty() {
        return Err(InferError::Usage("no images given; pass one or more image files".into()));
    }
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(InferError::Usage(format!("alpha {} must be in [0, 1]", opts.alpha)));
    }
    let mut names: Vec<PathBuf> = Vec::new();
    for p in &opts.images {
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let out = opts.out.join(format!("{stem}.cam.png"));
        if names.contains(&out) {
            return Err(InferError::Usage(format!(
                "two inputs share the name '{stem}', so their heat maps would overwrite each other; rename one"
            )));
        }
        names.push(out);
    }
    let model = load_model_with(opts.arch, opts.dilation, &opts.weights, &opts.device)?;
    if model.fc.is_none() {
        return Err(InferError::NoHead { path: opts.weights.clone() });
    }
    let mut done = Vec::with_capacity(names.len());
    for (path, out) in opts.images.iter().zip(names) {
        let img = load_image(path, &opts.input)?;
        let x = image_tensor(std::slice::from_ref(&img), opts.input.normalize, &opts.device)?;
        let cam = grad_cam(&model, &x, opts.class, opts.layer.as_deref())?;
        write_png(&out, &overlay(&img, &cam.map, opts.alpha))?;
        done.push((out, cam));
    }
    Ok(done)
}

fn write_png(path: &Path, img: &Rgb8) -> Result<()> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&img.data, img.width as u32, img.height as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| InferError::Usage(format!("internal: PNG encoding failed: {e}")))?;
    write_atomic(path, &bytes)
}
