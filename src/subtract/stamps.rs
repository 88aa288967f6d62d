//! Choosing the stamps the kernel is fitted on: bright, isolated, unsaturated stars of the
//! template (the sharper image, where stars are easiest to separate), the brightest in each cell
//! of a grid over the frame so the spatial variation is constrained everywhere.
//!
//! A stamp is the square of side `2r + 1` around the star with `r = h + margin`: the science
//! star is the template star spread by the kernel, so it reaches `h` plus the template PSF's own
//! radius. Its template cutout is `h` wider again. A stamp is skipped when any pixel it uses is
//! NaN, at or above saturation, or has a variance that is not positive.

use super::{Pair, SubtractError};

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
///
/// In three steps the GPU repeats on planes it keeps (`detect::al`'s device stamps): the sky
/// and the floor from a sample of the template ([`StampScan`]), every pixel that passes
/// ([`stamp_candidates`], twin of `shaders/frame/frame_stamps.wgsl`), the brightest per cell
/// ([`pick_per_cell`]).
pub fn select_stamps(pair: &Pair, kernel_half: usize, opts: &StampOptions) -> Vec<Stamp> {
    let (w, h) = (pair.width, pair.height);
    let Some(step) = scan_step(w, h, kernel_half, opts) else { return Vec::new() };
    if pair.check().is_err() {
        return Vec::new();
    }
    let Some(scan) = StampScan::new(kernel_half, opts, pair.template.iter().step_by(step).copied().collect()) else { return Vec::new() };
    pick_per_cell(&stamp_candidates(pair, &scan), w, h, &scan, opts)
}

/// The stride of the template sample [`StampScan::new`] takes its sky from (about 200 000
/// pixels), or `None` where [`select_stamps`] finds nothing on a `w × h` frame (the stamps'
/// reach does not fit, or no cell or no star per cell is asked for).
pub fn scan_step(w: usize, h: usize, kernel_half: usize, opts: &StampOptions) -> Option<usize> {
    let reach = 2 * kernel_half + opts.margin;
    if w <= 2 * reach + 2 || h <= 2 * reach + 2 || opts.grid == 0 || opts.per_cell == 0 {
        return None;
    }
    Some((w * h / 200_000).max(1))
}

/// What [`stamp_candidates`] looks for: stars of stamp half-side `r` whose template cutout
/// reaches `reach` (`r` plus the kernel's half-width), peaking above `floor` (the sky plus
/// `min_peak_sigma` sky σ) and below the saturation levels (`+∞` where none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StampScan {
    pub r: usize,
    pub reach: usize,
    pub sky: f32,
    pub floor: f32,
    pub saturate_template: f32,
    pub saturate_science: f32,
}

impl StampScan {
    /// From `sample`, the template taken every [`scan_step`] pixels from the first; `None`
    /// without a finite value in it.
    pub fn new(kernel_half: usize, opts: &StampOptions, sample: Vec<f32>) -> Option<StampScan> {
        let (sky, sigma) = robust_stats(sample)?;
        let r = kernel_half + opts.margin;
        Some(StampScan {
            r,
            reach: r + kernel_half,
            sky,
            floor: sky + opts.min_peak_sigma as f32 * sigma.max(f32::MIN_POSITIVE),
            saturate_template: opts.saturate_template.unwrap_or(f32::INFINITY),
            saturate_science: opts.saturate_science.unwrap_or(f32::INFINITY),
        })
    }
}

/// Every pixel of `pair`'s template that [`select_stamps`] would take if its cell had no
/// brighter one, in raster order, as (pixel index, template value). The CPU twin of the
/// `stamp_peaks` and `stamp_usable` kernels (`shaders/frame/frame_stamps.wgsl`).
pub fn stamp_candidates(pair: &Pair, scan: &StampScan) -> Vec<(usize, f32)> {
    let (w, h) = (pair.width, pair.height);
    let (r, reach) = (scan.r, scan.reach);
    let t = pair.template;
    let (sat_t, sat_s, sky) = (scan.saturate_template, scan.saturate_science, scan.sky);
    let mut out = Vec::new();
    if w <= 2 * reach || h <= 2 * reach {
        return out;
    }
    for y in reach..h - reach {
        for x in reach..w - reach {
            let v = t[y * w + x];
            if !(v > scan.floor && v < sat_t) {
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
                out.push((y * w + x, v));
            }
        }
    }
    out
}

