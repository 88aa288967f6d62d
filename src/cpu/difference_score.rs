//! CPU twin of `shaders/difference_score.wgsl`: the difference `D = S − a·T' − b`, its variance
//! `V = S_var + a²·T'var`, and the matched filter with the profile `P` at the candidate:
//! `flux = Σ P·D·w/V / Σ P²·w/V`, `flux_err = 1/sqrt(Σ P²·w/V)`, `score = flux/flux_err`.
//! Masked pixels (w = 0) are 0 in both images and stay out of the sums.

use crate::engine::{Fit, StampBatch, SubtractionImages, SubtractionResult, FLUX_ERR_NONE};

/// One stamp's planes, as the matched filter reads them.
#[derive(Debug, Clone, Copy)]
pub struct ScoreInputs<'a> {
    pub science: &'a [f32],
    pub science_var: &'a [f32],
    pub weight: &'a [f32],
    pub profile: &'a [f32],
    pub conv_t: &'a [f32],
    pub conv_tv: &'a [f32],
}

/// The difference, its variance and the matched filter on one stamp. `images`, when given,
/// receives `D` and `V` (the caller zeroes it: masked pixels are left untouched); the engine's
/// `subtract` passes `None` and skips those writes.
pub fn score_stamp(f: &Fit, st: &ScoreInputs<'_>, images: Option<(&mut [f32], &mut [f32])>) -> SubtractionResult {
    let (a, b) = (f.scale as f64, f.background as f64);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut images = images;
    for (i, (((((sci, svar), wt), pr), t), tv)) in
        st.science.iter().zip(st.science_var).zip(st.weight).zip(st.profile).zip(st.conv_t).zip(st.conv_tv).enumerate()
    {
        let used = *wt > 0.0; // false for NaN too
        if !used {
            continue;
        }
        let d = *sci as f64 - a * *t as f64 - b;
        let v = *svar as f64 + a * a * *tv as f64;
        if let Some((diff, var)) = images.as_mut() {
            diff[i] = d as f32;
            var[i] = v as f32;
        }
        if v > 0.0 {
            let pr = *pr as f64;
            let w = *wt as f64;
            num += pr * d * w / v;
            den += pr * pr * w / v;
        }
    }
    if den > 0.0 {
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
    }
}

/// The difference, variance and matched filter of every stamp of the batch.
pub fn difference_score(batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32], fits: &[Fit]) -> SubtractionImages {
    let npix = batch.npix();
    let mut diff = vec![0.0f32; batch.n * npix];
    let mut var = vec![0.0f32; batch.n * npix];
    let mut results = Vec::with_capacity(batch.n);
    for (s, f) in fits.iter().enumerate().take(batch.n) {
        let px = s * npix..(s + 1) * npix;
        let st = ScoreInputs {
            science: &batch.science[px.clone()],
            science_var: &batch.science_var[px.clone()],
            weight: &batch.weight[px.clone()],
            profile: &batch.profile[px.clone()],
            conv_t: &conv_t[px.clone()],
            conv_tv: &conv_tv[px.clone()],
        };
        results.push(score_stamp(f, &st, Some((&mut diff[px.clone()], &mut var[px]))));
    }
    SubtractionImages { results, difference: diff, variance: var }
}
