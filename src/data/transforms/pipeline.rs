//! Pipelines: [`Transform`] chains the geometry, resampling and colour steps into the training and
//! evaluation pipelines of a [`DataConfig`].

use super::auto_augment::auto_augment;
use super::colour::{
    affine_to_chw, color_affine, draw_color_ops, draw_lighting_alpha, lighting_offset, Affine,
};
use super::geometry::{random_pad_crop, random_resized_crop_rect, Flip};
use super::mean_rgb;
use super::resample::{crop_axes, eval_axes, resample_into, scratch_slice, with_scratch};
use crate::config::{AutoAugmentPolicy, DataConfig, Pipeline};
use crate::data::Image;
use rand::Rng;

/// The training and evaluation pipelines of a [`DataConfig`], writing normalised CHW f32.
#[derive(Clone, Debug)]
pub struct Transform {
    /// The `[data]` settings the pipelines follow: `pipeline`, `train_size`, `val_size`,
    /// `val_crop_ratio`, `rrc_area`, `rrc_aspect`, `flip`, `alternate_flip` (the loader then
    /// decides each flip by [`alternating_flip`](super::alternating_flip)), `jitter`, `hue`,
    /// `lighting`, `cifar_pad`, `pad_mode`, `erase_*`, `auto_augment`, `mean`, `std`. The
    /// loading keys are not read.
    pub cfg: DataConfig,
    /// `cfg.auto_augment` parsed.
    pub auto_augment: Option<AutoAugmentPolicy>,
    /// `cfg.mean` as f32.
    pub mean: [f32; 3],
    /// `cfg.std` as f32.
    pub std: [f32; 3],
    /// (v/255 − mean)/std for every u8 value, per channel.
    lut: [[f32; 256]; 3],
}

