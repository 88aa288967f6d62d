//! CPU twin of `shaders/ring/ring.wgsl` (dispatcher: `gpu::kernels::ring`): an object's window
//! stacks, made from its epochs' squares where they stay resident (a pool of cells, one square
//! of three planes each; host index: `pipeline::ring`), measured at the candidate. Only the
//! matched filter's sums per window come out, not planes.
//!
//! The numbers are those of the stacks of `cpu::stack` measured by `stack::measure`, with one
//! difference: the effective PSF is built from each epoch's Gaussian evaluated at the
//! candidate's phase, where the host path moves each stored (sampled) Gaussian with Lanczos-3
//! twice (onto the common grid and back) and once more to the phase. Both the twin and the
//! kernel are written out here because each pixel's sum runs over the epochs of all the nested
//! windows at once, which no stacking crate does. f64 accumulation here, f32 in the kernel.

use crate::cpu::stack::{corr_product, ShiftTaps, CORE_RADIUS, TAPS};
use crate::stack::StackMeasurement;

/// Side of a cell's square: the history's square (`engine::STORED_HALF`).
pub const SIDE: usize = 2 * crate::engine::STORED_HALF + 1;
/// Pixels of one plane of a cell.
pub const NPIX: usize = SIDE * SIDE;
/// f32 per cell: the difference, its variance and the template's share, one plane each.
pub const CELL: usize = 3 * NPIX;
/// Windows one job measures at most.
pub const MAX_WINDOWS: usize = 8;
/// u32 per job in the kernel's `jobs` buffer.
pub const JOB_STRIDE: usize = 8 + MAX_WINDOWS;
/// f32 per entry in the kernel's `entries` buffer.
pub const ENTRY_STRIDE: usize = 2 * TAPS + 6;
/// f32 per job in the kernel's output: `(num, den, centre usable)` per window.
pub const OUT_STRIDE: usize = 3 * MAX_WINDOWS;

/// One epoch of a job: its cell, its candidate's offset from the job's on the common grid (the
/// epoch's candidate position on its square minus the job's), and its PSF: a unit-sum Gaussian
/// of width `sigma` on a square of side `2·half + 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingEntry {
    pub cell: u32,
    pub dx: f64,
    pub dy: f64,
    pub sigma: f64,
    pub half: u32,
}

/// One object's window measurements: its epochs in summation order (the longest measured
/// window's; every window is a leading run), the epoch count of each window to measure
/// (increasing), and the candidate's position on the common grid (the newest square's).
#[derive(Debug, Clone, PartialEq)]
pub struct RingJob {
    pub entries: Vec<RingEntry>,
    pub counts: Vec<usize>,
    pub x: f64,
    pub y: f64,
}

impl RingJob {
    /// The pixel the filter is centred on (`stack::measure`'s nearest pixel) and the phase of
    /// the candidate from it; `None` off the square.
    pub fn centre(&self) -> Option<(usize, usize, f64, f64)> {
        let (px, py) = (self.x.round(), self.y.round());
        if !(px >= 0.0 && py >= 0.0 && px < SIDE as f64 && py < SIDE as f64) {
            return None;
        }
        Some((px as usize, py as usize, self.x - px, self.y - py))
    }

    /// The job is well formed: windows within [`MAX_WINDOWS`], counts increasing from 1 and
    /// ending at the entries' count, a centre on the square, finite offsets and widths.
    pub fn validate(&self, cells: usize) -> Result<(), String> {
        if self.counts.is_empty() || self.counts.len() > MAX_WINDOWS {
            return Err(format!("{} windows (1 to {MAX_WINDOWS})", self.counts.len()));
        }
        if self.counts[0] == 0 || self.counts.windows(2).any(|w| w[1] <= w[0]) || self.counts.last() != Some(&self.entries.len()) {
            return Err(format!("window counts {:?} for {} epochs", self.counts, self.entries.len()));
        }
        self.centre().ok_or_else(|| format!("candidate ({}, {}) off the {SIDE}×{SIDE} square", self.x, self.y))?;
        for e in &self.entries {
            if e.cell as usize >= cells || !(e.dx.is_finite() && e.dy.is_finite() && e.sigma.is_finite() && e.sigma > 0.0) || e.half == 0 {
                return Err(format!("bad epoch {e:?} for {cells} cells"));
            }
        }
        Ok(())
    }
}

