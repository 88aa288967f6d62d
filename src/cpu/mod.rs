//! The CPU engine: the twin of every WGSL kernel (same names as `shaders/<k>.wgsl`), in plain
//! Rust with f64 accumulation. It is the oracle in the parity tests and the fallback engine where
//! no adapter exists.

pub mod al;
pub mod convolve;
pub mod difference_score;
pub mod fit;
pub mod frame;
pub mod ring;
pub mod stack;

use crate::engine::{Engine, EngineError, StampBatch, StampPlanes, SubtractionImages, SubtractionResult};
use std::ops::Range;

/// The engine made of the CPU twins. Each stamp goes through convolve, fit and
/// difference_score in turn while its planes are in cache, and the batch is split into
/// contiguous runs of stamps over the cores (stamps are independent, so the numbers do not
/// depend on the split).
#[derive(Debug, Clone)]
pub struct CpuEngine {
    threads: usize,
}

impl Default for CpuEngine {
    fn default() -> Self {
        CpuEngine::new()
    }
}

/// A batch's stamps per thread at least: below this a thread costs more to start than it saves
/// (one 63x63 stamp takes ~0.1 ms).
const MIN_STAMPS_PER_THREAD: usize = 2;

impl CpuEngine {
    /// An engine on every core the process may use.
    pub fn new() -> CpuEngine {
        CpuEngine::with_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// An engine on `threads` threads (at least one).
    pub fn with_threads(threads: usize) -> CpuEngine {
        CpuEngine { threads: threads.max(1) }
    }

    /// Threads a batch is split over.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run every kernel and return the results with the full difference and variance images.
    pub fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        batch.validate()?;
        let len = batch.n * batch.npix();
        let (mut difference, mut variance) = (vec![0.0f32; len], vec![0.0f32; len]);
        let results = self.run(batch, Some((&mut difference, &mut variance)), None);
        Ok(SubtractionImages { results, difference, variance })
    }

    /// Every kernel, with the planes the history store keeps ([`StampPlanes`]); the convolved
    /// template variance is kept as each stamp is convolved, not computed twice.
    pub fn subtract_planes(&mut self, batch: &StampBatch) -> Result<StampPlanes, EngineError> {
        batch.validate()?;
        let len = batch.n * batch.npix();
        let (mut difference, mut variance, mut conv_tv) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
        let results = self.run(batch, Some((&mut difference, &mut variance)), Some(&mut conv_tv));
        Ok(StampPlanes::from_images(batch, SubtractionImages { results, difference, variance }, &conv_tv))
    }

    /// Split the batch over the threads; `images` (whole-batch difference and variance, zeroed)
    /// and `conv_tv` (the convolved template variance) are split along with it.
    fn run(
        &self,
        batch: &StampBatch,
        images: Option<(&mut [f32], &mut [f32])>,
        conv_tv: Option<&mut [f32]>,
    ) -> Vec<SubtractionResult> {
        let npix = batch.npix();
        let threads = self.threads.min(batch.n / MIN_STAMPS_PER_THREAD).max(1);
        if threads == 1 {
            return run_stamps(batch, 0..batch.n, images, conv_tv);
        }
        let per = batch.n.div_ceil(threads);
        let ranges: Vec<Range<usize>> = (0..batch.n).step_by(per).map(|s| s..(s + per).min(batch.n)).collect();
        let mut parts: Vec<Option<(&mut [f32], &mut [f32])>> = match images {
            Some((d, v)) => d.chunks_mut(per * npix).zip(v.chunks_mut(per * npix)).map(Some).collect(),
            None => ranges.iter().map(|_| None).collect(),
        };
        parts.resize_with(ranges.len(), || None);
        let mut tvs: Vec<Option<&mut [f32]>> = match conv_tv {
            Some(tv) => tv.chunks_mut(per * npix).map(Some).collect(),
            None => Vec::new(),
        };
        tvs.resize_with(ranges.len(), || None);
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranges
                .into_iter()
                .zip(parts)
                .zip(tvs)
                .map(|((range, part), tv)| scope.spawn(move || run_stamps(batch, range, part, tv)))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    }
}

