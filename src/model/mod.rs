//! The ResNet family as one parameterised definition (after timm's `resnet.py` and GluonCV's
//! `resnetv1b.py`): depth picks the block and stage sizes, `variant` picks the paper's tweaks.

mod airbench;
pub mod norm;
mod resnet;

pub use airbench::{Airbench, WHITEN_BIAS, WHITEN_IMAGES};
pub use resnet::ResNet;

use crate::config::ModelConfig;
use anyhow::{bail, Result};

/// Residual block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets).
    Basic,
    /// 1x1 → 3x3 → 1x1 with expansion 4 (ResNet-50 and deeper).
    Bottleneck,
}

impl Block {
    pub fn expansion(self) -> i64 {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// The paper's Figure 2 tweaks. Each is a flag so that a variant is a combination, not a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tweaks {
    /// ResNet-B: the stride-2 of a downsampling bottleneck sits on the 3x3 conv, not the first 1x1
    /// (which would skip three quarters of the input).
    pub stride_on_3x3: bool,
    /// ResNet-C: the 7x7 stem conv becomes three 3x3 convs (widths w/2, w/2, w).
    pub deep_stem: bool,
    /// ResNet-D: the shortcut downsamples with a 2x2 average pool before a stride-1 1x1 conv.
    pub avg_down: bool,
}

impl Tweaks {
    pub fn from_variant(variant: &str) -> Result<Tweaks> {
        let (b, c, d) = match variant {
            "a" => (false, false, false),
            "b" => (true, false, false),
            "c" => (true, true, false),
            "d" => (true, true, true),
            other => bail!("key `model.variant`: unknown variant {other:?}; expected \"a\", \"b\", \"c\" or \"d\""),
        };
        Ok(Tweaks {
            stride_on_3x3: b,
            deep_stem: c,
            avg_down: d,
        })
    }
}

/// Which stem and stage layout a model uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// ImageNet ResNet: stem to 1/4 resolution, four stages of 64/128/256/512 base widths. With
    /// `full_res_stem` (`model.cifar_stem`) the stem keeps full resolution: a 3x3 stride-1 conv
    /// and no max-pool, for 32-px images.
    ImageNet {
        layers: [usize; 4],
        full_res_stem: bool,
    },
    /// CIFAR ResNet (He et al. 2016, depth 6n+2): 3x3 stem, three stages of 16/32/64.
    Cifar { blocks_per_stage: usize },
}

/// Everything needed to build a model; derived from `[model]` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub layout: Layout,
    pub block: Block,
    pub tweaks: Tweaks,
    pub zero_gamma: bool,
}

impl ModelSpec {
    pub fn from_config(cfg: &ModelConfig) -> Result<ModelSpec> {
        let tweaks = Tweaks::from_variant(&cfg.variant)?;
        let imagenet = |layers| Layout::ImageNet {
            layers,
            full_res_stem: cfg.cifar_stem,
        };
        let (layout, block) = match cfg.name.as_str() {
            "resnet18" => (imagenet([2, 2, 2, 2]), Block::Basic),
            "resnet34" => (imagenet([3, 4, 6, 3]), Block::Basic),
            "resnet50" => (imagenet([3, 4, 6, 3]), Block::Bottleneck),
            "resnet101" => (imagenet([3, 4, 23, 3]), Block::Bottleneck),
            "resnet152" => (imagenet([3, 8, 36, 3]), Block::Bottleneck),
            name => match name.strip_prefix("cifar_resnet").and_then(|d| d.parse::<usize>().ok()) {
                Some(depth) if depth >= 8 && (depth - 2) % 6 == 0 => (
                    Layout::Cifar {
                        blocks_per_stage: (depth - 2) / 6,
                    },
                    Block::Basic,
                ),
                Some(depth) => bail!(
                    "key `model.name`: CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}"
                ),
                None => bail!(
                    "key `model.name`: unknown model {name:?}; expected resnet18/34/50/101/152 or cifar_resnet<6n+2> (e.g. cifar_resnet20)"
                ),
            },
        };
        if cfg.cifar_stem && matches!(layout, Layout::Cifar { .. }) {
            bail!(
                "key `model.cifar_stem`: only for the ImageNet ResNets (resnet18..152); {} has a full-resolution stem already",
                cfg.name
            );
        }
        Ok(ModelSpec {
            name: cfg.name.clone(),
            layout,
            block,
            tweaks,
            zero_gamma: cfg.zero_gamma,
        })
    }

