//! ResNet-18/34/50/101/152 in torchvision's layout (`torchvision.models.resnet`, v1.5: the
//! bottleneck's stride sits on its 3×3 convolution), with torchvision's parameter names so that
//! its state dicts load by name: conv1, bn1, layer{1..4}.{i}.conv{1,2,3}/bn{1,2,3},
//! layer{k}.0.downsample.{0,1}, fc.

use candle_core::Tensor;
use candle_nn::{Init, Linear, ModuleT, VarBuilder};

use super::batchnorm::{into_candle, BatchNorm};
use super::conv::{conv2d, conv2d_channel_affine};
use super::encoder::Arch;
use super::error::{NnError, Result};
use super::grad::grad_enabled;
use super::pool::max_pool2d_padded;
use super::relu::add_relu;

/// torchvision's `replace_stride_with_dilation`, named by the resulting output stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dilation {
    /// Output stride 32: the plain ResNet.
    #[default]
    None,
    /// Output stride 16: `[False, False, True]` (layer4 dilated).
    OutputStride16,
    /// Output stride 8: `[False, True, True]` (layer3 and layer4 dilated).
    OutputStride8,
}

impl Dilation {
    /// From an output stride of 32, 16 or 8.
    pub fn from_output_stride(os: usize) -> Result<Self> {
        match os {
            32 => Ok(Dilation::None),
            16 => Ok(Dilation::OutputStride16),
            8 => Ok(Dilation::OutputStride8),
            other => Err(NnError::BadOutputStride(other)),
        }
    }

    pub fn output_stride(self) -> usize {
        match self {
            Dilation::None => 32,
            Dilation::OutputStride16 => 16,
            Dilation::OutputStride8 => 8,
        }
    }

    /// For layer2, layer3, layer4, as torchvision's argument.
    pub fn replace_stride_with_dilation(self) -> [bool; 3] {
        match self {
            Dilation::None => [false, false, false],
            Dilation::OutputStride16 => [false, false, true],
            Dilation::OutputStride8 => [false, true, true],
        }
    }
}

/// A bias-free convolution (parameter `weight`, (out, in, k, k) as torchvision), run through
/// [`conv2d`]: the im2col + GEMM fast path on the CPU, candle's convolution elsewhere.
#[derive(Clone, Debug)]
struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.stride, self.padding, self.dilation)
    }

    /// `bn(self(x))`, then a ReLU when `relu`. In evaluation mode without gradients the
    /// BatchNorm is applied by the convolution itself as it writes its output (inference;
    /// [`super::no_grad`]).
    fn forward_bn(&self, x: &Tensor, bn: &BatchNorm, train: bool, relu: bool) -> Result<Tensor> {
        if !train && !grad_enabled() {
            let (scale, shift) = bn.eval_scale_shift()?;
            return conv2d_channel_affine(
                x,
                &self.weight,
                self.stride,
                self.padding,
                self.dilation,
                &scale,
                &shift,
                None,
                relu,
            );
        }
        let y = self.forward(x)?;
        if relu {
            bn.forward_relu_t(&y, train)
        } else {
            bn.forward_t(&y, train)
        }
    }
}

