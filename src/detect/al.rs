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
pub fn subtract_al(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, gpu: Option<&mut GpuEngine>) -> Result<Difference, DetectError> {
    subtract_al_with(science, ps, template, pt, opts, gpu, true)
}

/// [`subtract_al`]; with `resident` false and a GPU, the path before `post_fit_gpu` (each GPU
/// stage uploading and reading back its planes), which the parity tests compare it with.
#[doc(hidden)]
pub fn subtract_al_with(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, mut gpu: Option<&mut GpuEngine>, resident: bool) -> Result<Difference, DetectError> {
    let t0 = Instant::now();
    check_same_size(science, template)?;
    let (w, h) = (science.width, science.height);
    let PsfRoles { sig_s, sig_t, convolved_template, sigma_broad, sigma_sharp } = PsfRoles::new(ps, pt);
    let (broad, sharp) = if convolved_template { (ps, pt) } else { (pt, ps) };
    // Masked pixels (NaN, zero variance, saturated) enter as sky (0 after the sky mesh) and are
    // masked again below. Only what is masked in the *convolved* image spreads through the
    // kernel; what is masked in the other image stays where it is (a bad column in the science
    // frame costs its own pixels, not a band 30 px wide), so the two masks are kept apart.
    let own_bad = |p: &Prepared, i: usize| p.saturated[i] || !p.sky_subtracted[i].is_finite() || !(p.variance[i] > 0.0);
    let bad_u: Vec<bool> = (0..w * h).map(|i| own_bad(broad, i)).collect();
    let bad_c: Vec<bool> = (0..w * h).map(|i| own_bad(sharp, i)).collect();
    let bad: Vec<bool> = bad_u.iter().zip(&bad_c).map(|(a, b)| *a || *b).collect();
    let clean_with = |v: &[f32], m: &[bool]| -> Vec<f32> { v.iter().zip(m).map(|(x, b)| if *b { 0.0 } else { *x }).collect() };
    // The fit sees both masks; the convolution the convolved image's own.
    let (b_img, b_var) = (clean_with(&broad.sky_subtracted, &bad), clean_with(&broad.variance, &bad));
    let (s_img, s_var) = (clean_with(&sharp.sky_subtracted, &bad_c), clean_with(&sharp.variance, &bad_c));
    let (s_fit, s_fit_var) = (clean_with(&sharp.sky_subtracted, &bad), clean_with(&sharp.variance, &bad));
    let mut o = Options::default();
    let sat = |img: &Image| img.header.saturate.map(|s| s as f32 * 0.999);
    let (sat_broad, sat_sharp) = if convolved_template { (sat(science), sat(template)) } else { (sat(template), sat(science)) };
    // The stamp finder sees sky-subtracted images: the saturation levels move with the sky, and
    // saturated pixels are already zeroed above, so a level only guards what the mask missed.
    o.stamps.saturate_science = sat_broad;
    o.stamps.saturate_template = sat_sharp;
    // The kernel's sum from the zero points when both headers have one (`FitOptions::fixed_scale`
    // says why); it maps the sharper image onto the broader one.
    // (`FrameOptions::flux_scale`, given outright, comes first.)
    let (given, source) = match (opts.flux_scale, science.header.zero_point, template.header.zero_point) {
        (Some(a), _, _) => (Some(a), ScaleSource::Given),
        (None, Some(zs), Some(zt)) if opts.scale_from_zero_points => (Some(10f64.powf(0.4 * (zs - zt))), ScaleSource::ZeroPoints),
        _ => (None, ScaleSource::Kernel),
    };
    let given = given.filter(|a| a.is_finite() && *a > 0.0);
    let scale_source = if given.is_some() { source } else { ScaleSource::Kernel };
    o.fit.fixed_scale = given.map(|a| if convolved_template { a } else { 1.0 / a });
    let pair = Pair { width: w, height: h, science: &b_img, template: &s_fit, science_variance: &b_var, template_variance: Some(&s_fit_var) };
    let tf = Instant::now();
    // The fit's stamp convolutions and Gram sums stay on the CPU even with a GPU: measured on
    // an H100 host (16 cores), 100 stamps take 29 ms with `CpuGrams` and 70 ms through
    // `GpuEngine` (reading the convolved stamps back for χ² dominates). `fit_kernel_with`
    // takes the GPU where that changes.
    let fitted = fit_kernel(&pair, sigma_broad, sigma_sharp, &o);
    let sol = fitted.map_err(|e| DetectError::Engine { path: science.path.clone(), message: format!("Alard–Lupton kernel: {e}") })?;
    drop((s_fit, s_fit_var));
    tracing::debug!(fit_s = tf.elapsed().as_secs_f64(), "AL: kernel fitted");
    let tc = Instant::now();
    let engine_err = |e: crate::subtract::SubtractError| DetectError::Engine { path: science.path.clone(), message: e.to_string() };
    // The result, from either path below.
    let finish = |difference: Vec<f32>, variance: Vec<f32>, decorrelated: Option<Decorrelated>, kc: Vec<f64>, (var_u, var_c): (f64, f64), sol: crate::subtract::KernelSolution, scale_c: f64| Difference {
        width: w,
        height: h,
        difference,
        variance,
        saturated: ps.saturated.iter().zip(&pt.saturated).map(|(a, b)| *a || *b).collect(),
        sigma_science: sig_s,
        sigma_template: sig_t,
        sigma_difference: sigma_broad,
        kernel_sigma: (sigma_broad * sigma_broad - sigma_sharp * sigma_sharp).max(0.0).sqrt(),
        convolved_template,
        scale: if convolved_template { scale_c } else { 1.0 / scale_c },
        scale_source,
        noise: NoiseModel { kernel: kc, kernel_side: 2 * sol.half() + 1, var_unconvolved: var_u, var_convolved: var_c },
        kernel_solution: Some(Box::new(sol)),
        decorrelated,
        prepare: t0.elapsed(),
        engine: std::time::Duration::ZERO,
    };
    // With a GPU, everything after the fit runs on planes resident there (`post_fit_gpu`),
    // unless the model-error term is asked for (it needs the model on the host). A failure
    // falls back on the path below.
    if let (Some(g), false, true) = (gpu.as_deref_mut(), opts.model_error, resident) {
        let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
        let (kc, scale_c) = (sol.kernel_at(cx, cy), sol.scale_at(cx, cy));
        let (m, m2) = if convolved_template || scale_c.is_nan() || scale_c.abs() <= 1e-12 { (1.0, 1.0) } else { (-1.0 / scale_c, 1.0 / (scale_c * scale_c)) };
        let (var_u, var_c) = (median_variance(&b_var), median_variance(&s_var));
        let planes = PostFitInput { broad: &b_img, sharp: &s_img, broad_var: &b_var, sharp_var: &s_var, bad_u: &bad_u, bad_c: &bad_c, w, h };
        match post_fit_gpu(g, &sol, &kc, &planes, (m, m2), (var_u, var_c), opts) {
            Ok((difference, variance, decorrelated)) => {
                tracing::debug!(convolve_s = tc.elapsed().as_secs_f64(), "AL: convolution, difference, background and decorrelation on the GPU");
                return Ok(finish(difference, variance, decorrelated, kc, (var_u, var_c), sol, scale_c));
            }
            Err(e) => tracing::warn!("the subtraction after the fit on the GPU failed ({e}); on the CPU"),
        }
    }
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
    // The convolved image's mask grown by the kernel's half-width (a masked pixel enters the
    // convolution as 0, and a saturated star's true light is many times the sky), the other
    // image's as it is.
    let r = sol.half() as i64;
    let grown: Vec<bool> = grow(&bad_c, w, h, r).iter().zip(&bad_u).map(|(a, b)| *a || *b).collect();
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
        // Masked pixels are 0 in the difference, so they add nothing to φ ⊗ D; the pixels near
        // them only miss φ's small wings there (their variance is a little lower than `dv` says).
        // The mask grows by the radius holding all but 1e-3 of Σφ², not φ's whole box (up to
        // 24 px): on the simulated night the whole box hid a supernova next to a bad column.
        let phi = crate::subtract::decorr::PsfImage { side: dk.side(), pixels: dk.kernel.clone() };
        let reach = r + (crate::detect::psf::trimmed(&phi, 1e-3).side / 2) as i64;
        let masked: Vec<bool> = grow(&bad_c, w, h, reach).iter().zip(grow(&bad_u, w, h, reach - r)).map(|(a, b)| *a || b).collect();
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
    Ok(finish(difference, variance, decorrelated, kc, (var_u, var_c), sol, scale_c))
}