    /// The stem's total stride: 4 for an ImageNet stem (stride-2 conv, stride-2 max-pool), 1 for
    /// the CIFAR ResNets and `model.cifar_stem`.
    pub fn stem_stride(&self) -> i64 {
        match self.layout {
            Layout::ImageNet {
                full_res_stem: false,
                ..
            } => 4,
            _ => 1,
        }
    }
}

/// The name of airbench94's network in `model.name`.
pub const AIRBENCH94: &str = "airbench94";

/// Any classifier this project trains: a ResNet, or airbench94's network.
#[derive(Debug)]
pub enum Classifier {
    ResNet(ResNet),
    Airbench(Airbench),
}

impl Classifier {
    /// The model `[model]` describes, with `num_classes` outputs.
    pub fn new(p: &tch::nn::Path, cfg: &ModelConfig, num_classes: i64) -> Result<Classifier> {
        Self::check_config(cfg)?;
        Ok(if cfg.name == AIRBENCH94 {
            Classifier::Airbench(Airbench::new(p, num_classes))
        } else {
            Classifier::ResNet(ResNet::new(p, &ModelSpec::from_config(cfg)?, num_classes))
        })
    }

    /// Checks `[model]` without building anything.
    pub fn check_config(cfg: &ModelConfig) -> Result<()> {
        if cfg.name == AIRBENCH94 {
            check_airbench_config(cfg)
        } else if cfg.whiten_bias_epochs != 0 {
            bail!("key `model.whiten_bias_epochs`: {} has no whitening layer (only {AIRBENCH94} does)", cfg.name)
        } else {
            ModelSpec::from_config(cfg).map(|_| ())
        }
    }

    /// The input of the classifier head (the last feature map of a ResNet, the pooled vector of
    /// airbench94's network).
    pub fn features(&self, x: &tch::Tensor, train: bool) -> tch::Tensor {
        match self {
            Classifier::ResNet(m) => m.features(x, train),
            Classifier::Airbench(m) => m.features(x, train),
        }
    }

    pub fn classify(&self, features: &tch::Tensor) -> tch::Tensor {
        match self {
            Classifier::ResNet(m) => m.classify(features),
            Classifier::Airbench(m) => m.classify(features),
        }
    }
}

impl tch::nn::ModuleT for Classifier {
    fn forward_t(&self, x: &tch::Tensor, train: bool) -> tch::Tensor {
        self.classify(&self.features(x, train))
    }
}

fn check_airbench_config(cfg: &ModelConfig) -> Result<()> {
    if cfg.variant != "a" || cfg.zero_gamma || cfg.cifar_stem {
        bail!("keys `model.variant`, `model.zero_gamma` and `model.cifar_stem` are ResNet options; {AIRBENCH94} takes none of them (leave them at \"a\", false, false)");
    }
    Ok(())
}

/// Rebuilds the model a checkpoint was trained as (from its embedded config) and loads its
/// weights. Returns the model, its variables, the config and the class names.
pub fn load_model(
    path: &std::path::Path,
    device: tch::Device,
) -> Result<(
    Classifier,
    tch::nn::VarStore,
    crate::config::Config,
    Vec<String>,
)> {
    let ckpt = crate::checkpoint::load(path)?;
    let cfg = match &ckpt.config {
        Some(c) => c.clone(),
        None => bail!(
            "{}: no embedded config, so the architecture is unknown (tricks checkpoints carry one; for converted timm/torchvision weights use `tricks finetune`)",
            path.display()
        ),
    };
    // The class count from the class list (or the bias), not from `fc.weight` alone: a wrong
    // `fc.weight` must be reported as itself, not as a `fc.bias` that no longer fits.
    let num_classes = if !ckpt.classes.is_empty() {
        ckpt.classes.len() as i64
    } else {
        match (ckpt.tensors.get("fc.bias"), ckpt.tensors.get("fc.weight")) {
            (Some(b), _) if b.dim() == 1 => b.size()[0],
            (_, Some(w)) if w.dim() >= 1 => w.size()[0],
            _ => bail!("{}: no `fc.weight` tensor", path.display()),
        }
    };
    let vs = tch::nn::VarStore::new(device);
    let model = Classifier::new(&vs.root(), &cfg.model, num_classes)?;
    crate::checkpoint::copy_into(&vs, &ckpt.tensors, path, None)?;
    Ok((model, vs, cfg, ckpt.classes))
}
