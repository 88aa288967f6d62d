//! Simulated alerts in blink's native format: a template of stars with a sharp PSF, a science
//! epoch with a broader PSF, a flux scale and background offset, and a transient of known flux at
//! the candidate position. Each alert carries its variance and PSF images (like Rubin's), and its
//! optimal SNR as `survey_snr`, so the demo shows blink's score next to the truth.
//!
//! Full simulated FITS nights (`blink simulate`) are in [`night`].

pub mod night;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::alert::{Alert, Candidate, Image, Stamp, Survey, Triplet};

/// Knobs of [`simulate_alerts`].
#[derive(Debug, Clone)]
pub struct AlertSimConfig {
    /// Stamp side in pixels.
    pub size: usize,
    /// Sky level of the science epoch (electrons per pixel; gain 1).
    pub sky: f64,
    /// Read noise (electrons).
    pub read_noise: f64,
    /// The template is this many times deeper (its variance is divided by it).
    pub template_depth: f64,
    /// Optimal SNR of the injected transients is drawn uniformly in this range; a share
    /// `quiet_fraction` gets no transient at all.
    pub snr_range: (f64, f64),
    pub quiet_fraction: f64,
}

impl Default for AlertSimConfig {
    fn default() -> Self {
        AlertSimConfig {
            size: 41,
            sky: 400.0,
            read_noise: 5.0,
            template_depth: 20.0,
            snr_range: (3.0, 40.0),
            quiet_fraction: 0.2,
        }
    }
}

/// A unit-sum circular Gaussian centred at (cx, cy) on a `w`x`h` grid.
pub fn gaussian_image(w: usize, h: usize, cx: f64, cy: f64, sigma: f64) -> Image {
    let mut data = vec![0f32; w * h];
    let mut sum = 0.0;
    for y in 0..h {
        for x in 0..w {
            let r2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
            let v = (-0.5 * r2 / (sigma * sigma)).exp();
            data[y * w + x] = v as f32;
            sum += v;
        }
    }
    if sum > 0.0 {
        for v in &mut data {
            *v = (*v as f64 / sum) as f32;
        }
    }
    Image::new(w, h, data)
}

/// `n` alerts, deterministic for `seed`.
pub fn simulate_alerts(n: usize, seed: u64, cfg: &AlertSimConfig) -> Vec<Alert> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|i| one_alert(&mut rng, i, seed, cfg)).collect()
}

