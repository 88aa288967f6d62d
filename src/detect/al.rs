//! Frame subtraction with the Alard–Lupton kernel of [`crate::subtract`] (the fit's sums and
//! solve on the CPU, the rest on a real GPU when there is one, where on resident planes the
//! fit's stars are found and cut too): the image with the sharper PSF is convolved with
//! the kernel fitted on stars, so Moffat wings and ellipticity are matched where a single
//! Gaussian cannot. Same inputs and output as
//! [`frame::subtract_prepared`](super::frame::subtract_prepared); the score image, peaks and
//! flags that follow are shared.

use std::time::Instant;

use super::frame::{Decorrelated, check_same_size, median_variance, subtract_residual_background, Difference, FrameOptions, NoiseModel, Prepared, ResidentDifference, ScaleSource, PsfRoles};
use super::image::Image;
use super::DetectError;
use crate::subtract::decorr::{apply as decorrelate, decorrelation_kernel};
use crate::gpu::kernels::frame::GpuPlane;
use crate::gpu::GpuEngine;
use crate::subtract::{fit_kernel, Options, Pair};

/// Subtract with a fitted Alard–Lupton kernel. Fails (for the caller to fall back on the
/// Gaussian kernel) when the frame holds too few usable stars.
///
/// With `gpu`, the frame's convolution, its exact variance and the decorrelation filter run on
/// it (`gpu::kernels::al`); the fit on the host planes stays on the CPU (see below). A GPU
/// failure falls back to the CPU with a warning.
pub fn subtract_al(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, gpu: Option<&mut GpuEngine>) -> Result<Difference, DetectError> {
    subtract_al_with(science, ps, template, pt, opts, gpu, true)
}

/// [`subtract_al`]; with `resident` false and a GPU, the path before `post_fit_gpu` (each GPU
/// stage uploading and reading back its planes), which the parity tests compare it with.
#[doc(hidden)]
pub fn subtract_al_with(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, mut gpu: Option<&mut GpuEngine>, resident: bool) -> Result<Difference, DetectError> {
    let mode = if resident { AfterFit::Host } else { AfterFit::Stages };
    let (diff, planes) = subtract_al_on(science, ps, template, pt, opts, gpu.as_deref_mut(), mode)?;
    if let (Some(p), Some(g)) = (planes, gpu) {
        p.release(g);
    }
    Ok(diff)
}

/// [`subtract_al`] on a GPU from the two images' planes already there
/// ([`prepare_gpu_resident`]: `rs` the science's, `rt` the template's): after the fit, nothing
/// is uploaded (the masks and cleaned planes are made on the device), and the difference's
/// planes stay there for [`score_image_gpu_resident`](super::frame::score_image_gpu_resident),
/// which then uploads nothing either. The fit takes its stars from the device too
/// (`DeviceStamps`: only their list and squares come back), so `ps` and `pt` need not hold
/// their planes ([`prepare_gpu_device`]; where they do not and the GPU fails, they are read
/// back and the CPU finishes). Same numbers as [`subtract_al`] with the GPU, bit for bit
/// (`frame_parity::resident_subtraction_moves_fewer_planes`). The planes are `None` where the
/// GPU failed and the CPU finished the subtraction (with a warning); release them with
/// [`ResidentDifference::release`].
#[allow(clippy::too_many_arguments)]
pub fn subtract_al_resident(science: &Image, ps: &Prepared, rs: &ResidentPrepared, template: &Image, pt: &Prepared, rt: &ResidentPrepared, opts: &FrameOptions, gpu: &mut GpuEngine) -> Result<(Difference, Option<ResidentDifference>), DetectError> {
    subtract_al_on(science, ps, template, pt, opts, Some(gpu), AfterFit::Prepared(rs, rt, true))
}

/// [`subtract_al_resident`] without reading the difference's planes back: where the planes are
/// `Some`, the [`Difference`]'s `difference`, `variance` and decorrelated pair are **empty**,
/// and the planes live on the device only, for
/// [`products_gpu_resident`](super::frame::products_gpu_resident) (what `blink subtract` writes)
/// or [`ResidentDifference::read_into`] (the host planes after all). Where they are `None` (the
/// GPU failed after the fit), the host planes are there as usual.
#[allow(clippy::too_many_arguments)]
pub fn subtract_al_on_device(science: &Image, ps: &Prepared, rs: &ResidentPrepared, template: &Image, pt: &Prepared, rt: &ResidentPrepared, opts: &FrameOptions, gpu: &mut GpuEngine) -> Result<(Difference, Option<ResidentDifference>), DetectError> {
    subtract_al_on(science, ps, template, pt, opts, Some(gpu), AfterFit::Prepared(rs, rt, false))
}

