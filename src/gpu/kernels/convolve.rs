//! Dispatcher for `shaders/convolve.wgsl` (CPU twin: `cpu::convolve`): the row pass then the
//! column pass, one invocation per pixel, grid (pixels / workgroup, stamps).

use super::WORKGROUP_SIZE;
use crate::gpu::context::GpuContext;

pub const ENTRY_ROWS: &str = "convolve_rows";
pub const ENTRY_COLS: &str = "convolve_cols";

/// Record both passes for `n` stamps of `npix` pixels into `pass` (bind group already set).
pub fn record(ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, n: u32, npix: u32) {
    let groups = npix.div_ceil(WORKGROUP_SIZE);
    pass.set_pipeline(&ctx.pipelines.convolve_rows);
    pass.dispatch_workgroups(groups, n, 1);
    pass.set_pipeline(&ctx.pipelines.convolve_cols);
    pass.dispatch_workgroups(groups, n, 1);
}