/// The kernel's `entries` values of one epoch: `kx[6]`, `ky[6]`, `ix`, `iy`, `c`, `sigma`,
/// `half`, the cell's bits.
pub fn entry_values(e: &RingEntry) -> [f32; ENTRY_STRIDE] {
    let mut v = [0.0f32; ENTRY_STRIDE];
    let taps = crate::cpu::stack::tap_values(&ShiftTaps::new(e.dx, e.dy));
    v[..taps.len()].copy_from_slice(&taps);
    v[2 * TAPS + 3] = e.sigma as f32;
    v[2 * TAPS + 4] = e.half as f32;
    v[2 * TAPS + 5] = f32::from_bits(e.cell);
    v
}

/// The kernel's `jobs` and `entries` buffers for `jobs` (each valid, [`RingJob::validate`]).
pub fn pack(jobs: &[RingJob]) -> (Vec<u32>, Vec<f32>) {
    let mut js = Vec::with_capacity(jobs.len() * JOB_STRIDE);
    let mut es = Vec::with_capacity(jobs.iter().map(|j| j.entries.len()).sum::<usize>() * ENTRY_STRIDE);
    for j in jobs {
        let (px, py, fx, fy) = j.centre().unwrap_or((0, 0, 0.0, 0.0));
        let first = es.len() / ENTRY_STRIDE;
        let hmax = j.entries.iter().map(|e| e.half).max().unwrap_or(0).min(SIDE as u32);
        js.extend([first as u32, j.entries.len() as u32, j.counts.len() as u32, px as u32, py as u32, (fx as f32).to_bits(), (fy as f32).to_bits(), hmax]);
        js.extend((0..MAX_WINDOWS).map(|w| j.counts.get(w).map_or(0, |&c| c as u32)));
        for e in &j.entries {
            es.extend(entry_values(e));
        }
    }
    (js, es)
}

/// What the matched filter sums over one window's stack: `Σ P S/Var`, `Σ P²/Var`, and whether
/// the stack is usable at the centre pixel.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowSums {
    pub num: f64,
    pub den: f64,
    pub centre: bool,
}

impl WindowSums {
    /// The measurement these sums make ([`stack::measure`](crate::stack::measure)'s numbers),
    /// at the job's centre pixel; `None` where the centre is masked or nothing was summed.
    pub fn measurement(&self, job: &RingJob) -> Option<StackMeasurement> {
        let (x, y, _, _) = job.centre()?;
        (self.centre && self.den > 0.0 && self.den.is_finite() && self.num.is_finite()).then(|| StackMeasurement {
            x,
            y,
            score: self.num / self.den.sqrt(),
            flux: self.num / self.den,
            flux_err: 1.0 / self.den.sqrt(),
        })
    }
}

/// `cells`' cell `cell` shifted by `t` at pixel `(x, y)` (`cpu::stack::shift_pixel` on the
/// cell's planes): `(D', V', VT')`, `None` where masked.
fn shifted(cells: &[f32], cell: u32, t: &ShiftTaps, x: i64, y: i64) -> Option<[f64; 3]> {
    if x < 0 || y < 0 {
        return None;
    }
    let base = cell as usize * CELL;
    let planes = cells.get(base..base + CELL)?;
    let (d, rest) = planes.split_at(NPIX);
    let (v, vt) = rest.split_at(NPIX);
    crate::cpu::stack::shift_pixel([d, v, vt], SIDE, SIDE, t, x as usize, y as usize)
}

