//! The network of airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
//! arXiv 2404.00498), the fastest published CIFAR-10 trainer, for time-to-accuracy runs beside
//! it: a 2x2 patch-whitening convolution, three conv groups (conv, 2x2 max-pool, BN, GELU, conv,
//! BN, GELU) of 64/256/256 channels, a 3x3 max-pool and a linear classifier scaled by 1/9.
//!
//! Its initialisation is part of the design, as in airbench94.py: the whitening conv's weights
//! are the eigenvectors of the training images' 2x2 patch covariance scaled by their inverse
//! square-root eigenvalues, positive and negated ([`Airbench::init_whitening`]), and are never
//! trained; every 3x3 conv starts as identity on its first `in_channels` filters (dirac); BN
//! scales stay at 1 (only the biases train), with ε = 1e-12 and running-statistics momentum 0.4.

use super::norm::{batch_norm2d_with, BatchNorm2d};
use anyhow::{bail, Result};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Channels of the three conv groups (airbench94's `widths`).
const WIDTHS: [i64; 3] = [64, 256, 256];
/// Side of the whitening conv's patches; it has 2·3·2² = 24 filters.
const WHITEN_KERNEL: i64 = 2;
/// Added to the eigenvalues before the inverse square root (airbench94's `eps`).
const WHITEN_EPS: f64 = 5e-4;
/// airbench94's BN: PyTorch momentum 1 − 0.6, ε 1e-12.
const BN_MOMENTUM: f64 = 0.4;
const BN_EPS: f64 = 1e-12;
/// The logits' scale (airbench94's `scaling_factor`).
const LOGIT_SCALE: f64 = 1.0 / 9.0;
/// How many training images the whitening statistics come from (airbench94: the first 5000).
pub const WHITEN_IMAGES: usize = 5000;
/// The whitening conv's bias, which `model.whiten_bias_epochs` stops training.
pub const WHITEN_BIAS: &str = "whiten.bias";

/// A PyTorch-default conv (weights U(±1/√fan_in), as `nn.Conv2d.reset_parameters`), 3x3 convs
/// with dirac-initialised first filters.
fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, bias: bool) -> nn::Conv2D {
    let bound = 1.0 / ((cin * k * k) as f64).sqrt();
    let cfg = nn::ConvConfig {
        padding: if k == 3 { 1 } else { 0 },
        bias,
        ws_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    let c = nn::conv2d(p, cin, cout, k, cfg);
    if k == 3 {
        // torch.nn.init.dirac_(w[:cin]): filter i passes input channel i through unchanged.
        tch::no_grad(|| {
            let mut first = c.ws.narrow(0, 0, cin.min(cout));
            let _ = first.zero_();
            for i in 0..cin.min(cout) {
                let _ = first.get(i).get(i).get(k / 2).get(k / 2).fill_(1.0);
            }
        });
    }
    c
}

/// A BN whose scale stays at 1.
fn norm(p: nn::Path, c: i64) -> BatchNorm2d {
    let mut bn = batch_norm2d_with(p, c, 1.0, BN_EPS, BN_MOMENTUM);
    bn.freeze_weight();
    bn
}

#[derive(Debug)]
struct ConvGroup {
    conv1: nn::Conv2D,
    norm1: BatchNorm2d,
    conv2: nn::Conv2D,
    norm2: BatchNorm2d,
}

impl ConvGroup {
    fn new(p: &nn::Path, cin: i64, cout: i64) -> ConvGroup {
        ConvGroup {
            conv1: conv(p / "conv1", cin, cout, 3, false),
            norm1: norm(p / "norm1", cout),
            conv2: conv(p / "conv2", cout, cout, 3, false),
            norm2: norm(p / "norm2", cout),
        }
    }
}

impl ModuleT for ConvGroup {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x
            .apply(&self.conv1)
            .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let y = self.norm1.forward_gelu(&y, train);
        let y = y.apply(&self.conv2);
        self.norm2.forward_gelu(&y, train)
    }
}

/// airbench94's network. `forward_t` gives logits; `features` the pooled 256-d vector.
#[derive(Debug)]
pub struct Airbench {
    whiten: nn::Conv2D,
    groups: Vec<ConvGroup>,
    fc: nn::Linear,
}

