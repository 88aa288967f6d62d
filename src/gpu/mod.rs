//! The GPU engine: wgpu + the WGSL kernels in `shaders/`.
//!
//! - [`context`]: adapter, device and pipelines, built once.
//! - [`pool`]: buffers reused across batches by size class.
//! - [`kernels`]: one dispatcher per kernel, and the buffer layout the shaders share.
//!
//! A batch is packed into one `pix` buffer and uploaded once; every kernel runs on it in one
//! compute pass; only the per-stamp results come back (plus, on request, whole planes such as
//! the difference image). Batches larger than the adapter's storage-binding limit run in chunks.

pub mod context;
pub mod kernels;
pub mod pool;

use crate::cpu::convolve::Convolved;
use crate::engine::{
    Engine, EngineError, Fit, FitStatus, StampBatch, SubtractionImages, SubtractionResult,
};
use context::GpuContext;
use kernels::{BatchParams, Pix, StampGpu, Work, PIX_PLANES, RESULT_STRIDE, WORK_PLANES};
use pool::BufferPool;

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
}

impl GpuEngine {
    /// Open the best compute-capable adapter (honouring `BLINK_ADAPTER`).
    pub fn new() -> Result<GpuEngine, EngineError> {
        Ok(GpuEngine { ctx: GpuContext::new()?, pool: BufferPool::new(), al: None, frame: None })
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
        let plan = Plan { convolve: true, fit: true, score: true, conv: None, fits: None, read: &[Work::Diff, Work::Var] };
        let (res, mut planes) = self.run(batch, plan)?;
        let variance = planes.pop().unwrap_or_default();
        let difference = planes.pop().unwrap_or_default();
        Ok(SubtractionImages { results: to_results(&res), difference, variance })
    }

    /// The `convolve` kernel alone.
    pub fn convolve(&mut self, batch: &StampBatch) -> Result<Convolved, EngineError> {
        let plan = Plan { convolve: true, fit: false, score: false, conv: None, fits: None, read: &[Work::ConvT, Work::ConvV] };
        let (_, mut planes) = self.run(batch, plan)?;
        let template_var = planes.pop().unwrap_or_default();
        let template = planes.pop().unwrap_or_default();
        Ok(Convolved { template, template_var })
    }

