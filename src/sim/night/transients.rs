//! What changes between epochs: transients (absent from the template) and variable stars (in the
//! template at their mean flux). Light curves are magnitudes at the clear-sky zero point; an
//! epoch's flux in ADU is 10^(−0.4 (m − MAGZP of that epoch)).
//!
//! - fast: a flare inside one night — linear rise over minutes, exponential decay (τ of hours);
//! - sn: supernova-like — flux ∝ t² from explosion to peak (about two weeks), then a linear
//!   decline in magnitude (0.01–0.03 mag/day: months);
//! - slow: steady for weeks at a flux whose per-epoch optimal SNR at median conditions lies in
//!   `slow_snr` (1.5–3): found only by stacking;
//! - variable: a star whose flux is sinusoidal about its template flux.
//!
//! A share `host_fraction` of transients sits on a galaxy, offset from its centre by about a
//! half-light radius.

use rand::Rng;

use super::field::{Field, TRANSIENT_ID0, VARIABLE_ID0};
use super::psf::{moffat_alpha, sum_p2};
use super::{rng_for, SimConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fast,
    Sn,
    Slow,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Fast => "fast",
            Kind::Sn => "sn",
            Kind::Slow => "slow",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Curve {
    /// Starts at `t0` (MJD), reaches `peak_mag` after `rise_days`, decays with e-folding `tau_days`.
    Flare { t0: f64, rise_days: f64, tau_days: f64, peak_mag: f64 },
    /// Explodes at `t_peak − rise_days`, peaks at `t_peak`, declines linearly in magnitude.
    Sn { t_peak: f64, rise_days: f64, peak_mag: f64, decline: f64 },
    /// Constant between `t_start` and `t_end`.
    Steady { t_start: f64, t_end: f64, mag: f64 },
}

impl Curve {
    /// Flux at MJD `t` relative to a source of magnitude `zp` (i.e. in ADU at zero point `zp`).
    pub fn flux(&self, t: f64, zp: f64) -> f64 {
        let f = |m: f64| 10f64.powf(-0.4 * (m - zp));
        match *self {
            Curve::Flare { t0, rise_days, tau_days, peak_mag } => {
                if t < t0 {
                    0.0
                } else if t < t0 + rise_days {
                    f(peak_mag) * (t - t0) / rise_days
                } else {
                    f(peak_mag) * (-(t - t0 - rise_days) / tau_days).exp()
                }
            }
            Curve::Sn { t_peak, rise_days, peak_mag, decline } => {
                let t_exp = t_peak - rise_days;
                if t < t_exp {
                    0.0
                } else if t < t_peak {
                    f(peak_mag) * ((t - t_exp) / rise_days).powi(2)
                } else {
                    f(peak_mag + decline * (t - t_peak))
                }
            }
            Curve::Steady { t_start, t_end, mag } => {
                if (t_start..=t_end).contains(&t) {
                    f(mag)
                } else {
                    0.0
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Transient {
    pub id: u64,
    pub kind: Kind,
    pub x: f64,
    pub y: f64,
    /// Id of the host galaxy.
    pub host: Option<u64>,
    pub curve: Curve,
}

#[derive(Debug, Clone)]
pub struct Variable {
    pub id: u64,
    pub x: f64,
    pub y: f64,
    pub mean_mag: f64,
    /// Fractional amplitude of the flux.
    pub amplitude: f64,
    pub period_days: f64,
    pub phase: f64,
}

impl Variable {
    /// Flux at MJD `t` in ADU at zero point `zp`; its mean over a period is the template's flux.
    pub fn flux(&self, t: f64, zp: f64) -> f64 {
        let mean = 10f64.powf(-0.4 * (self.mean_mag - zp));
        mean * (1.0 + self.amplitude * (std::f64::consts::TAU * t / self.period_days + self.phase).sin())
    }

    pub fn mean_flux(&self, zp: f64) -> f64 {
        10f64.powf(-0.4 * (self.mean_mag - zp))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Population {
    pub transients: Vec<Transient>,
    pub variables: Vec<Variable>,
}

/// Magnitude (at the clear zero point) whose optimal SNR per epoch is `snr` for a point source at
/// median seeing on mid-range sky, science and template noise together.
pub fn mag_for_snr(cfg: &SimConfig, snr: f64) -> f64 {
    let o = &cfg.observing;
    let c = &cfg.camera;
    let beta = 0.5 * (o.beta_range[0] + o.beta_range[1]);
    let sky = 0.5 * (o.sky_range[0] + o.sky_range[1]);
    let v1 = sky / c.gain + (c.read_noise / c.gain).powi(2);
    let v = v1 * (1.0 + 1.0 / cfg.template.depth as f64);
    let flux = snr * (v / sum_p2(o.seeing_median_px, beta)).sqrt();
    o.zero_point - 2.5 * flux.log10()
}

impl Population {
    pub fn generate(cfg: &SimConfig, field: &Field) -> Population {
        let mut rng = rng_for(cfg.seed, 2, 0);
        let (w, h) = (cfg.width as f64, cfg.height as f64);
        let margin = (4.0 * moffat_alpha(cfg.observing.seeing_median_px, 3.0)).clamp(3.0, 20.0).min(w / 4.0);
        let t_first = cfg.epoch_mjd(0);
        let t_last = cfg.epoch_mjd(cfg.n_epochs() - 1);
        let tc = &cfg.transients;
        let kinds = std::iter::repeat_n(Kind::Fast, tc.fast)
            .chain(std::iter::repeat_n(Kind::Sn, tc.sn))
            .chain(std::iter::repeat_n(Kind::Slow, tc.slow));
        let mut transients = Vec::new();
        for (i, kind) in kinds.enumerate() {
            let mut x = rng.gen_range(margin..w - margin);
            let mut y = rng.gen_range(margin..h - margin);
            let mut host = None;
            if !field.galaxies.is_empty() && rng.gen::<f64>() < tc.host_fraction {
                let g = &field.galaxies[rng.gen_range(0..field.galaxies.len())];
                let r = g.r_eff * rng.sample::<f64, _>(rand_distr::StandardNormal).abs().min(2.0);
                let a = rng.gen_range(0.0..std::f64::consts::TAU);
                let (hx, hy) = (g.x + r * a.cos(), g.y + r * a.sin());
                if hx > margin && hx < w - margin && hy > margin && hy < h - margin {
                    (x, y, host) = (hx, hy, Some(g.id));
                }
            }
            let curve = match kind {
                Kind::Fast => {
                    let night = rng.gen_range(0..cfg.nights);
                    let first = cfg.epoch_mjd(night * cfg.epochs_per_night);
                    let last = cfg.epoch_mjd((night + 1) * cfg.epochs_per_night - 1);
                    let t0 = rng.gen_range(first - 1.0 / 24.0..=last);
                    Curve::Flare {
                        t0,
                        rise_days: rng.gen_range(2.0..10.0) / 1440.0,
                        tau_days: rng.gen_range(tc.fast_tau_hours[0]..=tc.fast_tau_hours[1]) / 24.0,
                        peak_mag: rng.gen_range(tc.fast_mag[0]..=tc.fast_mag[1]),
                    }
                }
                Kind::Sn => Curve::Sn {
                    t_peak: rng.gen_range(t_first - 20.0..=t_last + 15.0),
                    rise_days: rng.gen_range(tc.sn_rise_days[0]..=tc.sn_rise_days[1]),
                    peak_mag: rng.gen_range(tc.sn_peak_mag[0]..=tc.sn_peak_mag[1]),
                    decline: rng.gen_range(tc.sn_decline_mag_per_day[0]..=tc.sn_decline_mag_per_day[1]),
                },
                Kind::Slow => Curve::Steady {
                    t_start: t_first - rng.gen_range(0.0..14.0),
                    t_end: t_last + rng.gen_range(7.0..30.0),
                    mag: mag_for_snr(cfg, rng.gen_range(tc.slow_snr[0]..=tc.slow_snr[1])),
                },
            };
            transients.push(Transient { id: TRANSIENT_ID0 + i as u64, kind, x, y, host, curve });
        }
        let vc = &cfg.variables;
        let variables = (0..vc.count)
            .map(|i| Variable {
                id: VARIABLE_ID0 + i as u64,
                x: rng.gen_range(margin..w - margin),
                y: rng.gen_range(margin..h - margin),
                mean_mag: rng.gen_range(vc.mag_range[0]..=vc.mag_range[1]),
                amplitude: rng.gen_range(vc.amplitude[0]..=vc.amplitude[1]),
                period_days: (rng.gen_range(vc.period_days[0].ln()..=vc.period_days[1].ln())).exp(),
                phase: rng.gen_range(0.0..std::f64::consts::TAU),
            })
            .collect();
        Population { transients, variables }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sn_rises_then_declines() {
        let c = Curve::Sn { t_peak: 100.0, rise_days: 14.0, peak_mag: 20.0, decline: 0.02 };
        assert_eq!(c.flux(85.0, 25.0), 0.0);
        assert!(c.flux(93.0, 25.0) < c.flux(99.0, 25.0));
        assert!((c.flux(100.0, 25.0) - 100.0).abs() < 1e-9);
        assert!((c.flux(150.0, 25.0) / 100.0 - 10f64.powf(-0.4)).abs() < 1e-9);
    }

    #[test]
    fn flare_is_gone_within_a_day() {
        let c = Curve::Flare { t0: 10.0, rise_days: 5.0 / 1440.0, tau_days: 1.0 / 24.0, peak_mag: 18.0 };
        assert!(c.flux(10.0 + 5.0 / 1440.0, 25.0) > 600.0);
        assert!(c.flux(11.0, 25.0) < 1e-6 * c.flux(10.01, 25.0));
    }
}
