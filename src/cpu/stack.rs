//! CPU twins of the stacking kernels in `shaders/stack/*.wgsl` (dispatcher:
//! `gpu::kernels::stack`), on a [`StackBatch`] of many objects × epochs:
//!
//! - `shift.wgsl`: each epoch's difference, variance and template variance resampled onto the
//!   common grid with a separable Lanczos-3 kernel ([`shift`], one epoch: [`shift_planes`]);
//! - `coadd.wgsl`: each stack's inverse-variance weighted mean, its variance with the template
//!   covariance, its template term and epoch count per pixel ([`coadd`], one pixel:
//!   [`coadd_pixel`]).
//!
//! What the kernels do not do, being small and per stack, both paths do here: the shifted PSFs
//! and the effective PSF ([`effective_psf`]). f64 accumulation; the parity tests
//! (`tests/integration/stack_parity.rs`) compare each with its kernel. `docs/stacking.md` has
//! the formulas and why.
//!
//! Lanczos resampling is written out rather than taken from a crate: the shift is one constant
//! sub-pixel offset per stamp (12 weights), it has to carry the variance (`Σ L² V`) and the
//! mask rule along with the pixels, and the WGSL kernel must do exactly the same sums.

use crate::stack::{Stack, StackBatch};
use crate::subtract::decorr::PsfImage;

/// Taps of the Lanczos-3 kernel along one axis (keep in sync with `TAPS` in
/// `shaders/stack/shared/stack_params.wgsl`).
pub const TAPS: usize = 6;
/// Lanczos order `a`: the kernel is `sinc(x) sinc(x/a)` on `|x| < a`.
pub const LANCZOS_A: f64 = 3.0;
/// Fractions of a pixel below this (or above 1 − this) count as a whole pixel, pixels.
pub const SNAP: f64 = 1e-6;
/// Half-width of the box around the stamp centre whose mean weight an epoch's PSF gets in the
/// effective PSF ([`effective_psf`]).
pub const CORE_RADIUS: usize = 2;

/// `sinc(x) sinc(x/3)` on `|x| < 3`, else 0.
pub fn lanczos3(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    if x.abs() >= LANCZOS_A {
        return 0.0;
    }
    let px = std::f64::consts::PI * x;
    LANCZOS_A * px.sin() * (px / LANCZOS_A).sin() / (px * px)
}

/// The weights of a shift by `d` along one axis: `out(x) = Σ_t k[t] · in(x + i + t − 2)` with
/// `i = floor(d)`, so `out(x)` is the input at `x + d`. Normalised to unit sum; an integer
/// shift (within [`SNAP`]) is the exact delta `[0, 0, 1, 0, 0, 0]`.
pub fn axis_taps(d: f64) -> (i64, [f64; TAPS]) {
    let mut i = d.floor();
    let mut f = d - i;
    // Within SNAP of a whole pixel the shift is that whole pixel: an exact copy, and no weight
    // so small that the GPU's f32 would flush it to zero and mask differently.
    if f > 1.0 - SNAP {
        (i, f) = (i + 1.0, 0.0);
    }
    let mut k = [0.0f64; TAPS];
    if f < SNAP {
        k[2] = 1.0;
        return (i as i64, k);
    }
    for (t, kt) in k.iter_mut().enumerate() {
        *kt = lanczos3(f - (t as f64 - 2.0));
    }
    let s: f64 = k.iter().sum();
    for kt in &mut k {
        *kt /= s;
    }
    (i as i64, k)
}

/// One epoch's shift onto the common grid: integer parts and Lanczos weights per axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShiftTaps {
    pub ix: i64,
    pub iy: i64,
    pub kx: [f64; TAPS],
    pub ky: [f64; TAPS],
}

impl ShiftTaps {
    /// The shift that takes a stamp whose grid is offset by `(dx, dy)` from the common one (a
    /// source at common `(X, Y)` is at `(X + dx, Y + dy)` on the stamp) onto the common grid.
    pub fn new(dx: f64, dy: f64) -> ShiftTaps {
        let (ix, kx) = axis_taps(dx);
        let (iy, ky) = axis_taps(dy);
        ShiftTaps { ix, iy, kx, ky }
    }

