//! The reference template: the mean of M epochs of the static sky taken with the template's own
//! PSF (round, `fwhm_scale` × the median seeing) on a flat sky at mid-range level and the clear
//! zero point. Transients are absent; variable stars sit at their mean flux; cosmic rays, hot
//! pixels and the bad column are rejected by the (dithered, clipped) stack.
//!
//! The mean of M exposures of the same scene is drawn exactly, not approximated: the sum of M
//! Poisson variables is Poisson with M times the mean, and the sum of M read noises is Gaussian
//! with √M times the RMS. So pixel = (Poisson(M·g·E) + √M·rn·N(0,1)) / (M·g), whose variance is
//! E/(M g) + rn²/(M g²): a single frame with gain M·g and read noise √M·rn, which is what its
//! header says (`GAIN`, `RDNOISE`, `NCOMBINE` = M).

use super::epoch::{add_noise, render_static};
use super::field::Field;
use super::psf::Psf;
use super::transients::Population;
use super::SimConfig;

#[derive(Debug, Clone)]
pub struct Template {
    pub psf: Psf,
    pub depth: usize,
    pub mjd: f64,
    pub sky: f64,
    pub zero_point: f64,
    /// Effective gain (e⁻/ADU) and read noise (e⁻) of the mean image.
    pub gain: f64,
    pub read_noise: f64,
    /// Noise-free image (ADU), kept for the variance in optimal SNRs.
    pub expected: Vec<f32>,
    pub image: Vec<f32>,
}

pub fn render(cfg: &SimConfig, field: &Field, pop: &Population) -> Template {
    let o = &cfg.observing;
    let c = &cfg.camera;
    let (w, h) = (cfg.width, cfg.height);
    let psf = Psf::round(cfg.template.fwhm_scale * o.seeing_median_px, cfg.template.beta, w, h);
    let sky = 0.5 * (o.sky_range[0] + o.sky_range[1]);
    let zp = o.zero_point;
    let mut expected = render_static(cfg, field, &psf, zp, 0.0, 0.0, &|_, _| sky);
    for v in &pop.variables {
        let f = v.mean_flux(zp);
        psf.point(v.x, v.y, psf.radius_for(psf.fwhm, f)).add_to(&mut expected, w, h, f);
    }
    let m = cfg.template.depth as f64;
    let (gain, read_noise) = (m * c.gain, m.sqrt() * c.read_noise);
    let mut image = expected.clone();
    add_noise(&mut image, w, gain, read_noise, cfg.seed, 999);
    let sat = c.saturate as f32;
    for v in &mut image {
        *v = v.min(sat);
    }
    Template {
        psf,
        depth: cfg.template.depth,
        mjd: o.mjd_start - cfg.template.days_before,
        sky,
        zero_point: zp,
        gain,
        read_noise,
        expected,
        image,
    }
}
