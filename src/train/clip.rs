//! Gradient clipping (not in the paper; a guard for large-batch and low-precision runs).

use tch::{Kind, Tensor};

/// Scales all gradients in place so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, applied only
/// when below 1). Returns the norm before clipping, as a 0-dim f32 tensor on the gradients'
/// device: nothing is read back, so a GPU does not wait (the coefficient is clamped to 1 on the
/// device and always applied; a factor of exactly 1 leaves a gradient unchanged). `grads` are
/// the gradients ([`Optimizer::gradients`](super::optim::Optimizer::gradients): one flat buffer, or one
/// tensor per parameter); undefined ones are skipped. The norm is accumulated in f32 whatever the
/// gradient dtype.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = grads
            .iter()
            .filter(|g| g.defined())
            .map(|g| g.shallow_clone())
            .collect();
        if grads.is_empty() {
            return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef.to_kind(g.kind()));
        }
        total
    })
}

/// Clamps every gradient element to `[-v, v]` in place (`clip_grad_value_`).
pub fn clip_grad_value(grads: &[Tensor], v: f64) {
    tch::no_grad(|| {
        for g in grads.iter().filter(|g| g.defined()) {
            let _ = g.shallow_clone().clamp_(-v, v);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two parameters with gradients [3, 4] and [12] (global norm 13), one without gradient.
    fn params() -> Vec<Tensor> {
        let a = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let c = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::from_slice(&[3.0f32, 4.0]);
        ((&a * &w).sum(Kind::Float) + (&b * 12.0).sum(Kind::Float)).backward();
        assert!(!c.grad().defined());
        vec![a, b, c]
    }

    /// Every parameter's gradient (an undefined tensor where it has none).
    fn of(ps: &[Tensor]) -> Vec<Tensor> {
        ps.iter().map(|p| p.grad()).collect()
    }

    fn grads(ps: &[Tensor]) -> Vec<f64> {
        ps[..2]
            .iter()
            .flat_map(|p| Vec::<f64>::try_from(p.grad().to_kind(Kind::Double)).unwrap())
            .collect()
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} != {b}");
    }

    #[test]
    fn norm_clipping() {
        let ps = params();
        let before = clip_grad_norm(&of(&ps), 6.5).double_value(&[]);
        close(before, 13.0, 1e-5);
        let g = grads(&ps);
        let coef = 6.5 / (13.0 + 1e-6);
        for (x, want) in g.iter().zip([3.0, 4.0, 12.0]) {
            close(*x, want * coef, 1e-5);
        }
        let after = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        close(after, 6.5, 1e-5);
        // Already below the limit: unchanged, and the returned norm is the current one.
        close(clip_grad_norm(&of(&ps), 100.0).double_value(&[]), 6.5, 1e-5);
        for (x, y) in grads(&ps).iter().zip(&g) {
            assert_eq!(x, y);
        }
    }

    #[test]
    fn no_gradients_is_zero() {
        let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        assert_eq!(clip_grad_norm(&[p.grad()], 1.0).double_value(&[]), 0.0);
    }

    #[test]
    fn value_clipping() {
        let ps = params();
        clip_grad_value(&of(&ps), 3.5);
        assert_eq!(grads(&ps), [3.0, 3.5, 3.5]);
        let ps = params();
        (&ps[0] * Tensor::from_slice(&[-10.0f32, 0.5]))
            .sum(Kind::Float)
            .backward(); // accumulates
        clip_grad_value(&of(&ps), 4.0);
        assert_eq!(grads(&ps), [-4.0, 4.0, 4.0]);
        assert!(!ps[2].grad().defined());
    }
}