    /// Per-axis noise-correlation factors `(Σ kx², Σ ky²)`: what the shift does to a white
    /// pixel's variance along each axis (1 for an integer shift, 0.786 at half a pixel).
    /// Through a matched filter on a smooth PSF the noise is that of the unshifted image, so a
    /// score computed with the shifted per-pixel variance is to be divided by
    /// `1 / sqrt(cx · cy)`.
    pub fn corr(&self) -> (f64, f64) {
        (self.kx.iter().map(|k| k * k).sum(), self.ky.iter().map(|k| k * k).sum())
    }
}

/// What the kernels read of a shift: `kx[6]`, `ky[6]`, the whole-pixel parts `ix`, `iy` and
/// the correlation factor `cx · cy`, as f32 (`eps` of `shaders/stack/`, `entries` of
/// `shaders/ring/ring.wgsl`).
pub fn tap_values(t: &ShiftTaps) -> [f32; 2 * TAPS + 3] {
    let mut v = [0.0f32; 2 * TAPS + 3];
    for k in 0..TAPS {
        v[k] = t.kx[k] as f32;
        v[TAPS + k] = t.ky[k] as f32;
    }
    v[2 * TAPS] = t.ix as f32;
    v[2 * TAPS + 1] = t.iy as f32;
    v[2 * TAPS + 2] = corr_product(t) as f32;
    v
}

/// A pixel the kernels may use: finite difference, finite positive variance, finite
/// non-negative template variance (`usable` in `shaders/stack/shared/stack_params.wgsl`).
pub fn usable(d: f32, v: f32, vt: f32) -> bool {
    d.is_finite() && v.is_finite() && v > 0.0 && vt.is_finite() && vt >= 0.0
}

/// One epoch's planes shifted onto the common grid (twin of `shift` in `shift.wgsl`):
/// `D' = Σ kx ky D`, `V' = Σ (kx ky)² V`, `VT' = Σ (kx ky)² VT` over the taps of non-zero
/// weight; NaN in all three where one of those taps leaves the stamp or is not [`usable`].
/// Separable here (rows, then columns), the 6×6 sum in the kernel: the same sums.
pub fn shift_planes(d: &[f32], v: &[f32], vt: &[f32], w: usize, h: usize, t: &ShiftTaps) -> [Vec<f32>; 3] {
    let n = w * h;
    let mut out = [vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]];
    if d.len() != n || v.len() != n || vt.len() != n {
        return out;
    }
    // Rows: (D, V, VT) along x for every source row, `None` where masked.
    let mut rows: Vec<Option<[f64; 3]>> = vec![None; n];
    for y in 0..h {
        for x in 0..w {
            let mut s = [0.0f64; 3];
            let mut ok = true;
            for (i, &k) in t.kx.iter().enumerate() {
                if k == 0.0 {
                    continue;
                }
                let sx = x as i64 + t.ix + i as i64 - 2;
                if sx < 0 || sx >= w as i64 {
                    ok = false;
                    break;
                }
                let p = y * w + sx as usize;
                if !usable(d[p], v[p], vt[p]) {
                    ok = false;
                    break;
                }
                s[0] += k * d[p] as f64;
                s[1] += k * k * v[p] as f64;
                s[2] += k * k * vt[p] as f64;
            }
            rows[y * w + x] = ok.then_some(s);
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut s = [0.0f64; 3];
            let mut ok = true;
            for (j, &k) in t.ky.iter().enumerate() {
                if k == 0.0 {
                    continue;
                }
                let sy = y as i64 + t.iy + j as i64 - 2;
                let Some(r) = (sy >= 0 && sy < h as i64).then(|| rows[sy as usize * w + x]).flatten() else {
                    ok = false;
                    break;
                };
                s[0] += k * r[0];
                s[1] += k * k * r[1];
                s[2] += k * k * r[2];
            }
            if ok {
                for (o, v) in out.iter_mut().zip(s) {
                    o[y * w + x] = v as f32;
                }
            }
        }
    }
    out
}

