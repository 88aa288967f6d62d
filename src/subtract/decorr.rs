//! The difference-image decorrelation post-filter of Reiss & Lupton (DMTN-021, "Image
//! Subtraction: Image Decorrelation"), as the LSST pipelines apply it after an Alard–Lupton
//! subtraction (`lsst/ip_diffim`, `imageDecorrelation.py`,
//! `DecorrelateALKernelTask.computeDiffimCorrection`).
//!
//! A difference `D = I_u − κ ⊗ I_c` (`I_u` the image not convolved, `I_c` the convolved one,
//! `κ` the matching kernel, flux scale included) has white noise from `I_u` and noise correlated
//! over `κ` from `I_c`. With `σ_u², σ_c²` their per-pixel white-noise variances (typical values
//! over the frame, each in its own image's units), the filter
//!
//! ```text
//! φ̂(k) = sqrt( (σ_u² + κ̂(0)² σ_c²) / (σ_u² + σ_c² |κ̂(k)|²) )        κ̂(0) = Σκ
//! ```
//!
//! makes the noise power of `φ ⊗ D`, `|φ̂|² (σ_u² + σ_c² |κ̂|²)`, the constant
//! `σ_u² + κ̂(0)² σ_c²`: white, with that variance per pixel. `φ̂(0) = 1`, so `φ` sums to one
//! and fluxes are kept (this is the LSST form, whose numerator carries `kSum²`; DMTN-021 eq. 1
//! writes it for a unit-sum κ). `φ̂` is real and even (`|κ̂(−k)| = |κ̂(k)|` for a real κ), so `φ`
//! is real and symmetric. At high frequencies `φ̂ → sqrt(1 + κ̂(0)² σ_c²/σ_u²)`: the filter
//! sharpens, and it is tame as long as `σ_u²` is not tiny beside `σ_c²` (a template much
//! noisier than the science frame); `σ_u² = 0` is refused.
//!
//! **Which variance is which.** `var_unconvolved` belongs to the image the kernel was *not*
//! applied to: the science frame normally, the template when the science frame is the sharper
//! one and the roles are swapped. `var_convolved` belongs to the image the kernel *was* applied
//! to, before convolution, in that image's own units (κ carries the flux scale into the other's).
//! The filter is linear and does not depend on the sign or overall scale of `D`, so it may be
//! applied either to the swapped difference `D' = T − κ ⊗ S` or to it mapped back to science
//! units, `D = −D'/a`; the variance of the latter is the former's divided by `a²`.
//!
//! The PSF of the decorrelated difference, for the matched filter, is `φ ⊗ P_u` with `P_u` the
//! PSF of the image not convolved ([`decorrelated_psf`]).
//!
//! Also here: [`Fft2`], the 2-D complex FFT (rows, a transpose, rows) on `rustfft`, shared with
//! [`super::zogy`].

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftNum, FftPlanner};

use super::basis::pad_clamped;
use super::SubtractError;

/// Largest `out_half` accepted (a 257² box; a decorrelation kernel is a few times the
/// matching kernel's width).
pub const MAX_OUT_HALF: usize = 128;

/// The decorrelation filter `φ` on its `(2·half + 1)²` box, row-major, centred (the layout of
/// the matching kernels, see [`super`]), with what the variance and the matched filter need.
#[derive(Debug, Clone, PartialEq)]
pub struct DecorrelationKernel {
    /// Half-width of the box, pixels.
    pub half: usize,
    /// `φ(u, v)` at `[(v + half)(2·half + 1) + (u + half)]`, dimensionless.
    pub kernel: Vec<f64>,
    /// Fraction of `Σφ²` (over the whole FFT grid) that falls outside the box: 0 for a box
    /// that holds the whole filter. Above ~1e-3 the box is too small for the noise to come out
    /// white to the percent.
    pub truncated_energy: f64,
    /// Sum of the truncated kernel (1 untruncated: `φ̂(0) = 1`).
    pub sum: f64,
    /// Sum of the matching kernel, `κ̂(0)` (the flux scale unconvolved / convolved).
    pub kappa_sum: f64,
    /// The variance per pixel of the image not convolved that the filter was built for, its
    /// units².
    pub var_unconvolved: f64,
    /// The variance per pixel of the convolved image (before convolution) that the filter was
    /// built for, its own units².
    pub var_convolved: f64,
    /// `Σφ²` over the box: the factor on the unconvolved image's variance in the filtered
    /// difference.
    pub weight_unconvolved: f64,
    /// `Σ(κ ⊗ φ)²` over the box: the factor on the convolved image's variance (before
    /// convolution, its own units) in the filtered difference.
    pub weight_convolved: f64,
    /// Side of the FFT grid the filter was computed on, pixels.
    pub grid: usize,
}

