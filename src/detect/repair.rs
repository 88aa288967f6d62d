//! Cosmic rays and hot pixels found and repaired before an image is subtracted
//! ([`Image::repair_sharp`], on by default: [`super::FrameOptions::repair`]).
//!
//! Why: where the science frame is the sharper image, the kernel convolves it, and every cosmic
//! ray and hot pixel in it becomes a blob of the difference PSF's shape with the kernel's rings
//! around it. The `sharp` test on the science frame's own pixels ([`super::frame::sharp_in_science`])
//! flagged the blobs, but not their rings, and the catalogue carried them all: on night seed 2
//! (30 frames of 2048², 84 cosmic rays and 419 hot pixels each) 597 false positives per frame,
//! 504 of them at artifacts, and on its five frames with the sharper science twice as many
//! detections as on the others. Repaired first, a cosmic ray is gone before anything spreads it
//! (the practice of survey pipelines: Rubin repairs cosmic rays and interpolates over defects
//! before differencing). Pixels are repaired in both images, whichever is convolved; a
//! detection within [`NEAR_PX`] of one is flagged `sharp` ([`Repaired::near`]).
//!
//! The test is the one `sharp_in_science` applies ([`sharp_pixel`]): a pixel at ≥ 5σ above the
//! local sky, the brightest of its 3 × 3, whose faintest 4-neighbour falls short by 5σ of the
//! least share of a point source's brightest pixel its neighbour gets, `exp(−1/σ²)` for a PSF
//! of Gaussian σ ([`neighbour_floor`]; held under what the image's own stars show,
//! [`STAR_FLOOR_SHARE`]). Pixel integration only raises a star's neighbours, so no star is
//! taken. A cosmic ray's track is taken pixel by pixel: each pass tests the pixels within 2 px
//! of what the last one found, at [`GROW_SIGMA`] ([`MAX_PASSES`]); pixels found drop out of
//! every later test, as neighbours too. Once all are found, each takes the median of the linear
//! interpolations across it along its row, its column and its diagonals (the nearest good
//! pixels within [`INTERP_REACH`]). Saturated pixels are left to the saturation mask. Nothing
//! is repaired where more than [`MAX_REPAIRED_SHARE`] of the image would be.
//!
//! Written here, not taken from a crate: the test needs the image's PSF width and gain, and no
//! maintained Rust crate does cosmic-ray rejection (L.A.Cosmic, astroscrappy are Python/C).

use super::image::{robust_stats, Image};

/// Passes of the test: a cosmic-ray track is found a pixel or two further each pass.
pub const MAX_PASSES: usize = 32;
/// The test's threshold, σ, for pixels within 2 px of one already found: the rest of a
/// cosmic ray's track, whose pixels share its charge and may each be under 5σ (the matched
/// filter sums them). Only pixels beside one found are tested at it, so the pure-noise rate
/// of a 3σ deficit (about 1e-3 of those tested) repairs a pixel or two an image.
pub const GROW_SIGMA: f64 = 3.0;
/// A detection within this many pixels (Chebyshev) of a repaired pixel is flagged `sharp`.
pub const NEAR_PX: i64 = 2;
/// Farthest good pixel an interpolation across a repaired pixel reaches, pixels.
pub const INTERP_REACH: i64 = 4;
/// A σ too large takes the cores of bright stars, whose noise is small against any excess of
/// the floor over their true neighbour share: a seeing estimated from the image
/// (`Image::fwhm`, the area above half maximum) reads about 10% high on pixel-integrated
/// Gaussian stars, and on the subtraction harness's template (FWHM 2.5 px, read as 2.76) the
/// floor of that σ took 448 pixels at the cores of its brightest stars (false positives on
/// starlight 0.3 → 15 per image). So the floor is also held under what the image's own bright
/// isolated stars show (`Image::neighbour_floor`): this share of the 5th percentile of their
/// faintest-neighbour shares…
pub const STAR_FLOOR_SHARE: f64 = 0.9;
/// …where at least this many such stars are found;
pub const MIN_FLOOR_STARS: usize = 10;
/// else the floor is that of σ times this. (A margin on σ alone would cost faint hits: a lone
/// pixel must stand 5σ·√(1 + g²)/g above the sky, 24σ instead of 14σ at 0.8 of a σ of 1 px.)
pub const SIGMA_MARGIN: f64 = 0.8;
/// Above this share of an image's pixels the repair is undone (with a warning): that many sharp
/// pixels means the image is not what the test assumes (a PSF much narrower than its SEEING
/// says, an undersampled image), and repairing would cut into stars.
pub const MAX_REPAIRED_SHARE: f64 = 0.005;