/// The host planes [`post_fit_gpu`] starts from (those of [`subtract_al`] after the fit).
struct PostFitInput<'a> {
    broad: &'a [f32],
    sharp: &'a [f32],
    broad_var: &'a [f32],
    sharp_var: &'a [f32],
    /// Masked in the image not convolved, and in the convolved one.
    bad_u: &'a [bool],
    bad_c: &'a [bool],
    w: usize,
    h: usize,
}

/// What [`post_fit_gpu`] reads back: the difference, its variance, and the decorrelated pair.
type PostFit = (Vec<f32>, Vec<f32>, Option<Decorrelated>);

/// The decorrelation filter from the kernel at the centre: the smallest box half-width whose
/// truncation loses under 1e-6 of the energy (as [`subtract_al`] chooses it).
fn decorrelation_filter(kc: &[f64], sol: &crate::subtract::KernelSolution, var_u: f64, var_c: f64) -> Result<crate::subtract::decorr::DecorrelationKernel, crate::subtract::SubtractError> {
    let side = 2 * sol.half() + 1;
    let mut last = None;
    for half in [4usize, 8, 12, 16, 24] {
        let k = decorrelation_kernel(kc, side, var_u, var_c, half)?;
        let done = k.truncated_energy < 1e-6 || half >= 2 * sol.half();
        last = Some(k);
        if done {
            break;
        }
    }
    last.ok_or_else(|| crate::subtract::SubtractError::Gpu("no decorrelation half-width tried".into()))
}

