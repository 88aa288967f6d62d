//! Frame subtraction with the Alard–Lupton kernel of [`crate::subtract`] (CPU for now): the
//! image with the sharper PSF is convolved with the kernel fitted on stars, so Moffat wings and
//! ellipticity are matched where a single Gaussian cannot. Same inputs and output as
//! [`frame::subtract_prepared`](super::frame::subtract_prepared); the score image, peaks and
//! flags that follow are shared.

use std::time::Instant;

use super::frame::{Decorrelated, check_same_size, median_variance, subtract_residual_background, Difference, FrameOptions, NoiseModel, Prepared, ScaleSource, PsfRoles};
use super::image::Image;
use super::DetectError;
use crate::subtract::decorr::{apply as decorrelate, decorrelation_kernel};
use crate::gpu::GpuEngine;
use crate::subtract::{fit_kernel, Options, Pair};

/// Subtract with a fitted Alard–Lupton kernel. Fails (for the caller to fall back on the
/// Gaussian kernel) when the frame holds too few usable stars.
///
/// With `gpu`, the frame's convolution, its exact variance and the decorrelation filter run on
/// it (`gpu::kernels::al`); the fit stays on the CPU (see below). A GPU failure falls back to the
/// CPU with a warning.
pub fn subtract_al(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, mut gpu: Option<&mut GpuEngine>) -> Result<Difference, DetectError> {
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
    let tf = Instant::now();
    // The fit's stamp convolutions and Gram sums stay on the CPU even with a GPU: measured on
    // an H100 host (16 cores), 100 stamps take 29 ms with `CpuGrams` and 70 ms through
    // `GpuEngine` (reading the convolved stamps back for χ² dominates). `fit_kernel_with`
    // takes the GPU where that changes.
    let fitted = fit_kernel(&pair, sigma_broad, sigma_sharp, &o);
    let sol = fitted.map_err(|e| DetectError::Engine { path: science.path.clone(), message: format!("Alard–Lupton kernel: {e}") })?;
    tracing::debug!(fit_s = tf.elapsed().as_secs_f64(), "AL: kernel fitted");
    let tc = Instant::now();
    let engine_err = |e: crate::subtract::SubtractError| DetectError::Engine { path: science.path.clone(), message: e.to_string() };
    let model = sol.convolve_on(gpu.as_deref_mut(), &s_img, w, h).map_err(engine_err)?;
    let bg = crate::subtract::polynomial_image(&sol.background, sol.background_order, w, h);
    let d: Vec<f32> = b_img.iter().zip(&model).zip(&bg).map(|((b, m), g)| b - m - *g as f32).collect();
    // The convolved variance: exact on the GPU, `ΣK² · (G ⊗ V)` on the CPU.
    let kv = match gpu.as_deref_mut().map(|g| g.al_convolve_variance(&sol, &s_var, w, h)) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            tracing::warn!("variance convolution on the GPU failed ({e}); on the CPU");
            sol.convolve_variance(&s_var, w, h).map_err(engine_err)?
        }
        None => sol.convolve_variance(&s_var, w, h).map_err(engine_err)?,
    };
    let mut eps2 = if opts.model_error { model_error(&sol, &d, &model, &b_var, &kv, w) } else { 0.0 };
    if eps2 > MAX_MODEL_ERROR * MAX_MODEL_ERROR {
        tracing::warn!(frame = %science.path.display(), "the kernel misses the fit stars by {:.1}% of their light; the variance counts {:.0}%", 100.0 * eps2.sqrt(), 100.0 * MAX_MODEL_ERROR);
        eps2 = MAX_MODEL_ERROR * MAX_MODEL_ERROR;
    }
    tracing::debug!(model_error = eps2.sqrt(), "AL: fractional kernel-model error on the fit stars");
    tracing::debug!(convolve_s = tc.elapsed().as_secs_f64(), "AL: convolved image and variance");
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let kc = sol.kernel_at(cx, cy);
    let scale_c = sol.scale_at(cx, cy);
    // Swapped (the science was convolved): D' = T − K⊗S − bg with K's sum ≈ template/science,
    // so D = −D'/scale in science units, V = V'/scale².
    let (m, m2) = if convolved_template || !(scale_c.abs() > 1e-12) { (1.0, 1.0) } else { (-1.0 / scale_c, 1.0 / (scale_c * scale_c)) };
    // The mask grown by the kernel's half-width: a masked pixel enters the convolution as 0,
    // and a saturated star's true light is many times the sky.
    let r = sol.half() as i64;
    let grown = grow(&bad, w, h, r);
    let mut difference = vec![0.0f32; w * h];
    let mut variance = vec![0.0f32; w * h];
    for i in 0..w * h {
        if !grown[i] {
            difference[i] = (d[i] as f64 * m) as f32;
            let mv = model[i] as f64;
            variance[i] = ((b_var[i] as f64 + kv[i] as f64 + eps2 * mv * mv) * m2) as f32;
        }
    }
    residual_background(gpu.as_deref_mut(), &mut difference, &variance, w, h, opts.background_mesh);
    // The decorrelation post-filter φ (DMTN-021) from the kernel at the centre: φ ⊗ difference
    // has white noise, PSF φ ⊗ PSF and variance Σφ²·V_u + Σ(κ⊗φ)²·V_c (the second term from the
    // convolved variance `kv`, which already holds ΣK² over the frame). It is the difference
    // blink writes; the score stays on the undecorrelated difference, whose matched filter
    // (the PSF, with the correlated noise in its normalisation) has the same signal to noise
    // without a non-separable filter per pixel.
    let (var_u, var_c) = (median_variance(&b_var), median_variance(&s_var));
    let decorrelated = if opts.decorrelate && var_u > 0.0 && var_c > 0.0 {
        let td = Instant::now();
        let side = 2 * sol.half() + 1;
        let mut dk = None;
        for half in [4usize, 8, 12, 16, 24] {
            let k = decorrelation_kernel(&kc, side, var_u, var_c, half).map_err(engine_err)?;
            let done = k.truncated_energy < 1e-6 || half >= 2 * sol.half();
            dk = Some(k);
            if done {
                break;
            }
        }
        let dk = dk.expect("at least one half-width tried");
        let on_gpu = gpu.map(|g| g.al_convolve_terms(std::slice::from_ref(&dk.kernel), dk.half, 0, &difference, w, h, 0));
        let mut dd = match on_gpu {
            Some(Ok((v, _))) => v,
            Some(Err(e)) => {
                tracing::warn!("decorrelation on the GPU failed ({e}); on the CPU");
                decorrelate(&dk, &difference, w, h).map_err(engine_err)?
            }
            None => decorrelate(&dk, &difference, w, h).map_err(engine_err)?,
        };
        let sk2: f64 = kc.iter().map(|v| v * v).sum();
        let wc = if sk2 > 0.0 { dk.weight_convolved / sk2 } else { 1.0 };
        let reach = r + dk.half as i64;
        let masked = grow(&bad, w, h, reach);
        let mut dv = vec![0.0f32; w * h];
        for i in 0..w * h {
            if masked[i] {
                dd[i] = 0.0;
            } else {
                let mv = model[i] as f64;
                dv[i] = ((dk.weight_unconvolved * b_var[i] as f64 + wc * kv[i] as f64 + eps2 * mv * mv) * m2) as f32;
            }
        }
        tracing::debug!(half = dk.half, truncated = dk.truncated_energy, sum_phi2 = dk.weight_unconvolved, var_u, var_c, out_var = dk.output_variance(), s = td.elapsed().as_secs_f64(), "AL: decorrelated");
        Some(Decorrelated { difference: dd, variance: dv, kernel: dk })
    } else {
        None
    };
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
            kernel: kc.clone(),
            kernel_side: 2 * sol.half() + 1,
            var_unconvolved: var_u,
            var_convolved: var_c,
        },
        kernel_solution: Some(Box::new(sol)),
        decorrelated,
        prepare: t0.elapsed(),
        engine: std::time::Duration::ZERO,
    })
}

