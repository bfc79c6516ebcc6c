//! Losses on soft targets: label smoothing (paper §5.2), soft-target cross entropy (needed by
//! label smoothing and mixup, §5.4), knowledge distillation (§5.3), binary cross entropy over the
//! classes (`loss.name = "bce"`, timm's `BinaryCrossEntropy` of "ResNet strikes back"), and top-k
//! accuracy counts.

use crate::config::Config;
use tch::{Kind, Tensor};

/// The training loss of a classification run, chosen once from the config: cross entropy on
/// hard labels (with the paper's label smoothing), on target distributions when mixup blends
/// them, or the distillation loss against a teacher's logits.
#[derive(Debug, Clone, Copy)]
pub struct Criterion {
    num_classes: i64,
    /// `loss.label_smoothing`.
    eps: f64,
    /// `distill.*` when a teacher is set: (temperature, hard weight, soft weight).
    distill: Option<(f64, f64, f64)>,
    /// `loss.name = "bce"`: binary cross entropy, with `loss.bce_target_threshold` when set.
    bce: Option<Option<f64>>,
}

impl Criterion {
    pub fn from_config(cfg: &Config, num_classes: i64) -> Criterion {
        let d = &cfg.distill;
        Criterion {
            num_classes,
            eps: cfg.loss.label_smoothing,
            distill: (!d.teacher.is_empty()).then_some((
                d.temperature,
                d.hard_weight,
                d.soft_weight,
            )),
            bce: (cfg.loss.name == crate::config::LossName::Bce)
                .then_some(cfg.loss.bce_target_threshold),
        }
    }

    /// The (smoothed) target distributions of hard labels, where the loss needs them: mixup
    /// blends them, distillation takes them. `None` otherwise: hard labels go to the fused cross
    /// entropy.
    pub fn targets(&self, labels: &Tensor, mixing: bool) -> Option<Tensor> {
        (mixing || self.distill.is_some() || self.bce.is_some())
            .then(|| smooth_targets(labels, self.num_classes, self.eps))
    }

    /// The loss of `logits` against `targets` from [`Criterion::targets`] (or the hard
    /// `labels` without them) and, with distillation, the teacher's logits.
    pub fn loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        targets: Option<&Tensor>,
        teacher: Option<&Tensor>,
    ) -> Tensor {
        if let (Some(threshold), Some(q)) = (self.bce, targets) {
            return binary_cross_entropy(logits, q, threshold);
        }
        match (self.distill, targets, teacher) {
            (Some((t, hard, soft)), Some(q), Some(r)) => {
                distillation_loss(logits, r, q, t, hard, soft)
            }
            (None, Some(q), _) => soft_cross_entropy(logits, q),
            (None, None, _) => smoothed_cross_entropy(logits, labels, self.num_classes, self.eps),
            _ => panic!("distillation needs target distributions and the teacher's logits"),
        }
    }
}

/// timm's `BinaryCrossEntropy` on dense targets: each class an independent binary problem,
/// `mean(BCE-with-logits(logits, q))` over the batch and the classes, the targets first turned
/// into 0/1 by `q > threshold` when a threshold is given (timm's `target_threshold`, 0.2 in
/// "ResNet strikes back" A3, so that a mixed-in class counts as present).
pub fn binary_cross_entropy(logits: &Tensor, targets: &Tensor, threshold: Option<f64>) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let q = match threshold {
        Some(t) => targets.gt(t).to_kind(Kind::Float),
        None => targets.to_kind(Kind::Float),
    };
    logits.binary_cross_entropy_with_logits::<Tensor>(&q, None, None, tch::Reduction::Mean)
}

/// Label smoothing in the paper's form (§5.2): `1 - eps` on the true class and `eps / (K - 1)`
/// on every other class. PyTorch's `label_smoothing` spreads `eps / K` over all classes
/// (true class included); this deliberately follows the paper. `eps = 0` (or `K = 1`) gives
/// one-hot targets. Returns `[B, K]` f32 on the labels' device.
pub fn smooth_targets(labels: &Tensor, num_classes: i64, eps: f64) -> Tensor {
    let one_hot = labels.one_hot(num_classes).to_kind(Kind::Float);
    if eps == 0.0 || num_classes < 2 {
        return one_hot;
    }
    let off = eps / (num_classes - 1) as f64;
    one_hot * (1.0 - eps - off) + off
}

/// Cross entropy against a target distribution: mean over the batch of
/// `-Σ_k q_k log softmax(z)_k`. Computed in f32 even for bf16/f16 logits, because
/// log-softmax in half precision loses the small probabilities that soft targets weight.
pub fn soft_cross_entropy(logits: &Tensor, target_probs: &Tensor) -> Tensor {
    let log_p = logits.log_softmax(-1, Kind::Float);
    -(log_p * target_probs.to_kind(Kind::Float))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
}

