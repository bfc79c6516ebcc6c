//! Training-time assignment of ground truth: torchvision's `Matcher` (which ground-truth box each
//! anchor or proposal is matched to) and `BalancedPositiveNegativeSampler` (which of them enter
//! the loss), the sampler's draws from a caller-owned generator.

use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// Assigns each prediction (column of an IoU matrix) its best ground truth (row), or
/// [`Matcher::BELOW_LOW_THRESHOLD`] / [`Matcher::BETWEEN_THRESHOLDS`].
#[derive(Debug, Clone, Copy)]
pub struct Matcher {
    /// Quality ≥ this: a match.
    pub high_threshold: f64,
    /// Quality < this: background; in between: ignored.
    pub low_threshold: f64,
    /// Also match each ground truth to the predictions of its highest quality, however low
    /// (the RPN's rule, so that every box has an anchor).
    pub allow_low_quality_matches: bool,
}

impl Matcher {
    /// A prediction below the low threshold (background).
    pub const BELOW_LOW_THRESHOLD: i64 = -1;
    /// A prediction between the thresholds (ignored by the loss).
    pub const BETWEEN_THRESHOLDS: i64 = -2;

    pub fn new(high_threshold: f64, low_threshold: f64, allow_low_quality_matches: bool) -> Self {
        assert!(
            low_threshold <= high_threshold,
            "low_threshold ({low_threshold}) should be <= high_threshold ({high_threshold})"
        );
        Matcher {
            high_threshold,
            low_threshold,
            allow_low_quality_matches,
        }
    }

    /// `match_quality_matrix` is `[M, N]` (M ground truths, N predictions, M, N > 0); returns
    /// `[N]` i64: the matched ground truth or a negative code.
    pub fn call(&self, match_quality_matrix: &Tensor) -> Tensor {
        let size = match_quality_matrix.size();
        assert!(
            size[0] > 0 && size[1] > 0,
            "the matcher needs ground truths and predictions, got a {size:?} quality matrix"
        );
        let (matched_vals, all_matches) = match_quality_matrix.max_dim(0, false);
        let below_low_threshold = matched_vals.lt(self.low_threshold);
        let between_thresholds = matched_vals
            .ge(self.low_threshold)
            .logical_and(&matched_vals.lt(self.high_threshold));
        let matches = all_matches
            .masked_fill(&below_low_threshold, Self::BELOW_LOW_THRESHOLD)
            .masked_fill(&between_thresholds, Self::BETWEEN_THRESHOLDS);
        if !self.allow_low_quality_matches {
            return matches;
        }
        // torchvision's set_low_quality_matches_: every prediction that ties for the highest
        // quality of some ground truth gets its best match back (even a quality of 0).
        let (highest_quality_foreach_gt, _) = match_quality_matrix.max_dim(1, true);
        let of_highest_quality = match_quality_matrix
            .eq_tensor(&highest_quality_foreach_gt)
            .any_dim(0, false);
        all_matches.where_self(&of_highest_quality, &matches)
    }
}

/// Draws, per image, at most `batch_size_per_image` elements with at most a
/// `positive_fraction` of positives (label ≥ 1), the rest negatives (label 0); label -1 is
/// never drawn. Without replacement, uniformly, as torchvision's `randperm(n)[:k]`.
#[derive(Debug, Clone, Copy)]
pub struct BalancedPositiveNegativeSampler {
    pub batch_size_per_image: i64,
    pub positive_fraction: f64,
}

impl BalancedPositiveNegativeSampler {
    /// For one image's `labels` (`[N]`, any numeric kind: ≥ 1 positive, 0 negative, < 0
    /// ignored), the masks `(positive, negative)` (`[N]` bool on the labels' device) of the
    /// drawn elements. The draws come from `rng`, on the host.
    pub fn sample(&self, labels: &Tensor, rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
        let host: Vec<f64> = Vec::try_from(labels.to_kind(Kind::Double).to_device(Device::Cpu))
            .expect("labels are a 1-D tensor");
        let positive: Vec<i64> = (0..host.len() as i64)
            .filter(|&i| host[i as usize] >= 1.0)
            .collect();
        let negative: Vec<i64> = (0..host.len() as i64)
            .filter(|&i| host[i as usize] == 0.0)
            .collect();
        let num_pos = ((self.batch_size_per_image as f64 * self.positive_fraction) as usize)
            .min(positive.len());
        let num_neg = (self.batch_size_per_image as usize)
            .saturating_sub(num_pos)
            .min(negative.len());
        let mask = |candidates: &[i64], k: usize, rng: &mut ChaCha8Rng| {
            let drawn: Vec<i64> = index::sample(rng, candidates.len(), k)
                .into_iter()
                .map(|i| candidates[i])
                .collect();
            let mut mask = vec![false; host.len()];
            for i in drawn {
                mask[i as usize] = true;
            }
            Tensor::from_slice(&mask).to_device(labels.device())
        };
        let pos = mask(&positive, num_pos, rng);
        let neg = mask(&negative, num_neg, rng);
        (pos, neg)
    }
}
