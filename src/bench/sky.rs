//! The score image's scatter on empty sky: pixels away from every source and artifact the
//! truth table lists for the frame (bright stars get a wider berth, as their residuals reach
//! further), then the robust σ (1.4826 × MAD). For white noise through a normalised matched
//! filter it is 1.

use crate::bench::matching::{self, MATCH_RADIUS_PX};
use crate::detect::image::robust_stats;
use crate::detect::FrameImages;
use crate::sim::night::truth::TruthRecord;

/// Robust σ of `img.score` away from every row of `truth` (the frame's rows), unmasked pixels
/// only; `fwhm` (pixels) widens the berth around sources. `None` when no pixel is left.
pub fn empty_sky_sigma(img: &FrameImages, truth: &[&TruthRecord], fwhm: f64) -> Option<f64> {
    empty_sky_sigma_of(img.width, img.height, &img.score, &img.masked, truth, fwhm)
}

/// [`empty_sky_sigma`] of a `w × h` score image and its mask (a stack's, say).
pub fn empty_sky_sigma_of(w: usize, h: usize, score: &[f32], masked: &[bool], truth: &[&TruthRecord], fwhm: f64) -> Option<f64> {
    let mut keep = masked.iter().map(|m| !m).collect::<Vec<bool>>();
    for t in truth {
        if t.kind == "bad_column" {
            let c = t.x.round() as i64;
            for x in (c - 3).max(0)..=(c + 3).min(w as i64 - 1) {
                for y in 0..h {
                    keep[y * w + x as usize] = false;
                }
            }
            continue;
        }
        let r = if t.is_artifact() { 8.0 } else { matching::source_radius(t.flux.max(t.ref_flux).abs(), MATCH_RADIUS_PX) + 2.0 * fwhm };
        let (x0, y0) = (t.x, t.y);
        let (lo_x, hi_x) = (((x0 - r).floor().max(0.0)) as usize, ((x0 + r).ceil().min(w as f64 - 1.0)).max(0.0) as usize);
        let (lo_y, hi_y) = (((y0 - r).floor().max(0.0)) as usize, ((y0 + r).ceil().min(h as f64 - 1.0)).max(0.0) as usize);
        for y in lo_y..=hi_y {
            for x in lo_x..=hi_x {
                if (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2) <= r * r {
                    keep[y * w + x] = false;
                }
            }
        }
    }
    let sample: Vec<f32> = score.iter().zip(&keep).filter(|(_, k)| **k).map(|(s, _)| *s).collect();
    robust_stats(&sample).map(|(_, s)| s as f64)
}

