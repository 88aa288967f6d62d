//! Dispatchers for the whole-frame kernels (`shaders/frame/*.wgsl`, CPU twins in `cpu::frame`):
//! the per-pixel stages of a frame subtraction on planes that stay on the device.
//!
//! - `frame_prepare.wgsl`: smoothed variance and saturation mask of an image
//!   ([`GpuEngine::frame_prepare`]);
//! - `frame_mesh.wgsl`: the sky mesh taken off an image ([`GpuEngine::frame_sky_subtract`]), a
//!   difference's residual background ([`GpuEngine::frame_subtract_residual_background`]), the
//!   map itself ([`GpuEngine::frame_mesh_background`]);
//! - `frame_grow.wgsl`: a mask grown by a square ([`GpuEngine::frame_grow`]);
//! - `frame_score.wgsl`: the matched filter with any odd profile, separable or not
//!   ([`GpuEngine::frame_score`]);
//! - `frame_assemble.wgsl`: an Alard–Lupton difference and its variance from resident planes
//!   ([`GpuEngine::frame_al_difference`], [`GpuEngine::frame_al_variance`],
//!   [`GpuEngine::frame_mask_zero`]), the pixels a prepared image cannot use
//!   ([`GpuEngine::frame_bad_mask`]) and NaN on a product's masked pixels
//!   ([`GpuEngine::frame_nan_unless`]); the frame convolution itself is `shaders/al/al_convolve.wgsl`
//!   on resident planes ([`GpuEngine::frame_al_convolve`]);
//! - `frame_stamps.wgsl`: the Alard–Lupton fit's stars found and cut on the device
//!   (dispatchers in [`super::frame_stamps`]).
//!
//! A frame is uploaded once as a [`GpuPlane`]; each call records its dispatches and submits
//! without waiting, so a chain of calls runs back to back on the device, and only what the
//! caller reads ([`GpuEngine::frame_read`], [`GpuEngine::frame_read_score`]) comes back.
//! Every kernel binds the same layout: a uniform [`FrameParams`], a uniform block of taps and
//! four storage buffers (GL's minimum per stage), each entry point naming their roles.

use std::num::NonZeroU64;

use wgpu::util::DeviceExt;

use crate::cpu::frame::Profile;
use crate::detect::frame::ScoreImage;
use super::{check_limits, gpu_err};
use crate::engine::EngineError;
use crate::gpu::context::GpuContext;
use crate::gpu::GpuEngine;

/// `shaders/frame/shared/frame_params.wgsl`: `FrameParams`, the workgroup constants and the two
/// uniforms, prepended to every kernel below when its module is built.
pub const PARAMS_WGSL: &str = include_str!("../../../shaders/frame/shared/frame_params.wgsl");
/// `shaders/frame/frame_score.wgsl`.
pub const SCORE_WGSL: &str = include_str!("../../../shaders/frame/frame_score.wgsl");
/// `shaders/frame/frame_mesh.wgsl`.
pub const MESH_WGSL: &str = include_str!("../../../shaders/frame/frame_mesh.wgsl");
/// `shaders/frame/frame_prepare.wgsl`.
pub const PREPARE_WGSL: &str = include_str!("../../../shaders/frame/frame_prepare.wgsl");
/// `shaders/frame/frame_grow.wgsl`.
pub const GROW_WGSL: &str = include_str!("../../../shaders/frame/frame_grow.wgsl");
/// `shaders/frame/frame_assemble.wgsl`.
pub const ASSEMBLE_WGSL: &str = include_str!("../../../shaders/frame/frame_assemble.wgsl");
/// `shaders/frame/frame_stamps.wgsl` (dispatchers in `super::frame_stamps`).
pub const STAMPS_WGSL: &str = include_str!("../../../shaders/frame/frame_stamps.wgsl");

// Keep in sync with the constants of the same names in shaders/frame/*.wgsl.
/// Invocations per workgroup along x and y of the per-pixel entry points.
pub const WG_X: u32 = 16;
pub const WG_Y: u32 = 16;
/// Taps in the uniform `taps` block (a separable profile's half-width is at most 127).
pub const MAX_TAPS: usize = 256;
/// Invocations of the mesh and reduction workgroups.
pub const MESH_WG: u32 = 256;

/// Parameters of one dispatch (keep in sync with `struct FrameParams` in
/// `shaders/frame/*.wgsl`); what each field means is said at each kernel.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FrameParams {
    pub width: u32,
    pub height: u32,
    pub mode: u32,
    pub radius: u32,
    pub mesh: u32,
    pub mx: u32,
    pub my: u32,
    pub count: u32,
    pub side: u32,
    /// Bits of the NaN and +∞ written (uniforms, so no such constant reaches naga's folding).
    pub nan_bits: u32,
    pub inf_bits: u32,
    pub pad: u32,
    pub f0: f32,
    pub f1: f32,
    pub f2: f32,
    pub f3: f32,
}

impl FrameParams {
    pub(super) fn new(w: usize, h: usize) -> FrameParams {
        FrameParams { width: w as u32, height: h as u32, nan_bits: f32::NAN.to_bits(), inf_bits: f32::INFINITY.to_bits(), ..Default::default() }
    }
}

/// What a plane holds: f32 values, or a mask as u32 (1 = set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaneKind {
    Values,
    Mask,
}

/// A `width × height` plane resident on the device. Give it back with
/// [`GpuEngine::frame_release`] to reuse its memory (dropping it frees it).
#[derive(Debug)]
pub struct GpuPlane {
    pub(super) buf: wgpu::Buffer,
    pub width: usize,
    pub height: usize,
    pub kind: PlaneKind,
}

impl GpuPlane {
    pub(super) fn bytes(&self) -> u64 {
        (self.width * self.height * 4) as u64
    }
}

/// Bytes of whole planes the frame API moved between the host and the device since the engine
/// was made: [`GpuEngine::frame_upload`] and [`GpuEngine::frame_upload_mask`] one way, the
/// read-backs ([`GpuEngine::frame_read`] and the like) the other. Small uniforms (parameters,
/// taps, kernels) are not counted. Transfers, not kernels, are what a 4096² frame costs on a
/// real GPU (~67 MB a plane), so this is what the resident paths are checked by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameTraffic {
    pub uploaded: u64,
    pub read_back: u64,
    /// Bytes the Alard–Lupton fit read back instead of planes: its stars' lists, the samples
    /// of the template and of the variances, the squares around the stars
    /// ([`super::frame_stamps`]). Not in `read_back`.
    pub fit_read: u64,
}

