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
    in_fit_xy(p, i % width, i / width)
}

/// [`in_fit`] for the pixel at column `x`, row `y`.
#[inline]
pub fn in_fit_xy(p: &StampParams, x: usize, y: usize) -> bool {
    let (dx, dy) = (x as f32 - p.cand_x, y as f32 - p.cand_y);
    dx * dx + dy * dy >= p.fit_radius * p.fit_radius
}

/// Fit every stamp of the batch against its convolved template `conv_t` (variance `conv_tv`).
pub fn fit(batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32]) -> Vec<Fit> {
    let npix = batch.npix();
    let mut pts = Vec::new();
    batch
        .params
        .iter()
        .enumerate()
        .take(batch.n)
        .map(|(s, p)| {
            let px = s * npix..(s + 1) * npix;
            let stamp = FitInputs {
                science: &batch.science[px.clone()],
                science_var: &batch.science_var[px.clone()],
                weight: &batch.weight[px.clone()],
                conv_t: &conv_t[px.clone()],
                conv_tv: &conv_tv[px],
            };
            fit_stamp(p, batch.width, &stamp, &mut pts)
        })
        .collect()
}

/// One stamp's planes, as the fit reads them.
#[derive(Debug, Clone, Copy)]
pub struct FitInputs<'a> {
    pub science: &'a [f32],
    pub science_var: &'a [f32],
    pub weight: &'a [f32],
    pub conv_t: &'a [f32],
    pub conv_tv: &'a [f32],
}

/// Fit one stamp. `pts` is scratch, reused from stamp to stamp: (weight, x = T', y = science)
/// of every pixel in the fit, summed in f64 in pixel order, means first and then the centred
/// second moments (each sum in the same order as one `Iterator::sum` per quantity).
pub fn fit_stamp(p: &StampParams, width: usize, st: &FitInputs<'_>, pts: &mut Vec<(f64, f64, f64)>) -> Fit {
    pts.clear();
    let (mut x, mut y) = (0, 0);
    for ((((sci, svar), m), t), tv) in st.science.iter().zip(st.science_var).zip(st.weight).zip(st.conv_t).zip(st.conv_tv) {
        let v = *svar as f64 + *tv as f64;
        let m = *m as f64;
        if m > 0.0 && v > 0.0 && in_fit_xy(p, x, y) {
            pts.push((m / v, *t as f64, *sci as f64));
        }
        x += 1;
        if x == width {
            (x, y) = (0, y + 1);
        }
    }
    let (mut sw, mut swx, mut swy) = (0.0f64, 0.0f64, 0.0f64);
    for q in pts.iter() {
        sw += q.0;
        swx += q.0 * q.1;
        swy += q.0 * q.2;
    }
    let weighted = sw > 0.0; // false for NaN too
    if pts.is_empty() || !weighted {
        return Fit { scale: 1.0, background: 0.0, status: FitStatus::Empty };
    }
    let mx = swx / sw;
    let my = swy / sw;
    let (mut sxx, mut sxy) = (0.0f64, 0.0f64);
    for q in pts.iter() {
        sxx += q.0 * (q.1 - mx) * (q.1 - mx);
        sxy += q.0 * (q.1 - mx) * (q.2 - my);
    }
    let var_x = sxx / sw;
    if p.fixed_scale > 0.0 {
        let a = p.fixed_scale as f64;
        Fit { scale: p.fixed_scale, background: (my - a * mx) as f32, status: FitStatus::Solved }
    } else if var_x > SINGULAR_REL * mx * mx && var_x > 0.0 && (sxy / sxx).is_finite() {
        let a = sxy / sxx;
        Fit { scale: a as f32, background: (my - a * mx) as f32, status: FitStatus::Solved }
    } else {
        let mut d: Vec<f64> = pts.iter().map(|q| q.2 - q.1).collect();
        d.sort_by(|a, b| a.total_cmp(b));
        let median = d[(d.len() - 1) / 2];
        Fit { scale: 1.0, background: median as f32, status: FitStatus::Singular }
    }
}