/// [`soft_cross_entropy`] against [`smooth_targets`] of hard labels `[B]`, without building the
/// targets: the paper's smoothing (ε/(K−1) on every other class) is libtorch's cross entropy with
/// label smoothing ε·K/(K−1) (which spreads its ε' over all K classes, the true one included).
/// One fused operator where the soft form takes a one-hot tensor and five more, each a kernel
/// launch on a GPU. Computed in f32, as the soft form.
pub fn smoothed_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    num_classes: i64,
    eps: f64,
) -> Tensor {
    let smoothing = if num_classes < 2 {
        0.0
    } else {
        eps * num_classes as f64 / (num_classes - 1) as f64
    };
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        labels,
        None,
        tch::Reduction::Mean,
        -100,
        smoothing,
    )
}

/// Knowledge distillation (§5.3):
/// `hard_weight · ℓ(p, softmax(z)) + soft_weight · T² · ℓ(softmax(r/T), softmax(z/T))`.
/// The teacher logits `r` are detached here so the teacher never receives gradient. The `T²`
/// factor (Hinton et al. 2015) keeps the soft term's gradient magnitude independent of `T`.
pub fn distillation_loss(
    student: &Tensor,
    teacher: &Tensor,
    target_probs: &Tensor,
    temperature: f64,
    hard_weight: f64,
    soft_weight: f64,
) -> Tensor {
    let t = temperature;
    let hard = soft_cross_entropy(student, target_probs);
    let teacher_probs = (teacher.detach().to_kind(Kind::Float) / t).softmax(-1, Kind::Float);
    let soft = soft_cross_entropy(&(student.to_kind(Kind::Float) / t), &teacher_probs);
    hard * hard_weight + soft * (soft_weight * t * t)
}

/// Top-1 and top-k correct counts for hard labels `[B]` (k clipped to the number of classes), as
/// used for the paper's top-1/top-5 validation accuracy: two 0-dim i64 tensors on the logits'
/// device, to be summed over batches and read back once (a read per batch would make a GPU wait
/// for its queue to drain).
pub fn topk_hits(logits: &Tensor, labels: &Tensor, k: i64) -> (Tensor, Tensor) {
    let k = k.clamp(1, *logits.size().last().unwrap_or(&1));
    let (_, idx) = logits.topk(k, -1, true, true);
    let hits = idx.eq_tensor(&labels.to_kind(Kind::Int64).unsqueeze(-1));
    (hits.select(1, 0).sum(Kind::Int64), hits.sum(Kind::Int64))
}

