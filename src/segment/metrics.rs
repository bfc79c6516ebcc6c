//! Segmentation metrics from a confusion matrix accumulated over a whole evaluation set:
//! pixel accuracy = correct / labelled pixels, and mean IoU = the mean over the classes present
//! (in the ground truth or the prediction) of `TP / (TP + FP + FN)`. Void pixels (the ignore
//! index) count nowhere. Both are in % (0–100).

use tch::{Kind, Tensor};

/// `counts[gt · K + pred]`: labelled pixels of class `gt` predicted as `pred`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> ConfusionMatrix {
        ConfusionMatrix {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        }
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Pixels of ground-truth class `gt` predicted as `pred`.
    pub fn get(&self, gt: usize, pred: usize) -> u64 {
        self.counts[gt * self.num_classes + pred]
    }

    /// Adds pixel pairs; a ground truth outside `0..K` (the ignore index) is skipped.
    pub fn add_pairs(&mut self, gt: &[i64], pred: &[i64]) {
        assert_eq!(
            gt.len(),
            pred.len(),
            "ground truth and prediction sizes differ"
        );
        let k = self.num_classes as i64;
        for (&g, &p) in gt.iter().zip(pred) {
            if (0..k).contains(&g) && (0..k).contains(&p) {
                self.counts[(g * k + p) as usize] += 1;
            }
        }
    }

    /// Adds `[K·K]` counts from [`batch_counts`] (or their sum over batches), reading them back.
    pub fn add_counts(&mut self, counts: &Tensor) {
        let counts = counts.to_kind(Kind::Int64).to_device(tch::Device::Cpu);
        let counts: Vec<i64> = Vec::try_from(&counts).expect("i64 counts");
        assert_eq!(counts.len(), self.counts.len(), "counts of another size");
        for (c, n) in self.counts.iter_mut().zip(counts) {
            *c += n as u64;
        }
    }

    /// Merges another matrix of the same size.
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        assert_eq!(self.num_classes, other.num_classes);
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// Labelled (non-void) pixels.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn correct(&self) -> u64 {
        (0..self.num_classes).map(|c| self.get(c, c)).sum()
    }

    /// Correct / labelled pixels, in % (0 when nothing is labelled).
    pub fn pixel_accuracy(&self) -> f64 {
        let t = self.total();
        if t == 0 {
            0.0
        } else {
            100.0 * self.correct() as f64 / t as f64
        }
    }

    /// IoU of each class in % (`None` for a class absent from both ground truth and prediction).
    pub fn iou(&self) -> Vec<Option<f64>> {
        let k = self.num_classes;
        (0..k)
            .map(|c| {
                let tp = self.get(c, c);
                let gt: u64 = (0..k).map(|p| self.get(c, p)).sum();
                let pred: u64 = (0..k).map(|g| self.get(g, c)).sum();
                let union = gt + pred - tp;
                (union > 0).then(|| 100.0 * tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes present, in % (0 when none is).
    pub fn mean_iou(&self) -> f64 {
        let present: Vec<f64> = self.iou().into_iter().flatten().collect();
        if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        }
    }
}

/// A batch's confusion counts, `[K·K]` i64 on the tensors' device (`counts[gt · K + pred]`; a
/// prediction outside `0..K` is clamped into it), computed without reading anything back: on a GPU
/// a read (or an op whose output size depends on the data, like `masked_select`) would make the
/// host wait for the queue at every batch. Sum them over a pass, then
/// [`ConfusionMatrix::add_counts`] once.
pub fn batch_counts(gt: &Tensor, pred: &Tensor, num_classes: i64) -> Tensor {
    let k = num_classes;
    let gt = gt.to_kind(Kind::Int64).flatten(0, -1);
    let pred = pred
        .to_kind(Kind::Int64)
        .flatten(0, -1)
        .to_device(gt.device());
    let valid = gt.ge(0).logical_and(&gt.lt(k));
    // Void pixels land in an extra bin, K·K, which is dropped.
    let idx = (gt.clamp(0, k - 1) * k + pred.clamp(0, k - 1)).where_scalarother(&valid, k * k);
    Tensor::zeros([k * k + 1], (Kind::Int64, idx.device()))
        .index_add_(0, &idx, &idx.ones_like())
        .narrow(0, 0, k * k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn batch_counts_agree_with_counting_pixel_pairs() {
        let k = 5i64;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // Ground truth with void pixels (255 and -1); predictions in range.
        let gt: Vec<i64> = (0..600)
            .map(|_| match rng.gen_range(0..8) {
                6 => 255,
                7 => -1,
                c => c % k,
            })
            .collect();
        let pred: Vec<i64> = (0..600).map(|_| rng.gen_range(0..k)).collect();
        let mut by_pairs = ConfusionMatrix::new(k as usize);
        by_pairs.add_pairs(&gt, &pred);
        let (g, p) = (
            Tensor::from_slice(&gt).view([2, 15, 20]),
            Tensor::from_slice(&pred).view([2, 15, 20]),
        );
        let mut by_tensor = ConfusionMatrix::new(k as usize);
        by_tensor.add_counts(&batch_counts(&g, &p, k));
        assert_eq!(by_tensor, by_pairs);
        assert!(by_pairs.total() > 0 && by_pairs.total() < 600);
        // Summed over batches and read once: the same as added batch by batch.
        let mut summed = ConfusionMatrix::new(k as usize);
        let halves = (
            g.narrow(0, 0, 1),
            g.narrow(0, 1, 1),
            p.narrow(0, 0, 1),
            p.narrow(0, 1, 1),
        );
        summed.add_counts(
            &(batch_counts(&halves.0, &halves.2, k) + batch_counts(&halves.1, &halves.3, k)),
        );
        assert_eq!(summed, by_pairs);
    }
}
