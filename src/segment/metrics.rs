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

    /// Adds a batch: `gt` `[B,H,W]` (ignore index outside `0..K`) and `pred` of the same shape,
    /// counted on the tensors' device with one `bincount`.
    pub fn add(&mut self, gt: &Tensor, pred: &Tensor) {
        let k = self.num_classes as i64;
        let gt = gt.to_kind(Kind::Int64).flatten(0, -1);
        let pred = pred
            .to_kind(Kind::Int64)
            .flatten(0, -1)
            .to_device(gt.device());
        let valid = gt.ge(0).logical_and(&gt.lt(k));
        let idx = gt.masked_select(&valid) * k + pred.masked_select(&valid).clamp(0, k - 1);
        let counts = idx
            .bincount(None::<Tensor>, k * k)
            .to_device(tch::Device::Cpu);
        let counts: Vec<i64> = Vec::try_from(&counts).expect("bincount is i64");
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
