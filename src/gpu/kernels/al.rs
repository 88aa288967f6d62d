//! Dispatchers for the Alard–Lupton kernels (CPU twin: `cpu::al`):
//!
//! - `shaders/al/al_convolve.wgsl`: a frame convolved with a fitted, spatially varying kernel,
//!   as `Σ_t m_t(x, y) · (Q_t ⊗ image)` over the spatial monomials ([`GpuEngine::al_convolve`]),
//!   and the exact variance of the result ([`GpuEngine::al_convolve_variance`]).
//! - `shaders/al/al_gram.wgsl`: per fitting stamp, the basis-convolved cutouts `C_k` and the
//!   weighted Gram sums of the fit ([`GpuEngine::al_stamp_grams`]; `GpuEngine` is a
//!   [`StampGrams`], so `subtract::fit_with(…, &mut gpu)` fits on the GPU).
//!
//! These have their own bind-group layouts (not the engine's batch layout) and pipelines, built
//! on first use and kept in the engine; buffers come from the engine's pool. Frames larger than
//! one storage binding run in bands of rows (each band uploads its rows plus the kernel's halo).
//! Workgroup memory stays under 16 KiB (WebGPU's minimum, GL's llvmpipe), at most 3 storage
//! buffers for the frame kernel and 4 for the stamp kernels (GL has 4 per stage).

use std::time::{Duration, Instant};

use crate::cpu::al::{term_kernels, variance_kernels};
use super::{check_limits, gpu_err, read_floats, read_into};
use crate::engine::EngineError;
use crate::gpu::context::GpuContext;
use crate::gpu::GpuEngine;
use crate::subtract::{spatial_terms, Basis, GramInput, KernelSolution, StampGram, StampGrams, SubtractError};

/// `shaders/al/al_convolve.wgsl`.
pub const CONVOLVE_WGSL: &str = include_str!("../../../shaders/al/al_convolve.wgsl");
/// `shaders/al/al_gram.wgsl`.
pub const GRAM_WGSL: &str = include_str!("../../../shaders/al/al_gram.wgsl");

pub const ENTRY_CONVOLVE: &str = "al_convolve";
pub const ENTRY_STAMP_CONVOLVE: &str = "al_stamp_convolve";
pub const ENTRY_STAMP_GRAM: &str = "al_stamp_gram";

// Keep in sync with the constants of the same names in shaders/al/al_convolve.wgsl.
/// Invocations per workgroup along x and y of `al_convolve`.
pub const TX: u32 = 16;
pub const TY: u32 = 8;
/// Output pixels per invocation (along x) and per workgroup row.
pub const PX: u32 = 4;
pub const TW: u32 = TX * PX;
/// Monomials per pass.
pub const TERMS: usize = 6;
/// Largest kernel half-width the shaders take (the basis default caps it at 24).
pub const MAX_HALF: usize = 24;
/// Input rows of the `al_convolve` tile; kernel rows are taken `TILE_ROWS - TY + 1` at a time.
pub const TILE_ROWS: u32 = 27;
/// Workgroup memory of `al_convolve`, bytes (tile, kernel row, NaN mask, flag).
pub const CONVOLVE_WORKGROUP_BYTES: u32 = 783 * 16 + 208 * 16 + 98 * 4 + 4;

// Keep in sync with the constants of the same names in shaders/al/al_gram.wgsl.
/// Output tile side of `al_stamp_convolve`.
pub const STAMP_TILE: u32 = 16;
/// Basis functions per `al_stamp_convolve` workgroup.
pub const GROUP: usize = 8;
/// Invocations of an `al_stamp_gram` workgroup.
pub const GRAM_WG: u32 = 256;
/// Most Gram columns (basis functions + background terms + 1).
pub const MAX_COLS: usize = 64;
/// Rows of the `al_stamp_convolve` tile (kernel rows `STAMP_TILE_ROWS - STAMP_TILE + 1` at a time).
pub const STAMP_TILE_ROWS: u32 = 48;
/// Workgroup memory of the larger stamp entry point, bytes.
pub const GRAM_WORKGROUP_BYTES: u32 = 3072 * 4 + 98 * 16;

