//! Box arithmetic for detection, as torchvision's `torchvision.ops.boxes` and
//! `torchvision.models.detection._utils.BoxCoder` compute it.
//!
//! Boxes are `[N, 4]` float tensors of corners `(x1, y1, x2, y2)` on any device. Everything is
//! tensor operations, so it runs where the boxes are, except the greedy scan of non-maximum
//! suppression, which is sequential by nature and runs on the host, as in torchvision's own
//! kernels: for CPU tensors over the boxes themselves, for others over a suppression bitmask
//! built on their device.
//!
//! The functions panic on tensors of the wrong shape, as libtorch's own operations do: a wrong
//! shape here is a bug in the calling code, not a condition of the data.

use std::ops::{Add, Div, Mul, Sub};
use tch::{Device, Kind, Tensor};

/// Above this many box coordinates (`boxes.numel()`), torchvision's `batched_nms` runs NMS
/// class by class instead of offsetting the classes apart (its benchmarks, pytorch/vision#1311
/// and #8925, put the break-even there); the two can keep different boxes at a borderline IoU,
/// so the same limits keep the results identical.
const BATCHED_NMS_PER_CLASS_ABOVE_CPU: i64 = 4000;
/// [`BATCHED_NMS_PER_CLASS_ABOVE_CPU`] for tensors on any other device.
const BATCHED_NMS_PER_CLASS_ABOVE_OTHER: i64 = 100_000;

/// Rows of the pairwise suppression matrix computed at once on the device: bounds the
/// `[rows, N]` IoU intermediates to about 64 MiB of f32 whatever the number of boxes.
const NMS_MASK_ROWS_ELEMENTS: i64 = 1 << 24;

/// Half-precision boxes are computed in f32, as torchvision's `_upcast` does, so that areas and
/// products do not overflow.
fn upcast(boxes: &Tensor) -> Tensor {
    match boxes.kind() {
        Kind::Half | Kind::BFloat16 => boxes.to_kind(Kind::Float),
        _ => boxes.shallow_clone(),
    }
}

/// Panics unless `boxes` is `[N, 4]`; `what` names the argument in the message.
fn check_boxes(boxes: &Tensor, what: &str) {
    let size = boxes.size();
    assert!(
        size.len() == 2 && size[1] == 4,
        "{what}: boxes must be [N, 4] (x1, y1, x2, y2), got {size:?}"
    );
}

/// Panics unless `values` is `[n]`; `what` names the function and `name` the argument.
fn check_per_box(values: &Tensor, n: i64, what: &str, name: &str) {
    assert_eq!(
        values.size(),
        [n],
        "{what}: {name} must hold one value per box ([{n}])"
    );
}

/// The areas `(x2 - x1) * (y2 - y1)` of `[..., 4]` boxes: `[...]` (torchvision's `box_area`).
pub fn box_area(boxes: &Tensor) -> Tensor {
    let boxes = upcast(boxes);
    (boxes.select(-1, 2) - boxes.select(-1, 0)) * (boxes.select(-1, 3) - boxes.select(-1, 1))
}

/// Pairwise intersection over union of `[N, 4]` and `[M, 4]` boxes: `[N, M]`
/// (torchvision's `box_iou`; two empty boxes give 0/0 = NaN there too).
pub fn box_iou(boxes1: &Tensor, boxes2: &Tensor) -> Tensor {
    check_boxes(boxes1, "box_iou (boxes1)");
    check_boxes(boxes2, "box_iou (boxes2)");
    let area1 = box_area(boxes1);
    let area2 = box_area(boxes2);
    let lt = boxes1
        .slice(1, 0, 2, 1)
        .unsqueeze(1)
        .maximum(&boxes2.slice(1, 0, 2, 1).unsqueeze(0)); // [N, M, 2]
    let rb = boxes1
        .slice(1, 2, 4, 1)
        .unsqueeze(1)
        .minimum(&boxes2.slice(1, 2, 4, 1).unsqueeze(0)); // [N, M, 2]
    let wh = upcast(&(rb - lt)).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area1.unsqueeze(1) + area2.unsqueeze(0) - &inter;
    inter / union
}

