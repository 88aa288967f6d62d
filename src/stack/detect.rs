//! The matched filter on a stack: its effective PSF against its image, weighted by its
//! variance (template term included), as `cpu::frame::score` does for a frame.

use super::Stack;
use crate::cpu::frame::{self, Profile};
use crate::cpu::stack::{shift_psf, ShiftTaps};
use crate::detect::frame::ScoreImage;

/// The stack's score image: `cpu::frame::score` with the effective PSF as the profile and no
/// inflation (the stack's variance is already what a smooth filter sees of the shifted
/// epochs). Score 0 and error ∞ where nothing usable is in reach.
pub fn score(stack: &Stack) -> ScoreImage {
    let p = &stack.psf;
    let mut sc = frame::score(&stack.image, &stack.var, stack.width, stack.height, &Profile::Full { side: p.side, pixels: p.pixels.clone() }, 1.0);
    sc.psf_peak = p.pixels.get(p.pixels.len() / 2).copied().unwrap_or(0.0);
    sc
}

/// The matched filter at one position ([`measure`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StackMeasurement {
    /// The pixel the filter is centred on (the nearest to the position asked for).
    pub x: usize,
    pub y: usize,
    /// Score (σ), flux and its error.
    pub score: f64,
    pub flux: f64,
    pub flux_err: f64,
}

/// Score and flux of a point source at `(x, y)` on the stack's grid (a candidate's position):
/// the effective PSF moved to the position's sub-pixel phase (Lanczos-3) and correlated at the
/// nearest pixel. At a whole pixel it is [`score`]'s value there (without its floor on the
/// frame's largest `den`). `None` where that pixel is masked or off the stamp (or the stack's
/// planes do not match its shape).
pub fn measure(stack: &Stack, x: f64, y: f64) -> Option<StackMeasurement> {
    let (w, h) = (stack.width, stack.height);
    if stack.image.len() != w * h || stack.var.len() != w * h || stack.psf.side.is_multiple_of(2) || stack.psf.pixels.len() != stack.psf.side * stack.psf.side {
        return None;
    }
    let (px, py) = (x.round(), y.round());
    if !(px >= 0.0 && py >= 0.0 && px < w as f64 && py < h as f64) {
        return None;
    }
    let (px, py) = (px as usize, py as usize);
    // The PSF's centre moved by the phase: p'(u) = p(u − f), a shift by −f.
    let p = shift_psf(&stack.psf, &ShiftTaps::new(px as f64 - x, py as f64 - y));
    let ok = |i: usize| stack.var[i] > 0.0 && stack.image[i].is_finite();
    if !ok(py * w + px) {
        return None;
    }
    let r = (p.side / 2) as i64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for v in -r..=r {
        for u in -r..=r {
            let (sx, sy) = (px as i64 + u, py as i64 + v);
            if sx < 0 || sy < 0 || sx >= w as i64 || sy >= h as i64 {
                continue;
            }
            let i = sy as usize * w + sx as usize;
            if !ok(i) {
                continue;
            }
            let pv = p.pixels[((v + r) as usize) * p.side + (u + r) as usize];
            let iv = 1.0 / stack.var[i] as f64;
            num += pv * stack.image[i] as f64 * iv;
            den += pv * pv * iv;
        }
    }
    (den > 0.0).then(|| StackMeasurement { x: px, y: py, score: num / den.sqrt(), flux: num / den, flux_err: 1.0 / den.sqrt() })
}
