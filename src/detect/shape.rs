//! Is a detection the PSF's shape, broader or narrower? The `broad` flag on stacks, and the
//! narrow-core case of the `residual` flag on frames (`docs/detections.md`).
//!
//! A stack of thirty nights averages the noise down sixfold but not what the subtraction leaves
//! of a bright galaxy: the same smooth, faint patch beside it every night, which in a deep stack
//! reaches the threshold. On seed 1's 30-night run (`blink simulate --size 1024x1024 --nights 30`)
//! such patches, 6–15 px from galaxies of 2.5–8·10⁴ ADU, were a third of the 30-night stacks'
//! unflagged false positives. They are broader than the PSF; a transient is not.
//!
//! [`fit_profile`] fits, around the detection, the stack's PSF `q` together with its width
//! derivative `w = ∂/∂s [q(x/s)/s²]` at `s = 1` and its two shift derivatives, by weighted least
//! squares on the white noise of a decorrelated stack. `w` and the shifts are made orthogonal to
//! `q` (so the flux is the matched filter's) and `w` is scaled to `q`'s norm, so the width
//! coefficient `b` is in flux units: a point source has `b ≈ 0`; a Gaussian blob 1.5× the PSF's
//! width has `b/a ≈ 0.41`, twice its width `0.65` (see the tests). The shift terms take up a
//! sub-pixel offset of the peak, which would otherwise read as a change of width.
//!
//! Narrower: on a frame where the science was the sharper image and was convolved, a kernel
//! that leaves the convolved core a little broader than the template's leaves each bright star
//! with a negative core and a positive ring, much narrower than a point source
//! ([`is_narrow_core`]).
//!
//! Written here rather than taken from a crate: a four-parameter linear fit on one stamp, solved
//! by the project's small Cholesky ([`crate::subtract::solve::solve_spd`]).

use crate::subtract::decorr::PsfImage;

/// `b/a` at or above which a detection is broader than the PSF.
pub const BROAD_INDEX: f64 = 0.5;
/// How many σ the width coefficient must stand above 0, towards broader.
pub const BROAD_SIGMA: f64 = 3.0;
/// The template's light within [`LIGHT_RADIUS_FWHM`] of the detection must be at least this many
/// times its |flux|: a residual is a small part of what the template holds there. (A bright
/// variable star's stack profile can be broader than the PSF too, when its changes follow the
/// seeing; its flux is no small part of the template's light.)
pub const LIGHT_RATIO: f64 = 30.0;
/// Radius of the template light counted, in FWHM of the stack's PSF.
pub const LIGHT_RADIUS_FWHM: f64 = 5.0;
/// `b/a` at or below which a detection on a template star is narrower than the PSF.
pub const NARROW_INDEX: f64 = -0.7;
/// How many σ the width coefficient must stand below 0, towards narrower.
pub const NARROW_SIGMA: f64 = 3.0;
/// Radius of the profile fit, in FWHM of the PSF.
pub const FIT_RADIUS_FWHM: f64 = 2.0;

/// An image with its per-pixel variance (white noise), row-major `width × height`; NaN or a
/// variance that is not positive marks a pixel masked.
#[derive(Debug, Clone, Copy)]
pub struct Plane<'a> {
    pub data: &'a [f32],
    pub var: &'a [f32],
    pub width: usize,
    pub height: usize,
}

/// The profile fit at a detection ([`fit_profile`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// PSF flux and its 1σ error.
    pub flux: f64,
    pub flux_err: f64,
    /// Width coefficient (flux units; positive with a positive flux: broader) and its 1σ error.
    pub width: f64,
    pub width_err: f64,
    /// FWHM of the PSF (from its second moment), pixels.
    pub fwhm: f64,
}

impl Profile {
    /// `b / a`: 0 for a point source, towards 1 for a much broader one, negative for narrower.
    pub fn width_index(&self) -> f64 {
        self.width / self.flux
    }

    /// How many σ the width coefficient lies towards broader (negative: narrower).
    pub fn broader_sigma(&self) -> f64 {
        (if self.flux >= 0.0 { self.width } else { -self.width }) / self.width_err
    }