impl DecorrelationKernel {
    /// Side of the box, `2·half + 1`.
    pub fn side(&self) -> usize {
        2 * self.half + 1
    }

    /// Per-pixel variance of the filtered difference where the two images have the variances
    /// the filter was built for: `Σφ² σ_u² + Σ(κ⊗φ)² σ_c²`, which is `σ_u² + κ̂(0)² σ_c²` when
    /// nothing is truncated. In the unconvolved image's units.
    pub fn output_variance(&self) -> f64 {
        self.weight_unconvolved * self.var_unconvolved + self.weight_convolved * self.var_convolved
    }
}

/// A small square image of odd side, centred on its middle pixel, row-major: a PSF.
#[derive(Debug, Clone, PartialEq)]
pub struct PsfImage {
    /// Side, pixels (odd).
    pub side: usize,
    /// `side²` values.
    pub pixels: Vec<f64>,
}

impl PsfImage {
    /// A unit-sum Gaussian of σ `sigma` (pixels) centred `(dx, dy)` from the middle pixel of a
    /// `side²` image (`side` odd).
    pub fn gaussian(side: usize, sigma: f64, dx: f64, dy: f64) -> PsfImage {
        let c = (side / 2) as f64;
        let mut pixels: Vec<f64> = (0..side * side)
            .map(|i| {
                let (u, v) = ((i % side) as f64 - c - dx, (i / side) as f64 - c - dy);
                (-(u * u + v * v) / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let sum: f64 = pixels.iter().sum();
        pixels.iter_mut().for_each(|p| *p /= sum);
        PsfImage { side, pixels }
    }
}

/// The decorrelation filter for a difference whose convolved image went through `kappa`.
///
/// - `kappa`: the matching kernel at the point of interest (the frame centre, say; LSST does
///   the same with a spatially varying kernel), `kappa_side²` values, row-major, centred, flux
///   scale included (it sums to the scale unconvolved / convolved). `kappa_side` odd.
/// - `var_unconvolved`, `var_convolved`: per-pixel white-noise variances of the image not
///   convolved and of the convolved one before convolution, each in its own units (see the
///   module doc for which is which when science and template swap roles). A typical (median,
///   sky) value over the frame.
/// - `out_half`: half-width of the returned box.
///
/// Computed on an `n × n` FFT grid, `n` the next power of two at or above
/// `max(8·kappa_side, 4·(2·out_half + 1), 64)`, so that what the inverse transform wraps into
/// the box is negligible. `φ` has small oscillating wings (a few 1e-3 of its centre at 5 px for
/// a κ of σ 1.5 px): `out_half` of 2–3 times κ's half-width keeps the truncated energy below
/// 1e-8 and the sum within 1e-3 of one.
pub fn decorrelation_kernel(
    kappa: &[f64],
    kappa_side: usize,
    var_unconvolved: f64,
    var_convolved: f64,
    out_half: usize,
) -> Result<DecorrelationKernel, SubtractError> {
    if kappa_side.is_multiple_of(2) || kappa.len() != kappa_side * kappa_side {
        return Err(SubtractError::Shape { what: format!("matching kernel of {} values for an odd side {kappa_side}", kappa.len()) });
    }
    if out_half > MAX_OUT_HALF {
        return Err(SubtractError::Shape { what: format!("decorrelation half-width {out_half} above {MAX_OUT_HALF}") });
    }
    if let Some(i) = kappa.iter().position(|v| !v.is_finite()) {
        return Err(SubtractError::NonFinite { what: format!("matching kernel value {} at index {i}", kappa[i]) });
    }
    if !(var_unconvolved.is_finite() && var_unconvolved > 0.0 && var_convolved.is_finite() && var_convolved >= 0.0) {
        return Err(SubtractError::NonFinite {
            what: format!("decorrelation variances: unconvolved {var_unconvolved} (must be > 0), convolved {var_convolved} (must be ≥ 0)"),
        });
    }
    let out_side = 2 * out_half + 1;
    let n = (8 * kappa_side).max(4 * out_side).max(64).next_power_of_two();
    let fft = Fft2::new(n, n);
    let kh = (kappa_side / 2) as i64;
    let wrap = |i: i64| i.rem_euclid(n as i64) as usize;
    let mut grid = vec![Complex::new(0.0, 0.0); n * n];
    for v in -kh..=kh {
        for u in -kh..=kh {
            grid[wrap(v) * n + wrap(u)].re = kappa[((v + kh) * kappa_side as i64 + u + kh) as usize];
        }
    }
    let kappa_sum: f64 = kappa.iter().sum();
    fft.forward(&mut grid);
    let num = var_unconvolved + kappa_sum * kappa_sum * var_convolved;
    for c in grid.iter_mut() {
        *c = Complex::new((num / (var_unconvolved + var_convolved * c.norm_sqr())).sqrt(), 0.0);
    }
    fft.inverse(&mut grid);
    let total: f64 = grid.iter().map(|c| c.re * c.re).sum();
    let oh = out_half as i64;
    let mut kernel = vec![0.0; out_side * out_side];
    for v in -oh..=oh {
        for u in -oh..=oh {
            kernel[((v + oh) * out_side as i64 + u + oh) as usize] = grid[wrap(v) * n + wrap(u)].re;
        }
    }
    let kept: f64 = kernel.iter().map(|v| v * v).sum();
    let kphi = convolve_full(kappa, kappa_side, &kernel, out_side);
    Ok(DecorrelationKernel {
        half: out_half,
        truncated_energy: if total > 0.0 { (1.0 - kept / total).max(0.0) } else { 0.0 },
        sum: kernel.iter().sum(),
        kappa_sum,
        var_unconvolved,
        var_convolved,
        weight_unconvolved: kept,
        weight_convolved: kphi.iter().map(|v| v * v).sum(),
        kernel,
        grid: n,
    })
}

/// Full 2-D convolution of two centred odd-sided square kernels: side `sa + sb − 1`, centred.
pub fn convolve_full(a: &[f64], sa: usize, b: &[f64], sb: usize) -> Vec<f64> {
    let so = sa + sb - 1;
    let mut out = vec![0.0; so * so];
    for (ay, arow) in a.chunks_exact(sa).enumerate() {
        for (ax, &av) in arow.iter().enumerate() {
            if av == 0.0 {
                continue;
            }
            for (by, brow) in b.chunks_exact(sb).enumerate() {
                let o = (ay + by) * so + ax;
                for (d, &bv) in out[o..o + sb].iter_mut().zip(brow) {
                    *d += av * bv;
                }
            }
        }
    }
    out
}

/// The PSF of the decorrelated difference, `φ ⊗ psf`, for the matched filter: `psf` is the PSF
/// of the image *not* convolved (the science frame normally), `psf_side²` values, row-major,
/// centred, odd side. The result has side `psf_side + 2·half` (the full convolution, nothing
/// cut) and the sum of `psf` times [`DecorrelationKernel::sum`] (≈ 1 for a unit-sum PSF).
pub fn decorrelated_psf(kernel: &DecorrelationKernel, psf: &[f64], psf_side: usize) -> Result<PsfImage, SubtractError> {
    if psf_side.is_multiple_of(2) || psf.len() != psf_side * psf_side {
        return Err(SubtractError::Shape { what: format!("PSF of {} values for an odd side {psf_side}", psf.len()) });
    }
    if let Some(i) = psf.iter().position(|v| !v.is_finite()) {
        return Err(SubtractError::NonFinite { what: format!("PSF value {} at index {i}", psf[i]) });
    }
    Ok(PsfImage { side: psf_side + 2 * kernel.half, pixels: convolve_full(psf, psf_side, &kernel.kernel, kernel.side()) })
}

fn check_frame(what: &str, len: usize, w: usize, h: usize) -> Result<(), SubtractError> {
    if w == 0 || h == 0 || w.checked_mul(h) != Some(len) {
        return Err(SubtractError::Shape { what: format!("{what} has {len} pixels for a {w}x{h} frame") });
    }
    Ok(())
}

/// `φ ⊗ image` (`w × h`, row-major): the decorrelated difference, in the units of `image`.
/// Within `half` of the edges the image is taken as its edge pixel extended (as
/// [`pad_clamped`]); a NaN spreads to every pixel whose `(2·half + 1)²` box holds it (the
/// caller's mask should grow by `half`). Direct convolution, bands of rows on separate threads.
pub fn apply(kernel: &DecorrelationKernel, image: &[f32], w: usize, h: usize) -> Result<Vec<f32>, SubtractError> {
    check_frame("image to decorrelate", image.len(), w, h)?;
    let kh = kernel.half;
    let side = kernel.side();
    if kernel.kernel.len() != side * side {
        return Err(SubtractError::Shape { what: format!("decorrelation kernel of {} values for half-width {kh}", kernel.kernel.len()) });
    }
    let padded = pad_clamped(image, w, h, kh);
    let pw = w + 2 * kh;
    let taps: Vec<f32> = kernel.kernel.iter().map(|&v| v as f32).collect();
    let mut out = vec![0.0f32; w * h];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    let band = h.div_ceil(threads).max(16);
    std::thread::scope(|s| {
        for (bi, dst) in out.chunks_mut(band * w).enumerate() {
            let (padded, taps) = (&padded, &taps);
            s.spawn(move || {
                let y0 = bi * band;
                for (r, orow) in dst.chunks_exact_mut(w).enumerate() {
                    let y = y0 + r;
                    // out(x, y) = Σ φ(u, v) · I(x − u, y − v); padded row y − v + kh holds
                    // image row y − v, and its column x − u + kh image column x − u.
                    for v in 0..side {
                        let prow = &padded[(y + 2 * kh - v) * pw..(y + 2 * kh - v + 1) * pw];
                        for u in 0..side {
                            let c = taps[v * side + u];
                            let shift = 2 * kh - u;
                            // Zero taps are multiplied too, so a NaN reaches its whole box.
                            for (o, &p) in orow.iter_mut().zip(&prow[shift..shift + w]) {
                                *o += c * p;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(out)
}

/// The per-pixel variance of [`apply`]'s output, in the unconvolved image's units:
/// `Σφ² · V_u(x, y) + Σ(κ⊗φ)² · V_c(x, y)` from the variance maps of the two images *before*
/// subtraction (`var_unconvolved` of the image not convolved, `var_convolved` of the convolved
/// one before convolution, in its own units; see the module doc). The difference's own variance
/// map cannot serve: it is already correlated.
///
/// The approximation (LSST's `estimateVariancePlane`): the true variance is
/// `φ² ⊗ V_u + (κ⊗φ)² ⊗ V_c`, the maps convolved with the squared kernels; taking each map at the
/// pixel itself is exact where the variance is flat over the kernels (the sky) and, on a star,
/// spreads less than it should (most of `Σφ²` is in the central tap, so the error is small).
/// NaN stays where it is (it does not spread as in [`apply`]).
pub fn apply_variance(kernel: &DecorrelationKernel, var_unconvolved: &[f32], var_convolved: &[f32], w: usize, h: usize) -> Result<Vec<f32>, SubtractError> {
    check_frame("unconvolved variance", var_unconvolved.len(), w, h)?;
    check_frame("convolved variance", var_convolved.len(), w, h)?;
    let (a, b) = (kernel.weight_unconvolved, kernel.weight_convolved);
    Ok(var_unconvolved.iter().zip(var_convolved).map(|(&u, &c)| (a * u as f64 + b * c as f64) as f32).collect())
}

/// A 2-D complex FFT of a `w × h` row-major grid: every row, a transpose, every row (the
/// columns), a transpose back. Rows are split over threads for grids above 64k cells. Forward
/// is unnormalised, [`Fft2::inverse`] divides by `w·h`, so `inverse(forward(x)) = x`.
/// In f64 by default; `Fft2<f32>` runs twice the lanes per instruction where f32's ~1e-7 of the
/// largest value is precision enough (a matched filter's sums).
pub struct Fft2<T: FftNum = f64> {
    w: usize,
    h: usize,
    row_fwd: Arc<dyn Fft<T>>,
    row_inv: Arc<dyn Fft<T>>,
    col_fwd: Arc<dyn Fft<T>>,
    col_inv: Arc<dyn Fft<T>>,
}

impl<T: FftNum> std::fmt::Debug for Fft2<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fft2({}x{})", self.w, self.h)
    }
}

impl<T: FftNum> Fft2<T> {
    /// Plans for a `w × h` grid (both ≥ 1).
    pub fn new(w: usize, h: usize) -> Fft2<T> {
        let mut p = FftPlanner::new();
        let (w, h) = (w.max(1), h.max(1));
        Fft2 { w, h, row_fwd: p.plan_fft_forward(w), row_inv: p.plan_fft_inverse(w), col_fwd: p.plan_fft_forward(h), col_inv: p.plan_fft_inverse(h) }
    }

    /// Grid width and height.
    pub fn size(&self) -> (usize, usize) {
        (self.w, self.h)
    }

    /// In place, unnormalised: `X(k) = Σ_x x(x) e^{−2πi k·x/n}`. Does nothing if `data` is not
    /// `w·h` long.
    pub fn forward(&self, data: &mut [Complex<T>]) {
        self.run(data, &self.row_fwd, &self.col_fwd);
    }

    /// In place, divided by `w·h`.
    pub fn inverse(&self, data: &mut [Complex<T>]) {
        self.run(data, &self.row_inv, &self.col_inv);
        let s = T::one() / T::from_usize(self.w * self.h).unwrap_or_else(T::one);
        data.iter_mut().for_each(|c| *c = *c * s);
    }

    fn run(&self, data: &mut [Complex<T>], rows: &Arc<dyn Fft<T>>, cols: &Arc<dyn Fft<T>>) {
        if data.len() != self.w * self.h {
            return;
        }
        let mut t = vec![Complex::new(T::zero(), T::zero()); data.len()];
        each_row(data, self.w, rows);
        transpose(data, &mut t, self.w, self.h);
        each_row(&mut t, self.h, cols);
        transpose(&t, data, self.h, self.w);
    }
}

/// The FFT of every `len`-long row of `data`, rows split over threads when there are many.
fn each_row<T: FftNum>(data: &mut [Complex<T>], len: usize, fft: &Arc<dyn Fft<T>>) {
    let rows = data.len() / len;
    let threads = if data.len() < 1 << 16 { 1 } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16) };
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for chunk in data.chunks_mut(per * len) {
            s.spawn(move || {
                let mut scratch = vec![Complex::new(T::zero(), T::zero()); fft.get_inplace_scratch_len()];
                fft.process_with_scratch(chunk, &mut scratch);
            });
        }
    });
}

/// `dst` (`h × w`) = `src` (`w × h`) transposed, in 32×32 blocks.
fn transpose<T: FftNum>(src: &[Complex<T>], dst: &mut [Complex<T>], w: usize, h: usize) {
    const B: usize = 32;
    for y0 in (0..h).step_by(B) {
        for x0 in (0..w).step_by(B) {
            for y in y0..(y0 + B).min(h) {
                for x in x0..(x0 + B).min(w) {
                    dst[x * h + y] = src[y * w + x];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subtract::test_gaussians as gaussians;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    /// Direct convolution of `img` with a centred kernel, edges clamped, in f64.
    fn convolve(img: &[f32], w: usize, h: usize, k: &[f64], side: usize) -> Vec<f32> {
        let kh = (side / 2) as i64;
        let mut out = vec![0.0f32; w * h];
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut s = 0.0f64;
                for v in -kh..=kh {
                    for u in -kh..=kh {
                        let (xx, yy) = ((x - u).clamp(0, w as i64 - 1), (y - v).clamp(0, h as i64 - 1));
                        s += k[((v + kh) * side as i64 + u + kh) as usize] * img[(yy * w as i64 + xx) as usize] as f64;
                    }
                }
                out[(y * w as i64 + x) as usize] = s as f32;
            }
        }
        out
    }

    fn noise(n: usize, sigma: f64, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let d = Normal::new(0.0, sigma).unwrap();
        (0..n).map(|_| d.sample(&mut rng) as f32).collect()
    }

    /// Variance and autocorrelation at the given lags over the interior (`margin` from the
    /// edges).
    fn stats(img: &[f32], w: usize, h: usize, margin: usize, lags: &[(usize, usize)]) -> (f64, Vec<f64>) {
        let px = |x: usize, y: usize| img[y * w + x] as f64;
        let (mut s, mut s2, mut n) = (0.0, 0.0, 0.0);
        for y in margin..h - margin {
            for x in margin..w - margin {
                s += px(x, y);
                s2 += px(x, y) * px(x, y);
                n += 1.0;
            }
        }
        let mean = s / n;
        let var = s2 / n - mean * mean;
        let corr = lags
            .iter()
            .map(|&(dx, dy)| {
                let (mut c, mut m) = (0.0, 0.0);
                for y in margin..h - margin - dy {
                    for x in margin..w - margin - dx {
                        c += (px(x, y) - mean) * (px(x + dx, y + dy) - mean);
                        m += 1.0;
                    }
                }
                c / m / var
            })
            .collect();
        (var, corr)
    }

    const KH: usize = 7;
    const OUT_HALF: usize = 12;
    const VAR_S: f64 = 1.0;
    const VAR_T: f64 = 9.0;

    fn kappa() -> Vec<f64> {
        gaussians(KH, &[(0.85, 1.5, 0.0, 0.0), (0.15, 1.0, 1.5, -0.5)])
    }

    #[test]
    fn fft2_round_trip_and_a_delta() {
        let (w, h) = (12, 10);
        let f = Fft2::new(w, h);
        let x: Vec<Complex<f64>> = (0..w * h).map(|i| Complex::new((i as f64 * 0.37).sin(), (i as f64 * 0.11).cos())).collect();
        let mut y = x.clone();
        f.forward(&mut y);
        f.inverse(&mut y);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).norm() < 1e-12));
        // A delta at (1, 0) transforms to e^{−2πi kx/w}.
        let mut d = vec![Complex::new(0.0, 0.0); w * h];
        d[1].re = 1.0;
        f.forward(&mut d);
        for (i, c) in d.iter().enumerate() {
            let e = Complex::from_polar(1.0, -2.0 * std::f64::consts::PI * (i % w) as f64 / w as f64);
            assert!((c - e).norm() < 1e-12, "cell {i}: {c} vs {e}");
        }
    }

    /// (a) A difference of white noise images, one convolved, comes out white with variance
    /// σ_S² + σ_T².
    #[test]
    fn white_noise_stays_white() {
        let (w, h) = (256usize, 256usize);
        let k = kappa();
        let side = 2 * KH + 1;
        let s = noise(w * h, VAR_S.sqrt(), 11);
        let t = noise(w * h, VAR_T.sqrt(), 12);
        let kt = convolve(&t, w, h, &k, side);
        let d: Vec<f32> = s.iter().zip(&kt).map(|(a, b)| a - b).collect();
        let lags = [(1, 0), (0, 1), (1, 1), (2, 0)];
        let margin = KH + OUT_HALF + 1;
        let (var0, corr0) = stats(&d, w, h, margin, &lags);
        let dk = decorrelation_kernel(&k, side, VAR_S, VAR_T, OUT_HALF).unwrap();
        let out = apply(&dk, &d, w, h).unwrap();
        let (var1, corr1) = stats(&out, w, h, margin, &lags);
        eprintln!("before: var {var0:.3} corr {corr0:.4?}; after: var {var1:.3} (want {:.3}) corr {corr1:.4?}; truncated energy {:.2e}, Σφ {:.6}, grid {}", VAR_S + VAR_T, dk.truncated_energy, dk.sum, dk.grid);
        assert!(corr0[0] > 0.1 && corr0[1] > 0.1, "the convolved template correlates neighbours: {corr0:?}");
        for (c, l) in corr1.iter().zip(&lags) {
            assert!(c.abs() < 0.02, "lag {l:?}: correlation {c} after decorrelation");
        }
        assert!((var1 / (VAR_S + VAR_T) - 1.0).abs() < 0.03, "variance {var1} vs {}", VAR_S + VAR_T);
        assert!(dk.truncated_energy < 1e-3, "truncated {}", dk.truncated_energy);
        assert!((dk.output_variance() / (VAR_S + VAR_T) - 1.0).abs() < 2e-3, "{}", dk.output_variance());
        // The variance map for flat inputs is the same number.
        let v = apply_variance(&dk, &vec![VAR_S as f32; w * h], &vec![VAR_T as f32; w * h], w, h).unwrap();
        assert!((v[0] as f64 - dk.output_variance()).abs() < 1e-4);
        // φ is symmetric and sums to one.
        let n = dk.side();
        for i in 0..n * n {
            assert!((dk.kernel[i] - dk.kernel[n * n - 1 - i]).abs() < 1e-12);
        }
        assert!((dk.sum - 1.0).abs() < 1e-3, "Σφ {}", dk.sum);
    }

    /// (b) No convolution: φ = δ and the filter changes nothing.
    #[test]
    fn delta_kernel_is_identity() {
        let mut delta = vec![0.0; 25];
        delta[12] = 1.0;
        let dk = decorrelation_kernel(&delta, 5, 2.0, 3.0, 4).unwrap();
        for (i, v) in dk.kernel.iter().enumerate() {
            let want = if i == dk.kernel.len() / 2 { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 1e-12, "φ[{i}] = {v}");
        }
        let (w, h) = (40, 30);
        let img = noise(w * h, 1.0, 3);
        let out = apply(&dk, &img, w, h).unwrap();
        assert!(img.iter().zip(&out).all(|(a, b)| (a - b).abs() < 1e-6));
        // A convolved image without noise needs no filter either.
        let dk = decorrelation_kernel(&kappa(), 2 * KH + 1, 1.0, 0.0, 4).unwrap();
        assert!((dk.kernel[dk.kernel.len() / 2] - 1.0).abs() < 1e-12 && dk.truncated_energy < 1e-12);
    }

    /// (c) A point source keeps its flux; the matched filter with the decorrelated PSF reads it.
    #[test]
    fn flux_is_preserved() {
        let (w, h) = (96usize, 96usize);
        let (ph, sig, flux) = (10usize, 2.0, 1000.0);
        let psf = gaussians(ph, &[(1.0, sig, 0.0, 0.0)]);
        let pside = 2 * ph + 1;
        let (cx, cy) = (48usize, 47usize);
        let mut img = vec![0.0f32; w * h];
        for v in 0..pside {
            for u in 0..pside {
                img[(cy + v - ph) * w + cx + u - ph] = (flux * psf[v * pside + u]) as f32;
            }
        }
        let dk = decorrelation_kernel(&kappa(), 2 * KH + 1, VAR_S, VAR_T, OUT_HALF).unwrap();
        let out = apply(&dk, &img, w, h).unwrap();
        let r = 20.0f64;
        let ap = |im: &[f32]| -> f64 {
            let mut s = 0.0;
            for y in 0..h {
                for x in 0..w {
                    let (dx, dy) = (x as f64 - cx as f64, y as f64 - cy as f64);
                    if dx * dx + dy * dy <= r * r {
                        s += im[y * w + x] as f64;
                    }
                }
            }
            s
        };
        let (before, after) = (ap(&img), ap(&out));
        eprintln!("aperture flux before {before:.3}, after {after:.3}; Σφ {:.6}", dk.sum);
        assert!((after / before - 1.0).abs() < 2e-3, "{before} -> {after}");
        // The filtered source is flux × (φ ⊗ P): the matched filter with P_D returns the flux.
        let pd = decorrelated_psf(&dk, &psf, pside).unwrap();
        assert_eq!(pd.side, pside + 2 * OUT_HALF);
        let psum: f64 = pd.pixels.iter().sum();
        assert!((psum - 1.0).abs() < 2e-3, "ΣP_D {psum}");
        let q = pd.side / 2;
        let (mut num, mut den) = (0.0, 0.0);
        for v in 0..pd.side {
            for u in 0..pd.side {
                let p = pd.pixels[v * pd.side + u];
                num += p * out[(cy + v - q) * w + cx + u - q] as f64;
                den += p * p;
            }
        }
        assert!((num / den / flux - 1.0).abs() < 2e-3, "matched-filter flux {}", num / den);
    }

    /// (d) The matched filter with P_D on a decorrelated pure-noise difference has unit
    /// variance once divided by sqrt(σ_D² ΣP_D²).
    #[test]
    fn matched_filter_score_has_unit_variance() {
        let (w, h) = (256usize, 256usize);
        let k = kappa();
        let side = 2 * KH + 1;
        let s = noise(w * h, VAR_S.sqrt(), 21);
        let t = noise(w * h, VAR_T.sqrt(), 22);
        let kt = convolve(&t, w, h, &k, side);
        let d: Vec<f32> = s.iter().zip(&kt).map(|(a, b)| a - b).collect();
        let dk = decorrelation_kernel(&k, side, VAR_S, VAR_T, OUT_HALF).unwrap();
        let out = apply(&dk, &d, w, h).unwrap();
        let ph = 7usize;
        let psf = gaussians(ph, &[(1.0, 2.0, 0.0, 0.0)]);
        let pd = decorrelated_psf(&dk, &psf, 2 * ph + 1).unwrap();
        let q = pd.side / 2;
        let p2: f64 = pd.pixels.iter().map(|p| p * p).sum();
        let norm = (dk.output_variance() * p2).sqrt();
        let margin = KH + OUT_HALF + q + 1;
        let mut scores = Vec::new();
        for y in margin..h - margin {
            for x in margin..w - margin {
                let mut sc = 0.0;
                for v in 0..pd.side {
                    for u in 0..pd.side {
                        sc += pd.pixels[v * pd.side + u] * out[(y + v - q) * w + x + u - q] as f64;
                    }
                }
                scores.push(sc / norm);
            }
        }
        let n = scores.len() as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let sd = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
        // Without decorrelation, the same normalisation (per-pixel variance of the raw
        // difference) is off: the score's spread is not one.
        let raw_var = VAR_S + VAR_T * k.iter().map(|v| v * v).sum::<f64>();
        let praw: f64 = psf.iter().map(|p| p * p).sum();
        let mut raw = Vec::new();
        for y in (margin..h - margin).step_by(3) {
            for x in (margin..w - margin).step_by(3) {
                let mut sc = 0.0;
                for v in 0..2 * ph + 1 {
                    for u in 0..2 * ph + 1 {
                        sc += psf[v * (2 * ph + 1) + u] * d[(y + v - ph) * w + x + u - ph] as f64;
                    }
                }
                raw.push(sc / (raw_var * praw).sqrt());
            }
        }
        let rn = raw.len() as f64;
        let rm = raw.iter().sum::<f64>() / rn;
        let rsd = (raw.iter().map(|s| (s - rm).powi(2)).sum::<f64>() / rn).sqrt();
        eprintln!("score σ after decorrelation {sd:.4} (mean {mean:.4}); naive score σ without it {rsd:.3}");
        assert!((sd - 1.0).abs() < 0.03, "score σ {sd}");
        assert!(rsd > 1.3, "the undecorrelated score should be visibly off: {rsd}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let k = kappa();
        let side = 2 * KH + 1;
        assert!(decorrelation_kernel(&k, side - 1, 1.0, 1.0, 4).is_err());
        assert!(decorrelation_kernel(&k, side, 0.0, 1.0, 4).is_err());
        assert!(decorrelation_kernel(&k, side, 1.0, f64::NAN, 4).is_err());
        assert!(decorrelation_kernel(&k, side, 1.0, 1.0, MAX_OUT_HALF + 1).is_err());
        let mut bad = k.clone();
        bad[3] = f64::INFINITY;
        assert!(decorrelation_kernel(&bad, side, 1.0, 1.0, 4).is_err());
        let dk = decorrelation_kernel(&k, side, 1.0, 1.0, 4).unwrap();
        assert!(apply(&dk, &[0.0; 10], 3, 3).is_err());
        assert!(apply_variance(&dk, &[0.0; 9], &[0.0; 8], 3, 3).is_err());
        assert!(decorrelated_psf(&dk, &[0.0; 4], 2).is_err());
        // A NaN spreads to its box, no further.
        let (w, h) = (30, 30);
        let mut img = vec![1.0f32; w * h];
        img[15 * w + 15] = f32::NAN;
        let out = apply(&dk, &img, w, h).unwrap();
        let nan: Vec<usize> = (0..w * h).filter(|&i| out[i].is_nan()).collect();
        assert_eq!(nan.len(), 9 * 9);
        assert!(out[15 * w + 10].is_finite() && out[15 * w + 11].is_nan());
    }
}
