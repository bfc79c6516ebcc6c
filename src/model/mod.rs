//! The ResNet family as one parameterised definition (after timm's `resnet.py` and GluonCV's
//! `resnetv1b.py`): depth picks the block and stage sizes, `variant` picks the paper's tweaks.

mod airbench;
pub mod norm;
mod resnet;

pub use airbench::{Airbench, WHITEN_BIAS, WHITEN_IMAGES};
pub use resnet::ResNet;

use crate::config::ModelConfig;
use anyhow::{bail, Result};
use tch::Tensor;

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
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub layout: Layout,
    pub block: Block,
    pub tweaks: Tweaks,
    pub zero_gamma: bool,
    /// ResNeXt (timm's `cardinality`): groups of the bottleneck's 3x3 conv; 1 for a ResNet.
    pub cardinality: i64,
    /// ResNeXt (timm's `base_width`): channels per group of the bottleneck's 3x3 conv at the
    /// first stage; the bottleneck is `floor(planes * base_width / 64) * cardinality` wide. 64
    /// for a ResNet (width = planes).
    pub base_width: i64,
    /// Squeeze-and-excitation (timm's `attn_layer='se'`): every block scales the channels of its
    /// last BN's output by a gate from their global average before the residual addition.
    pub se: bool,
    /// Stochastic depth at the last block (`model.drop_path`; see [`StepDraws`]).
    pub drop_path: f64,
    /// Dropout before the classifier (`model.drop_rate`).
    pub drop_rate: f64,
}