    /// Broader than the PSF, at [`BROAD_INDEX`] and [`BROAD_SIGMA`].
    pub fn is_broad(&self) -> bool {
        self.width_index() >= BROAD_INDEX && self.broader_sigma() >= BROAD_SIGMA
    }
}

/// FWHM of a unit-sum PSF image from its second moment (Gaussian-equivalent), pixels.
pub fn psf_fwhm(q: &PsfImage) -> f64 {
    let r = (q.side / 2) as f64;
    let mut m2 = 0.0;
    for j in 0..q.side {
        for i in 0..q.side {
            let (dx, dy) = (i as f64 - r, j as f64 - r);
            m2 += q.pixels[j * q.side + i] * (dx * dx + dy * dy);
        }
    }
    (m2 / 2.0).max(0.0).sqrt() * super::frame::FWHM_PER_SIGMA
}

/// The profile fit of `img` around `(x, y)` with the PSF `q`, out to
/// [`FIT_RADIUS_FWHM`] FWHM (at most `q`'s half-side); `None` where the disc leaves the image or
/// holds a masked pixel (non-finite, or variance not positive), or the fit is singular.
pub fn fit_profile(img: Plane<'_>, q: &PsfImage, x: f64, y: f64) -> Option<Profile> {
    let Plane { data: image, var, width, height } = img;
    let n = q.side;
    if n < 3 || q.pixels.len() != n * n || image.len() != width * height || var.len() != image.len() || !(x.is_finite() && y.is_finite()) {
        return None;
    }
    let r = (n / 2) as i64;
    let fwhm = psf_fwhm(q);
    let radius = (FIT_RADIUS_FWHM * fwhm).clamp(2.0, r as f64);
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    let at = |i: i64, j: i64| if i < 0 || j < 0 || i >= n as i64 || j >= n as i64 { 0.0 } else { q.pixels[j as usize * n + i as usize] };
    // Per pixel: the four basis values, the datum and its weight.
    let mut rows: Vec<([f64; 4], f64, f64)> = Vec::new();
    for j in -r..=r {
        for i in -r..=r {
            if ((i * i + j * j) as f64).sqrt() > radius {
                continue;
            }
            let (px, py) = (cx + i, cy + j);
            if px < 0 || py < 0 || px >= width as i64 || py >= height as i64 {
                return None;
            }
            let k = py as usize * width + px as usize;
            let (d, v) = (image[k] as f64, var[k] as f64);
            if !(d.is_finite() && v.is_finite() && v > 0.0) {
                return None;
            }
            let (u, t) = (i + r, j + r);
            let p = at(u, t);
            let gx = (at(u + 1, t) - at(u - 1, t)) / 2.0;
            let gy = (at(u, t + 1) - at(u, t - 1)) / 2.0;
            // ∂/∂s of q(x/s)/s² at s = 1.
            let wv = -(2.0 * p + i as f64 * gx + j as f64 * gy);
            rows.push(([p, wv, gx, gy], d, 1.0 / v));
        }
    }
    let dot = |rows: &[([f64; 4], f64, f64)], a: usize, b: usize| rows.iter().map(|(f, _, wt)| f[a] * f[b] * wt).sum::<f64>();
    let qq = dot(&rows, 0, 0);
    if !(qq > 0.0) {
        return None;
    }
    for c in 1..4 {
        let k = dot(&rows, c, 0) / qq;
        rows.iter_mut().for_each(|(f, _, _)| f[c] -= k * f[0]);
    }
    let ww = dot(&rows, 1, 1);
    if !(ww > 0.0) {
        return None;
    }
    let s = (qq / ww).sqrt();
    rows.iter_mut().for_each(|(f, _, _)| f[1] *= s);
    let mut a = [0.0f64; 16];
    let mut b = [0.0f64; 4];
    for (f, d, wt) in &rows {
        for p in 0..4 {
            b[p] += f[p] * d * wt;
            for q2 in 0..4 {
                a[p * 4 + q2] += f[p] * f[q2] * wt;
            }
        }
    }
    let (sol, ridge) = crate::subtract::solve::solve_spd(&a, &b, 4).ok()?;
    if ridge > 0.0 {
        return None;
    }
    // The errors: the diagonal of A⁻¹ for the flux and the width.
    let col = |c: usize| {
        let mut e = [0.0f64; 4];
        e[c] = 1.0;
        crate::subtract::solve::solve_spd(&a, &e, 4).ok().map(|(v, _)| v[c])
    };
    let (vf, vw) = (col(0)?, col(1)?);
    if !(vf > 0.0 && vw > 0.0) {
        return None;
    }
    Some(Profile { flux: sol[0], flux_err: vf.sqrt(), width: sol[1], width_err: vw.sqrt(), fwhm })
}

