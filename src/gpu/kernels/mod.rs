//! One dispatcher per WGSL kernel (`shaders/<k>.wgsl`, twin `cpu::<k>`), plus the layout every
//! engine shader shares: the uniform [`BatchParams`], the per-stamp [`StampGpu`] array, and the
//! plane indices of the packed `pix` (inputs) and `work` (intermediates) buffers.
//!
//! Everything for a batch lives in four storage buffers (GL exposes as few as four per stage):
//! `pix` (6 planes of `n * npix` f32), `stamps`, `work` (7 planes) and `results`
//! ([`RESULT_STRIDE`] f32 per stamp).

pub mod al;
pub mod convolve;
pub mod difference_score;
pub mod fit;
pub mod frame;
pub mod frame_stamps;
pub mod ring;
pub mod squares;
pub mod stack;

use crate::engine::{EngineError, StampParams};
use crate::gpu::context::GpuContext;

/// An error of the adapter `ctx` (its name first).
pub(crate) fn gpu_err(ctx: &GpuContext, what: impl std::fmt::Display) -> EngineError {
    EngineError::Gpu(format!("{}: {what}", ctx.adapter_name()))
}

/// Every `(what, the adapter's limit, what the kernels need)` is met, or an error naming the
/// first that is not: "`kernels` need N what, the adapter has M".
pub(crate) fn check_limits(ctx: &GpuContext, kernels: &str, need: &[(&str, u32, u32)]) -> Result<(), EngineError> {
    match need.iter().find(|(_, has, needs)| has < needs) {
        Some((what, has, needs)) => Err(gpu_err(ctx, format!("{kernels} need {needs} {what}, the adapter has {has}"))),
        None => Ok(()),
    }
}

/// A compute pipeline of `source`'s `entry_point` and its bind-group layout: binding 0 a
/// uniform, then one storage buffer per entry of `read_only` (bindings 1, 2, …).
pub(crate) fn compute_pipeline(dev: &wgpu::Device, label: &str, source: String, entry_point: &str, read_only: &[bool]) -> (wgpu::BindGroupLayout, wgpu::ComputePipeline) {
    let entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    };
    let mut entries = vec![entry(0, wgpu::BufferBindingType::Uniform)];
    entries.extend(read_only.iter().enumerate().map(|(k, &ro)| entry(k as u32 + 1, wgpu::BufferBindingType::Storage { read_only: ro })));
    let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(label), entries: &entries });
    let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: Some(label), bind_group_layouts: &[Some(&layout)], immediate_size: 0 });
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(source.into()) });
    let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: Some(&pl),
        module: &module,
        entry_point: Some(entry_point),
        compilation_options: Default::default(),
        cache: None,
    });
    (layout, pipe)
}

/// Read back `floats` f32 from a mappable buffer.
pub(crate) fn read_floats(ctx: &GpuContext, buf: &wgpu::Buffer, floats: usize) -> Result<Vec<f32>, EngineError> {
    let mut out = vec![0.0f32; floats];
    read_into(ctx, buf, &mut out)?;
    Ok(out)
}

/// Read back `dst.len()` f32 from a mappable buffer into `dst` (one copy).
pub(crate) fn read_into(ctx: &GpuContext, buf: &wgpu::Buffer, dst: &mut [f32]) -> Result<(), EngineError> {
    let slice = buf.slice(0..(dst.len() * 4) as u64);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| gpu_err(ctx, format!("poll: {e}")))?;
    rx.recv().map_err(|e| gpu_err(ctx, format!("map callback: {e}")))?.map_err(|e| gpu_err(ctx, format!("map: {e}")))?;
    {
        let view = slice.get_mapped_range().map_err(|e| gpu_err(ctx, format!("mapped range: {e}")))?;
        bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(&view);
    }
    buf.unmap();
    Ok(())
}

/// Field names of a WGSL struct (scalar fields only, 4 bytes each), for the tests that keep the
/// Rust mirrors of the shaders' structs in step.
#[cfg(test)]
pub(crate) fn wgsl_fields(src: &str, name: &str) -> Vec<String> {
    let start = src.find(&format!("struct {name} {{")).expect("struct in shader");
    let body = &src[start..];
    let body = &body[body.find('{').expect("{") + 1..body.find('}').expect("}")];
    body.lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .map(|l| {
            let (field, ty) = l.split_once(':').expect("field: type");
            let ty = ty.trim().trim_end_matches(',');
            assert!(ty == "u32" || ty == "f32" || ty == "i32", "scalar field {l}");
            field.trim().to_string()
        })
        .collect()
}