/// Cell `cell` shifted by `t` at every pixel of the box `(x0, y0)..=(x1, y1)` (on the square),
/// row by row: `(D', V', VT')`, `None` where a tap of non-zero weight leaves the square or is
/// not usable ([`crate::cpu::stack::shift_planes`]'s rule and sums, on the box alone).
fn shift_box(cells: &[f32], cell: u32, t: &ShiftTaps, (x0, y0): (i64, i64), (x1, y1): (i64, i64)) -> Vec<Option<[f64; 3]>> {
    let (bw, bh) = ((x1 - x0 + 1) as usize, (y1 - y0 + 1) as usize);
    let base = cell as usize * CELL;
    let Some(planes) = cells.get(base..base + CELL) else { return vec![None; bw * bh] };
    let (d, rest) = planes.split_at(NPIX);
    let (v, vt) = rest.split_at(NPIX);
    let side = SIDE as i64;
    // Source rows the columns' taps reach: y + iy − 2 ..= y + iy + 3.
    let (r0, r1) = (y0 + t.iy - 2, y1 + t.iy + 3);
    let rows: Vec<Option<[f64; 3]>> = (r0..=r1)
        .flat_map(|sy| {
            (x0..=x1).map(move |x| {
                if sy < 0 || sy >= side {
                    return None;
                }
                let mut s = [0.0f64; 3];
                for (i, &k) in t.kx.iter().enumerate() {
                    if k == 0.0 {
                        continue;
                    }
                    let sx = x + t.ix + i as i64 - 2;
                    if sx < 0 || sx >= side {
                        return None;
                    }
                    let p = (sy * side + sx) as usize;
                    if !crate::cpu::stack::usable(d[p], v[p], vt[p]) {
                        return None;
                    }
                    s[0] += k * d[p] as f64;
                    s[1] += k * k * v[p] as f64;
                    s[2] += k * k * vt[p] as f64;
                }
                Some(s)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(bw * bh);
    for y in y0..=y1 {
        for x in 0..bw {
            let mut s = [0.0f64; 3];
            let mut ok = true;
            for (j, &k) in t.ky.iter().enumerate() {
                if k == 0.0 {
                    continue;
                }
                // Row y + iy + j − 2 of the source is row j + (y − y0) of `rows`.
                match rows[(y - y0) as usize * bw + j * bw + x] {
                    Some(r) => {
                        s[0] += k * r[0];
                        s[1] += k * k * r[1];
                        s[2] += k * k * r[2];
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            out.push(ok.then_some(s));
        }
    }
    out
}

/// `exp(−(x − f)² / 2σ²)`.
fn gauss(x: f64, f: f64, sigma: f64) -> f64 {
    let u = (x - f) / sigma;
    (-0.5 * u * u).exp()
}

/// One job's window sums (twin of `ring` in `ring.wgsl`), one per entry of `job.counts`; all
/// zero (centre not usable) for a job that is not valid.
pub fn measure(cells: &[f32], job: &RingJob) -> Vec<WindowSums> {
    let mut out = vec![WindowSums::default(); job.counts.len()];
    if job.validate(cells.len() / CELL).is_err() {
        return out;
    }
    let Some((px, py, fx, fy)) = job.centre() else { return out };
    let taps: Vec<ShiftTaps> = job.entries.iter().map(|e| ShiftTaps::new(e.dx, e.dy)).collect();
    // Phase 1: each epoch's PSF weight (its mean c/V' over the centre box) and 1/Z.
    let c = (SIDE / 2) as i64;
    let r = CORE_RADIUS as i64;
    let box_cells = ((2 * r + 1) * (2 * r + 1)) as f64;
    // Per epoch: (weight, 1/Z, the Gaussian's rows along x and y at the phase).
    let parts: Vec<(f64, f64, Vec<f64>, Vec<f64>)> = job
        .entries
        .iter()
        .zip(&taps)
        .map(|(e, t)| {
            let corr = corr_product(t);
            let mut wsum = 0.0;
            for y in c - r..=c + r {
                for x in c - r..=c + r {
                    if let Some(s) = shifted(cells, e.cell, t, x, y) {
                        wsum += corr / s[1];
                    }
                }
            }
            let h = e.half as i64;
            let gx: Vec<f64> = (-h..=h).map(|u| gauss(u as f64, fx, e.sigma)).collect();
            let gy: Vec<f64> = (-h..=h).map(|u| gauss(u as f64, fy, e.sigma)).collect();
            let (zx, zy): (f64, f64) = (gx.iter().sum(), gy.iter().sum());
            (wsum / box_cells, 1.0 / (zx * zy), gx, gy)
        })
        .collect();
    // Phase 2: every pixel of the footprint, epoch after epoch, each window at its last epoch.
    let hmax = job.entries.iter().map(|e| e.half).max().unwrap_or(0).min(SIDE as u32) as i64;
    // Each epoch shifted over the footprint's box once, separably (rows, then columns: 12 taps
    // a pixel instead of 36; the kernel's direct 6×6 sum up to rounding, the same mask).
    let (bx0, by0) = ((px as i64 - hmax).max(0), (py as i64 - hmax).max(0));
    let (bx1, by1) = ((px as i64 + hmax).min(SIDE as i64 - 1), (py as i64 + hmax).min(SIDE as i64 - 1));
    let bw = (bx1 - bx0 + 1) as usize;
    let shifted_boxes: Vec<Vec<Option<[f64; 3]>>> = job.entries.iter().zip(&taps).map(|(e, t)| shift_box(cells, e.cell, t, (bx0, by0), (bx1, by1))).collect();
    for v in -hmax..=hmax {
        for u in -hmax..=hmax {
            let (x, y) = (px as i64 + u, py as i64 + v);
            if x < 0 || y < 0 || x >= SIDE as i64 || y >= SIDE as i64 {
                continue;
            }
            let (mut sums, mut used) = ([0.0f64; 4], 0u32);
            let (mut wtot, mut pw, mut pe, mut hrun) = (0.0f64, 0.0f64, 0.0f64, 0i64);
            let mut w = 0;
            for (k, ((e, t), (wk, inv_z, gx, gy))) in job.entries.iter().zip(&taps).zip(&parts).enumerate() {
                let wk = *wk;
                if let Some(s) = shifted_boxes[k][((y - by0) as usize) * bw + (x - bx0) as usize] {
                    let corr = corr_product(t);
                    let ve = s[1] / corr;
                    let vte = (s[2] / corr).min(ve);
                    let wt = 1.0 / ve;
                    for (acc, term) in sums.iter_mut().zip([wt, wt * s[0], wt * wt * (ve - vte), wt * vte.sqrt()]) {
                        *acc += term;
                    }
                    used += 1;
                }
                let h = e.half as i64;
                hrun = hrun.max(h);
                wtot += wk;
                if u.abs() <= h && v.abs() <= h {
                    let g = gx[(u + h) as usize] * gy[(v + h) as usize] * inv_z;
                    pw += wk * g;
                    pe += g;
                }
                if w < job.counts.len() && k + 1 == job.counts[w] {
                    let [wsum, sd, a, b] = sums;
                    let (st, var) = if used > 0 {
                        let bw = b / wsum;
                        (sd / wsum, a / wsum / wsum + bw * bw)
                    } else {
                        (f64::NAN, f64::NAN)
                    };
                    let ok = st.is_finite() && var.is_finite() && var > 0.0;
                    if u == 0 && v == 0 {
                        out[w].centre = ok;
                    }
                    if ok && u.abs() <= hrun && v.abs() <= hrun {
                        let p = if wtot > 0.0 && wtot.is_finite() { pw / wtot } else { pe / (k + 1) as f64 };
                        out[w].num += p * st / var;
                        out[w].den += p * p / var;
                    }
                    w += 1;
                }
            }
        }
    }
    out
}