/// Pixels repaired in an image, row-major indices in ascending order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Repaired {
    pub width: usize,
    pub pixels: Vec<usize>,
}

impl Repaired {
    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Whether a repaired pixel lies within `r` pixels of `(x, y)` along both axes.
    pub fn near(&self, x: i64, y: i64, r: i64) -> bool {
        if self.pixels.is_empty() || self.width == 0 {
            return false;
        }
        let w = self.width as i64;
        let (x0, x1) = ((x - r).max(0), (x + r).min(w - 1));
        if x0 > x1 {
            return false;
        }
        (y - r..=y + r).filter(|yy| *yy >= 0).any(|yy| {
            let lo = (yy * w + x0) as usize;
            let i = self.pixels.partition_point(|p| *p < lo);
            i < self.pixels.len() && self.pixels[i] <= (yy * w + x1) as usize
        })
    }

    /// The pixels of both (same width).
    pub fn union(&self, other: &Repaired) -> Repaired {
        let width = if self.width > 0 { self.width } else { other.width };
        let mut pixels: Vec<usize> = self.pixels.iter().chain(&other.pixels).copied().collect();
        pixels.sort_unstable();
        pixels.dedup();
        Repaired { width, pixels }
    }
}

const AROUND: [(i64, i64); 8] = [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)];
const CROSS: [(i64, i64); 4] = [(1, 0), (-1, 0), (0, 1), (0, -1)];

/// The ring 6–8 px out ([`ring_sky`]): 88 offsets.
fn ring_offsets() -> &'static [(i64, i64)] {
    static RING: std::sync::OnceLock<Vec<(i64, i64)>> = std::sync::OnceLock::new();
    RING.get_or_init(|| (-8i64..=8).flat_map(|dy| (-8i64..=8).map(move |dx| (dx, dy))).filter(|(dx, dy)| (36..=64).contains(&(dx * dx + dy * dy))).collect())
}

/// The local sky at `(xi, yi)` and its variance: median and (1.4826 MAD)² of the ring 6–8 px
/// out (as [`robust_stats`], on the stack: it runs for every candidate pixel of an image).
pub(crate) fn ring_sky(px: &dyn Fn(i64, i64) -> Option<f32>, xi: i64, yi: i64) -> Option<(f64, f64)> {
    let mut ring = [0f32; 96];
    let mut n = 0;
    for (dx, dy) in ring_offsets() {
        if let Some(v) = px(xi + dx, yi + dy) {
            ring[n] = v;
            n += 1;
        }
    }
    if n == 0 {
        return None;
    }
    let ring = &mut ring[..n];
    // The lower median, as `image::median`.
    let k = (n - 1) / 2;
    let sky = *ring.select_nth_unstable_by(k, f32::total_cmp).1;
    ring.iter_mut().for_each(|v| *v = (*v - sky).abs());
    let mad = *ring.select_nth_unstable_by(k, f32::total_cmp).1;
    let var = (1.4826 * mad as f64).powi(2);
    (var > 0.0).then_some((sky as f64, var))
}