/// A bias-free convolution initialised as torchvision does
/// (kaiming normal, mode fan_out, ReLU gain) when the var builder creates it.
fn conv(
    vb: VarBuilder,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Conv2d> {
    let fan_out = (c_out * k * k) as f64;
    let init = Init::Randn { mean: 0.0, stdev: (2.0 / fan_out).sqrt() };
    let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", init)?;
    Ok(Conv2d { weight, stride, padding, dilation })
}

/// torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
pub(crate) fn linear(vb: VarBuilder, c_in: usize, c_out: usize, bias: bool) -> Result<Linear> {
    let bound = 1.0 / (c_in as f64).sqrt();
    let init = Init::Uniform { lo: -bound, up: bound };
    let w = vb.get_with_hints((c_out, c_in), "weight", init)?;
    let b = if bias { Some(vb.get_with_hints(c_out, "bias", init)?) } else { None };
    Ok(Linear::new(w, b))
}

#[derive(Clone, Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

/// One residual block (BasicBlock when `conv3` is None, Bottleneck otherwise).
#[derive(Clone, Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Option<(Conv2d, BatchNorm)>,
    downsample: Option<Downsample>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        bottleneck: bool,
        inplanes: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        needs_downsample: bool,
    ) -> Result<Self> {
        let expansion = if bottleneck { 4 } else { 1 };
        let downsample = if needs_downsample {
            Some(Downsample {
                conv: conv(vb.pp("downsample.0"), inplanes, planes * expansion, 1, stride, 0, 1)?,
                bn: BatchNorm::new(planes * expansion, vb.pp("downsample.1"))?,
            })
        } else {
            None
        };
        if bottleneck {
            Ok(Self {
                conv1: conv(vb.pp("conv1"), inplanes, planes, 1, 1, 0, 1)?,
                bn1: BatchNorm::new(planes, vb.pp("bn1"))?,
                conv2: conv(vb.pp("conv2"), planes, planes, 3, stride, dilation, dilation)?,
                bn2: BatchNorm::new(planes, vb.pp("bn2"))?,
                conv3: Some((
                    conv(vb.pp("conv3"), planes, planes * 4, 1, 1, 0, 1)?,
                    BatchNorm::new(planes * 4, vb.pp("bn3"))?,
                )),
                downsample,
            })
        } else {
            Ok(Self {
                conv1: conv(vb.pp("conv1"), inplanes, planes, 3, stride, 1, 1)?,
                bn1: BatchNorm::new(planes, vb.pp("bn1"))?,
                conv2: conv(vb.pp("conv2"), planes, planes, 3, 1, 1, 1)?,
                bn2: BatchNorm::new(planes, vb.pp("bn2"))?,
                conv3: None,
                downsample,
            })
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv1.forward_bn(x, &self.bn1, train, true)?;
        let (last, last_bn, y) = match &self.conv3 {
            Some((c3, b3)) => (c3, b3, self.conv2.forward_bn(&y, &self.bn2, train, true)?),
            None => (&self.conv2, &self.bn2, y),
        };
        let identity = match &self.downsample {
            Some(d) => d.conv.forward_bn(x, &d.bn, train, false)?,
            None => x.clone(),
        };
        if !train && !grad_enabled() {
            // Inference: the last convolution applies its BatchNorm and the closing add + ReLU
            // as it writes its output.
            let (scale, shift) = last_bn.eval_scale_shift()?;
            let (w, stride, pad, dil) = (&last.weight, last.stride, last.padding, last.dilation);
            return conv2d_channel_affine(&y, w, stride, pad, dil, &scale, &shift, Some(&identity), true);
        }
        add_relu(&last.forward_bn(&y, last_bn, train, false)?, &identity)
    }
}

/// A torchvision ResNet.
#[derive(Clone, Debug)]
pub struct ResNet {
    arch: Arch,
    dilation: Dilation,
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<Block>>,
    fc: Option<Linear>,
}

