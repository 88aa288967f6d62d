//! The template's point sources, for the `residual` flag (`docs/detections.md`): a detection
//! beside a bright star whose flux is a small fraction of the star's is what the subtraction
//! left of the star, not a source of its own.
//!
//! Why: a matching kernel never matches a bright star's profile to a fraction of a percent
//! everywhere. On a single frame the noise hides what is left; in a stack of ten nights the
//! noise falls threefold and the leftovers, which have nearly the same shape every night, do
//! not: on the default simulated night the 10-night stacks had 4.6 unflagged false positives
//! on stars per stack against a frame's 0.4, negative peaks 1.9–3.9 px from stars of
//! 2·10⁴–1.2·10⁵ ADU, each 0.3–1% of its star's flux.

use super::image::{robust_stats, Image};

/// Within this distance of a point source's centre (pixels) a detection is the source itself
/// (a variable star, a nuclear transient) and never flagged.
pub const CENTRED_PX: f64 = 1.5;
/// A detection beside a point source, out to [`RESIDUAL_REACH_FWHM`] FWHM of the difference's
/// PSF, whose |flux| is below this fraction of the source's is flagged `residual`.
pub const RESIDUAL_FRACTION: f64 = 0.02;
/// How far out, in FWHM of the difference's PSF, a star's residual reaches (on the default
/// night the stacks' residual peaks lay 1.9–3.9 px from their stars, FWHM about 3 px).
pub const RESIDUAL_REACH_FWHM: f64 = 1.5;
/// A source's peak must stand this many sky σ above the sky to be listed: fainter ones cannot
/// leave a residual of [`RESIDUAL_FRACTION`] that reaches a detection threshold.
const MIN_PEAK_SIGMA: f32 = 20.0;

/// A point source of the template: position on its grid (0-based pixels) and flux in the
/// template's ADU, `peak · 2πσ²` with σ the template PSF's Gaussian width. An extended source
/// (a galaxy) gets less than its total flux that way, so a transient on a galaxy is flagged
/// only where it is faint against the galaxy's core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointSource {
    pub x: f64,
    pub y: f64,
    pub flux: f64,
}

/// Point sources on a grid of square cells, for queries within a radius.
#[derive(Debug, Clone, Default)]
pub struct PointSources {
    cell: usize,
    cols: usize,
    rows: usize,
    grid: Vec<Vec<u32>>,
    list: Vec<PointSource>,
}

impl PointSources {
    /// `list` on a `w × h` frame.
    pub fn new(list: Vec<PointSource>, w: usize, h: usize) -> PointSources {
        let cell = 16usize;
        let (cols, rows) = (w.div_ceil(cell).max(1), h.div_ceil(cell).max(1));
        let mut grid = vec![Vec::new(); cols * rows];
        for (k, s) in list.iter().enumerate() {
            let (cx, cy) = ((s.x.max(0.0) as usize / cell).min(cols - 1), (s.y.max(0.0) as usize / cell).min(rows - 1));
            grid[cy * cols + cx].push(k as u32);
        }
        PointSources { cell, cols, rows, grid, list }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// All sources, in the order [`PointSources::within_indexed`] numbers them.
    pub fn all(&self) -> &[PointSource] {
        &self.list
    }

    /// The sources within `r` pixels of `(x, y)`.
    pub fn within(&self, x: f64, y: f64, r: f64) -> impl Iterator<Item = &PointSource> + '_ {
        self.within_indexed(x, y, r).map(|(_, s)| s)
    }

    /// The sources within `r` pixels of `(x, y)`, with their index in [`PointSources::all`].
    pub fn within_indexed(&self, x: f64, y: f64, r: f64) -> impl Iterator<Item = (usize, &PointSource)> + '_ {
        let c = self.cell as f64;
        let span = |v: f64, n: usize| {
            let lo = ((v - r) / c).floor().max(0.0) as usize;
            let hi = (((v + r) / c).floor().max(0.0) as usize).min(n.saturating_sub(1));
            lo..=hi
        };
        let (xs, ys) = (span(x, self.cols), span(y, self.rows));
        ys.flat_map(move |cy| xs.clone().map(move |cx| cy * self.cols + cx))
            .filter(|&i| i < self.grid.len())
            .flat_map(move |i| self.grid[i].iter().map(move |&k| (k as usize, &self.list[k as usize])))
            .filter(move |(_, s)| (s.x - x).hypot(s.y - y) <= r)
    }

    /// Whether a detection at `(x, y)` with `flux` (in the template's units times `scale`,
    /// the difference's units) is a bright source's residual: beside a source (more than
    /// [`CENTRED_PX`] and at most `reach` pixels from it) whose flux × `scale` exceeds
    /// |`flux`| / [`RESIDUAL_FRACTION`].
    pub fn is_residual(&self, x: f64, y: f64, flux: f64, scale: f64, reach: f64) -> bool {
        if !(flux.is_finite() && scale.is_finite() && scale > 0.0) {
            return false;
        }
        self.within(x, y, reach).any(|s| (s.x - x).hypot(s.y - y) > CENTRED_PX && flux.abs() < RESIDUAL_FRACTION * s.flux * scale)
    }
}

