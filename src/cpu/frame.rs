//! CPU twins of the whole-frame kernels in `shaders/frame/*.wgsl` (dispatcher:
//! `gpu::kernels::frame`): the per-pixel stages of a frame subtraction that run on the GPU when
//! the engine is a real one.
//!
//! - `frame_score`: the matched filter ([`score`]) with a separable Gaussian or any odd square
//!   profile ([`Profile`]);
//! - `frame_mesh`: the sky / residual background mesh ([`mesh_background`], and
//!   [`mesh_background_clipped`] for the residual's 3σ-clipped medians: `detect::frame`'s own);
//! - `frame_prepare`: smoothed variance and saturation mask ([`variance_smoothed`],
//!   [`saturation`]);
//! - `frame_grow`: a mask grown by a square ([`grow`], separable in O(N) whatever the radius),
//!   and a mask packed 32 pixels a word for the read-back ([`pack_mask`]);
//! - `frame_assemble`: an Alard–Lupton difference and variance per pixel ([`al_difference`],
//!   [`al_variance`], as `detect::al::subtract_al`'s loops), the pixels an image cannot use
//!   ([`bad_mask`]), and NaN on a product's masked pixels ([`nan_unless`]).
//!
//! f64 accumulation where the CPU code they mirror has it; the parity tests
//! (`tests/integration/frame_parity.rs`) compare each with its kernel.

use crate::detect::frame::ScoreImage;

pub use crate::detect::frame::{mesh_background, mesh_background_clipped};

/// Below this fraction of the frame's largest `den` the full route drops a pixel (it sees only
/// the far wings of the profile, and round-off in an FFT): keep equal to the floor of
/// `detect::psf::matched_filter`, which this route stands for. The shader takes it as a
/// parameter (`frame_score.wgsl`, `f1`).
pub const DEN_FLOOR: f64 = 1e-6;

/// A scoring profile `P`, correlated with `D/V` (and `P²` with `1/V`).
#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    /// `P = g ⊗ g` with `g` symmetric of odd length (the Gaussian of
    /// `detect::frame::score_image`): kept where `den > 0`.
    Separable(Vec<f64>),
    /// Any `side × side` profile, `side` odd, row-major and centred (an empirical PSF, as
    /// `detect::psf::matched_filter` takes): non-finite `D` counts as masked, and a pixel is
    /// kept where its own `V > 0` and `den > DEN_FLOOR · max den`.
    Full { side: usize, pixels: Vec<f64> },
}

impl Profile {
    /// Half-width, pixels.
    pub fn radius(&self) -> usize {
        match self {
            Profile::Separable(g) => g.len() / 2,
            Profile::Full { side, .. } => side / 2,
        }
    }

    /// Whether the shape is usable: an odd, non-empty side and the right number of values.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Profile::Separable(g) if g.len() % 2 == 1 => Ok(()),
            Profile::Separable(g) => Err(format!("a separable profile needs an odd number of taps, not {}", g.len())),
            Profile::Full { side, pixels } if side % 2 == 1 && pixels.len() == side * side => Ok(()),
            Profile::Full { side, pixels } => Err(format!("a {side}×{side} profile (odd side) with {} values", pixels.len())),
        }
    }

    /// The unit-sum Gaussian of σ `sigma` (at least 0.3 px) on `±ceil(3.5σ)`, as
    /// `detect::frame::score_image` builds it.
    pub fn gaussian(sigma: f64) -> Profile {
        let s = sigma.max(0.3);
        let r = (3.5 * s).ceil() as i64;
        let g: Vec<f64> = (-r..=r).map(|i| (-0.5 * (i as f64 / s).powi(2)).exp()).collect();
        let norm: f64 = g.iter().sum();
        Profile::Separable(g.iter().map(|v| v / norm).collect())
    }
}