impl Airbench {
    /// Variables: `whiten.{weight,bias}`, `block{1,2,3}.{conv1,conv2}.weight`,
    /// `block{n}.{norm1,norm2}.{weight,bias,running_mean,running_var}`, `fc.weight`.
    pub fn new(p: &nn::Path, num_classes: i64) -> Airbench {
        let width = 2 * 3 * WHITEN_KERNEL * WHITEN_KERNEL;
        let mut whiten = conv(p / "whiten", 3, width, WHITEN_KERNEL, true);
        let _ = whiten.ws.requires_grad_(false);
        let mut groups = Vec::new();
        let mut cin = width;
        for (i, &w) in WIDTHS.iter().enumerate() {
            groups.push(ConvGroup::new(&(p / format!("block{}", i + 1)), cin, w));
            cin = w;
        }
        let bound = 1.0 / (cin as f64).sqrt();
        let fc = nn::linear(
            p / "fc",
            cin,
            num_classes,
            nn::LinearConfig {
                ws_init: nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                bs_init: None,
                bias: false,
            },
        );
        Airbench { whiten, groups, fc }
    }

    /// Channels of the feature vector (the classifier's input).
    pub fn num_features(&self) -> i64 {
        WIDTHS[2]
    }

    /// The feature vector before the classifier: `[N, 256]`.
    pub fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.apply(&self.whiten).gelu("none");
        for g in &self.groups {
            y = g.forward_t(&y, train);
        }
        y.max_pool2d([3, 3], [3, 3], [0, 0], [1, 1], false)
            .flatten(1, -1)
    }

    /// The classifier: the linear layer, scaled.
    pub fn classify(&self, features: &Tensor) -> Tensor {
        features.apply(&self.fc) * LOGIT_SCALE
    }

    /// Sets the whitening conv from `images` (`[N,3,H,W]`, normalised as training normalises):
    /// with C the covariance of their 2x2 patches (as 12-vectors, uncentred) and C = V·Λ·Vᵀ, the
    /// 24 filters are ±V·(Λ + 5e-4)^-½, largest eigenvalue first, so the layer's outputs are
    /// decorrelated with unit variance. Statistics in f64, on the images' device.
    pub fn init_whitening(&self, images: &[Tensor]) -> Result<()> {
        let k = WHITEN_KERNEL;
        let dim = 3 * k * k;
        // Only the 12x12 eigendecomposition runs on the CPU (the copy there waits for the
        // device's work, so the caller's clock includes it).
        let Some(device) = images.first().map(|x| x.device()) else {
            bail!("whitening needs at least one image");
        };
        let mut cov = Tensor::zeros([dim, dim], (Kind::Double, device));
        let mut n = 0i64;
        for x in images {
            if x.dim() != 4 || x.size()[1] != 3 || x.size()[2] < k || x.size()[3] < k {
                bail!("whitening needs [N,3,H,W] images, got {:?}", x.size());
            }
            // [N,3,H',W',k,k] → [N·H'·W', 3·k·k] in (channel, row, column) order, the order of a
            // conv filter's weights.
            let patches = x
                .to_device(device)
                .to_kind(Kind::Double)
                .unfold(2, k, 1)
                .unfold(3, k, 1)
                .permute([0, 2, 3, 1, 4, 5])
                .reshape([-1, dim]);
            n += patches.size()[0];
            cov += patches.transpose(0, 1).matmul(&patches);
        }
        if n == 0 {
            bail!("whitening needs at least one image");
        }
        let cov = (cov / n as f64).to_device(Device::Cpu);
        let (eigenvalues, eigenvectors) = cov.linalg_eigh("U");
        // Ascending from eigh; largest first, as airbench94 orders them.
        let eigenvalues = eigenvalues.flip([0]);
        let filters = eigenvectors.transpose(0, 1).flip([0]);
        let scaled = filters / (eigenvalues + WHITEN_EPS).sqrt().view([dim, 1]);
        let weight = Tensor::cat(&[&scaled, &(-&scaled)], 0).view([2 * dim, 3, k, k]);
        let mut ws = self.whiten.ws.shallow_clone();
        tch::no_grad(|| ws.copy_(&weight.to_kind(ws.kind()).to_device(ws.device())));
        Ok(())
    }
}