/// A detection at `(x, y)` much narrower than the PSF `q` ([`NARROW_INDEX`] at [`NARROW_SIGMA`]):
/// on a star of the template, the star's core left by a kernel that did not match it.
///
/// Why: where the science frame is the sharper image it is the one convolved, and a kernel that
/// leaves the convolved core a little broader than the template's leaves every bright star with
/// a negative core and a positive ring (`docs/detections.md`). The filter sees the core; the fit
/// sees that it is narrower than a point source. A variable star's change has the PSF's shape.
/// On the night whose template is broader than every frame (seed 3), these residuals had `b/a`
/// −0.78 (median; −1.02 to −0.40 for 10–90%), the targets on stars +0.10 (−0.11 to +0.30).
/// The cut is at −0.7, not halfway: a variable star caught while the star's own residual
/// outweighs its change reads as narrow too (on seed 1's 30-night run, six detections of
/// variables at −0.6 to −0.7, whose fluxes were mostly the residual's).
pub fn is_narrow_core(img: Plane<'_>, q: &PsfImage, x: f64, y: f64) -> bool {
    fit_profile(img, q, x, y).is_some_and(|p| p.width_index() <= NARROW_INDEX && p.broader_sigma() <= -NARROW_SIGMA)
}

/// The template's light (positive pixels of `model`, in the stack's units) within `radius` of
/// `(x, y)`.
pub fn template_light(model: &[f32], width: usize, height: usize, x: f64, y: f64, radius: f64) -> f64 {
    let r = radius.ceil() as i64;
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    let mut sum = 0.0;
    for py in (cy - r).max(0)..=(cy + r).min(height as i64 - 1) {
        for px in (cx - r).max(0)..=(cx + r).min(width as i64 - 1) {
            if (((px - cx).pow(2) + (py - cy).pow(2)) as f64).sqrt() <= radius {
                let v = model[py as usize * width + px as usize];
                if v.is_finite() && v > 0.0 {
                    sum += v as f64;
                }
            }
        }
    }
    sum
}

