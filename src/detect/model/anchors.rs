//! torchvision's `AnchorGenerator`: per pyramid level, a set of zero-centred cell anchors (one
//! per size × aspect ratio, rounded to integers) repeated at every feature-map location.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Anchors for a list of feature maps; aspect ratio = height / width.
#[derive(Debug)]
pub struct AnchorGenerator {
    /// One `[A, 4]` tensor of zero-centred anchors per level (f32 on the CPU, as torchvision
    /// computes them; converted per call).
    cell_anchors: Vec<Tensor>,
}

impl AnchorGenerator {
    /// `sizes[l]` and `aspect_ratios[l]`: the anchors of level `l`.
    pub fn new(sizes: &[Vec<f64>], aspect_ratios: &[Vec<f64>]) -> Result<AnchorGenerator> {
        if sizes.len() != aspect_ratios.len() {
            bail!(
                "anchor sizes have {} levels but aspect ratios {}",
                sizes.len(),
                aspect_ratios.len()
            );
        }
        if sizes.iter().chain(aspect_ratios).any(|v| v.is_empty()) {
            bail!("every level needs at least one anchor size and one aspect ratio");
        }
        let cell_anchors = sizes
            .iter()
            .zip(aspect_ratios)
            .map(|(s, r)| generate_anchors(s, r))
            .collect();
        Ok(AnchorGenerator { cell_anchors })
    }

    /// Anchors per location of each level.
    pub fn num_anchors_per_location(&self) -> Vec<i64> {
        self.cell_anchors.iter().map(|a| a.size()[0]).collect()
    }

    /// The anchors of one image of the padded batch of size `image_size` (h, w), all levels
    /// concatenated: for each level, location by location (rows, then columns), the cell
    /// anchors shifted to `(x·stride_w, y·stride_h)`, where the stride is the batch size divided
    /// by the grid size (integer division). Every image of a batch has the same anchors. In the
    /// features' dtype (`options`), as torchvision makes them; their values are integers.
    pub fn grid_anchors(
        &self,
        image_size: (i64, i64),
        grid_sizes: &[(i64, i64)],
        options: (Kind, Device),
    ) -> Tensor {
        let (kind, device) = options;
        assert_eq!(
            grid_sizes.len(),
            self.cell_anchors.len(),
            "one feature map per anchor level"
        );
        let per_level: Vec<Tensor> = grid_sizes
            .iter()
            .zip(&self.cell_anchors)
            .map(|(&(gh, gw), base)| {
                let (stride_h, stride_w) = (image_size.0 / gh, image_size.1 / gw);
                let shifts_x = Tensor::arange(gw, (kind, device)) * stride_w as f64;
                let shifts_y = Tensor::arange(gh, (kind, device)) * stride_h as f64;
                let grid = Tensor::meshgrid_indexing(&[&shifts_y, &shifts_x], "ij");
                let (shift_y, shift_x) = (grid[0].reshape([-1]), grid[1].reshape([-1]));
                let shifts = Tensor::stack(&[&shift_x, &shift_y, &shift_x, &shift_y], 1);
                (shifts.view([-1, 1, 4]) + base.to(device).to_kind(kind).view([1, -1, 4]))
                    .reshape([-1, 4])
            })
            .collect();
        Tensor::cat(&per_level, 0)
    }
}

/// The zero-centred anchors of one level, as torchvision's `generate_anchors` (in f32): for each
/// ratio r (outer) and scale s (inner), width s/√r and height s·√r, `[-w/2, -h/2, w/2, h/2]`
/// rounded half to even.
pub fn generate_anchors(scales: &[f64], aspect_ratios: &[f64]) -> Tensor {
    let scales = Tensor::from_slice(scales).to_kind(Kind::Float);
    let aspect_ratios = Tensor::from_slice(aspect_ratios).to_kind(Kind::Float);
    let h_ratios = aspect_ratios.sqrt();
    let w_ratios = h_ratios.reciprocal();
    let ws = (w_ratios.unsqueeze(1) * scales.unsqueeze(0)).view([-1]);
    let hs = (h_ratios.unsqueeze(1) * scales.unsqueeze(0)).view([-1]);
    (Tensor::stack(&[-&ws, -&hs, ws, hs], 1) / 2.0).round()
}
