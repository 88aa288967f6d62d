//! Dispatcher for `shaders/difference_score.wgsl` (CPU twin: `cpu::difference_score`): one
//! workgroup per stamp.

use crate::gpu::context::GpuContext;

pub const ENTRY: &str = "difference_score";

/// Record the difference and matched filter for `n` stamps into `pass` (bind group already set).
pub fn record(ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, n: u32) {
    pass.set_pipeline(&ctx.pipelines.difference_score);
    pass.dispatch_workgroups(n, 1, 1);
}