/// The most the kernel model's fractional error enters the variance with: above it the fit is
/// poor (a warning says so), and a larger `ε` would hide every variable star on the frame.
const MAX_MODEL_ERROR: f64 = 0.05;

/// The kernel model's fractional error squared, `ε²`, measured on the stars of the final fit:
/// the residual variance the pixel noise does not explain, per unit of squared model flux.
///
/// Why: a spatially varying kernel of finite order leaves residuals of a fixed fraction of the
/// star's light (a slightly wrong core width, a PSF that varies faster than the polynomial).
/// Under a bright star that fraction is many times the photon noise and scores as a dipole of
/// ±5–10σ, which is not a transient. Adding `ε² · model²` to each pixel's variance is the
/// honest noise model for a difference whose kernel is known to a precision ε: it leaves the
/// sky (model ≈ 0) untouched and lowers the score only where the convolved image is bright.
///
/// Per stamp `e = (Σ r² − Σ v) / Σ m²` over its pixels; `ε²` is the median of `e` weighted by
/// `Σ m² / Σ v` (how far the stamp's light stands above its noise, which is where `e` is
/// measured well), floored at 0. A median, so one variable star the clipping let through
/// cannot set ε for the frame (a pooled ratio of sums did, and hid variables of SNR 50–80).
fn model_error(sol: &crate::subtract::KernelSolution, d: &[f32], model: &[f32], var: &[f32], kvar: &[f32], w: usize) -> f64 {
    let mut per: Vec<(f64, f64)> = Vec::new();
    for sf in sol.stamps.iter().filter(|s| s.rejected_after.is_none()) {
        let st = sf.stamp;
        let (mut rr, mut vv, mut mm) = (0.0f64, 0.0f64, 0.0f64);
        for y in st.y.saturating_sub(st.half)..=st.y + st.half {
            for x in st.x.saturating_sub(st.half)..=(st.x + st.half).min(w - 1) {
                let i = y * w + x;
                if i >= d.len() {
                    continue;
                }
                let (r, m) = (d[i] as f64, model[i] as f64);
                rr += r * r;
                vv += var[i] as f64 + kvar[i] as f64;
                mm += m * m;
            }
        }
        if mm > 0.0 && vv > 0.0 && rr.is_finite() && vv.is_finite() {
            per.push(((rr - vv) / mm, mm / vv));
        }
    }
    per.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = per.iter().map(|p| p.1).sum();
    let mut acc = 0.0;
    for (e, wt) in &per {
        acc += wt;
        if acc >= 0.5 * total {
            return e.max(0.0);
        }
    }
    0.0
}

