//! torchvision's `GeneralizedRCNNTransform`: normalise each image, resize it by its shorter side
//! (bounded by the longer side), batch the images with zero padding to a multiple of
//! `size_divisible`, scale the targets' boxes with their image; after detection, map boxes back
//! to each image's original size.

use tch::{Kind, Tensor};

/// A padded batch and the size of each image in it before padding (torchvision's `ImageList`).
#[derive(Debug)]
pub struct ImageList {
    /// `[N, 3, H, W]`, each image at the top left, zeros elsewhere.
    pub tensors: Tensor,
    /// `(height, width)` of each resized image, without the padding.
    pub image_sizes: Vec<(i64, i64)>,
}

/// The input transform (torchvision's `GeneralizedRCNNTransform` with a per-image shorter side:
/// torchvision draws it from its `min_size` tuple; here the caller passes it).
#[derive(Debug, Clone)]
pub struct GeneralizedRcnnTransform {
    /// The longer side's bound: an image is scaled by `min(min_size / short, max_size / long)`.
    pub max_size: i64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// The batch's height and width are rounded up to a multiple of this.
    pub size_divisible: i64,
}

impl GeneralizedRcnnTransform {
    /// `(image - mean) / std` per channel, in the image's dtype.
    pub fn normalize(&self, image: &Tensor) -> Tensor {
        let per_channel = |v: &[f64; 3]| {
            Tensor::from_slice(v)
                .to_kind(image.kind())
                .to_device(image.device())
                .view([3, 1, 1])
        };
        (image - per_channel(&self.image_mean)) / per_channel(&self.image_std)
    }

    /// `image` (`[C, H, W]`) resized bilinearly so that its shorter side is `min_size` (or its
    /// longer side `max_size`, whichever scales less), exactly as torchvision's
    /// `_resize_image_and_masks`: `interpolate(scale_factor=s, mode="bilinear",
    /// recompute_scale_factor=True, align_corners=False)`.
    pub fn resize(&self, image: &Tensor, min_size: i64) -> Tensor {
        let size = image.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        let (out_h, out_w) = resized_size(h, w, min_size, self.max_size);
        // recompute_scale_factor=True: the kernel gets the output size only and derives its
        // scales from in/out, as here.
        image
            .unsqueeze(0)
            .upsample_bilinear2d([out_h, out_w], false, None, None)
            .squeeze_dim(0)
    }

    /// Normalises and resizes each image (its shorter side to `min_sizes[i]`) and pads them into
    /// one batch.
    pub fn forward(&self, images: &[Tensor], min_sizes: &[i64]) -> ImageList {
        assert_eq!(
            images.len(),
            min_sizes.len(),
            "one shorter side per image: {} images, {} sizes",
            images.len(),
            min_sizes.len()
        );
        let resized: Vec<Tensor> = images
            .iter()
            .zip(min_sizes)
            .map(|(image, &min_size)| {
                assert!(
                    image.dim() == 3,
                    "images must be [C, H, W], got {:?}",
                    image.size()
                );
                assert!(
                    matches!(
                        image.kind(),
                        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
                    ),
                    "images must be floating point in [0, 1], got {:?}",
                    image.kind()
                );
                self.resize(&self.normalize(image), min_size)
            })
            .collect();
        let image_sizes = resized.iter().map(|t| (t.size()[1], t.size()[2])).collect();
        ImageList {
            tensors: self.batch_images(&resized),
            image_sizes,
        }
    }

    /// Stacks `[C, H, W]` images into `[N, C, H', W']`, zero-padded at the bottom and right to
    /// the largest height and width, rounded up to a multiple of `size_divisible`.
    pub fn batch_images(&self, images: &[Tensor]) -> Tensor {
        let round_up = |v: i64| {
            let d = self.size_divisible.max(1);
            (v + d - 1) / d * d
        };
        let h = round_up(images.iter().map(|t| t.size()[1]).max().unwrap_or(0));
        let w = round_up(images.iter().map(|t| t.size()[2]).max().unwrap_or(0));
        let padded: Vec<Tensor> = images
            .iter()
            .map(|t| {
                let (ih, iw) = (t.size()[1], t.size()[2]);
                t.constant_pad_nd([0, w - iw, 0, h - ih])
            })
            .collect();
        Tensor::stack(&padded, 0)
    }
}

/// The size torchvision's resize gives an `h`×`w` image: scale `s = min(min_size / min(h, w),
/// max_size / max(h, w))` (in f64, as Python's floats), then `floor(side · s)` per side (the
/// output size of `interpolate` with `recompute_scale_factor=True`).
pub fn resized_size(h: i64, w: i64, min_size: i64, max_size: i64) -> (i64, i64) {
    let scale = (min_size as f64 / h.min(w) as f64).min(max_size as f64 / h.max(w) as f64);
    (
        (h as f64 * scale).floor() as i64,
        (w as f64 * scale).floor() as i64,
    )
}

/// `boxes` (`[N, 4]`, x1 y1 x2 y2) of an image of size `original` (h, w) in the coordinates of
/// the same image at size `new`: x scaled by new_w / old_w, y by new_h / old_h, both ratios in
/// f32 as torchvision's `resize_boxes`.
pub fn resize_boxes(boxes: &Tensor, original: (i64, i64), new: (i64, i64)) -> Tensor {
    let ratio_h = new.0 as f32 / original.0 as f32;
    let ratio_w = new.1 as f32 / original.1 as f32;
    let ratios = Tensor::from_slice(&[ratio_w, ratio_h, ratio_w, ratio_h])
        .to_kind(boxes.kind())
        .to_device(boxes.device());
    boxes * ratios
}