/// Clamps the x coordinates of `[..., 4]` boxes to `[0, width]` and the y coordinates to
/// `[0, height]` (torchvision's `clip_boxes_to_image`, `size = (height, width)`).
pub fn clip_boxes_to_image(boxes: &Tensor, height: i64, width: i64) -> Tensor {
    let size = boxes.size();
    assert!(
        size.last() == Some(&4),
        "clip_boxes_to_image: boxes must be [..., 4], got {size:?}"
    );
    let dim = size.len() as i64;
    let boxes_x = boxes.slice(-1, 0, 4, 2).clamp(0.0, width as f64);
    let boxes_y = boxes.slice(-1, 1, 4, 2).clamp(0.0, height as f64);
    // [..., 2 corners, (x, y)] flattens back to (x1, y1, x2, y2).
    Tensor::stack(&[boxes_x, boxes_y], dim).reshape(&size)
}

/// Indices (i64) of the `[N, 4]` boxes whose width and height are both at least `min_size`
/// (torchvision's `remove_small_boxes`).
pub fn remove_small_boxes(boxes: &Tensor, min_size: f64) -> Tensor {
    check_boxes(boxes, "remove_small_boxes");
    let ws = boxes.select(1, 2) - boxes.select(1, 0);
    let hs = boxes.select(1, 3) - boxes.select(1, 1);
    let keep = ws.ge(min_size).logical_and(&hs.ge(min_size));
    keep.nonzero().view([-1])
}

/// Non-maximum suppression, exactly as `torchvision.ops.nms`: visits the boxes by decreasing
/// score (a stable sort: equal scores in index order) and keeps a box unless its IoU with a box
/// kept before it is above `iou_threshold`. Returns the kept indices (i64, on the boxes' device)
/// in the order visited.
///
/// On the CPU the greedy loop runs over the boxes in their own precision with the arithmetic of
/// torchvision's CPU kernel (areas `(x2 - x1) * (y2 - y1)`, IoU compared in f64), so ties and
/// borderline IoUs come out the same; elsewhere it is [`nms_by_mask`], as its CUDA kernel.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    check_boxes(boxes, "nms");
    let n = boxes.size()[0];
    check_per_box(scores, n, "nms", "scores");
    if boxes.device() != Device::Cpu {
        return nms_by_mask(boxes, scores, iou_threshold);
    }
    if n == 0 {
        return Tensor::empty([0], (Kind::Int64, boxes.device()));
    }
    let order = visiting_order(scores);
    let order_host = Vec::<i64>::try_from(&order).expect("nms: the score order to the host");
    let keep = match boxes.kind() {
        Kind::Double => greedy_nms(
            &host_coordinates::<f64>(boxes, Kind::Double),
            &order_host,
            iou_threshold,
        ),
        // f32 is torchvision's arithmetic for f32 boxes; f16 and bf16 (which its CPU kernel
        // refuses) are computed in f32 too.
        _ => greedy_nms(
            &host_coordinates::<f32>(boxes, Kind::Float),
            &order_host,
            iou_threshold,
        ),
    };
    Tensor::from_slice(&keep).to_device(boxes.device())
}

/// The order in which NMS visits the boxes: by decreasing score, ties in index order.
fn visiting_order(scores: &Tensor) -> Tensor {
    scores.detach().argsort_stable(true, 0, true)
}

/// The `[N, 4]` boxes on the host as `kind`, coordinate by coordinate: `[x1, y1, x2, y2]`.
fn host_coordinates<T>(boxes: &Tensor, kind: Kind) -> [Vec<T>; 4]
where
    for<'a> Vec<T>: TryFrom<&'a Tensor, Error = tch::TchError>,
{
    let columns = boxes
        .detach()
        .to_device(Device::Cpu)
        .to_kind(kind)
        .transpose(0, 1)
        .contiguous();
    std::array::from_fn(|c| {
        Vec::<T>::try_from(&columns.get(c as i64)).expect("nms: box coordinates to the host")
    })
}

