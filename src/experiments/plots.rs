//! The study's plots, each written as PNG and SVG: validation top-1 (mIoU for segmentation)
//! and training loss per epoch
//! (mean over seeds with a min–max band), the learning-rate schedule of every variant, and the
//! Δ top-1 of every variant against the first one.
//!
//! Text is rendered with DejaVu Sans (`assets/DejaVuSans.ttf`, Bitstream Vera licence, see
//! `assets/DejaVuSans-LICENSE.txt`) embedded in the binary: plotters' `ab_glyph` font backend
//! needs a registered font and the build has no system-font lookup.

use super::results::EpochPoint;
use super::results::{metric_names, RunRecord, RunStatus, VariantRow};
use super::study::Manifest;
use crate::config::Config;
use crate::draw::{color, register_font, FAMILY};
use crate::train::schedule::{peak_lr, LrSchedule};
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const SIZE: (u32, u32) = (1100, 650);
// Font sizes are even: plotters 0.3.7's ab_glyph renderer places each glyph at
// `(size / 2 + top) as i32`, so an odd size shifts some glyphs (the `.` of `0.5`) by a pixel.
/// Iterations per epoch used to draw the lr schedules of runs of `epochs` epochs: at least 100,
/// and enough for 2,000 steps in all so that short schedules draw smoothly (the shape of a
/// schedule does not depend on it).
pub fn lr_plot_iters_per_epoch(epochs: usize) -> usize {
    (2000 / epochs.max(1)).max(100)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// One line of a line plot: `(x, mean, low, high)` points.
struct Series {
    name: String,
    color: RGBColor,
    width: u32,
    points: Vec<(f64, f64, f64, f64)>,
}

struct Lines {
    title: String,
    subtitle: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
    band: bool,
    markers: bool,
    legend: SeriesLabelPosition,
    /// Limits of the y axis whatever the padding (accuracy stays within 0–100 %).
    y_limits: (f64, f64),
}

struct Bar {
    name: String,
    color: RGBColor,
    /// (Δ, half-width of its 95 % interval) or None when the variant has no finished run.
    value: Option<(f64, f64)>,
}

struct Bars {
    title: String,
    subtitle: String,
    x_label: String,
    bars: Vec<Bar>,
}

enum Figure {
    Lines(Lines),
    Bars(Bars),
}

impl Figure {
    fn save(&self, out: &Path, stem: &str) -> Result<()> {
        register_font()?;
        let svg = out.join(format!("{stem}.svg"));
        {
            let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(err)?;
        }
        let png = out.join(format!("{stem}.png"));
        {
            let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(err)?;
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let (title, subtitle) = match self {
            Figure::Lines(l) => (&l.title, &l.subtitle),
            Figure::Bars(b) => (&b.title, &b.subtitle),
        };
        // A long study name shrinks the title until it fits the width (down to 12 px).
        let mut size = 26.0;
        while size > 12.0 {
            let (w, _) = root
                .estimate_text_size(title, &TextStyle::from((FAMILY, size).into_font()))
                .map_err(err)?;
            if w + 80 <= root.dim_in_pixel().0 {
                break;
            }
            size -= 1.0;
        }
        let area = root.titled(title, (FAMILY, size)).map_err(err)?;
        let area = area
            .titled(
                subtitle,
                (FAMILY, 14).into_font().color(&RGBColor(90, 90, 90)),
            )
            .map_err(err)?;
        match self {
            Figure::Lines(l) => draw_lines(&area, l),
            Figure::Bars(b) => draw_bars(&area, b),
        }
    }
}

fn padded(lo: f64, hi: f64, frac: f64, min_pad: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * frac
    } else {
        min_pad.max(lo.abs() * 0.05)
    };
    (lo - pad, hi + pad)
}

fn tick(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn tick_small(y: &f64) -> String {
    if *y == 0.0 {
        "0".into()
    } else if y.abs() < 0.01 {
        format!("{y:.1e}")
    } else {
        tick(y)
    }
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, l: &Lines) -> Result<()> {
    let pts = l.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, m, lo, hi) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(lo.min(m));
        y1 = y1.max(hi.max(m));
    }
    if x0 > x1 {
        // Nothing to plot: an empty frame with the labels and a note.
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 0.5, x1 + 0.5)
    };
    let (y0, y1) = padded(y0, y1, 0.06, 0.5);
    let (y0, y1) = (y0.max(l.y_limits.0), y1.min(l.y_limits.1));
    // Whole epochs as ticks on short runs, at most a dozen ticks on long ones.
    let x_ticks = ((x1 - x0).round() as usize + 1).clamp(2, 12);
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(l.x_label.as_str())
        .y_desc(l.y_label.as_str())
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 14))
        .x_labels(x_ticks)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick_small)
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;
    if l.series.iter().all(|s| s.points.is_empty()) {
        chart
            .draw_series(std::iter::once(Text::new(
                "no finished epochs yet",
                (x0 + 0.05 * (x1 - x0), (y0 + y1) / 2.0),
                (FAMILY, 20),
            )))
            .map_err(err)?;
        return Ok(());
    }
    for s in &l.series {
        if s.points.is_empty() {
            continue;
        }
        let c = s.color;
        if l.band {
            if s.points.len() >= 2 {
                let mut poly: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.3)).collect();
                poly.extend(s.points.iter().rev().map(|p| (p.0, p.2)));
                chart
                    .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))
                    .map_err(err)?;
            }
            // Whiskers show the spread where a band cannot (a single epoch).
            if s.points.len() < 2 {
                chart
                    .draw_series(
                        s.points.iter().map(|p| {
                            PathElement::new(vec![(p.0, p.2), (p.0, p.3)], c.stroke_width(2))
                        }),
                    )
                    .map_err(err)?;
            }
        }
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.0, p.1)),
                c.stroke_width(s.width),
            ))
            .map_err(err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        if l.markers && s.points.len() <= 60 {
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|p| Circle::new((p.0, p.1), 3, c.filled())),
                )
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(l.legend.clone())
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .margin(10)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn label_style(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font()).pos(Pos::new(HPos::Left, VPos::Center))
}

fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, b: &Bars) -> Result<()> {
    let n = b.bars.len().max(1) as i32;
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    for bar in &b.bars {
        if let Some((d, s)) = bar.value {
            lo = lo.min(d - s);
            hi = hi.max(d + s);
        }
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (-1.0, 1.0);
    }
    let span = hi - lo;
    // Room on the right for the value labels.
    let (x0, x1) = (lo - 0.05 * span, hi + 0.35 * span);
    let longest = b
        .bars
        .iter()
        .map(|x| x.name.chars().count())
        .max()
        .unwrap_or(4);
    let y_area = (longest as u32 * 9 + 30).clamp(80, 420);
    // The first variant on top: bar i sits in segment n - 1 - i.
    let names: Vec<String> = b.bars.iter().map(|x| x.name.clone()).collect();
    let y_name = move |y: &SegmentValue<i32>| -> String {
        match y {
            SegmentValue::CenterOf(k) | SegmentValue::Exact(k) if (0..n).contains(k) => {
                names.get((n - 1 - k) as usize).cloned().unwrap_or_default()
            }
            _ => String::new(),
        }
    };
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(y_area)
        .build_cartesian_2d(x0..x1, (0..n - 1).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(b.x_label.as_str())
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 16))
        .x_label_formatter(&tick)
        .y_label_formatter(&y_name)
        .y_labels(n as usize)
        .disable_y_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, SegmentValue::Exact(0)), (0.0, SegmentValue::Last)],
            BLACK.stroke_width(1),
        )))
        .map_err(err)?;
    for (i, bar) in b.bars.iter().enumerate() {
        let k = n - 1 - i as i32;
        let c = bar.color;
        let centre = |x: f64| (x, SegmentValue::CenterOf(k));
        match bar.value {
            Some((d, s)) => {
                let mut rect = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(k)),
                        (d, SegmentValue::Exact(k + 1)),
                    ],
                    c.mix(0.85).filled(),
                );
                let gap = (area.dim_in_pixel().1 / (5 * n as u32)).min(40);
                rect.set_margin(gap, gap, 0, 0);
                chart.draw_series(std::iter::once(rect)).map_err(err)?;
                if s > 0.0 {
                    let whisker = BLACK.stroke_width(2);
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![centre(d - s), centre(d + s)],
                            whisker,
                        )))
                        .map_err(err)?;
                    for end in [d - s, d + s] {
                        chart
                            .draw_series(std::iter::once(
                                EmptyElement::at(centre(end))
                                    + PathElement::new(vec![(0, -9), (0, 9)], whisker),
                            ))
                            .map_err(err)?;
                    }
                }
                let label = if s > 0.0 {
                    format!("{d:+.2} ± {s:.2}")
                } else {
                    format!("{d:+.2}")
                };
                let at = (d + s).max(d).max(0.0) + 0.02 * span;
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        centre(at),
                        label_style(16),
                    )))
                    .map_err(err)?;
            }
            None => {
                chart
                    .draw_series(std::iter::once(Text::new(
                        "no finished runs",
                        centre(0.02 * span),
                        label_style(16),
                    )))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

/// `(epoch, mean, min, max)` over the runs of one variant, for epochs where some run has a value.
fn epoch_band(
    runs: &[&RunRecord],
    value: fn(&EpochPoint) -> Option<f64>,
) -> Vec<(f64, f64, f64, f64)> {
    let mut by_epoch: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for r in runs {
        for m in &r.metrics {
            if let Some(v) = value(m).filter(|v| v.is_finite()) {
                by_epoch.entry(m.epoch).or_default().push(v);
            }
        }
    }
    by_epoch
        .into_iter()
        .map(|(e, v)| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let lo = v.iter().cloned().fold(f64::MAX, f64::min);
            let hi = v.iter().cloned().fold(f64::MIN, f64::max);
            (e as f64, mean, lo, hi)
        })
        .collect()
}