/// The `per_cell` brightest of `candidates` (raster order, as [`stamp_candidates`] gives them)
/// in each of the `grid × grid` cells of a `w × h` frame, ties to the first; in raster order of
/// the cells.
pub fn pick_per_cell(candidates: &[(usize, f32)], w: usize, h: usize, scan: &StampScan, opts: &StampOptions) -> Vec<Stamp> {
    if opts.grid == 0 || w == 0 {
        return Vec::new();
    }
    let (gw, gh) = (w.div_ceil(opts.grid), h.div_ceil(opts.grid));
    let mut cells: Vec<Vec<Stamp>> = vec![Vec::new(); opts.grid * opts.grid];
    for &(i, v) in candidates {
        let (x, y) = (i % w, i / w);
        let cell = (y / gh).min(opts.grid - 1) * opts.grid + (x / gw).min(opts.grid - 1);
        cells[cell].push(Stamp { x, y, half: scan.r, peak: v - scan.sky });
    }
    let mut out = Vec::new();
    for mut c in cells {
        c.sort_by(|a, b| b.peak.total_cmp(&a.peak));
        out.extend(c.into_iter().take(opts.per_cell));
    }
    out
}

/// One of the four planes of a pair, as [`Planes`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    Science,
    Template,
    ScienceVariance,
    TemplateVariance,
}

impl Plane {
    pub const ALL: [Plane; 4] = [Plane::Science, Plane::Template, Plane::ScienceVariance, Plane::TemplateVariance];
}

/// What the fit reads of a pair: rows of its planes around the stars. A [`Pair`] holds whole
/// planes; [`Squares`] only the squares around some stars (cut on a GPU that keeps the planes,
/// so a 4096² fit reads a few MB instead of four 67 MB planes).
pub trait Planes {
    /// The frame's width and height.
    fn size(&self) -> (usize, usize);
    fn has_template_variance(&self) -> bool;
    /// Pixels `x0 .. x0 + len` of row `y` of `plane`; `None` where they are not held.
    fn row(&self, plane: Plane, x0: usize, y: usize, len: usize) -> Option<&[f32]>;
    /// Whether the planes are consistent (the sizes of a [`Pair`]'s buffers).
    fn check(&self) -> Result<(), SubtractError> {
        Ok(())
    }
}

impl Planes for Pair<'_> {
    fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn has_template_variance(&self) -> bool {
        self.template_variance.is_some()
    }

    fn row(&self, plane: Plane, x0: usize, y: usize, len: usize) -> Option<&[f32]> {
        let p = match plane {
            Plane::Science => self.science,
            Plane::Template => self.template,
            Plane::ScienceVariance => self.science_variance,
            Plane::TemplateVariance => self.template_variance?,
        };
        if x0 + len > self.width || y >= self.height {
            return None;
        }
        p.get(y * self.width + x0..y * self.width + x0 + len)
    }

    fn check(&self) -> Result<(), SubtractError> {
        Pair::check(self)
    }
}

/// Squares around stars of the four planes of a `width × height` pair, each plane's of its own
/// half-side (NaN off the frame): all a fit on those stars reads (the template out to the
/// kernel's reach, the others to the stamp's edge).
#[derive(Debug, Clone, PartialEq)]
pub struct Squares {
    pub width: usize,
    pub height: usize,
    /// Half-side of each plane's squares, in [`Plane::ALL`]'s order.
    pub halves: [usize; 4],
    /// The squares' centres (x, y).
    pub centres: Vec<(usize, usize)>,
    /// Per plane (in [`Plane::ALL`]'s order) the squares one after the other, row by row;
    /// the template variance's empty when the pair has none.
    pub data: [Vec<f32>; 4],
}

impl Squares {
    /// Cut from the whole planes of `pair` (the CPU twin of the `stamp_squares` kernel).
    pub fn from_pair(pair: &Pair, centres: &[(usize, usize)], halves: [usize; 4]) -> Squares {
        let (w, h) = (pair.width, pair.height);
        let cut = |p: &[f32], half: usize| {
            let side = 2 * half + 1;
            let mut out = Vec::with_capacity(centres.len() * side * side);
            for &(cx, cy) in centres {
                for sy in 0..side {
                    for sx in 0..side {
                        let (x, y) = ((cx + sx) as i64 - half as i64, (cy + sy) as i64 - half as i64);
                        let inside = x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h;
                        out.push(if inside { p[y as usize * w + x as usize] } else { f32::NAN });
                    }
                }
            }
            out
        };
        Squares {
            width: w,
            height: h,
            halves,
            centres: centres.to_vec(),
            data: [cut(pair.science, halves[0]), cut(pair.template, halves[1]), cut(pair.science_variance, halves[2]), pair.template_variance.map(|v| cut(v, halves[3])).unwrap_or_default()],
        }
    }
}

impl Planes for Squares {
    fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn has_template_variance(&self) -> bool {
        !self.data[3].is_empty()
    }

