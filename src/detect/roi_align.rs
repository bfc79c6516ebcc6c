//! RoIAlign (Mask R-CNN): torchvision's `roi_align`, as its CPU kernel computes it, written in
//! tensor operations so that it runs on any device and autograd gives the gradient to the
//! features.
//!
//! The kernel averages, in every output bin, a `gh × gw` grid of bilinearly interpolated sample
//! points (`gh = gw = sampling_ratio`, or `ceil(roi_size / output_size)` per RoI when
//! `sampling_ratio <= 0`). Here the kernel's per-point set-up (coordinates, clamping, the four
//! corner pixels and their weights) is computed for all points at once with the kernel's
//! operations in its order and precision, so the weights are the kernel's, bit for bit. The
//! features are read as rows of channels (`[N·H·W, C]`, one contiguous row per pixel) and each
//! output bin is one bag of `embedding_bag` (mode sum, per-sample weights): the weighted sum of
//! its points' `4·gh·gw` corner rows, without materialising them; its backward adds the weighted
//! gradient into those rows, which is the kernel's backward. Only the order of the sums differs
//! from torchvision (f32 rounding).
//!
//! (`grid_sampler` with border padding would also express the kernel, but it works in normalised
//! coordinates, whose f32 round trip moves a point by up to `size · 6e-8` pixels, and on the CPU
//! it gathers each channel from its own plane; the rows of channels are faster there.)
//!
//! RoIs with the same grid size are computed together: all of them for a fixed `sampling_ratio`.

use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// `embedding_bag`'s mode 0: the (weighted) sum of each bag's rows.
const EMBEDDING_BAG_SUM: i64 = 0;

/// At most this many (sample point, corner) entries per `embedding_bag` call: each holds an i64
/// row index and a weight, so this bounds them to about 200 MiB (large adaptive grids).
const SAMPLE_ENTRIES: i64 = 1 << 24;

/// RoIAlign of the `[N, C, H, W]` `input` over `rois` `[K, 5]` = (batch index, x1, y1, x2, y2):
/// `[K, C, oh, ow]` for `output_size = (oh, ow)`, as `torchvision.ops.roi_align` computes it.
///
/// `spatial_scale` maps RoI coordinates to `input` pixels (1/4 for a stride-4 feature map);
/// `sampling_ratio > 0` samples that many points per bin along each side, `<= 0` samples
/// `ceil(roi_size / output_size)` (per RoI); `aligned` shifts the RoIs by -0.5 pixel (Detectron2)
/// and keeps their size (`false` enlarges RoIs smaller than one pixel to one). Gradients flow to
/// `input`, not to `rois` (as in torchvision). Half-precision inputs are computed in f32 and the
/// result converted back (as torchvision's autocast does). The RoIs' coordinates are taken in
/// the input's precision (torchvision requires them to be of its type).
///
/// # Panics
/// If `input` is not 4-D, `rois` not `[K, 5]`, or a batch index is outside `0..N`.
pub fn roi_align(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (batch, channels, height, width) = input.size4().unwrap_or_else(|_| {
        panic!(
            "roi_align: input must be [N, C, H, W], got {:?}",
            input.size()
        )
    });
    let roi_shape = rois.size();
    assert!(
        roi_shape.len() == 2 && roi_shape[1] == 5,
        "roi_align: rois must be [K, 5] (batch index, x1, y1, x2, y2), got {roi_shape:?}"
    );
    let (pooled_height, pooled_width) = output_size;
    assert!(
        pooled_height > 0 && pooled_width > 0,
        "roi_align: output_size must be positive, got {output_size:?}"
    );
    let num_rois = roi_shape[0];
    let device = input.device();
    let out_kind = input.kind();
    if num_rois == 0 {
        // Empty, but in the input's graph (as torchvision's), so that a loss over no RoIs still
        // back-propagates (a zero gradient).
        return input
            .narrow(0, 0, 0)
            .sum_dim_intlist([2, 3].as_slice(), true, None)
            .expand([0, channels, pooled_height, pooled_width], false)
            .contiguous();
    }
    let kind = match out_kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    };
    // Pixels as rows of channels: a sample point's corner is one contiguous row of C values.
    let pixels = input
        .to_kind(kind)
        .permute([0, 2, 3, 1])
        .contiguous()
        .view([-1, channels]);
    let geometry = RoiGeometry::new(
        &rois.detach().to_device(device).to_kind(kind),
        output_size,
        spatial_scale,
        sampling_ratio,
        aligned,
    );

    // The only host synchronisation: each RoI's image (checked) and grid size.
    let plan = Tensor::stack(
        &[&geometry.batch_index, &geometry.grid_h, &geometry.grid_w],
        1,
    );
    let plan = Vec::<i64>::try_from(&plan.to_device(Device::Cpu).view([-1]))
        .expect("roi_align: the RoI plan to the host");
    let mut groups: BTreeMap<(i64, i64), Vec<i64>> = BTreeMap::new();
    for (k, row) in plan.chunks(3).enumerate() {
        let (b, gh, gw) = (row[0], row[1], row[2]);
        assert!(
            (0..batch).contains(&b),
            "roi_align: RoI {k} has batch index {b}, but the input holds {batch} images"
        );
        // An empty sampling grid (an inverted RoI with `aligned` and adaptive sampling)
        // averages nothing: 0, as in the kernel.
        let grid = if gh > 0 && gw > 0 { (gh, gw) } else { (0, 0) };
        groups.entry(grid).or_default().push(k as i64);
    }

    let mut outputs = Vec::new();
    let mut order = Vec::with_capacity(num_rois as usize);
    for ((gh, gw), members) in groups {
        let per_roi = pooled_height * pooled_width * 4 * gh * gw;
        let rois_per_chunk = (SAMPLE_ENTRIES / per_roi.max(1)).max(1) as usize;
        for chunk in members.chunks(rois_per_chunk) {
            let index = Tensor::from_slice(chunk).to_device(device);
            outputs.push(if gh == 0 {
                Tensor::zeros(
                    [chunk.len() as i64, channels, pooled_height, pooled_width],
                    (kind, device),
                )
            } else {
                geometry.pool(&pixels, &index, (gh, gw), (height, width))
            });
        }
        order.extend(members);
    }
    let pooled = Tensor::cat(&outputs, 0);
    let in_order = order
        .iter()
        .enumerate()
        .all(|(position, &k)| position as i64 == k);
    let pooled = if in_order {
        pooled
    } else {
        // `position_of[k]`: where RoI k sits in the group-ordered result.
        let mut position_of = vec![0i64; order.len()];
        for (position, &k) in order.iter().enumerate() {
            position_of[k as usize] = position as i64;
        }
        pooled.index_select(0, &Tensor::from_slice(&position_of).to_device(device))
    };
    pooled.to_kind(out_kind)
}