/// The float arithmetic the greedy NMS needs, for f32 and f64.
trait NmsFloat:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const ZERO: Self;
    fn to_f64(self) -> f64;
}

impl NmsFloat for f32 {
    const ZERO: f32 = 0.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl NmsFloat for f64 {
    const ZERO: f64 = 0.0;
    fn to_f64(self) -> f64 {
        self
    }
}

/// `std::max` as C++ defines it (`a < b ? b : a`), so NaN coordinates behave as in the kernel.
fn cpp_max<T: PartialOrd>(a: T, b: T) -> T {
    if a < b {
        b
    } else {
        a
    }
}

/// `std::min` as C++ defines it (`b < a ? b : a`).
fn cpp_min<T: PartialOrd>(a: T, b: T) -> T {
    if b < a {
        b
    } else {
        a
    }
}

/// torchvision's CPU NMS kernel on host coordinates: boxes visited in `order`, each kept unless
/// suppressed by an earlier kept box, and suppressing the later ones it overlaps by more than
/// `iou_threshold`. Returns the kept indices in visiting order.
fn greedy_nms<T: NmsFloat>(
    coordinates: &[Vec<T>; 4],
    order: &[i64],
    iou_threshold: f64,
) -> Vec<i64> {
    let [x1, y1, x2, y2] = coordinates;
    let areas: Vec<T> = (0..x1.len())
        .map(|i| (x2[i] - x1[i]) * (y2[i] - y1[i]))
        .collect();
    let mut suppressed = vec![false; x1.len()];
    let mut keep = Vec::new();
    for (position, &i) in order.iter().enumerate() {
        let i = i as usize;
        if suppressed[i] {
            continue;
        }
        keep.push(i as i64);
        for &j in &order[position + 1..] {
            let j = j as usize;
            if suppressed[j] {
                continue;
            }
            let xx1 = cpp_max(x1[i], x1[j]);
            let yy1 = cpp_max(y1[i], y1[j]);
            let xx2 = cpp_min(x2[i], x2[j]);
            let yy2 = cpp_min(y2[i], y2[j]);
            let w = cpp_max(T::ZERO, xx2 - xx1);
            let h = cpp_max(T::ZERO, yy2 - yy1);
            let inter = w * h;
            let overlap = inter / (areas[i] + areas[j] - inter);
            if overlap.to_f64() > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// NMS as torchvision's CUDA kernel computes it: the boxes sorted by decreasing score (stable),
/// the pairwise "IoU above `iou_threshold`" matrix built by tensor operations where the boxes
/// are and packed into 64-bit words there, then the greedy scan over those words on the host.
/// [`nms`] uses it for boxes off the CPU; it gives the same indices on the CPU too, except that
/// the IoU is compared with the threshold in the boxes' precision (as the CUDA kernel does)
/// rather than in f64.
pub fn nms_by_mask(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    check_boxes(boxes, "nms_by_mask");
    let n = boxes.size()[0];
    check_per_box(scores, n, "nms_by_mask", "scores");
    if n == 0 {
        return Tensor::empty([0], (Kind::Int64, boxes.device()));
    }
    let order = visiting_order(scores);
    let sorted = upcast(&boxes.detach()).index_select(0, &order);
    let words = suppression_words(&sorted, iou_threshold);
    let words_per_row = ((n + 63) / 64) as usize;
    let kept = scan_suppression_words(&words, n as usize, words_per_row);
    let kept = Tensor::from_slice(&kept).to_device(boxes.device());
    order.index_select(0, &kept)
}

/// Row `i` of the result, words `i * ceil(N / 64) ..`, has bit `j % 64` of word `j / 64` set when
/// sorted box `j > i` overlaps sorted box `i` by an IoU above `iou_threshold`.
fn suppression_words(sorted: &Tensor, iou_threshold: f64) -> Vec<u64> {
    let n = sorted.size()[0];
    let device = sorted.device();
    let padded = (n + 63) / 64 * 64;
    let [x1, y1, x2, y2] = [0, 1, 2, 3].map(|c| sorted.select(1, c));
    let areas = (&x2 - &x1) * (&y2 - &y1);
    let columns = Tensor::arange(n, (Kind::Int64, device));
    // Bit k of a word is worth 2^k; 2^63 wraps to i64::MIN, and the bits are distinct, so the
    // i64 sum of a row's weights is its bit pattern.
    let bit_values =
        Tensor::from_slice(&(0..64).map(|k| 1i64 << k).collect::<Vec<_>>()).to_device(device);
    let rows_per_chunk = (NMS_MASK_ROWS_ELEMENTS / n).max(1);
    let mut words = Vec::with_capacity((n * padded / 64) as usize);
    let mut start = 0;
    while start < n {
        let rows = rows_per_chunk.min(n - start);
        let row = |t: &Tensor| t.narrow(0, start, rows).unsqueeze(1);
        let col = |t: &Tensor| t.unsqueeze(0);
        let w = (row(&x2).minimum(&col(&x2)) - row(&x1).maximum(&col(&x1))).clamp_min(0.0);
        let h = (row(&y2).minimum(&col(&y2)) - row(&y1).maximum(&col(&y1))).clamp_min(0.0);
        let inter = w * h;
        let iou = &inter / (row(&areas) + col(&areas) - &inter);
        let later = col(&columns).gt_tensor(&row(&columns));
        let suppress = iou
            .gt(iou_threshold)
            .logical_and(&later)
            .to_kind(Kind::Int64);
        let suppress = suppress
            .constant_pad_nd([0, padded - n])
            .view([rows, padded / 64, 64]);
        let packed =
            (suppress * bit_values.view([1, 1, 64])).sum_dim_intlist(2, false, Kind::Int64);
        let packed = Vec::<i64>::try_from(&packed.to_device(Device::Cpu).view([-1]))
            .expect("nms: the suppression mask to the host");
        words.extend(packed.into_iter().map(|w| w as u64));
        start += rows;
    }
    words
}

/// The greedy scan of torchvision's CUDA NMS over the packed suppression rows: positions (in
/// sorted order) of the boxes kept.
fn scan_suppression_words(words: &[u64], n: usize, words_per_row: usize) -> Vec<i64> {
    let mut removed = vec![0u64; words_per_row];
    let mut kept = Vec::new();
    for i in 0..n {
        let (word, bit) = (i / 64, i % 64);
        if removed[word] & (1u64 << bit) == 0 {
            kept.push(i as i64);
            let row = &words[i * words_per_row..(i + 1) * words_per_row];
            for (r, w) in removed[word..].iter_mut().zip(&row[word..]) {
                *r |= w;
            }
        }
    }
    kept
}

/// NMS within each category `idxs` (i64 `[N]`): torchvision's `batched_nms`, same kept indices
/// in the same order (decreasing score). Up to 4000 coordinates on the CPU (100 000 elsewhere)
/// it offsets each category's boxes beyond all others and runs one NMS; above, one NMS per
/// category, as torchvision does.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    check_boxes(boxes, "batched_nms");
    let n = boxes.size()[0];
    check_per_box(scores, n, "batched_nms", "scores");
    check_per_box(idxs, n, "batched_nms", "idxs");
    let per_class_above = if boxes.device() == Device::Cpu {
        BATCHED_NMS_PER_CLASS_ABOVE_CPU
    } else {
        BATCHED_NMS_PER_CLASS_ABOVE_OTHER
    };
    if boxes.numel() as i64 > per_class_above {
        batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    } else {
        batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)
    }
}

/// torchvision's `_batched_nms_coordinate_trick`: each category's boxes moved by
/// `idx * (max coordinate + 1)`, so that boxes of different categories never overlap.
fn batched_nms_coordinate_trick(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f64,
) -> Tensor {
    if boxes.numel() == 0 {
        return Tensor::empty([0], (Kind::Int64, boxes.device()));
    }
    let boxes = boxes.detach();
    let max_coordinate = boxes.max();
    let offsets = idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0);
    let boxes_for_nms = &boxes + offsets.unsqueeze(1);
    nms(&boxes_for_nms, scores, iou_threshold)
}

/// torchvision's `_batched_nms_vanilla`: one NMS per category, the kept boxes then sorted by
/// score with the same (unstable) sort call as torchvision, so that ties come out alike.
fn batched_nms_per_class(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f64,
) -> Tensor {
    let (boxes, scores) = (boxes.detach(), scores.detach());
    let mut keep_mask = Tensor::zeros([boxes.size()[0]], (Kind::Bool, boxes.device()));
    let (classes, _) = idxs.internal_unique(true, false);
    let classes = Vec::<i64>::try_from(&classes.to_kind(Kind::Int64).to_device(Device::Cpu))
        .expect("batched_nms: the categories to the host");
    for class_id in classes {
        let current = idxs.eq(class_id).nonzero().view([-1]);
        let kept = nms(
            &boxes.index_select(0, &current),
            &scores.index_select(0, &current),
            iou_threshold,
        );
        let _ = keep_mask.index_fill_(0, &current.index_select(0, &kept), 1);
    }
    let keep_indices = keep_mask.nonzero().view([-1]);
    let (_, by_score) = scores.index_select(0, &keep_indices).sort(0, true);
    keep_indices.index_select(0, &by_score)
}

/// The box parametrisation of Faster R-CNN's regressions (torchvision's `BoxCoder`): a box
/// relative to a reference box as `(wx·dx, wy·dy, ww·dw, wh·dh)`, centre offsets in units of
/// the reference's size and log size ratios.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxCoder {
    /// `(wx, wy, ww, wh)`: the factors of the centre offsets and of the log size ratios
    /// (torchvision: `(1, 1, 1, 1)` in the RPN, `(10, 10, 5, 5)` in the RoI heads).
    pub weights: [f64; 4],
    /// Decoded log size ratios are clamped to at most this before `exp`, so that a wild
    /// regression cannot overflow.
    pub bbox_xform_clip: f64,
}

