//! Dispatcher for `shaders/ring/ring.wgsl` (CPU twin `cpu::ring`): the squares of recent
//! epochs kept on the device in one buffer of cells, and a batch of objects' window stacks
//! made and measured from them in one dispatch (one workgroup per object). What comes back is
//! three floats per object and window.
//!
//! [`GpuRing`] holds clones of the engine's device and queue (they are shared handles), so the
//! sink stage uses it on its own thread while the engine thread subtracts the next batch.

use std::num::NonZeroU64;

use wgpu::util::DeviceExt;

use crate::cpu::ring::{pack, RingJob, WindowSums, CELL, JOB_STRIDE, OUT_STRIDE};
use crate::engine::EngineError;
use crate::gpu::GpuEngine;

/// `shaders/ring/ring.wgsl`.
pub const RING_WGSL: &str = include_str!("../../../shaders/ring/ring.wgsl");
/// Invocations per workgroup (keep in sync with `WG` in `ring.wgsl`).
pub const WG: u32 = 64;

/// Parameters of one dispatch (keep in sync with `struct RingParams` in `ring.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RingParams {
    pub jobs: u32,
    pub first: u32,
    pub pad0: u32,
    pub pad1: u32,
}

/// The resident cells and the ring pipeline ([`GpuRing::new`]).
#[derive(Debug)]
pub struct GpuRing {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: String,
    layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
    cells: wgpu::Buffer,
    capacity: usize,
    max_groups: u32,
    /// The per-batch buffers and their bind group, kept for the next batch while big enough.
    scratch: Option<Scratch>,
    /// The device's turns (`GpuContext::turns`): a measurement waits for the engine's batch.
    turns: std::sync::Arc<std::sync::Mutex<()>>,
    /// Squares written since the last measurement, not yet on the device.
    pending: Vec<(u32, Vec<f32>)>,
}

/// The buffers of one [`GpuRing::measure`] call, reused by the next while they are big
/// enough: a batch then costs three writes, one dispatch and one read-back, no allocation.
#[derive(Debug)]
struct Scratch {
    params: wgpu::Buffer,
    jobs: wgpu::Buffer,
    entries: wgpu::Buffer,
    weights: wgpu::Buffer,
    out: wgpu::Buffer,
    read: wgpu::Buffer,
    group: wgpu::BindGroup,
}

impl GpuRing {
    /// Room for up to `cells` squares (fewer where one binding of the adapter holds fewer; at
    /// least one), and the pipeline.
    pub fn new(engine: &GpuEngine, cells: usize) -> Result<GpuRing, EngineError> {
        let ctx = engine.context();
        let l = &ctx.limits;
        let adapter = ctx.adapter_name();
        let err = |what: String| EngineError::Gpu(format!("{adapter}: {what}"));
        if l.max_compute_invocations_per_workgroup < WG || l.max_compute_workgroup_size_x < WG || l.max_storage_buffers_per_shader_stage < 5 {
            return Err(err(format!(
                "the resident stacks need {WG} invocations per workgroup and 5 storage buffers per stage, the adapter has {} and {}",
                l.max_compute_invocations_per_workgroup, l.max_storage_buffers_per_shader_stage
            )));
        }
        let cell_bytes = (CELL * 4) as u64;
        let most = l.max_storage_buffer_binding_size.min(l.max_buffer_size) / cell_bytes;
        let capacity = cells.min(most as usize).max(1);
        let device = ctx.device.clone();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let (layout, pipeline) = super::compute_pipeline(&device, "blink.ring", RING_WGSL.into(), "ring", &[true, true, true, false, false]);
        let buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("blink.ring.cells"),
            size: capacity as u64 * cell_bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let oom_err = pollster::block_on(oom.pop());
        if let Some(e) = pollster::block_on(scope.pop()).or(oom_err) {
            return Err(err(format!("building the resident stacks ({capacity} cells): {e}")));
        }
        let max_groups = l.max_compute_workgroups_per_dimension.max(1);
        Ok(GpuRing { device, queue: ctx.queue.clone(), adapter, layout, pipeline, cells: buf, capacity, max_groups, scratch: None, turns: ctx.turns.clone(), pending: Vec::new() })
    }