/// `mask` grown by `r` pixels (a square of side `2r + 1` around each masked pixel): separable,
/// O(N) for any `r` (`cpu::frame::grow`; the GPU's `frame_grow` is its twin).
fn grow(mask: &[bool], w: usize, h: usize, r: i64) -> Vec<bool> {
    crate::cpu::frame::grow(mask, w, h, r.max(0) as usize)
}

/// [`Prepared::new`] with its per-pixel work on `gpu` (`gpu::kernels::frame`): the smoothed
/// variance, the saturation mask and the sky mesh taken off, uploaded once and read back once
/// (the fit needs the planes on the host). The seeing and the gain estimate stay on the CPU.
/// Equal to the CPU's within f32 round-off (`tests/integration/frame_parity.rs`); a GPU error
/// is returned for the caller to fall back on [`Prepared::new`].
pub fn prepare_gpu(gpu: &mut GpuEngine, img: &Image, opts: &FrameOptions) -> Result<Prepared, DetectError> {
    let fwhm = img.fwhm()?;
    let (w, h) = (img.width, img.height);
    let g = img.gain_or_estimate();
    let rn2 = (img.header.read_noise / g).powi(2);
    // As `frame::saturation_mask`: at or above 99.9% of SATURATE.
    let level = img.header.saturate.map(|s| s as f32 * 0.999);
    let engine_err = |e: crate::engine::EngineError| DetectError::Engine { path: img.path.clone(), message: e.to_string() };
    let raw = gpu.frame_upload(&img.data, w, h).map_err(engine_err)?;
    let (var, sat) = match gpu.frame_prepare(&raw, g, rn2, level) {
        Ok(p) => p,
        Err(e) => {
            gpu.frame_release(raw);
            return Err(engine_err(e));
        }
    };
    let sky = if opts.background_mesh > 0 { gpu.frame_sky_subtract(&raw, &sat, opts.background_mesh).map(Some) } else { Ok(None) };
    let read = match &sky {
        Ok(Some(s)) => gpu.frame_read_all(&[s, &var, &sat]),
        Ok(None) => gpu.frame_read_all(&[&raw, &var, &sat]),
        Err(_) => Ok(Vec::new()),
    };
    for p in [raw, var, sat] {
        gpu.frame_release(p);
    }
    if let Some(s) = sky.map_err(engine_err)? {
        gpu.frame_release(s);
    }
    let mut planes = read.map_err(engine_err)?.into_iter();
    let (Some(sky_subtracted), Some(variance), Some(sat)) = (planes.next(), planes.next(), planes.next()) else {
        return Err(engine_err(crate::engine::EngineError::Gpu("frame planes missing".into())));
    };
    let saturated = sat.iter().map(|v| v.to_bits() != 0).collect();
    Ok(Prepared { fwhm, sky_subtracted, variance, saturated })
}

/// [`subtract_residual_background`] on `gpu` when there is one (and it works), else on the CPU.
fn residual_background(gpu: Option<&mut GpuEngine>, difference: &mut [f32], variance: &[f32], w: usize, h: usize, mesh: usize) {
    if mesh == 0 {
        return;
    }
    if let Some(g) = gpu {
        let on_gpu = (|| {
            let d = g.frame_upload(difference, w, h)?;
            let v = g.frame_upload(variance, w, h);
            let out = v.and_then(|v| {
                let r = g.frame_subtract_residual_background(&d, &v, mesh).and_then(|_| g.frame_read(&d));
                g.frame_release(v);
                r
            });
            g.frame_release(d);
            out
        })();
        match on_gpu {
            Ok(d) if d.len() == difference.len() => {
                difference.copy_from_slice(&d);
                return;
            }
            Ok(_) => tracing::warn!("residual background on the GPU: wrong plane size; on the CPU"),
            Err(e) => tracing::warn!("residual background on the GPU failed ({e}); on the CPU"),
        }
    }
    subtract_residual_background(difference, variance, w, h, mesh);
}