fn one_alert(rng: &mut rand::rngs::StdRng, i: usize, seed: u64, cfg: &AlertSimConfig) -> Alert {
    let s = cfg.size;
    let c = (s / 2) as f64;
    let sigma_t: f64 = rng.gen_range(0.9..1.3);
    let sigma_s: f64 = sigma_t * rng.gen_range(1.2..1.8);
    let scale: f64 = rng.gen_range(0.8..1.2);
    let bg_offset: f64 = rng.gen_range(-20.0..20.0);

    // Static sky: a few stars and a faint extended host under the candidate.
    let n_stars = rng.gen_range(2..6);
    let stars: Vec<(f64, f64, f64)> = (0..n_stars)
        .map(|_| {
            let x = rng.gen_range(3.0..(s as f64 - 3.0));
            let y = rng.gen_range(3.0..(s as f64 - 3.0));
            // Keep stars off the candidate so the demo's scores are about the transient.
            let (x, y) = if (x - c).hypot(y - c) < 6.0 { (x * 0.3, y * 0.3 + 2.0) } else { (x, y) };
            (x, y, 10f64.powf(rng.gen_range(3.3..4.7)))
        })
        .collect();
    let host_flux = 10f64.powf(rng.gen_range(2.5..3.8));
    let render = |sigma: f64, fscale: f64| -> Vec<f64> {
        let mut m = vec![0f64; s * s];
        for &(x, y, f) in &stars {
            add(&mut m, s, &gaussian_image(s, s, x, y, sigma), f * fscale);
        }
        let host_sigma = (sigma * sigma + 2.5f64.powi(2)).sqrt();
        add(&mut m, s, &gaussian_image(s, s, c + 1.0, c - 0.5, host_sigma), host_flux * fscale);
        m
    };
    let tmpl_model = render(sigma_t, 1.0);
    let mut sci_model = render(sigma_s, scale);

    // The transient: its flux follows from the wanted optimal SNR on the science noise.
    let (cx, cy) = (c + rng.gen_range(-0.5..0.5), c + rng.gen_range(-0.5..0.5));
    let psf_at_cand = gaussian_image(s, s, cx, cy, sigma_s);
    let quiet = rng.gen_bool(cfg.quiet_fraction);
    let sky_var = cfg.sky + cfg.read_noise * cfg.read_noise;
    let snr_target = if quiet { 0.0 } else { rng.gen_range(cfg.snr_range.0..cfg.snr_range.1) };
    // Optimal SNR for flux f on variance V: f * sqrt(sum P^2 / V). Solve on the background-only
    // variance first, then report the exact value with the source's own Poisson term included.
    let info_sky: f64 = psf_at_cand.data.iter().map(|p| f64::from(*p).powi(2) / sky_var).sum();
    let mut flux = snr_target / info_sky.sqrt();
    for _ in 0..3 {
        let info: f64 = psf_at_cand
            .data
            .iter()
            .zip(&sci_model)
            .map(|(p, m)| {
                let p = f64::from(*p);
                p * p / (sky_var + m + flux * p)
            })
            .sum();
        flux = snr_target / info.sqrt();
    }
    add(&mut sci_model, s, &psf_at_cand, flux);

    let normal = Normal::new(0.0, 1.0).expect("unit normal");
    let mut noisy = |model: &[f64], var_of: &dyn Fn(f64) -> f64, offset: f64| -> (Image, Image) {
        let mut img = vec![0f32; s * s];
        let mut var = vec![0f32; s * s];
        for k in 0..s * s {
            let v = var_of(model[k]);
            img[k] = (model[k] + offset + v.sqrt() * normal.sample(rng)) as f32;
            var[k] = v as f32;
        }
        (Image::new(s, s, img), Image::new(s, s, var))
    };
    let (sci_img, sci_var) = noisy(&sci_model, &|m| sky_var + m.max(0.0), cfg.sky + bg_offset);
    let depth = cfg.template_depth;
    let (tmpl_img, tmpl_var) = noisy(&tmpl_model, &|m| (sky_var + m.max(0.0)) / depth, cfg.sky);

    let info: f64 = psf_at_cand
        .data
        .iter()
        .zip(&sci_var.data)
        .map(|(p, v)| f64::from(*p).powi(2) / f64::from(*v))
        .sum();
    let optimal_snr = flux * info.sqrt();
    let band = ["g", "r", "i"][i % 3];
    let psf_side = 21;
    let pc = (psf_side / 2) as f64;
    let stamp = |image: Image, variance: Image, sigma: f64| Stamp {
        mask: vec![false; image.data.len()],
        image,
        variance: Some(variance),
        psf: Some(gaussian_image(psf_side, psf_side, pc, pc, sigma)),
    };
    Alert {
        survey: Survey::Native,
        alert_id: format!("sim-{seed}-{i}"),
        object_id: format!("simobj-{seed}-{i}"),
        ra: 150.0 + 0.01 * i as f64,
        dec: 2.0 + 0.005 * i as f64,
        mjd_tai: 61000.0 + i as f64 * 0.001,
        band: band.into(),
        exposure_s: Some(30.0),
        candidate: Candidate {
            stamp_x: cx,
            stamp_y: cy,
            fwhm_px: Some(2.3548 * sigma_s),
            template_fwhm_px: Some(2.3548 * sigma_t),
            survey_snr: Some(optimal_snr),
            positive: true,
            zero_point: Some(31.4),
            gain: Some(1.0),
        },
        triplet: Triplet {
            science: stamp(sci_img, sci_var, sigma_s),
            template: stamp(tmpl_img, tmpl_var, sigma_t),
            difference: None,
        },
    }
}

fn add(model: &mut [f64], s: usize, img: &Image, flux: f64) {
    debug_assert_eq!(img.data.len(), s * s);
    for (m, p) in model.iter_mut().zip(&img.data) {
        *m += flux * f64::from(*p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_snr_is_what_it_says() {
        let cfg = AlertSimConfig::default();
        let a = simulate_alerts(5, 7, &cfg);
        let b = simulate_alerts(5, 7, &cfg);
        assert_eq!(a, b);
        let c = simulate_alerts(5, 8, &cfg);
        assert_ne!(a[0].triplet.science.image, c[0].triplet.science.image);
        for alert in &a {
            let snr = alert.candidate.survey_snr.unwrap();
            assert!(snr == 0.0 || (2.5..45.0).contains(&snr), "optimal snr {snr}");
            let psf = alert.triplet.science.psf.as_ref().unwrap();
            let sum: f32 = psf.data.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn science_noise_matches_its_variance_plane() {
        // Away from sources, the pixel scatter equals sqrt(sky + rn^2).
        let cfg = AlertSimConfig { quiet_fraction: 1.0, ..Default::default() };
        let alerts = simulate_alerts(40, 3, &cfg);
        let expect = (cfg.sky + cfg.read_noise.powi(2)).sqrt();
        let mut resid = Vec::new();
        for a in &alerts {
            let img = &a.triplet.science.image;
            // A corner block, far from the centre host; stars may fall there, so use MAD, and
            // take out each alert's own background offset.
            let mut block: Vec<f64> = (0..36)
                .map(|k| f64::from(img.data[(k / 6) * img.width + k % 6]))
                .collect();
            block.sort_by(|a, b| a.total_cmp(b));
            let own = block[18];
            resid.extend(block.iter().map(|v| v - own));
        }
        resid.sort_by(|a, b| a.total_cmp(b));
        let med = resid[resid.len() / 2];
        let mut dev: Vec<f64> = resid.iter().map(|v| (v - med).abs()).collect();
        dev.sort_by(|a, b| a.total_cmp(b));
        let sigma = 1.4826 * dev[dev.len() / 2];
        assert!((sigma / expect - 1.0).abs() < 0.1, "measured {sigma}, expected {expect}");
    }
}
