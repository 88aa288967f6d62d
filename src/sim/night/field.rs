//! The static sky of a field and its detector: stars with number counts dN/dm ∝ 10^(slope·m)
//! (0.3 for stars spread uniformly in a disc; a few percent of the brightest saturate), galaxies
//! with Sérsic profiles (their intrinsic images are made once and convolved per epoch), and the
//! detector's fixed defects: hot pixels and one bad column.

use rand::Rng;

use super::psf::{Psf, Stamp};
use super::{rng_for, SimConfig};

#[derive(Debug, Clone)]
pub struct Star {
    pub id: u64,
    pub x: f64,
    pub y: f64,
    pub mag: f64,
}

#[derive(Debug, Clone)]
pub struct Galaxy {
    pub id: u64,
    pub x: f64,
    pub y: f64,
    pub mag: f64,
    /// Half-light radius along the major axis, pixels.
    pub r_eff: f64,
    pub sersic_n: f64,
    /// Axis ratio b/a.
    pub q: f64,
    pub theta: f64,
    /// Unit-sum intrinsic image on the frame's pixel grid, truncated at 4 r_eff (at most 30 px).
    pub intrinsic: Stamp,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub stars: Vec<Star>,
    pub galaxies: Vec<Galaxy>,
    /// (pixel index y·width + x, excess ADU), the same in every science frame.
    pub hot_pixels: Vec<(usize, f64)>,
    pub bad_column: Option<usize>,
}

/// First id of each population, so that ids say what a source is.
pub const STAR_ID0: u64 = 1;
pub const GALAXY_ID0: u64 = 1_000_000;
pub const TRANSIENT_ID0: u64 = 2_000_000;
pub const VARIABLE_ID0: u64 = 3_000_000;

/// A magnitude from dN/dm ∝ 10^(a m) on [m1, m2] (inverse CDF).
pub fn draw_mag(rng: &mut impl Rng, a: f64, m1: f64, m2: f64) -> f64 {
    if a.abs() < 1e-9 || m2 <= m1 {
        return rng.gen_range(m1..=m2);
    }
    let (lo, hi) = (10f64.powf(a * m1), 10f64.powf(a * m2));
    (lo + rng.gen::<f64>() * (hi - lo)).log10() / a
}

/// b_n of the Sérsic profile, so that r_eff encloses half the light (Ciotti & Bertin 1999).
fn sersic_b(n: f64) -> f64 {
    2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)
}

/// Unit-sum Sérsic image centred at (x, y), on the frame's grid.
pub fn sersic_stamp(x: f64, y: f64, r_eff: f64, n: f64, q: f64, theta: f64) -> Stamp {
    let r = (4.0 * r_eff).clamp(3.0, 30.0).ceil() as i64;
    let b = sersic_b(n);
    let (c, s) = (theta.cos(), theta.sin());
    let f = |dx: f64, dy: f64| {
        let u = dx * c + dy * s;
        let v = (-dx * s + dy * c) / q;
        let rr = (u * u + v * v).sqrt() / r_eff;
        (-b * (rr.powf(1.0 / n) - 1.0)).exp()
    };
    // The cusp of high-n profiles needs subsampling near the centre.
    Stamp::render(x, y, r, 2.0, 5, f)
}

impl Field {
    pub fn generate(cfg: &SimConfig) -> Field {
        let mut rng = rng_for(cfg.seed, 1, 0);
        let (w, h) = (cfg.width as f64, cfg.height as f64);
        let sc = &cfg.stars;
        let n_stars = (sc.per_mpix * cfg.mpix()).round() as usize;
        let stars = (0..n_stars)
            .map(|i| Star {
                id: STAR_ID0 + i as u64,
                x: rng.gen_range(0.0..w - 1.0),
                y: rng.gen_range(0.0..h - 1.0),
                mag: draw_mag(&mut rng, sc.slope, sc.mag_bright, sc.mag_faint),
            })
            .collect();
        let gc = &cfg.galaxies;
        let margin = 10.0f64.min(w / 4.0);
        let n_gal = (gc.per_mpix * cfg.mpix()).round() as usize;
        let galaxies = (0..n_gal)
            .map(|i| {
                let x = rng.gen_range(margin..w - margin);
                let y = rng.gen_range(margin..h - margin);
                let r_eff = rng.gen_range(gc.r_eff_range[0]..=gc.r_eff_range[1]);
                let sersic_n = rng.gen_range(gc.sersic_n_range[0]..=gc.sersic_n_range[1]);
                let q = rng.gen_range(gc.axis_ratio_min.clamp(0.05, 1.0)..=1.0);
                let theta = rng.gen_range(0.0..std::f64::consts::PI);
                Galaxy {
                    id: GALAXY_ID0 + i as u64,
                    x,
                    y,
                    mag: rng.gen_range(gc.mag_range[0]..=gc.mag_range[1]),
                    r_eff,
                    sersic_n,
                    q,
                    theta,
                    intrinsic: sersic_stamp(x, y, r_eff, sersic_n, q, theta),
                }
            })
            .collect();
        let ac = &cfg.artifacts;
        let npix = cfg.width * cfg.height;
        let n_hot = (ac.hot_pixel_fraction * npix as f64).round() as usize;
        let hot_pixels = (0..n_hot)
            .map(|_| (rng.gen_range(0..npix), rng.gen_range(ac.hot_pixel_adu[0]..=ac.hot_pixel_adu[1])))
            .collect();
        let bad_column = ac.bad_column.then(|| rng.gen_range(cfg.width / 8..cfg.width - cfg.width / 8));
        Field { stars, galaxies, hot_pixels, bad_column }
    }

    /// Stars whose peak pixel saturates at median seeing and mid-range sky.
    pub fn saturated_stars(&self, cfg: &SimConfig) -> usize {
        let o = &cfg.observing;
        let psf = Psf::round(o.seeing_median_px, 0.5 * (o.beta_range[0] + o.beta_range[1]), 1, 1);
        let peak = psf.point(0.0, 0.0, 3.0).data.iter().cloned().fold(0.0, f64::max);
        let sky = 0.5 * (o.sky_range[0] + o.sky_range[1]);
        self.stars
            .iter()
            .filter(|s| sky + peak * 10f64.powf(-0.4 * (s.mag - o.zero_point)) > cfg.camera.saturate)
            .count()
    }
}