/// One shifted pixel of the planes `[D, V, VT]` by the direct 6×6 sum (the kernel's loop):
/// `(D', V', VT')`, `None` where masked. For the few pixels the effective PSF's weights need.
pub fn shift_pixel(planes: [&[f32]; 3], w: usize, h: usize, t: &ShiftTaps, x: usize, y: usize) -> Option<[f64; 3]> {
    let [d, v, vt] = planes;
    let mut s = [0.0f64; 3];
    for (j, &ky) in t.ky.iter().enumerate() {
        if ky == 0.0 {
            continue;
        }
        let sy = y as i64 + t.iy + j as i64 - 2;
        if sy < 0 || sy >= h as i64 {
            return None;
        }
        for (i, &kx) in t.kx.iter().enumerate() {
            if kx == 0.0 {
                continue;
            }
            let sx = x as i64 + t.ix + i as i64 - 2;
            if sx < 0 || sx >= w as i64 {
                return None;
            }
            let p = sy as usize * w + sx as usize;
            if !usable(*d.get(p)?, *v.get(p)?, *vt.get(p)?) {
                return None;
            }
            let k = kx * ky;
            s[0] += k * d[p] as f64;
            s[1] += k * k * v[p] as f64;
            s[2] += k * k * vt[p] as f64;
        }
    }
    Some(s)
}

/// A PSF shifted the same way as its epoch's pixels, zero outside its image (it is a model, not
/// data: its wings end there), non-finite values as zero, then back to unit sum. Separable:
/// along x into a scratch image, then along y (the streaming path shifts a few PSFs per epoch
/// and window, so this is on its hot path).
pub fn shift_psf(p: &PsfImage, t: &ShiftTaps) -> PsfImage {
    let s = p.side;
    let si = s as i64;
    // Rows: every source row, non-finite values as zero, in a line padded with zeros wide
    // enough for every tap (`x + ix − 2 ..= x + ix + 3`), then shifted along x: the same sums
    // in the same order as tap by tap with bounds checks (a zero tap adds 0), several times
    // faster on the streaming path.
    let pad = TAPS + t.ix.unsigned_abs().min(si as u64 + TAPS as u64) as usize;
    let mut line = vec![0.0f64; s + 2 * pad];
    let mut rows = vec![0.0f64; s * s];
    for y in 0..s {
        for (x, l) in line[pad..pad + s].iter_mut().enumerate() {
            let v = p.pixels.get(y * s + x).copied().unwrap_or(0.0);
            *l = if v.is_finite() { v } else { 0.0 };
        }
        for x in 0..si {
            // Within the line: pad + x + ix − 2 ≥ pad − |ix| − 2 > 0, and its last tap at most
            // pad + s − 1 + |ix| + 3 < s + 2·pad; a shift past the image reads only padding.
            let start = pad as i64 + x + t.ix - 2;
            let acc = match usize::try_from(start).ok().and_then(|a| line.get(a..a + TAPS)) {
                Some(w) => w.iter().zip(&t.kx).fold(0.0, |acc, (v, k)| acc + k * v),
                None => 0.0,
            };
            rows[y * s + x as usize] = acc;
        }
    }
    let mut out = vec![0.0f64; s * s];
    for y in 0..si {
        for (j, &ky) in t.ky.iter().enumerate() {
            let sy = y + t.iy + j as i64 - 2;
            if ky == 0.0 || sy < 0 || sy >= si {
                continue;
            }
            let (dst, src) = (y as usize * s, sy as usize * s);
            for x in 0..s {
                out[dst + x] += ky * rows[src + x];
            }
        }
    }
    let sum: f64 = out.iter().sum();
    if sum != 0.0 && sum.is_finite() {
        for v in &mut out {
            *v /= sum;
        }
    }
    PsfImage { side: s, pixels: out }
}

/// Every epoch of `b` shifted onto the common grid (twin of `shift.wgsl`): planes epoch after
/// epoch, as in the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Shifted {
    pub diff: Vec<f32>,
    pub var: Vec<f32>,
    pub var_template: Vec<f32>,
}

