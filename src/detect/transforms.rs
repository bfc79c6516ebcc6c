//! Joint image/box transforms for detection training: a horizontal flip and a random crop
//! (torchvision's `RandomIoUCrop` sampling, keeping the boxes whose centre lies in the crop),
//! both moving the boxes with the pixels, and [`to_tensor`].
//!
//! Resizing is not done here: the model's input transform resizes every image to the scale the
//! loader chose for it (as torchvision's `GeneralizedRCNNTransform`), so the boxes stay in the
//! pixels of the image the loader hands over.

use super::dataset::Object;
use crate::data::transforms::{crop as crop_image, hflip_in_place, Rect};
use crate::data::Image;
use rand::Rng;
use tch::Tensor;

/// Mirrors the boxes of a `width`-pixel-wide image left–right: `x1' = W − x2`, `x2' = W − x1`.
pub fn hflip_boxes(objects: &mut [Object], width: u32) {
    let w = width as f32;
    for o in objects {
        let [x1, y1, x2, y2] = o.bbox;
        o.bbox = [w - x2, y1, w - x1, y2];
    }
}

/// Mirrors the image and its boxes left–right.
pub fn hflip(image: &mut Image, objects: &mut [Object]) {
    hflip_in_place(image);
    hflip_boxes(objects, image.width);
}

/// The random crop's parameters: torchvision's `RandomIoUCrop` names and defaults, without its
/// IoU options (a crop is accepted when at least one training box keeps its centre in it).
#[derive(Clone, Debug, PartialEq)]
pub struct CropOptions {
    /// Smallest fraction of each side the crop keeps.
    pub min_scale: f64,
    /// Largest fraction of each side the crop keeps.
    pub max_scale: f64,
    /// Smallest crop width / height.
    pub min_aspect_ratio: f64,
    /// Largest crop width / height.
    pub max_aspect_ratio: f64,
    /// Crops drawn before giving up (the image is then not cropped).
    pub trials: usize,
}

impl Default for CropOptions {
    fn default() -> CropOptions {
        CropOptions {
            min_scale: 0.3,
            max_scale: 1.0,
            min_aspect_ratio: 0.5,
            max_aspect_ratio: 2.0,
            trials: 40,
        }
    }
}

impl CropOptions {
    /// Checks the ranges; the error names the option.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.min_scale > 0.0 && self.min_scale <= self.max_scale && self.max_scale <= 1.0) {
            anyhow::bail!(
                "crop scale range [{}, {}] must satisfy 0 < min_scale <= max_scale <= 1",
                self.min_scale,
                self.max_scale
            );
        }
        if !(self.min_aspect_ratio > 0.0 && self.min_aspect_ratio <= self.max_aspect_ratio) {
            anyhow::bail!(
                "crop aspect ratio range [{}, {}] must satisfy 0 < min_aspect_ratio <= max_aspect_ratio",
                self.min_aspect_ratio,
                self.max_aspect_ratio
            );
        }
        if self.trials == 0 {
            anyhow::bail!("crop trials must be at least 1");
        }
        Ok(())
    }
}

/// The centre of a box.
fn centre(o: &Object) -> (f32, f32) {
    let [x1, y1, x2, y2] = o.bbox;
    ((x1 + x2) / 2.0, (y1 + y2) / 2.0)
}

/// Whether a point lies strictly inside a rectangle (torchvision's `is_within_crop_area`).
fn inside(rect: Rect, (cx, cy): (f32, f32)) -> bool {
    let (l, t) = (rect.x as f32, rect.y as f32);
    let (r, b) = (l + rect.width as f32, t + rect.height as f32);
    l < cx && cx < r && t < cy && cy < b
}

/// Draws a crop of a `width` x `height` image as `RandomIoUCrop.make_params` does: each side
/// scaled by a factor in `[min_scale, max_scale]` (truncated to whole pixels), the aspect ratio
/// checked, the position uniform; a crop is accepted when the centre of at least one non-crowd
/// box lies strictly inside it. `None` (no crop) after `trials` misses, or when the image has
/// no non-crowd box to keep.
pub fn random_crop_rect(
    width: u32,
    height: u32,
    objects: &[Object],
    opts: &CropOptions,
    rng: &mut impl Rng,
) -> Option<Rect> {
    let targets: Vec<(f32, f32)> = objects.iter().filter(|o| !o.iscrowd).map(centre).collect();
    if targets.is_empty() {
        return None;
    }
    let span = opts.max_scale - opts.min_scale;
    for _ in 0..opts.trials {
        let new_w = (width as f64 * (opts.min_scale + span * rng.gen::<f64>())) as u32;
        let new_h = (height as f64 * (opts.min_scale + span * rng.gen::<f64>())) as u32;
        if new_w == 0 || new_h == 0 {
            continue;
        }
        let aspect = new_w as f64 / new_h as f64;
        if !(opts.min_aspect_ratio..=opts.max_aspect_ratio).contains(&aspect) {
            continue;
        }
        let x = ((width - new_w) as f64 * rng.gen::<f64>()) as u32;
        let y = ((height - new_h) as f64 * rng.gen::<f64>()) as u32;
        let rect = Rect {
            x,
            y,
            width: new_w,
            height: new_h,
        };
        if targets.iter().any(|&c| inside(rect, c)) {
            return Some(rect);
        }
    }
    None
}

/// The `rect` part of the image and the objects whose box centre lies strictly inside it,
/// shifted into the crop and clipped to it (a box clipped to zero width or height is left out).
/// A kept object's `area` shrinks in proportion to its box.
pub fn crop(image: &Image, objects: &[Object], rect: Rect) -> (Image, Vec<Object>) {
    let (dx, dy) = (rect.x as f32, rect.y as f32);
    let (w, h) = (rect.width as f32, rect.height as f32);
    let kept = objects
        .iter()
        .filter(|o| inside(rect, centre(o)))
        .filter_map(|o| {
            let [x1, y1, x2, y2] = o.bbox;
            let bbox = [
                (x1 - dx).clamp(0.0, w),
                (y1 - dy).clamp(0.0, h),
                (x2 - dx).clamp(0.0, w),
                (y2 - dy).clamp(0.0, h),
            ];
            if bbox[2] <= bbox[0] || bbox[3] <= bbox[1] {
                return None;
            }
            let mut out = Object { bbox, ..*o };
            out.area = o.area * out.box_area() / o.box_area();
            Some(out)
        })
        .collect();
    (crop_image(image, rect), kept)
}

/// [`random_crop_rect`] then [`crop`]; the image and objects unchanged when no crop is drawn.
pub fn random_crop(
    image: Image,
    objects: Vec<Object>,
    opts: &CropOptions,
    rng: &mut impl Rng,
) -> (Image, Vec<Object>) {
    match random_crop_rect(image.width, image.height, &objects, opts, rng) {
        Some(rect) => crop(&image, &objects, rect),
        None => (image, objects),
    }
}

/// The image as a `[3, H, W]` f32 tensor in [0, 1] (torchvision's `to_tensor`: each byte / 255).
pub fn to_tensor(image: &Image) -> Tensor {
    let plane = image.width as usize * image.height as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in image.rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = px[c] as f32 / 255.0;
        }
    }
    Tensor::from_slice(&chw).view([3, image.height as i64, image.width as i64])
}