/// The template's point sources: every pixel that is the brightest of its 5 × 5 (ties to the
/// first in raster order), [`MIN_PEAK_SIGMA`] sky σ above the sky, with each of its four
/// neighbours above a quarter of its height (hot pixels are sharper), at the vertex of a
/// Gaussian through it and its neighbours, and not extended: the mean of its four neighbours
/// over its peak (`s₄`, sky subtracted) at most `q + 0.3 (1 − q)`, `q` the lower quartile of
/// `s₄` over all those peaks (a star's; a galaxy's light falls more slowly). On the default simulated night's template
/// (FWHM 2.4 px) stars had `s₄` 0.64–0.72 (5–95%), galaxies 0.76–0.90, the cut 0.75: a
/// supernova 2.4 px from the core of a galaxy of 9·10⁴ ADU is not a star's residual. The
/// matching kernel's leftovers are at a PSF's sharp core and wings, which a galaxy smooths.
/// `sigma`: the template PSF's Gaussian σ, pixels. Saturated stars are listed too (their flux
/// from the clipped peak is a lower bound, which only makes the flag rarer). Not
/// `image::isolated_stars`: that one keeps isolated, unsaturated stars to measure on
/// and stops at 400; residuals come from every bright star, crowded or saturated.
pub fn point_sources(img: &Image, sigma: f64) -> PointSources {
    let (w, h) = (img.width, img.height);
    let d = &img.data;
    let sample: Vec<f32> = d.iter().step_by(5).copied().filter(|v| v.is_finite()).collect();
    let Some((sky, sky_sigma)) = robust_stats(&sample) else { return PointSources::new(Vec::new(), w, h) };
    let floor = sky + MIN_PEAK_SIGMA * sky_sigma.max(f32::MIN_POSITIVE);
    let norm = 2.0 * std::f64::consts::PI * sigma * sigma;
    let mut list = Vec::new();
    let mut spread = Vec::new();
    if w < 5 || h < 5 {
        return PointSources::new(list, w, h);
    }
    for y in 2..h - 2 {
        for x in 2..w - 2 {
            let v = d[y * w + x];
            if !(v > floor) {
                continue;
            }
            let is_max = (y - 2..=y + 2).all(|yy| {
                (x - 2..=x + 2).all(|xx| {
                    let u = d[yy * w + xx];
                    !(u > v) && (u != v || (yy, xx) >= (y, x))
                })
            });
            let quarter = sky + 0.25 * (v - sky);
            if !is_max || ![d[y * w + x - 1], d[y * w + x + 1], d[(y - 1) * w + x], d[(y + 1) * w + x]].iter().all(|&u| u > quarter) {
                continue;
            }
            // The vertex of the parabola through the logarithms of the peak and its two
            // neighbours along each axis: exact for a Gaussian.
            let vertex = |a: f32, b: f32, c: f32| -> f64 {
                let (a, b, c) = (((a - sky) as f64).max(1e-3).ln(), ((b - sky) as f64).max(1e-3).ln(), ((c - sky) as f64).max(1e-3).ln());
                let den = a - 2.0 * b + c;
                if den < 0.0 { (0.5 * (a - c) / den).clamp(-0.5, 0.5) } else { 0.0 }
            };
            let dx = vertex(d[y * w + x - 1], v, d[y * w + x + 1]);
            let dy = vertex(d[(y - 1) * w + x], v, d[(y + 1) * w + x]);
            let around = [d[y * w + x - 1], d[y * w + x + 1], d[(y - 1) * w + x], d[(y + 1) * w + x]].iter().map(|&u| (u - sky) as f64).sum::<f64>();
            spread.push(around / 4.0 / (v - sky) as f64);
            list.push(PointSource { x: x as f64 + dx, y: y as f64 + dy, flux: (v - sky) as f64 * norm });
        }
    }
    let mut sorted = spread.clone();
    sorted.sort_by(f64::total_cmp);
    if let Some(&q) = sorted.get(sorted.len() / 4) {
        let cut = q + 0.3 * (1.0 - q);
        list = list.into_iter().zip(&spread).filter(|(_, &s)| s <= cut).map(|(p, _)| p).collect();
    }
    PointSources::new(list, w, h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::image::ImageHeader;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    fn image(w: usize, h: usize, data: Vec<f32>) -> Image {
        Image { path: "test.fits".into(), width: w, height: h, data, header: ImageHeader::default(), warnings: Vec::new() }
    }

    #[test]
    fn stars_are_found_with_their_flux_and_residuals_beside_them_are_told_from_variables() {
        let seed = crate::testing::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (w, h, sky, sigma) = (300usize, 300usize, 500.0f64, 1.3f64);
        let mut img = vec![sky as f32; w * h];
        // Stars on a grid, 2·10³–10⁶ ADU, anywhere within their pixel; one hot pixel.
        let mut truth = Vec::new();
        for k in 0..25 {
            let (cx, cy) = (30.0 + 60.0 * (k % 5) as f64 + rng.gen_range(-0.5..0.5), 30.0 + 60.0 * (k / 5) as f64 + rng.gen_range(-0.5..0.5));
            let flux = 2000.0 * 500f64.powf(k as f64 / 24.0);
            for y in cy as usize - 8..=cy as usize + 8 {
                for x in cx as usize - 8..=cx as usize + 8 {
                    let r2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
                    img[y * w + x] += (flux * (-0.5 * r2 / (sigma * sigma)).exp() / (2.0 * std::f64::consts::PI * sigma * sigma)) as f32;
                }
            }
            truth.push((cx, cy, flux));
        }
        img[60 * w + 60] += 30000.0;
        // Two galaxies (Gaussians of σ 3 px, 10⁵ ADU): extended, not listed.
        for (gx, gy) in [(60.0f64, 150.0f64), (120.0, 180.0)] {
            for y in gy as usize - 15..=gy as usize + 15 {
                for x in gx as usize - 15..=gx as usize + 15 {
                    let r2 = (x as f64 - gx).powi(2) + (y as f64 - gy).powi(2);
                    img[y * w + x] += (1e5 * (-0.5 * r2 / 9.0).exp() / (2.0 * std::f64::consts::PI * 9.0)) as f32;
                }
            }
        }
        for v in img.iter_mut() {
            *v += Normal::new(0.0, v.max(1.0).sqrt()).unwrap().sample(&mut rng) as f32;
        }
        let found = point_sources(&image(w, h, img), sigma);
        // Every bright star (peak over 100σ of sky: the faintest, 2000 / 2πσ² ≈ 190 ADU, is
        // 8σ; near the 20σ floor the spread of a star's `s₄` is a few percent, and some are cut
        // as extended, which matters little: faint stars leave no residual to flag) at its
        // position with its flux; not the hot pixel.
        for &(cx, cy, flux) in &truth {
            let near: Vec<&PointSource> = found.within(cx, cy, 1.0).collect();
            if flux / (2.0 * std::f64::consts::PI * sigma * sigma) > 100.0 * sky.sqrt() {
                assert_eq!(near.len(), 1, "seed {seed}: star of {flux:.0} at ({cx:.2}, {cy:.2}): {near:?}");
                assert!((near[0].x - cx).abs() < 0.3 && (near[0].y - cy).abs() < 0.3, "seed {seed}: {near:?} for ({cx:.2}, {cy:.2})");
                // The peak pixel of a centred star holds about a 1/(2πσ²) share; off-centre less.
                assert!(near[0].flux > 0.7 * flux && near[0].flux < 1.2 * flux, "seed {seed}: flux {} for {flux:.0}", near[0].flux);
            }
        }
        assert_eq!(found.within(60.0, 60.0, 2.0).count(), 0, "seed {seed}: the hot pixel is not a star");
        assert_eq!(found.within(60.0, 150.0, 3.0).count() + found.within(120.0, 180.0, 3.0).count(), 0, "seed {seed}: galaxies are not point sources");
        assert!(!found.is_residual(62.5, 150.0, 100.0, 1.0, 4.5), "seed {seed}: a supernova beside a galaxy's core");
        assert!(found.len() <= truth.len(), "seed {seed}: {} sources for {} stars", found.len(), truth.len());
        // The brightest star (10⁶ ADU): 0.5% of it 2.5 px away is its residual; 5% is not; the
        // star itself varying by 0.5% (centred) is not; nor 0.5% beside a faint star.
        let (cx, cy, flux) = truth[24];
        let reach = RESIDUAL_REACH_FWHM * 3.0;
        assert!(found.is_residual(cx + 2.5, cy, -0.005 * flux, 1.0, reach), "seed {seed}");
        assert!(!found.is_residual(cx + 2.5, cy, 0.05 * flux, 1.0, reach), "seed {seed}");
        assert!(!found.is_residual(cx + 0.4, cy - 0.3, 0.005 * flux, 1.0, reach), "seed {seed}");
        assert!(!found.is_residual(cx + 8.0, cy, 0.005 * flux, 1.0, reach), "seed {seed}: beyond the reach");
        // In units where the star is 10× brighter (the science frame's zero point), 5% is.
        assert!(found.is_residual(cx + 2.5, cy, 0.05 * flux, 10.0, reach), "seed {seed}");
        let (fx, fy, ff) = truth[0];
        assert!(!found.is_residual(fx + 2.5, fy, 0.005 * flux, 1.0, reach), "seed {seed}: beside a faint star {ff:.0}");
    }
}
