//! `blink subtract`: one science/template pair, HOTPANTS-style: the difference in the science
//! image's flux units and the detection score image in sigma, as FITS. The same path as
//! `blink detect` (`src/detect/frame.rs`, `docs/detections.md`) without the peaks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::detect::al::{prepare_on_device, prepare_on_resident, subtract_al, subtract_al_on_device};
use crate::subtract::decorr::PsfImage;
use crate::detect::frame::{score_image, subtract, subtract_prepared, FrameOptions, Prepared, FWHM_PER_SIGMA};
use crate::detect::image::{read_image, robust_stats, write_image, Image};

#[derive(Debug, Args, Clone)]
pub struct SubtractArgs {
    /// Science image (FITS; the first 2-D image HDU). GAIN, RDNOISE, SATURATE, SEEING and MAGZP
    /// are read from its header when present (docs/night-format.md lists the accepted keys).
    #[arg(long)]
    pub science: PathBuf,
    /// Template (reference) image on the same pixel grid as the science image.
    #[arg(long)]
    pub template: PathBuf,
    /// Where to write the difference (science flux units; NaN where masked). With `--method al`
    /// it is decorrelated (DMTN-021 post-filter, header DECORR = T): its noise is white.
    #[arg(long)]
    pub out_diff: PathBuf,
    /// Where to write the score image: matched-filter signal to noise in sigma at every pixel
    /// (NaN where masked).
    #[arg(long)]
    pub out_score: Option<PathBuf>,
    /// Where to write the matching kernel: a FITS cube of (2h+1)² kernels, one plane per
    /// position of a `--kernel-grid`² grid over the frame (keys KX_n, KY_n: the 0-based pixel
    /// of plane n; KSUM_n: its sum, the flux scale), applied to the image named by CONVOLVD.
    #[arg(long)]
    pub out_kernel: Option<PathBuf>,
    /// Positions per side of the `--out-kernel` grid (the Gaussian kernel is one plane).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub kernel_grid: u32,
    /// Science gain, e-/ADU (overrides GAIN; absent from both: estimated from the sky).
    #[arg(long)]
    pub science_gain: Option<f64>,
    /// Template gain, e-/ADU (for a mean of N exposures: N × the single-exposure gain).
    #[arg(long)]
    pub template_gain: Option<f64>,
    /// Science read noise, e- (overrides RDNOISE).
    #[arg(long)]
    pub science_read_noise: Option<f64>,
    /// Template read noise, e-.
    #[arg(long)]
    pub template_read_noise: Option<f64>,
    /// Science PSF FWHM in pixels (overrides SEEING; absent from both: estimated from stars).
    #[arg(long)]
    pub science_seeing: Option<f64>,
    /// Template PSF FWHM in pixels.
    #[arg(long)]
    pub template_seeing: Option<f64>,
    /// Saturation level in ADU for both images (overrides SATURATE).
    #[arg(long)]
    pub saturate: Option<f64>,
    /// Tile size in pixels (the frame goes to the engine as a batch of tiles).
    #[arg(long, default_value_t = 256)]
    pub tile: usize,
    /// Matching kernel: `al` (Alard–Lupton, fitted on bright isolated stars, varying across the
    /// frame; fitted on the CPU, everything else on a real GPU when there is one) or `gaussian` (one Gaussian from the two seeings, on the engine).
    /// `al` falls back to `gaussian`, with a warning, when the frame has too few stars.
    ///
    /// `zogy`: the proper image subtraction of Zackay, Ofek & Gal-Yam (2016) in Fourier space,
    /// which needs both PSFs (`--science-psf`, `--template-psf`); its score is S_corr in sigma.
    #[arg(long, value_parser = ["al", "gaussian", "zogy"], default_value = "al")]
    pub method: String,
    /// Science PSF image (FITS, odd square side, centred; normalised to unit sum here). Sets the
    /// science seeing when neither SEEING nor --science-seeing gives it; required by `zogy`.
    #[arg(long)]
    pub science_psf: Option<PathBuf>,
    /// Template PSF image, as `--science-psf`.
    #[arg(long)]
    pub template_psf: Option<PathBuf>,
    /// Flux scale science / template (the science's counts per template count for one source).
    /// By default it comes from the headers' MAGZP when both have one; else `al` fits it as the
    /// kernel's sum and `zogy` measures it by aperture photometry of isolated stars.
    #[arg(long)]
    pub flux_scale: Option<f64>,
    /// Write the Alard–Lupton difference without the decorrelation post-filter (its noise then
    /// correlated between neighbouring pixels by the kernel).
    #[arg(long)]
    pub no_decorrelation: bool,
    /// Add the Alard–Lupton kernel's fractional error ε, measured on the fit stars, to the
    /// variance as ε²·model²: fewer false positives on bright stars' residuals, less
    /// sensitivity to variable stars (docs/detections.md).
    #[arg(long)]
    pub model_error: bool,
    /// Relative ridge on the Alard–Lupton kernel's coefficients. The default 1e-2 keeps a
    /// kernel fitted on faint stars from fitting their noise; it also shrinks the kernel by
    /// about that fraction, which shows at the cores of stars of 10⁶ e⁻ and more as residuals
    /// of −5 to −10σ. For pairs with such stars, 1e-4 takes them away (docs/detections.md).
    #[arg(long, default_value_t = crate::subtract::FitOptions::default().regularization, value_parser = super::kernel_regularization)]
    pub kernel_regularization: f64,
    /// Keep cosmic rays and hot pixels as they are. By default both images' pixels far sharper
    /// than their PSF allows (5σ tests against the seeing and gain) are interpolated over before
    /// the subtraction, so the kernel does not spread them into star-shaped blobs; the summary
    /// line counts them (docs/detections.md).
    #[arg(long)]
    pub no_repair: bool,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

fn apply(img: &mut Image, gain: Option<f64>, read_noise: Option<f64>, seeing: Option<f64>, saturate: Option<f64>) -> anyhow::Result<()> {
    for (name, v) in [("gain", gain), ("read noise", read_noise), ("seeing", seeing), ("saturation", saturate)] {
        if let Some(v) = v {
            if !(v.is_finite() && v >= 0.0) || (name != "read noise" && v == 0.0) {
                anyhow::bail!("{}: {name} {v} is not a positive number", img.path.display());
            }
        }
    }
    img.header.gain = gain.or(img.header.gain);
    img.header.read_noise = read_noise.unwrap_or(img.header.read_noise);
    img.header.seeing = seeing.or(img.header.seeing);
    img.header.saturate = saturate.or(img.header.saturate);
    Ok(())
}

pub async fn run(args: &SubtractArgs) -> anyhow::Result<()> {
    let a = args.clone();
    tokio::task::spawn_blocking(move || run_blocking(&a)).await.context("the subtraction thread failed")?
}

fn run_blocking(a: &SubtractArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut science = read_image(&a.science)?;
    let mut template = read_image(&a.template)?;
    apply(&mut science, a.science_gain, a.science_read_noise, a.science_seeing, a.saturate)?;
    apply(&mut template, a.template_gain, a.template_read_noise, a.template_seeing, a.saturate)?;
    for img in [&science, &template] {
        for w in &img.warnings {
            tracing::warn!(file = %img.path.display(), "{w}");
        }
    }
    crate::detect::check_registration(&science, &template)?;
    if let Some(s) = a.flux_scale.filter(|s| !(s.is_finite() && *s > 0.0)) {
        anyhow::bail!("--flux-scale {s} is not a positive number");
    }
    let psf_s = a.science_psf.as_deref().map(read_psf).transpose()?;
    let psf_t = a.template_psf.as_deref().map(read_psf).transpose()?;
    for (img, psf) in [(&mut science, &psf_s), (&mut template, &psf_t)] {
        if let (None, Some(p)) = (img.header.seeing, psf) {
            img.header.seeing = Some(p.fwhm);
        }
    }
    // Cosmic rays and hot pixels interpolated over before anything convolves them
    // (`detect::repair`).
    let (rep_s, rep_t) = if a.no_repair { (0, 0) } else { (science.repair_sharp().len(), template.repair_sharp().len()) };
    if a.method == "zogy" {
        let (Some(ps), Some(pt)) = (psf_s, psf_t) else {
            anyhow::bail!("--method zogy needs both PSFs: --science-psf and --template-psf (FITS images, odd square side)");
        };
        return run_zogy(a, &science, &template, &ps, &pt, t0);
    }
    let opts = FrameOptions { tile: a.tile.clamp(16, 4096), decorrelate: !a.no_decorrelation, model_error: a.model_error, kernel_regularization: a.kernel_regularization, flux_scale: a.flux_scale, repair: !a.no_repair, ..FrameOptions::default() };
    let mut engine = crate::engine::select_engine(super::engine_preference(&a.engine)?)?;
    let read = t0.elapsed();
    let t1 = Instant::now();
    let al_on = if a.method == "al" && engine.frame_gpu().is_some() { format!("Alard–Lupton on {}", engine.adapter()) } else if a.method == "al" { "Alard–Lupton on the CPU".to_string() } else { format!("Gaussian kernel on {}", engine.adapter()) };
    // On a real GPU the prepared planes and the difference stay there through the score
    // (`subtract_al_on_device`): only what the fit and the two products need crosses the bus.
    let mut resident = None;
    let mut diff = if a.method == "al" {
        // The prepared planes are not read back (the fit takes its stars from the device),
        // unless the model-error term needs the model on the host.
        let prepare = if opts.model_error { prepare_on_resident } else { prepare_on_device };
        let (mut ps, rs) = prepare(engine.frame_gpu(), &science, &opts)?;
        let (mut pt, rt) = prepare(engine.frame_gpu(), &template, &opts)?;
        tracing::debug!(prepare_s = t1.elapsed().as_secs_f64(), "sky, variance, seeing of both images");
        let done = match (engine.frame_gpu(), &rs, &rt) {
            (Some(g), Some(rs), Some(rt)) => subtract_al_on_device(&science, &ps, rs, &template, &pt, rt, &opts, g).map(|(d, planes)| {
                resident = planes;
                d
            }),
            (g, _, _) => subtract_al(&science, &ps, &template, &pt, &opts, g),
        };
        if let Some(g) = engine.frame_gpu() {
            // The Gaussian kernel below works on host planes.
            if done.is_err() {
                for (r, p) in [(&rs, &mut ps), (&rt, &mut pt)] {
                    if let Some(r) = r {
                        r.fill_host(g, p).map_err(|e| anyhow::anyhow!("reading the prepared planes back from the GPU: {e}"))?;
                    }
                }
            }
            for r in [rs, rt].into_iter().flatten() {
                r.release(g);
            }
        }
        match done {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("{e}; falling back to a Gaussian kernel");
                subtract_prepared(engine.as_mut(), &science, &ps, &template, &pt, &opts)?
            }
        }
    } else {
        subtract(engine.as_mut(), &science, &template, &opts)?
    };
    let ts = Instant::now();
    // The matched filter's PSF: the one given for the image not convolved (the broader), else
    // measured on its stars, else a Gaussian (`score_image`).
    let (broad_img, broad_psf) = if diff.convolved_template { (&science, &psf_s) } else { (&template, &psf_t) };
    let psf = match broad_psf {
        Some(p) => Some(PsfImage { side: p.side, pixels: p.pixels.clone() }),
        None => crate::detect::psf::difference_psf(broad_img, diff.sigma_difference),
    };
    tracing::debug!(measured = broad_psf.is_none(), side = psf.as_ref().map(|p| p.side), "PSF of the difference");
    // With the difference on the device, the score and the two products are made there and only
    // they come back (`products_gpu_resident`); else (or if that fails) from host planes below,
    // the score's correlations still on a real GPU (`score_image_gpu`, the same routes).
    let on_device = match (engine.frame_gpu(), &resident) {
        (Some(g), Some(r)) => {
            let made = crate::detect::frame::products_gpu_resident(&diff, psf.as_ref(), g, r);
            if let Err(e) = &made {
                tracing::warn!("the score image on the GPU failed ({e}); on the CPU");
            }
            match made {
                Ok(Some(p)) => Some(p),
                _ => {
                    r.read_into(g, &mut diff).map_err(|e| anyhow::anyhow!("reading the difference back from the GPU: {e}"))?;
                    None
                }
            }
        }
        _ => None,
    };
    if let Some(g) = engine.frame_gpu() {
        if let Some(r) = resident.take() {
            r.release(g);
        }
    }
    let (w, h) = (diff.width, diff.height);
    let (d, z) = match on_device {
        Some(p) => p,
        None => {
            let sc = match engine.frame_gpu().map(|g| crate::detect::frame::score_image_gpu(&diff, psf.as_ref(), g)) {
                Some(Ok(sc)) => sc,
                Some(Err(e)) => {
                    tracing::warn!("the score image on the GPU failed ({e}); on the CPU");
                    score_image(&diff, psf.as_ref())
                }
                None => score_image(&diff, psf.as_ref()),
            };
            let masked = |i: usize| !(diff.variance[i] > 0.0);
            // The decorrelated difference where there is one (white noise), else the difference.
            let d: Vec<f32> = match &diff.decorrelated {
                Some(dc) => (0..w * h).map(|i| if !(dc.variance[i] > 0.0) { f32::NAN } else { dc.difference[i] }).collect(),
                None => (0..w * h).map(|i| if masked(i) { f32::NAN } else { diff.difference[i] }).collect(),
            };
            // NaN where the score was not computed (masked, or within the decorrelation's reach
            // of a mask).
            let z: Vec<f32> = (0..w * h).map(|i| if masked(i) || !sc.flux_err[i].is_finite() { f32::NAN } else { sc.score[i] }).collect();
            (d, z)
        }
    };
    if let Some(g) = engine.frame_gpu() {
        let t = g.frame_traffic();
        tracing::debug!(uploaded_mb = t.uploaded as f64 / 1e6, read_back_mb = t.read_back as f64 / 1e6, planes = (t.uploaded + t.read_back) as f64 / (w * h * 4) as f64, fit_read_mb = t.fit_read as f64 / 1e6, "whole planes moved between the host and the GPU (and the fit's stars, samples and squares)");
    }
    tracing::debug!(score_s = ts.elapsed().as_secs_f64(), "score image");
    let work = t1.elapsed();
    let mut numbers = vec![
        ("FWHM_SCI", diff.sigma_science * FWHM_PER_SIGMA, "science PSF FWHM used, px"),
        ("FWHM_TPL", diff.sigma_template * FWHM_PER_SIGMA, "template PSF FWHM used, px"),
        ("FWHM_DIF", diff.sigma_difference * FWHM_PER_SIGMA, "difference PSF FWHM (matched filter), px"),
        ("KSIGMA", diff.kernel_sigma, "Gaussian matching kernel sigma, px"),
        ("FSCALE", diff.scale, "flux scale science / template"),
        ("NREPSCI", rep_s as f64, "science pixels repaired (cosmic rays, hot pixels)"),
        ("NREPTPL", rep_t as f64, "template pixels repaired (cosmic rays, hot pixels)"),
    ];
    if let Some(sol) = &diff.kernel_solution {
        numbers.push(("KRIDGE", sol.regularization, "relative ridge of the Alard-Lupton fit"));
    }
    let texts = [
        ("CONVOLVD", if diff.convolved_template { "template" } else { "science" }.to_string(), "image convolved"),
        ("FSCALSRC", diff.scale_source.name().to_string(), "where the flux scale came from"),
        ("DECORR", if diff.decorrelated.is_some() { "T" } else { "F" }.to_string(), "decorrelation post-filter applied (DMTN-021)"),
        ("ORIGIN", format!("blink {}", env!("CARGO_PKG_VERSION")), ""),
    ];
    write_image(&a.out_diff, w, h, &d, &numbers, &[texts[0].clone(), texts[1].clone(), texts[2].clone(), texts[3].clone(), ("BUNIT", "science ADU".into(), "")])?;
    if let Some(p) = &a.out_score {
        write_image(p, w, h, &z, &numbers, &[texts[0].clone(), texts[1].clone(), texts[3].clone(), ("BUNIT", "sigma".into(), "matched-filter score")])?;
    }
    if let Some(p) = &a.out_kernel {
        write_kernel(p, &diff, a.kernel_grid as usize)?;
    }
    let sample: Vec<f32> = z.iter().step_by(3).copied().filter(|v| v.is_finite()).collect();
    let sigma = robust_stats(&sample).map(|(_, s)| s).unwrap_or(f32::NAN);
    eprintln!(
        "{}x{}: FWHM science {:.2} px, template {:.2} px; convolved the {} ({}{}); flux scale {:.4} ({}); {}; score sigma {:.3}; {:.2} s ({:.2} s reading); {}",
        w,
        h,
        diff.sigma_science * FWHM_PER_SIGMA,
        diff.sigma_template * FWHM_PER_SIGMA,
        if diff.convolved_template { "template" } else { "science" },
        // A template convolved though the science is a little sharper (`PsfRoles::for_al`).
        if diff.convolved_template && diff.sigma_science < diff.sigma_template {
            format!("kernel sharpening by sigma {:.2} px", (diff.sigma_template.powi(2) - diff.sigma_science.powi(2)).sqrt())
        } else {
            format!("kernel sigma {:.2} px", diff.kernel_sigma)
        },
        diff.kernel_solution.as_ref().map(|k| format!(", ridge {:e}", k.regularization)).unwrap_or_default(),
        diff.scale,
        diff.scale_source.name(),
        if a.no_repair { "no repair".to_string() } else { format!("repaired {rep_s} + {rep_t} sharp pixels") },
        sigma,
        (read + work).as_secs_f64(),
        read.as_secs_f64(),
        al_on
    );
    Ok(())
}