/// The matched filter's planes on the device ([`GpuEngine::frame_score`]).
#[derive(Debug)]
pub struct GpuScore {
    pub score: GpuPlane,
    pub flux: GpuPlane,
    pub flux_err: GpuPlane,
    /// Half-width of the profile, pixels.
    pub radius: usize,
}

/// The frame layout and pipelines, built once per engine.
#[derive(Debug)]
pub struct FramePipelines {
    layout: wgpu::BindGroupLayout,
    score_rows: wgpu::ComputePipeline,
    score_cols: wgpu::ComputePipeline,
    score_prep: wgpu::ComputePipeline,
    score_full: wgpu::ComputePipeline,
    score_reduce: wgpu::ComputePipeline,
    score_finish: wgpu::ComputePipeline,
    mesh_cells: wgpu::ComputePipeline,
    mesh_fill: wgpu::ComputePipeline,
    mesh_apply: wgpu::ComputePipeline,
    prepare: wgpu::ComputePipeline,
    grow_rows: wgpu::ComputePipeline,
    grow_cols: wgpu::ComputePipeline,
    pack_mask: wgpu::ComputePipeline,
    mask_zero: wgpu::ComputePipeline,
    al_difference: wgpu::ComputePipeline,
    al_variance: wgpu::ComputePipeline,
    bad_mask: wgpu::ComputePipeline,
    nan_unless: wgpu::ComputePipeline,
    pub(super) stamp_peaks: wgpu::ComputePipeline,
    pub(super) stamp_usable: wgpu::ComputePipeline,
    pub(super) stamp_squares: wgpu::ComputePipeline,
    pub(super) stamp_sample: wgpu::ComputePipeline,
    pub(super) sample_hist: wgpu::ComputePipeline,
    /// `al_convolve` on resident planes (its own layout), built on first use: it needs more
    /// workgroup memory than the rest.
    al: Option<(wgpu::BindGroupLayout, wgpu::ComputePipeline)>,
    /// Bound where an entry point leaves a storage slot unused.
    dummy: [wgpu::Buffer; 4],
}

pub(super) fn bad(what: impl Into<String>) -> EngineError {
    EngineError::BadStamp(what.into())
}

impl FramePipelines {
    /// Check the adapter's limits against what the shaders need, then build the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<FramePipelines, EngineError> {
        let l = &ctx.limits;
        let need = [
            ("invocations per workgroup", l.max_compute_invocations_per_workgroup, MESH_WG.max(WG_X * WG_Y)),
            ("workgroup size x", l.max_compute_workgroup_size_x, MESH_WG),
            ("workgroup size y", l.max_compute_workgroup_size_y, WG_Y),
            ("storage buffers per stage", l.max_storage_buffers_per_shader_stage, 4),
            ("uniform buffers per stage", l.max_uniform_buffers_per_shader_stage, 2),
            ("workgroup memory bytes", l.max_compute_workgroup_storage_size, 2048),
        ];
        check_limits(ctx, "the frame kernels", &need)?;
        let dev = &ctx.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffer = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
            count: None,
        };
        let rw = wgpu::BufferBindingType::Storage { read_only: false };
        let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("blink.frame"),
            entries: &[
                buffer(0, wgpu::BufferBindingType::Uniform),
                buffer(1, wgpu::BufferBindingType::Uniform),
                buffer(2, rw),
                buffer(3, rw),
                buffer(4, rw),
                buffer(5, rw),
            ],
        });
        let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: Some("blink.frame"), bind_group_layouts: &[Some(&layout)], immediate_size: 0 });
        let module = |label: &str, src: &str| dev.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(format!("{PARAMS_WGSL}\n{src}").into()) });
        let (score, mesh, prep, grow) =
            (module("blink.frame_score", SCORE_WGSL), module("blink.frame_mesh", MESH_WGSL), module("blink.frame_prepare", PREPARE_WGSL), module("blink.frame_grow", GROW_WGSL));
        let assemble = module("blink.frame_assemble", ASSEMBLE_WGSL);
        let stamps = module("blink.frame_stamps", STAMPS_WGSL);
        let pipeline = |m: &wgpu::ShaderModule, entry: &str| {
            dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("blink.{entry}")),
                layout: Some(&pl),
                module: m,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let dummy = std::array::from_fn(|_| {
            dev.create_buffer(&wgpu::BufferDescriptor { label: Some("blink.frame.unused"), size: 256, usage: wgpu::BufferUsages::STORAGE, mapped_at_creation: false })
        });
        let p = FramePipelines {
            score_rows: pipeline(&score, "score_rows"),
            score_cols: pipeline(&score, "score_cols"),
            score_prep: pipeline(&score, "score_prep"),
            score_full: pipeline(&score, "score_full"),
            score_reduce: pipeline(&score, "score_reduce"),
            score_finish: pipeline(&score, "score_finish"),
            mesh_cells: pipeline(&mesh, "mesh_cells"),
            mesh_fill: pipeline(&mesh, "mesh_fill"),
            mesh_apply: pipeline(&mesh, "mesh_apply"),
            prepare: pipeline(&prep, "prepare"),
            grow_rows: pipeline(&grow, "grow_rows"),
            grow_cols: pipeline(&grow, "grow_cols"),
            pack_mask: pipeline(&grow, "pack_mask"),
            mask_zero: pipeline(&assemble, "mask_zero"),
            al_difference: pipeline(&assemble, "al_difference"),
            al_variance: pipeline(&assemble, "al_variance"),
            bad_mask: pipeline(&assemble, "bad_mask"),
            nan_unless: pipeline(&assemble, "nan_unless"),
            stamp_peaks: pipeline(&stamps, "stamp_peaks"),
            stamp_usable: pipeline(&stamps, "stamp_usable"),
            stamp_squares: pipeline(&stamps, "stamp_squares"),
            stamp_sample: pipeline(&stamps, "stamp_sample"),
            sample_hist: pipeline(&stamps, "sample_hist"),
            al: None,
            layout,
            dummy,
        };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(ctx, format!("building the frame pipelines: {e}")));
        }
        Ok(p)
    }
}