/// Per-RoI quantities of the kernel, `[K]` tensors in the computation's precision.
struct RoiGeometry {
    /// The image of each RoI (i64, truncated as the kernel's `int` cast).
    batch_index: Tensor,
    roi_start_h: Tensor,
    roi_start_w: Tensor,
    bin_size_h: Tensor,
    bin_size_w: Tensor,
    /// Sample points per bin along y and x (i64; `<= 0` for an empty grid).
    grid_h: Tensor,
    grid_w: Tensor,
    pooled_height: i64,
    pooled_width: i64,
}

impl RoiGeometry {
    /// The kernel's per-RoI set-up, operation for operation (same rounding).
    fn new(
        rois: &Tensor,
        (pooled_height, pooled_width): (i64, i64),
        spatial_scale: f64,
        sampling_ratio: i64,
        aligned: bool,
    ) -> RoiGeometry {
        let offset = if aligned { 0.5 } else { 0.0 };
        let corner = |c: i64| rois.select(1, c) * spatial_scale - offset;
        let (roi_start_w, roi_start_h) = (corner(1), corner(2));
        let (roi_end_w, roi_end_h) = (corner(3), corner(4));
        let mut roi_width = roi_end_w - &roi_start_w;
        let mut roi_height = roi_end_h - &roi_start_h;
        if !aligned {
            // Malformed RoIs are forced to 1×1 pixels.
            roi_width = roi_width.clamp_min(1.0);
            roi_height = roi_height.clamp_min(1.0);
        }
        let bin_size_h = &roi_height / pooled_height as f64;
        let bin_size_w = &roi_width / pooled_width as f64;
        let (grid_h, grid_w) = if sampling_ratio > 0 {
            let fixed = Tensor::full(
                [rois.size()[0]],
                sampling_ratio,
                (Kind::Int64, rois.device()),
            );
            (fixed.shallow_clone(), fixed)
        } else {
            (
                (&roi_height / pooled_height as f64)
                    .ceil()
                    .to_kind(Kind::Int64),
                (&roi_width / pooled_width as f64)
                    .ceil()
                    .to_kind(Kind::Int64),
            )
        };
        RoiGeometry {
            batch_index: rois.select(1, 0).to_kind(Kind::Int64),
            roi_start_h,
            roi_start_w,
            bin_size_h,
            bin_size_w,
            grid_h,
            grid_w,
            pooled_height,
            pooled_width,
        }
    }