impl ResNet {
    /// Builds the network under `vb` with torchvision's names. `num_classes: None` builds the
    /// feature extractor without `fc` (512-d or 2048-d output); `Some(n)` adds `fc` (n outputs).
    pub fn new(arch: Arch, vb: VarBuilder, num_classes: Option<usize>, dilation: Dilation) -> Result<Self> {
        let Some(blocks_per_layer) = arch.resnet_layers() else {
            return Err(NnError::InvalidInput(format!("{arch} is not a ResNet")));
        };
        let replace = dilation.replace_stride_with_dilation();
        if !arch.bottleneck() && replace.iter().any(|&r| r) {
            return Err(NnError::DilationUnsupported {
                arch: arch.name().to_string(),
                output_stride: dilation.output_stride(),
            });
        }
        let conv1 = conv(vb.pp("conv1"), 3, 64, 7, 2, 3, 1)?;
        let bn1 = BatchNorm::new(64, vb.pp("bn1"))?;
        let expansion = if arch.bottleneck() { 4 } else { 1 };
        let mut inplanes = 64;
        let mut cur_dilation = 1;
        let mut layers = Vec::with_capacity(4);
        for (i, &blocks) in blocks_per_layer.iter().enumerate() {
            let planes = 64 << i;
            let mut stride = if i == 0 { 1 } else { 2 };
            // Mirrors torchvision's _make_layer: the first block keeps the previous dilation.
            let previous_dilation = cur_dilation;
            if i > 0 && replace[i - 1] {
                cur_dilation *= stride;
                stride = 1;
            }
            let lvb = vb.pp(format!("layer{}", i + 1));
            let mut layer = Vec::with_capacity(blocks);
            let needs_downsample = stride != 1 || inplanes != planes * expansion;
            layer.push(Block::new(
                lvb.pp("0"),
                arch.bottleneck(),
                inplanes,
                planes,
                stride,
                previous_dilation,
                needs_downsample,
            )?);
            inplanes = planes * expansion;
            for b in 1..blocks {
                layer.push(Block::new(
                    lvb.pp(b.to_string()),
                    arch.bottleneck(),
                    inplanes,
                    planes,
                    1,
                    cur_dilation,
                    false,
                )?);
            }
            layers.push(layer);
        }
        let fc = match num_classes {
            Some(n) => Some(linear(vb.pp("fc"), arch.feature_dim(), n, true)?),
            None => None,
        };
        Ok(Self { arch, dilation, conv1, bn1, layers, fc })
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn dilation(&self) -> Dilation {
        self.dilation
    }

    /// Width of `features_t`'s output.
    pub fn feature_dim(&self) -> usize {
        self.arch.feature_dim()
    }

    /// The last feature map (N, feature_dim, H/os, W/os), before global pooling (for Grad-CAM
    /// and dense heads). Input: (N, 3, H, W).
    pub fn feature_map_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run_stages(self.stem_t(x, train)?, &self.layers, train)
    }

    /// The outputs of `layer1` … `layer4` from one forward pass (Grad-CAM on an earlier stage, where the last
    /// map is too small to locate anything: 1×1 for a 32 px input).
    pub fn stage_maps_t(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut y = self.stem_t(x, train)?;
        let mut maps = Vec::with_capacity(self.layers.len());
        for stage in self.layers.chunks(1) {
            y = self.run_stages(y, stage, train)?;
            maps.push(y.clone());
        }
        Ok(maps)
    }

    /// The last feature map from the output of `layer{stage}` (1-based): runs the stages after it.
    pub fn last_map_from_t(&self, a: &Tensor, stage: usize, train: bool) -> Result<Tensor> {
        if stage == 0 || stage > self.layers.len() {
            return Err(NnError::InvalidInput(format!("a ResNet has stages layer1..layer4, not {stage}")));
        }
        self.run_stages(a.clone(), &self.layers[stage..], train)
    }

    /// conv1, bn1, ReLU and the max-pool: what every stage map starts from.
    fn stem_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != 3 {
            return Err(NnError::InvalidInput(format!(
                "ResNet expects an (N, 3, H, W) image batch, got {:?}",
                x.dims()
            )));
        }
        max_pool2d_padded(&self.conv1.forward_bn(x, &self.bn1, train, true)?, 3, 2, 1)
    }

    /// `y` through every block of `stages`, in order (each intermediate dropped as soon as the next exists).
    fn run_stages(&self, mut y: Tensor, stages: &[Vec<Block>], train: bool) -> Result<Tensor> {
        for block in stages.iter().flatten() {
            y = block.forward_t(&y, train)?;
        }
        Ok(y)
    }

    /// Globally average-pooled features (N, feature_dim): torchvision's output before `fc`.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let map = self.feature_map_t(x, train)?;
        Ok(map.mean((2, 3))?)
    }

    /// Logits (N, num_classes) when the model has `fc`, else the pooled features.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.features_t(x, train)?;
        match &self.fc {
            Some(fc) => super::precision::linear(fc, &f),
            None => Ok(f),
        }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ResNet::forward_t(self, x, train).map_err(into_candle)
    }
}
