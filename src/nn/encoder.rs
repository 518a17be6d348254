//! The encoders a stage can train, by name (`arch = "resnet50"`, `"efficientnet_b2"`), and
//! [`Encoder`], the one type the training, inference and benchmark code holds: a torchvision ResNet
//! or an `efficientnet_pytorch` EfficientNet-b2, each with its own parameter names.

use std::str::FromStr;

use candle_core::Tensor;
use candle_nn::{ModuleT, VarBuilder};

use super::batchnorm::into_candle;
use super::efficientnet::{EfficientNet, B2};
use super::error::{NnError, Result};
use super::resnet::{Dilation, ResNet};

/// The supported encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    /// `efficientnet_pytorch`'s efficientnet-b2 (the paper's Eff-net b2 rows).
    EfficientNetB2,
}

impl Arch {
    pub const ALL: [Arch; 6] =
        [Arch::ResNet18, Arch::ResNet34, Arch::ResNet50, Arch::ResNet101, Arch::ResNet152, Arch::EfficientNetB2];

    /// The name experiment files and `--arch` use: torchvision's (`"resnet50"`, `"efficientnet_b2"`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNet101 => "resnet101",
            Arch::ResNet152 => "resnet152",
            Arch::EfficientNetB2 => "efficientnet_b2",
        }
    }

    /// Blocks per stage (layer1..layer4) of a ResNet; None for an EfficientNet.
    pub fn resnet_layers(self) -> Option<[usize; 4]> {
        match self {
            Arch::ResNet18 => Some([2, 2, 2, 2]),
            Arch::ResNet34 | Arch::ResNet50 => Some([3, 4, 6, 3]),
            Arch::ResNet101 => Some([3, 4, 23, 3]),
            Arch::ResNet152 => Some([3, 8, 36, 3]),
            Arch::EfficientNetB2 => None,
        }
    }

    /// Bottleneck blocks (expansion 4) rather than basic blocks (expansion 1): ResNet-50 and deeper.
    pub fn bottleneck(self) -> bool {
        matches!(self, Arch::ResNet50 | Arch::ResNet101 | Arch::ResNet152)
    }

    /// Width of the pooled feature vector: 512 (basic), 2048 (bottleneck), 1408 (EfficientNet-b2).
    pub fn feature_dim(self) -> usize {
        match self {
            Arch::EfficientNetB2 => 1408,
            a if a.bottleneck() => 2048,
            _ => 512,
        }
    }

    /// The classifier's name in the reference implementation's state dict: torchvision's `fc`,
    /// `efficientnet_pytorch`'s `_fc`. A fine-tuned model saves its head under it.
    pub fn classifier(self) -> &'static str {
        match self {
            Arch::EfficientNetB2 => "_fc",
            _ => "fc",
        }
    }

    pub fn is_resnet(self) -> bool {
        self.resnet_layers().is_some()
    }
}

impl FromStr for Arch {
    type Err = NnError;
    fn from_str(s: &str) -> Result<Self> {
        let norm = |n: &str| n.trim().to_ascii_lowercase().replace(['-', '_'], "");
        let wanted = norm(s);
        Arch::ALL
            .into_iter()
            .find(|a| norm(a.name()) == wanted)
            .ok_or_else(|| NnError::UnknownArch { name: s.to_string() })
    }
}

/// By name (`"resnet50"`), as experiment files and configs write it.
impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A ResNet or an EfficientNet behind one interface.
#[derive(Clone, Debug)]
pub enum Encoder {
    ResNet(ResNet),
    EfficientNet(EfficientNet),
}

impl Encoder {
    /// Builds `arch` under `vb` with its reference implementation's names. `num_classes: None`
    /// builds the feature extractor; `Some(n)` adds the classifier (`fc` / `_fc`). Dilation
    /// (output stride 8 or 16) exists for the bottleneck ResNets only.
    pub fn new(arch: Arch, vb: VarBuilder, num_classes: Option<usize>, dilation: Dilation) -> Result<Self> {
        match arch {
            Arch::EfficientNetB2 => {
                if dilation != Dilation::None {
                    return Err(NnError::DilationUnsupported {
                        arch: arch.name().to_string(),
                        output_stride: dilation.output_stride(),
                    });
                }
                Ok(Encoder::EfficientNet(EfficientNet::new(B2, vb, num_classes)?))
            }
            _ => Ok(Encoder::ResNet(ResNet::new(arch, vb, num_classes, dilation)?)),
        }
    }

    pub fn arch(&self) -> Arch {
        match self {
            Encoder::ResNet(r) => r.arch(),
            Encoder::EfficientNet(_) => Arch::EfficientNetB2,
        }
    }

    pub fn dilation(&self) -> Dilation {
        match self {
            Encoder::ResNet(r) => r.dilation(),
            Encoder::EfficientNet(_) => Dilation::None,
        }
    }

    /// Width of `features_t`'s output.
    pub fn feature_dim(&self) -> usize {
        match self {
            Encoder::ResNet(r) => r.feature_dim(),
            Encoder::EfficientNet(e) => e.feature_dim(),
        }
    }

    /// The last feature map before global pooling (Grad-CAM's layer): a ResNet's layer4 output, an
    /// EfficientNet's head activations (`extract_features`).
    pub fn feature_map_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Encoder::ResNet(r) => r.feature_map_t(x, train),
            Encoder::EfficientNet(e) => e.feature_map_t(x, train),
        }
    }

    /// The layers Grad-CAM can look at, shallow to deep, by their reference module names: a ResNet's
    /// `layer1`…`layer4`; an EfficientNet's `head` (after `_conv_head`, `_bn1` and swish).
    pub fn cam_layers(&self) -> &'static [&'static str] {
        match self {
            Encoder::ResNet(_) => &["layer1", "layer2", "layer3", "layer4"],
            Encoder::EfficientNet(_) => &["head"],
        }
    }

    /// The outputs of every `cam_layers` entry from one forward pass, in that order.
    pub fn cam_layer_maps_t(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        match self {
            Encoder::ResNet(r) => r.stage_maps_t(x, train),
            Encoder::EfficientNet(e) => Ok(vec![e.feature_map_t(x, train)?]),
        }
    }

    /// The last feature map (what `feature_map_t` returns) from the output `a` of `cam_layers()[index]`.
    pub fn last_map_from_t(&self, a: &Tensor, index: usize, train: bool) -> Result<Tensor> {
        match self {
            Encoder::ResNet(r) => r.last_map_from_t(a, index + 1, train),
            Encoder::EfficientNet(_) if index == 0 => Ok(a.clone()),
            Encoder::EfficientNet(_) => Err(NnError::InvalidInput(format!("EfficientNet has no CAM layer {index}"))),
        }
    }

    /// Globally average-pooled features (N, feature_dim).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Encoder::ResNet(r) => r.features_t(x, train),
            Encoder::EfficientNet(e) => e.features_t(x, train),
        }
    }

    /// Dropout probability the encoder applies to its pooled features before any classifier in training:
    /// efficientnet_pytorch's `_dropout` (0.3 for b2), which stays in front of a replaced `_fc`; none in
    /// torchvision's ResNet.
    pub fn classifier_dropout(&self) -> f32 {
        match self {
            Encoder::ResNet(_) => 0.0,
            Encoder::EfficientNet(e) => e.variant().dropout as f32,
        }
    }

    /// Logits when built with a classifier, else the pooled features.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Encoder::ResNet(r) => r.forward_t(x, train),
            Encoder::EfficientNet(e) => e.forward_t(x, train),
        }
    }
}

impl ModuleT for Encoder {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Encoder::forward_t(self, x, train).map_err(into_candle)
    }
}