/// Invocations per workgroup (keep in sync with `WG` in every `shaders/*.wgsl`).
pub const WORKGROUP_SIZE: u32 = 256;

/// Per-dispatch shape (keep in sync with `struct BatchParams` in every `shaders/*.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BatchParams {
    pub width: u32,
    pub height: u32,
    /// Stamps in this dispatch.
    pub n: u32,
    /// Pixels per stamp.
    pub npix: u32,
}

/// Per-stamp parameters (keep in sync with `struct StampGpu` in every `shaders/*.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StampGpu {
    pub kernel_sigma: f32,
    pub cand_x: f32,
    pub cand_y: f32,
    pub fit_radius: f32,
    pub fixed_scale: f32,
}

impl From<&StampParams> for StampGpu {
    fn from(p: &StampParams) -> StampGpu {
        StampGpu {
            kernel_sigma: p.kernel_sigma,
            cand_x: p.cand_x,
            cand_y: p.cand_y,
            fit_radius: p.fit_radius,
            fixed_scale: p.fixed_scale,
        }
    }
}

/// Planes of the `pix` buffer (keep in sync with `PIX_*` in `shaders/*.wgsl`).
#[derive(Debug, Clone, Copy)]
pub enum Pix {
    Science = 0,
    Template = 1,
    ScienceVar = 2,
    TemplateVar = 3,
    Weight = 4,
    Profile = 5,
}
pub const PIX_PLANES: usize = 6;

/// Planes of the `work` buffer (keep in sync with `WORK_*` in `shaders/*.wgsl`).
#[derive(Debug, Clone, Copy)]
pub enum Work {
    RowT = 0,
    RowW = 1,
    RowV = 2,
    ConvT = 3,
    ConvV = 4,
    Diff = 5,
    Var = 6,
}
pub const WORK_PLANES: usize = 7;

/// f32 per stamp in `results`: scale, background, flux, flux_err, score, num, den, fit status
/// (keep in sync with `RESULT_STRIDE` in `shaders/*.wgsl`).
pub const RESULT_STRIDE: usize = 8;

/// Declarations every kernel shares (`shaders/shared/batch.wgsl`).
pub const SHARED_WGSL: &str = include_str!("../../../shaders/shared/batch.wgsl");

/// A kernel's complete WGSL module: the shared declarations, then the kernel.
pub fn shader_source(kernel: &str) -> Option<String> {
    SHADERS.iter().find(|(k, _)| *k == kernel).map(|(_, s)| format!("{SHARED_WGSL}\n{s}"))
}

/// The WGSL sources of the kernels (without the shared declarations), by kernel name.
pub const SHADERS: [(&str, &str); 4] = [
    ("convolve", include_str!("../../../shaders/convolve.wgsl")),
    ("fit", include_str!("../../../shaders/fit.wgsl")),
    ("difference_score", include_str!("../../../shaders/difference_score.wgsl")),
    ("squares", include_str!("../../../shaders/squares.wgsl")),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgsl_structs_match_rust_sizes() {
        for (kernel, _) in SHADERS {
            let src = &shader_source(kernel).expect("known kernel");
            let b = wgsl_fields(src, "BatchParams");
            assert_eq!(b, ["width", "height", "n", "npix"], "{kernel}");
            assert_eq!(4 * b.len(), std::mem::size_of::<BatchParams>(), "{kernel}");
            let s = wgsl_fields(src, "StampGpu");
            assert_eq!(s, ["kernel_sigma", "cand_x", "cand_y", "fit_radius", "fixed_scale"], "{kernel}");
            assert_eq!(4 * s.len(), std::mem::size_of::<StampGpu>(), "{kernel}");
            assert!(src.contains(&format!("const WG: u32 = {WORKGROUP_SIZE}u;")), "{kernel}");
            assert!(src.contains(&format!("const RESULT_STRIDE: u32 = {RESULT_STRIDE}u;")), "{kernel}");
            for (name, v) in [("PIX_PROFILE", Pix::Profile as usize), ("WORK_VAR", Work::Var as usize)] {
                assert!(src.contains(&format!("const {name}: u32 = {v}u;")), "{kernel}: {name}");
            }
        }
        let side = 2 * squares::SQUARE_HALF + 1;
        assert!(shader_source("squares").unwrap().contains(&format!("const SQUARE_SIDE: u32 = {side}u;")), "squares: SQUARE_SIDE");
        // The history's square is the one the kernel cuts (else the engine cuts on the host).
        assert_eq!(squares::SQUARE_HALF, crate::engine::STORED_HALF);
        assert_eq!(PIX_PLANES, Pix::Profile as usize + 1);
        assert_eq!(WORK_PLANES, Work::Var as usize + 1);
    }
}