/// One dispatch: pipeline, parameters, taps, storage buffers (with the bytes bound; `None`:
/// unused) and workgroup counts.
pub(super) struct Step<'a> {
    pub(super) pipe: &'a wgpu::ComputePipeline,
    pub(super) prm: FrameParams,
    pub(super) taps: &'a [f32],
    pub(super) bufs: [Option<(&'a wgpu::Buffer, u64)>; 4],
    pub(super) groups: (u32, u32),
}

/// Record `steps` in one compute pass and submit them (no wait).
pub(super) fn submit(ctx: &GpuContext, p: &FramePipelines, steps: &[Step<'_>]) -> Result<(), EngineError> {
    let dev = &ctx.device;
    let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
    let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let binds: Vec<wgpu::BindGroup> = steps
        .iter()
        .map(|s| {
            let mut taps = [0.0f32; MAX_TAPS];
            let n = s.taps.len().min(MAX_TAPS);
            taps[..n].copy_from_slice(&s.taps[..n]);
            let u_prm = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("blink.frame.params"), contents: bytemuck::bytes_of(&s.prm), usage: wgpu::BufferUsages::UNIFORM });
            let u_taps = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("blink.frame.taps"), contents: bytemuck::cast_slice(&taps), usage: wgpu::BufferUsages::UNIFORM });
            let storage = |k: usize| match s.bufs[k] {
                Some((b, bytes)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: b, offset: 0, size: NonZeroU64::new(bytes.max(4)) }),
                None => p.dummy[k].as_entire_binding(),
            };
            dev.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("blink.frame"),
                layout: &p.layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: u_prm.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: u_taps.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: storage(0) },
                    wgpu::BindGroupEntry { binding: 3, resource: storage(1) },
                    wgpu::BindGroupEntry { binding: 4, resource: storage(2) },
                    wgpu::BindGroupEntry { binding: 5, resource: storage(3) },
                ],
            })
        })
        .collect();
    let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.frame") });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.frame"), timestamp_writes: None });
        for (s, b) in steps.iter().zip(&binds) {
            pass.set_pipeline(s.pipe);
            pass.set_bind_group(0, b, &[]);
            pass.dispatch_workgroups(s.groups.0, s.groups.1, 1);
        }
    }
    ctx.queue.submit([enc.finish()]);
    let oom_err = pollster::block_on(oom.pop());
    let val_err = pollster::block_on(val.pop());
    match (val_err, oom_err) {
        (Some(e), _) | (None, Some(e)) => Err(gpu_err(ctx, e)),
        (None, None) => Ok(()),
    }
}

/// Workgroups covering a `w × h` plane with the per-pixel entry points.
pub(super) fn pixel_groups(w: usize, h: usize) -> (u32, u32) {
    (w.div_ceil(WG_X as usize) as u32, h.div_ceil(WG_Y as usize) as u32)
}

impl GpuEngine {
    fn frame_pipelines(&mut self) -> Result<(), EngineError> {
        if self.frame.is_none() {
            self.frame = Some(FramePipelines::new(&self.ctx)?);
        }
        Ok(())
    }

    /// The pipelines and context, built on first use.
    pub(super) fn frame_parts(&mut self) -> Result<(&GpuContext, &FramePipelines), EngineError> {
        self.frame_pipelines()?;
        match self.frame.as_ref() {
            Some(p) => Ok((&self.ctx, p)),
            None => Err(EngineError::Gpu("frame pipelines missing".into())),
        }
    }

    /// Largest storage binding of the adapter, bytes.
    fn frame_binding_cap(&self) -> u64 {
        let l = &self.ctx.limits;
        l.max_storage_buffer_binding_size.min(l.max_buffer_size)
    }

    /// A device buffer of at least `bytes` (from the pool), checked against one binding.
    pub(super) fn frame_buffer(&mut self, label: &str, bytes: u64) -> Result<wgpu::Buffer, EngineError> {
        let cap = self.frame_binding_cap();
        if bytes > cap || crate::gpu::pool::size_class(bytes) > self.ctx.limits.max_buffer_size {
            return Err(gpu_err(&self.ctx, format!("{label}: {bytes} bytes exceed a storage binding of {cap} bytes")));
        }
        use wgpu::BufferUsages as U;
        Ok(self.pool.acquire(&self.ctx.device, label, bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC))
    }

    fn frame_plane(&mut self, label: &str, w: usize, h: usize, kind: PlaneKind) -> Result<GpuPlane, EngineError> {
        if w == 0 || h == 0 || u32::try_from(w * h).is_err() {
            return Err(bad(format!("a {w}x{h} frame")));
        }
        let buf = self.frame_buffer(label, (w * h * 4) as u64)?;
        Ok(GpuPlane { buf, width: w, height: h, kind })
    }

    /// `data` (`w × h`) onto the device.
    pub fn frame_upload(&mut self, data: &[f32], w: usize, h: usize) -> Result<GpuPlane, EngineError> {
        if data.len() != w * h {
            return Err(bad(format!("{} pixels for a {w}x{h} frame", data.len())));
        }
        let p = self.frame_plane("blink.frame.plane", w, h, PlaneKind::Values)?;
        self.ctx.queue.write_buffer(&p.buf, 0, bytemuck::cast_slice(data));
        self.traffic.uploaded += p.bytes();
        Ok(p)
    }

    /// A mask (`w × h`) onto the device.
    pub fn frame_upload_mask(&mut self, mask: &[bool], w: usize, h: usize) -> Result<GpuPlane, EngineError> {
        if mask.len() != w * h {
            return Err(bad(format!("{} mask pixels for a {w}x{h} frame", mask.len())));
        }
        let p = self.frame_plane("blink.frame.mask", w, h, PlaneKind::Mask)?;
        let bits: Vec<u32> = mask.iter().map(|&b| b as u32).collect();
        self.ctx.queue.write_buffer(&p.buf, 0, bytemuck::cast_slice(&bits));
        self.traffic.uploaded += p.bytes();
        Ok(p)
    }

    /// Give a plane's memory back for the next frame.
    pub fn frame_release(&mut self, p: GpuPlane) {
        self.pool.release(p.buf);
    }

    /// Read planes back (waits for the device), as raw 32-bit words each.
    pub(super) fn frame_read_words(&mut self, planes: &[&GpuPlane]) -> Result<Vec<Vec<u32>>, EngineError> {
        let mut out = Vec::with_capacity(planes.len());
        self.frame_read_with(planes, |_, words| out.push(words.to_vec()))?;
        Ok(out)
    }

