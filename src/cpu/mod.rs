//! The CPU engine: the twin of every WGSL kernel (same names as `shaders/<k>.wgsl`), in plain
//! Rust with f64 accumulation. It is the oracle in the parity tests and the fallback engine where
//! no adapter exists.

pub mod al;
pub mod convolve;
pub mod difference_score;
pub mod fit;
pub mod frame;

use crate::engine::{Engine, EngineError, StampBatch, SubtractionImages, SubtractionResult};

/// The engine made of the CPU twins, run one after another on the whole batch.
#[derive(Debug, Default, Clone)]
pub struct CpuEngine;

impl CpuEngine {
    pub fn new() -> CpuEngine {
        CpuEngine
    }

    /// Run every kernel and return the results with the full difference and variance images.
    pub fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        batch.validate()?;
        let conv = convolve::convolve(batch);
        let fits = fit::fit(batch, &conv.template, &conv.template_var);
        Ok(difference_score::difference_score(batch, &conv.template, &conv.template_var, &fits))
    }
}

impl Engine for CpuEngine {
    fn adapter(&self) -> String {
        "cpu".to_string()
    }

    fn subtract(&mut self, batch: &StampBatch) -> Result<Vec<SubtractionResult>, EngineError> {
        Ok(CpuEngine::subtract_images(self, batch)?.results)
    }

    fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        CpuEngine::subtract_images(self, batch)
    }
}