/// The kernel of `diff` at a grid of positions, as a FITS cube (see `--out-kernel`).
fn write_kernel(path: &std::path::Path, diff: &crate::detect::frame::Difference, grid: usize) -> anyhow::Result<()> {
    let (w, h) = (diff.width, diff.height);
    let mut planes: Vec<(f64, f64, Vec<f64>)> = Vec::new();
    let side;
    match &diff.kernel_solution {
        Some(sol) => {
            side = 2 * sol.half() + 1;
            for gy in 0..grid {
                for gx in 0..grid {
                    let x = ((gx as f64 + 0.5) * w as f64 / grid as f64).floor();
                    let y = ((gy as f64 + 0.5) * h as f64 / grid as f64).floor();
                    planes.push((x, y, sol.kernel_at(x, y)));
                }
            }
        }
        None => {
            side = diff.noise.kernel_side;
            planes.push(((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0, diff.noise.kernel.clone()));
        }
    }
    let data: Vec<f32> = planes.iter().flat_map(|(_, _, k)| k.iter().map(|v| *v as f32)).collect();
    let mut numbers: Vec<(String, f64, String)> = vec![("KHALF".into(), ((side - 1) / 2) as f64, "kernel half-width, px".into())];
    for (n, (x, y, k)) in planes.iter().enumerate() {
        numbers.push((format!("KX_{}", n + 1), *x, format!("plane {} position x (0-based px)", n + 1)));
        numbers.push((format!("KY_{}", n + 1), *y, format!("plane {} position y (0-based px)", n + 1)));
        numbers.push((format!("KSUM_{}", n + 1), k.iter().sum(), "kernel sum (flux scale)".into()));
    }
    let texts = vec![
        ("CONVOLVD".to_string(), if diff.convolved_template { "template" } else { "science" }.to_string(), "image the kernel convolves".to_string()),
        ("KMETHOD".to_string(), if diff.kernel_solution.is_some() { "alard-lupton" } else { "gaussian" }.to_string(), "matching kernel".to_string()),
        ("ORIGIN".to_string(), format!("blink {}", env!("CARGO_PKG_VERSION")), String::new()),
    ];
    crate::detect::image::write_cube(path, side, side, planes.len(), &data, &numbers, &texts)?;
    Ok(())
}

/// A PSF image read for `--science-psf` / `--template-psf`: unit sum and its FWHM, pixels.
struct Psf {
    side: usize,
    pixels: Vec<f64>,
    fwhm: f64,
}

fn read_psf(path: &std::path::Path) -> anyhow::Result<Psf> {
    let img = read_image(path)?;
    let (w, h) = (img.width, img.height);
    if w != h || w % 2 == 0 || w < 3 {
        anyhow::bail!("{}: a PSF image must be square with an odd side (centred on its middle pixel), not {w}x{h}", path.display());
    }
    let sum: f64 = img.data.iter().map(|v| *v as f64).sum();
    if !(sum.is_finite() && sum > 0.0) || img.data.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("{}: the PSF has NaN pixels or a sum of {sum}, not a positive number", path.display());
    }
    let pixels: Vec<f64> = img.data.iter().map(|v| *v as f64 / sum).collect();
    let c = (w / 2) as f64;
    let (mut mx, mut my) = (0.0, 0.0);
    for (i, p) in pixels.iter().enumerate() {
        mx += p * ((i % w) as f64 - c);
        my += p * ((i / w) as f64 - c);
    }
    if mx.hypot(my) > 1.0 {
        anyhow::bail!("{}: the PSF's centroid is ({mx:.2}, {my:.2}) px from its middle pixel; centre it", path.display());
    }
    // FWHM from the area above half the peak (2·√(A/π)), as the seeing estimate from stars
    // does: a second moment would weigh Moffat wings and read 50% wide.
    let peak = pixels.iter().cloned().fold(0.0f64, f64::max);
    let area = pixels.iter().filter(|p| **p >= 0.5 * peak).count() as f64;
    let fwhm = 2.0 * (area / std::f64::consts::PI).sqrt();
    Ok(Psf { side: w, pixels, fwhm })
}