/// The lr of a run with this config as a staircase of `(epoch, lr)` points: iteration `i` holds
/// its lr from `i / iters_per_epoch` to `(i + 1) / iters_per_epoch`. Thinned to about 2,000 steps,
/// keeping the first and last iteration of every epoch so that step drops stay vertical.
pub fn lr_curve(cfg: &Config, iters_per_epoch: usize) -> Vec<(f64, f64)> {
    let epochs = cfg.train.epochs;
    let ipe = iters_per_epoch.max(1);
    let sched = LrSchedule::new(
        &cfg.optim,
        peak_lr(&cfg.optim, cfg.train.batch_size, 1),
        ipe,
        epochs,
    );
    let stride = (ipe * epochs / 2000).max(1);
    let mut iters = Vec::new();
    for e in 0..epochs {
        let (start, end) = (e * ipe, (e + 1) * ipe);
        iters.extend((start..end).step_by(stride));
        if iters.last() != Some(&(end - 1)) {
            iters.push(end - 1);
        }
    }
    let total = epochs * ipe;
    let mut pts = Vec::with_capacity(2 * iters.len());
    for (k, &i) in iters.iter().enumerate() {
        let next = iters.get(k + 1).copied().unwrap_or(total);
        let lr = sched.lr_at(i);
        pts.push((i as f64 / ipe as f64, lr));
        pts.push((next as f64 / ipe as f64, lr));
    }
    pts
}

