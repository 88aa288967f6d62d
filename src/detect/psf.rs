//! The difference image's PSF measured on stars, and the matched filter with a 2-D profile.
//!
//! Why: a point source's score is best when the filter is the PSF the source has in the
//! difference. A Gaussian of the same FWHM misses the wings real PSFs have: on the subtraction
//! harness (science PSF Moffat β = 3, `../shared/bench/subtraction`) the Gaussian filter on the
//! undecorrelated difference scored transients 0.988 of their optimal S/N, and the true PSF on
//! the decorrelated difference 1.06 of it — about the margin between finding a transient at
//! S/N 5.3 and missing it.
//!
//! - [`empirical_psf`]: the median of bright isolated stars of the image whose PSF the
//!   difference has (the one not convolved), each cut on the pixel nearest its centroid, less
//!   its local sky and divided by its flux. Whole-pixel centring widens the PSF by a uniform
//!   ±0.5 px jitter (σ² + 1/12 px²), under 2% in σ for σ ≥ 1.2 px, which costs a matched filter
//!   well under 0.1% of its S/N; sub-pixel resampling would smooth it as much.
//! - [`matched_filter`]: `num = P ⋆ (D/V)`, `den = P² ⋆ (1/V)` by FFT (a 2-D profile is not
//!   separable: 25² taps direct would cost 20× the FFTs), both correlations in one complex
//!   transform (the two real inputs as its real and imaginary parts).

use rustfft::num_complex::Complex;

use super::frame::ScoreImage;
use super::image::{isolated_stars, median, Image};
use crate::subtract::decorr::{Fft2, PsfImage};
use crate::subtract::zogy::fast_size;

/// Fewest stars a PSF is measured from.
pub const MIN_STARS: usize = 5;

/// Most stars stacked (the brightest); more change nothing a filter can tell.
const MAX_STARS: usize = 200;

/// The PSF of `img` on a `(2·half + 1)²` box, unit sum: the per-pixel median of its bright
/// isolated stars (`image::isolated_stars` with isolation `half`), each centred on the pixel
/// nearest its centroid, less the median of its box's outer ring and divided by its box flux.
/// `None` with fewer than [`MIN_STARS`] usable stars (a NaN or saturated pixel in the box, a
/// non-positive flux), or when the median has a non-positive sum or its centroid lies more than
/// half a pixel off the middle.
pub fn empirical_psf(img: &Image, half: usize) -> Option<PsfImage> {
    let (w, h) = (img.width, img.height);
    let side = 2 * half + 1;
    if half == 0 || w <= 2 * half + 2 || h <= 2 * half + 2 {
        return None;
    }
    let stars = isolated_stars(img, half)?;
    let sat = img.header.saturate.map(|s| s as f32 * 0.8).unwrap_or(f32::INFINITY);
    let at = |x: usize, y: usize| img.data[y * w + x];
    let mut cut: Vec<(f64, Vec<f64>)> = Vec::new();
    for &(px, py) in &stars.at {
        // Centroid of the light above the global sky within 2 px of the peak.
        let (mut s0, mut sx, mut sy) = (0.0f64, 0.0f64, 0.0f64);
        for y in py.saturating_sub(2)..=(py + 2).min(h - 1) {
            for x in px.saturating_sub(2)..=(px + 2).min(w - 1) {
                let v = (at(x, y) - stars.sky).max(0.0) as f64;
                s0 += v;
                sx += v * x as f64;
                sy += v * y as f64;
            }
        }
        if !(s0 > 0.0) {
            continue;
        }
        let (cx, cy) = ((sx / s0).round() as i64, (sy / s0).round() as i64);
        if cx < half as i64 || cy < half as i64 || cx + half as i64 >= w as i64 || cy + half as i64 >= h as i64 {
            continue;
        }
        let (x0, y0) = (cx as usize - half, cy as usize - half);
        let mut box_ = Vec::with_capacity(side * side);
        let mut ring = Vec::new();
        let mut ok = true;
        for j in 0..side {
            for i in 0..side {
                let v = at(x0 + i, y0 + j);
                if !v.is_finite() || v >= sat {
                    ok = false;
                }
                if i == 0 || j == 0 || i == side - 1 || j == side - 1 {
                    ring.push(v);
                }
                box_.push(v as f64);
            }
        }
        if !ok {
            continue;
        }
        let Some(sky) = median(ring) else { continue };
        let flux: f64 = box_.iter().map(|v| v - sky as f64).sum();
        if !(flux > 0.0) {
            continue;
        }
        cut.push((flux, box_.iter().map(|v| (v - sky as f64) / flux).collect()));
    }
    if cut.len() < MIN_STARS {
        return None;
    }
    cut.sort_by(|a, b| b.0.total_cmp(&a.0));
    cut.truncate(MAX_STARS);
    let mut pixels = vec![0.0f64; side * side];
    let mut column = Vec::with_capacity(cut.len());
    for (k, p) in pixels.iter_mut().enumerate() {
        column.clear();
        column.extend(cut.iter().map(|(_, c)| c[k]));
        column.sort_by(f64::total_cmp);
        let n = column.len();
        *p = if n % 2 == 1 { column[n / 2] } else { 0.5 * (column[n / 2 - 1] + column[n / 2]) };
    }
    let sum: f64 = pixels.iter().sum();
    if !(sum > 0.0) {
        return None;
    }
    pixels.iter_mut().for_each(|p| *p /= sum);
    let (mut mx, mut my) = (0.0, 0.0);
    for (k, p) in pixels.iter().enumerate() {
        mx += p * ((k % side) as f64 - half as f64);
        my += p * ((k / side) as f64 - half as f64);
    }
    if mx.hypot(my) > 0.5 {
        tracing::debug!(mx, my, "the stacked PSF is off centre; not used");
        return None;
    }
    tracing::debug!(stars = cut.len(), side, "empirical PSF");
    Some(PsfImage { side, pixels })
}

