//! The engine: subtraction and scoring of stamp batches, on the GPU or on the CPU.
//!
//! `Engine` has two implementations, [`GpuEngine`] (wgpu + WGSL in `shaders/`) and [`CpuEngine`]
//! (plain Rust, the oracle in tests and the fallback where no adapter exists).
//! INTERFACE PINNED BY THE PIPELINE: keep `Engine`, `StampBatch`, `StampParams`,
//! `SubtractionResult`, `EngineError`, `prepare_batch` and `select_engine` as declared here.
//!
//! # Layout
//! - [`prepare`]: alert → [`PreparedStamp`] (variance, PSF widths, masks, matched-filter profile),
//!   [`assemble`] and [`prepare_batch`] → [`StampBatch`]. CPU, cheap.
//! - [`select`]: [`EnginePreference`] and [`select_engine`].
//! - The kernels, in order: `convolve` (template ⊗ Gaussian, variance ⊗ Gaussian²), `fit`
//!   (flux scale and background), `difference_score` (difference, variance, matched filter).
//!   WGSL in `shaders/<k>.wgsl`, dispatcher in `gpu::kernels::<k>`, twin in `cpu::<k>`.
//!   Method, noise model and tolerances: `docs/engine.md`.

pub mod prepare;
pub mod select;

pub use crate::cpu::CpuEngine;
pub use crate::gpu::GpuEngine;
pub use prepare::{assemble, prepare_batch, prepare_stamp, PrepareConfig, PreparedBatch, PreparedStamp};
pub use select::{select_engine, EnginePreference};

/// Per-stamp parameters, computed on the CPU by [`prepare_stamp`].
#[derive(Debug, Clone, PartialEq)]
pub struct StampParams {
    /// Gaussian sigma (pixels) of the kernel the template is convolved with; 0 = no convolution.
    pub kernel_sigma: f32,
    /// Candidate position in stamp pixels (0-based).
    pub cand_x: f32,
    pub cand_y: f32,
    /// Pixels closer than this (pixels) to the candidate stay out of the scale/background fit,
    /// so the transient cannot bias it; 0 = every usable pixel enters the fit.
    pub fit_radius: f32,
    /// When > 0, the flux scale (science / template) is this value instead of a fit, and only
    /// the background is fitted: full frames take it from the zero points (`MAGZP`), which bright
    /// stars with a mismatched PSF cannot bias. 0 = fit both.
    pub fixed_scale: f32,
    /// Gaussian-equivalent PSF sigma (pixels) of the science and template stamps, as prepared.
    pub science_sigma: f32,
    pub template_sigma: f32,
}

impl StampParams {
    /// Parameters for a stamp with no convolution and no fit exclusion (tests, simple callers).
    pub fn new(kernel_sigma: f32, cand_x: f32, cand_y: f32) -> StampParams {
        StampParams { kernel_sigma, cand_x, cand_y, fit_radius: 0.0, fixed_scale: 0.0, science_sigma: 0.0, template_sigma: 0.0 }
    }
}

/// A batch of same-shape stamp pairs, laid out stamp after stamp (`n * width * height` each).
#[derive(Debug, Clone, PartialEq)]
pub struct StampBatch {
    pub width: usize,
    pub height: usize,
    pub n: usize,
    pub science: Vec<f32>,
    pub template: Vec<f32>,
    /// Per-pixel variance of science and template.
    pub science_var: Vec<f32>,
    pub template_var: Vec<f32>,
    /// 1.0 where the pixel is used, 0.0 where masked (NaN on the wire in either image).
    pub weight: Vec<f32>,
    /// Matched-filter profile per stamp: the difference image's PSF centred on the candidate,
    /// normalised to unit sum.
    pub profile: Vec<f32>,
    pub params: Vec<StampParams>,
}

impl StampBatch {
    /// A batch of no stamps of the given shape, to be filled stamp by stamp.
    pub fn empty(width: usize, height: usize) -> StampBatch {
        StampBatch {
            width,
            height,
            n: 0,
            science: Vec::new(),
            template: Vec::new(),
            science_var: Vec::new(),
            template_var: Vec::new(),
            weight: Vec::new(),
            profile: Vec::new(),
            params: Vec::new(),
        }
    }

    /// Pixels per stamp.
    pub fn npix(&self) -> usize {
        self.width * self.height
    }