/// How [`subtract_al_on`] runs what follows the fit when it has a GPU.
enum AfterFit<'a> {
    /// Stage by stage, each uploading and reading back its planes (the path the parity tests
    /// compare the others with).
    Stages,
    /// On the device from planes uploaded once ([`post_fit_gpu`]).
    Host,
    /// On the device from the science's and the template's resident prepared planes; with
    /// `false`, the difference's planes are not read back.
    Prepared(&'a ResidentPrepared, &'a ResidentPrepared, bool),
}

/// Why [`subtract_al_core`] stopped: an error of the subtraction, or a GPU failure where the
/// CPU must take over and the prepared planes are not on the host ([`prepare_gpu_device`]).
enum AlError {
    Detect(DetectError),
    NeedHost(String),
}

impl From<DetectError> for AlError {
    fn from(e: DetectError) -> AlError {
        AlError::Detect(e)
    }
}

fn subtract_al_on(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, mut gpu: Option<&mut GpuEngine>, mode: AfterFit) -> Result<(Difference, Option<ResidentDifference>), DetectError> {
    let resident = match mode {
        AfterFit::Prepared(rs, rt, _) => Some((rs, rt)),
        _ => None,
    };
    match subtract_al_core(science, ps, template, pt, opts, gpu.as_deref_mut(), mode) {
        Ok(done) => Ok(done),
        Err(AlError::Detect(e)) => Err(e),
        Err(AlError::NeedHost(why)) => {
            // The planes were left on the device: read them back and run on the CPU.
            let engine_err = |e: crate::engine::EngineError| DetectError::Engine { path: science.path.clone(), message: format!("{why}; reading the prepared planes back: {e}") };
            let (Some(g), Some((rs, rt))) = (gpu, resident) else { return Err(DetectError::Engine { path: science.path.clone(), message: why }) };
            tracing::warn!("{why}; the prepared planes read back, on the CPU");
            let (mut ps2, mut pt2) = (ps.clone(), pt.clone());
            rs.fill_host(g, &mut ps2).map_err(engine_err)?;
            rt.fill_host(g, &mut pt2).map_err(engine_err)?;
            match subtract_al_core(science, &ps2, template, &pt2, opts, None, AfterFit::Host) {
                Ok(done) => Ok(done),
                Err(AlError::Detect(e)) => Err(e),
                Err(AlError::NeedHost(why)) => Err(DetectError::Engine { path: science.path.clone(), message: why }),
            }
        }
    }
}

