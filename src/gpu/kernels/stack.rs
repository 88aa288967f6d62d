//! Dispatcher for the stacking kernels (`shaders/stack/*.wgsl`, CPU twins in `cpu::stack`):
//! a [`StackBatch`] of many objects × epochs in one submission.
//!
//! - `shift.wgsl`: every epoch's planes onto the common grid ([`GpuStack::shift`]);
//! - `coadd.wgsl`: every stack's weighted mean, variance with the template term, template term
//!   and count per pixel ([`GpuStack::coadd`], which runs `shift` first and keeps its planes on
//!   the device).
//!
//! The epochs' planes are uploaded once (three writes straight from the batch's vectors), the
//! Lanczos weights per epoch and the stacks' epoch ranges alongside; only the stacks come back.
//! The effective PSFs (a few hundred values per stack) are made on the host by the same
//! function as the CPU path (`cpu::stack::EpochPsfs`). A batch larger than one storage
//! binding runs in chunks of whole stacks.
//!
//! [`GpuStack`] holds its own pipelines next to the [`GpuEngine`] whose device, queue and
//! buffer pool it uses: build it once per engine.

use std::num::NonZeroU64;
use std::ops::Range;

use wgpu::util::DeviceExt;

use crate::cpu::stack::{EpochPsfs, ShiftTaps, Shifted, TAPS};
use super::{check_limits, compute_pipeline, gpu_err, read_floats};
use crate::engine::EngineError;
use crate::gpu::GpuEngine;
use crate::stack::{Stack, StackBatch};

/// `shaders/stack/shared/stack_params.wgsl`, prepended to each kernel below.
pub const PARAMS_WGSL: &str = include_str!("../../../shaders/stack/shared/stack_params.wgsl");
/// `shaders/stack/shift.wgsl`.
pub const SHIFT_WGSL: &str = include_str!("../../../shaders/stack/shift.wgsl");
/// `shaders/stack/coadd.wgsl`.
pub const COADD_WGSL: &str = include_str!("../../../shaders/stack/coadd.wgsl");

// Keep in sync with the constants of the same names in shaders/stack/shared/stack_params.wgsl.
/// Invocations per workgroup (along the pixels).
pub const WG: u32 = 64;
/// f32 per epoch in the `eps` buffer: `kx[6]`, `ky[6]`, `ix`, `iy`, `c`, unused.
pub const EPOCH_STRIDE: usize = 16;
const _: () = assert!(EPOCH_STRIDE > 2 * TAPS + 2, "eps holds kx, ky, ix, iy and c");

/// Largest buffer one chunk uses, bytes (below the adapter's binding limit where that is
/// larger), so a huge batch does not hold the device's memory at once.
pub const CHUNK_BYTES: u64 = 256 << 20;

/// Parameters of one dispatch (keep in sync with `struct StackParams` in
/// `shaders/stack/shared/stack_params.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StackParams {
    pub width: u32,
    pub height: u32,
    pub npix: u32,
    /// Epochs in this chunk.
    pub epochs: u32,
    /// Stacks in this chunk.
    pub stacks: u32,
    /// Bits of the NaN written (a uniform, so no NaN constant reaches naga's folding).
    pub nan_bits: u32,
    pub pad0: u32,
    pub pad1: u32,
}

/// The stacking pipelines, built once per engine ([`GpuStack::new`]).
#[derive(Debug)]
pub struct GpuStack {
    shift_layout: wgpu::BindGroupLayout,
    shift: wgpu::ComputePipeline,
    coadd_layout: wgpu::BindGroupLayout,
    coadd: wgpu::ComputePipeline,
    /// Largest buffer of one chunk, bytes ([`GpuStack::set_chunk_bytes`]).
    chunk_bytes: u64,
}

fn bad(what: impl Into<String>) -> EngineError {
    EngineError::BadStamp(what.into())
}

/// The `eps` values of one epoch.
fn epoch_values(dx: f64, dy: f64) -> [f32; EPOCH_STRIDE] {
    let mut v = [0.0f32; EPOCH_STRIDE];
    let taps = crate::cpu::stack::tap_values(&ShiftTaps::new(dx, dy));
    v[..taps.len()].copy_from_slice(&taps);
    v
}

