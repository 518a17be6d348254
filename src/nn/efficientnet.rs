//! EfficientNet-b2 exactly as `efficientnet_pytorch` 0.7.1 builds it (`EfficientNet.from_name` /
//! `from_pretrained("efficientnet-b2")`, the encoder of the paper's Eff-net b2 rows), with its
//! parameter names so its state dicts load by name: `_conv_stem`, `_bn0`,
//! `_blocks.{i}._expand_conv/_bn0/_depthwise_conv/_bn1/_se_reduce/_se_expand/_project_conv/_bn2`,
//! `_conv_head`, `_bn1`, `_fc`.
//!
//! What makes it that network and not torchvision's EfficientNet:
//! - TensorFlow-style *static* "same" padding: every k×k convolution pads (possibly one more on
//!   the bottom/right) as computed once, at construction, for a fixed image size (260 for b2),
//!   whatever size the input later has. At 224 or 252 px this is not the padding a "same"
//!   convolution of that size would use, and the outputs differ; matching it is what makes
//!   ImageNet weights behave as in the paper's code at the paper's sizes.
//! - BatchNorm eps 1e-3 and momentum 0.01 (TensorFlow's decay 0.99), trainable as in the ResNets.
//! - Swish activations, squeeze-and-excitation with biased 1×1 convolutions, and drop-connect on the
//!   residual branch at rate 0.2·i/23 for block i while training.

use candle_core::Tensor;
use candle_nn::{Init, Linear, VarBuilder};

use super::batchnorm::BatchNorm;
use super::conv::{conv2d, conv2d_channel_affine, depthwise_conv2d, pad_for_candle, Padding};
use super::error::{NnError, Result};
use super::grad::grad_enabled;
use super::precision::with_compute_dtype;
use super::resnet::linear;
use super::swish::swish;

/// `efficientnet_params`: width and depth multipliers, the static image size, head dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variant {
    pub width: f64,
    pub depth: f64,
    pub image_size: usize,
    /// Dropout before `_fc` while training (used only when the network has its own `_fc`).
    pub dropout: f64,
    /// Drop-connect rate of the last block (block i of n uses rate · i / n) while training.
    pub drop_connect: f64,
}

/// efficientnet-b2: (1.1, 1.2, 260, 0.3), drop-connect 0.2.
pub const B2: Variant = Variant { width: 1.1, depth: 1.2, image_size: 260, dropout: 0.3, drop_connect: 0.2 };

const BN_EPS: f64 = 1e-3;
/// PyTorch's momentum = 1 − TensorFlow's decay (0.99).
const BN_MOMENTUM: f64 = 1.0 - 0.99;
const SE_RATIO: f64 = 0.25;

/// One stage of the base network (efficientnet-b0's `blocks_args`): repeats, kernel, stride,
/// expansion, input and output filters. Every stage has squeeze-and-excitation at ratio 0.25.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// `round_filters`: filters × width, rounded to a multiple of 8, never more than 10 % down.
fn round_filters(filters: usize, v: &Variant) -> usize {
    let divisor = 8.0f64;
    let f = filters as f64 * v.width;
    let mut new = divisor.max(((f + divisor / 2.0) as i64 / 8 * 8) as f64);
    if new < 0.9 * f {
        new += divisor;
    }
    new as usize
}

/// `round_repeats`: ceil(repeats × depth).
fn round_repeats(repeats: usize, v: &Variant) -> usize {
    (v.depth * repeats as f64).ceil() as usize
}

/// The padding `Conv2dStaticSamePadding` computes for a k×k convolution at `stride` on an
/// `image`×`image` input: total max((⌈image/s⌉−1)·s + k − image, 0), the odd pixel at the
/// bottom/right.
pub fn static_same_padding(image: usize, k: usize, stride: usize) -> Padding {
    let out = image.div_ceil(stride);
    let total = ((out.saturating_sub(1)) * stride + k).saturating_sub(image);
    let (before, after) = (total / 2, total - total / 2);
    Padding { top: before, bottom: after, left: before, right: after }
}

/// PyTorch's default convolution init (kaiming uniform, a = √5): U(±1/√fan_in), also for the bias.
fn conv_weight(vb: &VarBuilder, shape: (usize, usize, usize, usize), name: &str) -> Result<Tensor> {
    let fan_in = (shape.1 * shape.2 * shape.3) as f64;
    let bound = 1.0 / fan_in.sqrt();
    Ok(vb.get_with_hints(shape, name, Init::Uniform { lo: -bound, up: bound })?)
}

fn bn(vb: VarBuilder, n: usize) -> Result<BatchNorm> {
    BatchNorm::with_eps_momentum(n, BN_EPS, BN_MOMENTUM, vb)
}

/// A bias-free 1×1 convolution followed by its BatchNorm, and swish when `act`; evaluation without
/// gradients folds the BatchNorm into the convolution's output pass.
fn pointwise_bn(x: &Tensor, w: &Tensor, norm: &BatchNorm, train: bool, act: bool) -> Result<Tensor> {
    let y = if !train && !grad_enabled() {
        let (scale, shift) = norm.eval_scale_shift()?;
        conv2d_channel_affine(x, w, 1, 0, 1, &scale, &shift, None, false)?
    } else {
        norm.forward_t(&conv2d(x, w, 1, 0, 1)?, train)?
    };
    if act {
        swish(&y)
    } else {
        Ok(y)
    }
}

