//! Frame subtraction with the Alard–Lupton kernel of [`crate::subtract`] (CPU for now): the
//! image with the sharper PSF is convolved with the kernel fitted on stars, so Moffat wings and
//! ellipticity are matched where a single Gaussian cannot. Same inputs and output as
//! [`frame::subtract_prepared`](super::frame::subtract_prepared); the score image, peaks and
//! flags that follow are shared.

use std::time::Instant;

use super::frame::{check_same_size, median_variance, subtract_residual_background, Difference, FrameOptions, NoiseModel, Prepared, ScaleSource, PsfRoles};
use super::image::Image;
use super::DetectError;
use crate::subtract::{fit_kernel, Options, Pair};

/// Subtract with a fitted Alard–Lupton kernel. Fails (for the caller to fall back on the
/// Gaussian kernel) when the frame holds too few usable stars.
pub fn subtract_al(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions) -> Result<Difference, DetectError> {
    let t0 = Instant::now();
    check_same_size(science, template)?;
    let (w, h) = (science.width, science.height);
    let PsfRoles { sig_s, sig_t, convolved_template, sigma_broad, sigma_sharp } = PsfRoles::new(ps, pt);
    let (broad, sharp) = if convolved_template { (ps, pt) } else { (pt, ps) };
    // Masked pixels (NaN, zero variance, saturated in either image) enter as sky (0 after the
    // sky mesh) and are masked again below, grown by the kernel's reach.
    let bad: Vec<bool> = (0..w * h)
        .map(|i| {
            ps.saturated[i]
                || pt.saturated[i]
                || !(broad.sky_subtracted[i].is_finite() && sharp.sky_subtracted[i].is_finite())
                || !(broad.variance[i] > 0.0 && sharp.variance[i] > 0.0)
        })
        .collect();
    let clean = |v: &[f32]| -> Vec<f32> { v.iter().zip(&bad).map(|(x, b)| if *b { 0.0 } else { *x }).collect() };
    let (b_img, s_img, b_var, s_var) = (clean(&broad.sky_subtracted), clean(&sharp.sky_subtracted), clean(&broad.variance), clean(&sharp.variance));
    let mut o = Options::default();
    let sat = |img: &Image| img.header.saturate.map(|s| s as f32 * 0.999);
    let (sat_broad, sat_sharp) = if convolved_template { (sat(science), sat(template)) } else { (sat(template), sat(science)) };
    // The stamp finder sees sky-subtracted images: the saturation levels move with the sky, and
    // saturated pixels are already zeroed above, so a level only guards what the mask missed.
    o.stamps.saturate_science = sat_broad;
    o.stamps.saturate_template = sat_sharp;
    let pair = Pair { width: w, height: h, science: &b_img, template: &s_img, science_variance: &b_var, template_variance: Some(&s_var) };
    let sol = fit_kernel(&pair, sigma_broad, sigma_sharp, &o).map_err(|e| DetectError::Engine { path: science.path.clone(), message: format!("Alard–Lupton kernel: {e}") })?;
    let d = sol.subtract(&b_img, &s_img, w, h).map_err(|e| DetectError::Engine { path: science.path.clone(), message: e.to_string() })?;
    let kv = sol.convolve_variance(&s_var, w, h).map_err(|e| DetectError::Engine { path: science.path.clone(), message: e.to_string() })?;
    let scale_c = sol.scale_at((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    // Swapped (the science was convolved): D' = T − K⊗S − bg with K's sum ≈ template/science,
    // so D = −D'/scale in science units, V = V'/scale².
    let (m, m2) = if convolved_template || !(scale_c.abs() > 1e-12) { (1.0, 1.0) } else { (-1.0 / scale_c, 1.0 / (scale_c * scale_c)) };
    // The mask grown by the kernel's half-width.
    let r = sol.half() as i64;
    let mut grown = vec![false; w * h];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if bad[y as usize * w + x as usize] {
                for yy in (y - r).max(0)..=(y + r).min(h as i64 - 1) {
                    for xx in (x - r).max(0)..=(x + r).min(w as i64 - 1) {
                        grown[yy as usize * w + xx as usize] = true;
                    }
                }
            }
        }
    }
    let mut difference = vec![0.0f32; w * h];
    let mut variance = vec![0.0f32; w * h];
    for i in 0..w * h {
        if !grown[i] {
            difference[i] = (d[i] as f64 * m) as f32;
            variance[i] = ((b_var[i] as f64 + kv[i] as f64) * m2) as f32;
        }
    }
    subtract_residual_background(&mut difference, &variance, w, h, opts.background_mesh);
    let saturated: Vec<bool> = ps.saturated.iter().zip(&pt.saturated).map(|(a, b)| *a || *b).collect();
    let scale = if convolved_template { scale_c } else { 1.0 / scale_c };
    Ok(Difference {
        width: w,
        height: h,
        difference,
        variance,
        saturated,
        sigma_science: sig_s,
        sigma_template: sig_t,
        sigma_difference: sigma_broad,
        kernel_sigma: (sigma_broad * sigma_broad - sigma_sharp * sigma_sharp).max(0.0).sqrt(),
        convolved_template,
        scale,
        scale_source: ScaleSource::Kernel,
        noise: NoiseModel {
            kernel: sol.kernel_at((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0),
            kernel_side: 2 * sol.half() + 1,
            var_unconvolved: median_variance(&b_var),
            var_convolved: median_variance(&s_var),
        },
        prepare: t0.elapsed(),
        engine: std::time::Duration::ZERO,
    })
}