/// [`shift_planes`] on every epoch of the batch.
pub fn shift(b: &StackBatch) -> Shifted {
    let npix = b.npix();
    let ne = b.epochs();
    let mut out = Shifted { diff: Vec::with_capacity(ne * npix), var: Vec::with_capacity(ne * npix), var_template: Vec::with_capacity(ne * npix) };
    for e in 0..ne {
        let px = e * npix..(e + 1) * npix;
        let t = ShiftTaps::new(b.shifts[e].0, b.shifts[e].1);
        let [d, v, vt] = shift_planes(&b.diff[px.clone()], &b.var[px.clone()], &b.var_template[px], b.width, b.height, &t);
        out.diff.extend(d);
        out.var.extend(v);
        out.var_template.extend(vt);
    }
    out
}

/// One pixel of a stack from its epochs' shifted `(D', V', VT', c)`, `c = cx · cy` the epoch's
/// correlation factor, in summation order (twin of `coadd` in `coadd.wgsl`). Epochs not
/// [`usable`] at this pixel drop out. With `Ve = V'/c`, `VTe = min(VT'/c, Ve)` (what a smooth
/// filter sees: the unshifted variances) and `w = 1/Ve`:
///
/// ```text
/// S = Σ w D' / W,   W = Σ w
/// Var(S)  = [Σ w² (Ve − VTe) + (Σ w √VTe)²] / W²     (template noise common to every epoch)
/// VarT(S) = (Σ w √VTe)² / W²
/// ```
///
/// Returns `(S, Var, VarT, epochs used)`; NaN, NaN, NaN, 0 where none is usable.
pub fn coadd_pixel(epochs: impl IntoIterator<Item = (f32, f32, f32, f64)>) -> (f32, f32, f32, u32) {
    let (mut sums, mut n) = ([0.0f64; 4], 0u32);
    for t in epochs.into_iter().filter_map(|(d, v, vt, c)| coadd_terms(d, v, vt, c)) {
        for (s, t) in sums.iter_mut().zip(t) {
            *s += t;
        }
        n += 1;
    }
    coadd_finish(sums, n)
}

/// What one epoch adds to a stack pixel's sums in [`coadd_pixel`]: `(w, w·D', w²(Ve − VTe),
/// w·√VTe)`, or `None` where it is not [`usable`]. Made once per epoch and pixel for all the
/// stacks that share the epoch ([`coadd_shifted`]: an object's windows are nested), the same
/// numbers summed in the same order.
fn coadd_terms(d: f32, v: f32, vt: f32, c: f64) -> Option<[f64; 4]> {
    if !usable(d, v, vt) {
        return None;
    }
    let ve = v as f64 / c;
    let vte = (vt as f64 / c).min(ve);
    let w = 1.0 / ve;
    Some([w, w * d as f64, w * w * (ve - vte), w * vte.sqrt()])
}

/// `(S, Var, VarT, n)` from the sums of [`coadd_terms`] over `n` usable epochs.
fn coadd_finish([wsum, sd, a, b]: [f64; 4], n: u32) -> (f32, f32, f32, u32) {
    if n == 0 {
        return (f32::NAN, f32::NAN, f32::NAN, 0);
    }
    // Divided by W before squaring: no overflow for tiny variances.
    let bw = b / wsum;
    ((sd / wsum) as f32, (a / wsum / wsum + bw * bw) as f32, (bw * bw) as f32, n)
}

/// Every stack of `b` (twin of `shift.wgsl` then `coadd.wgsl`), each with its effective PSF.
/// The batch is assumed valid ([`StackBatch::validate`]); a stack whose range is out of bounds
/// comes back fully masked.
pub fn coadd(b: &StackBatch) -> Vec<Stack> {
    let sh = shift(b);
    coadd_shifted(b, &sh)
}

