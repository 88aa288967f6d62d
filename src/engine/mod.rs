//! The engine: subtraction and scoring of stamp batches, on the GPU or on the CPU.
//!
//! `Engine` has two implementations, `GpuEngine` (wgpu + WGSL in `shaders/`) and `CpuEngine`
//! (plain Rust, the oracle in tests and the fallback where no adapter exists).
//! INTERFACE PINNED BY THE PIPELINE: keep `Engine`, `StampBatch`, `StampParams`,
//! `SubtractionResult`, `EngineError`, `prepare_batch` and `select_engine` as declared here.

use crate::alert::Alert;

/// Per-stamp parameters, computed on the CPU by [`prepare_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct StampParams {
    /// Gaussian sigma (pixels) of the kernel the template is convolved with; 0 = no convolution.
    pub kernel_sigma: f32,
    /// Candidate position in stamp pixels (0-based).
    pub cand_x: f32,
    pub cand_y: f32,
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
    fn subtract(&mut self, batch: &StampBatch) -> Result<Vec<SubtractionResult>, EngineError>;
}