/// How far the decorrelated difference's mask reaches from a masked pixel of the convolved
/// image: the kernel's half-width `r` plus the radius holding all but 1e-3 of Σφ² (as
/// [`subtract_al`] grows it).
fn decorrelation_reach(dk: &crate::subtract::decorr::DecorrelationKernel, r: i64) -> i64 {
    let phi = crate::subtract::decorr::PsfImage { side: dk.side(), pixels: dk.kernel.clone() };
    r + (crate::detect::psf::trimmed(&phi, 1e-3).side / 2) as i64
}

/// Everything [`subtract_al`] does after the fit, on planes that stay on `g`: the frame's
/// convolution and exact variance (`al_convolve`), the masks grown (`frame_grow`), the
/// difference and variance (`frame_assemble`), the residual background (`frame_mesh`), the
/// decorrelation and its variance; uploaded once (four planes, two masks), read back once
/// (difference, variance, and the decorrelated pair). Same numbers as the CPU path within f32
/// round-off (`frame_parity::subtract_al_on_the_gpu_matches_the_cpu`).
fn post_fit_gpu(
    g: &mut GpuEngine,
    sol: &crate::subtract::KernelSolution,
    kc: &[f64],
    p: &PostFitInput,
    (m, m2): (f64, f64),
    (var_u, var_c): (f64, f64),
    opts: &FrameOptions,
) -> Result<PostFit, crate::engine::EngineError> {
    use crate::cpu::al::{term_kernels, variance_kernels};
    use crate::engine::EngineError;
    let (w, h) = (p.w, p.h);
    let dk = if opts.decorrelate && var_u > 0.0 && var_c > 0.0 { Some(decorrelation_filter(kc, sol, var_u, var_c).map_err(|e| EngineError::Gpu(e.to_string()))?) } else { None };
    let mut arena = Vec::new();
    let result = (|| {
        let r = sol.half() as i64;
        let mut keep = |q: crate::gpu::kernels::frame::GpuPlane| {
            arena.push(q);
            arena.len() - 1
        };
        let b = keep(g.frame_upload(p.broad, w, h)?);
        let s = keep(g.frame_upload(p.sharp, w, h)?);
        let bv = keep(g.frame_upload(p.broad_var, w, h)?);
        let sv = keep(g.frame_upload(p.sharp_var, w, h)?);
        let mu = keep(g.frame_upload_mask(p.bad_u, w, h)?);
        let mc = keep(g.frame_upload_mask(p.bad_c, w, h)?);
        let _ = keep;
        let model = g.frame_al_convolve(&term_kernels(sol), sol.half(), sol.spatial_order, &arena[s])?;
        arena.push(model);
        let model = arena.len() - 1;
        let (order2, vk) = variance_kernels(sol);
        let kv = g.frame_al_convolve(&vk, sol.half(), order2, &arena[sv])?;
        arena.push(kv);
        let kv = arena.len() - 1;
        // The guard: the broad variance (0 where either image is masked) with the convolved
        // image's mask grown by the kernel's half-width zeroed.
        let grown = g.frame_grow(&arena[mc], r as usize)?;
        arena.push(grown);
        let guard = g.frame_copy(&arena[bv])?;
        arena.push(guard);
        let (grown, guard) = (arena.len() - 2, arena.len() - 1);
        g.frame_mask_zero(&arena[guard], &arena[grown])?;
        let terms: Vec<(f64, usize, usize)> = sol.background.iter().zip(crate::subtract::spatial_terms(sol.background_order)).map(|(c, (a, b))| (*c, a, b)).collect();
        let diff = g.frame_al_difference(&arena[b], &arena[model], &arena[guard], &terms, m)?;
        arena.push(diff);
        let diff = arena.len() - 1;
        let var = g.frame_al_variance(&arena[guard], &arena[kv], &arena[model], 1.0, 1.0, 0.0, m2)?;
        arena.push(var);
        let var = arena.len() - 1;
        g.frame_subtract_residual_background(&arena[diff], &arena[var], opts.background_mesh)?;
        let Some(dk) = dk else {
            let mut out = g.frame_read_all(&[&arena[diff], &arena[var]])?.into_iter();
            return Ok((out.next().unwrap_or_default(), out.next().unwrap_or_default(), None));
        };
        let dd = g.frame_al_convolve(std::slice::from_ref(&dk.kernel), dk.half, 0, &arena[diff])?;
        arena.push(dd);
        let dd = arena.len() - 1;
        let sk2: f64 = kc.iter().map(|v| v * v).sum();
        let wc = if sk2 > 0.0 { dk.weight_convolved / sk2 } else { 1.0 };
        let reach = decorrelation_reach(&dk, r);
        let g1 = g.frame_grow(&arena[mc], reach.max(0) as usize)?;
        arena.push(g1);
        let g2 = g.frame_grow(&arena[mu], (reach - r).max(0) as usize)?;
        arena.push(g2);
        let guard2 = g.frame_copy(&arena[bv])?;
        arena.push(guard2);
        let (g1, g2, guard2) = (arena.len() - 3, arena.len() - 2, arena.len() - 1);
        for q in [g1, g2] {
            g.frame_mask_zero(&arena[guard2], &arena[q])?;
            g.frame_mask_zero(&arena[dd], &arena[q])?;
        }
        let dv = g.frame_al_variance(&arena[guard2], &arena[kv], &arena[model], dk.weight_unconvolved, wc, 0.0, m2)?;
        arena.push(dv);
        let dv = arena.len() - 1;
        let mut out = g.frame_read_all(&[&arena[diff], &arena[var], &arena[dd], &arena[dv]])?.into_iter();
        let (d, v, ddv, dvv) = (out.next().unwrap_or_default(), out.next().unwrap_or_default(), out.next().unwrap_or_default(), out.next().unwrap_or_default());
        Ok((d, v, Some(Decorrelated { difference: ddv, variance: dvv, kernel: dk })))
    })();
    for q in arena {
        g.frame_release(q);
    }
    result
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
    let per = sol.stamps.iter().filter(|s| s.rejected_after.is_none()).map(|sf| {
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
        (rr, vv, mm)
    });
    crate::subtract::solve::weighted_excess(per)
}

/// `mask` grown by `r` pixels (a square of side `2r + 1` around each masked pixel): separable,
/// O(N) for any `r` (`cpu::frame::grow`; the GPU's `frame_grow` is its twin).
fn grow(mask: &[bool], w: usize, h: usize, r: i64) -> Vec<bool> {
    crate::cpu::frame::grow(mask, w, h, r.max(0) as usize)
}

/// [`prepare_gpu`] where `gpu` is given (a real GPU: `Engine::frame_gpu`), falling back on
/// [`Prepared::new`] with a warning if it fails; [`Prepared::new`] without one.
pub fn prepare_on(gpu: Option<&mut GpuEngine>, img: &Image, opts: &FrameOptions) -> Result<Prepared, DetectError> {
    if let Some(g) = gpu {
        match prepare_gpu(g, img, opts) {
            Ok(p) => return Ok(p),
            Err(e) => tracing::warn!(file = %img.path.display(), "preparing the image on the GPU failed ({e}); on the CPU"),
        }
    }
    Prepared::new(img, opts)
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