/// Parameters of one `al_convolve` pass (keep in sync with `struct AlConvParams` in
/// `shaders/al/al_convolve.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AlConvParams {
    pub width: u32,
    pub height: u32,
    pub in_y0: u32,
    pub out_y0: u32,
    pub out_rows: u32,
    pub half: u32,
    pub taps4: u32,
    pub order: u32,
    pub term0: u32,
    pub kern_off: u32,
    pub accumulate: u32,
    pub nan_bits: u32,
}

impl AlConvParams {
    /// Pass `p` (spatial terms `p·TERMS..`) of a `w × h` frame: input rows from `in_y0`, output
    /// rows `out_y0 .. out_y0 + rows`; the first pass writes, the others accumulate.
    #[allow(clippy::too_many_arguments)]
    pub fn pass(p: usize, w: usize, h: usize, in_y0: usize, out_y0: usize, rows: usize, half: usize, taps4: usize, order: usize) -> AlConvParams {
        let side = 2 * half + 1;
        AlConvParams {
            width: w as u32,
            height: h as u32,
            in_y0: in_y0 as u32,
            out_y0: out_y0 as u32,
            out_rows: rows as u32,
            half: half as u32,
            taps4: taps4 as u32,
            order: order as u32,
            term0: (p * TERMS) as u32,
            kern_off: (p * side * taps4 * 2) as u32,
            accumulate: (p > 0) as u32,
            nan_bits: 0x7fc0_0000,
        }
    }
}

/// Parameters of the stamp kernels (keep in sync with `struct AlGramParams` in
/// `shaders/al/al_gram.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AlGramParams {
    pub n: u32,
    pub side: u32,
    pub cside: u32,
    pub half: u32,
    pub nk: u32,
    pub nbg: u32,
    pub ncols: u32,
    pub npix: u32,
    pub in_stride: u32,
    pub pairs: u32,
    pub tiles_x: u32,
    pub pad: u32,
}

/// The AL bind-group layouts and pipelines, built once per engine.
#[derive(Debug)]
pub struct AlPipelines {
    conv_layout: wgpu::BindGroupLayout,
    convolve: wgpu::ComputePipeline,
    gram_layout: wgpu::BindGroupLayout,
    stamp_convolve: wgpu::ComputePipeline,
    stamp_gram: wgpu::ComputePipeline,
    /// Most output rows per band of `al_convolve` (tests force bands on small frames).
    band_rows: Option<usize>,
}

fn entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    }
}

impl AlPipelines {
    /// Check the adapter's limits against what the shaders need, then build the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<AlPipelines, EngineError> {
        let l = &ctx.limits;
        let need = [
            ("workgroup memory bytes", l.max_compute_workgroup_storage_size, CONVOLVE_WORKGROUP_BYTES.max(GRAM_WORKGROUP_BYTES)),
            ("invocations per workgroup", l.max_compute_invocations_per_workgroup, GRAM_WG),
            ("workgroup size x", l.max_compute_workgroup_size_x, GRAM_WG),
            ("workgroup size y", l.max_compute_workgroup_size_y, STAMP_TILE),
            ("storage buffers per stage", l.max_storage_buffers_per_shader_stage, 3),
        ];
        check_limits(ctx, "Alard–Lupton kernels", &need)?;
        use wgpu::BufferBindingType as B;
        let dev = &ctx.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let ro = B::Storage { read_only: true };
        let rw = B::Storage { read_only: false };
        let conv_layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("blink.al_convolve"),
            entries: &[entry(0, B::Uniform), entry(1, ro), entry(2, ro), entry(3, rw)],
        });
        let gram_layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("blink.al_gram"),
            entries: &[entry(0, B::Uniform), entry(1, ro), entry(2, ro), entry(3, rw), entry(4, rw)],
        });
        let pipeline = |layout: &wgpu::BindGroupLayout, src: &str, module_label: &str, entry: &str| {
            let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(module_label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
            let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(module_label),
                bind_group_layouts: &[Some(layout)],
                immediate_size: 0,
            });
            dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("blink.{entry}")),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let convolve = pipeline(&conv_layout, CONVOLVE_WGSL, "blink.al_convolve", ENTRY_CONVOLVE);
        let stamp_convolve = pipeline(&gram_layout, GRAM_WGSL, "blink.al_gram", ENTRY_STAMP_CONVOLVE);
        let stamp_gram = pipeline(&gram_layout, GRAM_WGSL, "blink.al_gram", ENTRY_STAMP_GRAM);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(ctx, format!("building the Alard–Lupton pipelines: {e}")));
        }
        Ok(AlPipelines { conv_layout, convolve, gram_layout, stamp_convolve, stamp_gram, band_rows: None })
    }
}

