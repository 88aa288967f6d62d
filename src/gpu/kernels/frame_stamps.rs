//! Dispatchers of `shaders/frame/frame_stamps.wgsl`: the Alard–Lupton fit's stars found on
//! planes that stay on the device, and only the squares around them read back
//! (`detect::al`'s `DeviceStamps`, a `subtract::StampSource`). A 4096² fit then reads a few MB
//! instead of four 67 MB planes.
//!
//! Twins: [`crate::subtract::stamps::stamp_candidates`] ([`GpuEngine::frame_stamp_candidates`]),
//! [`crate::subtract::Squares::from_pair`] ([`GpuEngine::frame_squares`]), a strided
//! `step_by` ([`GpuEngine::frame_sample`]) and the median of its positive values
//! ([`GpuEngine::frame_sample_median`]); `frame_parity` compares them.

use super::frame::{bad, pixel_groups, submit, FrameParams, GpuPlane, PlaneKind, Step};
use crate::engine::EngineError;
use crate::gpu::GpuEngine;
use crate::subtract::stamps::StampScan;

/// Room for candidates in the first `stamp_peaks` dispatch; a frame with more is scanned again
/// with room for all (the count is exact either way).
const FIRST_ROOM: usize = 16_384;

/// Entries with this index were found unusable by `stamp_usable`.
const NO_STAR: u32 = u32::MAX;

/// How many pixels a sample of `plane` every `step` pixels takes, checked against `mask`.
fn sample_count(plane: &GpuPlane, step: usize, mask: Option<&GpuPlane>) -> Result<usize, EngineError> {
    if step == 0 || mask.is_some_and(|m| (m.width, m.height) != (plane.width, plane.height)) {
        return Err(bad(format!("a sample every {step} pixels of a {}x{} plane", plane.width, plane.height)));
    }
    Ok((plane.width * plane.height).div_ceil(step))
}

/// Dispatch grid of `count` invocations numbered `k = y · mx + x`: (mx, workgroups).
fn list_grid(count: usize) -> (u32, (u32, u32)) {
    let mx = count.clamp(1, 1024);
    (mx as u32, pixel_groups(mx, count.div_ceil(mx).max(1)))
}

impl GpuEngine {
    /// `plane`'s pixels `0, step, 2·step, …` (as `plane.iter().step_by(step)`), with `mask`
    /// 0 where it is set. The samples a median or the stamps' sky is taken from.
    pub fn frame_sample(&mut self, plane: &GpuPlane, step: usize, mask: Option<&GpuPlane>) -> Result<Vec<f32>, EngineError> {
        let count = sample_count(plane, step, mask)?;
        let out = GpuPlane { buf: self.frame_buffer("blink.frame.sample", (count * 4) as u64)?, width: count, height: 1, kind: PlaneKind::Values };
        let run = (|| {
            let (ctx, pl) = self.frame_parts()?;
            let (mx, groups) = list_grid(count);
            let prm = FrameParams { mx, count: count as u32, side: step as u32, mode: mask.is_some() as u32, ..FrameParams::new(plane.width, plane.height) };
            let bufs = [Some((&plane.buf, plane.bytes())), None, Some((&out.buf, out.bytes())), mask.map(|m| (&m.buf, m.bytes()))];
            submit(ctx, pl, &[Step { pipe: &pl.stamp_sample, prm, taps: &[], bufs, groups }])?;
            Ok(self.frame_read_fit(&[&out])?.pop().unwrap_or_default().into_iter().map(f32::from_bits).collect())
        })();
        self.frame_release(out);
        run
    }