fn subtract_al_core(science: &Image, ps: &Prepared, template: &Image, pt: &Prepared, opts: &FrameOptions, mut gpu: Option<&mut GpuEngine>, mode: AfterFit) -> Result<(Difference, Option<ResidentDifference>), AlError> {
    let t0 = Instant::now();
    check_same_size(science, template)?;
    let (w, h) = (science.width, science.height);
    // Whether the prepared planes are on the host (not where `prepare_gpu_device` made them):
    // without them a GPU failure hands the subtraction back to `subtract_al_on`.
    let on_host = |p: &Prepared| p.sky_subtracted.len() == w * h && p.variance.len() == w * h;
    let host_planes = on_host(ps) && on_host(pt);
    let PsfRoles { sig_s, sig_t, convolved_template, sigma_broad, sigma_sharp } = PsfRoles::for_al(ps, pt);
    let (broad, sharp) = if convolved_template { (ps, pt) } else { (pt, ps) };
    // Masked pixels (NaN, zero variance, saturated) enter as sky (0 after the sky mesh) and are
    // masked again below. Only what is masked in the *convolved* image spreads through the
    // kernel; what is masked in the other image stays where it is (a bad column in the science
    // frame costs its own pixels, not a band 30 px wide), so the two masks are kept apart.
    // (`cpu::frame::bad_mask`; on resident planes its twin `frame_bad_mask` makes them again,
    // and `DeviceStamps` the fit's planes.) Made on the host only where the host needs them.
    let own_bad = |p: &Prepared| crate::cpu::frame::bad_mask(&p.sky_subtracted, &p.variance, &p.saturated);
    let clean_with = |v: &[f32], m: &[bool]| -> Vec<f32> { v.iter().zip(m).map(|(x, b)| if *b { 0.0 } else { *x }).collect() };
    let host_clean = || {
        let (bad_u, bad_c) = (own_bad(broad), own_bad(sharp));
        let bad: Vec<bool> = bad_u.iter().zip(&bad_c).map(|(a, b)| *a || *b).collect();
        // The fit sees both masks; the convolution the convolved image's own.
        let (b_img, b_var) = (clean_with(&broad.sky_subtracted, &bad), clean_with(&broad.variance, &bad));
        HostClean { bad_u, bad_c, bad, b_img, b_var }
    };
    let sharp_cleaned = |c: &HostClean| (clean_with(&sharp.sky_subtracted, &c.bad_c), clean_with(&sharp.variance, &c.bad_c));
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
    o.fit.regularization = opts.kernel_regularization;
    let tf = Instant::now();
    let fit_error = |e: crate::subtract::SubtractError| DetectError::Engine { path: science.path.clone(), message: format!("Alard–Lupton kernel: {e}") };
    // The fit: on resident planes, from the stars the GPU finds there (only their squares come
    // back; the variances' medians found there too); else, or if the GPU fails, on the host
    // planes. The same stars and pixels either way, so the same kernel, bit for bit.
    let on_device = match (&mode, gpu.as_deref_mut()) {
        (AfterFit::Prepared(rs, rt, _), Some(g)) => {
            let (rb, rsh) = if convolved_template { (*rs, *rt) } else { (*rt, *rs) };
            match fit_on_device(g, rb, rsh, sigma_broad, sigma_sharp, &o) {
                Ok(done) => Some(done),
                Err(DeviceFitError::Fit(e)) => return Err(fit_error(e).into()),
                Err(DeviceFitError::Gpu(e)) if !host_planes => return Err(AlError::NeedHost(format!("the kernel fit's stars on the GPU failed ({e})"))),
                Err(DeviceFitError::Gpu(e)) => {
                    tracing::warn!("the kernel fit's stars on the GPU failed ({e}); on the CPU");
                    None
                }
            }
        }
        _ => None,
    };
    let mut host = None;
    // The fit's planes on the device, for `post_fit_gpu` (released below if it does not run).
    let mut fit_planes = None;
    let (sol, device_medians) = match on_device {
        Some((sol, medians, planes)) => {
            fit_planes = Some(planes);
            (sol, Some(medians))
        }
        None => {
            let c: &HostClean = host.insert(host_clean());
            let (s_fit, s_fit_var) = (clean_with(&sharp.sky_subtracted, &c.bad), clean_with(&sharp.variance, &c.bad));
            let pair = Pair { width: w, height: h, science: &c.b_img, template: &s_fit, science_variance: &c.b_var, template_variance: Some(&s_fit_var) };
            // The fit's stamp convolutions and Gram sums stay on the CPU even with a GPU:
            // measured on an H100 host (16 cores), 100 stamps take 29 ms with `CpuGrams` and
            // 70 ms through `GpuEngine` (reading the convolved stamps back for χ² dominates).
            // `fit_kernel_with` takes the GPU where that changes.
            (fit_kernel(&pair, sigma_broad, sigma_sharp, &o).map_err(fit_error)?, None)
        }
    };
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
    let mut host_sharp = None;
    if let (Some(g), false) = (gpu.as_deref_mut(), opts.model_error) {
        let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
        let (kc, scale_c) = (sol.kernel_at(cx, cy), sol.scale_at(cx, cy));
        let (m, m2) = if convolved_template || scale_c.is_nan() || scale_c.abs() <= 1e-12 { (1.0, 1.0) } else { (-1.0 / scale_c, 1.0 / (scale_c * scale_c)) };
        let (var_u, var_c) = match device_medians {
            Some(m) => m,
            None => {
                let c = host.get_or_insert_with(host_clean);
                (median_variance(&c.b_var), median_variance_unmasked(&sharp.variance, &c.bad_c))
            }
        };
        let src = match mode {
            AfterFit::Stages => None,
            AfterFit::Host => {
                let c: &HostClean = host.get_or_insert_with(host_clean);
                let (s_img, s_var) = host_sharp.insert(sharp_cleaned(c));
                Some(PostFitSource::Host(PostFitInput { broad: &c.b_img, sharp: s_img, broad_var: &c.b_var, sharp_var: s_var, bad_u: &c.bad_u, bad_c: &c.bad_c, w, h }))
            }
            AfterFit::Prepared(rs, rt, _) => Some(if convolved_template { PostFitSource::Resident(rs, rt, fit_planes.take()) } else { PostFitSource::Resident(rt, rs, fit_planes.take()) }),
        };
        let read_back = !matches!(mode, AfterFit::Prepared(_, _, false));
        if let Some(src) = src {
            match post_fit_gpu(g, &sol, &kc, src, (m, m2), (var_u, var_c), opts, read_back) {
                Ok((difference, variance, decorrelated, planes)) => {
                    tracing::debug!(convolve_s = tc.elapsed().as_secs_f64(), "AL: convolution, difference, background and decorrelation on the GPU");
                    return Ok((finish(difference, variance, decorrelated, kc, (var_u, var_c), sol, scale_c), Some(planes)));
                }
                Err(e) if !host_planes => return Err(AlError::NeedHost(format!("the subtraction after the fit on the GPU failed ({e})"))),
                Err(e) => tracing::warn!("the subtraction after the fit on the GPU failed ({e}); on the CPU"),
            }
        }
    }
    if let (Some(f), Some(g)) = (fit_planes.take(), gpu.as_deref_mut()) {
        f.release(g);
    }
    if !host_planes {
        return Err(AlError::NeedHost("the prepared planes are on the GPU only".into()));
    }
    let c: &HostClean = host.get_or_insert_with(host_clean);
    let (s_img, s_var) = match host_sharp {
        Some(p) => p,
        None => sharp_cleaned(c),
    };
    let model = sol.convolve_on(gpu.as_deref_mut(), &s_img, w, h).map_err(engine_err)?;
    let bg = crate::subtract::polynomial_image(&sol.background, sol.background_order, w, h);
    let d: Vec<f32> = c.b_img.iter().zip(&model).zip(&bg).map(|((b, m), g)| b - m - *g as f32).collect();
    // The convolved variance: exact on the GPU, `ΣK² · (G ⊗ V)` on the CPU.
    let kv = match gpu.as_deref_mut().map(|g| g.al_convolve_variance(&sol, &s_var, w, h)) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            tracing::warn!("variance convolution on the GPU failed ({e}); on the CPU");
            sol.convolve_variance(&s_var, w, h).map_err(engine_err)?
        }
        None => sol.convolve_variance(&s_var, w, h).map_err(engine_err)?,
    };
    let mut eps2 = if opts.model_error { model_error(&sol, &d, &model, &c.b_var, &kv, w) } else { 0.0 };
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
    let grown: Vec<bool> = grow(&c.bad_c, w, h, r).iter().zip(&c.bad_u).map(|(a, b)| *a || *b).collect();
    let mut difference = vec![0.0f32; w * h];
    let mut variance = vec![0.0f32; w * h];
    for i in 0..w * h {
        if !grown[i] {
            difference[i] = (d[i] as f64 * m) as f32;
            let mv = model[i] as f64;
            variance[i] = ((c.b_var[i] as f64 + kv[i] as f64 + eps2 * mv * mv) * m2) as f32;
        }
    }
    residual_background(gpu.as_deref_mut(), &mut difference, &variance, w, h, opts.background_mesh);
    // The decorrelation post-filter φ (DMTN-021) from the kernel at the centre: φ ⊗ difference
    // has white noise, PSF φ ⊗ PSF and variance Σφ²·V_u + Σ(κ⊗φ)²·V_c (the second term from the
    // convolved variance `kv`, which already holds ΣK² over the frame). It is the difference
    // blink writes; the score stays on the undecorrelated difference, whose matched filter
    // (the PSF, with the correlated noise in its normalisation) has the same signal to noise
    // without a non-separable filter per pixel.
    let (var_u, var_c) = (median_variance(&c.b_var), median_variance(&s_var));
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
        let masked: Vec<bool> = grow(&c.bad_c, w, h, reach).iter().zip(grow(&c.bad_u, w, h, reach - r)).map(|(a, b)| *a || b).collect();
        let mut dv = vec![0.0f32; w * h];
        for i in 0..w * h {
            if masked[i] {
                dd[i] = 0.0;
            } else {
                let mv = model[i] as f64;
                dv[i] = ((dk.weight_unconvolved * c.b_var[i] as f64 + wc * kv[i] as f64 + eps2 * mv * mv) * m2) as f32;
            }
        }
        tracing::debug!(half = dk.half, truncated = dk.truncated_energy, sum_phi2 = dk.weight_unconvolved, var_u, var_c, out_var = dk.output_variance(), s = td.elapsed().as_secs_f64(), "AL: decorrelated");
        Some(Decorrelated { difference: dd, variance: dv, kernel: dk })
    } else {
        None
    };
    Ok((finish(difference, variance, decorrelated, kc, (var_u, var_c), sol, scale_c), None))
}

