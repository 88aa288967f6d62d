//! The GPU engine: wgpu + the WGSL kernels in `shaders/`.
//!
//! - [`context`]: adapter, device and pipelines, built once.
//! - [`pool`]: buffers reused across batches by size class.
//! - [`kernels`]: one dispatcher per kernel, and the buffer layout the shaders share.
//!
//! A batch's input planes are copied straight from the batch into a pooled, mapped upload
//! buffer and uploaded once into the `pix` buffer; every kernel runs on it in one compute pass;
//! only the per-stamp results come back (plus, on request, whole planes such as the difference
//! image). Large batches run in chunks of about [`PIPELINE_BYTES`] (or the adapter's
//! storage-binding limit), two in flight, so the host stages one while the device works on the
//! other. [`GpuEngine::profile`] times the phases apart.

pub mod context;
pub mod kernels;
pub mod pool;

use crate::cpu::convolve::Convolved;
use crate::engine::{
    Engine, EngineError, Fit, FitStatus, StampBatch, StampPlanes, StampSquares, SubtractionImages, SubtractionResult,
};
use context::GpuContext;
use kernels::{BatchParams, Pix, StampGpu, Work, PIX_PLANES, RESULT_STRIDE, WORK_PLANES};
use pool::BufferPool;

/// Pixels of one history square as `shaders/squares.wgsl` cuts it.
const SQUARE_AREA: usize = (2 * kernels::squares::SQUARE_HALF + 1) * (2 * kernels::squares::SQUARE_HALF + 1);

/// Which kernels a run records, and what it preloads instead of computing.
#[derive(Clone, Copy)]
struct Plan<'a> {
    convolve: bool,
    fit: bool,
    score: bool,
    /// Preloaded convolved template and variance (whole batch), when `convolve` is off.
    conv: Option<(&'a [f32], &'a [f32])>,
    /// Preloaded fits (whole batch), when `fit` is off.
    fits: Option<&'a [Fit]>,
    /// Work planes to read back.
    read: &'a [Work],
    /// Cut the history's squares (`kernels::squares`) and read back those instead of `read`.
    squares: bool,
}

/// The engine on a wgpu adapter (a real GPU, or llvmpipe/lavapipe where there is none: see
/// [`GpuEngine::adapter`]).
#[derive(Debug)]
pub struct GpuEngine {
    ctx: GpuContext,
    pool: BufferPool,
    /// The Alard–Lupton pipelines (`kernels::al`), built on first use.
    al: Option<kernels::al::AlPipelines>,
    /// The whole-frame pipelines (`kernels::frame`), built on first use.
    frame: Option<kernels::frame::FramePipelines>,
    /// Stamps per submission at most, when set ([`GpuEngine::set_chunk_stamps`]).
    chunk_limit: Option<usize>,
    /// Whole planes moved by the frame API ([`GpuEngine::frame_traffic`]).
    traffic: kernels::frame::FrameTraffic,
}

impl GpuEngine {
    /// Open the best compute-capable adapter (honouring `BLINK_ADAPTER`).
    pub fn new() -> Result<GpuEngine, EngineError> {
        Ok(GpuEngine { ctx: GpuContext::new()?, pool: BufferPool::new(), al: None, frame: None, chunk_limit: None, traffic: Default::default() })
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Buffers waiting in the pool (for tests of reuse).
    pub fn pooled_buffers(&self) -> usize {
        self.pool.free_count()
    }

    /// Every kernel, with the difference and variance images read back.
    pub fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        let plan = Plan { convolve: true, fit: true, score: true, conv: None, fits: None, read: &[Work::Diff, Work::Var], squares: false };
        let (res, mut planes) = self.run(batch, plan)?;
        let variance = planes.pop().unwrap_or_default();
        let difference = planes.pop().unwrap_or_default();
        Ok(SubtractionImages { results: to_results(&res), difference, variance })
    }

