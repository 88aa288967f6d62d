//! One science frame: the sky (a level and a plane gradient), every source rendered through the
//! epoch's PSF into stamps around it, Poisson noise on the electrons and Gaussian read noise, the
//! detector's hot pixels and bad column, cosmic rays, and saturation. Also the truth of every
//! source in the frame, with the optimal SNR of what a difference image would show.

use rand::Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};

use super::field::Field;
use super::psf::{Psf, Stamp};
use super::template::Template;
use super::transients::Population;
use super::{rng_for, SimConfig};

/// Ids of artifacts in the truth table.
pub const COSMIC_ID0: u64 = 4_000_000;
pub const HOT_PIXEL_ID0: u64 = 5_000_000;
pub const BAD_COLUMN_ID: u64 = 6_000_000;

/// One source (or artifact) in one frame, as the truth table records it.
#[derive(Debug, Clone)]
pub struct TruthRow {
    pub id: u64,
    pub kind: &'static str,
    pub host: Option<u64>,
    /// Position on the template's pixel grid (0-based).
    pub x: f64,
    pub y: f64,
    /// Flux in this frame, ADU at its MAGZP.
    pub flux: f64,
    /// The same source's flux in the template, in this frame's units (flux − ref_flux is what the
    /// difference image holds).
    pub ref_flux: f64,
    /// Optimal SNR of flux − ref_flux; None for artifacts.
    pub snr: Option<f64>,
    /// Magnitude of `flux` at the frame's zero point (None when there is no flux).
    pub mag: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Frame {
    pub index: usize,
    /// Start of the exposure (`MJD-OBS`).
    pub mjd: f64,
    /// Mid-exposure: when light curves are evaluated (the truth table's `mjd`).
    pub mjd_mid: f64,
    pub psf: Psf,
    /// Sky at the frame centre, ADU.
    pub sky: f64,
    pub zero_point: f64,
    /// Offset of this frame's grid from the template's, pixels.
    pub dx: f64,
    pub dy: f64,
    pub image: Vec<f32>,
    /// The noise-free image (sky and sources, no artifacts), for variances.
    pub expected: Vec<f32>,
    pub truth: Vec<TruthRow>,
}

/// Replace each expected value (ADU) by a draw: Poisson on `gain`·value electrons plus
/// `read_noise` electrons of Gaussian noise, back in ADU. Row bands of 64 are seeded apart and
/// spread over threads, so the result does not depend on the thread count.
pub fn add_noise(image: &mut [f32], width: usize, gain: f64, read_noise: f64, seed: u64, tag: u64) {
    const BAND_ROWS: usize = 64;
    let mut bands: Vec<(usize, &mut [f32])> = image.chunks_mut(BAND_ROWS * width).enumerate().collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    let per = bands.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for part in bands.chunks_mut(per) {
            s.spawn(move || {
                for (b, band) in part.iter_mut() {
                    let mut rng = rng_for(seed, tag, *b as u64);
                    for v in band.iter_mut() {
                        let e = *v as f64 * gain;
                        let p = if e > 0.0 {
                            match Poisson::new(e) {
                                Ok(d) => d.sample(&mut rng),
                                Err(_) => e,
                            }
                        } else {
                            0.0
                        };
                        let r: f64 = rng.sample(StandardNormal);
                        *v = ((p + read_noise * r) / gain) as f32;
                    }
                }
            });
        }
    });
}