/// Largest buffer one binding takes, rounded down to a power of two (the pool's size classes).
fn binding_cap(ctx: &GpuContext) -> u64 {
    let l = &ctx.limits;
    let max = l.max_storage_buffer_binding_size.min(l.max_buffer_size).max(4);
    1u64 << (63 - max.leading_zeros())
}

fn u32_of(v: usize, what: &str) -> Result<u32, EngineError> {
    u32::try_from(v).map_err(|_| EngineError::BadStamp(format!("{what} {v} exceeds u32")))
}

/// The term kernels (layout of `Basis::function`) flipped for a correlation, rows padded to
/// `taps4` taps, `TERMS` terms interleaved per tap in two vec4s, one block per pass.
pub(crate) fn pack_terms(kernels: &[Vec<f64>], half: usize) -> (Vec<f32>, usize, usize) {
    let side = 2 * half + 1;
    let taps4 = side.div_ceil(4) * 4;
    let passes = kernels.len().div_ceil(TERMS).max(1);
    let mut out = vec![0.0f32; passes * side * taps4 * 8];
    for (t, k) in kernels.iter().enumerate() {
        let (p, slot) = (t / TERMS, t % TERMS);
        for b in 0..side {
            for a in 0..side {
                let v = k[(side - 1 - b) * side + (side - 1 - a)];
                out[((p * side + b) * taps4 + a) * 8 + slot] = v as f32;
            }
        }
    }
    (out, passes, taps4)
}

/// Pop the two error scopes of a submission into one result.
fn pop_scopes(ctx: &GpuContext, oom: wgpu::ErrorScopeGuard, val: wgpu::ErrorScopeGuard) -> Result<(), EngineError> {
    let oom_err = pollster::block_on(oom.pop());
    let val_err = pollster::block_on(val.pop());
    match (val_err, oom_err) {
        (Some(e), _) | (None, Some(e)) => Err(gpu_err(ctx, e)),
        (None, None) => Ok(()),
    }
}

impl GpuEngine {
    fn al_pipelines(&mut self) -> Result<(), EngineError> {
        if self.al.is_none() {
            self.al = Some(AlPipelines::new(&self.ctx)?);
        }
        Ok(())
    }

    /// Cap the rows of one `al_convolve` band (rounded down to a multiple of [`TY`], at least
    /// one tile), as if the storage binding were that small; `None`: the adapter's limit. For
    /// tests of the banding on small frames.
    #[doc(hidden)]
    pub fn al_limit_band_rows(&mut self, rows: Option<usize>) -> Result<(), EngineError> {
        self.al_pipelines()?;
        if let Some(p) = self.al.as_mut() {
            p.band_rows = rows.map(|r| (r / TY as usize * TY as usize).max(TY as usize));
        }
        Ok(())
    }

    /// `sol` applied to `image` (`w × h`, the frame it was fitted on): the twin of
    /// [`KernelSolution::convolve`] (and of `cpu::al::convolve`), edges extended, a non-finite
    /// pixel making its whole `(2h+1)²` box NaN. Kernel half-widths up to [`MAX_HALF`].
    pub fn al_convolve(&mut self, sol: &KernelSolution, image: &[f32], w: usize, h: usize) -> Result<Vec<f32>, EngineError> {
        check_frame(sol, image.len(), w, h)?;
        Ok(self.al_convolve_terms(&term_kernels(sol), sol.half(), sol.spatial_order, image, w, h, 0)?.0)
    }

