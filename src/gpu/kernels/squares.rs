//! Dispatcher for `shaders/squares.wgsl` (CPU twin: `engine::StampSquares::from_planes`): each
//! stamp's difference, variance and template share cut to the square around its candidate that
//! the history store keeps, written compactly into the work buffer for a small read-back.

use crate::gpu::context::GpuContext;

pub const ENTRY: &str = "squares";

/// Half the side of the square the kernel cuts (its `SQUARE_SIDE` is `2·SQUARE_HALF + 1`).
pub const SQUARE_HALF: usize = 15;

/// Record the squares of `n` stamps into `pass` (bind group already set; `convolve`,
/// `fit` and `difference_score` recorded before).
pub fn record(ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, n: u32) {
    let side = (2 * SQUARE_HALF + 1) as u32;
    pass.set_pipeline(&ctx.pipelines.squares);
    pass.dispatch_workgroups((side * side).div_ceil(super::WORKGROUP_SIZE), n, 1);
}