/// The noise-free image of the static sky (plus whatever `extra` adds) through `psf`, on a grid
/// offset by (dx, dy), at zero point `zp`, over a sky `sky(x, y)`.
pub fn render_static(
    cfg: &SimConfig,
    field: &Field,
    psf: &Psf,
    zp: f64,
    dx: f64,
    dy: f64,
    sky: &dyn Fn(usize, usize) -> f64,
) -> Vec<f32> {
    let (w, h) = (cfg.width, cfg.height);
    let mut img = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            img[y * w + x] = sky(x, y) as f32;
        }
    }
    for s in &field.stars {
        let flux = 10f64.powf(-0.4 * (s.mag - zp));
        let (x, y) = (s.x + dx, s.y + dy);
        let stamp = psf.point(x, y, psf.radius_for(psf.fwhm_at(x, y), flux));
        stamp.add_to(&mut img, w, h, flux);
    }
    for g in &field.galaxies {
        let flux = 10f64.powf(-0.4 * (g.mag - zp));
        let radius = psf.radius_for(psf.fwhm_at(g.x + dx, g.y + dy), flux);
        psf.convolve(&g.intrinsic, g.x, g.y, dx, dy, radius).add_to(&mut img, w, h, flux);
    }
    img
}

/// Simulate science epoch `i`.
pub fn render(cfg: &SimConfig, field: &Field, pop: &Population, tmpl: &Template, i: usize) -> Frame {
    let mut rng = rng_for(cfg.seed, 3, i as u64);
    let o = &cfg.observing;
    let c = &cfg.camera;
    let (w, h) = (cfg.width, cfg.height);
    let mjd = cfg.epoch_mjd(i);
    let mjd_mid = mjd + 0.5 * c.exptime / 86400.0;
    let psf = Psf::draw(&mut rng, o, w, h);
    let sky0 = rng.gen_range(o.sky_range[0]..=o.sky_range[1]);
    let ga = rng.gen_range(0.0..std::f64::consts::TAU);
    let (gx, gy) = (o.sky_gradient * ga.cos(), o.sky_gradient * ga.sin());
    let zp = o.zero_point - if o.extinction_max > 0.0 { rng.gen_range(0.0..o.extinction_max) } else { 0.0 };
    let (dx, dy) = if o.jitter_px > 0.0 {
        (rng.gen_range(-o.jitter_px..=o.jitter_px), rng.gen_range(-o.jitter_px..=o.jitter_px))
    } else {
        (0.0, 0.0)
    };
    let sky = |x: usize, y: usize| sky0 * (1.0 + gx * (x as f64 / w as f64 - 0.5) + gy * (y as f64 / h as f64 - 0.5));
    let mut img = render_static(cfg, field, &psf, zp, dx, dy, &sky);

    let mag_of = |f: f64| (f > 0.0).then(|| zp - 2.5 * f.log10());
    let mut truth = Vec::new();
    for s in &field.stars {
        let f = 10f64.powf(-0.4 * (s.mag - zp));
        truth.push(TruthRow { id: s.id, kind: "star", host: None, x: s.x, y: s.y, flux: f, ref_flux: f, snr: Some(0.0), mag: Some(s.mag) });
    }
    for g in &field.galaxies {
        let f = 10f64.powf(-0.4 * (g.mag - zp));
        truth.push(TruthRow { id: g.id, kind: "galaxy", host: None, x: g.x, y: g.y, flux: f, ref_flux: f, snr: Some(0.0), mag: Some(g.mag) });
    }
    // Variable sources: render now, score once the whole expected image is known.
    let mut varying: Vec<(Stamp, TruthRow)> = Vec::new();
    for v in &pop.variables {
        let (f, rf) = (v.flux(mjd_mid, zp), v.mean_flux(zp));
        let (x, y) = (v.x + dx, v.y + dy);
        let stamp = psf.point(x, y, psf.radius_for(psf.fwhm_at(x, y), f.max(rf)));
        stamp.add_to(&mut img, w, h, f);
        varying.push((stamp, TruthRow { id: v.id, kind: "variable", host: None, x: v.x, y: v.y, flux: f, ref_flux: rf, snr: None, mag: mag_of(f) }));
    }
    for t in &pop.transients {
        let f = t.curve.flux(mjd_mid, zp);
        let (x, y) = (t.x + dx, t.y + dy);
        let stamp = psf.point(x, y, psf.radius_for(psf.fwhm_at(x, y), f));
        if f > 0.0 {
            stamp.add_to(&mut img, w, h, f);
        }
        varying.push((stamp, TruthRow { id: t.id, kind: t.kind.name(), host: t.host, x: t.x, y: t.y, flux: f, ref_flux: 0.0, snr: None, mag: mag_of(f) }));
    }

    // Optimal SNR against the variance of science + template (template scaled to this zero point).
    let g = c.gain;
    let m = tmpl.depth as f64;
    let s = 10f64.powf(0.4 * (zp - tmpl.zero_point));
    let rn2 = (c.read_noise / g).powi(2);
    let var = |k: usize| {
        let vs = (img[k] as f64).max(0.0) / g + rn2;
        let vt = (tmpl.expected[k] as f64).max(0.0) / (m * g) + rn2 / m;
        vs + s * s * vt
    };
    for (stamp, row) in &mut varying {
        row.snr = Some(stamp.snr2(&var, w, h, row.flux - row.ref_flux).sqrt());
    }
    truth.extend(varying.into_iter().map(|(_, r)| r));

    let expected = img.clone();
    add_noise(&mut img, w, g, c.read_noise, cfg.seed, 1000 + i as u64);

    // Detector defects and cosmic rays.
    for (k, &(p, adu)) in field.hot_pixels.iter().enumerate() {
        img[p] += adu as f32;
        let (x, y) = ((p % w) as f64, (p / w) as f64);
        truth.push(TruthRow { id: HOT_PIXEL_ID0 + k as u64, kind: "hot_pixel", host: None, x: x - dx, y: y - dy, flux: adu, ref_flux: 0.0, snr: None, mag: None });
    }
    let a = &cfg.artifacts;
    let n_cr = if a.cosmic_rays_per_mpix > 0.0 {
        Poisson::new(a.cosmic_rays_per_mpix * (w * h) as f64 / 1e6).map(|d| d.sample(&mut rng) as usize).unwrap_or(0)
    } else {
        0
    };
    for k in 0..n_cr {
        let (x0, y0) = (rng.gen_range(0.0..w as f64 - 1.0), rng.gen_range(0.0..h as f64 - 1.0));
        let len: f64 = rng.gen_range(0.0..10.0);
        let ang = rng.gen_range(0.0..std::f64::consts::PI);
        let total: f64 = rng.gen_range(1000.0..20000.0);
        let steps = (2.0 * len).ceil().max(1.0) as usize;
        let mut deposited = 0.0;
        for st in 0..steps {
            let t = if steps == 1 { 0.0 } else { st as f64 / (steps - 1) as f64 * len };
            let (px, py) = ((x0 + t * ang.cos()).round(), (y0 + t * ang.sin()).round());
            if px >= 0.0 && py >= 0.0 && (px as usize) < w && (py as usize) < h {
                img[py as usize * w + px as usize] += (total / steps as f64) as f32;
                deposited += total / steps as f64;
            }
        }
        let (cx, cy) = (x0 + 0.5 * len * ang.cos(), y0 + 0.5 * len * ang.sin());
        // Within 4000000…4999999 whatever the number of epochs: unique within a frame and over
        // ten consecutive frames (k stays below 100000: at most ~1e5 tracks a frame).
        truth.push(TruthRow { id: COSMIC_ID0 + ((i % 10) * 100_000 + k % 100_000) as u64, kind: "cosmic", host: None, x: cx - dx, y: cy - dy, flux: deposited, ref_flux: 0.0, snr: None, mag: None });
    }
    let sat = c.saturate as f32;
    if let Some(col) = field.bad_column {
        for y in 0..h {
            img[y * w + col] = sat;
        }
        truth.push(TruthRow { id: BAD_COLUMN_ID, kind: "bad_column", host: None, x: col as f64 - dx, y: (h as f64 - 1.0) / 2.0, flux: 0.0, ref_flux: 0.0, snr: None, mag: None });
    }
    for v in &mut img {
        *v = v.min(sat);
    }
    Frame { index: i, mjd, mjd_mid, psf, sky: sky0, zero_point: zp, dx, dy, image: img, expected, truth }
}
