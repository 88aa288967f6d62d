//! CPU twin of `shaders/convolve.wgsl`: the template and its variance convolved with the
//! per-stamp Gaussian kernel, as a mask-normalised separable convolution.
//!
//! With weights `w` (the batch's 0/1 mask) and `g` the Gaussian, per output pixel
//! `T' = Σ g w T / Σ g w` and `V' = Σ g² w V / (Σ g w)²`: outside the stamp and on masked
//! pixels the truncated kernel is renormalised. Both sums are separable, so each is one pass
//! along rows and one along columns, as on the GPU. Sigma below [`SIGMA_MIN`] is a copy.

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

pub fn convolve(batch: &StampBatch) -> Convolved {
    let (w, h, npix) = (batch.width, batch.height, batch.npix());
    let mut out_t = vec![0.0f32; batch.n * npix];
    let mut out_v = vec![0.0f32; batch.n * npix];
    // Row-pass sums for one stamp: Σ g w T, Σ g w, Σ g² w V.
    let mut h_t = vec![0.0f64; npix];
    let mut h_w = vec![0.0f64; npix];
    let mut h_v = vec![0.0f64; npix];
    for (s, p) in batch.params.iter().enumerate().take(batch.n) {
        let base = s * npix;
        let (tmpl, tvar, wgt) = (
            &batch.template[base..base + npix],
            &batch.template_var[base..base + npix],
            &batch.weight[base..base + npix],
        );
        let sigma = p.kernel_sigma;
        let r = radius(sigma);
        let g: Vec<f64> = (-r..=r).map(|k| gauss(k, sigma)).collect();
        for y in 0..h {
            for x in 0..w {
                let (lo, hi) = ((x as i32 - r).max(0), (x as i32 + r).min(w as i32 - 1));
                let (mut st, mut sw, mut sv) = (0.0, 0.0, 0.0);
                for j in lo..=hi {
                    let gk = g[(j - x as i32 + r) as usize];
                    let q = y * w + j as usize;
                    let wt = wgt[q] as f64;
                    st += gk * wt * tmpl[q] as f64;
                    sw += gk * wt;
                    sv += gk * gk * wt * tvar[q] as f64;
                }
                h_t[y * w + x] = st;
                h_w[y * w + x] = sw;
                h_v[y * w + x] = sv;
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
                let i = base + y * w + x;
                if sw > 0.0 {
                    out_t[i] = (st / sw) as f32;
                    out_v[i] = (sv / (sw * sw)) as f32;
                }
            }
        }
    }
    Convolved { template: out_t, template_var: out_v }
}