    /// Every kernel, with the planes the history store keeps ([`StampPlanes`]): the `Diff`,
    /// `Var` and `ConvV` work planes are read back (only here; `subtract` reads none).
    pub fn subtract_planes(&mut self, batch: &StampBatch) -> Result<StampPlanes, EngineError> {
        let plan = Plan {
            convolve: true,
            fit: true,
            score: true,
            conv: None,
            fits: None,
            read: &[Work::Diff, Work::Var, Work::ConvV],
            squares: false,
        };
        let (res, mut planes) = self.run(batch, plan)?;
        let conv_tv = planes.pop().unwrap_or_default();
        let variance = planes.pop().unwrap_or_default();
        let difference = planes.pop().unwrap_or_default();
        Ok(StampPlanes::from_images(batch, SubtractionImages { results: to_results(&res), difference, variance }, &conv_tv))
    }

    /// Every kernel, then the history's squares cut on the device (`shaders/squares.wgsl`):
    /// only `3·side²` floats a stamp come back instead of three whole planes. Squares of
    /// another size, or larger than a stamp, are cut on the host from
    /// [`GpuEngine::subtract_planes`].
    pub fn subtract_squares(&mut self, batch: &StampBatch, half: usize) -> Result<StampSquares, EngineError> {
        let side = 2 * half + 1;
        let origins: Vec<Option<(i64, i64)>> = batch.params.iter().map(|p| crate::engine::square_origin(p.cand_x, p.cand_y, half)).collect();
        if half != kernels::squares::SQUARE_HALF || side * side > batch.npix() || origins.iter().any(Option::is_none) {
            let planes = self.subtract_planes(batch)?;
            return Ok(StampSquares::from_planes(batch, &planes, half));
        }
        let plan = Plan { convolve: true, fit: true, score: true, conv: None, fits: None, read: &[], squares: true };
        let (res, mut planes) = self.run(batch, plan)?;
        let template_variance = planes.pop().unwrap_or_default();
        let variance = planes.pop().unwrap_or_default();
        let difference = planes.pop().unwrap_or_default();
        Ok(StampSquares { results: to_results(&res), side, origins, difference, variance, template_variance })
    }

    /// The `convolve` kernel alone.
    pub fn convolve(&mut self, batch: &StampBatch) -> Result<Convolved, EngineError> {
        let plan = Plan { convolve: true, fit: false, score: false, conv: None, fits: None, read: &[Work::ConvT, Work::ConvV], squares: false };
        let (_, mut planes) = self.run(batch, plan)?;
        let template_var = planes.pop().unwrap_or_default();
        let template = planes.pop().unwrap_or_default();
        Ok(Convolved { template, template_var })
    }

