//! The statistics of a study: each variant's mean with its 95 % confidence interval over seeds,
//! and each variant against its reference row: the difference Δ with its 95 % interval (paired
//! by seed when both rows ran the same seeds, Welch's otherwise), a verdict, and the smallest Δ
//! the study could have detected. Student's t quantiles come from `statrs`; the figures are tested
//! against SciPy's (`tests/stats_scipy.rs`).

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Two-sided confidence level of every interval here.
pub const CONFIDENCE: f64 = 0.95;
/// The power at which [`detectable_delta`] is the smallest difference a study would detect.
pub const POWER: f64 = 0.8;

/// The `p` quantile of Student's t with `df` degrees of freedom (SciPy's `t.ppf(p, df)`).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    StudentsT::new(0.0, 1.0, df)
        .expect("t with df > 0")
        .inverse_cdf(p)
}

/// The two-sided p-value of a t statistic with `df` degrees of freedom.
fn two_sided_p(t: f64, df: f64) -> f64 {
    let dist = StudentsT::new(0.0, 1.0, df).expect("t with df > 0");
    2.0 * dist.cdf(-t.abs())
}

/// Mean and sample standard deviation (n − 1; 0 for one value).
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() == 1 {
        return Some((mean, 0.0));
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, var.sqrt()))
}

/// A mean over seeds with its 95 % confidence interval (Student t); no interval with one value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    /// Half the interval's width: the interval is mean ± half_width.
    pub half_width: Option<f64>,
}

pub fn mean_ci(values: &[f64]) -> Option<MeanCi> {
    let (mean, std) = mean_std(values)?;
    let n = values.len();
    let half_width = (n >= 2).then(|| {
        let df = (n - 1) as f64;
        t_quantile(0.5 + CONFIDENCE / 2.0, df) * std / (n as f64).sqrt()
    });
    Some(MeanCi {
        n,
        mean,
        std,
        half_width,
    })
}

/// How a difference was tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Test {
    /// Paired by seed (both rows ran the same seeds): the t test on the per-seed differences
    /// (SciPy's `ttest_rel`).
    Paired,
    /// Welch's unequal-variance t test (SciPy's `ttest_ind(equal_var=False)`).
    Welch,
}

/// What a difference's interval says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// The whole interval is above 0.
    #[serde(rename = "better")]
    Better,
    /// The whole interval is below 0.
    #[serde(rename = "worse")]
    Worse,
    /// The interval holds 0.
    #[serde(rename = "no difference detected")]
    NoDifference,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::NoDifference => "no difference detected",
        }
    }
}

/// A variant against its reference: Δ = variant − reference, its 95 % interval, the t test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Delta {
    pub delta: f64,
    pub half_width: f64,
    pub t: f64,
    pub df: f64,
    pub p_value: f64,
    pub test: Test,
    pub verdict: Verdict,
}

impl Delta {
    fn from_t(delta: f64, se: f64, df: f64, test: Test) -> Delta {
        let half_width = t_quantile(0.5 + CONFIDENCE / 2.0, df) * se;
        let verdict = if delta - half_width > 0.0 {
            Verdict::Better
        } else if delta + half_width < 0.0 {
            Verdict::Worse
        } else {
            Verdict::NoDifference
        };
        let t = delta / se;
        Delta {
            delta,
            half_width,
            t,
            df,
            p_value: two_sided_p(t, df),
            test,
            verdict,
        }
    }
}

/// `variant − reference` paired by seed (`variant[i]` and `reference[i]` ran seed i): `None`
/// with fewer than two pairs. When every pair differs by the same amount the interval has no
/// width: the verdict is that difference's sign (identical runs: no difference).
pub fn paired(variant: &[f64], reference: &[f64]) -> Option<Delta> {
    assert_eq!(variant.len(), reference.len(), "paired values");
    let d: Vec<f64> = variant.iter().zip(reference).map(|(a, b)| a - b).collect();
    let (mean, std) = mean_std(&d)?;
    let n = d.len() as f64;
    if d.len() < 2 {
        return None;
    }
    if std > 0.0 {
        return Some(Delta::from_t(mean, std / n.sqrt(), n - 1.0, Test::Paired));
    }
    let verdict = if mean > 0.0 {
        Verdict::Better
    } else if mean < 0.0 {
        Verdict::Worse
    } else {
        Verdict::NoDifference
    };
    Some(Delta {
        delta: mean,
        half_width: 0.0,
        t: if mean == 0.0 {
            0.0
        } else {
            mean.signum() * f64::INFINITY
        },
        df: n - 1.0,
        p_value: if mean == 0.0 { 1.0 } else { 0.0 },
        test: Test::Paired,
        verdict,
    })
}