    /// The exact variance of [`GpuEngine::al_convolve`]`(image)` given the image's variance,
    /// `Σ_uv K(x,y;u,v)² V(x−u, y−v)` (twin: `cpu::al::convolve_variance`): the same kernel
    /// with the squared kernels of twice the spatial order (15 monomials for order 2, three
    /// passes). [`KernelSolution::convolve_variance`] approximates the shape of `K²` instead.
    pub fn al_convolve_variance(&mut self, sol: &KernelSolution, variance: &[f32], w: usize, h: usize) -> Result<Vec<f32>, EngineError> {
        check_frame(sol, variance.len(), w, h)?;
        let (order2, r) = variance_kernels(sol);
        Ok(self.al_convolve_terms(&r, sol.half(), order2, variance, w, h, 0)?.0)
    }

    /// [`GpuEngine::al_convolve`], then the convolution alone (no upload, no read-back) run
    /// `repeats` times unmeasured (clocks ramp up) and `repeats` times measured on the resident
    /// frame: returns the result and the mean time of one convolution on the device (submit to
    /// completion, summed over bands), for benchmarks.
    pub fn al_convolve_timed(&mut self, sol: &KernelSolution, image: &[f32], w: usize, h: usize, repeats: usize) -> Result<(Vec<f32>, Duration), EngineError> {
        check_frame(sol, image.len(), w, h)?;
        self.al_convolve_terms(&term_kernels(sol), sol.half(), sol.spatial_order, image, w, h, repeats)
    }