impl BoxCoder {
    /// A coder with `weights` and torchvision's clamp `ln(1000 / 16)`.
    pub fn new(weights: [f64; 4]) -> BoxCoder {
        BoxCoder {
            weights,
            bbox_xform_clip: (1000.0f64 / 16.0).ln(),
        }
    }

    /// The regression targets `[N, 4]` that take each of the `[N, 4]` `proposals` to the
    /// matching `reference_boxes` (torchvision's `encode_single` / `encode_boxes`).
    pub fn encode(&self, reference_boxes: &Tensor, proposals: &Tensor) -> Tensor {
        check_boxes(reference_boxes, "BoxCoder::encode (reference_boxes)");
        check_boxes(proposals, "BoxCoder::encode (proposals)");
        let [wx, wy, ww, wh] = self.weights;
        let column = |t: &Tensor, c: i64| t.select(1, c).unsqueeze(1);
        let (proposals_x1, proposals_y1) = (column(proposals, 0), column(proposals, 1));
        let (proposals_x2, proposals_y2) = (column(proposals, 2), column(proposals, 3));
        let (reference_x1, reference_y1) = (column(reference_boxes, 0), column(reference_boxes, 1));
        let (reference_x2, reference_y2) = (column(reference_boxes, 2), column(reference_boxes, 3));

        let ex_widths = proposals_x2 - &proposals_x1;
        let ex_heights = proposals_y2 - &proposals_y1;
        let ex_ctr_x = proposals_x1 + &ex_widths * 0.5;
        let ex_ctr_y = proposals_y1 + &ex_heights * 0.5;

        let gt_widths = reference_x2 - &reference_x1;
        let gt_heights = reference_y2 - &reference_y1;
        let gt_ctr_x = reference_x1 + &gt_widths * 0.5;
        let gt_ctr_y = reference_y1 + &gt_heights * 0.5;

        let targets_dx = (gt_ctr_x - ex_ctr_x) * wx / &ex_widths;
        let targets_dy = (gt_ctr_y - ex_ctr_y) * wy / &ex_heights;
        let targets_dw = (gt_widths / ex_widths).log() * ww;
        let targets_dh = (gt_heights / ex_heights).log() * wh;
        Tensor::cat(&[targets_dx, targets_dy, targets_dw, targets_dh], 1)
    }