/// `mean(variant) − mean(reference)` by Welch's test: `None` with fewer than two values on a side
/// or no spread on both.
pub fn welch(variant: &[f64], reference: &[f64]) -> Option<Delta> {
    let ((ma, sa), (mb, sb)) = (mean_std(variant)?, mean_std(reference)?);
    let (na, nb) = (variant.len() as f64, reference.len() as f64);
    if na < 2.0 || nb < 2.0 {
        return None;
    }
    let (va, vb) = (sa * sa / na, sb * sb / nb);
    if va + vb == 0.0 {
        return None;
    }
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    Some(Delta::from_t(ma - mb, (va + vb).sqrt(), df, Test::Welch))
}

/// The pooled standard deviation over seeds of several groups (each group one variant's runs):
/// √(Σ (nᵢ − 1) sᵢ² / Σ (nᵢ − 1)), with its degrees of freedom Σ (nᵢ − 1).
pub fn pooled_std(groups: &[&[f64]]) -> Option<(f64, f64)> {
    let (mut ss, mut df) = (0.0, 0.0);
    for g in groups.iter().filter(|g| g.len() >= 2) {
        let (_, s) = mean_std(g)?;
        ss += (g.len() - 1) as f64 * s * s;
        df += (g.len() - 1) as f64;
    }
    (df > 0.0).then(|| ((ss / df).sqrt(), df))
}

/// The smallest |Δ| between two rows of `n_a` and `n_b` seeds that a two-sided test at 95 %
/// would detect with [`POWER`] (80 %), given the pooled seed spread `pooled` and its `df`:
/// (t₀.₉₇₅ + t₀.₈₀) · s · √(1/n_a + 1/n_b). A "no difference detected" verdict rules out
/// differences larger than this, not smaller ones.
pub fn detectable_delta(pooled: f64, df: f64, n_a: usize, n_b: usize) -> f64 {
    let t = t_quantile(0.5 + CONFIDENCE / 2.0, df) + t_quantile(POWER, df);
    t * pooled * (1.0 / n_a as f64 + 1.0 / n_b as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_verdicts_on_hand_checked_numbers() {
        // t.ppf(0.975, 4) = 2.7764451051977987 (tables: 2.776).
        assert!((t_quantile(0.975, 4.0) - 2.776_445_105_197_798_7).abs() < 1e-9);
        let ci = mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!((ci.n, ci.mean), (5, 3.0));
        let expected = 2.776_445_105_197_798_7 * (2.5f64).sqrt() / 5f64.sqrt();
        assert!((ci.half_width.unwrap() - expected).abs() < 1e-9);
        assert_eq!(mean_ci(&[7.0]).unwrap().half_width, None);
        // Every seed gains 1 ± a little: better; a mixed gain: no difference.
        let base = [90.0, 91.0, 92.0];
        let d = paired(&[91.1, 91.9, 93.05], &base).unwrap();
        assert_eq!((d.test, d.verdict), (Test::Paired, Verdict::Better));
        let d = paired(&[91.0, 90.0, 93.0], &base).unwrap();
        assert_eq!(d.verdict, Verdict::NoDifference);
        assert_eq!(
            welch(&[80.0, 81.0, 80.5], &base).unwrap().verdict,
            Verdict::Worse
        );
        // Identical runs: no difference, an interval of no width.
        let same = paired(&base, &base).unwrap();
        assert_eq!(
            (same.verdict, same.half_width),
            (Verdict::NoDifference, 0.0)
        );
        assert_eq!(
            paired(&[91.0, 92.0, 93.0], &base).unwrap().verdict,
            Verdict::Better
        );
        assert!(paired(&[91.0], &[90.0]).is_none(), "one pair");
        assert!(welch(&[1.0], &base).is_none());
        // Pooled spread of two groups with variances 1 and 4 over 2 + 2 df: √2.5.
        let (s, df) = pooled_std(&[&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]]).unwrap();
        assert!((s - 2.5f64.sqrt()).abs() < 1e-12 && df == 4.0);
        let mde = detectable_delta(s, df, 3, 3);
        let t = t_quantile(0.975, 4.0) + t_quantile(0.8, 4.0);
        assert!((mde - t * s * (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