/// The coadd of already shifted planes (`shift(b)`), for callers that keep them.
pub fn coadd_shifted(b: &StackBatch, sh: &Shifted) -> Vec<Stack> {
    let npix = b.npix();
    let corr: Vec<f64> = b.shifts.iter().map(|&(dx, dy)| corr_product(&ShiftTaps::new(dx, dy))).collect();
    let psfs = EpochPsfs::new(b, 0..b.epochs());
    // Each epoch's terms once, for every stack that holds it.
    let terms: Vec<Option<[f64; 4]>> =
        (0..b.epochs() * npix).map(|p| coadd_terms(sh.diff[p], sh.var[p], sh.var_template[p], corr[p / npix.max(1)])).collect();
    b.stacks
        .iter()
        .map(|r| {
            let mut st = Stack::masked(b.width, b.height);
            if r.end > b.epochs() || r.start > r.end {
                return st;
            }
            st.epochs = r.len();
            for i in 0..npix {
                let (mut sums, mut n) = ([0.0f64; 4], 0u32);
                for t in r.clone().filter_map(|e| terms[e * npix + i]) {
                    for (s, t) in sums.iter_mut().zip(t) {
                        *s += t;
                    }
                    n += 1;
                }
                let (s, v, vt, n) = coadd_finish(sums, n);
                st.image[i] = s;
                st.var[i] = v;
                st.var_template[i] = vt;
                st.count[i] = n;
            }
            st.psf = psfs.effective(r.clone());
            st
        })
        .collect()
}

/// `cx · cy` of a shift.
pub fn corr_product(t: &ShiftTaps) -> f64 {
    let (cx, cy) = t.corr();
    cx * cy
}

/// The effective PSF of the stack of `epochs` of `b`: the epochs' shifted PSFs, each weighted
/// by its mean weight `c / V'` over the `(2·CORE_RADIUS + 1)²` box at the stamp centre (masked
/// pixels weigh 0), on the largest side among them, unit sum. Equal weights where no epoch has
/// a usable core. For several stacks of one batch, [`EpochPsfs`] shifts each epoch's PSF once.
pub fn effective_psf(b: &StackBatch, epochs: std::ops::Range<usize>) -> PsfImage {
    EpochPsfs::new(b, epochs.clone()).effective(epochs)
}

/// Each epoch's part in an effective PSF ([`effective_psf`]): its weight at the stamp centre
/// and its shifted PSF, made once for every stack of a batch that holds the epoch (one
/// object's windows share most of their epochs).
#[derive(Debug, Clone)]
pub struct EpochPsfs {
    /// The first epoch held; `parts[k]` is epoch `first + k`'s, `None` for one without a PSF.
    first: usize,
    parts: Vec<Option<(f64, PsfImage)>>,
}

impl EpochPsfs {
    /// The parts of the epochs `epochs` of `b`.
    pub fn new(b: &StackBatch, epochs: std::ops::Range<usize>) -> EpochPsfs {
        let npix = b.npix();
        let (cx, cy) = (b.width / 2, b.height / 2);
        let first = epochs.start;
        let parts = epochs
            .map(|e| {
                let (p, &(dx, dy)) = (b.psfs.get(e)?, b.shifts.get(e)?);
                let t = ShiftTaps::new(dx, dy);
                let c = corr_product(&t);
                let px = e * npix..(e + 1) * npix;
                let (d, v, vt) = (b.diff.get(px.clone())?, b.var.get(px.clone())?, b.var_template.get(px)?);
                let mut wsum = 0.0;
                let r = CORE_RADIUS;
                let mut cells = 0.0;
                for y in cy.saturating_sub(r)..=(cy + r).min(b.height.saturating_sub(1)) {
                    for x in cx.saturating_sub(r)..=(cx + r).min(b.width.saturating_sub(1)) {
                        cells += 1.0;
                        if let Some(s) = shift_pixel([d, v, vt], b.width, b.height, &t, x, y) {
                            wsum += c / s[1];
                        }
                    }
                }
                Some((wsum / f64::max(cells, 1.0), shift_psf(p, &t)))
            })
            .collect();
        EpochPsfs { first, parts }
    }