/// Writes `val_<metric>`, `train_loss`, `lr_schedule` and `delta_<metric>` (.png and .svg) into
/// `out`, `<metric>` the task's headline (`top1`, `miou`).
/// `configs[i]` is variant i's resolved config (for the lr schedule), if known.
pub fn write_plots(
    out: &Path,
    manifest: &Manifest,
    runs: &[RunRecord],
    rows: &[VariantRow],
    configs: &[Option<Config>],
) -> Result<()> {
    let names = metric_names(manifest.task);
    let m1 = match names.headline {
        "Top-1" => "top-1",
        other => other,
    };
    let key = names.headline_key;
    let seeds: Vec<String> = manifest.seeds.iter().map(|s| s.to_string()).collect();
    let seeds = format!(
        "seed{} {}",
        if seeds.len() == 1 { "" } else { "s" },
        seeds.join(", ")
    );
    let by_variant = |name: &str| -> Vec<&RunRecord> {
        runs.iter()
            .filter(|r| r.variant == name && r.status != RunStatus::Pending)
            .collect()
    };
    let band_series = |value: fn(&EpochPoint) -> Option<f64>| -> Vec<Series> {
        manifest
            .variants
            .iter()
            .enumerate()
            .map(|(i, v)| Series {
                name: v.name.clone(),
                color: color(i),
                width: 2,
                points: epoch_band(&by_variant(&v.name), value),
            })
            .collect()
    };

    Figure::Lines(Lines {
        title: format!("{}: validation {m1} per epoch", manifest.name),
        subtitle: format!(
            "line: mean over {seeds}; band: min–max over the seeds; {} mode",
            manifest.mode.as_str()
        ),
        x_label: "epoch".into(),
        y_label: format!("validation {m1} (%)"),
        series: band_series(|m| m.val_metric),
        band: true,
        markers: true,
        legend: SeriesLabelPosition::LowerRight,
        y_limits: (0.0, 100.0),
    })
    .save(out, &format!("val_{key}"))?;

    Figure::Lines(Lines {
        title: format!("{}: training loss per epoch", manifest.name),
        subtitle: format!(
            "line: mean over {seeds}; band: min–max; loss against the training targets (smoothed or mixed where the variant says so)"
        ),
        x_label: "epoch".into(),
        y_label: "training loss".into(),
        series: band_series(|m| Some(m.train_loss)),
        band: true,
        markers: true,
        legend: SeriesLabelPosition::UpperRight,
        y_limits: (0.0, f64::MAX),
    })
    .save(out, "train_loss")?;

    let n = manifest.variants.len();
    let max_epochs = configs
        .iter()
        .flatten()
        .map(|c| c.train.epochs)
        .max()
        .unwrap_or(1);
    let ipe = lr_plot_iters_per_epoch(max_epochs);
    let lr_series: Vec<Series> = manifest
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| Series {
            name: v.name.clone(),
            color: color(i),
            // Earlier variants thicker, so identical schedules stay visible under later ones.
            width: (2 + 2 * (n - 1 - i) as u32).min(10),
            points: configs
                .get(i)
                .and_then(|c| c.as_ref())
                .map(|c| {
                    lr_curve(c, ipe)
                        .into_iter()
                        .map(|(x, y)| (x, y, y, y))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Figure::Lines(Lines {
        title: format!("{}: learning-rate schedule", manifest.name),
        subtitle: format!(
            "computed per iteration at {ipe} iterations/epoch (not the dataset's: same shape); equal schedules overlap, earlier rows thicker"
        ),
        x_label: "epoch (iterations done / iterations per epoch)".into(),
        y_label: "learning rate".into(),
        series: lr_series,
        band: false,
        markers: false,
        legend: SeriesLabelPosition::UpperRight,
        y_limits: (0.0, f64::MAX),
    })
    .save(out, "lr_schedule")?;

    let first = manifest
        .variants
        .first()
        .map(|v| v.name.clone())
        .unwrap_or_default();
    let bars = rows
        .iter()
        .enumerate()
        .map(|(i, r)| Bar {
            name: r.name.clone(),
            color: color(i),
            value: r
                .delta
                .map(|d| (d, r.delta_test.map_or(0.0, |t| t.half_width))),
        })
        .collect();
    let against = match manifest.mode {
        super::study::Mode::Independent => format!("`{first}`"),
        super::study::Mode::Cumulative => "the row above".to_string(),
    };
    Figure::Bars(Bars {
        title: format!("{}: Δ {m1} vs {against}", manifest.name),
        subtitle: format!(
            "bar: mean final {m1} minus that of {against} over {seeds}; error bar: its 95 % confidence interval (paired by seed, or Welch's)"
        ),
        x_label: format!("Δ validation {m1} (percentage points)"),
        bars,
    })
    .save(out, &format!("delta_{key}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_curve_keeps_epoch_boundaries() {
        let mut cfg = Config::default();
        cfg.train.epochs = 4;
        cfg.optim.step_epochs = vec![2];
        let pts = lr_curve(&cfg, 10);
        assert_eq!(pts.len(), 80);
        // Iteration 19 (the last of epoch 1) holds lr 0.1 until x = 2.0, where the drop is vertical.
        assert_eq!(pts[39], (2.0, 0.1));
        assert_eq!(pts[40].0, 2.0);
        assert!((pts[40].1 - 0.01).abs() < 1e-12);
        assert_eq!(pts.last().unwrap().0, 4.0);
        cfg.train.epochs = 400;
        let pts = lr_curve(&cfg, 100);
        assert!(pts.len() < 6000, "{}", pts.len());
    }
}