    /// Check that every array has `n * width * height` entries and the parameters are finite.
    pub fn validate(&self) -> Result<(), EngineError> {
        let want = self.n.checked_mul(self.npix()).ok_or_else(|| {
            EngineError::BadStamp(format!("batch too large: {} x {}x{}", self.n, self.width, self.height))
        })?;
        for (name, len) in [
            ("science", self.science.len()),
            ("template", self.template.len()),
            ("science_var", self.science_var.len()),
            ("template_var", self.template_var.len()),
            ("weight", self.weight.len()),
            ("profile", self.profile.len()),
        ] {
            if len != want {
                return Err(EngineError::BadStamp(format!(
                    "batch array {name} has {len} values, expected {want} ({} stamps of {}x{})",
                    self.n, self.width, self.height
                )));
            }
        }
        if self.params.len() != self.n {
            return Err(EngineError::BadStamp(format!(
                "batch has {} params for {} stamps",
                self.params.len(),
                self.n
            )));
        }
        for (i, p) in self.params.iter().enumerate() {
            if ![p.kernel_sigma, p.cand_x, p.cand_y, p.fit_radius, p.fixed_scale].iter().all(|v| v.is_finite())
                || p.kernel_sigma < 0.0
                || p.fixed_scale < 0.0
            {
                return Err(EngineError::BadStamp(format!("stamp {i}: non-finite or negative params {p:?}")));
            }
        }
        Ok(())
    }
}

/// What the engine reports per stamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubtractionResult {
    /// Least-squares fit science ≈ scale * (K ⊗ template) + background.
    pub flux_scale: f32,
    pub background: f32,
    /// Matched-filter flux at the candidate (science units) and its 1-sigma error.
    pub flux: f32,
    pub flux_err: f32,
    /// flux / flux_err: the detection score in sigma (signed).
    pub score: f32,
}

/// The `fit` kernel's output per stamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub scale: f32,
    pub background: f32,
    /// How the fit ended, see [`FitStatus`].
    pub status: FitStatus,
}

/// Whether the 2x2 normal equations could be solved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitStatus {
    Solved,
    /// The convolved template is flat over the fit pixels: scale = 1, background = median of
    /// science − template.
    Singular,
    /// No pixel could enter the fit: scale = 1, background = 0.
    Empty,
}

impl FitStatus {
    /// The code the kernels write (keep in sync with `shaders/fit.wgsl`).
    pub fn code(self) -> u32 {
        match self {
            FitStatus::Solved => 0,
            FitStatus::Singular => 1,
            FitStatus::Empty => 2,
        }
    }

    pub fn from_code(code: u32) -> FitStatus {
        match code {
            0 => FitStatus::Solved,
            1 => FitStatus::Singular,
            _ => FitStatus::Empty,
        }
    }
}

/// Full-frame outputs of one batch: per-stamp results plus the difference image and its
/// per-pixel variance (laid out like the batch; masked pixels are 0 in both).
#[derive(Debug, Clone, PartialEq)]
pub struct SubtractionImages {
    pub results: Vec<SubtractionResult>,
    pub difference: Vec<f32>,
    pub variance: Vec<f32>,
}

/// Per-stamp planes of one batch for the history store and stacking: the results, the
/// difference, its variance and the template's share of that variance, laid out like the batch.
/// Masked pixels (weight 0) are NaN in all three planes, as stacking expects (never 0).
#[derive(Debug, Clone, PartialEq)]
pub struct StampPlanes {
    pub results: Vec<SubtractionResult>,
    pub difference: Vec<f32>,
    pub variance: Vec<f32>,
    /// `scale² · (K ⊗ template variance)`: the part of `variance` the template brings. It is
    /// common to every epoch subtracted against the same template (`docs/stacking.md`).
    pub template_variance: Vec<f32>,
}