    /// The effective PSF of the stack of `epochs` (epochs outside those held are left out).
    pub fn effective(&self, epochs: std::ops::Range<usize>) -> PsfImage {
        let parts: Vec<&(f64, PsfImage)> = epochs.filter_map(|e| self.parts.get(e.checked_sub(self.first)?)?.as_ref()).collect();
        let side = parts.iter().map(|(_, p)| p.side).max().unwrap_or(1);
        let total: f64 = parts.iter().map(|(w, _)| w).sum();
        let equal = !(total > 0.0 && total.is_finite());
        let mut out = vec![0.0f64; side * side];
        for (w, p) in parts {
            let w = if equal { 1.0 } else { *w };
            let off = (side - p.side) / 2;
            for y in 0..p.side {
                for x in 0..p.side {
                    out[(y + off) * side + x + off] += w * p.pixels[y * p.side + x];
                }
            }
        }
        let sum: f64 = out.iter().sum();
        if sum != 0.0 && sum.is_finite() {
            for v in &mut out {
                *v /= sum;
            }
        }
        PsfImage { side, pixels: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_shifts_are_exact_copies() {
        let (w, h) = (9, 7);
        let d: Vec<f32> = (0..w * h).map(|i| (i as f32 * 0.37).sin() * 10.0).collect();
        let v: Vec<f32> = (0..w * h).map(|i| 1.0 + (i % 5) as f32).collect();
        let vt: Vec<f32> = v.iter().map(|x| x * 0.1).collect();
        for (dx, dy) in [(0.0, 0.0), (1.0, 0.0), (-2.0, 1.0), (3.0, -3.0)] {
            let t = ShiftTaps::new(dx, dy);
            assert_eq!(t.corr(), (1.0, 1.0));
            let [sd, sv, svt] = shift_planes(&d, &v, &vt, w, h, &t);
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let (sx, sy) = (x + dx as i64, y + dy as i64);
                    let o = (y * w as i64 + x) as usize;
                    if sx < 0 || sy < 0 || sx >= w as i64 || sy >= h as i64 {
                        assert!(sd[o].is_nan() && sv[o].is_nan() && svt[o].is_nan(), "edge ({x}, {y}) masked");
                    } else {
                        let p = (sy * w as i64 + sx) as usize;
                        assert_eq!((sd[o], sv[o], svt[o]), (d[p], v[p], vt[p]), "({dx}, {dy}) at ({x}, {y})");
                    }
                }
            }
        }
    }

    #[test]
    fn taps_are_normalised_and_interpolate_smooth_signals() {
        for d in [0.1, 0.25, 0.5, 0.77, -0.4, 2.3] {
            let (i, k) = axis_taps(d);
            assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            // Lanczos-3 is not exact on a ramp (its first moment misses d by up to 0.014 px),
            // but close on a band-limited signal: a sinusoid of period 8 px.
            let at: f64 = k.iter().enumerate().map(|(t, kt)| kt * (10.0 + i as f64 + t as f64 - 2.0)).sum();
            assert!((at - (10.0 + d)).abs() < 0.02, "{d}: ramp {at}");
            let f = |x: f64| (std::f64::consts::TAU * x / 8.0).sin();
            let at: f64 = k.iter().enumerate().map(|(t, kt)| kt * f(10.0 + i as f64 + t as f64 - 2.0)).sum();
            assert!((at - f(10.0 + d)).abs() < 0.01, "{d}: sinusoid {at} {}", f(10.0 + d));
        }
        let (_, k) = axis_taps(0.5);
        let c: f64 = k.iter().map(|x| x * x).sum();
        assert!((c - 0.7858).abs() < 1e-3, "half-pixel correlation factor {c}");
    }

    #[test]
    fn separable_and_direct_shifts_agree_and_mask_alike() {
        let (w, h) = (30, 24);
        let mut d: Vec<f32> = (0..w * h).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        let v: Vec<f32> = (0..w * h).map(|i| 2.0 + (i % 3) as f32).collect();
        let vt = vec![0.5f32; w * h];
        d[5 * w + 7] = f32::NAN;
        let t = ShiftTaps::new(0.3, -1.6);
        let [sd, sv, svt] = shift_planes(&d, &v, &vt, w, h, &t);
        for y in 0..h {
            for x in 0..w {
                let o = y * w + x;
                match shift_pixel([&d, &v, &vt], w, h, &t, x, y) {
                    None => assert!(sd[o].is_nan() && sv[o].is_nan() && svt[o].is_nan(), "({x}, {y})"),
                    Some(s) => {
                        assert!((sd[o] as f64 - s[0]).abs() < 1e-4 && (sv[o] as f64 - s[1]).abs() < 1e-5 && (svt[o] as f64 - s[2]).abs() < 1e-6, "({x}, {y})");
                    }
                }
            }
        }
        // The edges the support leaves (2 + 3 columns, 4 + 1 rows at this shift) and the 6×6
        // box the NaN reaches.
        let masked = sd.iter().filter(|x| x.is_nan()).count();
        assert_eq!(masked, w * h - (w - 5) * (h - 5) + 36);
    }