    /// `Σ_t m_t(x, y) · (kernels[t] ⊗ image)(x, y)`, `m_t` the monomials of
    /// `spatial_terms(order)` at the normalised position, `kernels` `(2·half+1)²` each in the
    /// layout of `Basis::function` (twin: `cpu::al::convolve_terms`). With `repeats > 0` also
    /// the mean device time of the convolution alone over that many runs.
    #[allow(clippy::too_many_arguments)]
    pub fn al_convolve_terms(
        &mut self,
        kernels: &[Vec<f64>],
        half: usize,
        order: usize,
        image: &[f32],
        w: usize,
        h: usize,
        repeats: usize,
    ) -> Result<(Vec<f32>, Duration), EngineError> {
        let side = 2 * half + 1;
        if half > MAX_HALF {
            return Err(EngineError::BadStamp(format!("kernel half-width {half} above the GPU's {MAX_HALF}")));
        }
        if w == 0 || h == 0 || image.len() != w * h {
            return Err(EngineError::BadStamp(format!("{} pixels for a {w}x{h} frame", image.len())));
        }
        if kernels.len() > spatial_terms(order).len() || kernels.iter().any(|k| k.len() != side * side) {
            return Err(EngineError::BadStamp(format!("{} term kernels for spatial order {order} and half-width {half}", kernels.len())));
        }
        self.al_pipelines()?;
        let (Some(pipes), ctx, pool) = (self.al.as_ref(), &self.ctx, &mut self.pool) else {
            return Err(EngineError::Gpu("Alard–Lupton pipelines missing".into()));
        };
        let (kern, passes, taps4) = pack_terms(kernels, half);
        let cap = binding_cap(ctx);
        let row_bytes = 4 * w as u64;
        let max_in_rows = (cap / row_bytes) as usize;
        let max_groups = ctx.limits.max_compute_workgroups_per_dimension as usize;
        if max_in_rows < 2 * half + TY as usize || w.div_ceil(TW as usize) > max_groups || kern.len() as u64 * 4 > cap {
            return Err(gpu_err(ctx, format!("a {w}-pixel row band with a {half}-pixel halo exceeds a storage binding of {cap} bytes")));
        }
        let band = h
            .min((max_in_rows - 2 * half) / TY as usize * TY as usize)
            .min(max_groups * TY as usize)
            .min(pipes.band_rows.unwrap_or(usize::MAX));
        let in_rows_max = h.min(band + 2 * half);
        // Frames wider or taller than u32 are refused before the parameters cast to it.
        u32_of(w, "frame width")?;
        u32_of(h, "frame height")?;

        let dev = &ctx.device;
        let q = &ctx.queue;
        use wgpu::BufferUsages as U;
        let b_img = pool.acquire(dev, "blink.al_convolve.image", in_rows_max as u64 * row_bytes, U::STORAGE | U::COPY_DST);
        let b_kern = pool.acquire(dev, "blink.al_convolve.kernels", kern.len() as u64 * 4, U::STORAGE | U::COPY_DST);
        let b_out = pool.acquire(dev, "blink.al_convolve.out", band as u64 * row_bytes, U::STORAGE | U::COPY_SRC);
        let b_read = pool.acquire(dev, "blink.al_convolve.readback", band as u64 * row_bytes, U::MAP_READ | U::COPY_DST);
        let b_params: Vec<wgpu::Buffer> = (0..passes)
            .map(|_| pool.acquire(dev, "blink.al_convolve.params", std::mem::size_of::<AlConvParams>() as u64, U::UNIFORM | U::COPY_DST))
            .collect();
        q.write_buffer(&b_kern, 0, bytemuck::cast_slice(&kern));
        let binds: Vec<wgpu::BindGroup> = b_params
            .iter()
            .map(|p| {
                dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("blink.al_convolve"),
                    layout: &pipes.conv_layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: p.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 1, resource: b_img.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 2, resource: b_kern.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 3, resource: b_out.as_entire_binding() },
                    ],
                })
            })
            .collect();

        let mut out = vec![0.0f32; w * h];
        let mut device_time = Duration::ZERO;
        let mut result = Ok(());
        let mut y0 = 0;
        while y0 < h && result.is_ok() {
            let y1 = (y0 + band).min(h);
            let (in_lo, in_hi) = (y0.saturating_sub(half), (y1 + half).min(h));
            let rows = y1 - y0;
            let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
            let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            q.write_buffer(&b_img, 0, bytemuck::cast_slice(&image[in_lo * w..in_hi * w]));
            for (p, buf) in b_params.iter().enumerate() {
                let prm = AlConvParams::pass(p, w, h, in_lo, y0, rows, half, taps4, order);
                q.write_buffer(buf, 0, bytemuck::bytes_of(&prm));
            }
            let groups = (w.div_ceil(TW as usize) as u32, rows.div_ceil(TY as usize) as u32);
            let record = |enc: &mut wgpu::CommandEncoder| {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.al_convolve"), timestamp_writes: None });
                pass.set_pipeline(&pipes.convolve);
                for bind in &binds {
                    pass.set_bind_group(0, bind, &[]);
                    pass.dispatch_workgroups(groups.0, groups.1, 1);
                }
            };
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.al_convolve") });
            record(&mut enc);
            enc.copy_buffer_to_buffer(&b_out, 0, &b_read, 0, rows as u64 * row_bytes);
            q.submit([enc.finish()]);
            result = pop_scopes(ctx, oom, val).and_then(|_| read_into(ctx, &b_read, &mut out[y0 * w..y1 * w]));
            if repeats > 0 && result.is_ok() {
                let run = |n: usize| {
                    for _ in 0..n {
                        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.al_convolve") });
                        record(&mut enc);
                        q.submit([enc.finish()]);
                    }
                    dev.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| gpu_err(ctx, format!("poll: {e}")))
                };
                // Unmeasured runs first: a GPU that idled (e.g. through a CPU benchmark) runs
                // at low clocks for a while (measured on an H100: 11–13 ms instead of 7).
                result = run(repeats).and_then(|_| {
                    let t1 = Instant::now();
                    run(repeats).map(|_| t1.elapsed())
                }).map(|t| device_time += t / repeats as u32);
            }
            y0 = y1;
        }
        drop(binds);
        for b in [b_img, b_kern, b_out, b_read].into_iter().chain(b_params) {
            pool.release(b);
        }
        result.map(|_| (out, device_time))
    }

    /// For every stamp, `C_k = B_k ⊗ cutout` (f32, direct 2-D with the basis grids) and the
    /// weighted Gram sums of its columns (f32 products, blocked and compensated sums; ~1e-6 of
    /// the CPU's f64), as [`StampGram`]s in input order; `nbg` background monomials per stamp.
    /// A given `GramInput::conv` is ignored (the GPU convolves again: cheaper than uploading).
    pub fn al_stamp_grams(&mut self, basis: &Basis, nbg: usize, inputs: &[GramInput]) -> Result<Vec<StampGram>, EngineError> {
        let (nk, half) = (basis.len(), basis.half);
        let ncols = StampGram::columns(nk, nbg);
        if half > MAX_HALF || ncols > MAX_COLS {
            return Err(EngineError::BadStamp(format!(
                "kernel half-width {half} (GPU ≤ {MAX_HALF}) or {nk} basis functions + {nbg} background terms (GPU ≤ {} columns)",
                MAX_COLS - 1
            )));
        }
        for g in inputs {
            g.check(basis, nbg).map_err(|e| EngineError::BadStamp(e.to_string()))?;
        }
        let mut out: Vec<Option<StampGram>> = vec![None; inputs.len()];
        // Stamps of one side go together (a fit's stamps all have the same).
        let mut sides: Vec<usize> = inputs.iter().map(|g| g.side).collect();
        sides.sort_unstable();
        sides.dedup();
        for side in sides {
            let idx: Vec<usize> = (0..inputs.len()).filter(|&i| inputs[i].side == side).collect();
            let group: Vec<&GramInput> = idx.iter().map(|&i| &inputs[i]).collect();
            for (i, g) in idx.into_iter().zip(self.al_stamp_grams_side(basis, nbg, side, &group)?) {
                out[i] = Some(g);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn al_stamp_grams_side(&mut self, basis: &Basis, nbg: usize, side: usize, inputs: &[&GramInput]) -> Result<Vec<StampGram>, EngineError> {
        self.al_pipelines()?;
        let (Some(pipes), ctx, pool) = (self.al.as_ref(), &self.ctx, &mut self.pool) else {
            return Err(EngineError::Gpu("Alard–Lupton pipelines missing".into()));
        };
        let (nk, half, kside) = (basis.len(), basis.half, basis.side());
        let ncols = StampGram::columns(nk, nbg);
        let pairs = ncols * (ncols + 1) / 2;
        let (cside, npix) = (side + 2 * half, side * side);
        let in_stride = cside * cside + (2 + nbg) * npix;
        let ngroups = nk.div_ceil(GROUP);
        let tiles_x = side.div_ceil(STAMP_TILE as usize);
        // Flipped grids, GROUP functions interleaved per tap.
        let mut grids = vec![0.0f32; ngroups * kside * kside * 2 * 4];
        for k in 0..nk {
            let (g, j) = (k / GROUP, k % GROUP);
            let f = basis.function(k);
            for b in 0..kside {
                for a in 0..kside {
                    grids[((g * kside + b) * kside + a) * 8 + j] = f[(kside - 1 - b) * kside + (kside - 1 - a)] as f32;
                }
            }
        }
        let cap = binding_cap(ctx);
        let per_stamp = 4 * in_stride.max(nk * npix).max(pairs) as u64;
        let max_groups = ctx.limits.max_compute_workgroups_per_dimension as usize;
        let chunk = ((cap / per_stamp) as usize).min(max_groups);
        if chunk == 0 || tiles_x * tiles_x > max_groups {
            return Err(gpu_err(ctx, format!("one stamp of side {side} ({per_stamp} bytes) exceeds a storage binding of {cap} bytes")));
        }
        let dev = &ctx.device;
        let q = &ctx.queue;
        use wgpu::BufferUsages as U;
        let n_max = chunk.min(inputs.len()).max(1);
        let b_prm = pool.acquire(dev, "blink.al_gram.params", std::mem::size_of::<AlGramParams>() as u64, U::UNIFORM | U::COPY_DST);
        let b_in = pool.acquire(dev, "blink.al_gram.inputs", (n_max * in_stride * 4) as u64, U::STORAGE | U::COPY_DST);
        let b_basis = pool.acquire(dev, "blink.al_gram.basis", grids.len() as u64 * 4, U::STORAGE | U::COPY_DST);
        let b_conv = pool.acquire(dev, "blink.al_gram.conv", (n_max * nk * npix * 4) as u64, U::STORAGE | U::COPY_SRC);
        let b_sums = pool.acquire(dev, "blink.al_gram.sums", (n_max * pairs * 4) as u64, U::STORAGE | U::COPY_SRC);
        let read_floats_max = n_max * (nk * npix + pairs);
        let b_read = pool.acquire(dev, "blink.al_gram.readback", read_floats_max as u64 * 4, U::MAP_READ | U::COPY_DST);
        q.write_buffer(&b_basis, 0, bytemuck::cast_slice(&grids));
        let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("blink.al_gram"),
            layout: &pipes.gram_layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: b_prm.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: b_in.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: b_basis.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 3, resource: b_conv.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 4, resource: b_sums.as_entire_binding() },
            ],
        });
        let mut result: Result<Vec<StampGram>, EngineError> = Ok(Vec::with_capacity(inputs.len()));
        for part in inputs.chunks(n_max) {
            let n = part.len();
            let mut packed = Vec::with_capacity(n * in_stride);
            for g in part {
                packed.extend_from_slice(g.cutout);
                packed.extend(g.science.iter().map(|&v| v as f32));
                packed.extend(g.weight.iter().map(|&v| v.max(0.0).sqrt() as f32));
                packed.extend(g.background.iter().map(|&v| v as f32));
            }
            let prm = AlGramParams {
                n: n as u32,
                side: side as u32,
                cside: cside as u32,
                half: half as u32,
                nk: nk as u32,
                nbg: nbg as u32,
                ncols: ncols as u32,
                npix: npix as u32,
                in_stride: in_stride as u32,
                pairs: pairs as u32,
                tiles_x: tiles_x as u32,
                pad: 0,
            };
            let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
            let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            q.write_buffer(&b_prm, 0, bytemuck::bytes_of(&prm));
            q.write_buffer(&b_in, 0, bytemuck::cast_slice(&packed));
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("blink.al_gram") });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("blink.al_gram"), timestamp_writes: None });
                pass.set_bind_group(0, &bind, &[]);
                pass.set_pipeline(&pipes.stamp_convolve);
                pass.dispatch_workgroups((tiles_x * tiles_x) as u32, n as u32, ngroups as u32);
                pass.set_pipeline(&pipes.stamp_gram);
                pass.dispatch_workgroups(n as u32, 1, 1);
            }
            let conv_bytes = (n * nk * npix * 4) as u64;
            enc.copy_buffer_to_buffer(&b_conv, 0, &b_read, 0, conv_bytes);
            enc.copy_buffer_to_buffer(&b_sums, 0, &b_read, conv_bytes, (n * pairs * 4) as u64);
            q.submit([enc.finish()]);
            let data = pop_scopes(ctx, oom, val).and_then(|_| read_floats(ctx, &b_read, n * (nk * npix + pairs)));
            match (data, &mut result) {
                (Ok(data), Ok(acc)) => {
                    let (conv, sums) = data.split_at(n * nk * npix);
                    for s in 0..n {
                        acc.push(StampGram {
                            conv: conv[s * nk * npix..(s + 1) * nk * npix].to_vec(),
                            sums: sums[s * pairs..(s + 1) * pairs].iter().map(|&v| v as f64).collect(),
                        });
                    }
                }
                (Err(e), _) => {
                    result = Err(e);
                    break;
                }
                (Ok(_), Err(_)) => break,
            }
        }
        drop(bind);
        for b in [b_prm, b_in, b_basis, b_conv, b_sums, b_read] {
            pool.release(b);
        }
        result
    }
}