    /// The lower median of the finite positive values of `plane`'s pixels `0, step, 2·step, …`
    /// (with `mask`, none where it is set), 0 without any: `median_of_variances` of
    /// [`GpuEngine::frame_sample`]'s sample, exactly, from four 256-bin histograms of the
    /// values' bits (a radix select; 4 KB read back instead of the sample).
    pub fn frame_sample_median(&mut self, plane: &GpuPlane, step: usize, mask: Option<&GpuPlane>) -> Result<f64, EngineError> {
        let count = sample_count(plane, step, mask)?;
        let groups = count.div_ceil(256);
        let gx = groups.clamp(1, 1024);
        let hist = GpuPlane { buf: self.frame_buffer("blink.frame.histogram", 256 * 4)?, width: 256, height: 1, kind: PlaneKind::Mask };
        let run = (|| {
            let (mut prefix, mut rank) = (0u32, 0u64);
            for shift in [24u32, 16, 8, 0] {
                self.ctx.queue.write_buffer(&hist.buf, 0, bytemuck::cast_slice(&[0u32; 256]));
                let (ctx, pl) = self.frame_parts()?;
                let prm = FrameParams { mx: gx as u32, count: count as u32, side: step as u32, mode: mask.is_some() as u32, radius: shift, mesh: prefix, ..FrameParams::new(plane.width, plane.height) };
                let bufs = [Some((&plane.buf, plane.bytes())), Some((&hist.buf, hist.bytes())), None, mask.map(|m| (&m.buf, m.bytes()))];
                submit(ctx, pl, &[Step { pipe: &pl.sample_hist, prm, taps: &[], bufs, groups: (gx as u32, groups.div_ceil(gx) as u32) }])?;
                let bins = self.frame_read_fit(&[&hist])?.pop().unwrap_or_default();
                if shift == 24 {
                    let total: u64 = bins.iter().map(|&c| c as u64).sum();
                    if total == 0 {
                        return Ok(0.0);
                    }
                    rank = (total - 1) / 2;
                }
                let mut below = 0u64;
                let Some(bin) = bins.iter().position(|&c| {
                    below += c as u64;
                    below > rank
                }) else {
                    return Err(EngineError::Gpu(format!("median: rank {rank} past the histogram at bit {shift}")));
                };
                rank -= below - bins[bin] as u64;
                prefix = (prefix << 8) | bin as u32;
            }
            Ok(f32::from_bits(prefix) as f64)
        })();
        self.frame_release(hist);
        run
    }

    /// [`stamp_candidates`](crate::subtract::stamps::stamp_candidates) of the pair whose
    /// planes these are (`template` the image convolved, `science` the other, with their
    /// variances), on the device: every pixel that passes, in raster order, as (pixel index,
    /// template value). Only the list comes back.
    pub fn frame_stamp_candidates(&mut self, template: &GpuPlane, science: &GpuPlane, science_var: &GpuPlane, template_var: Option<&GpuPlane>, scan: &StampScan) -> Result<Vec<(usize, f32)>, EngineError> {
        let (w, h) = (template.width, template.height);
        if [science, science_var].into_iter().chain(template_var).any(|p| (p.width, p.height) != (w, h)) {
            return Err(bad(format!("stamp planes of other sizes than the template's {w}x{h}")));
        }
        if scan.r > scan.reach || w <= 2 * scan.reach || h <= 2 * scan.reach {
            return Ok(Vec::new());
        }
        let mut room = FIRST_ROOM;
        loop {
            let (found, entries) = self.stamp_scan(template, science, science_var, template_var, scan, room)?;
            if found <= room {
                let mut out: Vec<(usize, f32)> = entries.chunks_exact(2).take(found).filter(|e| e[0] != NO_STAR).map(|e| (e[0] as usize, f32::from_bits(e[1]))).collect();
                out.sort_unstable_by_key(|e| e.0);
                return Ok(out);
            }
            room = found;
        }
    }