/// The median variance of `v` where `mask` is clear: [`median_variance`] of `v` with the masked
/// pixels zeroed, without making that plane.
fn median_variance_unmasked(v: &[f32], mask: &[bool]) -> f64 {
    let kept: Vec<f32> = v.iter().zip(mask).step_by(7).map(|(x, m)| if *m { 0.0 } else { *x }).collect();
    // `median_variance` samples every 7th pixel; `kept` is that sample already.
    super::frame::median_of_variances(kept)
}

/// The host planes [`subtract_al`] makes from the two prepared images when the fit or what
/// follows runs on the host: each image's own unusable pixels (`bad_u` the image not
/// convolved, `bad_c` the convolved one), both together, and the broad image and its variance
/// zeroed where either is masked.
struct HostClean {
    bad_u: Vec<bool>,
    bad_c: Vec<bool>,
    bad: Vec<bool>,
    b_img: Vec<f32>,
    b_var: Vec<f32>,
}

/// Why [`fit_on_device`] failed: the fit itself (too few stars: the CPU would fail the same
/// way), or the GPU (the CPU fit on host planes takes over).
enum DeviceFitError {
    Fit(crate::subtract::SubtractError),
    Gpu(String),
}

/// The kernel fitted on the stars the GPU finds on the resident planes (`broad` the image not
/// convolved), with the two variances' medians ([`median_variance`] of the broad variance as
/// the fit cleans it, [`median_variance_unmasked`] of the sharp one) found there:
/// what [`subtract_al`] computes from host planes, bit for bit, without reading them. The
/// fit's planes are handed on for [`post_fit_gpu`], which needs the broad ones and the masks
/// as they are.
fn fit_on_device(gpu: &mut GpuEngine, broad: &ResidentPrepared, sharp: &ResidentPrepared, sigma_broad: f64, sigma_sharp: f64, o: &Options) -> Result<(crate::subtract::KernelSolution, (f64, f64), FitPlanes), DeviceFitError> {
    use crate::subtract::SubtractError;
    let fit = FitPlanes::new(gpu, broad, sharp).map_err(|e| DeviceFitError::Gpu(e.to_string()))?;
    let fitted = crate::subtract::fit_kernel_from(&mut DeviceStamps { gpu, fit: &fit }, sigma_broad, sigma_sharp, o, &mut crate::subtract::CpuGrams);
    let medians = fitted.as_ref().ok().map(|_| fit.variance_medians(gpu, &sharp.variance));
    match (fitted, medians) {
        (Ok(sol), Some(Ok(m))) => Ok((sol, m, fit)),
        (fitted, medians) => {
            fit.release(gpu);
            Err(match (fitted, medians) {
                (Err(SubtractError::Gpu(e)), _) | (Ok(_), Some(Err(SubtractError::Gpu(e)))) => DeviceFitError::Gpu(e),
                (Err(e), _) | (Ok(_), Some(Err(e))) => DeviceFitError::Fit(e),
                _ => DeviceFitError::Gpu("no variance medians".into()),
            })
        }
    }
}

