//! Helpers the parity tests share: a seeded RNG that says its seed, and the GPU engine or a
//! loud failure.

use blink::engine::{Engine, GpuEngine};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `BLINK_SEED`, else the clock; printed, so a failure can be rerun with the same inputs.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("BLINK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("{test}: seed {seed} (rerun with BLINK_SEED={seed})");
    seed
}

/// An RNG from [`seed`].
pub fn seeded(test: &str) -> StdRng {
    StdRng::seed_from_u64(seed(test))
}

/// The GPU engine (its adapter and limits printed), or a failure; `None` (loudly) only with
/// BLINK_ALLOW_NO_GPU=1.
pub fn gpu(test: &str) -> Option<GpuEngine> {
    match GpuEngine::new() {
        Ok(g) => {
            let l = &g.context().limits;
            eprintln!(
                "{test}: adapter {}; workgroup memory {} B, storage buffers/stage {}, storage binding {} B",
                g.adapter(),
                l.max_compute_workgroup_storage_size,
                l.max_storage_buffers_per_shader_stage,
                l.max_storage_buffer_binding_size
            );
            Some(g)
        }
        Err(e) if std::env::var("BLINK_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("!!!!!!!! {test}: SKIPPED, no GPU adapter ({e}); BLINK_ALLOW_NO_GPU=1 !!!!!!!!");
            None
        }
        Err(e) => panic!("{test}: no GPU adapter ({e}); set BLINK_ALLOW_NO_GPU=1 to skip"),
    }
}