    /// A plane of values back into `out` (`width × height` values), which the caller may reuse
    /// from frame to frame: a new 67 MB `Vec` costs its page faults on top of the copy (on a
    /// 2-core VM 42–52 ms against 8–12 ms into memory already touched; the `transfer/*` lines
    /// of `benches/frame_gpu.rs` measure both on a device).
    pub fn frame_read_into(&mut self, p: &GpuPlane, out: &mut [f32]) -> Result<(), EngineError> {
        if out.len() != p.width * p.height {
            return Err(bad(format!("{} values for a {}x{} plane", out.len(), p.width, p.height)));
        }
        self.frame_read_with(&[p], |_, words| out.copy_from_slice(bytemuck::cast_slice(words)))
    }

    /// Copy `planes` into one mapped buffer, wait, and hand each plane's words to `each` in order.
    fn frame_read_with(&mut self, planes: &[&GpuPlane], mut each: impl FnMut(usize, &[u32])) -> Result<(), EngineError> {
        let total: u64 = planes.iter().map(|p| p.bytes()).sum();
        if total == 0 {
            for (i, _) in planes.iter().enumerate() {
                each(i, &[]);
            }
            return Ok(());
        }
        use wgpu::BufferUsages as U;
        let read = self.pool.acquire(&self.ctx.device, "blink.frame.readback", total, U::MAP_READ | U::COPY_DST);
        let ctx = &self.ctx;
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.frame.read") });
        let mut off = 0;
        for p in planes {
            enc.copy_buffer_to_buffer(&p.buf, 0, &read, off, p.bytes());
            off += p.bytes();
        }
        ctx.queue.submit([enc.finish()]);
        let slice = read.slice(0..total);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let result = ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| gpu_err(ctx, format!("poll: {e}")))
            .and_then(|_| rx.recv().map_err(|e| gpu_err(ctx, format!("map callback: {e}"))))
            .and_then(|r| r.map_err(|e| gpu_err(ctx, format!("map: {e}"))))
            .and_then(|_| {
                let view = slice.get_mapped_range().map_err(|e| gpu_err(ctx, format!("mapped range: {e}")))?;
                let words: &[u32] = bytemuck::cast_slice(&view);
                let mut at = 0;
                for (i, p) in planes.iter().enumerate() {
                    let n = p.width * p.height;
                    each(i, &words[at..at + n]);
                    at += n;
                }
                Ok(())
            });
        if result.is_ok() {
            read.unmap();
            self.traffic.read_back += total;
        }
        self.pool.release(read);
        result
    }

    /// [`GpuEngine::frame_read_words`] for the fit's small reads: counted in
    /// [`FrameTraffic::fit_read`], not as planes.
    pub(super) fn frame_read_fit(&mut self, planes: &[&GpuPlane]) -> Result<Vec<Vec<u32>>, EngineError> {
        let before = self.traffic.read_back;
        let out = self.frame_read_words(planes);
        let moved = self.traffic.read_back - before;
        self.traffic.read_back = before;
        self.traffic.fit_read += moved;
        out
    }

    /// Whole planes moved so far ([`FrameTraffic`]).
    pub fn frame_traffic(&self) -> FrameTraffic {
        self.traffic
    }

    /// Several planes back on the host in one transfer, as f32 each (a mask's words as the
    /// f32 of the same bits: 0 clear, non-zero set).
    pub fn frame_read_all(&mut self, planes: &[&GpuPlane]) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self.frame_read_words(planes)?.into_iter().map(|v| v.into_iter().map(f32::from_bits).collect()).collect())
    }

    /// A plane of values back on the host.
    pub fn frame_read(&mut self, p: &GpuPlane) -> Result<Vec<f32>, EngineError> {
        let mut w = self.frame_read_words(&[p])?;
        Ok(w.pop().unwrap_or_default().into_iter().map(f32::from_bits).collect())
    }

    /// A mask plane back on the host, packed 32 pixels a word on the device first (twin
    /// `cpu::frame::pack_mask`): 1/32 of [`GpuEngine::frame_read_mask`]'s bytes.
    pub fn frame_read_mask_packed(&mut self, p: &GpuPlane) -> Result<Vec<bool>, EngineError> {
        let n = p.width * p.height;
        let words = n.div_ceil(32);
        // Words as a grid of `mx` columns, so no dispatch dimension passes the 65 535 limit.
        let mx = words.min(1024);
        let rows = words.div_ceil(mx);
        let packed = GpuPlane { buf: self.frame_buffer("blink.frame.packed", (words * 4) as u64)?, width: words, height: 1, kind: PlaneKind::Mask };
        let run = (|| {
            let (ctx, pl) = self.frame_parts()?;
            let prm = FrameParams { mx: mx as u32, count: words as u32, ..FrameParams::new(p.width, p.height) };
            let step = Step { pipe: &pl.pack_mask, prm, taps: &[], bufs: [Some((&p.buf, p.bytes())), Some((&packed.buf, packed.bytes())), None, None], groups: pixel_groups(mx, rows) };
            submit(ctx, pl, &[step])?;
            let mut w = self.frame_read_words(&[&packed])?;
            Ok(crate::cpu::frame::unpack_mask(&w.pop().unwrap_or_default(), n))
        })();
        self.frame_release(packed);
        run
    }

    /// A mask plane back on the host.
    pub fn frame_read_mask(&mut self, p: &GpuPlane) -> Result<Vec<bool>, EngineError> {
        let mut w = self.frame_read_words(&[p])?;
        Ok(w.pop().unwrap_or_default().into_iter().map(|v| v != 0).collect())
    }

    /// Wait until everything submitted has run (for timing).
    pub fn frame_wait(&self) -> Result<(), EngineError> {
        self.ctx.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| gpu_err(&self.ctx, format!("poll: {e}")))
    }

    /// Smoothed variance (`max(v̄, 0)/gain + rn2`, v̄ the 3×3 mean of finite pixels; NaN where
    /// the pixel is not finite) and saturation mask (value ≥ `saturation`) of `img` (twins:
    /// `cpu::frame::{variance_smoothed, saturation}`).
    pub fn frame_prepare(&mut self, img: &GpuPlane, gain: f64, rn2: f64, saturation: Option<f32>) -> Result<(GpuPlane, GpuPlane), EngineError> {
        let (w, h) = (img.width, img.height);
        if gain.is_nan() || gain <= 0.0 || !rn2.is_finite() {
            return Err(bad(format!("gain {gain}, read noise² {rn2}")));
        }
        let var = self.frame_plane("blink.frame.variance", w, h, PlaneKind::Values)?;
        let sat = self.frame_plane("blink.frame.saturated", w, h, PlaneKind::Mask)?;
        let (ctx, p) = self.frame_parts()?;
        let mut prm = FrameParams::new(w, h);
        prm.f0 = gain as f32;
        prm.f1 = rn2 as f32;
        if let Some(s) = saturation {
            prm.mode = 1;
            prm.f2 = s;
        }
        let step = Step { pipe: &p.prepare, prm, taps: &[], bufs: [Some((&img.buf, img.bytes())), Some((&var.buf, var.bytes())), Some((&sat.buf, sat.bytes())), None], groups: pixel_groups(w, h) };
        submit(ctx, p, &[step])?;
        Ok((var, sat))
    }

    /// The mesh kernels: cell medians of `d` where `valid` says (`cell_mode` 0: a mask, valid
    /// where clear; 1: a variance, valid where > 0; with `clip_k2` = κ² > 0 in mode 1 the
    /// median is taken again within κ·sqrt(variance) of the first), the fill, then `mesh_apply` in `apply_mode`:
    /// 0 writes `d` less the map to `out`, 1 takes the map off `d` in place, 2 writes the map to
    /// `out`.
    fn frame_mesh(&mut self, d: &GpuPlane, valid: &GpuPlane, mesh: usize, (cell_mode, clip_k2): (u32, f32), apply_mode: u32, out: Option<&GpuPlane>) -> Result<(), EngineError> {
        let (w, h) = (d.width, d.height);
        if (valid.width, valid.height) != (w, h) || out.is_some_and(|o| (o.width, o.height) != (w, h)) {
            return Err(bad(format!("planes of {w}x{h} and {}x{} for one mesh", valid.width, valid.height)));
        }
        let mesh = mesh.max(8);
        let (mx, my) = (w.div_ceil(mesh), h.div_ceil(mesh));
        let max_groups = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
        if mx > max_groups || my > max_groups {
            return Err(bad(format!("a {mx}x{my} mesh exceeds {max_groups} workgroups a dimension")));
        }
        let grid_bytes = ((mx * my + 1) * 4) as u64;
        let grid = self.frame_buffer("blink.frame.mesh", grid_bytes)?;
        let result = (|| {
            let (ctx, p) = self.frame_parts()?;
            let mut prm = FrameParams::new(w, h);
            prm.mesh = mesh as u32;
            prm.mx = mx as u32;
            prm.my = my as u32;
            let cells = FrameParams { mode: cell_mode, f0: clip_k2, ..prm };
            let apply = FrameParams { mode: apply_mode, ..prm };
            let bufs = [Some((&d.buf, d.bytes())), Some((&valid.buf, valid.bytes())), Some((&grid, grid_bytes)), out.map(|o| (&o.buf, o.bytes()))];
            submit(
                ctx,
                p,
                &[
                    Step { pipe: &p.mesh_cells, prm: cells, taps: &[], bufs, groups: (mx as u32, my as u32) },
                    Step { pipe: &p.mesh_fill, prm: cells, taps: &[], bufs, groups: (1, 1) },
                    Step { pipe: &p.mesh_apply, prm: apply, taps: &[], bufs, groups: pixel_groups(w, h) },
                ],
            )
        })();
        self.pool.release(grid);
        result
    }

    /// `img` less its sky: the median of `mesh`-px cells over the pixels not `saturated`,
    /// interpolated (twin: `img − cpu::frame::mesh_background(img, !saturated)`).
    pub fn frame_sky_subtract(&mut self, img: &GpuPlane, saturated: &GpuPlane, mesh: usize) -> Result<GpuPlane, EngineError> {
        let out = self.frame_plane("blink.frame.sky_subtracted", img.width, img.height, PlaneKind::Values)?;
        self.frame_mesh(img, saturated, mesh, (0, 0.0), 0, Some(&out))?;
        Ok(out)
    }

    /// Take a difference's residual background off in place: a `mesh`-px mesh median over the
    /// pixels with variance > 0, clipped at `detect::frame::RESIDUAL_BACKGROUND_CLIP` sigma,
    /// subtracted there, `detect::frame::RESIDUAL_BACKGROUND_PASSES`
    /// times (twin: `detect::frame::subtract_residual_background`); `mesh` 0 does nothing.
    pub fn frame_subtract_residual_background(&mut self, d: &GpuPlane, variance: &GpuPlane, mesh: usize) -> Result<(), EngineError> {
        if mesh == 0 {
            return Ok(());
        }
        for _ in 0..crate::detect::frame::RESIDUAL_BACKGROUND_PASSES {
            let k = crate::detect::frame::RESIDUAL_BACKGROUND_CLIP;
            self.frame_mesh(d, variance, mesh, (1, k * k), 1, None)?;
        }
        Ok(())
    }

    /// The background map itself (twin: `cpu::frame::mesh_background`), valid where `valid` is
    /// clear (a mask) or > 0 (a plane of values, a variance).
    pub fn frame_mesh_background(&mut self, d: &GpuPlane, valid: &GpuPlane, mesh: usize) -> Result<GpuPlane, EngineError> {
        let out = self.frame_plane("blink.frame.background", d.width, d.height, PlaneKind::Values)?;
        let mode = if valid.kind == PlaneKind::Mask { 0 } else { 1 };
        self.frame_mesh(d, valid, mesh, (mode, 0.0), 2, Some(&out))?;
        Ok(out)
    }

    /// `mask` grown by `r` pixels, a square of side `2r + 1` (twin: `cpu::frame::grow`).
    pub fn frame_grow(&mut self, mask: &GpuPlane, r: usize) -> Result<GpuPlane, EngineError> {
        let (w, h) = (mask.width, mask.height);
        let tmp = self.frame_plane("blink.frame.grow", w, h, PlaneKind::Mask)?;
        let out = self.frame_plane("blink.frame.grown", w, h, PlaneKind::Mask)?;
        let result = (|| {
            let (ctx, p) = self.frame_parts()?;
            let prm = FrameParams { radius: r.min(u32::MAX as usize) as u32, ..FrameParams::new(w, h) };
            let bufs = [Some((&mask.buf, mask.bytes())), Some((&tmp.buf, tmp.bytes())), Some((&out.buf, out.bytes())), None];
            let g = pixel_groups(w, h);
            submit(ctx, p, &[Step { pipe: &p.grow_rows, prm, taps: &[], bufs, groups: g }, Step { pipe: &p.grow_cols, prm, taps: &[], bufs, groups: g }])
        })();
        self.pool.release(tmp.buf);
        result.map(|_| out)
    }

    /// The matched filter of `d` with variance `v` and profile `p` (twin: `cpu::frame::score`):
    /// score, flux and error planes on the device; `inflate` divides the score and multiplies
    /// the error. A separable profile takes the two-pass route (half-width ≤ 127).
    pub fn frame_score(&mut self, d: &GpuPlane, v: &GpuPlane, profile: &Profile, inflate: f64) -> Result<GpuScore, EngineError> {
        let (w, h) = (d.width, d.height);
        if (v.width, v.height) != (w, h) {
            return Err(bad(format!("a {w}x{h} difference with a {}x{} variance", v.width, v.height)));
        }
        profile.check().map_err(bad)?;
        if !(inflate > 0.0 && inflate.is_finite()) {
            return Err(bad(format!("noise inflation {inflate}")));
        }
        let r = profile.radius();
        let g = pixel_groups(w, h);
        let ngroups = g.0 as usize * g.1 as usize;
        let scratch_bytes = match profile {
            Profile::Separable(t) if t.len() > MAX_TAPS => return Err(bad(format!("{} taps (GPU ≤ {MAX_TAPS})", t.len()))),
            Profile::Separable(_) => (2 * w * h * 4) as u64,
            Profile::Full { .. } => ((2 * w * h + ngroups + 1) * 4) as u64,
        };
        let scratch = self.frame_buffer("blink.frame.score_scratch", scratch_bytes)?;
        // The full route's (D/V, 1/V) plane and profile.
        let prof = match profile {
            Profile::Full { pixels, .. } => {
                let f: Vec<f32> = pixels.iter().map(|&x| x as f32).collect();
                let b = self.frame_buffer("blink.frame.profile", (f.len() * 4) as u64);
                let prep = self.frame_buffer("blink.frame.score_prep", (2 * w * h * 4) as u64);
                match (b, prep) {
                    (Ok(b), Ok(prep)) => {
                        self.ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(&f));
                        Some((b, (f.len() * 4) as u64, prep))
                    }
                    (b, prep) => {
                        for x in [b.as_ref().ok(), prep.as_ref().ok()].into_iter().flatten() {
                            self.pool.release(x.clone());
                        }
                        self.pool.release(scratch);
                        return Err(b.err().or(prep.err()).unwrap_or_else(|| EngineError::Gpu("score buffers".into())));
                    }
                }
            }
            Profile::Separable(_) => None,
        };
        let planes = (|| {
            Ok::<_, EngineError>((
                self.frame_plane("blink.frame.score", w, h, PlaneKind::Values)?,
                self.frame_plane("blink.frame.flux", w, h, PlaneKind::Values)?,
                self.frame_plane("blink.frame.flux_err", w, h, PlaneKind::Values)?,
            ))
        })();
        let result = planes.and_then(|(score, flux, err)| {
            let (ctx, p) = self.frame_parts()?;
            let prm = FrameParams { radius: r as u32, f0: inflate as f32, ..FrameParams::new(w, h) };
            let outs = [Some((&score.buf, score.bytes())), Some((&flux.buf, flux.bytes())), Some((&err.buf, err.bytes()))];
            let sc = (&scratch, scratch_bytes);
            let run = match (profile, &prof) {
                (Profile::Separable(t), _) => {
                    let taps: Vec<f32> = t.iter().map(|&x| x as f32).collect();
                    submit(
                        ctx,
                        p,
                        &[
                            Step { pipe: &p.score_rows, prm, taps: &taps, bufs: [Some((&d.buf, d.bytes())), Some((&v.buf, v.bytes())), Some(sc), None], groups: g },
                            Step { pipe: &p.score_cols, prm, taps: &taps, bufs: [Some(sc), outs[0], outs[1], outs[2]], groups: g },
                        ],
                    )
                }
                (Profile::Full { side, .. }, Some((pb, pbytes, prep))) => {
                    let full = FrameParams { side: *side as u32, count: g.0, mx: ngroups as u32, f1: crate::cpu::frame::DEN_FLOOR as f32, ..prm };
                    let pp = (prep, (2 * w * h * 4) as u64);
                    submit(
                        ctx,
                        p,
                        &[
                            Step { pipe: &p.score_prep, prm: full, taps: &[], bufs: [Some((&d.buf, d.bytes())), Some((&v.buf, v.bytes())), Some(pp), None], groups: g },
                            Step { pipe: &p.score_full, prm: full, taps: &[], bufs: [Some(pp), None, Some(sc), Some((pb, *pbytes))], groups: g },
                            Step { pipe: &p.score_reduce, prm: full, taps: &[], bufs: [None, None, Some(sc), None], groups: (1, 1) },
                            Step { pipe: &p.score_finish, prm: full, taps: &[], bufs: [Some(sc), outs[0], outs[1], outs[2]], groups: g },
                        ],
                    )
                }
                (Profile::Full { .. }, None) => Err(EngineError::Gpu("profile buffer missing".into())),
            };
            match run {
                Ok(()) => Ok(GpuScore { score, flux, flux_err: err, radius: r }),
                Err(e) => {
                    for b in [score, flux, err] {
                        self.frame_release(b);
                    }
                    Err(e)
                }
            }
        });
        self.pool.release(scratch);
        if let Some((b, _, prep)) = prof {
            self.pool.release(b);
            self.pool.release(prep);
        }
        result
    }

    /// The score planes back on the host as a [`ScoreImage`].
    pub fn frame_read_score(&mut self, s: &GpuScore) -> Result<ScoreImage, EngineError> {
        let mut w = self.frame_read_words(&[&s.score, &s.flux, &s.flux_err])?.into_iter().map(|v| v.into_iter().map(f32::from_bits).collect::<Vec<f32>>());
        let (score, flux, flux_err) = (w.next().unwrap_or_default(), w.next().unwrap_or_default(), w.next().unwrap_or_default());
        Ok(ScoreImage { score, flux, flux_err, radius: s.radius, psf_peak: 0.0 /* set by detect::frame::score_image */ })
    }

    /// Give the score planes back to the pool.
    pub fn frame_release_score(&mut self, s: GpuScore) {
        for p in [s.score, s.flux, s.flux_err] {
            self.frame_release(p);
        }
    }

    /// The matched filter of host planes: upload, [`GpuEngine::frame_score`], read back.
    pub fn frame_score_image(&mut self, d: &[f32], v: &[f32], w: usize, h: usize, profile: &Profile, inflate: f64) -> Result<ScoreImage, EngineError> {
        let dp = self.frame_upload(d, w, h)?;
        let vp = self.frame_upload(v, w, h)?;
        let s = self.frame_score(&dp, &vp, profile, inflate);
        self.frame_release(dp);
        self.frame_release(vp);
        let s = s?;
        let out = self.frame_read_score(&s);
        self.frame_release_score(s);
        out
    }
}