/// convolve → fit → difference_score on the stamps `range`, one stamp at a time, with scratch
/// reused across stamps. `images` holds the range's own difference and variance planes,
/// `conv_tv` its convolved template variance.
fn run_stamps(
    batch: &StampBatch,
    range: Range<usize>,
    mut images: Option<(&mut [f32], &mut [f32])>,
    mut conv_tv_out: Option<&mut [f32]>,
) -> Vec<SubtractionResult> {
    let npix = batch.npix();
    let mut scratch = convolve::Scratch::default();
    let (mut conv_t, mut conv_tv) = (vec![0.0f32; npix], vec![0.0f32; npix]);
    let mut pts = Vec::with_capacity(npix);
    let start = range.start;
    range
        .map(|s| {
            let px = s * npix..(s + 1) * npix;
            let p = &batch.params[s];
            let (sci, svar, wgt) = (&batch.science[px.clone()], &batch.science_var[px.clone()], &batch.weight[px.clone()]);
            convolve::convolve_stamp(
                batch.width,
                batch.height,
                p.kernel_sigma,
                &batch.template[px.clone()],
                &batch.template_var[px.clone()],
                wgt,
                &mut conv_t,
                &mut conv_tv,
                &mut scratch,
            );
            let fit_in = fit::FitInputs { science: sci, science_var: svar, weight: wgt, conv_t: &conv_t, conv_tv: &conv_tv };
            let f = fit::fit_stamp(p, batch.width, &fit_in, &mut pts);
            let score_in = difference_score::ScoreInputs {
                science: sci,
                science_var: svar,
                weight: wgt,
                profile: &batch.profile[px],
                conv_t: &conv_t,
                conv_tv: &conv_tv,
            };
            let own = (s - start) * npix..(s - start + 1) * npix;
            if let Some(tv) = conv_tv_out.as_mut() {
                tv[own.clone()].copy_from_slice(&conv_tv);
            }
            let out = images.as_mut().map(|(d, v)| (&mut d[own.clone()], &mut v[own]));
            difference_score::score_stamp(&f, &score_in, out)
        })
        .collect()
}

impl Engine for CpuEngine {
    fn adapter(&self) -> String {
        "cpu".to_string()
    }

    fn subtract(&mut self, batch: &StampBatch) -> Result<Vec<SubtractionResult>, EngineError> {
        batch.validate()?;
        Ok(self.run(batch, None, None))
    }

    fn subtract_images(&mut self, batch: &StampBatch) -> Result<SubtractionImages, EngineError> {
        CpuEngine::subtract_images(self, batch)
    }

    fn subtract_planes(&mut self, batch: &StampBatch) -> Result<StampPlanes, EngineError> {
        CpuEngine::subtract_planes(self, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StampParams;

    /// The fused, threaded engine gives exactly what the three kernels give one after another,
    /// whatever the thread count.
    #[test]
    fn fused_threaded_engine_equals_the_kernels_in_turn() {
        let (w, h, n) = (23, 17, 9);
        let mut b = StampBatch { n, ..StampBatch::empty(w, h) };
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for i in 0..n * w * h {
            let (x, y) = ((i % w) as f64 - 11.0, (i / w % h) as f64 - 8.0);
            let g = (-(x * x + y * y) / 8.0).exp();
            let masked = next() < 0.05;
            b.weight.push(if masked { 0.0 } else { 1.0 });
            b.template.push((100.0 + 300.0 * g + 3.0 * next()) as f32);
            b.science.push((120.0 + 400.0 * g + 5.0 * next()) as f32);
            b.template_var.push(9.0);
            b.science_var.push(25.0);
            b.profile.push((g / 25.0) as f32);
        }
        b.params = (0..n)
            .map(|k| StampParams { fit_radius: 3.0, fixed_scale: if k % 2 == 0 { 1.0 } else { 0.0 }, ..StampParams::new(0.3 * k as f32, 11.0, 8.0) })
            .collect();
        let conv = convolve::convolve(&b);
        let fits = fit::fit(&b, &conv.template, &conv.template_var);
        let want = difference_score::difference_score(&b, &conv.template, &conv.template_var, &fits);
        for threads in [1, 2, 3, 8] {
            let mut e = CpuEngine::with_threads(threads);
            assert_eq!(e.subtract_images(&b).unwrap(), want, "{threads} threads");
            assert_eq!(e.subtract(&b).unwrap(), want.results, "{threads} threads");
        }
    }
}