/// Whether the pixel at `(x, y)` is far sharper than a PSF of Gaussian σ `sigma` allows (the
/// module's test), against `sky` and its variance `var_sky`; `gain` e⁻/ADU for the pixels' own
/// Poisson noise.
pub(crate) fn sharp_pixel(px: &dyn Fn(i64, i64) -> Option<f32>, x: i64, y: i64, sky: f64, var_sky: f64, gain: f64, sigma: f64) -> bool {
    sharp_pixel_at(px, x, y, sky, var_sky, gain, neighbour_floor(sigma), 5.0)
}

/// The least share of a point source's brightest pixel its faintest 4-neighbour gets, for a
/// Gaussian PSF of σ `sigma` sampled at pixel centres: `exp(−1/σ²)` (the source on the pixel's
/// edge, the neighbour 1.5 px from it, the brightest 0.5 px). Pixel integration only raises it.
pub fn neighbour_floor(sigma: f64) -> f64 {
    let sig = sigma.max(0.5);
    (-1.0 / (sig * sig)).exp()
}

/// [`sharp_pixel`] with the neighbour floor `g` given and at `k` σ rather than 5 (both the
/// pixel's height and its neighbour's deficit).
#[allow(clippy::too_many_arguments)]
fn sharp_pixel_at(px: &dyn Fn(i64, i64) -> Option<f32>, x: i64, y: i64, sky: f64, var_sky: f64, gain: f64, g: f64, k: f64) -> bool {
    let Some(p) = px(x, y) else { return false };
    let gain = if gain.is_finite() && gain > 0.0 { gain } else { 1.0 };
    let var = |v: f64| var_sky + v.max(0.0) / gain;
    let v = p as f64 - sky;
    if v < k * var(v).sqrt() {
        return false;
    }
    // Only at a local maximum: off a star's peak its light falls faster than `g`.
    if AROUND.iter().any(|(ox, oy)| px(x + ox, y + oy).is_some_and(|n| n > p)) {
        return false;
    }
    let nmin = CROSS.iter().filter_map(|(ox, oy)| px(x + ox, y + oy)).map(|n| n as f64 - sky).fold(f64::INFINITY, f64::min);
    nmin.is_finite() && g * v - nmin > k * (var(nmin) + g * g * var(v)).sqrt()
}