/// The PSF of a difference whose PSF is `img`'s (the image not convolved) and of Gaussian-
/// equivalent σ `sigma`, measured on `img`'s stars ([`empirical_psf`]) on a box of half-side
/// 3 FWHM (5 to 25 px), which holds all but ~0.2% of a Moffat β = 3 profile's light.
pub fn difference_psf(img: &Image, sigma: f64) -> Option<PsfImage> {
    let half = (3.0 * 2.354_820_045 * sigma).ceil().clamp(5.0, 25.0) as usize;
    empirical_psf(img, half)
}

/// `psf` cut to the smallest centred box that keeps all but `energy` of its `Σp²` (the matched
/// filter's weight), at least 3 px wide, renormalised to unit sum.
pub fn trimmed(psf: &PsfImage, energy: f64) -> PsfImage {
    let (n, c) = (psf.side, psf.side / 2);
    let total: f64 = psf.pixels.iter().map(|p| p * p).sum();
    let mut half = c;
    while half > 1 {
        let h2 = half - 1;
        let inside: f64 = (c - h2..=c + h2).flat_map(|y| (c - h2..=c + h2).map(move |x| (x, y))).map(|(x, y)| psf.pixels[y * n + x].powi(2)).sum();
        if total - inside > energy * total {
            break;
        }
        half = h2;
    }
    let side = 2 * half + 1;
    let mut pixels: Vec<f64> = (c - half..=c + half).flat_map(|y| (c - half..=c + half).map(move |x| (x, y))).map(|(x, y)| psf.pixels[y * n + x]).collect();
    let sum: f64 = pixels.iter().sum();
    if sum != 0.0 {
        pixels.iter_mut().for_each(|p| *p /= sum);
    }
    PsfImage { side, pixels }
}