impl Transform {
    /// Panics on an invalid `cfg.auto_augment` (which `Config::validate` refuses before).
    pub fn new(cfg: &DataConfig) -> Transform {
        let auto_augment =
            AutoAugmentPolicy::parse(&cfg.auto_augment).unwrap_or_else(|e| panic!("{e:#}"));
        let mean = cfg.mean.map(|v| v as f32);
        let std = cfg.std.map(|v| v as f32);
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, x) in table.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Transform {
            cfg: cfg.clone(),
            auto_augment,
            mean,
            std,
            lut,
        }
    }

    /// Floats per training sample (3·train_size²).
    pub fn train_len(&self) -> usize {
        3 * self.cfg.train_size as usize * self.cfg.train_size as usize
    }

    /// Floats per evaluation sample (3·val_size²).
    pub fn eval_len(&self) -> usize {
        3 * self.cfg.val_size as usize * self.cfg.val_size as usize
    }

    /// Normalises a u8 image through the lookup table into CHW `out`.
    pub fn normalize_u8_into(&self, img: &Image, out: &mut [f32]) {
        let n = img.width as usize * img.height as usize;
        assert_eq!(out.len(), 3 * n);
        let (r, rest) = out.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for (i, p) in img.rgb.chunks_exact(3).enumerate() {
            r[i] = self.lut[0][p[0] as usize];
            g[i] = self.lut[1][p[1] as usize];
            b[i] = self.lut[2][p[2] as usize];
        }
    }

    /// The training transform of the configured pipeline into `out` (3·train_size² floats),
    /// flipping at random when `data.flip`.
    pub fn train_into(&self, img: &Image, rng: &mut impl Rng, out: &mut [f32]) {
        let flip = if self.cfg.flip {
            Flip::Random
        } else {
            Flip::Never
        };
        self.train_flipped_into(img, rng, flip, out)
    }

    /// [`Transform::train_into`] with the flip given; `data.auto_augment` after the crop and flip,
    /// random erasing last, when `data.erase_prob` (the draws of each follow the ones before, so
    /// runs without them draw as before).
    pub fn train_flipped_into(&self, img: &Image, rng: &mut impl Rng, flip: Flip, out: &mut [f32]) {
        self.train_geometry_into(img, rng, flip, out);
        let c = &self.cfg;
        if c.erase_prob > 0.0 {
            let s = c.train_size as usize;
            let erasing = super::Erasing {
                p: c.erase_prob,
                area: c.erase_area,
                aspect: c.erase_aspect,
            };
            erasing.apply(out, 3, s, s, rng);
        }
    }

    fn train_geometry_into(&self, img: &Image, rng: &mut impl Rng, flip: Flip, out: &mut [f32]) {
        assert_eq!(out.len(), self.train_len());
        let s = self.cfg.train_size;
        match self.cfg.pipeline {
            Pipeline::Cifar => {
                let cropped =
                    random_pad_crop(img, self.cfg.cifar_pad, self.cfg.pad_mode, s, flip, rng);
                match &self.auto_augment {
                    Some(policy) => {
                        self.normalize_u8_into(&auto_augment(&cropped, policy, rng), out)
                    }
                    None => self.normalize_u8_into(&cropped, out),
                }
            }
            Pipeline::Imagenet => {
                let rect = random_resized_crop_rect(
                    img.width,
                    img.height,
                    self.cfg.rrc_area,
                    self.cfg.rrc_aspect,
                    rng,
                );
                let flip = flip.draw(rng);
                let ops = draw_color_ops(self.cfg.jitter, self.cfg.hue, rng);
                let alpha = draw_lighting_alpha(self.cfg.lighting, rng);
                let (xa, ya) = crop_axes(rect, s, s, flip);
                with_scratch(|sc| {
                    let mut hwc = std::mem::take(&mut sc.hwc);
                    let buf = scratch_slice(&mut hwc, self.train_len());
                    resample_into(img, &xa, &ya, buf, sc);
                    if let Some(policy) = &self.auto_augment {
                        // The operations work on u8 images, as torchvision's on PIL images:
                        // the crop rounded as PIL's resize rounds its result, then augmented.
                        let crop = Image::from_rgb(
                            s,
                            s,
                            buf.iter()
                                .map(|&v| v.round().clamp(0.0, 255.0) as u8)
                                .collect(),
                        );
                        let augmented = auto_augment(&crop, policy, &mut *rng);
                        for (f, &v) in buf.iter_mut().zip(&augmented.rgb) {
                            *f = v as f32;
                        }
                    }
                    // 0–255 → 0–1, colour ops, lighting, normalisation: one affine map.
                    let to_unit = Affine::linear(Affine::scaled_identity(1.0 / 255.0));
                    let colour = if ops.is_empty() {
                        Affine::IDENTITY
                    } else {
                        color_affine(&ops, mean_rgb(buf, 1.0 / 255.0))
                    };
                    let light = Affine {
                        m: Affine::IDENTITY.m,
                        b: lighting_offset(alpha),
                    };
                    let a = to_unit
                        .then(&colour)
                        .then(&light)
                        .then(&Affine::normalize(self.mean, self.std));
                    affine_to_chw(buf, &a, out);
                    sc.hwc = hwc;
                });
            }
        }
    }

    /// The evaluation transform into `out` (3·val_size² floats).
    pub fn eval_into(&self, img: &Image, out: &mut [f32]) {
        assert_eq!(out.len(), self.eval_len());
        let s = self.cfg.val_size;
        if self.cfg.pipeline == Pipeline::Cifar && img.width == s && img.height == s {
            self.normalize_u8_into(img, out);
            return;
        }
        let (xa, ya) = eval_axes(img, s, self.cfg.val_crop_ratio);
        with_scratch(|sc| {
            let mut hwc = std::mem::take(&mut sc.hwc);
            let buf = scratch_slice(&mut hwc, self.eval_len());
            resample_into(img, &xa, &ya, buf, sc);
            let to_unit = Affine::linear(Affine::scaled_identity(1.0 / 255.0));
            affine_to_chw(
                buf,
                &to_unit.then(&Affine::normalize(self.mean, self.std)),
                out,
            );
            sc.hwc = hwc;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PadMode;
    use crate::data::transforms::test_support::{close, ramp};
    use crate::data::transforms::{
        add_lighting, apply_color_ops, crop, eval_geometry, normalize_into, pad_crop, resize,
        resized_crop_f32, FloatImage, Rect,
    };
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn normalisation_values() {
        let cfg = DataConfig {
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 2.0],
            ..DataConfig::default()
        };
        let t = Transform::new(&cfg);
        let img = Image::from_rgb(2, 1, vec![0, 255, 51, 255, 0, 102]);
        let mut out = vec![0f32; 6];
        t.normalize_u8_into(&img, &mut out);
        let expect = [-1.0, 1.0, 3.0, -1.0, 0.1, 0.2];
        for (a, b) in out.iter().zip(expect) {
            assert!(close(*a, b, 1e-6), "{out:?}");
        }
        let mut out2 = vec![0f32; 6];
        normalize_into(&FloatImage::from_image(&img), t.mean, t.std, &mut out2);
        assert!(out.iter().zip(&out2).all(|(a, b)| close(*a, *b, 1e-6)));
    }

    fn cfg_imagenet(size: u32) -> DataConfig {
        DataConfig {
            pipeline: Pipeline::Imagenet,
            train_size: size,
            val_size: size,
            ..DataConfig::default()
        }
    }

    #[test]
    fn imagenet_train_equals_reference_chain() {
        // The fused pipeline = RRC + flip via the pure functions, colour ops one by one, lighting,
        // normalisation, with the same random draws.
        let cfg = cfg_imagenet(24);
        let t = Transform::new(&cfg);
        let img = ramp(40, 30);
        for seed in 0..10 {
            let mut out = vec![0f32; t.train_len()];
            t.train_into(&img, &mut ChaCha8Rng::seed_from_u64(seed), &mut out);

            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let rect = random_resized_crop_rect(40, 30, cfg.rrc_area, cfg.rrc_aspect, &mut rng);
            let flip = rng.gen_bool(0.5);
            let ops = draw_color_ops(cfg.jitter, cfg.hue, &mut rng);
            let alpha = draw_lighting_alpha(cfg.lighting, &mut rng);
            let mut x = resized_crop_f32(&img, rect, 24, 24, false);
            if flip {
                let mut u = x.clone();
                for y in 0..24 {
                    for j in 0..24 {
                        let (d, s) = ((y * 24 + j) * 3, (y * 24 + 23 - j) * 3);
                        u.data[d..d + 3].copy_from_slice(&x.data[s..s + 3]);
                    }
                }
                x = u;
            }
            apply_color_ops(&mut x, &ops);
            add_lighting(&mut x, alpha);
            let mut expect = vec![0f32; t.train_len()];
            normalize_into(&x, t.mean, t.std, &mut expect);
            for (a, b) in out.iter().zip(&expect) {
                assert!(close(*a, *b, 1e-4), "seed {seed}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn auto_augment_follows_the_crop_and_flip_and_its_draws_follow_theirs() {
        use crate::data::transforms::auto_augment;
        use crate::data::transforms::resample::{crop_axes, resample_into, with_scratch};
        let img = ramp(40, 30);
        // CIFAR: the pad-crop and flip, then the policy on the u8 crop, then normalisation.
        let cfg = DataConfig {
            pipeline: Pipeline::Cifar,
            train_size: 24,
            val_size: 24,
            auto_augment: "rand-m9-n2-mstd0.5".into(),
            ..DataConfig::default()
        };
        let t = Transform::new(&cfg);
        let policy = t.auto_augment.expect("parsed");
        for seed in 0..20 {
            let mut out = vec![0f32; t.train_len()];
            t.train_into(&img, &mut ChaCha8Rng::seed_from_u64(seed), &mut out);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let crop = random_pad_crop(&img, 4, PadMode::Zeros, 24, Flip::Random, &mut rng);
            let mut expect = vec![0f32; t.train_len()];
            t.normalize_u8_into(&auto_augment(&crop, &policy, &mut rng), &mut expect);
            assert_eq!(out, expect, "seed {seed}");
        }
        // ImageNet: crop, flip, colour ops and lighting drawn first, the policy after; the
        // resized crop rounded to u8 and augmented before the colour ops.
        let cfg = DataConfig {
            auto_augment: "ta_wide".into(),
            ..cfg_imagenet(24)
        };
        let t = Transform::new(&cfg);
        let policy = t.auto_augment.expect("parsed");
        for seed in 0..20 {
            let mut out = vec![0f32; t.train_len()];
            t.train_into(&img, &mut ChaCha8Rng::seed_from_u64(seed), &mut out);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let rect = random_resized_crop_rect(40, 30, cfg.rrc_area, cfg.rrc_aspect, &mut rng);
            let flip = rng.gen_bool(0.5);
            let ops = draw_color_ops(cfg.jitter, cfg.hue, &mut rng);
            let alpha = draw_lighting_alpha(cfg.lighting, &mut rng);
            let (xa, ya) = crop_axes(rect, 24, 24, flip);
            let mut resampled = vec![0f32; t.train_len()];
            with_scratch(|sc| resample_into(&img, &xa, &ya, &mut resampled, sc));
            let rounded = resampled.iter().map(|v| v.round() as u8).collect();
            let crop = Image::from_rgb(24, 24, rounded);
            let mut x = FloatImage::from_image(&auto_augment(&crop, &policy, &mut rng));
            apply_color_ops(&mut x, &ops);
            add_lighting(&mut x, alpha);
            let mut expect = vec![0f32; t.train_len()];
            normalize_into(&x, t.mean, t.std, &mut expect);
            for (a, b) in out.iter().zip(&expect) {
                assert!(close(*a, *b, 1e-4), "seed {seed}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn cifar_train_and_eval() {
        let cfg = DataConfig {
            pipeline: Pipeline::Cifar,
            train_size: 32,
            val_size: 32,
            ..DataConfig::default()
        };
        let t = Transform::new(&cfg);
        let img = ramp(32, 32);
        let mut out = vec![0f32; t.train_len()];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        t.train_into(&img, &mut rng, &mut out);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let expect_img = random_pad_crop(&img, 4, PadMode::Zeros, 32, Flip::Random, &mut rng);
        let mut expect = vec![0f32; t.train_len()];
        t.normalize_u8_into(&expect_img, &mut expect);
        assert_eq!(out, expect);
        // Eval of a 32-px image is the identity + normalisation.
        let mut ev = vec![0f32; t.eval_len()];
        t.eval_into(&img, &mut ev);
        let mut id = vec![0f32; t.eval_len()];
        t.normalize_u8_into(&img, &mut id);
        assert_eq!(ev, id);
        // Padding is black: (0 − mean)/std.
        let c = pad_crop(&img, 4, PadMode::Zeros, 32, 0, 0, false);
        let mut o = vec![0f32; t.train_len()];
        t.normalize_u8_into(&c, &mut o);
        assert!(close(o[0], -0.485 / 0.229, 1e-6));
    }

    #[test]
    fn imagenet_eval_matches_reference() {
        let mut cfg = cfg_imagenet(16);
        cfg.val_crop_ratio = 0.8;
        let t = Transform::new(&cfg);
        let img = ramp(30, 25);
        let mut out = vec![0f32; t.eval_len()];
        t.eval_into(&img, &mut out);
        let (rw, rh, left, top) = eval_geometry(30, 25, 16, 0.8);
        assert_eq!((rw, rh, left, top), (24, 20, 4, 2));
        let r = resize(&img, rw, rh);
        let c = crop(
            &r,
            Rect {
                x: left,
                y: top,
                width: 16,
                height: 16,
            },
        );
        let mut expect = vec![0f32; t.eval_len()];
        t.normalize_u8_into(&c, &mut expect);
        // The reference rounds to u8 once: within half a level.
        let tol = 0.5 / 255.0 / 0.224 + 1e-5;
        for (a, b) in out.iter().zip(&expect) {
            assert!(close(*a, *b, tol), "{a} vs {b}");
        }
    }

    #[test]
    fn shapes_for_odd_inputs() {
        let t = Transform::new(&cfg_imagenet(8));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for (w, h) in [(1, 1), (1, 50), (50, 1), (3, 2), (8, 8), (200, 9)] {
            let img = ramp(w, h);
            let mut out = vec![0f32; t.train_len()];
            t.train_into(&img, &mut rng, &mut out);
            assert!(out.iter().all(|v| v.is_finite()));
            let mut ev = vec![0f32; t.eval_len()];
            t.eval_into(&img, &mut ev);
            assert!(ev.iter().all(|v| v.is_finite()));
        }
        let c = Transform::new(&DataConfig {
            pipeline: Pipeline::Cifar,
            train_size: 8,
            val_size: 8,
            cifar_pad: 1,
            ..DataConfig::default()
        });
        for (w, h) in [(2, 2), (8, 8), (20, 3)] {
            let mut out = vec![0f32; c.train_len()];
            c.train_into(&ramp(w, h), &mut rng, &mut out);
            let mut ev = vec![0f32; c.eval_len()];
            c.eval_into(&ramp(w, h), &mut ev);
        }
    }
}