/// The four planes the Alard–Lupton fit sees, made on the GPU from the resident prepared planes
/// as [`subtract_al`] makes them on the host (the broad and the sharp image and their
/// variances, zeroed where either image cannot be used), and the two images' own masks.
struct FitPlanes {
    /// In [`crate::subtract::Plane::ALL`]'s order (broad, sharp, broad variance, sharp
    /// variance), then the masks (broad, sharp).
    planes: Vec<GpuPlane>,
    width: usize,
    height: usize,
}

impl FitPlanes {
    fn new(gpu: &mut GpuEngine, broad: &ResidentPrepared, sharp: &ResidentPrepared) -> Result<FitPlanes, crate::engine::EngineError> {
        let (width, height) = (broad.sky_subtracted.width, broad.sky_subtracted.height);
        let mut f = FitPlanes { planes: Vec::with_capacity(6), width, height };
        let made = (|| {
            for p in [&broad.sky_subtracted, &sharp.sky_subtracted, &broad.variance, &sharp.variance] {
                f.planes.push(gpu.frame_copy(p)?);
            }
            for r in [broad, sharp] {
                f.planes.push(gpu.frame_bad_mask(&r.sky_subtracted, &r.variance, &r.saturated)?);
            }
            for k in 0..4 {
                for m in [4, 5] {
                    gpu.frame_mask_zero(&f.planes[k], &f.planes[m])?;
                }
            }
            Ok(())
        })();
        match made {
            Ok(()) => Ok(f),
            Err(e) => {
                f.release(gpu);
                Err(e)
            }
        }
    }

    /// The medians of the variances [`subtract_al`] decorrelates with: the broad variance as
    /// the fit cleans it, the sharp one (`sharp_variance`, resident) with its own mask zeroed,
    /// each sampled every 7th pixel as [`median_variance`] samples (the median found on the
    /// device, `frame_sample_median`).
    fn variance_medians(&self, gpu: &mut GpuEngine, sharp_variance: &GpuPlane) -> Result<(f64, f64), crate::subtract::SubtractError> {
        let gpu_err = |e: crate::engine::EngineError| crate::subtract::SubtractError::Gpu(e.to_string());
        let u = gpu.frame_sample_median(&self.planes[2], 7, None).map_err(gpu_err)?;
        let c = gpu.frame_sample_median(sharp_variance, 7, Some(&self.planes[5])).map_err(gpu_err)?;
        Ok((u, c))
    }

    fn release(self, gpu: &mut GpuEngine) {
        for p in self.planes {
            gpu.frame_release(p);
        }
    }
}

/// The Alard–Lupton fit's stars found where the prepared planes stay, on the GPU
/// (`shaders/frame/frame_stamps.wgsl`), on the fit's planes: only the stars' list, a sample of
/// the template for its sky, and the squares around the stars come back.
struct DeviceStamps<'a> {
    gpu: &'a mut GpuEngine,
    fit: &'a FitPlanes,
}