    /// The `fit` kernel alone, on a given convolved template and variance.
    pub fn fit(&mut self, batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32]) -> Result<Vec<Fit>, EngineError> {
        check_len(batch, conv_t, conv_tv)?;
        let plan = Plan { convolve: false, fit: true, score: false, conv: Some((conv_t, conv_tv)), fits: None, read: &[], squares: false };
        let (res, _) = self.run(batch, plan)?;
        Ok(to_fits(&res))
    }

    /// The `difference_score` kernel alone, on given convolved images and fits.
    pub fn difference_score(
        &mut self,
        batch: &StampBatch,
        conv_t: &[f32],
        conv_tv: &[f32],
        fits: &[Fit],
    ) -> Result<SubtractionImages, EngineError> {
        check_len(batch, conv_t, conv_tv)?;
        if fits.len() != batch.n {
            return Err(EngineError::BadStamp(format!("{} fits for {} stamps", fits.len(), batch.n)));
        }
        let plan = Plan {
            convolve: false,
            fit: false,
            score: true,
            conv: Some((conv_t, conv_tv)),
            fits: Some(fits),
            read: &[Work::Diff, Work::Var],
            squares: false,
        };
        let (res, mut planes) = self.run(batch, plan)?;
        let variance = planes.pop().unwrap_or_default();
        let difference = planes.pop().unwrap_or_default();
        Ok(SubtractionImages { results: to_results(&res), difference, variance })
    }

    /// Stamps per dispatch: the largest buffer (work, 7 planes) must fit one storage binding
    /// after rounding up to its pool size class, and the stamp count one dispatch dimension.
    fn chunk_stamps(&self, npix: usize) -> usize {
        let l = &self.ctx.limits;
        let max_bytes = l.max_storage_buffer_binding_size.min(l.max_buffer_size).max(1);
        // Largest power of two not above the limit (pool classes are powers of two).
        let cap = 1u64 << (63 - max_bytes.leading_zeros());
        let per_stamp = (WORK_PLANES * npix * 4).max(1) as u64;
        let by_bytes = (cap / per_stamp).max(1) as usize;
        by_bytes.min(l.max_compute_workgroups_per_dimension.max(1) as usize)
    }

    /// Stamps per submission at most (default: as many as [`PIPELINE_BYTES`] of input planes
    /// hold, within the binding limits). Tests set a few stamps to run small batches through the
    /// chunked, overlapped path.
    pub fn set_chunk_stamps(&mut self, stamps: Option<usize>) {
        self.chunk_limit = stamps.map(|s| s.max(1));
    }

    /// Time one batch phase by phase: host staging (the input planes copied into the mapped
    /// upload buffer), upload (staging → device buffers), compute (the kernels) and readback
    /// (the per-stamp results copied, mapped and read). Each phase is submitted and waited for
    /// on its own, so their sum exceeds [`Engine::subtract`]'s time, which overlaps them.
    pub fn profile(&mut self, batch: &StampBatch) -> Result<Phases, EngineError> {
        let plan = Plan { convolve: true, fit: true, score: true, conv: None, fits: None, read: &[], squares: false };
        let mut phases = Phases::default();
        self.run_with(batch, plan, Some(&mut phases))?;
        Ok(phases)
    }

    fn run(&mut self, batch: &StampBatch, plan: Plan<'_>) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
        self.run_with(batch, plan, None)
    }

    /// The batch in chunks, [`IN_FLIGHT`] of them submitted at a time: while the device works
    /// on one, the host stages the next. Every buffer comes from the pool and goes back to it.
    fn run_with(
        &mut self,
        batch: &StampBatch,
        plan: Plan<'_>,
        mut phases: Option<&mut Phases>,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
        batch.validate()?;
        let turns = self.ctx.turns.clone();
        let _turn = turns.lock().unwrap_or_else(|p| p.into_inner());
        let npix = batch.npix();
        let mut results = Vec::with_capacity(batch.n * RESULT_STRIDE);
        let (reads, per_stamp) = if plan.squares { (3, SQUARE_AREA) } else { (plan.read.len(), npix) };
        let mut planes: Vec<Vec<f32>> = (0..reads).map(|_| Vec::with_capacity(batch.n * per_stamp)).collect();
        if batch.n == 0 || npix == 0 {
            return Ok((results, planes));
        }
        let by_bytes = (PIPELINE_BYTES / (PIX_PLANES * npix * 4)).max(1);
        let chunk = self.chunk_stamps(npix).min(self.chunk_limit.unwrap_or(by_bytes));
        let dev = self.ctx.device.clone();
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mut in_flight = std::collections::VecDeque::new();
        let mut err = None;
        let mut s0 = 0;
        while s0 < batch.n {
            let s1 = (s0 + chunk).min(batch.n);
            match self.submit_chunk(batch, s0..s1, plan, phases.as_deref_mut()) {
                Ok(f) => in_flight.push_back(f),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
            s0 = s1;
            if in_flight.len() >= IN_FLIGHT {
                if let Some(f) = in_flight.pop_front() {
                    match self.finish(f, phases.as_deref_mut()) {
                        Ok((res, pl)) => append(&mut results, &mut planes, res, pl),
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        // The rest; after an error only to give their buffers back.
        while let Some(f) = in_flight.pop_front() {
            let got = self.finish(f, phases.as_deref_mut());
            match (got, &err) {
                (Ok((res, pl)), None) => append(&mut results, &mut planes, res, pl),
                (Err(e), None) => err = Some(e),
                _ => {}
            }
        }
        let oom_err = pollster::block_on(oom.pop());
        let val_err = pollster::block_on(scope.pop());
        if let Some(e) = val_err.or(oom_err) {
            return Err(EngineError::Gpu(format!("{}: {e}", self.ctx.adapter_name())));
        }
        match err {
            Some(e) => Err(e),
            None => Ok((results, planes)),
        }
    }

    /// Stage, upload and compute one chunk and start mapping its results; with `phases`, each
    /// step is submitted and waited for on its own and timed.
    fn submit_chunk(
        &mut self,
        batch: &StampBatch,
        range: std::ops::Range<usize>,
        plan: Plan<'_>,
        mut phases: Option<&mut Phases>,
    ) -> Result<InFlight, EngineError> {
        let npix = batch.npix();
        let n = range.len();
        let px = range.start * npix..range.end * npix;
        let plane_len = n * npix;
        let dims = BatchParams {
            width: to_u32(batch.width)?,
            height: to_u32(batch.height)?,
            n: to_u32(n)?,
            npix: to_u32(npix)?,
        };
        let stamps: Vec<StampGpu> = batch.params[range.clone()].iter().map(StampGpu::from).collect();

        use wgpu::BufferUsages as U;
        let f = 4u64;
        let res_bytes = (n * RESULT_STRIDE) as u64 * f;
        let plane_bytes = plane_len as u64 * f;
        // Planes in the upload buffer start on 256-byte boundaries, so that each can be mapped
        // (and filled by its own thread) separately.
        let stage_stride = plane_bytes.next_multiple_of(256);
        // What comes back per plane: the whole planes, or the squares (`kernels::squares`).
        let (reads, read_len) = if plan.squares { (3, n * SQUARE_AREA) } else { (plan.read.len(), plane_len) };
        let read_bytes = res_bytes + (reads * read_len) as u64 * f;
        let dev = &self.ctx.device;
        let b_uniform = self.pool.acquire(dev, "blink.batch", 16, U::UNIFORM | U::COPY_DST);
        let b_up = self.pool.acquire(dev, "blink.upload", PIX_PLANES as u64 * stage_stride, U::MAP_WRITE | U::COPY_SRC);
        let b_pix = self.pool.acquire(dev, "blink.pix", PIX_PLANES as u64 * plane_bytes, U::STORAGE | U::COPY_DST);
        let b_stamps =
            self.pool.acquire(dev, "blink.stamps", std::mem::size_of_val(stamps.as_slice()) as u64, U::STORAGE | U::COPY_DST);
        let b_work = self.pool.acquire(dev, "blink.work", WORK_PLANES as u64 * plane_bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let b_res = self.pool.acquire(dev, "blink.results", res_bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let b_read = self.pool.acquire(dev, "blink.readback", read_bytes, U::MAP_READ | U::COPY_DST);
        let flight = InFlight {
            n,
            plane_len: read_len,
            reads,
            read_bytes,
            submission: None,
            mapped: None,
            buffers: [b_uniform, b_up, b_pix, b_stamps, b_work, b_res, b_read],
        };
        let [b_uniform, b_up, b_pix, b_stamps, b_work, b_res, b_read] = &flight.buffers;

        let q = &self.ctx.queue;
        q.write_buffer(b_uniform, 0, bytemuck::bytes_of(&dims));
        q.write_buffer(b_stamps, 0, bytemuck::cast_slice(&stamps));
        if let Some((ct, ctv)) = plan.conv {
            q.write_buffer(b_work, Work::ConvT as u64 * plane_bytes, bytemuck::cast_slice(&ct[px.clone()]));
            q.write_buffer(b_work, Work::ConvV as u64 * plane_bytes, bytemuck::cast_slice(&ctv[px.clone()]));
        }
        if let Some(fits) = plan.fits {
            let mut r = vec![0.0f32; n * RESULT_STRIDE];
            for (k, fit) in fits[range.clone()].iter().enumerate() {
                r[k * RESULT_STRIDE] = fit.scale;
                r[k * RESULT_STRIDE + 1] = fit.background;
                r[k * RESULT_STRIDE + 7] = fit.status.code() as f32;
            }
            q.write_buffer(b_res, 0, bytemuck::cast_slice(&r));
        }

        // The input planes, straight from the batch into the mapped upload buffer.
        let t = std::time::Instant::now();
        let sources: [(Pix, &[f32]); PIX_PLANES] = [
            (Pix::Science, &batch.science[px.clone()]),
            (Pix::Template, &batch.template[px.clone()]),
            (Pix::ScienceVar, &batch.science_var[px.clone()]),
            (Pix::TemplateVar, &batch.template_var[px.clone()]),
            (Pix::Weight, &batch.weight[px.clone()]),
            (Pix::Profile, &batch.profile[px]),
        ];
        if let Err(e) = stage_planes(&self.ctx, b_up, &sources, stage_stride) {
            self.release(flight);
            return Err(e);
        }
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.engine") });
        for (p, _) in &sources {
            enc.copy_buffer_to_buffer(b_up, *p as u64 * stage_stride, b_pix, *p as u64 * plane_bytes, plane_bytes);
        }
        // Profiling: each phase on its own submission, timed to its end.
        let lap = |enc: &mut wgpu::CommandEncoder, slot: Option<&mut std::time::Duration>, t: &mut std::time::Instant| {
            if let Some(slot) = slot {
                let done = std::mem::replace(enc, dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.engine") }));
                let idx = q.submit([done.finish()]);
                let _ = dev.poll(wgpu::PollType::Wait { submission_index: Some(idx), timeout: None });
                *slot += t.elapsed();
                *t = std::time::Instant::now();
            }
        };
        let mut t = t;
        if let Some(ph) = phases.as_deref_mut() {
            ph.stage += t.elapsed();
            t = std::time::Instant::now();
        }
        lap(&mut enc, phases.as_deref_mut().map(|p| &mut p.upload), &mut t);

        let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("blink.engine"),
            layout: &self.ctx.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: b_uniform.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: b_pix.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: b_stamps.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 3, resource: b_work.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 4, resource: b_res.as_entire_binding() },
            ],
        });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.engine"), timestamp_writes: None });
            pass.set_bind_group(0, &bind, &[]);
            if plan.convolve {
                kernels::convolve::record(&self.ctx, &mut pass, dims.n, dims.npix);
            }
            if plan.fit {
                kernels::fit::record(&self.ctx, &mut pass, dims.n);
            }
            if plan.score {
                kernels::difference_score::record(&self.ctx, &mut pass, dims.n);
            }
            if plan.squares {
                kernels::squares::record(&self.ctx, &mut pass, dims.n);
            }
        }
        lap(&mut enc, phases.as_deref_mut().map(|p| &mut p.compute), &mut t);
        enc.copy_buffer_to_buffer(b_res, 0, b_read, 0, res_bytes);
        if plan.squares {
            // The kernel wrote the three squares' planes one after another from offset 0.
            enc.copy_buffer_to_buffer(b_work, 0, b_read, res_bytes, (reads * read_len) as u64 * f);
        }
        for (k, w) in plan.read.iter().enumerate().filter(|_| !plan.squares) {
            enc.copy_buffer_to_buffer(b_work, *w as u64 * plane_bytes, b_read, res_bytes + k as u64 * plane_bytes, plane_bytes);
        }
        let submission = q.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        b_read.slice(0..read_bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let mut flight = flight;
        flight.submission = Some(submission);
        flight.mapped = Some(rx);
        if let Some(ph) = phases {
            // The readback phase ends in `finish`, which waits for the mapping.
            ph.readback_started = Some(t);
        }
        Ok(flight)
    }

    /// Wait for a chunk's results, read them and give its buffers back.
    fn finish(&mut self, f: InFlight, phases: Option<&mut Phases>) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
        let ctx = &self.ctx;
        let gpu_err = |what: &str, e: &dyn std::fmt::Display| EngineError::Gpu(format!("{}: {what}: {e}", ctx.adapter_name()));
        let read = &f.buffers[6];
        let data = (|| {
            let rx = f.mapped.as_ref().ok_or_else(|| gpu_err("readback", &"never submitted"))?;
            ctx.device
                .poll(wgpu::PollType::Wait { submission_index: f.submission.clone(), timeout: None })
                .map_err(|e| gpu_err("poll", &e))?;
            rx.recv().map_err(|e| gpu_err("map callback", &e))?.map_err(|e| gpu_err("map", &e))?;
            // The results and whole planes copied straight out of the mapped range (a memcpy
            // each, where a float-by-float decode of whole planes cost tens of microseconds an
            // alert on an H200 host); the range is 4-aligned, the decode is only a fallback.
            let out = {
                let view = read.slice(0..f.read_bytes).get_mapped_range().map_err(|e| gpu_err("mapped range", &e))?;
                let decoded: Vec<f32>;
                let floats: &[f32] = match bytemuck::try_cast_slice::<u8, f32>(&view) {
                    Ok(v) => v,
                    Err(_) => {
                        decoded = view.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect();
                        &decoded
                    }
                };
                let (res, rest) = floats.split_at((f.n * RESULT_STRIDE).min(floats.len()));
                let planes: Vec<Vec<f32>> = rest.chunks(f.plane_len.max(1)).take(f.reads).map(<[f32]>::to_vec).collect();
                (res.to_vec(), planes)
            };
            read.unmap();
            Ok(out)
        })();
        if let Some(ph) = phases {
            if let Some(t) = ph.readback_started.take() {
                ph.readback += t.elapsed();
            }
        }
        self.release(f);
        data
    }

    fn release(&mut self, f: InFlight) {
        for b in f.buffers {
            self.pool.release(b);
        }
    }
}

/// Input planes per submission, about (the chunk a batch is cut into when it does not fit
/// one storage binding anyway): large enough to keep a GPU busy (2016 63x63 stamps), small
/// enough that staging the next chunk overlaps the device's work on this one.
pub const PIPELINE_BYTES: usize = 192 << 20;
/// Chunks submitted and not yet read back, at most.
const IN_FLIGHT: usize = 2;
/// Below this many bytes the upload buffer is filled by the calling thread alone.
const PARALLEL_STAGE_BYTES: usize = 8 << 20;

/// Where one batch's time goes, from [`GpuEngine::profile`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Phases {
    /// Host: the input planes copied into the mapped upload buffer (and the wait to map it).
    pub stage: std::time::Duration,
    /// Device: the upload buffer copied into the storage buffers.
    pub upload: std::time::Duration,
    /// Device: convolve, fit and difference_score.
    pub compute: std::time::Duration,
    /// Device and host: the results copied out, mapped and read.
    pub readback: std::time::Duration,
    readback_started: Option<std::time::Instant>,
}

/// One submitted chunk: its buffers (uniform, upload, pix, stamps, work, results, readback)
/// and the mapping of its results under way.
struct InFlight {
    n: usize,
    plane_len: usize,
    reads: usize,
    read_bytes: u64,
    submission: Option<wgpu::SubmissionIndex>,
    mapped: Option<std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>>,
    buffers: [wgpu::Buffer; 7],
}

fn append(results: &mut Vec<f32>, planes: &mut [Vec<f32>], res: Vec<f32>, pl: Vec<Vec<f32>>) {
    results.extend_from_slice(&res);
    for (dst, src) in planes.iter_mut().zip(pl) {
        dst.extend_from_slice(&src);
    }
}

/// Map the upload buffer and copy each plane into its slot (`stride` bytes apart), split over
/// the cores when the chunk is large: the host-side copy is what limits a fast GPU's
/// throughput on small stamps. The buffer is idle when this is called (its last chunk has been
/// read back), so a non-blocking poll maps it and the device's work on another chunk goes on.
fn stage_planes(ctx: &GpuContext, up: &wgpu::Buffer, planes: &[(Pix, &[f32])], stride: u64) -> Result<(), EngineError> {
    let gpu_err = |what: &str, e: &dyn std::fmt::Display| EngineError::Gpu(format!("{}: {what}: {e}", ctx.adapter_name()));
    let total = planes.len() as u64 * stride;
    let (tx, rx) = std::sync::mpsc::channel();
    up.slice(0..total).map_async(wgpu::MapMode::Write, move |r| {
        let _ = tx.send(r);
    });
    let mut mapped = None;
    for _ in 0..1000 {
        ctx.device.poll(wgpu::PollType::Poll).map_err(|e| gpu_err("poll", &e))?;
        match rx.try_recv() {
            Ok(r) => {
                mapped = Some(r);
                break;
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(e) => return Err(gpu_err("map callback", &e)),
        }
    }
    let mapped = match mapped {
        Some(r) => r,
        None => {
            ctx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| gpu_err("poll", &e))?;
            rx.recv().map_err(|e| gpu_err("map callback", &e))?
        }
    };
    mapped.map_err(|e| gpu_err("map upload", &e))?;
    let bytes: usize = planes.iter().map(|(_, s)| s.len() * 4).sum();
    let threads = if bytes >= PARALLEL_STAGE_BYTES { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { 1 };
    // Pieces of about bytes/threads (multiples of 256 bytes, so every view starts aligned).
    let piece = (bytes.div_ceil(threads) / 4).next_multiple_of(64).max(64);
    let mut pieces = Vec::new();
    for (p, src) in planes {
        for (k, part) in src.chunks(piece).enumerate() {
            let off = *p as u64 * stride + (k * piece * 4) as u64;
            match up.slice(off..off + part.len() as u64 * 4).get_mapped_range_mut() {
                Ok(view) => pieces.push((view, part)),
                Err(e) => {
                    // Back to the pool unmapped, so that the next batch can map it.
                    drop(pieces);
                    up.unmap();
                    return Err(gpu_err("mapped range", &e));
                }
            }
        }
    }
    if threads <= 1 {
        for (view, src) in &mut pieces {
            view.copy_from_slice(bytemuck::cast_slice(src));
        }
    } else {
        let per = pieces.len().div_ceil(threads);
        std::thread::scope(|s| {
            for group in pieces.chunks_mut(per) {
                s.spawn(move || {
                    for (view, src) in group {
                        view.copy_from_slice(bytemuck::cast_slice(src));
                    }
                });
            }
        });
    }
    drop(pieces);
    up.unmap();
    Ok(())
}

fn to_u32(v: usize) -> Result<u32, EngineError> {
    u32::try_from(v).map_err(|_| EngineError::BadStamp(format!("batch dimension {v} exceeds u32")))
}

fn check_len(batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32]) -> Result<(), EngineError> {
    let want = batch.n * batch.npix();
    if conv_t.len() != want || conv_tv.len() != want {
        return Err(EngineError::BadStamp(format!(
            "convolved planes have {} and {} values, expected {want}",
            conv_t.len(),
            conv_tv.len()
        )));
    }
    Ok(())
}

fn to_fits(res: &[f32]) -> Vec<Fit> {
    res.chunks_exact(RESULT_STRIDE)
        .map(|r| Fit { scale: r[0], background: r[1], status: FitStatus::from_code(r[7] as u32) })
        .collect()
}

fn to_results(res: &[f32]) -> Vec<SubtractionResult> {
    res.chunks_exact(RESULT_STRIDE)
        .map(|r| SubtractionResult { flux_scale: r[0], background: r[1], flux: r[2], flux_err: r[3], score: r[4] })
        .collect()
}

impl Engine for GpuEngine {
    fn adapter(&self) -> String {
        self.ctx.adapter_name()
    }

    fn gpu(&mut self) -> Option<&mut GpuEngine> {
        Some(self)
    }

    fn subtract(&mut self, batch: &StampBatch) -> Result<Vec<SubtractionResult>, EngineError> {
        let plan = Plan { convolve: true, fit: true, score: true, conv: None, fits: None, read: &[], squares: false };
        let (res, _) = self.run(batch, plan)?;
        Ok(to_results(&res))
    }

    fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        GpuEngine::subtract_images(self, batch)
    }

    fn subtract_planes(&mut self, batch: &StampBatch) -> Result<StampPlanes, EngineError> {
        GpuEngine::subtract_planes(self, batch)
    }
    fn subtract_squares(&mut self, batch: &StampBatch, half: usize) -> Result<StampSquares, EngineError> {
        GpuEngine::subtract_squares(self, batch, half)
    }
}