/// One chunk: the stacks it makes and the run of epochs they read.
#[derive(Debug, Clone, PartialEq)]
struct Chunk {
    stacks: Range<usize>,
    epochs: Range<usize>,
}

/// Stacks in order, cut where the epochs they span or their count would pass the limits.
fn chunks(stacks: &[Range<usize>], max_epochs: usize, max_stacks: usize) -> Result<Vec<Chunk>, EngineError> {
    let mut out: Vec<Chunk> = Vec::new();
    for (k, r) in stacks.iter().enumerate() {
        if r.len() > max_epochs {
            return Err(bad(format!("a stack of {} epochs exceeds the {max_epochs} one dispatch holds", r.len())));
        }
        if let Some(c) = out.last_mut() {
            let span = c.epochs.start.min(r.start)..c.epochs.end.max(r.end);
            if span.len() <= max_epochs && c.stacks.len() < max_stacks {
                c.epochs = span;
                c.stacks.end = k + 1;
                continue;
            }
        }
        out.push(Chunk { stacks: k..k + 1, epochs: r.clone() });
    }
    Ok(out)
}

impl GpuStack {
    /// Check the adapter's limits against what the kernels need, then build the pipelines.
    pub fn new(engine: &GpuEngine) -> Result<GpuStack, EngineError> {
        let ctx = &engine.ctx;
        let l = &ctx.limits;
        let need = [
            ("invocations per workgroup", l.max_compute_invocations_per_workgroup, WG),
            ("workgroup size x", l.max_compute_workgroup_size_x, WG),
            ("storage buffers per stage", l.max_storage_buffers_per_shader_stage, 4),
        ];
        check_limits(ctx, "the stacking kernels", &need)?;
        let dev = &ctx.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let build = |name: &str, src: &str, read_only: &[bool]| compute_pipeline(dev, &format!("blink.stack.{name}"), format!("{PARAMS_WGSL}\n{src}"), name, read_only);
        let (shift_layout, shift) = build("shift", SHIFT_WGSL, &[true, true, false]);
        let (coadd_layout, coadd) = build("coadd", COADD_WGSL, &[true, true, true, false]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(ctx, format!("building the stacking pipelines: {e}")));
        }
        Ok(GpuStack { shift_layout, shift, coadd_layout, coadd, chunk_bytes: CHUNK_BYTES })
    }

    /// Largest buffer one chunk may use (default [`CHUNK_BYTES`]; the adapter's binding limit
    /// caps it). Tests set a small one to run a batch in several chunks.
    pub fn set_chunk_bytes(&mut self, bytes: u64) {
        self.chunk_bytes = bytes.max(4096);
    }

    /// Epochs and stacks one chunk may hold for `npix`-pixel stamps.
    fn limits(&self, engine: &GpuEngine, npix: usize) -> (usize, usize) {
        let l = &engine.ctx.limits;
        let max_bytes = l.max_storage_buffer_binding_size.min(l.max_buffer_size).max(1);
        // Pool buffers are powers of two: the largest one not above the limit.
        let cap = (1u64 << (63 - max_bytes.leading_zeros())).min(self.chunk_bytes);
        let dim = l.max_compute_workgroups_per_dimension.max(1) as usize;
        let per = |planes: usize| ((cap / (planes * npix * 4).max(1) as u64) as usize).min(dim);
        (per(3), per(4))
    }

    /// Every epoch of `b` shifted onto the common grid (twin: `cpu::stack::shift`).
    pub fn shift(&self, engine: &mut GpuEngine, b: &StackBatch) -> Result<Shifted, EngineError> {
        b.validate().map_err(|e| bad(e.to_string()))?;
        let npix = b.npix();
        let (max_epochs, _) = self.limits(engine, npix);
        let mut out = Shifted { diff: Vec::with_capacity(b.diff.len()), var: Vec::with_capacity(b.diff.len()), var_template: Vec::with_capacity(b.diff.len()) };
        let mut e0 = 0;
        while e0 < b.epochs() {
            let e1 = (e0 + max_epochs.max(1)).min(b.epochs());
            let planes = self.run(engine, b, e0..e1, &[])?;
            let n = (e1 - e0) * npix;
            out.diff.extend_from_slice(&planes[..n]);
            out.var.extend_from_slice(&planes[n..2 * n]);
            out.var_template.extend_from_slice(&planes[2 * n..3 * n]);
            e0 = e1;
        }
        Ok(out)
    }

    /// Every stack of `b` (twin: `cpu::stack::coadd`), in one submission per chunk.
    pub fn coadd(&self, engine: &mut GpuEngine, b: &StackBatch) -> Result<Vec<Stack>, EngineError> {
        b.validate().map_err(|e| bad(e.to_string()))?;
        let npix = b.npix();
        let (max_epochs, max_stacks) = self.limits(engine, npix);
        let mut stacks = Vec::with_capacity(b.stacks.len());
        let psfs = EpochPsfs::new(b, 0..b.epochs());
        for c in chunks(&b.stacks, max_epochs, max_stacks)? {
            let ranges = &b.stacks[c.stacks.clone()];
            let planes = self.run(engine, b, c.epochs.clone(), ranges)?;
            let q = ranges.len() * npix;
            for (k, r) in ranges.iter().enumerate() {
                let px = k * npix..(k + 1) * npix;
                let at = |p: usize| &planes[p * q + px.start..p * q + px.end];
                stacks.push(Stack {
                    width: b.width,
                    height: b.height,
                    image: at(0).to_vec(),
                    var: at(1).to_vec(),
                    var_template: at(2).to_vec(),
                    count: at(3).iter().map(|&c| c as u32).collect(),
                    psf: psfs.effective(r.clone()),
                    epochs: r.len(),
                });
            }
        }
        Ok(stacks)
    }

    /// Upload epochs `er` of `b`, shift them, coadd `stacks` (epoch indices of the batch; none:
    /// shift only) and read back the coadd's four planes, or the shift's three.
    fn run(&self, engine: &mut GpuEngine, b: &StackBatch, er: Range<usize>, stacks: &[Range<usize>]) -> Result<Vec<f32>, EngineError> {
        use wgpu::BufferUsages as U;
        let npix = b.npix();
        let ne = er.len();
        let plane = (ne * npix * 4) as u64;
        let eps: Vec<f32> = b.shifts[er.clone()].iter().flat_map(|&(dx, dy)| epoch_values(dx, dy)).collect();
        let ranges: Vec<u32> = stacks.iter().flat_map(|r| [(r.start - er.start) as u32, r.len() as u32]).collect();
        let out_bytes = if stacks.is_empty() { 3 * plane } else { (4 * stacks.len() * npix * 4) as u64 };
        let dev = engine.ctx.device.clone();
        let mut take = |label: &str, bytes: u64, usage: U| engine.pool.acquire(&dev, label, bytes.max(4), usage);
        let src = take("blink.stack.src", 3 * plane, U::STORAGE | U::COPY_DST);
        // The shifted planes stay on the device for the coadd; shifting alone writes `out`.
        let dst = (!stacks.is_empty()).then(|| take("blink.stack.shifted", 3 * plane, U::STORAGE));
        let out = take("blink.stack.out", out_bytes, U::STORAGE | U::COPY_SRC);
        let read = take("blink.stack.readback", out_bytes, U::MAP_READ | U::COPY_DST);
        let result = (|| {
            let ctx = &engine.ctx;
            let q = &ctx.queue;
            let px = er.start * npix..er.end * npix;
            q.write_buffer(&src, 0, bytemuck::cast_slice(&b.diff[px.clone()]));
            q.write_buffer(&src, plane, bytemuck::cast_slice(&b.var[px.clone()]));
            q.write_buffer(&src, 2 * plane, bytemuck::cast_slice(&b.var_template[px]));
            let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
            let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let prm = StackParams { width: b.width as u32, height: b.height as u32, npix: npix as u32, epochs: ne as u32, stacks: stacks.len() as u32, nan_bits: f32::NAN.to_bits(), ..Default::default() };
            let init = |label: &str, contents: &[u8], usage: U| dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage });
            let u_prm = init("blink.stack.params", bytemuck::bytes_of(&prm), U::UNIFORM);
            let u_eps = init("blink.stack.eps", bytemuck::cast_slice(&eps), U::STORAGE);
            let u_ranges = (!ranges.is_empty()).then(|| init("blink.stack.ranges", bytemuck::cast_slice(&ranges), U::STORAGE));
            let group = |label: &str, layout: &wgpu::BindGroupLayout, res: Vec<wgpu::BindingResource>| {
                let entries: Vec<wgpu::BindGroupEntry> = res.into_iter().enumerate().map(|(k, resource)| wgpu::BindGroupEntry { binding: k as u32, resource }).collect();
                dev.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(label), layout, entries: &entries })
            };
            let shift_out = dst.as_ref().unwrap_or(&out);
            let g_shift = group("blink.stack.shift", &self.shift_layout, vec![u_prm.as_entire_binding(), bind(&src, 3 * plane), u_eps.as_entire_binding(), bind(shift_out, 3 * plane)]);
            let g_coadd = u_ranges.as_ref().zip(dst.as_ref()).map(|(r, d)| group("blink.stack.coadd", &self.coadd_layout, vec![u_prm.as_entire_binding(), bind(d, 3 * plane), u_eps.as_entire_binding(), r.as_entire_binding(), bind(&out, out_bytes)]));
            let gx = npix.div_ceil(WG as usize) as u32;
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.stack") });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.stack"), timestamp_writes: None });
                pass.set_pipeline(&self.shift);
                pass.set_bind_group(0, &g_shift, &[]);
                pass.dispatch_workgroups(gx, ne as u32, 1);
                if let Some(g) = &g_coadd {
                    pass.set_pipeline(&self.coadd);
                    pass.set_bind_group(0, g, &[]);
                    pass.dispatch_workgroups(gx, stacks.len() as u32, 1);
                }
            }
            enc.copy_buffer_to_buffer(&out, 0, &read, 0, out_bytes);
            q.submit([enc.finish()]);
            let oom_err = pollster::block_on(oom.pop());
            if let Some(e) = pollster::block_on(val.pop()).or(oom_err) {
                return Err(gpu_err(ctx, e));
            }
            read_floats(ctx, &read, (out_bytes / 4) as usize)
        })();
        for buf in [Some(src), dst, Some(out), Some(read)].into_iter().flatten() {
            engine.pool.release(buf);
        }
        result
    }
}

