//! Choosing the stamps the kernel is fitted on: bright, isolated, unsaturated stars of the
//! template (the sharper image, where stars are easiest to separate), the brightest in each cell
//! of a grid over the frame so the spatial variation is constrained everywhere.
//!
//! A stamp is the square of side `2r + 1` around the star with `r = h + margin`: the science
//! star is the template star spread by the kernel, so it reaches `h` plus the template PSF's own
//! radius. Its template cutout is `h` wider again. A stamp is skipped when any pixel it uses is
//! NaN, at or above saturation, or has a variance that is not positive.

use super::Pair;

/// How stamps are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct StampOptions {
    /// Cells per side of the grid over the frame.
    pub grid: usize,
    /// Stars kept per cell, brightest first.
    pub per_cell: usize,
    /// Pixels added to the kernel half-width for the stamp's half-side (about 2.5 σ of the
    /// template PSF). The stamp must reach past the kernel: a kernel wider than its stamp can
    /// move a variable star's extra light out of the stamp, where the fit does not see it,
    /// and absorb the variability (a half-width capped at 16 px under a 24 px kernel hid
    /// variables of SNR 50–75 in the detection tests).
    pub margin: usize,
    /// Least peak height over the sky, in sky σ of the template.
    pub min_peak_sigma: f64,
    /// Pixels at or above these values are saturated (`None`: no saturation).
    pub saturate_science: Option<f32>,
    pub saturate_template: Option<f32>,
}

impl Default for StampOptions {
    fn default() -> Self {
        StampOptions { grid: 10, per_cell: 1, margin: 4, min_peak_sigma: 20.0, saturate_science: None, saturate_template: None }
    }
}

/// A fitting stamp: the star's peak pixel and the stamp's half-side `r`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stamp {
    pub x: usize,
    pub y: usize,
    pub half: usize,
    /// Peak over the sky in the template, ADU.
    pub peak: f32,
}

/// Median and 1.4826 × MAD of the finite values of a sample.
pub(crate) fn robust_stats(mut v: Vec<f32>) -> Option<(f32, f32)> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    let m = *v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1;
    let mut d: Vec<f32> = v.iter().map(|x| (x - m).abs()).collect();
    let mad = *d.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1;
    Some((m, 1.4826 * mad))
}

/// Every pixel of the square of half-side `r` around (x, y) satisfies `ok`; the square must lie
/// inside the frame.
fn all_in(data: &[f32], w: usize, x: usize, y: usize, r: usize, ok: impl Fn(f32) -> bool) -> bool {
    (y - r..=y + r).all(|yy| data[yy * w + x - r..=yy * w + x + r].iter().all(|&v| ok(v)))
}

/// Stamps for the fit of `pair` with a kernel of half-width `kernel_half`: in each of
/// `grid × grid` cells the `per_cell` brightest template stars that are a local maximum over
/// their whole stamp (no brighter neighbour), at least `min_peak_sigma` sky σ high, not a hot
/// pixel or a cosmic ray (each of the four neighbours above a quarter of the peak), with the
/// template cutout inside the frame and every pixel usable. In raster order of the cells.
pub fn select_stamps(pair: &Pair, kernel_half: usize, opts: &StampOptions) -> Vec<Stamp> {
    let (w, h) = (pair.width, pair.height);
    let r = kernel_half + opts.margin;
    let reach = r + kernel_half;
    if pair.check().is_err() || w <= 2 * reach + 2 || h <= 2 * reach + 2 || opts.grid == 0 || opts.per_cell == 0 {
        return Vec::new();
    }
    let t = pair.template;
    let step = (w * h / 200_000).max(1);
    let Some((sky, sigma)) = robust_stats(t.iter().step_by(step).copied().collect()) else { return Vec::new() };
    let floor = sky + opts.min_peak_sigma as f32 * sigma.max(f32::MIN_POSITIVE);
    let sat_t = opts.saturate_template.unwrap_or(f32::INFINITY);
    let sat_s = opts.saturate_science.unwrap_or(f32::INFINITY);
    let (gw, gh) = (w.div_ceil(opts.grid), h.div_ceil(opts.grid));
    let mut cells: Vec<Vec<Stamp>> = vec![Vec::new(); opts.grid * opts.grid];
    for y in reach..h - reach {
        for x in reach..w - reach {
            let v = t[y * w + x];
            if !(v > floor && v < sat_t) {
                continue;
            }
            // The peak of its stamp, ties broken by raster order.
            let is_max = (y - r..=y + r).all(|yy| (x - r..=x + r).all(|xx| {
                let u = t[yy * w + xx];
                u < v || (u == v && (yy, xx) >= (y, x))
            }));
            if !is_max {
                continue;
            }
            let quarter = sky + 0.25 * (v - sky);
            if ![t[y * w + x - 1], t[y * w + x + 1], t[(y - 1) * w + x], t[(y + 1) * w + x]].iter().all(|&u| u > quarter) {
                continue;
            }
            let usable = all_in(t, w, x, y, reach, |u| u.is_finite() && u < sat_t)
                && all_in(pair.science, w, x, y, r, |u| u.is_finite() && u < sat_s)
                && all_in(pair.science_variance, w, x, y, r, |u| u.is_finite() && u > 0.0)
                && pair.template_variance.is_none_or(|tv| all_in(tv, w, x, y, r, |u| u.is_finite() && u >= 0.0));
            if usable {
                let cell = (y / gh).min(opts.grid - 1) * opts.grid + (x / gw).min(opts.grid - 1);
                cells[cell].push(Stamp { x, y, half: r, peak: v - sky });
            }
        }
    }
    let mut out = Vec::new();
    for mut c in cells {
        c.sort_by(|a, b| b.peak.total_cmp(&a.peak));
        out.extend(c.into_iter().take(opts.per_cell));
    }
    out
}