/// Top-1 correct count for hard labels `[B]` as a 0-dim i64 tensor on the logits' device: the
/// training loop's accuracy, in three operators where [`topk_hits`] takes more.
pub fn top1_hits(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.argmax(-1, false).eq_tensor(labels).sum(Kind::Int64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
        Vec::<Vec<f64>>::try_from(t.to_kind(Kind::Double)).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} != {b}");
    }

    /// Reference in plain f64: log softmax of a row.
    fn log_softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - lse).collect()
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        log_softmax(z).iter().map(|v| v.exp()).collect()
    }

    fn ce(q: &[f64], z: &[f64]) -> f64 {
        -q.iter()
            .zip(log_softmax(z))
            .map(|(q, l)| q * l)
            .sum::<f64>()
    }

    const Z: [[f64; 3]; 2] = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]];
    const R: [[f64; 3]; 2] = [[3.0, 0.0, -1.0], [1.0, 1.5, -2.0]];

    fn t2(rows: &[[f64; 3]; 2]) -> Tensor {
        Tensor::from_slice(&rows.concat())
            .view([2, 3])
            .to_kind(Kind::Float)
    }

    #[test]
    fn smoothing_is_paper_form() {
        let labels = Tensor::from_slice(&[3i64, 0]);
        let q = smooth_targets(&labels, 10, 0.1);
        assert_eq!(q.size(), [2, 10]);
        assert_eq!(q.kind(), Kind::Float);
        let q = vec2(&q);
        for (row, &y) in q.iter().zip(&[3usize, 0]) {
            for (k, &v) in row.iter().enumerate() {
                let want = if k == y { 0.9 } else { 0.1 / 9.0 };
                close(v, want, 1e-7);
            }
            close(row.iter().sum(), 1.0, 1e-6);
        }
        let one_hot = vec2(&smooth_targets(&labels, 4, 0.0));
        assert_eq!(one_hot[0], [0.0, 0.0, 0.0, 1.0]);
        assert_eq!(one_hot[1], [1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn soft_ce_value() {
        // Row 0: label 2, eps 0.3, K 3 → q = [0.15, 0.15, 0.7]; row 1: label 0.
        let q = smooth_targets(&Tensor::from_slice(&[2i64, 0]), 3, 0.3);
        let got = scalar(&soft_cross_entropy(&t2(&Z), &q));
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let row0 = 0.15 * (lse0 - 1.0) + 0.15 * (lse0 - 2.0) + 0.7 * (lse0 - 3.0);
        let row1 = ce(&[0.7, 0.15, 0.15], &Z[1]);
        close(got, (row0 + row1) / 2.0, 1e-5);
    }

    #[test]
    fn soft_ce_one_hot_matches_tch() {
        let logits =
            Tensor::from_slice(&[0.3f32, -1.2, 2.5, 0.0, 1.0, 1.0, -0.5, 4.0]).view([2, 4]);
        let labels = Tensor::from_slice(&[1i64, 3]);
        let ours = soft_cross_entropy(&logits, &smooth_targets(&labels, 4, 0.0));
        let tch_ce = logits.cross_entropy_for_logits(&labels);
        close(scalar(&ours), scalar(&tch_ce), 1e-6);
    }

    #[test]
    fn smoothed_ce_is_soft_ce_against_the_paper_targets() {
        tch::manual_seed(0);
        let logits = Tensor::randn([6, 10], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let labels = Tensor::from_slice(&[0i64, 9, 3, 3, 7, 1]);
        for eps in [0.0, 0.1, 0.3] {
            let soft = soft_cross_entropy(&logits, &smooth_targets(&labels, 10, eps));
            let fused = smoothed_cross_entropy(&logits, &labels, 10, eps);
            close(scalar(&fused), scalar(&soft), 1e-5);
            // The same gradient too: it is what trains.
            let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                let z = logits.detach().set_requires_grad(true);
                f(&z).backward();
                z.grad()
            };
            let g_soft = grad(&|z| soft_cross_entropy(z, &smooth_targets(&labels, 10, eps)));
            let g_fused = grad(&|z| smoothed_cross_entropy(z, &labels, 10, eps));
            assert!(g_fused.allclose(&g_soft, 1e-6, 1e-6, false), "eps {eps}");
        }
        let bf16 = smoothed_cross_entropy(&logits.to_kind(Kind::BFloat16), &labels, 10, 0.1);
        assert_eq!(bf16.kind(), Kind::Float);
    }

    #[test]
    fn top1_hits_counts_argmax_matches() {
        let logits =
            Tensor::from_slice(&[0.1f32, 0.9, 0.0, 0.8, 0.3, 0.1, 0.0, 0.1, 0.2]).view([3, 3]);
        let labels = Tensor::from_slice(&[1i64, 0, 0]);
        assert_eq!(top1_hits(&logits, &labels).int64_value(&[]), 2);
        let (reference, _) = topk_hits(&logits, &labels, 1);
        assert_eq!(
            top1_hits(&logits, &labels).int64_value(&[]),
            reference.int64_value(&[])
        );
    }

    #[test]
    fn soft_ce_half_logits_in_f32() {
        let logits = t2(&Z).to_kind(Kind::BFloat16);
        let q = smooth_targets(&Tensor::from_slice(&[2i64, 0]), 3, 0.0);
        let l = soft_cross_entropy(&logits, &q);
        assert_eq!(l.kind(), Kind::Float);
        close(
            scalar(&l),
            (ce(&[0., 0., 1.], &Z[0]) + ce(&[1., 0., 0.], &Z[1])) / 2.0,
            1e-2,
        );
    }

    #[test]
    fn distillation_value() {
        let q = smooth_targets(&Tensor::from_slice(&[2i64, 1]), 3, 0.1);
        let qv = vec2(&q);
        for &(t, hw, sw) in &[(2.0, 1.0, 1.0), (20.0, 0.5, 2.0)] {
            let got = scalar(&distillation_loss(&t2(&Z), &t2(&R), &q, t, hw, sw));
            let mut want = 0.0;
            for i in 0..2 {
                let zt: Vec<f64> = Z[i].iter().map(|v| v / t).collect();
                let rt: Vec<f64> = R[i].iter().map(|v| v / t).collect();
                want += hw * ce(&qv[i], &Z[i]) + sw * t * t * ce(&softmax(&rt), &zt);
            }
            close(got, want / 2.0, 1e-4);
        }
    }

    #[test]
    fn distillation_teacher_gets_no_gradient() {
        let student = t2(&Z).set_requires_grad(true);
        let teacher = t2(&R).set_requires_grad(true);
        let q = smooth_targets(&Tensor::from_slice(&[2i64, 1]), 3, 0.0);
        distillation_loss(&student, &teacher, &q, 2.0, 1.0, 1.0).backward();
        assert!(student.grad().defined());
        assert!(scalar(&student.grad().abs().sum(Kind::Float)) > 0.0);
        assert!(!teacher.grad().defined());
    }

    #[test]
    fn topk_counts() {
        // Row 0: argmax 2; row 1: order 0 > 3 > 1 > 2; row 2: order 3 > 2 > 1 > 0.
        let logits = Tensor::from_slice(&[
            0.1f32, 0.2, 0.9, 0.0, //
            0.8, 0.3, 0.1, 0.5, //
            0.0, 0.1, 0.2, 0.3,
        ])
        .view([3, 4]);
        let labels = Tensor::from_slice(&[2i64, 3, 0]);
        let counts = |k| {
            let (top1, topk) = topk_hits(&logits, &labels, k);
            (top1.int64_value(&[]), topk.int64_value(&[]))
        };
        // Row 0 top-1 hit; row 1 is 2nd; row 2 is last.
        assert_eq!(counts(1), (1, 1));
        assert_eq!(counts(2), (1, 2));
        assert_eq!(counts(3), (1, 2));
        assert_eq!(counts(5), (1, 3)); // clipped to 4
    }
}