    /// One scan with room for `room` candidates: how many there were, and the list's entries.
    fn stamp_scan(&mut self, template: &GpuPlane, science: &GpuPlane, science_var: &GpuPlane, template_var: Option<&GpuPlane>, scan: &StampScan, room: usize) -> Result<(usize, Vec<u32>), EngineError> {
        let (w, h) = (template.width, template.height);
        let words = 2 + 2 * room;
        let list = GpuPlane { buf: self.frame_buffer("blink.frame.stamps", (words * 4) as u64)?, width: words, height: 1, kind: PlaneKind::Mask };
        let run = (|| {
            self.ctx.queue.write_buffer(&list.buf, 0, bytemuck::cast_slice(&[0u32, 0u32]));
            let (ctx, pl) = self.frame_parts()?;
            let base = FrameParams { radius: scan.r as u32, side: scan.reach as u32, count: room as u32, f0: scan.floor, f1: scan.saturate_template, f2: scan.sky, f3: scan.saturate_science, ..FrameParams::new(w, h) };
            let (mx, groups) = list_grid(room);
            let usable = FrameParams { mx, mode: template_var.is_some() as u32, ..base };
            let lb = Some((&list.buf, list.bytes()));
            submit(
                ctx,
                pl,
                &[
                    Step { pipe: &pl.stamp_peaks, prm: base, taps: &[], bufs: [Some((&template.buf, template.bytes())), lb, None, None], groups: pixel_groups(w, h) },
                    Step {
                        pipe: &pl.stamp_usable,
                        prm: usable,
                        taps: &[],
                        bufs: [Some((&science.buf, science.bytes())), lb, Some((&science_var.buf, science_var.bytes())), template_var.map(|t| (&t.buf, t.bytes()))],
                        groups,
                    },
                ],
            )?;
            let mut words = self.frame_read_fit(&[&list])?.pop().unwrap_or_default();
            let found = words.first().copied().unwrap_or(0) as usize;
            Ok((found, words.split_off(2.min(words.len()))))
        })();
        self.frame_release(list);
        run
    }

    /// The squares around `centres` (x, y) of each of `planes`, each plane's of its own
    /// half-side (NaN off the frame), square after square, row by row: the data of
    /// [`Squares`](crate::subtract::Squares), one `Vec` a plane, in one read-back.
    pub fn frame_squares(&mut self, planes: &[(&GpuPlane, usize)], centres: &[(usize, usize)]) -> Result<Vec<Vec<f32>>, EngineError> {
        let Some((first, _)) = planes.first() else { return Ok(Vec::new()) };
        let (w, h) = (first.width, first.height);
        if planes.iter().any(|(p, _)| (p.width, p.height) != (w, h)) || centres.iter().any(|&(x, y)| x >= w || y >= h) {
            return Err(bad(format!("squares of planes or centres off a {w}x{h} frame")));
        }
        if centres.is_empty() {
            return Ok(vec![Vec::new(); planes.len()]);
        }
        let max_groups = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
        if let Some((_, half)) = planes.iter().find(|(_, half)| ((2 * half + 1) * centres.len()).div_ceil(16) > max_groups) {
            return Err(bad(format!("{} squares of half-side {half} in one dispatch", centres.len())));
        }
        let idx: Vec<u32> = centres.iter().map(|&(x, y)| (y * w + x) as u32).collect();
        let at = self.frame_buffer("blink.frame.centres", (idx.len() * 4) as u64)?;
        self.ctx.queue.write_buffer(&at, 0, bytemuck::cast_slice(&idx));
        let mut outs = Vec::with_capacity(planes.len());
        let run = (|| {
            for (_, half) in planes {
                let side = 2 * half + 1;
                outs.push(GpuPlane { buf: self.frame_buffer("blink.frame.squares", (centres.len() * side * side * 4) as u64)?, width: side * side, height: centres.len(), kind: PlaneKind::Values });
            }
            let (ctx, pl) = self.frame_parts()?;
            let ab = (&at, (idx.len() * 4) as u64);
            let steps: Vec<Step> = planes
                .iter()
                .zip(&outs)
                .map(|((p, half), o)| {
                    let side = 2 * half + 1;
                    let prm = FrameParams { radius: *half as u32, count: centres.len() as u32, ..FrameParams::new(w, h) };
                    Step { pipe: &pl.stamp_squares, prm, taps: &[], bufs: [Some((&p.buf, p.bytes())), Some(ab), Some((&o.buf, o.bytes())), None], groups: pixel_groups(side, side * centres.len()) }
                })
                .collect();
            submit(ctx, pl, &steps)?;
            let read: Vec<&GpuPlane> = outs.iter().collect();
            Ok(self.frame_read_fit(&read)?.into_iter().map(|v| v.into_iter().map(f32::from_bits).collect()).collect())
        })();
        self.pool.release(at);
        for o in outs {
            self.frame_release(o);
        }
        run
    }
}