    /// The pooled `[n, C, oh, ow]` features of the RoIs `index` (`[n]`), all with `gh × gw`
    /// sample points per bin, from `pixels` (`[N·H·W, C]`).
    fn pool(
        &self,
        pixels: &Tensor,
        index: &Tensor,
        (gh, gw): (i64, i64),
        (height, width): (i64, i64),
    ) -> Tensor {
        let n = index.size()[0];
        let channels = pixels.size()[1];
        let (oh, ow) = (self.pooled_height, self.pooled_width);
        let pick = |t: &Tensor| t.index_select(0, index);
        let y = AxisSamples::new(
            &pick(&self.roi_start_h),
            &pick(&self.bin_size_h),
            oh,
            gh,
            height,
        );
        let x = AxisSamples::new(
            &pick(&self.roi_start_w),
            &pick(&self.bin_size_w),
            ow,
            gw,
            width,
        );
        // Broadcast to [n, oh, ow, gh, gw]: y varies along (oh, gh), x along (ow, gw).
        let along_y = |t: &Tensor| t.view([n, oh, 1, gh, 1]);
        let along_x = |t: &Tensor| t.view([n, 1, ow, 1, gw]);
        let first_pixel = (pick(&self.batch_index) * (height * width)).view([n, 1, 1, 1, 1]);
        let row = |y_pixel: &Tensor| &first_pixel + along_y(y_pixel) * width;
        // The kernel's corners in its order: (low, low), (low, high), (high, low), (high, high).
        let corners = [
            (&y.low, &x.low),
            (&y.low, &x.high),
            (&y.high, &x.low),
            (&y.high, &x.high),
        ];
        let weights = [
            (&y.low_weight, &x.low_weight),
            (&y.low_weight, &x.high_weight),
            (&y.high_weight, &x.low_weight),
            (&y.high_weight, &x.high_weight),
        ];
        // [n, oh, ow, 4, gh, gw]: each output bin's 4·gh·gw weighted rows lie together.
        let rows = Tensor::stack(&corners.map(|(yc, xc)| row(yc) + along_x(xc)), 3);
        let weights = Tensor::stack(&weights.map(|(wy, wx)| along_y(wy) * along_x(wx)), 3);
        // One bag of 4·gh·gw weighted rows per output bin, summed without materialising them.
        let points = 4 * gh * gw;
        let bags = n * oh * ow;
        let offsets =
            Tensor::arange_start_step(0, bags * points, points, (Kind::Int64, pixels.device()));
        let (sums, _, _, _) = Tensor::embedding_bag(
            pixels,
            &rows.view([-1]),
            &offsets,
            false,
            EMBEDDING_BAG_SUM,
            false,
            Some(weights.view([-1])),
            false,
        );
        // Each bin: the sum of its points divided by their number, as the kernel.
        let pooled = (sums / (gh * gw) as f64).view([n, oh, ow, channels]);
        pooled.permute([0, 3, 1, 2]).contiguous()
    }
}

/// The kernel's bilinear set-up along one axis for the sample points of `n` RoIs, `[n, bins,
/// grid]` tensors: the lower and upper neighbouring pixel of each point and their weights.
struct AxisSamples {
    low: Tensor,
    high: Tensor,
    /// `1 - (p - low)`: the weight of `low` (0 for a point the kernel drops).
    low_weight: Tensor,
    /// `p - low`: the weight of `high` (0 for a point the kernel drops).
    high_weight: Tensor,
}

impl AxisSamples {
    /// Point `i` of bin `b` lies at `start + b·bin_size + (i + 0.5)·bin_size / grid` (the
    /// kernel's operations in its order). The kernel drops a point outside `[-1, size]`, moves
    /// one in `[-1, 0]` to 0 and one past the last pixel onto it.
    fn new(start: &Tensor, bin_size: &Tensor, bins: i64, grid: i64, size: i64) -> AxisSamples {
        let options = (start.kind(), start.device());
        let n = start.size()[0];
        let bin = Tensor::arange(bins, options).view([1, bins, 1]);
        let point = (Tensor::arange(grid, options) + 0.5).view([1, 1, grid]);
        let start = start.view([n, 1, 1]);
        let bin_size = bin_size.view([n, 1, 1]);
        let p = (start + bin * &bin_size) + (point * &bin_size) / grid as f64;
        // NaN coordinates fail both comparisons, as in the kernel.
        let valid = p.ge(-1.0).logical_and(&p.le(size as f64));
        // Dropped points read pixel 0 with weight 0 (the kernel's empty pre-computation).
        let p = p.where_self(&valid, &p.zeros_like()).clamp_min(0.0);
        let low = p.to_kind(Kind::Int64);
        let last = low.ge(size - 1);
        let low = low.clamp_max(size - 1);
        let high = (&low + 1).where_self(&last.logical_not(), &low);
        let p = low.to_kind(options.0).where_self(&last, &p);
        let high_weight = &p - low.to_kind(options.0);
        let low_weight = 1.0 - &high_weight;
        let drop = |w: Tensor| w.where_self(&valid, &w.zeros_like());
        AxisSamples {
            low,
            high,
            low_weight: drop(low_weight),
            high_weight: drop(high_weight),
        }
    }
}