/// The matched filter of `difference` (variance `variance`, 0 where masked) with the unit-sum
/// profile `p`: flux = num/den, error = inflate/√den, score = num/(√den·inflate), with
/// `num = p ⋆ (D/V)` and `den = p² ⋆ (1/V)` over unmasked pixels (`inflate` ≥ 1 accounts for
/// noise correlation the per-pixel variance does not hold; 1 for white noise).
pub fn matched_filter(difference: &[f32], variance: &[f32], w: usize, h: usize, p: &PsfImage, inflate: f64) -> ScoreImage {
    let (a, b): (Vec<f64>, Vec<f64>) =
        difference.iter().zip(variance).map(|(&d, &v)| if v > 0.0 && d.is_finite() { (d as f64 / v as f64, 1.0 / v as f64) } else { (0.0, 0.0) }).unzip();
    let p2: Vec<f64> = p.pixels.iter().map(|v| v * v).collect();
    let (num, den) = correlate_pair(&a, &b, w, h, &p.pixels, &p2, p.side);
    let mut out = ScoreImage { score: vec![0.0; w * h], flux: vec![0.0; w * h], flux_err: vec![f32::INFINITY; w * h], radius: p.side / 2, psf_peak: p.pixels[p.pixels.len() / 2] };
    // Below this fraction of the largest `den` a pixel sees only round-off of the FFT.
    let floor = 1e-6 * den.iter().cloned().fold(0.0f64, f64::max);
    for i in 0..w * h {
        if den[i] > floor && b[i] > 0.0 {
            out.score[i] = (num[i] / den[i].sqrt() / inflate) as f32;
            out.flux[i] = (num[i] / den[i]) as f32;
            out.flux_err[i] = (inflate / den[i].sqrt()) as f32;
        }
    }
    out
}