/// Find and repair sharp pixels of `data` (`w × h`, ADU with the sky, NaN where there is no
/// data) in place; `g` the least share of a star's brightest pixel its faintest 4-neighbour
/// gets ([`neighbour_floor`]), `gain` e⁻/ADU, pixels at or above `saturate`
/// left alone. Returns the repaired pixels (none, and `data` untouched, when they would exceed
/// [`MAX_REPAIRED_SHARE`]: `Err` with their count).
pub fn repair_data(data: &mut [f32], w: usize, h: usize, gain: f64, g: f64, saturate: Option<f32>) -> Result<Repaired, usize> {
    let none = Repaired { width: w, pixels: Vec::new() };
    if w < 3 || h < 3 || data.len() != w * h || !(g > 0.0 && g < 1.0) {
        return Ok(none);
    }
    let sat = saturate.unwrap_or(f32::INFINITY);
    // The sky's σ from a sample of about 10⁵ pixels.
    let step = (w * h / 100_000).max(1);
    let sample: Vec<f32> = data.iter().step_by(step).copied().filter(|v| v.is_finite()).collect();
    let Some((_, sigma_sky)) = robust_stats(&sample) else { return Ok(none) };
    // A cheap first cut, looser than the test: a pixel it takes is a local maximum whose faintest
    // 4-neighbour it exceeds by 5 local σ (sky noise and no less), so by more than 4 global σ
    // wherever the local sky noise is at least 0.8 of the global. The 4-neighbours first (most
    // pixels stop there), the rest of the 3 × 3 only for those that pass; the frame's edge
    // pixels go through the same test with their neighbours inside the frame.
    let cut = 4.0 * sigma_sky;
    let (wi, hi) = (w as i64, h as i64);
    let passes = |x: usize, y: usize| -> bool {
        let p = data[y * w + x];
        if !p.is_finite() || p >= sat {
            return false;
        }
        let mut nmin = f32::INFINITY;
        for (ox, oy) in CROSS {
            let (xx, yy) = (x as i64 + ox, y as i64 + oy);
            if xx >= 0 && yy >= 0 && xx < wi && yy < hi {
                let n = data[(yy * wi + xx) as usize];
                if n.is_finite() {
                    nmin = nmin.min(n);
                }
            }
        }
        if !(p - nmin > cut) {
            return false;
        }
        AROUND.iter().all(|(ox, oy)| {
            let (xx, yy) = (x as i64 + ox, y as i64 + oy);
            xx < 0 || yy < 0 || xx >= wi || yy >= hi || !(data[(yy * wi + xx) as usize] > p)
        })
    };
    let scan = |y0: usize, y1: usize| -> Vec<usize> {
        let mut out = Vec::new();
        for y in y0..y1 {
            if y == 0 || y == h - 1 {
                out.extend((0..w).filter(|&x| passes(x, y)).map(|x| y * w + x));
                continue;
            }
            if passes(0, y) {
                out.push(y * w);
            }
            // Inside the frame: the 4-neighbours' minimum without bounds checks.
            let (up, row, down) = (&data[(y - 1) * w..y * w], &data[y * w..(y + 1) * w], &data[(y + 1) * w..(y + 2) * w]);
            for x in 1..w - 1 {
                let p = row[x];
                // NaN neighbours lose in `min` (f32::min returns the other), NaN `p` fails the `>`.
                let nmin = up[x].min(down[x]).min(row[x - 1]).min(row[x + 1]);
                if p - nmin > cut && passes(x, y) {
                    out.push(y * w + x);
                }
            }
            if passes(w - 1, y) {
                out.push(y * w + w - 1);
            }
        }
        out
    };
    // Bands of rows on every core (the scan and the first pass are most of the cost: ~20 ns a
    // pixel on one core).
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16).min(h.div_ceil(64));
    let candidates: Vec<usize> = if threads <= 1 {
        scan(0, h)
    } else {
        let band = h.div_ceil(threads);
        std::thread::scope(|sc| {
            let jobs: Vec<_> = (0..threads).map(|t| sc.spawn(move || scan((t * band).min(h), ((t + 1) * band).min(h)))).collect();
            jobs.into_iter().flat_map(|j| j.join().expect("repair scan")).collect()
        })
    };
    // Flagged pixels drop out of every later test (as neighbours too: a star beside a hot pixel
    // is judged on its own pixels), and are repaired once all are found.
    let mut flagged = vec![false; w * h];
    let mut found_all: Vec<usize> = Vec::new();
    let mut candidates = candidates;
    for pass in 0..MAX_PASSES {
        let k = if pass == 0 { 5.0 } else { GROW_SIGMA };
        let found: Vec<usize> = {
            let (d, f): (&[f32], &[bool]) = (data, &flagged);
            let px = |x: i64, y: i64| -> Option<f32> {
                if x < 0 || y < 0 || x >= wi || y >= hi || f[(y * wi + x) as usize] {
                    return None;
                }
                Some(d[(y * wi + x) as usize]).filter(|v| v.is_finite())
            };
            let test = |part: &[usize]| -> Vec<usize> {
                part.iter()
                    .copied()
                    .filter(|&i| !f[i] && d[i] < sat)
                    .filter(|&i| {
                        let (x, y) = ((i % w) as i64, (i / w) as i64);
                        ring_sky(&px, x, y).is_some_and(|(sky, var)| sharp_pixel_at(&px, x, y, sky, var, gain, g, k))
                    })
                    .collect()
            };
            if threads <= 1 || candidates.len() < 4096 {
                test(&candidates)
            } else {
                let test = &test;
                std::thread::scope(|sc| {
                    let jobs: Vec<_> = candidates.chunks(candidates.len().div_ceil(threads)).map(|part| sc.spawn(move || test(part))).collect();
                    jobs.into_iter().flat_map(|j| j.join().expect("repair test")).collect()
                })
            }
        };
        if found.is_empty() {
            break;
        }
        for &i in &found {
            flagged[i] = true;
        }
        found_all.extend(&found);
        if found_all.len() as f64 > MAX_REPAIRED_SHARE * (w * h) as f64 {
            return Err(found_all.len());
        }
        // The next pass tests the pixels within 2 of what this one found, at `GROW_SIGMA`.
        let mut next: Vec<usize> = Vec::new();
        for &i in &found {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for (xx, yy) in (y - 2..=y + 2).flat_map(|yy| (x - 2..=x + 2).map(move |xx| (xx, yy))) {
                if xx >= 0 && yy >= 0 && xx < wi && yy < hi && !flagged[(yy * wi + xx) as usize] {
                    next.push((yy * wi + xx) as usize);
                }
            }
        }
        next.sort_unstable();
        next.dedup();
        candidates = next;
    }
    let values: Vec<f32> = found_all.iter().map(|&i| interpolate(data, &flagged, w, h, i)).collect();
    for (&i, v) in found_all.iter().zip(values) {
        data[i] = v;
    }
    let mut pixels = found_all;
    pixels.sort_unstable();
    Ok(Repaired { width: w, pixels })
}

