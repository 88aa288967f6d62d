//! CPU twin of `shaders/fit.wgsl`: per stamp, weighted least squares `science ≈ a·T' + b` with
//! weights `fit weight / (science_var + T'var)`, solved in f64 on centred sums (mean first,
//! then the centred second moments, exactly the two passes the GPU makes).
//!
//! A pixel enters the fit when its mask weight is non-zero, its variance is positive and it lies
//! at least `fit_radius` from the candidate. Where the template is flat over those pixels the
//! system is singular: scale 1, background the (lower) median of `science − T'`. With
//! `fixed_scale` > 0 the scale is given and the background is the weighted mean of
//! `science − a·T'`.

use crate::engine::{Fit, FitStatus, StampBatch, StampParams};

/// Relative spread of T' below which the fit is singular (keep in sync with `shaders/fit.wgsl`).
pub const SINGULAR_REL: f64 = 1e-12;

/// Whether pixel `i` of a stamp enters the fit; computed in f32 as the shader does.
pub fn in_fit(p: &StampParams, width: usize, i: usize) -> bool {
    let x = (i % width) as f32;
    let y = (i / width) as f32;
    let (dx, dy) = (x - p.cand_x, y - p.cand_y);
    dx * dx + dy * dy >= p.fit_radius * p.fit_radius
}

pub fn fit(batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32]) -> Vec<Fit> {
    let npix = batch.npix();
    let mut out = Vec::with_capacity(batch.n);
    for (s, p) in batch.params.iter().enumerate().take(batch.n) {
        let base = s * npix;
        // (weight, x = T', y = science) of every pixel in the fit.
        let pts: Vec<(f64, f64, f64)> = (0..npix)
            .filter_map(|i| {
                let k = base + i;
                let v = batch.science_var[k] as f64 + conv_tv[k] as f64;
                let m = batch.weight[k] as f64;
                (m > 0.0 && v > 0.0 && in_fit(p, batch.width, i))
                    .then(|| (m / v, conv_t[k] as f64, batch.science[k] as f64))
            })
            .collect();
        let sw: f64 = pts.iter().map(|q| q.0).sum();
        if pts.is_empty() || !(sw > 0.0) {
            out.push(Fit { scale: 1.0, background: 0.0, status: FitStatus::Empty });
            continue;
        }
        let mx = pts.iter().map(|q| q.0 * q.1).sum::<f64>() / sw;
        let my = pts.iter().map(|q| q.0 * q.2).sum::<f64>() / sw;
        let sxx: f64 = pts.iter().map(|q| q.0 * (q.1 - mx) * (q.1 - mx)).sum();
        let sxy: f64 = pts.iter().map(|q| q.0 * (q.1 - mx) * (q.2 - my)).sum();
        let var_x = sxx / sw;
        if p.fixed_scale > 0.0 {
            let a = p.fixed_scale as f64;
            out.push(Fit { scale: p.fixed_scale, background: (my - a * mx) as f32, status: FitStatus::Solved });
        } else if var_x > SINGULAR_REL * mx * mx && var_x > 0.0 && (sxy / sxx).is_finite() {
            let a = sxy / sxx;
            out.push(Fit { scale: a as f32, background: (my - a * mx) as f32, status: FitStatus::Solved });
        } else {
            let mut d: Vec<f64> = pts.iter().map(|q| q.2 - q.1).collect();
            d.sort_by(|a, b| a.total_cmp(b));
            let median = d[(d.len() - 1) / 2];
            out.push(Fit { scale: 1.0, background: median as f32, status: FitStatus::Singular });
        }
    }
    out
}
