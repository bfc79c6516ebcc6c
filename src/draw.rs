//! What every picture `tricks` draws shares: the embedded font (DejaVu Sans,
//! `assets/DejaVuSans.ttf`, Bitstream Vera licence, see `assets/DejaVuSans-LICENSE.txt`) and the
//! colour palette. Used by the study plots and the detection pictures of `tricks predict`.

use anyhow::{anyhow, Result};
use plotters::style::{FontStyle, RGBColor};
use std::sync::OnceLock;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The family name the embedded font is registered under.
pub const FAMILY: &str = "sans-serif";

/// Tableau 10.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Colour `i` of the palette, cycling.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Registers the embedded font with plotters (once per process).
pub fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()
            && plotters::style::register_font(FAMILY, FontStyle::Bold, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the embedded font (assets/DejaVuSans.ttf) is not a valid TrueType font"
        ))
    }
}