/// The value a repaired pixel takes: the median of the linear interpolations across it along its
/// row, its column and both diagonals, each between the nearest unflagged finite pixels within
/// [`INTERP_REACH`] on its two sides (the median: along a cosmic ray's track an interpolation
/// may take what is left of the track's charge, across it the sky); with none, the median of
/// the unflagged pixels within 2 px; else NaN (no data).
fn interpolate(data: &[f32], flagged: &[bool], w: usize, h: usize, i: usize) -> f32 {
    let (wi, hi) = (w as i64, h as i64);
    let (x, y) = ((i % w) as i64, (i / w) as i64);
    let good = |xx: i64, yy: i64| -> Option<f32> {
        if xx < 0 || yy < 0 || xx >= wi || yy >= hi {
            return None;
        }
        let j = (yy * wi + xx) as usize;
        (!flagged[j]).then_some(data[j]).filter(|v| v.is_finite())
    };
    let side = |dx: i64, dy: i64| (1..=INTERP_REACH).find_map(|k| good(x + k * dx, y + k * dy).map(|v| (k as f64, v as f64)));
    let mut across: Vec<f64> = [(1, 0), (0, 1), (1, 1), (1, -1)]
        .iter()
        .filter_map(|&(dx, dy)| match (side(dx, dy), side(-dx, -dy)) {
            (Some((ka, va)), Some((kb, vb))) => Some((va * kb + vb * ka) / (ka + kb)),
            _ => None,
        })
        .collect();
    if !across.is_empty() {
        across.sort_by(f64::total_cmp);
        let n = across.len();
        return (0.5 * (across[(n - 1) / 2] + across[n / 2])) as f32;
    }
    let near: Vec<f32> = (-2..=2).flat_map(|dy| (-2..=2).filter_map(move |dx| good(x + dx, y + dy))).collect();
    super::image::median(near).unwrap_or(f32::NAN)
}