    /// Applies the `[N, 4K]` regressions `rel_codes` (K boxes per reference box, as the RoI
    /// heads' per-class outputs) to the `[N, 4]` reference `boxes`: `[N, K, 4]` boxes
    /// (torchvision's `decode` for one concatenated box list; for `N = 0` its `[0, 4K]` result
    /// comes back as `[0, K, 4]` here).
    pub fn decode(&self, rel_codes: &Tensor, boxes: &Tensor) -> Tensor {
        check_boxes(boxes, "BoxCoder::decode (boxes)");
        let n = boxes.size()[0];
        let rel_codes = if n > 0 {
            rel_codes.reshape([n, -1])
        } else {
            rel_codes.reshape([0, rel_codes.size().last().copied().unwrap_or(4)])
        };
        let codes = rel_codes.size()[1];
        assert!(
            codes % 4 == 0,
            "BoxCoder::decode: rel_codes must hold 4 numbers per box, got {codes} per reference box"
        );
        self.decode_single(&rel_codes, boxes)
            .view([n, codes / 4, 4])
    }

    /// torchvision's `decode_single`: `[N, 4K]` regressions applied to `[N, 4]` boxes, `[N, 4K]`.
    pub fn decode_single(&self, rel_codes: &Tensor, boxes: &Tensor) -> Tensor {
        let boxes = boxes.to_kind(rel_codes.kind());
        let widths = boxes.select(1, 2) - boxes.select(1, 0);
        let heights = boxes.select(1, 3) - boxes.select(1, 1);
        let ctr_x = boxes.select(1, 0) + &widths * 0.5;
        let ctr_y = boxes.select(1, 1) + &heights * 0.5;

        let [wx, wy, ww, wh] = self.weights;
        let codes = rel_codes.size()[1];
        let every_fourth = |first: i64| rel_codes.slice(1, first, codes, 4);
        let dx = every_fourth(0) / wx;
        let dy = every_fourth(1) / wy;
        let dw = (every_fourth(2) / ww).clamp_max(self.bbox_xform_clip);
        let dh = (every_fourth(3) / wh).clamp_max(self.bbox_xform_clip);

        let pred_ctr_x = dx * widths.unsqueeze(1) + ctr_x.unsqueeze(1);
        let pred_ctr_y = dy * heights.unsqueeze(1) + ctr_y.unsqueeze(1);
        let pred_w = dw.exp() * widths.unsqueeze(1);
        let pred_h = dh.exp() * heights.unsqueeze(1);
        // Half the size: the distance from the centre to the corners.
        let c_to_c_w = pred_w * 0.5;
        let c_to_c_h = pred_h * 0.5;
        Tensor::stack(
            &[
                &pred_ctr_x - &c_to_c_w,
                &pred_ctr_y - &c_to_c_h,
                pred_ctr_x + c_to_c_w,
                pred_ctr_y + c_to_c_h,
            ],
            2,
        )
        .flatten(1, -1)
    }
}