    /// Cells the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Put one square (its D, V and VT planes, [`CELL`] floats) into cell `cell`. It is held
    /// on the host and reaches the device at the next [`GpuRing::measure`], in its turn on the
    /// device (`GpuContext::turns`): the sink's thread touches the device only there.
    pub fn write(&mut self, cell: u32, square: &[f32]) {
        if (cell as usize) < self.capacity && square.len() == CELL {
            self.pending.push((cell, square.to_vec()));
        }
    }

    /// Every job's window sums (twin: `cpu::ring::measure`), in one submission. Jobs must be
    /// valid for this ring's capacity ([`RingJob::validate`]).
    pub fn measure(&mut self, jobs: &[RingJob]) -> Result<Vec<Vec<WindowSums>>, EngineError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some((k, e)) = jobs.iter().enumerate().find_map(|(k, j)| j.validate(self.capacity).err().map(|e| (k, e))) {
            return Err(EngineError::BadStamp(format!("resident stack job {k}: {e}")));
        }
        let err = |what: String| EngineError::Gpu(format!("{}: {what}", self.adapter));
        let (js, es) = pack(jobs);
        debug_assert_eq!(js.len(), jobs.len() * JOB_STRIDE);
        let n_entries = es.len() / crate::cpu::ring::ENTRY_STRIDE;
        let out_floats = jobs.len() * OUT_STRIDE;
        let out_bytes = (out_floats * 4) as u64;
        let need = [(js.len() * 4) as u64, (es.len() * 4) as u64, (2 * n_entries * 4) as u64, out_bytes];
        let dev = self.device.clone();
        let turns = self.turns.clone();
        let _turn = turns.lock().unwrap_or_else(|p| p.into_inner());
        // The squares written since the last batch, in the order written (a cell written
        // twice keeps the later square).
        for (cell, square) in self.pending.drain(..) {
            self.queue.write_buffer(&self.cells, cell as u64 * (CELL * 4) as u64, bytemuck::cast_slice(&square));
        }
        let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let fits = self.scratch.as_ref().is_some_and(|s| [&s.jobs, &s.entries, &s.weights, &s.out].iter().zip(need).all(|(b, n)| b.size() >= n.max(4)));
        if !fits {
            self.scratch = Some(self.scratch_for(need));
        }
        let Some(sc) = self.scratch.as_ref() else { return Err(err("no scratch buffers".into())) };
        let q = &self.queue;
        q.write_buffer(&sc.jobs, 0, bytemuck::cast_slice(&js));
        q.write_buffer(&sc.entries, 0, bytemuck::cast_slice(&es));
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.ring") });
        // More jobs than one dispatch takes (max_compute_workgroups_per_dimension): a uniform and
        // a bind group per further chunk (a batch of over 65,535 objects).
        let mut extra = Vec::new();
        let mut first = 0usize;
        while first < jobs.len() {
            let n = (jobs.len() - first).min(self.max_groups as usize);
            let prm = RingParams { jobs: n as u32, first: first as u32, ..Default::default() };
            let group = if first == 0 {
                q.write_buffer(&sc.params, 0, bytemuck::bytes_of(&prm));
                &sc.group
            } else {
                let u = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("blink.ring.params"), contents: bytemuck::bytes_of(&prm), usage: wgpu::BufferUsages::UNIFORM });
                extra.push(self.group(&u, sc));
                extra.last().unwrap_or(&sc.group)
            };
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.ring"), timestamp_writes: None });
                pass.set_pipeline(&self.pipeline);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(n as u32, 1, 1);
            }
            first += n;
        }
        enc.copy_buffer_to_buffer(&sc.out, 0, &sc.read, 0, out_bytes);
        q.submit([enc.finish()]);
        let oom_err = pollster::block_on(oom.pop());
        if let Some(e) = pollster::block_on(val.pop()).or(oom_err) {
            self.scratch = None;
            return Err(err(e.to_string()));
        }
        let slice = sc.read.slice(0..out_bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        dev.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| err(format!("poll: {e}")))?;
        rx.recv().map_err(|e| err(format!("map callback: {e}")))?.map_err(|e| err(format!("map: {e}")))?;
        let mut floats = vec![0.0f32; out_floats];
        {
            let view = slice.get_mapped_range().map_err(|e| err(format!("mapped range: {e}")))?;
            bytemuck::cast_slice_mut::<f32, u8>(&mut floats).copy_from_slice(&view);
        }
        sc.read.unmap();
        Ok(jobs
            .iter()
            .zip(floats.chunks_exact(OUT_STRIDE))
            .map(|(j, o)| (0..j.counts.len()).map(|w| WindowSums { num: f64::from(o[3 * w]), den: f64::from(o[3 * w + 1]), centre: o[3 * w + 2] > 0.5 }).collect())
            .collect())
    }

    /// Scratch buffers for `need` bytes of jobs, entries, weights and sums (each rounded up to
    /// a power of two, so that a growing batch reallocates rarely).
    fn scratch_for(&self, need: [u64; 4]) -> Scratch {
        use wgpu::BufferUsages as U;
        let dev = &self.device;
        let make = |label: &str, size: u64, usage: U| dev.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: size.max(16).next_power_of_two(), usage, mapped_at_creation: false });
        let params = make("blink.ring.params", std::mem::size_of::<RingParams>() as u64, U::UNIFORM | U::COPY_DST);
        let jobs = make("blink.ring.jobs", need[0], U::STORAGE | U::COPY_DST);
        let entries = make("blink.ring.entries", need[1], U::STORAGE | U::COPY_DST);
        let weights = make("blink.ring.weights", need[2], U::STORAGE);
        let out = make("blink.ring.out", need[3], U::STORAGE | U::COPY_SRC);
        let read = make("blink.ring.readback", need[3], U::MAP_READ | U::COPY_DST);
        let group = self.group_of(&params, &jobs, &entries, &weights, &out);
        Scratch { params, jobs, entries, weights, out, read, group }
    }

    /// The bind group of `params` with `sc`'s buffers.
    fn group(&self, params: &wgpu::Buffer, sc: &Scratch) -> wgpu::BindGroup {
        self.group_of(params, &sc.jobs, &sc.entries, &sc.weights, &sc.out)
    }

    fn group_of(&self, params: &wgpu::Buffer, jobs: &wgpu::Buffer, entries: &wgpu::Buffer, weights: &wgpu::Buffer, out: &wgpu::Buffer) -> wgpu::BindGroup {
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("blink.ring"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: whole(&self.cells) },
                wgpu::BindGroupEntry { binding: 2, resource: whole(jobs) },
                wgpu::BindGroupEntry { binding: 3, resource: whole(entries) },
                wgpu::BindGroupEntry { binding: 4, resource: whole(weights) },
                wgpu::BindGroupEntry { binding: 5, resource: whole(out) },
            ],
        })
    }
}

