//! CPU twin of `shaders/difference_score.wgsl`: the difference `D = S − a·T' − b`, its variance
//! `V = S_var + a²·T'var`, and the matched filter with the profile `P` at the candidate:
//! `flux = Σ P·D·w/V / Σ P²·w/V`, `flux_err = 1/sqrt(Σ P²·w/V)`, `score = flux/flux_err`.
//! Masked pixels (w = 0) are 0 in both images and stay out of the sums.

use crate::engine::{Fit, StampBatch, SubtractionImages, SubtractionResult, FLUX_ERR_NONE};

pub fn difference_score(batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32], fits: &[Fit]) -> SubtractionImages {
    let npix = batch.npix();
    let mut diff = vec![0.0f32; batch.n * npix];
    let mut var = vec![0.0f32; batch.n * npix];
    let mut results = Vec::with_capacity(batch.n);
    for (s, f) in fits.iter().enumerate().take(batch.n) {
        let (a, b) = (f.scale as f64, f.background as f64);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for i in s * npix..(s + 1) * npix {
            if !(batch.weight[i] > 0.0) {
                continue;
            }
            let d = batch.science[i] as f64 - a * conv_t[i] as f64 - b;
            let v = batch.science_var[i] as f64 + a * a * conv_tv[i] as f64;
            diff[i] = d as f32;
            var[i] = v as f32;
            if v > 0.0 {
                let pr = batch.profile[i] as f64;
                let w = batch.weight[i] as f64;
                num += pr * d * w / v;
                den += pr * pr * w / v;
            }
        }
        let r = if den > 0.0 {
            let flux = num / den;
            let err = 1.0 / den.sqrt();
            SubtractionResult {
                flux_scale: f.scale,
                background: f.background,
                flux: flux as f32,
                flux_err: err as f32,
                score: (flux / err) as f32,
            }
        } else {
            SubtractionResult { flux_scale: f.scale, background: f.background, flux: 0.0, flux_err: FLUX_ERR_NONE, score: 0.0 }
        };
        results.push(r);
    }
    SubtractionImages { results, difference: diff, variance: var }
}
