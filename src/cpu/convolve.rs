//! CPU twin of `shaders/convolve.wgsl`: the template and its variance convolved with the
//! per-stamp Gaussian kernel, as a mask-normalised separable convolution.
//!
//! With weights `w` (the batch's 0/1 mask) and `g` the Gaussian, per output pixel
//! `T' = Σ g w T / Σ g w` and `V' = Σ g² w V / (Σ g w)²`: outside the stamp and on masked
//! pixels the truncated kernel is renormalised. Both sums are separable, so each is one pass
//! along rows and one along columns, as on the GPU. Sigma below [`SIGMA_MIN`] is a copy.
//!
//! Speed (issue 4): each pass takes blocks of [`LANES`] neighbouring pixels and runs over the
//! taps with the block's sums in vector registers (`acc[l] += g[k]·row[x + k + l]`), and every
//! pixel's sum still adds its taps in the order of the textbook loop (`j` ascending). The row pass reads a zero-padded copy of the row
//! holding `w·T`, `w` and `w·V` (exact in f64, products of f32), which leaves the sums as they were
//! for 0/1 weights; padding adds only exact zeros. All buffers live in a [`Scratch`] reused from
//! stamp to stamp.

use crate::engine::StampBatch;

/// Kernel half-width cap in pixels (keep in sync with `MAX_RADIUS` in `shaders/convolve.wgsl`).
pub const MAX_RADIUS: i32 = 32;
/// Below this sigma (pixels) the kernel is a delta (keep in sync with `shaders/convolve.wgsl`).
pub const SIGMA_MIN: f32 = 1e-3;

/// Kernel half-width for a sigma, computed in f32 exactly as the shader does.
pub fn radius(sigma: f32) -> i32 {
    if sigma >= SIGMA_MIN {
        ((4.0f32 * sigma).ceil() as i32).min(MAX_RADIUS)
    } else {
        0
    }
}

fn gauss(k: i32, sigma: f32) -> f64 {
    if k == 0 {
        1.0
    } else {
        let t = k as f64 / sigma as f64;
        (-0.5 * t * t).exp()
    }
}

/// The convolved template and its variance, laid out like the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Convolved {
    pub template: Vec<f32>,
    pub template_var: Vec<f32>,
}

/// Buffers one stamp's convolution needs, kept from stamp to stamp (one per thread).
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    /// Taps `g` and `g²`, `2r + 1` each.
    g: Vec<f64>,
    g2: Vec<f64>,
    /// One row of `w·T`, `w`, `w·V`, zero-padded by `r` on both sides.
    pad_t: Vec<f64>,
    pad_w: Vec<f64>,
    pad_v: Vec<f64>,
    /// Row-pass sums for the whole stamp (rows padded to whole blocks): Σ g w T, Σ g w, Σ g² w V.
    h_t: Vec<f64>,
    h_w: Vec<f64>,
    h_v: Vec<f64>,
}

/// Pixels per block of the passes: each pass keeps a block's three sums in vector registers
/// while it runs over the taps (8 f64: two AVX2 or four SSE2 registers per sum).
const LANES: usize = 8;

/// Convolve one stamp (`width × height`, row-major) with the Gaussian of `sigma`, writing `T'`
/// and `T'var` into `out_t` and `out_v` (0 where no usable pixel is within reach).
///
/// On x86-64 CPUs with AVX2 the same code runs compiled for 256-bit vectors (twice the f64
/// lanes of the SSE2 baseline). The arithmetic is the same: Rust never fuses a multiply and an
/// add on its own, and FMA is not enabled, so the numbers are identical on every CPU.
#[allow(clippy::too_many_arguments)]
pub fn convolve_stamp(
    width: usize,
    height: usize,
    sigma: f32,
    tmpl: &[f32],
    tvar: &[f32],
    wgt: &[f32],
    out_t: &mut [f32],
    out_v: &mut [f32],
    s: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { convolve_stamp_avx2(width, height, sigma, tmpl, tvar, wgt, out_t, out_v, s) };
        return;
    }
    convolve_stamp_body(width, height, sigma, tmpl, tvar, wgt, out_t, out_v, s);
}