impl GpuEngine {
    /// A copy of a plane, on the device.
    pub fn frame_copy(&mut self, p: &GpuPlane) -> Result<GpuPlane, EngineError> {
        let out = self.frame_plane("blink.frame.copy", p.width, p.height, p.kind)?;
        let mut enc = self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.frame.copy") });
        enc.copy_buffer_to_buffer(&p.buf, 0, &out.buf, 0, p.bytes());
        self.ctx.queue.submit([enc.finish()]);
        Ok(out)
    }

    fn same_shape(a: &GpuPlane, others: &[&GpuPlane]) -> Result<(), EngineError> {
        match others.iter().find(|o| (o.width, o.height) != (a.width, a.height)) {
            Some(o) => Err(bad(format!("planes of {}x{} and {}x{}", a.width, a.height, o.width, o.height))),
            None => Ok(()),
        }
    }

    /// `p = 0` where `mask` is set, in place.
    pub fn frame_mask_zero(&mut self, p: &GpuPlane, mask: &GpuPlane) -> Result<(), EngineError> {
        Self::same_shape(p, &[mask])?;
        let (ctx, pl) = self.frame_parts()?;
        let step = Step { pipe: &pl.mask_zero, prm: FrameParams::new(p.width, p.height), taps: &[], bufs: [Some((&p.buf, p.bytes())), Some((&mask.buf, mask.bytes())), None, None], groups: pixel_groups(p.width, p.height) };
        submit(ctx, pl, &[step])
    }

