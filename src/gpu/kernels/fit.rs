//! Dispatcher for `shaders/fit.wgsl` (CPU twin: `cpu::fit`): one workgroup per stamp.

use crate::gpu::context::GpuContext;

pub const ENTRY: &str = "fit";

/// Record the fit for `n` stamps into `pass` (bind group already set).
pub fn record(ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, n: u32) {
    pass.set_pipeline(&ctx.pipelines.fit);
    pass.dispatch_workgroups(n, 1, 1);
}