impl ModuleT for Airbench {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.classify(&self.features(x, train))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_names_and_frozen_parameters_are_airbench94s() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Airbench::new(&vs.root(), 10);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward_t(&x, true).size(), vec![2, 10]);
        assert_eq!(net.features(&x, false).size(), vec![2, 256]);
        let vars = vs.variables();
        assert_eq!(vars["whiten.weight"].size(), vec![24, 3, 2, 2]);
        assert_eq!(vars["block2.conv1.weight"].size(), vec![256, 64, 3, 3]);
        assert_eq!(vars["fc.weight"].size(), vec![10, 256]);
        assert!(!vars.contains_key("fc.bias"));
        // Trained: the 3x3 convs, BN biases, the whitening bias and the classifier.
        let mut trained: Vec<String> = vars
            .iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(k, _)| k.clone())
            .collect();
        trained.sort();
        assert_eq!(trained.len(), 6 + 6 + 2);
        assert!(trained.contains(&"whiten.bias".to_string()));
        assert!(!trained
            .iter()
            .any(|k| k.ends_with("norm1.weight") || k == "whiten.weight"));
        // 3·(64·24 + 64·64 + …) conv weights + 24 + 2·(64+256+256)… : the 1.97 M of airbench94.
        let params: i64 = vars
            .values()
            .filter(|v| v.requires_grad())
            .map(|v| v.numel() as i64)
            .sum();
        let expected = 24
            + 64 * 24 * 9
            + 64 * 64 * 9
            + 256 * 64 * 9
            + 256 * 256 * 9 * 3
            + 2 * (64 + 256 + 256)
            + 2560;
        assert_eq!(params, expected);
    }

    #[test]
    fn three_by_three_convs_start_as_identity_on_their_first_filters() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Airbench::new(&vs.root(), 10);
        let w = &vs.variables()["block2.conv1.weight"]; // 64 → 256
        for i in [0i64, 17, 63] {
            let f = w.get(i);
            assert_eq!(f.get(i).get(1).get(1).double_value(&[]), 1.0);
            assert_eq!(f.abs().sum(Kind::Float).double_value(&[]), 1.0);
        }
        // Filters past the input channels keep their random init.
        assert!(w.get(64).abs().sum(Kind::Float).double_value(&[]) > 1.0);
    }

    #[test]
    fn whitening_decorrelates_patches_to_unit_variance() {
        tch::manual_seed(3);
        // Strongly correlated images: a smooth random field plus a little noise.
        let base = Tensor::randn([64, 3, 8, 8], (Kind::Float, Device::Cpu)).upsample_bilinear2d(
            [32, 32],
            false,
            None,
            None,
        );
        let images = &base + Tensor::randn([64, 3, 32, 32], (Kind::Float, Device::Cpu)) * 0.05;
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Airbench::new(&vs.root(), 10);
        net.init_whitening(&[images.narrow(0, 0, 32), images.narrow(0, 32, 32)])
            .unwrap();
        // The first 12 outputs (before the bias and GELU) are the whitened patches.
        let w = vs.variables()["whiten.weight"].shallow_clone();
        let y = images.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let z = y
            .narrow(1, 0, 12)
            .permute([1, 0, 2, 3])
            .reshape([12, -1])
            .to_kind(Kind::Double);
        let cov = z.matmul(&z.transpose(0, 1)) / z.size()[1] as f64;
        let eye = Tensor::eye(12, (Kind::Double, Device::Cpu));
        // Unit variance up to ε's share of each eigenvalue (the smallest are tiny here).
        let err = (&cov - &eye).abs().max().double_value(&[]);
        let diag = cov.diagonal(0, 0, 1);
        let top = diag.get(0).double_value(&[]);
        assert!(
            (top - 1.0).abs() < 1e-3,
            "largest direction's variance {top}"
        );
        let off = (&cov - cov.diagonal(0, 0, 1).diag_embed(0, -2, -1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            off < 1e-3,
            "off-diagonal covariance {off} (max |C - I| {err})"
        );
        // The second 12 filters are the first negated.
        assert!(w.narrow(0, 12, 12).equal(&(-w.narrow(0, 0, 12))));
    }
}
