//! FCN (Long et al. 2015) as GluonCV and torchvision build it: a dilated ResNet backbone (output
//! stride 8), then on its last feature map a 3x3 conv (C → C/4, no bias) + BN + ReLU + dropout
//! + 1x1 conv to the classes, upsampled bilinearly (align_corners = false) to the input size.
//!
//! Names: backbone tensors are exactly the classification network's (`conv1`, `bn1`, `layer1.0.*`,
//! no `fc`), the head's are `head.0` (3x3 conv), `head.1` (BN) and `head.4` (1x1 conv, with bias),
//! the indices of torchvision's `FCNHead` Sequential. A classification checkpoint therefore
//! initialises the backbone by name ([`load_backbone`]).

use crate::checkpoint;
use crate::config::Config;
use crate::model::norm::{batch_norm2d, BatchNorm2d};
use crate::model::{ModelSpec, ResNet};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Prefix of the head's variables.
pub const HEAD_PREFIX: &str = "head.";

/// The FCN head.
#[derive(Debug)]
pub struct FcnHead {
    conv: nn::Conv2D,
    bn: BatchNorm2d,
    classifier: nn::Conv2D,
    dropout: f64,
}

impl FcnHead {
    pub fn new(p: &nn::Path, in_channels: i64, num_classes: i64, dropout: f64) -> FcnHead {
        let inter = (in_channels / 4).max(1);
        let conv = nn::conv2d(
            p / "0",
            in_channels,
            inter,
            3,
            nn::ConvConfig {
                padding: 1,
                bias: false,
                ..Default::default()
            },
        );
        // The model's own batch norm: γ starts at 1 as in torchvision (tch's default draws it
        // from U(0, 1)), and on a CPU it runs the fused batch norm + ReLU kernel.
        let bn = batch_norm2d(p / "1", inter, 1.0);
        let classifier = nn::conv2d(p / "4", inter, num_classes, 1, Default::default());
        FcnHead {
            conv,
            bn,
            classifier,
            dropout,
        }
    }
}

impl ModuleT for FcnHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn
            .forward_relu(&x.apply(&self.conv), train)
            .dropout(self.dropout, train)
            .apply(&self.classifier)
    }
}

/// Backbone + FCN head; `forward_t` maps `[B,3,H,W]` to logits `[B,K,H,W]`.
#[derive(Debug)]
pub struct SegModel {
    pub backbone: ResNet,
    pub head: FcnHead,
    pub num_classes: i64,
}

impl SegModel {
    /// Builds the model of `[model]` (the backbone) and `[segment]` under `root`.
    pub fn new(root: &nn::Path, cfg: &Config) -> Result<SegModel> {
        let spec = ModelSpec::from_config(&cfg.model)?;
        Ok(Self::from_spec(
            root,
            &spec,
            cfg.segment.num_classes,
            cfg.segment.output_stride,
            cfg.segment.dropout,
        ))
    }

    pub fn from_spec(
        root: &nn::Path,
        spec: &ModelSpec,
        num_classes: i64,
        output_stride: i64,
        dropout: f64,
    ) -> SegModel {
        let backbone = ResNet::backbone(root, spec, output_stride);
        let head = FcnHead::new(
            &(root / "head"),
            backbone.num_features(),
            num_classes,
            dropout,
        );
        SegModel {
            backbone,
            head,
            num_classes,
        }
    }
}

impl ModuleT for SegModel {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        let y = self
            .head
            .forward_t(&self.backbone.features(x, train), train);
        y.upsample_bilinear2d([h, w], false, None, None)
    }
}

/// Initialises the backbone from `segment.backbone` (a classification checkpoint of this project,
/// or a segmentation one): every backbone tensor must be there with its shape (a mismatch names
/// the tensor and both shapes); the checkpoint's `fc.` and `head.` tensors are skipped and the
/// head keeps its initialisation. A no-op when the key is "".
pub fn load_backbone(vs: &nn::VarStore, cfg: &Config) -> Result<()> {
    if cfg.segment.backbone.is_empty() {
        return Ok(());
    }
    let path = Path::new(&cfg.segment.backbone);
    let ckpt = checkpoint::load(path).context("key `segment.backbone`")?;
    if let Some(c) = &ckpt.config {
        if c.model.name != cfg.model.name || c.model.variant != cfg.model.variant {
            bail!(
                "key `segment.backbone`: {} is a {} variant {} but the config's backbone is {} variant {} (set `model.name` / `model.variant` to match)",
                path.display(),
                c.model.name,
                c.model.variant,
                cfg.model.name,
                cfg.model.variant
            );
        }
    }
    let tensors: BTreeMap<String, Tensor> = ckpt
        .model_tensors()
        .filter(|(k, _)| !k.starts_with("fc.") && !k.starts_with(HEAD_PREFIX))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    checkpoint::copy_into(vs, &tensors, path, Some(HEAD_PREFIX)).context("key `segment.backbone`")
}