/// Squeeze-and-excitation: x · sigmoid(expand(swish(reduce(mean_hw(x))))), the two 1×1
/// convolutions (with bias) applied as matrix products on the pooled (N, C) vector.
#[derive(Clone, Debug)]
struct SqueezeExcite {
    reduce_w: Tensor,
    reduce_b: Tensor,
    expand_w: Tensor,
    expand_b: Tensor,
}

impl SqueezeExcite {
    fn new(vb: &VarBuilder, channels: usize, squeezed: usize) -> Result<Self> {
        let (rvb, evb) = (vb.pp("_se_reduce"), vb.pp("_se_expand"));
        let reduce_w = conv_weight(&rvb, (squeezed, channels, 1, 1), "weight")?;
        let rb = 1.0 / (channels as f64).sqrt();
        let reduce_b = rvb.get_with_hints(squeezed, "bias", Init::Uniform { lo: -rb, up: rb })?;
        let expand_w = conv_weight(&evb, (channels, squeezed, 1, 1), "weight")?;
        let eb = 1.0 / (squeezed as f64).sqrt();
        let expand_b = evb.get_with_hints(channels, "bias", Init::Uniform { lo: -eb, up: eb })?;
        Ok(Self { reduce_w, reduce_b, expand_w, expand_b })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let pooled = x.mean((2, 3))?; // (N, C)
        let squeezed = self.reduce_w.dim(0)?;
        // The products in bf16 under bf16 autocast (`nn::precision`), the biases added in f32.
        let matmul_t = |a: &Tensor, w: &Tensor| with_compute_dtype(a, w, |a, w| Ok(a.matmul(&w.t()?)?));
        let r = matmul_t(&pooled, &self.reduce_w.reshape((squeezed, c))?)?.broadcast_add(&self.reduce_b)?;
        let e = matmul_t(&swish(&r)?, &self.expand_w.reshape((c, squeezed))?)?.broadcast_add(&self.expand_b)?;
        let gate = candle_nn::ops::sigmoid(&e)?.reshape((n, c, 1, 1))?;
        Ok(x.broadcast_mul(&gate)?)
    }
}