    /// The `fit` kernel alone, on a given convolved template and variance.
    pub fn fit(&mut self, batch: &StampBatch, conv_t: &[f32], conv_tv: &[f32]) -> Result<Vec<Fit>, EngineError> {
        check_len(batch, conv_t, conv_tv)?;
        let plan = Plan { convolve: false, fit: true, score: false, conv: Some((conv_t, conv_tv)), fits: None, read: &[] };
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

    fn run(&mut self, batch: &StampBatch, plan: Plan<'_>) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
        batch.validate()?;
        let npix = batch.npix();
        let mut results = Vec::with_capacity(batch.n * RESULT_STRIDE);
        let mut planes: Vec<Vec<f32>> = plan.read.iter().map(|_| Vec::with_capacity(batch.n * npix)).collect();
        if batch.n == 0 || npix == 0 {
            return Ok((results, planes));
        }
        let chunk = self.chunk_stamps(npix);
        let mut s0 = 0;
        while s0 < batch.n {
            let s1 = (s0 + chunk).min(batch.n);
            let (res, pl) = self.run_chunk(batch, s0..s1, plan)?;
            results.extend_from_slice(&res);
            for (dst, src) in planes.iter_mut().zip(pl) {
                dst.extend_from_slice(&src);
            }
            s0 = s1;
        }
        Ok((results, planes))
    }

    fn run_chunk(
        &mut self,
        batch: &StampBatch,
        range: std::ops::Range<usize>,
        plan: Plan<'_>,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
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

        // One upload: the six input planes packed plane after plane.
        let mut pix = Vec::with_capacity(PIX_PLANES * plane_len);
        for (p, src) in [
            (Pix::Science, &batch.science),
            (Pix::Template, &batch.template),
            (Pix::ScienceVar, &batch.science_var),
            (Pix::TemplateVar, &batch.template_var),
            (Pix::Weight, &batch.weight),
            (Pix::Profile, &batch.profile),
        ] {
            debug_assert_eq!(pix.len(), p as usize * plane_len);
            pix.extend_from_slice(&src[px.clone()]);
        }
        let stamps: Vec<StampGpu> = batch.params[range.clone()].iter().map(StampGpu::from).collect();

        let dev = &self.ctx.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        use wgpu::BufferUsages as U;
        let f = 4u64;
        let res_bytes = (n * RESULT_STRIDE) as u64 * f;
        let plane_bytes = plane_len as u64 * f;
        let read_bytes = res_bytes + plan.read.len() as u64 * plane_bytes;
        let b_uniform = self.pool.acquire(dev, "blink.batch", 16, U::UNIFORM | U::COPY_DST);
        let b_pix = self.pool.acquire(dev, "blink.pix", PIX_PLANES as u64 * plane_bytes, U::STORAGE | U::COPY_DST);
        let b_stamps = self.pool.acquire(dev, "blink.stamps", std::mem::size_of_val(stamps.as_slice()) as u64, U::STORAGE | U::COPY_DST);
        let b_work = self.pool.acquire(dev, "blink.work", WORK_PLANES as u64 * plane_bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let b_res = self.pool.acquire(dev, "blink.results", res_bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let b_read = self.pool.acquire(dev, "blink.readback", read_bytes, U::MAP_READ | U::COPY_DST);

        let q = &self.ctx.queue;
        q.write_buffer(&b_uniform, 0, bytemuck::bytes_of(&dims));
        q.write_buffer(&b_pix, 0, bytemuck::cast_slice(&pix));
        q.write_buffer(&b_stamps, 0, bytemuck::cast_slice(&stamps));
        if let Some((ct, ctv)) = plan.conv {
            q.write_buffer(&b_work, Work::ConvT as u64 * plane_bytes, bytemuck::cast_slice(&ct[px.clone()]));
            q.write_buffer(&b_work, Work::ConvV as u64 * plane_bytes, bytemuck::cast_slice(&ctv[px.clone()]));
        }
        if let Some(fits) = plan.fits {
            let mut r = vec![0.0f32; n * RESULT_STRIDE];
            for (k, fit) in fits[range.clone()].iter().enumerate() {
                r[k * RESULT_STRIDE] = fit.scale;
                r[k * RESULT_STRIDE + 1] = fit.background;
                r[k * RESULT_STRIDE + 7] = fit.status.code() as f32;
            }
            q.write_buffer(&b_res, 0, bytemuck::cast_slice(&r));
        }

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
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.engine") });
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
        }
        enc.copy_buffer_to_buffer(&b_res, 0, &b_read, 0, res_bytes);
        for (k, w) in plan.read.iter().enumerate() {
            enc.copy_buffer_to_buffer(&b_work, *w as u64 * plane_bytes, &b_read, res_bytes + k as u64 * plane_bytes, plane_bytes);
        }
        q.submit([enc.finish()]);
        let oom_err = pollster::block_on(oom.pop());
        let val_err = pollster::block_on(scope.pop());

        let data = match (val_err, oom_err) {
            (Some(e), _) | (None, Some(e)) => Err(EngineError::Gpu(format!("{}: {e}", self.ctx.adapter_name()))),
            (None, None) => read_back(&self.ctx, &b_read, read_bytes),
        };
        for b in [b_uniform, b_pix, b_stamps, b_work, b_res, b_read] {
            self.pool.release(b);
        }
        let data = data?;
        let (res, rest) = data.split_at(n * RESULT_STRIDE);
        let planes = rest.chunks(plane_len.max(1)).take(plan.read.len()).map(<[f32]>::to_vec).collect();
        Ok((res.to_vec(), planes))
    }
}

fn read_back(ctx: &GpuContext, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<f32>, EngineError> {
    let gpu_err = |what: &str, e: &dyn std::fmt::Display| EngineError::Gpu(format!("{}: {what}: {e}", ctx.adapter_name()));
    let slice = buf.slice(0..bytes);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| gpu_err("poll", &e))?;
    rx.recv().map_err(|e| gpu_err("map callback", &e))?.map_err(|e| gpu_err("map", &e))?;
    let out = {
        let view = slice.get_mapped_range().map_err(|e| gpu_err("mapped range", &e))?;
        view.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    buf.unmap();
    Ok(out)
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
        let plan = Plan { convolve: true, fit: true, score: true, conv: None, fits: None, read: &[] };
        let (res, _) = self.run(batch, plan)?;
        Ok(to_results(&res))
    }

    fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        GpuEngine::subtract_images(self, batch)
    }
}