/// A detection at `(x, y)` on a stack is `broad`: its profile is broader than the PSF
/// ([`Profile::is_broad`]) and the template holds [`LIGHT_RATIO`] times its |flux| within
/// [`LIGHT_RADIUS_FWHM`] FWHM (what the subtraction left of an extended source).
pub fn is_broad_residual(img: Plane<'_>, model: &[f32], q: &PsfImage, x: f64, y: f64) -> bool {
    if model.len() != img.width * img.height {
        return false;
    }
    let Some(p) = fit_profile(img, q, x, y) else { return false };
    p.is_broad() && template_light(model, img.width, img.height, x, y, LIGHT_RADIUS_FWHM * p.fwhm) >= LIGHT_RATIO * p.flux.abs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::{Distribution, Normal};

    /// A square `w × w` plane.
    fn plane<'a>(data: &'a [f32], var: &'a [f32], w: usize) -> Plane<'a> {
        Plane { data, var, width: w, height: w }
    }

    /// A Gaussian of `sigma` and `flux` at `(x0, y0)`, pixel-centre sampled, added to `img`.
    fn add_gaussian(img: &mut [f32], w: usize, x0: f64, y0: f64, sigma: f64, flux: f64) {
        let norm = flux / (2.0 * std::f64::consts::PI * sigma * sigma);
        for y in 0..img.len() / w {
            for x in 0..w {
                let r2 = (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2);
                img[y * w + x] += (norm * (-r2 / (2.0 * sigma * sigma)).exp()) as f32;
            }
        }
    }

    fn noise(rng: &mut impl Rng, n: usize, sigma: f32) -> Vec<f32> {
        let g = Normal::new(0.0f32, sigma).unwrap();
        (0..n).map(|_| g.sample(rng)).collect()
    }

    #[test]
    fn a_point_source_is_the_psf_and_a_broad_patch_is_not() {
        let mut rng = crate::testing::rng();
        let (w, s) = (64usize, 1.3);
        let q = PsfImage::gaussian(21, s, 0.0, 0.0);
        assert!((psf_fwhm(&q) - 2.3548 * s).abs() < 0.05, "{}", psf_fwhm(&q));
        let var = vec![1.0f32; w * w];
        // The noise of a PSF flux on unit white noise.
        let sigma_f = 1.0 / q.pixels.iter().map(|p| p * p).sum::<f64>().sqrt();
        let (mut flagged, mut trials, mut index) = (0, 0, Vec::new());
        for _ in 0..400 {
            // Point sources of SNR 5–60 anywhere within half a pixel of a pixel centre.
            let snr = rng.gen_range(5.0..60.0);
            let (x0, y0) = (32.0 + rng.gen_range(-0.5..0.5), 32.0 + rng.gen_range(-0.5..0.5));
            let mut img = noise(&mut rng, w * w, 1.0);
            add_gaussian(&mut img, w, x0, y0, s, snr * sigma_f);
            let p = fit_profile(plane(&img, &var, w), &q, x0, y0).unwrap();
            // Within 5σ (σ 1/SNR) and what fitting at the nearest pixel costs a source up to
            // half a pixel off in both axes (about 7% at a corner, for this PSF: at 6/SNR alone, a source of SNR 56 at
            // −11% failed about 1 run in 25).
            assert!((p.flux / (snr * sigma_f) - 1.0).abs() < 0.1 + 5.0 / snr, "flux {} for {} (SNR {snr:.1}, at ({x0:.2}, {y0:.2}))", p.flux, snr * sigma_f);
            assert!((p.flux_err / sigma_f - 1.0).abs() < 0.02, "flux error {} against {sigma_f}", p.flux_err);
            trials += 1;
            flagged += usize::from(p.is_broad()) + usize::from(is_narrow_core(plane(&img, &var, w), &q, x0, y0));
            index.push((snr, p.width_index()));
        }
        // About the one-sided 3σ rate (0.13%); a handful at most.
        assert!(flagged <= 4, "{flagged} of {trials} point sources flagged broad or narrow");
        // A point source's width index stays near 0: within 5 times its noise (about 1/SNR)
        // plus what an offset of up to half a pixel from the fit's pixel reads as width
        // (≤ 0.1), but for a rare draw (one of the 400, SNR 5.4 at b/a 1.19, passed 0.1 + 4/SNR
        // in about 1 run of 150).
        let wide: Vec<&(f64, f64)> = index.iter().filter(|(snr, b)| b.abs() >= 0.1 + 5.0 / snr).collect();
        assert!(wide.len() <= 2, "point sources (SNR, b/a) beyond 0.1 + 5/SNR: {wide:?}");

        // Broader blobs: b/a grows with the width (0.24, 0.41, 0.65), and patches twice the
        // PSF's width or more, detected at 6–9σ, are mostly flagged.
        let mut last = 0.0;
        for k in [1.25, 1.5, 2.0] {
            let mut img = vec![0.0f32; w * w];
            add_gaussian(&mut img, w, 32.2, 31.7, s * k, 1000.0);
            let b = fit_profile(plane(&img, &var, w), &q, 32.2, 31.7).unwrap().width_index();
            assert!(b > last + 0.1, "width {k}: b/a {b} after {last}");
            last = b;
        }
        let mut hit = 0;
        for _ in 0..50 {
            // A patch of `k` times the PSF's width that the PSF's filter sees at 6–9σ: a
            // Gaussian of flux F projects onto the PSF with F·2/(1 + k²) of a point source's.
            let mut img = noise(&mut rng, w * w, 1.0);
            let k = rng.gen_range(2.0..2.5);
            let f = rng.gen_range(6.0..9.0) * sigma_f * (1.0 + k * k) / 2.0;
            add_gaussian(&mut img, w, 32.0, 32.0, s * k, -f);
            hit += usize::from(fit_profile(plane(&img, &var, w), &q, 32.0, 32.0).unwrap().is_broad());
        }
        assert!(hit >= 30, "{hit} of 50 broad negative patches flagged");
    }

    #[test]
    fn a_mismatched_core_is_narrower_than_the_psf() {
        // What a kernel leaves of a star whose convolved core came out broader than the other
        // image's: the star at the PSF's width minus the same star `k`× broader, a negative
        // core and a positive ring (with the difference's sign).
        let mut rng = crate::testing::rng();
        let (w, s) = (64usize, 1.3);
        let q = PsfImage::gaussian(21, s, 0.0, 0.0);
        let var = vec![1.0f32; w * w];
        let mismatch = |k: f64| {
            let mut shape = vec![0.0f32; w * w];
            add_gaussian(&mut shape, w, 32.3, 31.8, s, -1.0);
            add_gaussian(&mut shape, w, 32.3, 31.8, s * k, 1.0);
            let unit = fit_profile(plane(&shape, &var, w), &q, 32.3, 31.8).unwrap();
            (shape, unit)
        };
        // The closer the widths, the nearer the pattern is to the width derivative itself
        // (b/a → −1); at 1.25× it is −0.77, as the residuals on seed 3's stars (median −0.78).
        let (_, u25) = mismatch(1.25);
        assert!((-0.8..-0.7).contains(&u25.width_index()), "1.25×: b/a {}", u25.width_index());
        let (shape, unit) = mismatch(1.1);
        assert!(unit.width_index() < -0.85, "1.1×: b/a {}", unit.width_index());
        // Seen by the filter at 8–14σ, nearly all are flagged.
        let mut hit = 0;
        for _ in 0..50 {
            let snr = rng.gen_range(8.0..14.0);
            let k = snr * unit.flux_err / unit.flux.abs();
            let img: Vec<f32> = noise(&mut rng, w * w, 1.0).iter().zip(&shape).map(|(n, v)| n + v * k as f32).collect();
            hit += usize::from(is_narrow_core(plane(&img, &var, w), &q, 32.3, 31.8));
        }
        assert!(hit >= 40, "{hit} of 50 mismatched cores flagged narrow");
    }

    #[test]
    fn a_residual_needs_the_template_light_beside_it() {
        let mut rng = crate::testing::rng();
        let (w, s) = (80usize, 1.3);
        let q = PsfImage::gaussian(21, s, 0.0, 0.0);
        let var = vec![1.0f32; w * w];
        let mut img = noise(&mut rng, w * w, 1.0);
        add_gaussian(&mut img, w, 40.0, 40.0, 2.5 * s, -400.0);
        // A galaxy 10 px away holding 50 times the patch's flux, and none.
        let mut model = vec![0.0f32; w * w];
        add_gaussian(&mut model, w, 50.0, 40.0, 3.0, 20000.0);
        assert!(is_broad_residual(plane(&img, &var, w), &model, &q, 40.0, 40.0));
        assert!(!is_broad_residual(plane(&img, &var, w), &vec![0.0f32; w * w], &q, 40.0, 40.0));
        // A point source beside the same galaxy is no residual.
        let mut img = noise(&mut rng, w * w, 1.0);
        add_gaussian(&mut img, w, 40.0, 40.0, s, -400.0);
        assert!(!is_broad_residual(plane(&img, &var, w), &model, &q, 40.0, 40.0));
        // Masked pixels or the edge within the fit: no fit, no flag.
        let mut masked = img.clone();
        masked[40 * w + 41] = f32::NAN;
        assert!(fit_profile(plane(&masked, &var, w), &q, 40.0, 40.0).is_none());
        assert!(fit_profile(plane(&img, &var, w), &q, 2.0, 40.0).is_none());
        assert_eq!(template_light(&model, w, w, 50.0, 40.0, 100.0).round(), 20000.0f64.round());
    }
}
