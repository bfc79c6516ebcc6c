//! The backbone with a feature pyramid (torchvision's `BackboneWithFPN` as
//! `_resnet_fpn_extractor` builds it): `body` is a ResNet of this project's family without its
//! classifier, whose four stages feed `fpn`, a `FeaturePyramidNetwork` with 256 channels and
//! `LastLevelMaxPool` (P6).

use crate::model::{Layout, ModelSpec, ResNet};
use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::Tensor;

/// Channels of every pyramid level (torchvision's `out_channels`).
pub const FPN_CHANNELS: i64 = 256;

/// The names of the pyramid's levels, highest resolution first, as torchvision's `OrderedDict`:
/// `'0'`…`'3'` from `layer1`…`layer4`, `'pool'` from [`LastLevelMaxPool`].
pub const FEATURE_NAMES: [&str; 5] = ["0", "1", "2", "3", "pool"];

/// A conv with bias, `kaiming_uniform_(a=1)` weights (U(±√(3/fan_in))) and zero bias, as
/// torchvision's `FeaturePyramidNetwork` initialises its convs; named `<p>.0` because each is the
/// first module of a `Conv2dNormActivation`.
fn fpn_conv(p: &nn::Path, cin: i64, cout: i64, k: i64) -> nn::Conv2D {
    let bound = (3.0 / (cin * k * k) as f64).sqrt();
    let cfg = nn::ConvConfig {
        padding: k / 2,
        ws_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::conv2d(p / "0", cin, cout, k, cfg)
}

/// torchvision's `FeaturePyramidNetwork` (no norm layer) with `LastLevelMaxPool`.
#[derive(Debug)]
pub struct FeaturePyramidNetwork {
    /// 1x1 lateral convs (`inner_blocks.i.0`), one per input level.
    inner_blocks: Vec<nn::Conv2D>,
    /// 3x3 output convs (`layer_blocks.i.0`).
    layer_blocks: Vec<nn::Conv2D>,
}

impl FeaturePyramidNetwork {
    pub fn new(p: &nn::Path, in_channels_list: &[i64], out_channels: i64) -> Self {
        let inner_blocks = in_channels_list
            .iter()
            .enumerate()
            .map(|(i, &c)| fpn_conv(&(p / "inner_blocks" / i), c, out_channels, 1))
            .collect();
        let layer_blocks = (0..in_channels_list.len())
            .map(|i| fpn_conv(&(p / "layer_blocks" / i), out_channels, out_channels, 3))
            .collect();
        FeaturePyramidNetwork {
            inner_blocks,
            layer_blocks,
        }
    }

    /// The pyramid of `x` (the body's stage outputs, highest resolution first): top-down, each
    /// level is its lateral conv plus the coarser level upsampled (nearest) to its size, then a
    /// 3x3 conv; the last entry is [`LastLevelMaxPool`] of the coarsest.
    pub fn forward(&self, x: &[Tensor]) -> Vec<Tensor> {
        let last = x.len() - 1;
        let mut last_inner = x[last].apply(&self.inner_blocks[last]);
        let mut results = vec![last_inner.apply(&self.layer_blocks[last])];
        for idx in (0..last).rev() {
            let inner_lateral = x[idx].apply(&self.inner_blocks[idx]);
            let size = inner_lateral.size();
            let inner_top_down = last_inner.upsample_nearest2d([size[2], size[3]], None, None);
            last_inner = inner_lateral + inner_top_down;
            results.insert(0, last_inner.apply(&self.layer_blocks[idx]));
        }
        let pool = LastLevelMaxPool.forward(&results[last]);
        results.push(pool);
        results
    }
}

/// torchvision's `LastLevelMaxPool`: P6 = `max_pool2d(P5, kernel_size=1, stride=2)`, a
/// subsampling.
#[derive(Debug, Clone, Copy)]
pub struct LastLevelMaxPool;

impl Module for LastLevelMaxPool {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false)
    }
}

/// `backbone.body` (a ResNet without `fc`) and `backbone.fpn`.
#[derive(Debug)]
pub struct BackboneWithFpn {
    pub body: ResNet,
    pub fpn: FeaturePyramidNetwork,
}

impl BackboneWithFpn {
    /// The backbone of `spec` under `p` (`p / "body"`, `p / "fpn"`). Only the ImageNet layout
    /// with its stride-4 stem: the anchor sizes and the RoI pooler's levels assume stages at
    /// strides 4, 8, 16 and 32.
    pub fn new(p: &nn::Path, spec: &ModelSpec) -> Result<Self> {
        match spec.layout {
            Layout::Cifar { .. } => bail!(
                "detection needs an ImageNet ResNet backbone (resnet18..152, or its ResNeXt or SE form); {} is a CIFAR ResNet (stages at strides 1, 2 and 4, three of them)",
                spec.name
            ),
            Layout::ImageNet {
                full_res_stem: true,
                ..
            } => bail!(
                "detection needs the ImageNet stem (stride 4); `model.cifar_stem` keeps full resolution, which the anchors and RoI pooler levels do not fit"
            ),
            Layout::ImageNet { .. } => {}
        }
        let body = ResNet::backbone(&(p / "body"), spec, 32);
        let expansion = spec.block.expansion();
        let in_channels_list: Vec<i64> =
            [64, 128, 256, 512].iter().map(|w| w * expansion).collect();
        let fpn = FeaturePyramidNetwork::new(&(p / "fpn"), &in_channels_list, FPN_CHANNELS);
        Ok(BackboneWithFpn { body, fpn })
    }

    /// The pyramid levels of [`FEATURE_NAMES`] for a batch. `train_bn`: batch norm in training
    /// mode (off for torchvision's frozen batch norm and in evaluation).
    pub fn forward(&self, images: &Tensor, train_bn: bool) -> Vec<Tensor> {
        self.fpn
            .forward(&self.body.stage_features(images, train_bn))
    }
}

/// The name prefixes (relative to `backbone.body.`) whose parameters train with
/// `trainable_layers` of 0…5, as torchvision's `_resnet_fpn_extractor`: the last stages first,
/// then the stem's conv, then (5 only) its batch norm.
pub fn layers_to_train(trainable_layers: usize) -> Vec<&'static str> {
    let mut layers: Vec<&str> = ["layer4", "layer3", "layer2", "layer1", "conv1"]
        .into_iter()
        .take(trainable_layers)
        .collect();
    if trainable_layers >= 5 {
        layers.push("bn1");
    }
    layers
}