/// One MBConv block (`MBConvBlock`).
#[derive(Clone, Debug)]
struct MbConv {
    expand: Option<(Tensor, BatchNorm)>,
    depthwise: Tensor,
    stride: usize,
    pad: Padding,
    bn1: BatchNorm,
    se: SqueezeExcite,
    project: Tensor,
    bn2: BatchNorm,
    /// Identity skip (stride 1, same width): the only blocks drop-connect applies to.
    skip: bool,
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        inp: usize,
        out: usize,
        expand: usize,
        k: usize,
        stride: usize,
        image: usize,
    ) -> Result<Self> {
        let mid = inp * expand;
        let expand_layer = if expand != 1 {
            Some((conv_weight(&vb.pp("_expand_conv"), (mid, inp, 1, 1), "weight")?, bn(vb.pp("_bn0"), mid)?))
        } else {
            None
        };
        let squeezed = ((inp as f64 * SE_RATIO) as usize).max(1);
        Ok(Self {
            expand: expand_layer,
            depthwise: conv_weight(&vb.pp("_depthwise_conv"), (mid, 1, k, k), "weight")?,
            stride,
            pad: static_same_padding(image, k, stride),
            bn1: bn(vb.pp("_bn1"), mid)?,
            se: SqueezeExcite::new(&vb, mid, squeezed)?,
            project: conv_weight(&vb.pp("_project_conv"), (out, mid, 1, 1), "weight")?,
            bn2: bn(vb.pp("_bn2"), out)?,
            skip: stride == 1 && inp == out,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool, drop_rate: f64) -> Result<Tensor> {
        let y = match &self.expand {
            Some((w, norm)) => pointwise_bn(x, w, norm, train, true)?,
            None => x.clone(),
        };
        let y = depthwise_conv2d(&y, &self.depthwise, self.stride, self.pad)?;
        let y = swish(&self.bn1.forward_t(&y, train)?)?;
        let y = self.se.forward(&y)?;
        let y = pointwise_bn(&y, &self.project, &self.bn2, train, false)?;
        if !self.skip {
            return Ok(y);
        }
        let y = if train && drop_rate > 0.0 { drop_connect(&y, drop_rate)? } else { y };
        Ok((y + x)?)
    }
}

/// `drop_connect`: each sample's branch is kept with probability 1 − p (and scaled by 1/(1 − p)),
/// else zeroed: floor(1 − p + U[0, 1)) per sample.
fn drop_connect(x: &Tensor, p: f64) -> Result<Tensor> {
    let keep = 1.0 - p;
    let n = x.dim(0)?;
    let mask = (Tensor::rand(0f32, 1f32, (n, 1, 1, 1), x.device())? + keep)?.floor()?;
    Ok(x.affine(1.0 / keep, 0.0)?.broadcast_mul(&mask)?)
}

/// An `efficientnet_pytorch` EfficientNet.
#[derive(Clone, Debug)]
pub struct EfficientNet {
    variant: Variant,
    stem: Tensor,
    stem_pad: Padding,
    bn0: BatchNorm,
    blocks: Vec<MbConv>,
    head: Tensor,
    bn1: BatchNorm,
    fc: Option<Linear>,
    features: usize,
}

impl EfficientNet {
    /// Builds the network under `vb` with `efficientnet_pytorch`'s names, its static padding
    /// computed for `variant.image_size` (as `from_name`/`from_pretrained` do). `num_classes: None`
    /// builds the feature extractor without `_fc`.
    pub fn new(variant: Variant, vb: VarBuilder, num_classes: Option<usize>) -> Result<Self> {
        let v = &variant;
        let mut image = v.image_size;
        let stem_c = round_filters(32, v);
        let stem = conv_weight(&vb.pp("_conv_stem"), (stem_c, 3, 3, 3), "weight")?;
        let stem_pad = static_same_padding(image, 3, 2);
        let bn0 = bn(vb.pp("_bn0"), stem_c)?;
        image = image.div_ceil(2);
        let mut blocks = Vec::new();
        let mut last = stem_c;
        for &(repeats, k, stride, expand, inp, out) in &STAGES {
            let (inp, out) = (round_filters(inp, v), round_filters(out, v));
            for r in 0..round_repeats(repeats, v) {
                let (i, s) = if r == 0 { (inp, stride) } else { (out, 1) };
                blocks.push(MbConv::new(vb.pp(format!("_blocks.{}", blocks.len())), i, out, expand, k, s, image)?);
                if r == 0 {
                    image = image.div_ceil(stride);
                }
            }
            last = out;
        }
        let features = round_filters(1280, v);
        let head = conv_weight(&vb.pp("_conv_head"), (features, last, 1, 1), "weight")?;
        let bn1 = bn(vb.pp("_bn1"), features)?;
        let fc = num_classes.map(|n| linear(vb.pp("_fc"), features, n, true)).transpose()?;
        Ok(Self { variant, stem, stem_pad, bn0, blocks, head, bn1, fc, features })
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Width of the pooled features (1408 for b2).
    pub fn feature_dim(&self) -> usize {
        self.features
    }

    /// `extract_features`: the head's activations (N, 1408, ⌈H/32⌉-ish, …) before pooling. Input
    /// (N, 3, H, W).
    pub fn feature_map_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != 3 {
            return Err(NnError::InvalidInput(format!(
                "EfficientNet expects an (N, 3, H, W) image batch, got {:?}",
                x.dims()
            )));
        }
        let x = pad_for_candle(x, self.stem_pad, 3, 2)?;
        let mut y = swish(&self.bn0.forward_t(&conv2d(&x, &self.stem, 2, 0, 1)?, train)?)?;
        let count = self.blocks.len() as f64;
        for (i, block) in self.blocks.iter().enumerate() {
            y = block.forward_t(&y, train, self.variant.drop_connect * i as f64 / count)?;
        }
        pointwise_bn(&y, &self.head, &self.bn1, train, true)
    }

    /// Globally average-pooled features (N, 1408).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.feature_map_t(x, train)?.mean((2, 3))?)
    }

    /// Logits through dropout and `_fc` when the model has one, else the pooled features. (A
    /// fine-tuned classifier is the feature extractor plus a `Head` at `_fc` with its own dropout.)
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.features_t(x, train)?;
        match &self.fc {
            Some(fc) => {
                let p = self.variant.dropout as f32;
                let f = if train && p > 0.0 { candle_nn::ops::dropout(&f, p)? } else { f };
                super::precision::linear(fc, &f)
            }
            None => Ok(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b2_widths_and_depths_follow_round_filters() {
        let widths: Vec<usize> =
            [32, 16, 24, 40, 80, 112, 192, 320, 1280].iter().map(|&f| round_filters(f, &B2)).collect();
        assert_eq!(widths, [32, 16, 24, 48, 88, 120, 208, 352, 1408]);
        let repeats: Vec<usize> = STAGES.iter().map(|s| round_repeats(s.0, &B2)).collect();
        assert_eq!(repeats, [2, 3, 3, 4, 4, 5, 2]);
    }

    #[test]
    fn static_padding_is_tensorflow_same_for_the_construction_size() {
        // 260 → stride 2, k 3: out 130, total (129·2 + 3 − 260) = 1 → (0, 1).
        assert_eq!(static_same_padding(260, 3, 2), Padding { top: 0, bottom: 1, left: 0, right: 1 });
        // 65 → stride 2, k 5: out 33, total 32·2 + 5 − 65 = 4 → (2, 2).
        assert_eq!(static_same_padding(65, 5, 2), Padding::uniform(2));
        // stride 1, k 5: total 4 → (2, 2); 1×1: none.
        assert_eq!(static_same_padding(17, 5, 1), Padding::uniform(2));
        assert_eq!(static_same_padding(9, 1, 1), Padding::default());
    }
}