/// The first `bytes` of `buf` as a binding.
fn bind(buf: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: buf, offset: 0, size: NonZeroU64::new(bytes.max(4)) })
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::wgsl_fields;

    #[test]
    fn wgsl_params_and_constants_match_rust() {
        let want = ["width", "height", "npix", "epochs", "stacks", "nan_bits", "pad0", "pad1"];
        assert_eq!(wgsl_fields(PARAMS_WGSL, "StackParams"), want);
        assert_eq!(4 * want.len(), std::mem::size_of::<StackParams>());
        for (c, v) in [("WG", WG as usize), ("TAPS", TAPS), ("EPOCH_STRIDE", EPOCH_STRIDE)] {
            assert!(PARAMS_WGSL.contains(&format!("const {c}: u32 = {v}u;")), "{c}");
        }
        for src in [SHIFT_WGSL, COADD_WGSL] {
            assert!(src.contains(&format!("@workgroup_size({WG}, 1, 1)")));
        }
    }

    #[test]
    fn chunks_keep_stacks_whole_and_within_the_limits() {
        let stacks = [0..3, 0..5, 5..6, 6..9, 6..12, 12..13];
        let c = chunks(&stacks, 6, 10).unwrap();
        assert_eq!(c, [Chunk { stacks: 0..3, epochs: 0..6 }, Chunk { stacks: 3..5, epochs: 6..12 }, Chunk { stacks: 5..6, epochs: 12..13 }]);
        assert_eq!(chunks(&stacks, 100, 2).unwrap().len(), 3);
        let seven = 0..7;
        assert!(chunks(std::slice::from_ref(&seven), 6, 10).is_err());
        // Integer shifts give exact zero weights off the centre tap; c = 1.
        let v = epoch_values(2.0, -1.0);
        assert_eq!(&v[..2 * TAPS], &[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(&v[2 * TAPS..2 * TAPS + 3], &[2.0, -1.0, 1.0]);
    }
}