impl crate::subtract::StampSource for DeviceStamps<'_> {
    fn size(&self) -> (usize, usize) {
        (self.fit.width, self.fit.height)
    }

    fn select(&mut self, kernel_half: usize, opts: &crate::subtract::StampOptions) -> Result<Vec<crate::subtract::Stamp>, crate::subtract::SubtractError> {
        use crate::subtract::stamps::{pick_per_cell, scan_step, StampScan};
        let gpu_err = |e: crate::engine::EngineError| crate::subtract::SubtractError::Gpu(e.to_string());
        let Some(step) = scan_step(self.fit.width, self.fit.height, kernel_half, opts) else { return Ok(Vec::new()) };
        let sample = self.gpu.frame_sample(&self.fit.planes[1], step, None).map_err(gpu_err)?;
        let Some(scan) = StampScan::new(kernel_half, opts, sample) else { return Ok(Vec::new()) };
        let p = &self.fit.planes;
        let found = self.gpu.frame_stamp_candidates(&p[1], &p[0], &p[2], Some(&p[3]), &scan).map_err(gpu_err)?;
        Ok(pick_per_cell(&found, self.fit.width, self.fit.height, &scan, opts))
    }

    fn around(&mut self, stamps: &[crate::subtract::Stamp], halves: [usize; 4]) -> Result<Box<dyn crate::subtract::Planes + '_>, crate::subtract::SubtractError> {
        let centres: Vec<(usize, usize)> = stamps.iter().map(|s| (s.x, s.y)).collect();
        let planes: Vec<(&GpuPlane, usize)> = self.fit.planes[..4].iter().zip(halves).collect();
        let mut data = self.gpu.frame_squares(&planes, &centres).map_err(|e| crate::subtract::SubtractError::Gpu(e.to_string()))?.into_iter();
        let mut next = || data.next().unwrap_or_default();
        let data = [next(), next(), next(), next()];
        Ok(Box::new(crate::subtract::Squares { width: self.fit.width, height: self.fit.height, halves, centres, data }))
    }
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

/// Where [`post_fit_gpu`]'s planes come from: uploaded from the host, or derived on the device
/// from the two images' resident prepared planes (broad, sharp), so nothing is uploaded.
enum PostFitSource<'a> {
    Host(PostFitInput<'a>),
    /// With the fit's planes where the fit was made on the device: its broad image, variance
    /// and masks are what is needed here, so they are taken over, not made again.
    Resident(&'a ResidentPrepared, &'a ResidentPrepared, Option<FitPlanes>),
}

