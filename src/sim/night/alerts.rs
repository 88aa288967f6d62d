//! The night's alerts, as a survey would have raised them: one blink-native Avro container per
//! frame (`alerts/<frame>.avro`, schema `schemas/blink/blink.alert.avsc`), with an alert wherever
//! a transient or variable star differs from the template at an optimal SNR of at least
//! `min_snr`, and at every cosmic ray (the bogus alerts real streams carry; known hot pixels and
//! the bad column are masked by surveys and raise none). Cutouts are centred on the source:
//! science and template with their variance and PSF images, sky included, each in its own units
//! (the engine fits the flux scale); no survey difference.

use serde::{Deserialize, Serialize};

use super::epoch::Frame;
use super::psf::Psf;
use super::template::Template;
use super::wcs::TanWcs;
use super::SimConfig;
use crate::alert::{Alert, Candidate, Image, Stamp, Survey, Triplet};

/// Which alerts `blink simulate` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Write `alerts/*.avro` at all.
    pub enabled: bool,
    /// Smallest optimal SNR of a transient or variable star's difference that raises an alert.
    pub min_snr: f64,
    /// Cutout side, pixels (odd).
    pub cutout: usize,
    /// Alert on cosmic rays.
    pub cosmic_rays: bool,
    /// Also write ZTF-shaped packets (`alerts/<frame>.ztf.avro`).
    pub ztf: bool,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig { enabled: true, min_snr: 5.0, cutout: 63, cosmic_rays: true, ztf: true }
    }
}

const PSF_SIDE: usize = 25;

/// Cut a `side`² stamp centred on pixel (cx, cy) of a `w`×`h` image; outside pixels are masked.
fn cut(img: &[f32], w: usize, h: usize, cx: i64, cy: i64, side: usize, var: &dyn Fn(usize) -> f64) -> (Image, Vec<bool>, Image) {
    let r = (side / 2) as i64;
    let mut data = vec![0f32; side * side];
    let mut vdata = vec![0f32; side * side];
    let mut mask = vec![false; side * side];
    for sy in 0..side {
        for sx in 0..side {
            let (x, y) = (cx - r + sx as i64, cy - r + sy as i64);
            let k = sy * side + sx;
            if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
                mask[k] = true;
                continue;
            }
            let i = y as usize * w + x as usize;
            data[k] = img[i];
            vdata[k] = var(i) as f32;
        }
    }
    (Image::new(side, side, data), mask, Image::new(side, side, vdata))
}

fn psf_image(psf: &Psf, x: f64, y: f64) -> Image {
    // The PSF as it is at (x, y), centred on the central pixel of its own image.
    let mut p = psf.clone();
    let fwhm = psf.fwhm_at(x, y);
    (p.cx, p.cy, p.cr, p.fwhm) = (0.0, 0.0, 0.0, fwhm);
    let r = (PSF_SIDE / 2) as f64;
    let s = p.point(0.0, 0.0, r);
    Image::new(PSF_SIDE, PSF_SIDE, s.data.iter().map(|&v| v as f32).collect())
}

/// One alert with what the ZTF packet also needs.
#[derive(Debug, Clone)]
pub struct SimAlert {
    pub alert: Alert,
    /// The ideal difference cutout: science noise − scaled template noise + the alerting source.
    pub difference: Image,
    /// Position in the frame, 0-based pixels.
    pub x: f64,
    pub y: f64,
    pub truth_id: u64,
}

/// The alerts of one frame.
pub fn frame_alerts(cfg: &SimConfig, frame: &Frame, tmpl: &Template, wcs: &TanWcs, file_stem: &str) -> Vec<SimAlert> {
    let ac = &cfg.alerts;
    let (w, h) = (cfg.width, cfg.height);
    let g = cfg.camera.gain;
    let rn2 = (cfg.camera.read_noise / g).powi(2);
    let m = tmpl.depth as f64;
    let sci_var = |i: usize| (frame.expected[i] as f64).max(0.0) / g + rn2;
    let tmpl_var = |i: usize| (tmpl.expected[i] as f64).max(0.0) / (m * g) + rn2 / m;
    let side = ac.cutout | 1;
    let mut out = Vec::new();
    for row in &frame.truth {
        let trigger = match row.kind {
            "fast" | "sn" | "slow" | "variable" => row.snr.is_some_and(|s| s >= ac.min_snr),
            "cosmic" => ac.cosmic_rays,
            _ => false,
        };
        if !trigger {
            continue;
        }
        // Position in this frame's pixels (the truth is on the template's grid).
        let (x, y) = (row.x + frame.dx, row.y + frame.dy);
        let (cx, cy) = (x.round() as i64, y.round() as i64);
        let (si, smask, svar) = cut(&frame.image, w, h, cx, cy, side, &sci_var);
        let (ti, tmask, tvar) = cut(&tmpl.image, w, h, row.x.round() as i64, row.y.round() as i64, side, &tmpl_var);
        let (ra, dec) = wcs.pixel_to_sky(x, y);
        let r = (side / 2) as f64;
        // Ideal difference: the noise of both images, the artifacts, and the source's change.
        let s = 10f64.powf(0.4 * (frame.zero_point - tmpl.zero_point));
        let delta = row.flux - row.ref_flux;
        let src = (row.kind != "cosmic" && delta != 0.0)
            .then(|| frame.psf.point(x, y, frame.psf.radius_for(frame.psf.fwhm_at(x, y), delta.abs())));
        let mut diff = vec![0f32; side * side];
        for sy in 0..side {
            for sx in 0..side {
                let (px, py) = (cx - r as i64 + sx as i64, cy - r as i64 + sy as i64);
                if px < 0 || py < 0 || px >= w as i64 || py >= h as i64 {
                    continue;
                }
                let k = py as usize * w + px as usize;
                let mut v = (frame.image[k] - frame.expected[k]) as f64 - s * (tmpl.image[k] - tmpl.expected[k]) as f64;
                if let Some(p) = &src {
                    let (qx, qy) = (px - p.x0, py - p.y0);
                    if qx >= 0 && qy >= 0 && (qx as usize) < p.w && (qy as usize) < p.h {
                        v += delta * p.data[qy as usize * p.w + qx as usize];
                    }
                }
                diff[sy * side + sx] = v as f32;
            }
        }
        let alert = Alert {
            survey: Survey::Native,
            alert_id: format!("{file_stem}-{}", row.id),
            object_id: row.id.to_string(),
            ra,
            dec,
            mjd_tai: frame.mjd_mid,
            band: cfg.field.band.clone(),
            exposure_s: Some(cfg.camera.exptime),
            candidate: Candidate {
                stamp_x: x - (cx as f64 - r),
                stamp_y: y - (cy as f64 - r),
                fwhm_px: Some(frame.psf.fwhm_at(x, y)),
                template_fwhm_px: Some(tmpl.psf.fwhm),
                survey_snr: row.snr,
                positive: row.flux >= row.ref_flux,
                zero_point: Some(frame.zero_point),
                gain: Some(g),
            },
            triplet: Triplet {
                science: Stamp { image: si, mask: smask, variance: Some(svar), psf: Some(psf_image(&frame.psf, x, y)) },
                template: Stamp { image: ti, mask: tmask, variance: Some(tvar), psf: Some(psf_image(&tmpl.psf, row.x, row.y)) },
                difference: None,
            },
        };
        out.push(SimAlert { alert, difference: Image::new(side, side, diff), x, y, truth_id: row.id });
    }
    out
}