/// `--method zogy`: both images sky-subtracted, masked pixels NaN, ZOGY's D and S_corr written.
fn run_zogy(a: &SubtractArgs, science: &Image, template: &Image, ps: &Psf, pt: &Psf, t0: Instant) -> anyhow::Result<()> {
    use crate::subtract::zogy::{grow_mask, zogy, ZogyInputs};
    let opts = FrameOptions::default();
    let (w, h) = (science.width, science.height);
    let (prs, prt) = (Prepared::new(science, &opts)?, Prepared::new(template, &opts)?);
    let mask = |p: &Prepared| -> Vec<f32> { p.sky_subtracted.iter().zip(&p.saturated).map(|(v, s)| if *s { f32::NAN } else { *v }).collect() };
    let (sci, tpl) = (mask(&prs), mask(&prt));
    // Flux scale science / template: the flag, the zero points, or stars.
    let (scale, source) = match (a.flux_scale, science.header.zero_point, template.header.zero_point) {
        (Some(s), _, _) if s.is_finite() && s > 0.0 => (s, "--flux-scale"),
        (Some(s), _, _) => anyhow::bail!("--flux-scale {s} is not a positive number"),
        (None, Some(zs), Some(zt)) => (10f64.powf(0.4 * (zs - zt)), "zero points"),
        _ => match crate::detect::image::photometric_scale(science, template, prs.fwhm.max(prt.fwhm)) {
            Some(s) => (s, "stars"),
            None => anyhow::bail!("ZOGY needs the flux scale science/template: no MAGZP in both headers and too few isolated stars to measure it; give --flux-scale"),
        },
    };
    let sigma = |v: &[f32]| crate::detect::frame::median_variance(v).sqrt();
    let (sn, sr) = (sigma(&prs.variance), sigma(&prt.variance));
    let inputs = ZogyInputs {
        width: w,
        height: h,
        science: &sci,
        reference: &tpl,
        science_psf: &ps.pixels,
        science_psf_side: ps.side,
        reference_psf: &pt.pixels,
        reference_psf_side: pt.side,
        science_sigma: sn,
        reference_sigma: sr,
        science_zero_point: 1.0,
        reference_zero_point: 1.0 / scale,
        science_variance: Some(&prs.variance),
        reference_variance: Some(&prt.variance),
        astrometric_rms: (0.0, 0.0),
    };
    let t1 = Instant::now();
    let out = zogy(&inputs).map_err(|e| anyhow::anyhow!("{}: ZOGY: {e}", science.path.display()))?;
    let invalid = grow_mask(&out.invalid, w, h, ps.side.max(pt.side) / 2);
    let d: Vec<f32> = (0..w * h).map(|i| if invalid[i] { f32::NAN } else { out.difference[i] }).collect();
    let z: Vec<f32> = (0..w * h).map(|i| if invalid[i] { f32::NAN } else { out.score[i] }).collect();
    let numbers = [
        ("FWHM_SCI", ps.fwhm, "science PSF FWHM (half-maximum area), px"),
        ("FWHM_TPL", pt.fwhm, "template PSF FWHM (half-maximum area), px"),
        ("FSCALE", scale, "flux scale science / template"),
    ];
    let texts = [("METHOD", "zogy".to_string(), "Zackay, Ofek & Gal-Yam 2016"), ("FSCALSRC", source.to_string(), "where the flux scale came from"), ("ORIGIN", format!("blink {}", env!("CARGO_PKG_VERSION")), "")];
    write_image(&a.out_diff, w, h, &d, &numbers, &[texts[0].clone(), texts[1].clone(), texts[2].clone(), ("BUNIT", "science ADU".into(), "ZOGY D, PSF P_D")])?;
    if let Some(p) = &a.out_score {
        write_image(p, w, h, &z, &numbers, &[texts[0].clone(), texts[1].clone(), texts[2].clone(), ("BUNIT", "sigma".into(), "ZOGY S_corr")])?;
    }
    if a.out_kernel.is_some() {
        tracing::warn!("--out-kernel: ZOGY has no matching kernel; nothing written");
    }
    let sample: Vec<f32> = z.iter().step_by(3).copied().filter(|v| v.is_finite()).collect();
    let sig = robust_stats(&sample).map(|(_, s)| s).unwrap_or(f32::NAN);
    eprintln!(
        "{w}x{h}: ZOGY with PSFs of FWHM {:.2} (science) and {:.2} px (template); flux scale {scale:.4} ({source}); score sigma {sig:.3}; {:.2} s ({:.2} s in ZOGY) on the CPU",
        ps.fwhm,
        pt.fwhm,
        t0.elapsed().as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}