    /// From the first square that holds the whole run.
    fn row(&self, plane: Plane, x0: usize, y: usize, len: usize) -> Option<&[f32]> {
        let p = Plane::ALL.iter().position(|q| *q == plane)?;
        let half = self.halves[p];
        let side = 2 * half + 1;
        let k = self.centres.iter().position(|&(cx, cy)| y + half >= cy && y <= cy + half && x0 + half >= cx && x0 + len <= cx + half + 1)?;
        let (cx, cy) = self.centres[k];
        let at = k * side * side + (y + half - cy) * side + (x0 + half - cx);
        self.data[p].get(at..at + len)
    }

    fn check(&self) -> Result<(), SubtractError> {
        let want = |i: usize| self.centres.len() * (2 * self.halves[i] + 1).pow(2);
        match self.data.iter().enumerate().find(|(i, d)| d.len() != want(*i) && !(*i == 3 && d.is_empty())) {
            Some((i, d)) => Err(SubtractError::Shape { what: format!("{:?} squares hold {} values, {} expected", Plane::ALL[i], d.len(), want(i)) }),
            None => Ok(()),
        }
    }
}

/// Where a fit's stars and their pixels come from ([`crate::subtract::fit_kernel_from`]): a
/// [`Pair`] of whole planes on the host, or planes kept on a GPU that finds the stars there
/// and sends back only their squares.
pub trait StampSource {
    /// The frame's width and height.
    fn size(&self) -> (usize, usize);
    /// [`select_stamps`]'s stamps.
    fn select(&mut self, kernel_half: usize, opts: &StampOptions) -> Result<Vec<Stamp>, SubtractError>;
    /// The planes around `stamps`, each out to its half-side of `halves` (in [`Plane::ALL`]'s
    /// order) from each centre: what the fit on those stamps reads.
    fn around(&mut self, stamps: &[Stamp], halves: [usize; 4]) -> Result<Box<dyn Planes + '_>, SubtractError>;
}

impl StampSource for Pair<'_> {
    fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn select(&mut self, kernel_half: usize, opts: &StampOptions) -> Result<Vec<Stamp>, SubtractError> {
        Ok(select_stamps(self, kernel_half, opts))
    }

    fn around(&mut self, _stamps: &[Stamp], _halves: [usize; 4]) -> Result<Box<dyn Planes + '_>, SubtractError> {
        Ok(Box::new(*self))
    }
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

/// [`Wings`] of `pair` (`science` the broad image, `template` the sharp one) on `stamps` (what
/// it reads: the squares of half-side `⌈r_out⌉` around them): per
/// star the light within `r_in` (the core) and in the annulus `r_in ≤ r < r_out` of both
/// images, sky already subtracted. `None` without a star whose core is positive in both.
pub fn wings(pair: &dyn Planes, stamps: &[Stamp], r_in: f64, r_out: f64, sigma_broad: f64) -> Option<Wings> {
    let (w, h) = pair.size();
    if pair.check().is_err() || !(r_in > 0.0 && r_out > r_in && sigma_broad > 0.0) {
        return None;
    }
    let sum_p2 = 1.0 / (4.0 * std::f64::consts::PI * sigma_broad * sigma_broad);
    let reach = r_out.ceil() as usize;
    let side = 2 * reach + 1;
    let mut per: Vec<(f64, f64)> = Vec::new();
    'stars: for st in stamps {
        if st.x < reach || st.y < reach || st.x + reach >= w || st.y + reach >= h {
            continue;
        }
        let (mut fb, mut fs, mut eb, mut es, mut vb, mut vs, mut area) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
        let x0 = st.x - reach;
        for y in st.y - reach..=st.y + reach {
            let row = |p: Plane| pair.row(p, x0, y, side);
            let (Some(rb), Some(rs), Some(rv)) = (row(Plane::Science), row(Plane::Template), row(Plane::ScienceVariance)) else { continue 'stars };
            let rt = if pair.has_template_variance() {
                match row(Plane::TemplateVariance) {
                    Some(r) => Some(r),
                    None => continue 'stars,
                }
            } else {
                None
            };
            for (j, x) in (x0..=st.x + reach).enumerate() {
                let d = ((x as f64 - st.x as f64).powi(2) + (y as f64 - st.y as f64).powi(2)).sqrt();
                let (b, s) = (rb[j] as f64, rs[j] as f64);
                if d < r_in {
                    fb += b;
                    fs += s;
                } else if d < r_out {
                    eb += b;
                    es += s;
                    vb += rv[j] as f64;
                    vs += rt.map_or(0.0, |v| v[j] as f64);
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