    /// `p = NaN` wherever `guard` fails `keep`, in place (twin `cpu::frame::nan_unless`).
    pub fn frame_nan_unless(&mut self, p: &GpuPlane, guard: &GpuPlane, keep: crate::cpu::frame::Keep) -> Result<(), EngineError> {
        Self::same_shape(p, &[guard])?;
        let (ctx, pl) = self.frame_parts()?;
        let prm = FrameParams { mode: keep as u32, ..FrameParams::new(p.width, p.height) };
        let step = Step { pipe: &pl.nan_unless, prm, taps: &[], bufs: [Some((&p.buf, p.bytes())), None, Some((&guard.buf, guard.bytes())), None], groups: pixel_groups(p.width, p.height) };
        submit(ctx, pl, &[step])
    }

    /// The pixels of a prepared image that cannot be used (twin `cpu::frame::bad_mask`): a mask,
    /// set where `saturated` is set or `image` or `variance` is not finite or the variance not
    /// positive.
    pub fn frame_bad_mask(&mut self, image: &GpuPlane, variance: &GpuPlane, saturated: &GpuPlane) -> Result<GpuPlane, EngineError> {
        Self::same_shape(image, &[variance, saturated])?;
        let (w, h) = (image.width, image.height);
        let out = self.frame_plane("blink.frame.bad", w, h, PlaneKind::Mask)?;
        let (ctx, pl) = self.frame_parts()?;
        let bufs = [Some((&image.buf, image.bytes())), Some((&out.buf, out.bytes())), Some((&variance.buf, variance.bytes())), Some((&saturated.buf, saturated.bytes()))];
        submit(ctx, pl, &[Step { pipe: &pl.bad_mask, prm: FrameParams::new(w, h), taps: &[], bufs, groups: pixel_groups(w, h) }])?;
        Ok(out)
    }