/// The matched filter of `d` with variance `v` (`w × h`) and profile `p` (twin of
/// `shaders/frame/frame_score.wgsl`): score, flux and error per pixel, `inflate` dividing the
/// score and multiplying the error (the correlated-noise factor).
pub fn score(d: &[f32], v: &[f32], w: usize, h: usize, p: &Profile, inflate: f64) -> ScoreImage {
    let n = w * h;
    let mut out = ScoreImage { score: vec![0.0; n], flux: vec![0.0; n], flux_err: vec![f32::INFINITY; n], radius: p.radius(), psf_peak: 0.0 /* the caller, detect::frame::score_image, sets it */ };
    if d.len() != n || v.len() != n || p.check().is_err() {
        return out;
    }
    let keep_finite = matches!(p, Profile::Full { .. });
    let (dv, iv): (Vec<f64>, Vec<f64>) = d
        .iter()
        .zip(v)
        .map(|(&d, &v)| if v > 0.0 && (!keep_finite || d.is_finite()) { (d as f64 / v as f64, 1.0 / v as f64) } else { (0.0, 0.0) })
        .unzip();
    let (num, den, floor) = match p {
        Profile::Separable(g) => {
            let g2: Vec<f64> = g.iter().map(|x| x * x).collect();
            (separable(&dv, w, h, g), separable(&iv, w, h, &g2), 0.0)
        }
        Profile::Full { side, pixels } => {
            let p2: Vec<f64> = pixels.iter().map(|x| x * x).collect();
            let (num, den) = (correlate(&dv, w, h, pixels, *side), correlate(&iv, w, h, &p2, *side));
            let floor = DEN_FLOOR * den.iter().cloned().fold(0.0f64, f64::max);
            (num, den, floor)
        }
    };
    for i in 0..n {
        if den[i] > floor && (!keep_finite || iv[i] > 0.0) {
            out.score[i] = (num[i] / den[i].sqrt() / inflate) as f32;
            out.flux[i] = (num[i] / den[i]) as f32;
            out.flux_err[i] = (inflate / den[i].sqrt()) as f32;
        }
    }
    out
}

/// Separable correlation of `src` with the symmetric 1-D kernel `k` along rows then columns,
/// zero outside the frame.
pub fn separable(src: &[f64], w: usize, h: usize, k: &[f64]) -> Vec<f64> {
    let r = (k.len() / 2) as i64;
    let mut tmp = vec![0.0f64; w * h];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for x in 0..w {
            let (lo, hi) = ((x as i64 - r).max(0), (x as i64 + r).min(w as i64 - 1));
            let mut s = 0.0;
            for j in lo..=hi {
                s += k[(j - x as i64 + r) as usize] * row[j as usize];
            }
            tmp[y * w + x] = s;
        }
    }
    let mut out = vec![0.0f64; w * h];
    for y in 0..h {
        let (lo, hi) = ((y as i64 - r).max(0), (y as i64 + r).min(h as i64 - 1));
        for j in lo..=hi {
            let kj = k[(j - y as i64 + r) as usize];
            let src_row = &tmp[j as usize * w..(j as usize + 1) * w];
            let dst = &mut out[y * w..(y + 1) * w];
            for (o, s) in dst.iter_mut().zip(src_row) {
                *o += kj * s;
            }
        }
    }
    out
}

/// Direct correlation `Σ_uv p(u, v) · src(x + u, y + v)` with a centred `side × side` profile,
/// zero outside the frame.
pub fn correlate(src: &[f64], w: usize, h: usize, p: &[f64], side: usize) -> Vec<f64> {
    let r = (side / 2) as i64;
    let mut out = vec![0.0f64; w * h];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let mut s = 0.0;
            for yy in (y - r).max(0)..=(y + r).min(h as i64 - 1) {
                let prow = &p[(yy - y + r) as usize * side..];
                let row = &src[yy as usize * w..];
                for xx in (x - r).max(0)..=(x + r).min(w as i64 - 1) {
                    s += prow[(xx - x + r) as usize] * row[xx as usize];
                }
            }
            out[y as usize * w + x as usize] = s;
        }
    }
    out
}

/// Per-pixel variance `max(v̄, 0)/gain + rn2` with `v̄` the mean of the finite pixels of the 3×3
/// box; NaN where the pixel is not finite (`Image::variance_smoothed`).
pub fn variance_smoothed(data: &[f32], w: usize, h: usize, gain: f64, rn2: f64) -> Vec<f32> {
    let mut out = vec![f32::NAN; w * h];
    if data.len() != w * h {
        return out;
    }
    for y in 0..h {
        for x in 0..w {
            if !data[y * w + x].is_finite() {
                continue;
            }
            let (mut s, mut n) = (0.0f64, 0.0f64);
            for yy in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for xx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let v = data[yy * w + xx];
                    if v.is_finite() {
                        s += v as f64;
                        n += 1.0;
                    }
                }
            }
            out[y * w + x] = ((s / n).max(0.0) / gain + rn2) as f32;
        }
    }
    out
}