/// `(a ⋆ p, b ⋆ q)`: the correlations `Σ_u p(u)·a(x + u)` of two `w × h` real images with two
/// real `side × side` centred profiles, zero outside the images, by one forward and one inverse
/// FFT of the images packed as `a + i·b` (and one of the profiles packed the same way).
pub fn correlate_pair(a: &[f64], b: &[f64], w: usize, h: usize, p: &[f64], q: &[f64], side: usize) -> (Vec<f64>, Vec<f64>) {
    let r = side / 2;
    // A grid r wider than the image: what wraps around lands in zeros.
    let (nw, nh) = (fast_size(w + r), fast_size(h + r));
    // f32: the sums carry ~1e-7 of the image's largest |D/V|, far below a score's noise.
    let fft = Fft2::<f32>::new(nw, nh);
    let zero = Complex::new(0.0f32, 0.0);
    let mut z = vec![zero; nw * nh];
    for y in 0..h {
        for x in 0..w {
            z[y * nw + x] = Complex::new(a[y * w + x] as f32, b[y * w + x] as f32);
        }
    }
    let mut k = vec![zero; nw * nh];
    for v in 0..side {
        for u in 0..side {
            let (dx, dy) = (u as i64 - r as i64, v as i64 - r as i64);
            let (gx, gy) = (dx.rem_euclid(nw as i64) as usize, dy.rem_euclid(nh as i64) as usize);
            k[gy * nw + gx] = Complex::new(p[v * side + u] as f32, q[v * side + u] as f32);
        }
    }
    fft.forward(&mut z);
    fft.forward(&mut k);
    // Split the packed spectra: X(k) = (Z(k) + Z*(−k))/2, Y(k) = (Z(k) − Z*(−k))/(2i); the
    // correlation's spectrum is X·P*; the two results go back packed as real + i·imaginary.
    let i2 = Complex::new(0.0f32, 0.5);
    let mut out = vec![zero; nw * nh];
    for ky in 0..nh {
        let my = (nh - ky) % nh;
        for kx in 0..nw {
            let mx = (nw - kx) % nw;
            let (zk, zm) = (z[ky * nw + kx], z[my * nw + mx].conj());
            let (kk, km) = (k[ky * nw + kx], k[my * nw + mx].conj());
            let (xa, xb) = ((zk + zm) * 0.5, (zk - zm) * -i2);
            let (pp, pq) = ((kk + km) * 0.5, (kk - km) * -i2);
            out[ky * nw + kx] = xa * pp.conj() + Complex::new(0.0, 1.0) * xb * pq.conj();
        }
    }
    fft.inverse(&mut out);
    let mut ra = vec![0.0f64; w * h];
    let mut rb = vec![0.0f64; w * h];
    for y in 0..h {
        for x in 0..w {
            let c = out[y * nw + x];
            ra[y * w + x] = c.re as f64;
            rb[y * w + x] = c.im as f64;
        }
    }
    (ra, rb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Direct `Σ_u p(u)·a(x + u)`, zero outside.
    fn direct(a: &[f64], w: usize, h: usize, p: &[f64], side: usize) -> Vec<f64> {
        let r = (side / 2) as i64;
        let mut out = vec![0.0; w * h];
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut s = 0.0;
                for v in -r..=r {
                    for u in -r..=r {
                        let (xx, yy) = (x + u, y + v);
                        if xx >= 0 && yy >= 0 && xx < w as i64 && yy < h as i64 {
                            s += p[((v + r) * side as i64 + u + r) as usize] * a[(yy * w as i64 + xx) as usize];
                        }
                    }
                }
                out[(y * w as i64 + x) as usize] = s;
            }
        }
        out
    }

    #[test]
    fn packed_fft_correlation_matches_the_direct_sum() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (w, h, side) = (37, 29, 7);
        let a: Vec<f64> = (0..w * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f64> = (0..w * h).map(|_| rng.gen_range(0.0..2.0)).collect();
        // Asymmetric profiles, so a convolution in place of a correlation would show.
        let p: Vec<f64> = (0..side * side).map(|_| rng.gen_range(0.0..1.0)).collect();
        let q: Vec<f64> = (0..side * side).map(|_| rng.gen_range(-0.5..1.0)).collect();
        let (ra, rb) = correlate_pair(&a, &b, w, h, &p, &q, side);
        let (da, db) = (direct(&a, w, h, &p, side), direct(&b, w, h, &q, side));
        for i in 0..w * h {
            assert!((ra[i] - da[i]).abs() < 1e-5 && (rb[i] - db[i]).abs() < 1e-5, "{i}: {} {} / {} {}", ra[i], da[i], rb[i], db[i]);
        }
    }

    fn moffat(dx: f64, dy: f64, alpha: f64, beta: f64) -> f64 {
        (1.0 + (dx * dx + dy * dy) / (alpha * alpha)).powf(-beta)
    }

    /// A 300² frame of Moffat stars (β 3, FWHM ≈ 3.7 px) at random sub-pixel positions.
    fn moffat_field(seed: u64) -> (Image, f64, f64) {
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (w, h) = (300usize, 300usize);
        let (beta, fwhm) = (3.0, 3.7);
        let alpha = fwhm / (2.0 * (2f64.powf(1.0 / beta) - 1.0).sqrt());
        let norm = (beta - 1.0) / (std::f64::consts::PI * alpha * alpha);
        let mut data = vec![400.0f32; w * h];
        for _ in 0..60 {
            let (x0, y0, f) = (rng.gen_range(20.0..280.0), rng.gen_range(20.0..280.0), rng.gen_range(5e4..5e5));
            for y in (y0 as usize - 18)..(y0 as usize + 19) {
                for x in (x0 as usize - 18)..(x0 as usize + 19) {
                    data[y * w + x] += (f * norm * moffat(x as f64 - x0, y as f64 - y0, alpha, beta)) as f32;
                }
            }
        }
        let n = Normal::new(0.0f32, 1.0).unwrap();
        for v in &mut data {
            *v += n.sample(&mut rng) * v.sqrt();
        }
        let header = crate::detect::image::ImageHeader {
            mjd_start: None,
            exptime: 30.0,
            band: None,
            gain: Some(1.0),
            read_noise: 0.0,
            saturate: None,
            zero_point: None,
            seeing: None,
            wcs: None,
            ncombine: None,
        };
        let img = Image { path: "moffat.fits".into(), width: w, height: h, data, header, warnings: Vec::new() };
        (img, alpha, beta)
    }

    #[test]
    fn stacked_psf_follows_moffat_wings() {
        let (img, alpha, beta) = moffat_field(3);
        let half = 10;
        let psf = empirical_psf(&img, half).expect("60 bright stars");
        assert_eq!(psf.side, 21);
        assert!((psf.pixels.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // The truth, pixel-integrated at 5x5 sub-samples and on the same box.
        let norm = (beta - 1.0) / (std::f64::consts::PI * alpha * alpha);
        let truth: Vec<f64> = (0..21 * 21)
            .map(|k| {
                let (x, y) = ((k % 21) as f64 - 10.0, (k / 21) as f64 - 10.0);
                (0..25).map(|s| moffat(x + ((s % 5) as f64 - 2.0) / 5.0, y + ((s / 5) as f64 - 2.0) / 5.0, alpha, beta)).sum::<f64>() * norm / 25.0
            })
            .collect();
        let ts: f64 = truth.iter().sum();
        // Centre within 10% (the ±0.5 px centring blurs the peak a little), wings at 6 px within
        // 25% of the Moffat value (a Gaussian of the same FWHM is 100× lower there).
        let c = 10 * 21 + 10;
        assert!((psf.pixels[c] / (truth[c] / ts) - 1.0).abs() < 0.10, "{} vs {}", psf.pixels[c], truth[c] / ts);
        let wing = 10 * 21 + 16;
        assert!((psf.pixels[wing] / (truth[wing] / ts) - 1.0).abs() < 0.25, "{} vs {}", psf.pixels[wing], truth[wing] / ts);
        // The matched-filter efficiency of the stacked PSF on the true one: above 0.995.
        let dot: f64 = psf.pixels.iter().zip(&truth).map(|(a, b)| a * b).sum();
        let (n1, n2) = (psf.pixels.iter().map(|a| a * a).sum::<f64>(), truth.iter().map(|b| b * b).sum::<f64>());
        assert!(dot / (n1 * n2).sqrt() > 0.995, "{}", dot / (n1 * n2).sqrt());
    }

    #[test]
    fn no_psf_without_stars() {
        let (mut img, _, _) = moffat_field(4);
        img.data.iter_mut().for_each(|v| *v = 400.0 + (*v - 400.0).clamp(-30.0, 30.0));
        assert!(empirical_psf(&img, 10).is_none());
    }

    #[test]
    fn matched_filter_score_is_unit_variance_and_flux_is_recovered() {
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (w, h) = (160usize, 120usize);
        let psf = PsfImage { side: 9, pixels: (0..81).map(|k| moffat((k % 9) as f64 - 4.0, (k / 9) as f64 - 4.0, 2.0, 2.5)).collect() };
        let psf = trimmed(&psf, 0.0);
        let n = Normal::new(0.0f32, 1.0).unwrap();
        let sigma = 3.0f32;
        let mut d: Vec<f32> = (0..w * h).map(|_| sigma * n.sample(&mut rng)).collect();
        let v = vec![sigma * sigma; w * h];
        let flux = 400.0;
        for (k, p) in psf.pixels.iter().enumerate() {
            d[(60 + k / 9 - 4) * w + 80 + k % 9 - 4] += (flux * p) as f32;
        }
        let sc = matched_filter(&d, &v, w, h, &psf, 1.0);
        let i = 60 * w + 80;
        let err = sc.flux_err[i] as f64;
        assert!((sc.flux[i] as f64 - flux).abs() < 4.0 * err, "{} ± {err}", sc.flux[i]);
        let sky: Vec<f32> = (0..w * h).filter(|k| (k / w).abs_diff(60) > 10 || (k % w).abs_diff(80) > 10).filter(|k| (10..h - 10).contains(&(k / w)) && (10..w - 10).contains(&(k % w))).map(|k| sc.score[k]).collect();
        let (_, s) = crate::detect::image::robust_stats(&sky).unwrap();
        assert!((s - 1.0).abs() < 0.06, "score σ on sky {s}");
    }
}
