//! Stacking difference images (issue 5): epochs of the same sky, aligned to sub-pixel accuracy,
//! added with inverse-variance weights over several windows (1, 3, 10, 30 nights by default),
//! so that a slow or faint transient invisible in one epoch rises in the stack.
//!
//! - [`align`]: one epoch shifted onto the common grid (separable Lanczos-3), its variance
//!   propagated (`Σ L² V`) and its noise-correlation factor recorded ([`Aligned`]).
//! - [`coadd`]: the inverse-variance stack of a set of epochs, its variance **with the template
//!   covariance** (the template's noise is common to every epoch), the template term alone (so
//!   a stack can be stacked again, [`Stack::as_epoch`]) and the effective PSF.
//! - [`windows`]: per band, one stack per window that holds an epoch; a longer window with the
//!   same epochs as a shorter one says so ([`WindowStack::same_as`]). [`windows_batch`] does
//!   many objects in one batch, on the CPU or the GPU.
//! - [`score`], [`measure`]: the matched filter on a stack with its effective PSF and variance,
//!   the whole image or at one position.
//!
//! The per-pixel work runs on a [`StackBatch`] (many objects × epochs, one dispatch): the WGSL
//! kernels `shaders/stack/{shift,coadd}.wgsl` (`gpu::kernels::stack`) and their CPU twins
//! (`cpu::stack`). `docs/stacking.md` has the formulas and why.
//!
//! Conventions. An epoch's grid is offset by `(dx, dy)` from the common one: a source at common
//! `(X, Y)` lies at `(X + dx, Y + dy)` on the epoch's stamp. Variances are per pixel and white
//! (a decorrelated difference); a masked pixel is NaN in the difference and both variances
//! (never 0); a stack pixel no epoch covers is NaN in all three.

mod batch;
mod detect;
mod windows;

pub use batch::StackBatch;
pub use detect::{measure, score, StackMeasurement};
pub use windows::{plan_windows, windows, windows_batch, WindowPlan, WindowStack, DEFAULT_WINDOWS, WINDOW_TOLERANCE};

use crate::cpu::stack::{self as twin, ShiftTaps};
use crate::engine::EngineError;
use crate::subtract::decorr::PsfImage;

/// Largest `|dx|`, `|dy|` accepted, pixels (beyond it every pixel would be masked anyway).
pub const MAX_SHIFT: f64 = 1.0e6;

/// What can be wrong with stacking input.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("epoch {index}: {what}")]
    BadEpoch { index: usize, what: String },
    #[error("stack batch: {0}")]
    BadBatch(String),
    #[error("no epochs to stack")]
    Empty,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One epoch's difference stamp, ready to stack. All epochs of a stack share `width × height`.
#[derive(Debug, Clone, PartialEq)]
pub struct StackEpoch {
    pub width: usize,
    pub height: usize,
    /// The difference image, row-major; NaN where masked.
    pub diff: Vec<f32>,
    /// Total per-pixel variance of the difference.
    pub var: Vec<f32>,
    /// The part of `var` that comes from the template (common to every epoch).
    pub var_template: Vec<f32>,
    /// The difference's PSF on the epoch's grid (odd side, unit sum); it goes through the
    /// same shift as the pixels.
    pub psf: PsfImage,
    /// Epoch, MJD.
    pub mjd: f64,
    pub band: String,
    /// Offset of the epoch's grid from the common one, pixels (see the module doc).
    pub dx: f64,
    pub dy: f64,
}

impl StackEpoch {
    /// Pixels per plane.
    pub fn npix(&self) -> usize {
        self.width * self.height
    }

    /// Shapes, lengths and finite epoch and offsets; `index` names the epoch in the error.
    pub fn validate(&self, index: usize) -> Result<(), StackError> {
        let bad = |what: String| Err(StackError::BadEpoch { index, what });
        let n = self.npix();
        if n == 0 || u32::try_from(n).is_err() {
            return bad(format!("a {}x{} stamp", self.width, self.height));
        }
        for (name, len) in [("diff", self.diff.len()), ("var", self.var.len()), ("var_template", self.var_template.len())] {
            if len != n {
                return bad(format!("{name} has {len} pixels, the stamp {}x{}", self.width, self.height));
            }
        }
        let p = &self.psf;
        if p.side.is_multiple_of(2) || p.pixels.len() != p.side * p.side {
            return bad(format!("PSF of side {} with {} values (odd side, side² values)", p.side, p.pixels.len()));
        }
        if !self.mjd.is_finite() {
            return bad(format!("MJD {}", self.mjd));
        }
        if !(self.dx.abs() <= MAX_SHIFT && self.dy.abs() <= MAX_SHIFT) {
            return bad(format!("offset ({}, {})", self.dx, self.dy));
        }
        Ok(())
    }
}