impl StampPlanes {
    /// The planes from [`SubtractionImages`] and the convolved template variance (`K² ⊗ T_var`,
    /// the engine's `ConvV` plane): the template share is `scale² · ConvV`, and masked pixels
    /// become NaN. Both engines end here, so they differ only by their planes' rounding.
    pub fn from_images(batch: &StampBatch, images: SubtractionImages, conv_tv: &[f32]) -> StampPlanes {
        let npix = batch.npix();
        let SubtractionImages { results, mut difference, mut variance } = images;
        let n = difference.len();
        let mut template_variance = vec![f32::NAN; n];
        let whole = variance.len() == n && conv_tv.len() >= n && batch.weight.len() >= n;
        for (s, r) in results.iter().enumerate() {
            let a2 = f64::from(r.flux_scale).powi(2);
            let (lo, hi) = ((s * npix).min(n), ((s + 1) * npix).min(n));
            if whole {
                // The same rule as below on slices, without branches (the loop the GPU
                // engine's host runs over every stamp's pixels before they are stored).
                let pix = difference[lo..hi].iter_mut().zip(&mut variance[lo..hi]).zip(&mut template_variance[lo..hi]);
                for (((d, v), t), (w, tv)) in pix.zip(batch.weight[lo..hi].iter().zip(&conv_tv[lo..hi])) {
                    let used = *w > 0.0;
                    *t = if used { (a2 * f64::from(*tv)) as f32 } else { f32::NAN };
                    *d = if used { *d } else { f32::NAN };
                    *v = if used { *v } else { f32::NAN };
                }
                continue;
            }
            for i in lo..hi {
                let used = batch.weight.get(i).is_some_and(|w| *w > 0.0);
                match (used, conv_tv.get(i)) {
                    (true, Some(tv)) => template_variance[i] = (a2 * f64::from(*tv)) as f32,
                    _ => {
                        difference[i] = f32::NAN;
                        if let Some(v) = variance.get_mut(i) {
                            *v = f32::NAN;
                        }
                    }
                }
            }
        }
        StampPlanes { results, difference, variance, template_variance }
    }

    /// Stamp `s`'s three planes, when it is in the batch.
    pub fn stamp(&self, s: usize, npix: usize) -> Option<(&[f32], &[f32], &[f32])> {
        let px = s.checked_mul(npix)?..(s + 1).checked_mul(npix)?;
        Some((self.difference.get(px.clone())?, self.variance.get(px.clone())?, self.template_variance.get(px)?))
    }
}

/// The value `flux_err` takes when no pixel constrains the matched filter.
pub const FLUX_ERR_NONE: f32 = f32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("stamp rejected: {0}")]
    BadStamp(String),
}

/// An engine processes whole batches; pipelines and buffers are built once and reused.
pub trait Engine: Send {
    /// Human-readable adapter name, e.g. "Vulkan | NVIDIA H200 | DiscreteGpu" or "cpu".
    fn adapter(&self) -> String;
    /// The wgpu engine behind this one, for the full-frame Alard–Lupton kernels
    /// (`gpu::kernels::al`); `None` for the CPU engine.
    fn gpu(&mut self) -> Option<&mut crate::gpu::GpuEngine> {
        None
    }

    /// [`Engine::gpu`] when it is a real GPU: on a software rasteriser (llvmpipe) the
    /// full-frame Alard–Lupton kernels run ~50× slower than the CPU code (a 1024² pair: 54 s
    /// against 1 s on 2 cores), so frames stay on the CPU there unless `BLINK_AL_GPU=1`.
    fn frame_gpu(&mut self) -> Option<&mut crate::gpu::GpuEngine> {
        let forced = std::env::var("BLINK_AL_GPU").is_ok_and(|v| v == "1");
        self.gpu().filter(|g| forced || !g.context().is_software())
    }
    fn subtract(&mut self, batch: &StampBatch) -> Result<Vec<SubtractionResult>, EngineError>;
    /// Like [`Engine::subtract`], also returning the difference and variance images (full
    /// frames cut into tiles use these; alerts need only the results).
    fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError>;
    /// Like [`Engine::subtract`], also returning each stamp's whole planes ([`StampPlanes`]),
    /// which [`Engine::subtract_squares`] cuts to what the history keeps. The default runs
    /// [`Engine::subtract_images`] and convolves the template variance again on the CPU; both
    /// engines override it to keep the plane they already have.
    fn subtract_planes(&mut self, batch: &StampBatch) -> Result<StampPlanes, EngineError> {
        let images = self.subtract_images(batch)?;
        let conv = crate::cpu::convolve::convolve(batch);
        Ok(StampPlanes::from_images(batch, images, &conv.template_var))
    }
    /// Like [`Engine::subtract_planes`], with each stamp's planes cut to the square of side
    /// `2·half + 1` around its candidate ([`StampSquares`]): what the history store keeps. The
    /// default cuts [`Engine::subtract_planes`]'s planes on the host; the GPU engine cuts them
    /// on the device and reads back only the squares.
    fn subtract_squares(&mut self, batch: &StampBatch, half: usize) -> Result<StampSquares, EngineError> {
        let planes = self.subtract_planes(batch)?;
        Ok(StampSquares::from_planes(batch, &planes, half))
    }
}