fn check_frame(sol: &KernelSolution, len: usize, w: usize, h: usize) -> Result<(), EngineError> {
    if len != w * h || w == 0 || h == 0 || (w, h) != (sol.width, sol.height) {
        return Err(EngineError::BadStamp(format!(
            "{len} pixels for a {w}x{h} frame; the kernel was fitted on {}x{}",
            sol.width, sol.height
        )));
    }
    Ok(())
}

/// The fit's per-stamp work on the GPU: `subtract::fit_with(pair, basis, stamps, opts, &mut gpu)`.
impl StampGrams for GpuEngine {
    fn grams(&mut self, basis: &Basis, nbg: usize, inputs: &[GramInput]) -> Result<Vec<StampGram>, SubtractError> {
        self.al_stamp_grams(basis, nbg, inputs).map_err(|e| SubtractError::Gpu(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::wgsl_fields;

    /// Field names of a WGSL struct (scalar u32 fields).
    #[test]
    fn wgsl_params_and_constants_match_rust() {
        let f = wgsl_fields(CONVOLVE_WGSL, "AlConvParams");
        assert_eq!(
            f,
            ["width", "height", "in_y0", "out_y0", "out_rows", "half", "taps4", "order", "term0", "kern_off", "accumulate", "nan_bits"]
        );
        assert_eq!(4 * f.len(), std::mem::size_of::<AlConvParams>());
        let f = wgsl_fields(GRAM_WGSL, "AlGramParams");
        assert_eq!(f, ["n", "side", "cside", "half", "nk", "nbg", "ncols", "npix", "in_stride", "pairs", "tiles_x", "pad"]);
        assert_eq!(4 * f.len(), std::mem::size_of::<AlGramParams>());
        for (name, v) in [("TX", TX as usize), ("TY", TY as usize), ("TW", TW as usize), ("TERMS", TERMS), ("MAX_HALF", MAX_HALF)] {
            assert!(CONVOLVE_WGSL.contains(&format!("const {name}: u32 = {v}u;")), "al_convolve {name}");
        }
        assert!(CONVOLVE_WGSL.contains(&format!("@workgroup_size({TX}, {TY}, 1)")));
        for (name, v) in [("STAMP_TILE", STAMP_TILE as usize), ("GROUP", GROUP), ("MAX_HALF", MAX_HALF), ("GRAM_WG", GRAM_WG as usize), ("MAX_COLS", MAX_COLS)] {
            assert!(GRAM_WGSL.contains(&format!("const {name}: u32 = {v}u;")), "al_gram {name}");
        }
        // The workgroup arrays against the sizes the constants imply.
        let max_taps4 = (2 * MAX_HALF + 1).div_ceil(4) * 4;
        let in_w4 = (TW as usize + max_taps4) / 4;
        let rows = TILE_ROWS as usize;
        assert!(CONVOLVE_WGSL.contains(&format!("const MAX_TAPS4: u32 = {max_taps4}u;")));
        assert!(CONVOLVE_WGSL.contains(&format!("const CHUNK: u32 = {}u;", rows - TY as usize + 1)));
        assert!(CONVOLVE_WGSL.contains(&format!("array<vec4<f32>, {}>", in_w4 * rows)));
        assert!(CONVOLVE_WGSL.contains(&format!("array<vec4<f32>, {}>", 4 * max_taps4)));
        assert!(CONVOLVE_WGSL.contains(&format!("array<atomic<u32>, {}>", (in_w4 * 4 * rows).div_ceil(32))));
        assert_eq!(CONVOLVE_WORKGROUP_BYTES as usize, in_w4 * rows * 16 + 4 * max_taps4 * 16 + (in_w4 * 4 * rows).div_ceil(32) * 4 + 4);
        const { assert!(CONVOLVE_WORKGROUP_BYTES <= 16384) };
        let cols = STAMP_TILE as usize + 2 * MAX_HALF;
        assert!(GRAM_WGSL.contains(&format!("const CHUNK: u32 = {}u;", STAMP_TILE_ROWS - STAMP_TILE + 1)));
        assert!(GRAM_WGSL.contains(&format!("array<f32, {}>", cols * STAMP_TILE_ROWS as usize)));
        assert!(GRAM_WGSL.contains(&format!("array<vec4<f32>, {}>", 2 * (2 * MAX_HALF + 1))));
        const { assert!(GRAM_WORKGROUP_BYTES <= 16384) };
        let pairs = MAX_COLS * (MAX_COLS + 1) / 2;
        assert!(GRAM_WGSL.contains(&format!("const PAIRS_PER: u32 = {}u;", pairs.div_ceil(GRAM_WG as usize))));
    }

    #[test]
    fn packed_terms_are_flipped_and_padded() {
        let half = 2;
        let side = 5;
        let k: Vec<Vec<f64>> = (0..7).map(|t| (0..side * side).map(|i| (t * 100 + i) as f64).collect()).collect();
        let (p, passes, taps4) = pack_terms(&k, half);
        assert_eq!((passes, taps4), (2, 8));
        // Term 1, flipped row b = 0 is grid row 4, tap a = 0 is grid column 4.
        assert_eq!(p[1], (100 + 4 * side + 4) as f32);
        // Padding taps and unused slots are zero.
        assert_eq!(p[(5 * 8) + 1], 0.0);
        assert_eq!(p[6], 0.0);
        // Term 6 is slot 0 of the second pass.
        assert_eq!(p[(side * taps4) * 8], (600 + 24) as f32);
    }
}