/// An epoch on the common grid ([`align`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Aligned {
    pub diff: Vec<f32>,
    /// `Σ L² V`: the shifted pixels' own variance (their neighbours are now correlated).
    pub var: Vec<f32>,
    pub var_template: Vec<f32>,
    /// The PSF shifted the same way, unit sum.
    pub psf: PsfImage,
    /// Per-axis noise-correlation factors `(Σ kx², Σ ky²)` ([`ShiftTaps::corr`]).
    pub corr: (f64, f64),
}

impl Aligned {
    /// What a matched-filter score computed from `diff` and `var` is to be divided by (the
    /// `inflate` of `cpu::frame::score`): `1 / sqrt(cx · cy)`. A smooth PSF sees the noise of
    /// the unshifted image, which the reduced per-pixel variance understates.
    pub fn score_inflate(&self) -> f64 {
        1.0 / (self.corr.0 * self.corr.1).sqrt()
    }
}

/// `epoch` shifted onto the common grid by its `(dx, dy)`: separable Lanczos-3 with normalised
/// weights, variances as `Σ L² V`; NaN where the kernel's support leaves the stamp or meets a
/// masked pixel. An integer offset is an exact copy.
pub fn align(epoch: &StackEpoch) -> Result<Aligned, StackError> {
    epoch.validate(0)?;
    let t = ShiftTaps::new(epoch.dx, epoch.dy);
    let [diff, var, var_template] = twin::shift_planes(&epoch.diff, &epoch.var, &epoch.var_template, epoch.width, epoch.height, &t);
    Ok(Aligned { diff, var, var_template, psf: twin::shift_psf(&epoch.psf, &t), corr: t.corr() })
}

/// A stack ([`coadd`], [`windows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    pub width: usize,
    pub height: usize,
    /// `S = Σ w D / Σ w`; NaN where no epoch covers the pixel.
    pub image: Vec<f32>,
    /// `Var(S)`, the template covariance included; the variance a smooth matched filter sees
    /// (`cpu::stack::coadd_pixel`).
    pub var: Vec<f32>,
    /// The template's part of `var`, `(Σ w √VT)² / W²`.
    pub var_template: Vec<f32>,
    /// Epochs that contributed, per pixel.
    pub count: Vec<u32>,
    /// Effective PSF (the epochs' shifted PSFs weighted by their weight at the stamp centre).
    pub psf: PsfImage,
    /// Epochs in the stack.
    pub epochs: usize,
}

impl Stack {
    /// A stack with every pixel masked.
    pub fn masked(width: usize, height: usize) -> Stack {
        let n = width * height;
        Stack {
            width,
            height,
            image: vec![f32::NAN; n],
            var: vec![f32::NAN; n],
            var_template: vec![f32::NAN; n],
            count: vec![0; n],
            psf: PsfImage { side: 1, pixels: vec![1.0] },
            epochs: 0,
        }
    }

    /// This stack as one epoch on the common grid (offset 0), to be stacked again: its template
    /// term stays common with whatever else shares the template.
    pub fn as_epoch(&self, mjd: f64, band: &str) -> StackEpoch {
        StackEpoch {
            width: self.width,
            height: self.height,
            diff: self.image.clone(),
            var: self.var.clone(),
            var_template: self.var_template.clone(),
            psf: self.psf.clone(),
            mjd,
            band: band.to_string(),
            dx: 0.0,
            dy: 0.0,
        }
    }
}

/// The stack of `epochs` (any order; they are summed in [`canonical_order`]), on the CPU.
pub fn coadd(epochs: &[StackEpoch]) -> Result<Stack, StackError> {
    let refs: Vec<&StackEpoch> = epochs.iter().collect();
    let mut b = StackBatch::for_epochs(&refs)?;
    let n = b.epochs();
    b.push_stack(0..n)?;
    twin::coadd(&b).pop().ok_or(StackError::Empty)
}

/// The order epochs are summed in, whatever order they come in: latest MJD first, ties broken
/// by the offsets, then the pixels' and PSF's bits (identical epochs are interchangeable). A
/// fixed order makes a stack independent of its input order, rounding included.
pub fn canonical_order(epochs: &[&StackEpoch]) -> Vec<usize> {
    use std::cmp::Ordering;
    fn bits<'a>(v: &'a [f32]) -> impl Iterator<Item = u32> + 'a {
        v.iter().map(|x| x.to_bits())
    }
    let cmp = |a: &StackEpoch, b: &StackEpoch| -> Ordering {
        b.mjd
            .total_cmp(&a.mjd)
            .then(a.dx.total_cmp(&b.dx))
            .then(a.dy.total_cmp(&b.dy))
            .then_with(|| bits(&a.diff).cmp(bits(&b.diff)))
            .then_with(|| bits(&a.var).cmp(bits(&b.var)))
            .then_with(|| bits(&a.var_template).cmp(bits(&b.var_template)))
            .then_with(|| a.psf.pixels.iter().map(|x| x.to_bits()).cmp(b.psf.pixels.iter().map(|x| x.to_bits())))
    };
    let mut idx: Vec<usize> = (0..epochs.len()).collect();
    idx.sort_by(|&i, &j| cmp(epochs[i], epochs[j]));
    idx
}

#[cfg(test)]
mod tests;