/// What [`post_fit_gpu`] reads back: the difference, its variance, and the decorrelated pair;
/// and the same planes, still on the device, for the score.
type PostFit = (Vec<f32>, Vec<f32>, Option<Decorrelated>, ResidentDifference);

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
#[allow(clippy::too_many_arguments)]
fn post_fit_gpu(
    g: &mut GpuEngine,
    sol: &crate::subtract::KernelSolution,
    kc: &[f64],
    src: PostFitSource,
    (m, m2): (f64, f64),
    (var_u, var_c): (f64, f64),
    opts: &FrameOptions,
    read_back: bool,
) -> Result<PostFit, crate::engine::EngineError> {
    use crate::cpu::al::{term_kernels, variance_kernels};
    use crate::engine::EngineError;
    let dk = if opts.decorrelate && var_u > 0.0 && var_c > 0.0 { Some(decorrelation_filter(kc, sol, var_u, var_c).map_err(|e| EngineError::Gpu(e.to_string()))?) } else { None };
    let mut arena = Vec::new();
    let result = (|| {
        let r = sol.half() as i64;
        // (plane, mask) pairs: the plane zeroed where the mask is set, once all are made.
        let mut zero: Vec<(usize, usize)> = Vec::new();
        let mut keep = |q: crate::gpu::kernels::frame::GpuPlane| {
            arena.push(q);
            arena.len() - 1
        };
        // The two images cleaned (0 where masked: the broad image where either is, the sharp
        // one where it is itself) and the two masks, as `subtract_al` makes them on the host.
        let (b, s, bv, sv, mu, mc) = match src {
            PostFitSource::Host(p) => {
                let (w, h) = (p.w, p.h);
                (
                    keep(g.frame_upload(p.broad, w, h)?),
                    keep(g.frame_upload(p.sharp, w, h)?),
                    keep(g.frame_upload(p.broad_var, w, h)?),
                    keep(g.frame_upload(p.sharp_var, w, h)?),
                    keep(g.frame_upload_mask(p.bad_u, w, h)?),
                    keep(g.frame_upload_mask(p.bad_c, w, h)?),
                )
            }
            PostFitSource::Resident(broad, sharp, fit) => {
                let (b, bv, mu, mc) = match fit {
                    // The fit's: the broad image and its variance cleaned by both masks already.
                    Some(f) => {
                        let [b, sf, bv, sfv, mu, mc]: [GpuPlane; 6] = f.planes.try_into().map_err(|_| EngineError::Gpu("the fit's planes went missing".into()))?;
                        g.frame_release(sf);
                        g.frame_release(sfv);
                        (keep(b), keep(bv), keep(mu), keep(mc))
                    }
                    None => {
                        let mu = keep(g.frame_bad_mask(&broad.sky_subtracted, &broad.variance, &broad.saturated)?);
                        let mc = keep(g.frame_bad_mask(&sharp.sky_subtracted, &sharp.variance, &sharp.saturated)?);
                        let b = keep(g.frame_copy(&broad.sky_subtracted)?);
                        let bv = keep(g.frame_copy(&broad.variance)?);
                        zero.extend([(b, mu), (b, mc), (bv, mu), (bv, mc)]);
                        (b, bv, mu, mc)
                    }
                };
                let s = keep(g.frame_copy(&sharp.sky_subtracted)?);
                let sv = keep(g.frame_copy(&sharp.variance)?);
                zero.extend([(s, mc), (sv, mc)]);
                (b, s, bv, sv, mu, mc)
            }
        };
        let _ = keep;
        for (plane, q) in zero {
            g.frame_mask_zero(&arena[plane], &arena[q])?;
        }
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
        // Without the read-back the host planes stay empty (`subtract_al_on_device`).
        let read = |g: &mut GpuEngine, arena: &[GpuPlane], planes: &[usize]| -> Result<std::vec::IntoIter<Vec<f32>>, EngineError> {
            if read_back {
                Ok(g.frame_read_all(&planes.iter().map(|&q| &arena[q]).collect::<Vec<_>>())?.into_iter())
            } else {
                Ok(vec![Vec::new(); planes.len()].into_iter())
            }
        };
        let Some(dk) = dk else {
            let mut out = read(g, &arena, &[diff, var])?;
            return Ok(((out.next().unwrap_or_default(), out.next().unwrap_or_default(), None), [diff, var, usize::MAX, usize::MAX]));
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
        let mut out = read(g, &arena, &[diff, var, dd, dv])?;
        let (d, v, ddv, dvv) = (out.next().unwrap_or_default(), out.next().unwrap_or_default(), out.next().unwrap_or_default(), out.next().unwrap_or_default());
        Ok(((d, v, Some(Decorrelated { difference: ddv, variance: dvv, kernel: dk })), [diff, var, dd, dv]))
    })();
    // The four result planes stay on the device (in `kept`'s order); the rest go back.
    let wanted = result.as_ref().map(|(_, k)| *k).unwrap_or([usize::MAX; 4]);
    let mut kept: [Option<crate::gpu::kernels::frame::GpuPlane>; 4] = [None, None, None, None];
    for (i, q) in arena.into_iter().enumerate() {
        match wanted.iter().position(|&k| k == i) {
            Some(slot) => kept[slot] = Some(q),
            None => g.frame_release(q),
        }
    }
    let ((d, v, dc), _) = result?;
    let [Some(pd), Some(pv), pdd, pdv] = kept else { return Err(EngineError::Gpu("the difference planes went missing".into())) };
    let decorrelated = match (pdd, pdv) {
        (Some(a), Some(b)) => Some((a, b)),
        (a, b) => {
            for q in [a, b].into_iter().flatten() {
                g.frame_release(q);
            }
            None
        }
    };
    Ok((d, v, dc, ResidentDifference { difference: pd, variance: pv, decorrelated }))
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
pub fn prepare_on(mut gpu: Option<&mut GpuEngine>, img: &Image, opts: &FrameOptions) -> Result<Prepared, DetectError> {
    let (p, planes) = prepare_on_resident(gpu.as_deref_mut(), img, opts)?;
    if let (Some(r), Some(g)) = (planes, gpu) {
        r.release(g);
    }
    Ok(p)
}

/// [`prepare_on`], keeping the planes on the GPU where it prepared them there
/// ([`prepare_gpu_resident`]); `None` on the CPU.
pub fn prepare_on_resident(gpu: Option<&mut GpuEngine>, img: &Image, opts: &FrameOptions) -> Result<(Prepared, Option<ResidentPrepared>), DetectError> {
    prepare_on_with(gpu, img, opts, true)
}

/// [`prepare_on_resident`] without reading the planes back where they are on the GPU
/// ([`prepare_gpu_device`]: the [`Prepared`]'s `sky_subtracted` and `variance` are empty until
/// [`ResidentPrepared::fill_host`]); on the CPU, [`Prepared::new`].
pub fn prepare_on_device(gpu: Option<&mut GpuEngine>, img: &Image, opts: &FrameOptions) -> Result<(Prepared, Option<ResidentPrepared>), DetectError> {
    prepare_on_with(gpu, img, opts, false)
}

fn prepare_on_with(gpu: Option<&mut GpuEngine>, img: &Image, opts: &FrameOptions, read_back: bool) -> Result<(Prepared, Option<ResidentPrepared>), DetectError> {
    if let Some(g) = gpu {
        let made = if read_back { prepare_gpu_resident(g, img, opts) } else { prepare_gpu_device(g, img, opts) };
        match made {
            Ok((p, r)) => return Ok((p, Some(r))),
            Err(e) => tracing::warn!(file = %img.path.display(), "preparing the image on the GPU failed ({e}); on the CPU"),
        }
    }
    Ok((Prepared::new(img, opts)?, None))
}

/// [`Prepared::new`] with its per-pixel work on `gpu` (`gpu::kernels::frame`): the smoothed
/// variance, the saturation mask and the sky mesh taken off, uploaded once and read back once
/// (the fit needs the planes on the host). The seeing and the gain estimate stay on the CPU.
/// Equal to the CPU's within f32 round-off (`tests/integration/frame_parity.rs`); a GPU error
/// is returned for the caller to fall back on [`Prepared::new`].
pub fn prepare_gpu(gpu: &mut GpuEngine, img: &Image, opts: &FrameOptions) -> Result<Prepared, DetectError> {
    let (p, planes) = prepare_gpu_resident(gpu, img, opts)?;
    planes.release(gpu);
    Ok(p)
}

/// A [`Prepared`] image's planes kept on the GPU ([`prepare_gpu_resident`]), for
/// [`subtract_al_resident`]. Give them back with [`ResidentPrepared::release`] (dropped, their
/// memory is freed instead of pooled).
#[derive(Debug)]
pub struct ResidentPrepared {
    pub sky_subtracted: GpuPlane,
    pub variance: GpuPlane,
    /// Saturated pixels (a mask plane).
    pub saturated: GpuPlane,
}

impl ResidentPrepared {
    pub fn release(self, gpu: &mut GpuEngine) {
        for p in [self.sky_subtracted, self.variance, self.saturated] {
            gpu.frame_release(p);
        }
    }

    /// `p`'s host planes read back from these where [`prepare_gpu_device`] left them empty
    /// (for a path that needs them: the Gaussian kernel, the CPU after a GPU failure).
    pub fn fill_host(&self, gpu: &mut GpuEngine, p: &mut Prepared) -> Result<(), crate::engine::EngineError> {
        let n = self.sky_subtracted.width * self.sky_subtracted.height;
        if p.sky_subtracted.len() == n && p.variance.len() == n {
            return Ok(());
        }
        let mut read = gpu.frame_read_all(&[&self.sky_subtracted, &self.variance])?.into_iter();
        match (read.next(), read.next()) {
            (Some(s), Some(v)) if s.len() == n && v.len() == n => {
                (p.sky_subtracted, p.variance) = (s, v);
                Ok(())
            }
            _ => Err(crate::engine::EngineError::Gpu("prepared planes missing".into())),
        }
    }
}

/// [`prepare_gpu`], keeping the planes on the device as well: one upload, the three planes read
/// back once (the saturation mask packed, 1/32 of a plane), and the same three left on the
/// device.
pub fn prepare_gpu_resident(gpu: &mut GpuEngine, img: &Image, opts: &FrameOptions) -> Result<(Prepared, ResidentPrepared), DetectError> {
    let (mut p, planes) = prepare_gpu_device(gpu, img, opts)?;
    if let Err(e) = planes.fill_host(gpu, &mut p) {
        planes.release(gpu);
        return Err(DetectError::Engine { path: img.path.clone(), message: e.to_string() });
    }
    Ok((p, planes))
}

/// [`prepare_gpu_resident`] reading back only the saturation mask (packed): the [`Prepared`]'s
/// `sky_subtracted` and `variance` are **empty**, the planes on the device only, for a
/// subtraction that keeps them there ([`subtract_al_on_device`]; its fit takes its stars from
/// them). [`ResidentPrepared::fill_host`] reads them back where a path needs them.
pub fn prepare_gpu_device(gpu: &mut GpuEngine, img: &Image, opts: &FrameOptions) -> Result<(Prepared, ResidentPrepared), DetectError> {
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
    // Without a mesh the image itself is the sky-subtracted plane.
    let sky = if opts.background_mesh > 0 {
        match gpu.frame_sky_subtract(&raw, &sat, opts.background_mesh) {
            Ok(s) => {
                gpu.frame_release(raw);
                s
            }
            Err(e) => {
                for p in [raw, var, sat] {
                    gpu.frame_release(p);
                }
                return Err(engine_err(e));
            }
        }
    } else {
        raw
    };
    let planes = ResidentPrepared { sky_subtracted: sky, variance: var, saturated: sat };
    // The saturation mask comes back packed, 32 pixels a word.
    match gpu.frame_read_mask_packed(&planes.saturated) {
        Ok(saturated) => Ok((Prepared { fwhm, sky_subtracted: Vec::new(), variance: Vec::new(), saturated }, planes)),
        Err(e) => {
            planes.release(gpu);
            Err(engine_err(e))
        }
    }
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