    /// `(broad − model − bg) · m` where `guard > 0`, else 0 (the difference of
    /// `detect::al::subtract_al`; twin `cpu::frame::al_difference`); `bg` the background
    /// polynomial's `(coefficient, x power, y power)` terms (at most 85).
    pub fn frame_al_difference(&mut self, broad: &GpuPlane, model: &GpuPlane, guard: &GpuPlane, bg: &[(f64, usize, usize)], m: f64) -> Result<GpuPlane, EngineError> {
        Self::same_shape(broad, &[model, guard])?;
        if 3 * bg.len() > MAX_TAPS {
            return Err(bad(format!("{} background terms (GPU ≤ {})", bg.len(), MAX_TAPS / 3)));
        }
        let (w, h) = (broad.width, broad.height);
        let out = self.frame_plane("blink.frame.difference", w, h, PlaneKind::Values)?;
        let taps: Vec<f32> = bg.iter().flat_map(|&(c, p, q)| [c as f32, p as f32, q as f32]).collect();
        let (ctx, pl) = self.frame_parts()?;
        let prm = FrameParams { count: bg.len() as u32, f0: m as f32, ..FrameParams::new(w, h) };
        let bufs = [Some((&broad.buf, broad.bytes())), Some((&model.buf, model.bytes())), Some((&guard.buf, guard.bytes())), Some((&out.buf, out.bytes()))];
        submit(ctx, pl, &[Step { pipe: &pl.al_difference, prm, taps: &taps, bufs, groups: pixel_groups(w, h) }])?;
        Ok(out)
    }

    /// `(wu · guard + wc · kv + eps2 · model²) · m2` where `guard > 0`, else 0 (the variance of
    /// `detect::al::subtract_al`, and of its decorrelated difference; twin
    /// `cpu::frame::al_variance`).
    #[allow(clippy::too_many_arguments)]
    pub fn frame_al_variance(&mut self, guard: &GpuPlane, kv: &GpuPlane, model: &GpuPlane, wu: f64, wc: f64, eps2: f64, m2: f64) -> Result<GpuPlane, EngineError> {
        Self::same_shape(guard, &[kv, model])?;
        let (w, h) = (guard.width, guard.height);
        let out = self.frame_plane("blink.frame.variance", w, h, PlaneKind::Values)?;
        let (ctx, pl) = self.frame_parts()?;
        let prm = FrameParams { f0: m2 as f32, f1: eps2 as f32, f2: wu as f32, f3: wc as f32, ..FrameParams::new(w, h) };
        let bufs = [Some((&guard.buf, guard.bytes())), Some((&kv.buf, kv.bytes())), Some((&model.buf, model.bytes())), Some((&out.buf, out.bytes()))];
        submit(ctx, pl, &[Step { pipe: &pl.al_variance, prm, taps: &[], bufs, groups: pixel_groups(w, h) }])?;
        Ok(out)
    }