/// Pixels at or above `level` (none without one).
pub fn saturation(data: &[f32], level: Option<f32>) -> Vec<bool> {
    match level {
        Some(l) => data.iter().map(|&v| v >= l).collect(),
        None => vec![false; data.len()],
    }
}

/// The pixels of a prepared image that cannot be used: saturated, not finite (the image or its
/// variance), or with a variance that is not positive (`detect::al::subtract_al`'s masks; twin
/// of `bad_mask` in `shaders/frame/frame_assemble.wgsl`).
pub fn bad_mask(image: &[f32], variance: &[f32], saturated: &[bool]) -> Vec<bool> {
    image.iter().zip(variance).zip(saturated).map(|((x, v), s)| *s || !x.is_finite() || !v.is_finite() || *v <= 0.0).collect()
}

/// What [`nan_unless`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Where the guard is > 0 (a variance).
    Positive = 0,
    /// Where the guard is finite (a flux error).
    Finite = 1,
}

/// `values` with NaN wherever `guard` fails `keep` (twin of `nan_unless` in
/// `shaders/frame/frame_assemble.wgsl`): the masked pixels of `blink subtract`'s products.
pub fn nan_unless(values: &mut [f32], guard: &[f32], keep: Keep) {
    for (v, g) in values.iter_mut().zip(guard) {
        let ok = match keep {
            Keep::Positive => g.is_finite() && *g > 0.0,
            Keep::Finite => g.is_finite(),
        };
        if !ok {
            *v = f32::NAN;
        }
    }
}

/// `mask` 32 pixels a word: bit `b` of word `k` is pixel `32k + b` (twin of `pack_mask` in
/// `shaders/frame/frame_grow.wgsl`).
pub fn pack_mask(mask: &[bool]) -> Vec<u32> {
    mask.chunks(32).map(|c| c.iter().enumerate().fold(0u32, |w, (b, &set)| w | ((set as u32) << b))).collect()
}

/// The first `n` pixels of a mask packed by [`pack_mask`].
pub fn unpack_mask(words: &[u32], n: usize) -> Vec<bool> {
    (0..n).map(|i| words.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1)).collect()
}

/// `mask` grown by `r` pixels (a square of side `2r + 1` around each set pixel), as a running
/// count along rows then columns: O(N) for any `r` (the direct loop is O(N·r²)).
pub fn grow(mask: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    if mask.len() != w * h || w == 0 || h == 0 {
        return mask.to_vec();
    }
    // Along rows: set where any pixel of [x − r, x + r] is.
    let mut rows = vec![false; w * h];
    for y in 0..h {
        let src = &mask[y * w..(y + 1) * w];
        let dst = &mut rows[y * w..(y + 1) * w];
        dilate_line(src, r, |x, v| dst[x] = v);
    }
    let mut out = vec![false; w * h];
    let mut col = vec![false; h];
    for x in 0..w {
        for (y, c) in col.iter_mut().enumerate() {
            *c = rows[y * w + x];
        }
        dilate_line(&col, r, |y, v| out[y * w + x] = v);
    }
    out
}

/// One line dilated by `r`: `put(i, any of v[i − r ..= i + r])`.
fn dilate_line(v: &[bool], r: usize, mut put: impl FnMut(usize, bool)) {
    let n = v.len();
    if n == 0 {
        return;
    }
    // Count of set values in the window, slid one step at a time.
    let mut count = v.iter().take(r.min(n - 1) + 1).filter(|b| **b).count();
    for i in 0..n {
        put(i, count > 0);
        // Window of i + 1: [i + 1 − r, i + 1 + r].
        if let Some(&b) = v.get(i + 1 + r) {
            count += b as usize;
        }
        if i >= r && v[i - r] {
            count -= 1;
        }
    }
}