/// Where the random draws of stochastic depth and dropout come from: a seed that the training
/// step sets before each forward pass ([`StepDraws::set`], a function of the run's seed, the step
/// and the rank), so that the masks are a function of the step (a resumed run draws them again
/// exactly) and runs sharing a process (`ablate --jobs`) share no generator. Each site (a block,
/// the classifier) draws from its own stream of that seed.
#[derive(Debug, Clone, Default)]
pub struct StepDraws(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl StepDraws {
    pub fn set(&self, seed: u64) {
        self.0.store(seed, std::sync::atomic::Ordering::Relaxed);
    }

    fn rng(&self, site: u64) -> rand_chacha::ChaCha8Rng {
        let seed = self.0.load(std::sync::atomic::Ordering::Relaxed);
        rand::SeedableRng::seed_from_u64(crate::seed::derive_seed(seed, "drop", site, 0))
    }

    /// `x · mask`, the mask `1/keep` with probability `keep = 1 − p` and 0 otherwise, one draw
    /// per group of `per` consecutive elements (`per` = a sample's elements: timm's `drop_path`
    /// with `scale_by_keep`; 1: dropout).
    pub fn drop(&self, x: &Tensor, p: f64, site: u64, per: i64) -> Tensor {
        use rand::Rng;
        let keep = 1.0 - p;
        let n = x.numel() as i64 / per.max(1);
        let mut rng = self.rng(site);
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if rng.gen::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let mut shape = vec![n];
        if per > 1 {
            shape.extend(std::iter::repeat_n(1, x.dim() - 1));
        } else {
            shape = x.size();
        }
        let mask = Tensor::from_slice(&mask)
            .view(shape.as_slice())
            .to_device(x.device())
            .to_kind(x.kind());
        x * mask
    }
}

/// The ImageNet depths (timm's): the block and the blocks per stage.
const IMAGENET_DEPTHS: [(usize, Block, [usize; 4]); 6] = [
    (18, Block::Basic, [2, 2, 2, 2]),
    (26, Block::Bottleneck, [2, 2, 2, 2]),
    (34, Block::Basic, [3, 4, 6, 3]),
    (50, Block::Bottleneck, [3, 4, 6, 3]),
    (101, Block::Bottleneck, [3, 4, 23, 3]),
    (152, Block::Bottleneck, [3, 8, 36, 3]),
];

/// The names `model.name` accepts besides airbench94, for error messages.
const MODEL_NAMES: &str = "resnet<D> or seresnet<D> (D = 18, 26, 34, 50, 101, 152), \
    resnext<D>_<C>x<W>d or seresnext<D>_<C>x<W>d (bottleneck depths 26, 50, 101, 152; cardinality C, \
    base width W; e.g. resnext50_32x4d, seresnext50_32x4d), or cifar_resnet<6n+2> (e.g. cifar_resnet20)";

/// An ImageNet family name as timm spells it: `resnet50`, `seresnet50`, `resnext50_32x4d`,
/// `seresnext26_32x4d`. Returns (depth, SE, cardinality, base width); `None` if the name is not
/// of that form (spelled exactly so: the name written back from the parts must be the name).
fn parse_imagenet_name(name: &str) -> Option<(usize, bool, i64, i64)> {
    let (se, rest) = match name.strip_prefix("se") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let parsed = if let Some(rest) = rest.strip_prefix("resnext") {
        let (depth, groups) = rest.split_once('_')?;
        let (c, w) = groups.strip_suffix('d')?.split_once('x')?;
        (depth.parse().ok()?, se, c.parse().ok()?, w.parse().ok()?)
    } else {
        (rest.strip_prefix("resnet")?.parse().ok()?, se, 1, 64)
    };
    (imagenet_name(parsed) == name).then_some(parsed)
}

/// The name of an ImageNet family member, as [`parse_imagenet_name`] reads it.
fn imagenet_name((depth, se, cardinality, base_width): (usize, bool, i64, i64)) -> String {
    let se = if se { "se" } else { "" };
    if (cardinality, base_width) == (1, 64) {
        format!("{se}resnet{depth}")
    } else {
        format!("{se}resnext{depth}_{cardinality}x{base_width}d")
    }
}

impl ModelSpec {
    pub fn from_config(cfg: &ModelConfig) -> Result<ModelSpec> {
        let tweaks = Tweaks::from_variant(&cfg.variant)?;
        let name = cfg.name.as_str();
        let (layout, block, se, cardinality, base_width) = if let Some((depth, se, c, w)) =
            parse_imagenet_name(name)
        {
            let Some(&(_, block, layers)) = IMAGENET_DEPTHS.iter().find(|(d, ..)| *d == depth)
            else {
                bail!("key `model.name`: unknown model {name:?} (no depth {depth}); expected {MODEL_NAMES}")
            };
            if (c, w) != (1, 64) {
                if block == Block::Basic {
                    bail!("key `model.name`: {name:?}: ResNeXt needs bottleneck blocks (depth 26, 50, 101 or 152), depth {depth} has basic blocks");
                }
                if c < 1 || w < 1 {
                    bail!("key `model.name`: {name:?}: cardinality and base width must be positive; expected {MODEL_NAMES}");
                }
            }
            let layout = Layout::ImageNet {
                layers,
                full_res_stem: cfg.cifar_stem,
            };
            (layout, block, se, c, w)
        } else {
            match name.strip_prefix("cifar_resnet").and_then(|d| d.parse::<usize>().ok()) {
                Some(depth) if depth >= 8 && (depth - 2) % 6 == 0 => (
                    Layout::Cifar {
                        blocks_per_stage: (depth - 2) / 6,
                    },
                    Block::Basic,
                    false,
                    1,
                    64,
                ),
                Some(depth) => bail!(
                    "key `model.name`: CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}"
                ),
                None => bail!("key `model.name`: unknown model {name:?}; expected {MODEL_NAMES}"),
            }
        };
        if cfg.cifar_stem && matches!(layout, Layout::Cifar { .. }) {
            bail!(
                "key `model.cifar_stem`: only for the ImageNet ResNets (resnet18..152, their ResNeXt and SE forms); {} has a full-resolution stem already",
                cfg.name
            );
        }
        Ok(ModelSpec {
            name: cfg.name.clone(),
            layout,
            block,
            tweaks,
            zero_gamma: cfg.zero_gamma,
            cardinality,
            base_width,
            se,
            drop_path: cfg.drop_path,
            drop_rate: cfg.drop_rate,
        })
    }

    /// The channels of a bottleneck's 3x3 conv in a stage of `planes` base channels (timm's
    /// `width = int(math.floor(planes * (base_width / 64)) * cardinality)`): `planes` for a
    /// ResNet, 128 at the first stage of a 32x4d ResNeXt.
    pub fn bottleneck_width(&self, planes: i64) -> i64 {
        planes * self.base_width / 64 * self.cardinality
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

    /// Seeds stochastic depth and dropout for the next training forward pass ([`StepDraws`]).
    pub fn set_draw_seed(&self, seed: u64) {
        if let Classifier::ResNet(m) = self {
            m.set_draw_seed(seed);
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
    if cfg.drop_path > 0.0 || cfg.drop_rate > 0.0 {
        bail!("keys `model.drop_path` and `model.drop_rate` are ResNet options; {AIRBENCH94} has neither");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, variant: &str) -> Result<ModelSpec> {
        ModelSpec::from_config(&ModelConfig {
            name: name.into(),
            variant: variant.into(),
            ..Default::default()
        })
    }

    #[test]
    fn resnext_and_se_names_are_timms() {
        for (name, depth_layers, block, se, cardinality, base_width) in [
            ("resnet50", [3, 4, 6, 3], Block::Bottleneck, false, 1, 64),
            ("resnet26", [2, 2, 2, 2], Block::Bottleneck, false, 1, 64),
            ("seresnet18", [2, 2, 2, 2], Block::Basic, true, 1, 64),
            ("seresnet50", [3, 4, 6, 3], Block::Bottleneck, true, 1, 64),
            (
                "resnext50_32x4d",
                [3, 4, 6, 3],
                Block::Bottleneck,
                false,
                32,
                4,
            ),
            (
                "resnext101_32x8d",
                [3, 4, 23, 3],
                Block::Bottleneck,
                false,
                32,
                8,
            ),
            (
                "seresnext50_32x4d",
                [3, 4, 6, 3],
                Block::Bottleneck,
                true,
                32,
                4,
            ),
            (
                "seresnext26_32x4d",
                [2, 2, 2, 2],
                Block::Bottleneck,
                true,
                32,
                4,
            ),
        ] {
            for variant in ["a", "b", "c", "d"] {
                let s = spec(name, variant).unwrap();
                assert_eq!(
                    s.layout,
                    Layout::ImageNet {
                        layers: depth_layers,
                        full_res_stem: false
                    },
                    "{name}"
                );
                assert_eq!(
                    (s.block, s.se, s.cardinality, s.base_width),
                    (block, se, cardinality, base_width),
                    "{name}"
                );
                assert_eq!(s.tweaks, Tweaks::from_variant(variant).unwrap());
            }
        }
        // timm's width: floor(planes * base_width / 64) * cardinality.
        let s = spec("resnext50_32x4d", "b").unwrap();
        assert_eq!(
            [64, 128, 256, 512].map(|p| s.bottleneck_width(p)),
            [128, 256, 512, 1024]
        );
        let s = spec("resnet50", "b").unwrap();
        assert_eq!([64, 512].map(|p| s.bottleneck_width(p)), [64, 512]);
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        for bad in [
            "resnext18_32x4d",
            "resnext50",
            "resnet50_32x4d",
            "resnext50_32x4",
            "resnet51",
            "seresnet",
            "resnext50_032x4d",
            "resnet+50",
            "se_resnet50",
            "resnext50_0x4d",
        ] {
            let err = spec(bad, "a").unwrap_err().to_string();
            assert!(err.contains("key `model.name`"), "{bad}: {err}");
            assert!(
                err.contains("resnext50_32x4d") || err.contains("bottleneck"),
                "{bad}: {err}"
            );
        }
        let err = spec("vgg16", "a").unwrap_err().to_string();
        assert!(
            err.contains("resnet<D>")
                && err.contains("seresnext50_32x4d")
                && err.contains("cifar_resnet"),
            "{err}"
        );
    }
}
