//! Choosing the engine: the GPU where an adapter exists, else the CPU with a clear warning.

use super::{CpuEngine, Engine, EngineError, GpuEngine};

/// Which engine the operator asked for (`--engine auto|gpu|cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnginePreference {
    /// The GPU engine if any compute-capable adapter exists, else the CPU engine (warned).
    #[default]
    Auto,
    /// The GPU engine, or an error if no adapter exists.
    Gpu,
    /// The CPU engine.
    Cpu,
}

impl std::str::FromStr for EnginePreference {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(EnginePreference::Auto),
            "gpu" => Ok(EnginePreference::Gpu),
            "cpu" => Ok(EnginePreference::Cpu),
            other => Err(EngineError::BadStamp(format!("unknown engine {other:?}, expected auto, gpu or cpu"))),
        }
    }
}

/// Build the engine for `pref`. The adapter is logged; `BLINK_ADAPTER` (substring of the adapter
/// name) narrows the choice.
pub fn select_engine(pref: EnginePreference) -> Result<Box<dyn Engine>, EngineError> {
    match pref {
        EnginePreference::Cpu => {
            tracing::info!(adapter = "cpu", "engine: CPU (requested)");
            Ok(Box::new(CpuEngine::new()))
        }
        EnginePreference::Gpu => {
            let gpu = GpuEngine::new()?;
            tracing::info!(adapter = %gpu.adapter(), "engine: GPU");
            Ok(Box::new(gpu))
        }
        EnginePreference::Auto => match GpuEngine::new() {
            Ok(gpu) => {
                tracing::info!(adapter = %gpu.adapter(), "engine: GPU");
                Ok(Box::new(gpu))
            }
            Err(error) => {
                tracing::warn!(%error, "no usable GPU adapter: falling back to the CPU engine (slow)");
                Ok(Box::new(CpuEngine::new()))
            }
        },
    }
}