    /// `Σ_t m_t(x, y) · (kernels[t] ⊗ image)` on a resident frame (twin:
    /// `cpu::al::convolve_terms`; `gpu::kernels::al`'s `al_convolve` shader, the whole frame as
    /// one band): no upload, no read-back.
    pub fn frame_al_convolve(&mut self, kernels: &[Vec<f64>], half: usize, order: usize, image: &GpuPlane) -> Result<GpuPlane, EngineError> {
        use super::al::{AlConvParams, CONVOLVE_WGSL, CONVOLVE_WORKGROUP_BYTES, ENTRY_CONVOLVE, MAX_HALF, TW, TY};
        let side = 2 * half + 1;
        let (w, h) = (image.width, image.height);
        if half > MAX_HALF || kernels.len() > crate::subtract::spatial_terms(order).len() || kernels.iter().any(|k| k.len() != side * side) {
            return Err(bad(format!("{} term kernels of half-width {half} (GPU ≤ {MAX_HALF}) for spatial order {order}", kernels.len())));
        }
        let max_groups = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
        if w.div_ceil(TW as usize) > max_groups || h.div_ceil(TY as usize) > max_groups {
            return Err(bad(format!("a {w}x{h} frame exceeds {max_groups} workgroups a dimension")));
        }
        self.frame_pipelines()?;
        if self.frame.as_ref().is_some_and(|p| p.al.is_none()) {
            let l = &self.ctx.limits;
            if l.max_compute_workgroup_storage_size < CONVOLVE_WORKGROUP_BYTES {
                return Err(gpu_err(&self.ctx, format!("al_convolve needs {CONVOLVE_WORKGROUP_BYTES} bytes of workgroup memory, the adapter has {}", l.max_compute_workgroup_storage_size)));
            }
            let dev = &self.ctx.device;
            let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
            let entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
                count: None,
            };
            use wgpu::BufferBindingType as B;
            let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("blink.frame.al_convolve"),
                entries: &[entry(0, B::Uniform), entry(1, B::Storage { read_only: true }), entry(2, B::Storage { read_only: true }), entry(3, B::Storage { read_only: false })],
            });
            let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some("blink.frame.al_convolve"), source: wgpu::ShaderSource::Wgsl(CONVOLVE_WGSL.into()) });
            let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: Some("blink.frame.al_convolve"), bind_group_layouts: &[Some(&layout)], immediate_size: 0 });
            let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("blink.frame.al_convolve"),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(ENTRY_CONVOLVE),
                compilation_options: Default::default(),
                cache: None,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(gpu_err(&self.ctx, format!("building al_convolve: {e}")));
            }
            if let Some(p) = self.frame.as_mut() {
                p.al = Some((layout, pipe));
            }
        }
        let (kern, passes, taps4) = super::al::pack_terms(kernels, half);
        let kern_buf = self.frame_buffer("blink.frame.al_kernels", (kern.len() * 4) as u64)?;
        self.ctx.queue.write_buffer(&kern_buf, 0, bytemuck::cast_slice(&kern));
        let out = match self.frame_plane("blink.frame.al_out", w, h, PlaneKind::Values) {
            Ok(o) => o,
            Err(e) => {
                self.pool.release(kern_buf);
                return Err(e);
            }
        };
        let result = (|| {
            let Some((layout, pipe)) = self.frame.as_ref().and_then(|p| p.al.as_ref()) else {
                return Err(EngineError::Gpu("al_convolve pipeline missing".into()));
            };
            let ctx = &self.ctx;
            let dev = &ctx.device;
            let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
            let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let binds: Vec<wgpu::BindGroup> = (0..passes)
                .map(|p| {
                    let prm = AlConvParams::pass(p, w, h, 0, 0, h, half, taps4, order);
                    let u = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("blink.frame.al_params"), contents: bytemuck::bytes_of(&prm), usage: wgpu::BufferUsages::UNIFORM });
                    dev.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("blink.frame.al_convolve"),
                        layout,
                        entries: &[
                            wgpu::BindGroupEntry { binding: 0, resource: u.as_entire_binding() },
                            wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &image.buf, offset: 0, size: NonZeroU64::new(image.bytes()) }) },
                            wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &kern_buf, offset: 0, size: NonZeroU64::new((kern.len() * 4) as u64) }) },
                            wgpu::BindGroupEntry { binding: 3, resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &out.buf, offset: 0, size: NonZeroU64::new(out.bytes()) }) },
                        ],
                    })
                })
                .collect();
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.frame.al_convolve") });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.frame.al_convolve"), timestamp_writes: None });
                pass.set_pipeline(pipe);
                for b in &binds {
                    pass.set_bind_group(0, b, &[]);
                    pass.dispatch_workgroups(w.div_ceil(TW as usize) as u32, h.div_ceil(TY as usize) as u32, 1);
                }
            }
            ctx.queue.submit([enc.finish()]);
            let oom_err = pollster::block_on(oom.pop());
            let val_err = pollster::block_on(val.pop());
            match (val_err, oom_err) {
                (Some(e), _) | (None, Some(e)) => Err(gpu_err(ctx, e)),
                (None, None) => Ok(()),
            }
        })();
        self.pool.release(kern_buf);
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                self.frame_release(out);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::wgsl_fields;

    #[test]
    fn wgsl_params_and_constants_match_rust() {
        let want = ["width", "height", "mode", "radius", "mesh", "mx", "my", "count", "side", "nan_bits", "inf_bits", "pad", "f0", "f1", "f2", "f3"];
        let src = PARAMS_WGSL;
        assert_eq!(wgsl_fields(src, "FrameParams"), want);
        for (c, v) in [("WG_X", WG_X as usize), ("WG_Y", WG_Y as usize), ("MAX_TAPS", MAX_TAPS)] {
            assert!(src.contains(&format!("const {c}: u32 = {v}u;")), "{c}");
        }
        assert!(src.contains(&format!("array<vec4<f32>, {}>", MAX_TAPS / 4)), "taps");
        assert_eq!(4 * want.len(), std::mem::size_of::<FrameParams>());
        assert!(MESH_WGSL.contains(&format!("const MESH_WG: u32 = {MESH_WG}u;")));
    }
}