/// All of `b` as a binding.
fn whole(b: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: b, offset: 0, size: NonZeroU64::new(b.size()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ring::{ENTRY_STRIDE, MAX_WINDOWS, NPIX, SIDE};
    use crate::gpu::kernels::wgsl_fields;

    #[test]
    fn wgsl_params_and_constants_match_rust() {
        let want = ["jobs", "first", "pad0", "pad1"];
        assert_eq!(wgsl_fields(RING_WGSL, "RingParams"), want);
        assert_eq!(4 * want.len(), std::mem::size_of::<RingParams>());
        let consts = [
            ("WG", WG as usize),
            ("SIDE", SIDE),
            ("NPIX", NPIX),
            ("CELL", CELL),
            ("TAPS", crate::cpu::stack::TAPS),
            ("MAX_WINDOWS", MAX_WINDOWS),
            ("JOB_STRIDE", JOB_STRIDE),
            ("ENTRY_STRIDE", ENTRY_STRIDE),
            ("OUT_STRIDE", OUT_STRIDE),
        ];
        for (c, v) in consts {
            assert!(RING_WGSL.contains(&format!("const {c}: u32 = {v}u;")), "{c} = {v}");
        }
        assert!(RING_WGSL.contains(&format!("const CORE_RADIUS: i32 = {};", crate::cpu::stack::CORE_RADIUS)));
        assert!(RING_WGSL.contains(&format!("@workgroup_size({WG}, 1, 1)")));
        assert!(RING_WGSL.contains(&format!("array<f32, {}>", WG as usize * MAX_WINDOWS)));
    }
}