impl Image {
    /// Find and repair this image's cosmic rays and hot pixels in place (the module's test, with
    /// the image's seeing and gain). Nothing is repaired where the seeing is unknown and cannot
    /// be estimated, or where the test takes too many pixels ([`MAX_REPAIRED_SHARE`], logged).
    pub fn repair_sharp(&mut self) -> Repaired {
        let t0 = std::time::Instant::now();
        let none = Repaired { width: self.width, pixels: Vec::new() };
        // The stars are found once: for the seeing where the header has none, and for the floor.
        let stars = super::image::isolated_stars(self, super::image::FWHM_STAR_RADIUS);
        let fwhm = match (self.header.seeing, &stars) {
            (Some(s), _) => s,
            (None, Some(st)) => match super::image::estimate_fwhm_from(self, st) {
                Some(f) => f,
                None => return none,
            },
            (None, None) => return none,
        };
        let gain = self.gain_or_estimate();
        let sat = self.header.saturate.map(|s| s as f32 * 0.999);
        let g = self.neighbour_floor(fwhm / super::frame::FWHM_PER_SIGMA, stars.as_ref());
        let (w, h) = (self.width, self.height);
        match repair_data(&mut self.data, w, h, gain, g, sat) {
            Ok(r) => {
                tracing::debug!(file = %self.path.display(), pixels = r.len(), g, s = t0.elapsed().as_secs_f64(), "cosmic rays and hot pixels repaired");
                r
            }
            Err(n) => {
                tracing::warn!(file = %self.path.display(), "{n} pixels look sharper than a PSF of FWHM {fwhm:.2} px allows (more than {:.1}% of the image): none repaired; is SEEING right?", 100.0 * MAX_REPAIRED_SHARE);
                none
            }
        }
    }