/// The broad image's light beyond the kernel, against the sharp image's, measured on stars:
/// what [`wings`] returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wings {
    /// Stars measured.
    pub stars: usize,
    /// The broad image's light in the annulus, less the sharp image's scaled to the same core
    /// flux, as a fraction of the broad image's core flux: the median over the stars, each
    /// weighted by its `q²` (see `ring_snr`).
    pub excess: f64,
    /// `excess` × the largest `q` of the stars, `q = F_core / √(V · A · ΣP²)` (`V` the
    /// annulus's summed variance, `A` its pixels, `ΣP² = 1/(4π σ_broad²)`): the S/N the
    /// matched filter gives the ring that excess leaves around the brightest star when the
    /// kernel does not carry it.
    pub ring_snr: f64,
}

/// [`Wings`] of `pair` (`science` the broad image, `template` the sharp one) on `stamps`: per
/// star the light within `r_in` (the core) and in the annulus `r_in ≤ r < r_out` of both
/// images, sky already subtracted. `None` without a star whose core is positive in both.
pub fn wings(pair: &Pair, stamps: &[Stamp], r_in: f64, r_out: f64, sigma_broad: f64) -> Option<Wings> {
    let (w, h) = (pair.width, pair.height);
    if pair.check().is_err() || !(r_in > 0.0 && r_out > r_in && sigma_broad > 0.0) {
        return None;
    }
    let sum_p2 = 1.0 / (4.0 * std::f64::consts::PI * sigma_broad * sigma_broad);
    let reach = r_out.ceil() as usize;
    let mut per: Vec<(f64, f64)> = Vec::new();
    for st in stamps {
        if st.x < reach || st.y < reach || st.x + reach >= w || st.y + reach >= h {
            continue;
        }
        let (mut fb, mut fs, mut eb, mut es, mut vb, mut vs, mut area) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
        for y in st.y - reach..=st.y + reach {
            for x in st.x - reach..=st.x + reach {
                let d = ((x as f64 - st.x as f64).powi(2) + (y as f64 - st.y as f64).powi(2)).sqrt();
                let i = y * w + x;
                let (b, s) = (pair.science[i] as f64, pair.template[i] as f64);
                if d < r_in {
                    fb += b;
                    fs += s;
                } else if d < r_out {
                    eb += b;
                    es += s;
                    vb += pair.science_variance[i] as f64;
                    vs += pair.template_variance.map_or(0.0, |v| v[i] as f64);
                    area += 1;
                }
            }
        }
        if !(fb > 0.0 && fs > 0.0 && vb > 0.0 && area > 0) {
            continue;
        }
        let a = fb / fs;
        let e = eb - a * es;
        let q = fb / (((vb + a * a * vs) * area as f64 * sum_p2).sqrt());
        if e.is_finite() && q.is_finite() {
            per.push((e / fb, q));
        }
    }
    if per.is_empty() {
        return None;
    }
    let qmax = per.iter().map(|p| p.1).fold(0.0, f64::max);
    per.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = per.iter().map(|p| p.1 * p.1).sum();
    let mut acc = 0.0;
    let mut excess = per[per.len() / 2].0;
    for (e, q) in &per {
        acc += q * q;
        if acc >= 0.5 * total {
            excess = *e;
            break;
        }
    }
    Some(Wings { stars: per.len(), excess, ring_snr: excess * qmax })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_skip_saturated_nan_and_crowded_stars() {
        let (w, h) = (200usize, 200usize);
        let mut t = vec![0.0f32; w * h];
        // Deterministic small noise so the sky σ is not zero.
        for (i, v) in t.iter_mut().enumerate() {
            *v = ((i * 7919) % 13) as f32 * 0.1 - 0.6;
        }
        let star = |img: &mut Vec<f32>, x0: f64, y0: f64, f: f64| {
            for y in 0..h {
                for x in 0..w {
                    let d2 = (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2);
                    img[y * w + x] += (f * (-0.5 * d2 / 2.25).exp()) as f32;
                }
            }
        };
        star(&mut t, 40.0, 40.0, 1000.0); // good
        star(&mut t, 150.0, 40.0, 5e5); // saturated
        star(&mut t, 40.0, 150.0, 1000.0); // NaN next to it
        star(&mut t, 150.0, 150.0, 800.0); // a brighter star 6 px away
        star(&mut t, 156.0, 150.0, 1200.0);
        star(&mut t, 100.0, 100.0, 900.0); // good
        t[152 * w + 41] = f32::NAN;
        let var = vec![1.0f32; w * h];
        let pair = Pair { width: w, height: h, science: &t, template: &t, science_variance: &var, template_variance: None };
        let opts = StampOptions { grid: 4, saturate_science: Some(1e5), saturate_template: Some(1e5), ..Default::default() };
        let s = select_stamps(&pair, 8, &opts);
        let at: Vec<(usize, usize)> = s.iter().map(|s| (s.x, s.y)).collect();
        assert!(at.contains(&(40, 40)) && at.contains(&(100, 100)), "{at:?}");
        assert!(at.contains(&(156, 150)), "the brighter of the pair is the peak of its stamp: {at:?}");
        assert_eq!(at.len(), 3, "{at:?}");
        assert!(s.iter().all(|s| s.half == 12));
    }
}