/// [`convolve_stamp_body`] compiled with AVX2. Safety: call only where the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn convolve_stamp_avx2(
    width: usize,
    height: usize,
    sigma: f32,
    tmpl: &[f32],
    tvar: &[f32],
    wgt: &[f32],
    out_t: &mut [f32],
    out_v: &mut [f32],
    s: &mut Scratch,
) {
    convolve_stamp_body(width, height, sigma, tmpl, tvar, wgt, out_t, out_v, s);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn convolve_stamp_body(
    width: usize,
    height: usize,
    sigma: f32,
    tmpl: &[f32],
    tvar: &[f32],
    wgt: &[f32],
    out_t: &mut [f32],
    out_v: &mut [f32],
    s: &mut Scratch,
) {
    let (w, h) = (width, height);
    let r = radius(sigma) as usize;
    let taps = 2 * r + 1;
    s.g.clear();
    s.g.extend((0..taps).map(|k| gauss(k as i32 - r as i32, sigma)));
    s.g2.clear();
    s.g2.extend(s.g.iter().map(|g| g * g));
    // Rows padded to whole blocks of LANES; the extra columns hold zeros and are not written out.
    let wp = w.next_multiple_of(LANES);
    for buf in [&mut s.pad_t, &mut s.pad_w, &mut s.pad_v] {
        buf.clear();
        buf.resize(wp + 2 * r, 0.0);
    }
    for buf in [&mut s.h_t, &mut s.h_w, &mut s.h_v] {
        buf.clear();
        buf.resize(h * wp, 0.0);
    }
    let (g, g2) = (&s.g[..], &s.g2[..]);

    // Row pass: h[y][x] = Σ_k g[k] · pad[x + k], k ascending (j = x + k − r ascending), for a
    // block of LANES pixels at a time held in registers.
    for y in 0..h {
        let row = y * w..(y + 1) * w;
        for (x, ((t, v), wt)) in tmpl[row.clone()].iter().zip(&tvar[row.clone()]).zip(&wgt[row]).enumerate() {
            let wt = *wt as f64;
            s.pad_t[r + x] = wt * *t as f64;
            s.pad_w[r + x] = wt;
            s.pad_v[r + x] = wt * *v as f64;
        }
        for xb in (0..wp).step_by(LANES) {
            let (mut at, mut aw, mut av) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
            for k in 0..taps {
                let (pt, pw, pv) = (&s.pad_t[xb + k..xb + k + LANES], &s.pad_w[xb + k..xb + k + LANES], &s.pad_v[xb + k..xb + k + LANES]);
                for l in 0..LANES {
                    at[l] += g[k] * pt[l];
                    aw[l] += g[k] * pw[l];
                    av[l] += g2[k] * pv[l];
                }
            }
            let o = y * wp + xb;
            s.h_t[o..o + LANES].copy_from_slice(&at);
            s.h_w[o..o + LANES].copy_from_slice(&aw);
            s.h_v[o..o + LANES].copy_from_slice(&av);
        }
    }

    // Column pass: out[y][x] = Σ_j g[j − y + r] · h[j][x] over the rows j in reach, ascending.
    for y in 0..h {
        let (lo, hi) = (y.saturating_sub(r), (y + r).min(h - 1));
        for xb in (0..wp).step_by(LANES) {
            let (mut at, mut aw, mut av) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
            for j in lo..=hi {
                let k = j + r - y;
                let o = j * wp + xb;
                let (ht, hw, hv) = (&s.h_t[o..o + LANES], &s.h_w[o..o + LANES], &s.h_v[o..o + LANES]);
                for l in 0..LANES {
                    at[l] += g[k] * ht[l];
                    aw[l] += g[k] * hw[l];
                    av[l] += g2[k] * hv[l];
                }
            }
            let n = LANES.min(w - xb);
            let row = y * w + xb..y * w + xb + n;
            for (l, (ot, ov)) in out_t[row.clone()].iter_mut().zip(&mut out_v[row]).enumerate() {
                let (st, sw, sv) = (at[l], aw[l], av[l]);
                (*ot, *ov) = if sw > 0.0 { ((st / sw) as f32, (sv / (sw * sw)) as f32) } else { (0.0, 0.0) };
            }
        }
    }
}

/// The convolved template and variance of every stamp of the batch.
pub fn convolve(batch: &StampBatch) -> Convolved {
    let npix = batch.npix();
    let mut out_t = vec![0.0f32; batch.n * npix];
    let mut out_v = vec![0.0f32; batch.n * npix];
    let mut scratch = Scratch::default();
    if npix > 0 {
        for (s, (p, (ot, ov))) in
            batch.params.iter().zip(out_t.chunks_exact_mut(npix).zip(out_v.chunks_exact_mut(npix))).enumerate()
        {
            let px = s * npix..(s + 1) * npix;
            convolve_stamp(
                batch.width,
                batch.height,
                p.kernel_sigma,
                &batch.template[px.clone()],
                &batch.template_var[px.clone()],
                &batch.weight[px],
                ot,
                ov,
                &mut scratch,
            );
        }
    }
    Convolved { template: out_t, template_var: out_v }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StampParams;

    /// The textbook loops the module started from: one output pixel at a time, bounds-checked
    /// taps. The vectorised passes must give the same numbers (bit for bit on 0/1 weights).
    fn reference(batch: &StampBatch) -> Convolved {
        let (w, h, npix) = (batch.width, batch.height, batch.npix());
        let mut out_t = vec![0.0f32; batch.n * npix];
        let mut out_v = vec![0.0f32; batch.n * npix];
        let (mut h_t, mut h_w, mut h_v) = (vec![0.0f64; npix], vec![0.0f64; npix], vec![0.0f64; npix]);
        for (s, p) in batch.params.iter().enumerate() {
            let base = s * npix;
            let r = radius(p.kernel_sigma);
            let g: Vec<f64> = (-r..=r).map(|k| gauss(k, p.kernel_sigma)).collect();
            for y in 0..h {
                for x in 0..w {
                    let (lo, hi) = ((x as i32 - r).max(0), (x as i32 + r).min(w as i32 - 1));
                    let (mut st, mut sw, mut sv) = (0.0, 0.0, 0.0);
                    for j in lo..=hi {
                        let gk = g[(j - x as i32 + r) as usize];
                        let q = base + y * w + j as usize;
                        let wt = batch.weight[q] as f64;
                        st += gk * wt * batch.template[q] as f64;
                        sw += gk * wt;
                        sv += gk * gk * wt * batch.template_var[q] as f64;
                    }
                    (h_t[y * w + x], h_w[y * w + x], h_v[y * w + x]) = (st, sw, sv);
                }
            }
            for y in 0..h {
                for x in 0..w {
                    let (lo, hi) = ((y as i32 - r).max(0), (y as i32 + r).min(h as i32 - 1));
                    let (mut st, mut sw, mut sv) = (0.0, 0.0, 0.0);
                    for j in lo..=hi {
                        let gk = g[(j - y as i32 + r) as usize];
                        let q = j as usize * w + x;
                        st += gk * h_t[q];
                        sw += gk * h_w[q];
                        sv += gk * gk * h_v[q];
                    }
                    if sw > 0.0 {
                        out_t[base + y * w + x] = (st / sw) as f32;
                        out_v[base + y * w + x] = (sv / (sw * sw)) as f32;
                    }
                }
            }
        }
        Convolved { template: out_t, template_var: out_v }
    }

    #[test]
    fn vectorised_passes_equal_the_textbook_loops() {
        let mut state = 0x2545f4914f6cdd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        // Wide and narrow kernels (radius beyond the stamp too), masks, odd shapes.
        for (w, h, sigma) in [(63, 63, 1.6f32), (17, 41, 3.3), (9, 5, 7.9), (30, 30, 0.0), (21, 19, 0.4)] {
            let n = 3;
            let mut b = StampBatch { n, ..StampBatch::empty(w, h) };
            for _ in 0..n * w * h {
                let masked = next() < 0.1;
                b.weight.push(if masked { 0.0 } else { 1.0 });
                b.template.push(if masked { 0.0 } else { (100.0 + 50.0 * next()) as f32 });
                b.template_var.push((1.0 + 9.0 * next()) as f32);
                b.science.push(0.0);
                b.science_var.push(1.0);
                b.profile.push(0.0);
            }
            b.params = (0..n).map(|_| StampParams::new(sigma, 0.0, 0.0)).collect();
            assert_eq!(convolve(&b), reference(&b), "{w}x{h} sigma {sigma}");
        }
    }
}