    /// The neighbour floor the test uses on this image: [`neighbour_floor`] of the PSF's σ, or
    /// less where the image's own bright stars show less ([`STAR_FLOOR_SHARE`] of the 5th
    /// percentile of their faintest-neighbour shares, with at least [`MIN_FLOOR_STARS`]);
    /// without that many stars (or none found: `stars`, those the seeing is estimated from), of
    /// [`SIGMA_MARGIN`] × σ.
    fn neighbour_floor(&self, sigma: f64, stars: Option<&super::image::Stars>) -> f64 {
        let model = neighbour_floor(sigma);
        let Some(stars) = stars else { return neighbour_floor(SIGMA_MARGIN * sigma) };
        let w = self.width;
        let mut shares: Vec<f64> = stars
            .at
            .iter()
            .filter_map(|&(x, y)| {
                let p = (self.data[y * w + x] - stars.sky) as f64;
                let n = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)].iter().map(|&(xx, yy)| (self.data[yy * w + xx] - stars.sky) as f64).fold(f64::INFINITY, f64::min);
                (p > 0.0 && n.is_finite()).then(|| n / p)
            })
            .collect();
        if shares.len() < MIN_FLOOR_STARS {
            return neighbour_floor(SIGMA_MARGIN * sigma);
        }
        shares.sort_by(f64::total_cmp);
        let low = shares[shares.len() / 20];
        model.min(STAR_FLOOR_SHARE * low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal, Poisson};

    /// A 256² frame: sky 500 ADU (gain 1), Gaussian stars of σ `sigma` drawn pixel-integrated
    /// (sub-sampled 5 × 5) at random sub-pixel positions, flux 2·10³–10⁶ e⁻, Poisson noise.
    fn frame(seed: u64, sigma: f64) -> (Vec<f32>, usize, Vec<(f64, f64)>) {
        let w = 256;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut expect = vec![500.0f64; w * w];
        let mut stars = Vec::new();
        for _ in 0..60 {
            let (cx, cy) = (rng.gen_range(12.0..w as f64 - 12.0), rng.gen_range(12.0..w as f64 - 12.0));
            let flux = 10f64.powf(rng.gen_range(3.3..6.0));
            stars.push((cx, cy));
            for y in (cy as usize - 10)..(cy as usize + 11) {
                for x in (cx as usize - 10)..(cx as usize + 11) {
                    let mut s = 0.0;
                    for sy in 0..5 {
                        for sx in 0..5 {
                            let (dx, dy) = (x as f64 - 0.4 + 0.2 * sx as f64 - cx, y as f64 - 0.4 + 0.2 * sy as f64 - cy);
                            s += (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp();
                        }
                    }
                    expect[y * w + x] += flux * s / 25.0 / (2.0 * std::f64::consts::PI * sigma * sigma);
                }
            }
        }
        let data = expect.iter().map(|&m| Poisson::new(m).unwrap().sample(&mut rng) as f32).collect();
        (data, w, stars)
    }

    #[test]
    fn cosmic_rays_and_hot_pixels_are_repaired_and_stars_are_not() {
        for (seed, sigma) in [(1u64, 0.85), (2, 1.0), (3, 1.3), (4, 2.0)] {
            let (mut data, w, stars) = frame(seed, sigma);
            let clean = data.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + seed);
            // Hot pixels (single pixels of 1000–20 000 ADU) and cosmic-ray tracks (2–6 px, 5000–
            // 20 000 ADU shared along the track), away from the stars' cores. (The test sees a
            // pixel from about 5σ·√(1 + g²)/g: 21σ of sky, 460 ADU, at σ 0.85, where g = 0.25.)
            let mut hit: Vec<usize> = Vec::new();
            let clear = |x: usize, y: usize| stars.iter().all(|(sx, sy)| (sx - x as f64).hypot(sy - y as f64) > 6.0 * sigma + 3.0);
            while hit.len() < 40 {
                let (x, y) = (rng.gen_range(10..w - 10), rng.gen_range(10..w - 10));
                if !clear(x, y) {
                    continue;
                }
                data[y * w + x] += rng.gen_range(1000.0..20_000.0);
                hit.push(y * w + x);
            }
            let mut tracks = 0;
            while tracks < 15 {
                let (x0, y0) = (rng.gen_range(20.0..w as f64 - 20.0), rng.gen_range(20.0..w as f64 - 20.0));
                if !clear(x0 as usize, y0 as usize) {
                    continue;
                }
                let (len, ang, total) = (rng.gen_range(2.0..6.0f64), rng.gen_range(0.0..std::f64::consts::PI), rng.gen_range(5000.0..20_000.0));
                let steps = (2.0 * len).ceil() as usize;
                let mut mine = Vec::new();
                for s in 0..steps {
                    let t = s as f64 / (steps - 1) as f64 * len;
                    let (px, py) = ((x0 + t * ang.cos()).round() as usize, (y0 + t * ang.sin()).round() as usize);
                    data[py * w + px] += (total / steps as f64) as f32;
                    mine.push(py * w + px);
                }
                mine.sort_unstable();
                mine.dedup();
                hit.extend(mine);
                tracks += 1;
            }
            let before = data.clone();
            let r = repair_data(&mut data, w, w, 1.0, neighbour_floor(sigma), None).expect("within the share");
            // Every star's 5 × 5 core untouched.
            for (sx, sy) in &stars {
                for y in (*sy as i64 - 2)..=(*sy as i64 + 2) {
                    for x in (*sx as i64 - 2)..=(*sx as i64 + 2) {
                        let i = (y * w as i64 + x) as usize;
                        assert_eq!(data[i], before[i], "seed {seed}, σ {sigma}: a star's pixel ({x}, {y}) was repaired");
                    }
                }
            }
            // What was hit comes back to the clean image within its noise (pixels hit by less
            // than 5σ may stay), and nothing else moved.
            let sky_sigma = 500f32.sqrt();
            let mut left = 0;
            for &i in &hit {
                if (data[i] - clean[i]).abs() > 5.0 * sky_sigma {
                    left += 1;
                }
            }
            assert!(left <= 2, "seed {seed}, σ {sigma}: {left} of {} hit pixels still stand out; {} repaired", hit.len(), r.len());
            let stray = r.pixels.iter().filter(|i| !hit.contains(i)).count();
            assert!(stray <= 2, "seed {seed}, σ {sigma}: {stray} pixels repaired that nothing hit");
            for i in 0..w * w {
                if !r.pixels.contains(&i) {
                    assert_eq!(data[i], before[i]);
                }
            }
            // Every repaired pixel is `near` itself, and nothing is near far from them all.
            let &p = r.pixels.first().expect("something repaired");
            assert!(r.near((p % w) as i64, (p / w) as i64, 0));
            assert!(!Repaired { width: w, pixels: vec![5 * w + 5] }.near(9, 5, 2) && Repaired { width: w, pixels: vec![5 * w + 5] }.near(7, 3, 2));
        }
    }

    #[test]
    fn a_seeing_that_reads_high_takes_no_star_as_its_own_stars_bound_the_floor() {
        // Stars of σ 1.06 px (FWHM 2.5) whose header says FWHM 2.9: the floor of that σ (0.52)
        // is above what pixel-integrated stars of the true σ give their faintest neighbour
        // (about 0.44), and their bright cores would be taken; the stars' own shares hold it.
        let sigma = 1.06;
        let (data, w, stars) = frame(21, sigma);
        let mut header = super::super::image::ImageHeader { gain: Some(1.0), seeing: Some(2.9), ..Default::default() };
        let img = |data: Vec<f32>, header: &super::super::image::ImageHeader| Image { path: "test.fits".into(), width: w, height: w, data, header: header.clone(), warnings: Vec::new() };
        let im0 = img(data.clone(), &header);
        let floor = im0.neighbour_floor(2.9 / super::super::frame::FWHM_PER_SIGMA, super::super::image::isolated_stars(&im0, 7).as_ref());
        assert!(floor < neighbour_floor(2.9 / super::super::frame::FWHM_PER_SIGMA) && floor < 0.44, "floor {floor}");
        let mut with_hot = data.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let mut hot = Vec::new();
        while hot.len() < 20 {
            let (x, y) = (rng.gen_range(10..w - 10), rng.gen_range(10..w - 10));
            if stars.iter().all(|(sx, sy)| (sx - x as f64).hypot(sy - y as f64) > 10.0) {
                with_hot[y * w + x] += 5000.0;
                hot.push(y * w + x);
            }
        }
        let mut im = img(with_hot, &header);
        let r = im.repair_sharp();
        // Every hot pixel; beside them, at most a noise pixel or two that the 3σ pass takes;
        // nothing on a star.
        assert!(hot.iter().all(|p| r.pixels.contains(p)), "{:?} of {hot:?}", r.pixels);
        let beside = |p: usize| hot.iter().any(|&q| (p % w).abs_diff(q % w) <= 2 && (p / w).abs_diff(q / w) <= 2);
        assert!(r.pixels.iter().all(|&p| beside(p)) && r.pixels.len() <= hot.len() + 2, "{:?}", r.pixels);
        // Without enough stars to bound it, the floor is that of 0.8 σ.
        header.seeing = Some(2.9);
        let sparse = Image { data: vec![500.0; w * w], ..img(data, &header) };
        assert_eq!(sparse.neighbour_floor(1.2, super::super::image::isolated_stars(&sparse, 7).as_ref()), neighbour_floor(SIGMA_MARGIN * 1.2));
    }

    #[test]
    fn pure_noise_loses_no_pixel_and_too_many_sharp_pixels_repair_none() {
        // Pure Gaussian noise of any level: a 5σ deficit against a 5σ pixel cannot happen.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = Normal::new(1000.0f32, 30.0).unwrap();
        let mut data: Vec<f32> = (0..512 * 512).map(|_| n.sample(&mut rng)).collect();
        let r = repair_data(&mut data, 512, 512, 1.0, neighbour_floor(1.0), None).unwrap();
        assert!(r.is_empty(), "{} noise pixels repaired", r.len());
        // More sharp pixels than MAX_REPAIRED_SHARE of the image: nothing is repaired.
        let (mut data, w, _) = frame(9, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..(MAX_REPAIRED_SHARE * (w * w) as f64 * 1.5) as usize {
            let i = rng.gen_range(0..w * w);
            data[i] += 5000.0;
        }
        let before = data.clone();
        let r = repair_data(&mut data, w, w, 1.0, neighbour_floor(1.0), None);
        assert!(matches!(r, Err(n) if n as f64 > MAX_REPAIRED_SHARE * (w * w) as f64), "{r:?}");
        assert_eq!(data, before);
    }
}