    #[test]
    fn a_psf_shift_is_the_direct_sum_with_nothing_outside() {
        use rand::{Rng, SeedableRng};
        let seed = crate::testing::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..20 {
            let side = 2 * rng.gen_range(1..10) + 1;
            let mut pixels: Vec<f64> = (0..side * side).map(|_| rng.gen_range(0.0..1.0)).collect();
            pixels[rng.gen_range(0..side * side)] = f64::NAN;
            let p = PsfImage { side, pixels };
            let t = ShiftTaps::new(rng.gen_range(-3.0..3.0), rng.gen_range(-3.0..3.0));
            let got = shift_psf(&p, &t);
            // The 6×6 sum of the definition, zero outside the image and for non-finite pixels.
            let at = |x: i64, y: i64| {
                let inside = x >= 0 && y >= 0 && x < side as i64 && y < side as i64;
                let v = if inside { p.pixels[y as usize * side + x as usize] } else { 0.0 };
                if v.is_finite() {
                    v
                } else {
                    0.0
                }
            };
            let mut want = vec![0.0f64; side * side];
            for y in 0..side as i64 {
                for x in 0..side as i64 {
                    for (j, ky) in t.ky.iter().enumerate() {
                        for (i, kx) in t.kx.iter().enumerate() {
                            want[y as usize * side + x as usize] += kx * ky * at(x + t.ix + i as i64 - 2, y + t.iy + j as i64 - 2);
                        }
                    }
                }
            }
            let sum: f64 = want.iter().sum();
            assert_eq!(got.side, side);
            assert!((got.pixels.iter().sum::<f64>() - 1.0).abs() < 1e-9, "seed {seed}: unit sum");
            // Normalising divides by the sum, which a shift moving much of the PSF off its box
            // (or Lanczos's negative lobes) can leave small beside the terms: rounding then
            // grows as Σ|w| / |Σw| (a pixel of −42.77 differed by 2·10⁻¹² in one run of 150).
            let tol = 1e-12 * (want.iter().map(|v| v.abs()).sum::<f64>() / sum.abs()).max(1.0);
            for (g, w) in got.pixels.iter().zip(&want) {
                assert!((g - w / sum).abs() < tol, "seed {seed}: {g} against {} (tolerance {tol:e})", w / sum);
            }
        }
    }

    #[test]
    fn coadd_pixel_formula() {
        // Two epochs, V = 4 and 2 with template parts 1 and 0.5 (correlation 1).
        let (s, v, vt, n) = coadd_pixel([(1.0, 4.0, 1.0, 1.0), (4.0, 2.0, 0.5, 1.0), (f32::NAN, 1.0, 0.0, 1.0)]);
        let (w1, w2) = (0.25, 0.5);
        let wsum = w1 + w2;
        assert_eq!(n, 2);
        assert!((s as f64 - (w1 * 1.0 + w2 * 4.0) / wsum).abs() < 1e-6);
        let b = w1 * 1.0f64.sqrt() + w2 * 0.5f64.sqrt();
        let want = (w1 * w1 * 3.0 + w2 * w2 * 1.5 + b * b) / (wsum * wsum);
        assert!((v as f64 / want - 1.0).abs() < 1e-6, "{v} {want}");
        assert!((vt as f64 / (b * b / (wsum * wsum)) - 1.0).abs() < 1e-6);
        let (s, v, vt, n) = coadd_pixel([(f32::NAN, 1.0, 0.0, 1.0)]);
        assert!(s.is_nan() && v.is_nan() && vt.is_nan() && n == 0);
    }
}