/// Half the side of the square the history store keeps of each stamp, centred on the
/// candidate's pixel: 31×31 of a 63×63 ZTF cutout (`pipeline::stacking`, `docs/history.md`).
pub const STORED_HALF: usize = 15;

/// The stamp pixel of the square's pixel (0, 0) for a candidate at `(cx, cy)`: the square is
/// centred on pixel `floor(c + 0.5)` (the GPU kernel's rule, whatever the rounding mode);
/// `None` for a non-finite or absurd position.
pub fn square_origin(cx: f32, cy: f32, half: usize) -> Option<(i64, i64)> {
    let ok = |c: f32| c.is_finite() && c.abs() < 1e7;
    (ok(cx) && ok(cy)).then(|| ((cx + 0.5).floor() as i64 - half as i64, (cy + 0.5).floor() as i64 - half as i64))
}

/// Copy the part of the `side × side` square whose pixel (0, 0) is the plane's pixel
/// `(x0, y0)` that lies on the `w × h` plane into `out` (row-major, `side²`); the rest of `out`
/// is left as it is (NaN, as the callers fill it: masked).
pub fn cut_square(plane: &[f32], w: usize, h: usize, (x0, y0): (i64, i64), side: usize, out: &mut [f32]) {
    let (xa, xb) = (x0.max(0), (x0 + side as i64).min(w as i64));
    if xa >= xb {
        return;
    }
    for r in 0..side {
        let y = y0 + r as i64;
        if y < 0 || y >= h as i64 {
            continue;
        }
        let src = y as usize * w + xa as usize..y as usize * w + xb as usize;
        let dst = r * side + (xa - x0) as usize;
        if let (Some(from), Some(to)) = (plane.get(src.clone()), out.get_mut(dst..dst + src.len())) {
            to.copy_from_slice(from);
        }
    }
}

/// Three planes of one stamp: difference, variance, template share.
pub type Planes3<'a> = (&'a [f32], &'a [f32], &'a [f32]);

/// Each stamp's [`StampPlanes`] cut to the square of side `side` around its candidate
/// ([`square_origin`]), NaN where masked or off the stamp; stamp after stamp, `side²` floats
/// each.
#[derive(Debug, Clone, PartialEq)]
pub struct StampSquares {
    pub results: Vec<SubtractionResult>,
    pub side: usize,
    /// Per stamp, the stamp pixel of its square's pixel (0, 0); `None` (and a NaN square) for
    /// a candidate with no square.
    pub origins: Vec<Option<(i64, i64)>>,
    pub difference: Vec<f32>,
    pub variance: Vec<f32>,
    pub template_variance: Vec<f32>,
}

impl StampSquares {
    /// The squares cut from whole planes on the host (the CPU twin of `shaders/squares.wgsl`).
    pub fn from_planes(batch: &StampBatch, planes: &StampPlanes, half: usize) -> StampSquares {
        let side = 2 * half + 1;
        let (w, h, npix) = (batch.width, batch.height, batch.npix());
        let area = side * side;
        let n = batch.params.len();
        let mut out = StampSquares {
            results: planes.results.clone(),
            side,
            origins: Vec::with_capacity(n),
            difference: vec![f32::NAN; n * area],
            variance: vec![f32::NAN; n * area],
            template_variance: vec![f32::NAN; n * area],
        };
        for s in 0..n {
            let origin = square_origin(batch.params[s].cand_x, batch.params[s].cand_y, half);
            out.origins.push(origin);
            let (Some(origin), Some((d, v, t))) = (origin, planes.stamp(s, npix)) else { continue };
            let px = s * area..(s + 1) * area;
            cut_square(d, w, h, origin, side, &mut out.difference[px.clone()]);
            cut_square(v, w, h, origin, side, &mut out.variance[px.clone()]);
            cut_square(t, w, h, origin, side, &mut out.template_variance[px]);
        }
        out
    }

    /// Stamp `s`'s three squares (difference, variance, template share) and its origin, when
    /// it has one.
    pub fn square(&self, s: usize) -> Option<(Planes3<'_>, (i64, i64))> {
        let area = self.side * self.side;
        let px = s.checked_mul(area)?..(s + 1).checked_mul(area)?;
        let origin = (*self.origins.get(s)?)?;
        Some(((self.difference.get(px.clone())?, self.variance.get(px.clone())?, self.template_variance.get(px)?), origin))
    }
}