/// `(broad − model − bg) · m` where `guard > 0`, else 0, with `bg` the polynomial of
/// `(coefficient, x power, y power)` terms in normalised coordinates (`subtract_al`'s
/// difference; twin of `al_difference` in `shaders/frame/frame_assemble.wgsl`).
pub fn al_difference(broad: &[f32], model: &[f32], guard: &[f32], bg: &[(f64, usize, usize)], m: f64, w: usize, h: usize) -> Vec<f32> {
    use crate::subtract::normalised;
    let mut out = vec![0.0f32; w * h];
    if broad.len() != w * h || model.len() != w * h || guard.len() != w * h {
        return out;
    }
    for y in 0..h {
        let yn = normalised(y as f64, h);
        for x in 0..w {
            let i = y * w + x;
            if guard[i] > 0.0 {
                let xn = normalised(x as f64, w);
                let b: f64 = bg.iter().map(|&(c, p, q)| c * xn.powi(p as i32) * yn.powi(q as i32)).sum();
                out[i] = ((broad[i] - model[i] - b as f32) as f64 * m) as f32;
            }
        }
    }
    out
}

/// `(wu · guard + wc · kv + eps2 · model²) · m2` where `guard > 0`, else 0 (`subtract_al`'s
/// variances; twin of `al_variance` in `shaders/frame/frame_assemble.wgsl`).
pub fn al_variance(guard: &[f32], kv: &[f32], model: &[f32], wu: f64, wc: f64, eps2: f64, m2: f64) -> Vec<f32> {
    guard
        .iter()
        .zip(kv)
        .zip(model)
        .map(|((&g, &k), &mv)| if g > 0.0 { ((wu * g as f64 + wc * k as f64 + eps2 * mv as f64 * mv as f64) * m2) as f32 } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_masks_put_pixel_32k_plus_b_in_bit_b_of_word_k() {
        let mut mask = vec![false; 70];
        for i in [0, 5, 31, 32, 63, 69] {
            mask[i] = true;
        }
        let words = pack_mask(&mask);
        assert_eq!(words, vec![1 | 1 << 5 | 1 << 31, 1 | 1 << 31, 1 << 5]);
        assert_eq!(unpack_mask(&words, 70), mask);
    }

    /// The direct square dilation (what `detect::al` did).
    fn grow_direct(mask: &[bool], w: usize, h: usize, r: i64) -> Vec<bool> {
        let mut grown = vec![false; w * h];
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                if mask[y as usize * w + x as usize] {
                    for yy in (y - r).max(0)..=(y + r).min(h as i64 - 1) {
                        for xx in (x - r).max(0)..=(x + r).min(w as i64 - 1) {
                            grown[yy as usize * w + xx as usize] = true;
                        }
                    }
                }
            }
        }
        grown
    }

    #[test]
    fn separable_grow_is_the_square_dilation() {
        let (w, h) = (37, 23);
        let mut s = 12345u64;
        for r in [0usize, 1, 2, 5, 30, 60] {
            let mask: Vec<bool> = (0..w * h)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (s >> 33).is_multiple_of(53)
                })
                .collect();
            assert_eq!(grow(&mask, w, h, r), grow_direct(&mask, w, h, r as i64), "r = {r}");
        }
    }

    #[test]
    fn full_profile_of_a_separable_one_scores_the_same() {
        let (w, h) = (19, 14);
        let d: Vec<f32> = (0..w * h).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1).collect();
        let v: Vec<f32> = (0..w * h).map(|i| if i % 17 == 3 { 0.0 } else { 1.0 + (i % 7) as f32 * 0.2 }).collect();
        let Profile::Separable(g) = Profile::gaussian(1.3) else { unreachable!() };
        let outer: Vec<f64> = g.iter().flat_map(|a| g.iter().map(move |b| a * b)).collect();
        let a = score(&d, &v, w, h, &Profile::Separable(g.clone()), 1.2);
        let b = score(&d, &v, w, h, &Profile::Full { side: g.len(), pixels: outer }, 1.2);
        for (i, vi) in v.iter().enumerate() {
            if *vi > 0.0 {
                assert!((a.score[i] - b.score[i]).abs() < 1e-5, "{i}: {} {}", a.score[i], b.score[i]);
            } else {
                // The full route drops a pixel whose own variance is masked.
                assert_eq!(b.score[i], 0.0);
            }
        }
    }
}
