//! Stacks over time windows: per band, the epochs of the last 1, 3, 10, 30 nights (by default)
//! before `now`, one stack per window that holds an epoch.

use super::{canonical_order, Stack, StackBatch, StackEpoch, StackError};

/// The default windows, nights.
pub const DEFAULT_WINDOWS: [f64; 4] = [1.0, 3.0, 10.0, 30.0];

/// Added to every window, nights: a night's exposures span several hours, so without it the
/// 1-night window measured from the last exposure could drop the night's first ones when
/// observing runs a little late; it is also the slack for `now` itself.
pub const WINDOW_TOLERANCE: f64 = 0.1;

/// Which epochs one window of one band holds.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPlan {
    pub band: String,
    /// The window's length, nights.
    pub nights: f64,
    /// Indices into the epochs given, in summation order ([`canonical_order`]).
    pub epochs: Vec<usize>,
    /// The shortest window of this band with exactly these epochs, when that is a shorter one:
    /// the caller reports that one and not this duplicate.
    pub same_as: Option<f64>,
}

/// A window's plan and its stack.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStack {
    pub band: String,
    pub nights: f64,
    pub epochs: Vec<usize>,
    pub same_as: Option<f64>,
    pub stack: Stack,
}

/// The windows of `epochs` at `now_mjd`: an epoch is in window `W` of its band when
/// `now − W − tol < mjd ≤ now + tol` ([`WINDOW_TOLERANCE`]). Windows that hold no epoch are
/// left out; bands in name order, windows from the shortest (non-positive or non-finite ones
/// ignored). Within a band every window's epochs start the longest one's, in summation order.
pub fn plan_windows(epochs: &[StackEpoch], now_mjd: f64, nights: &[f64]) -> Vec<WindowPlan> {
    let mut ws: Vec<f64> = nights.iter().copied().filter(|n| n.is_finite() && *n > 0.0).collect();
    ws.sort_by(f64::total_cmp);
    ws.dedup();
    let Some(&longest) = ws.last() else { return Vec::new() };
    let mut bands: Vec<&str> = epochs.iter().map(|e| e.band.as_str()).collect();
    bands.sort_unstable();
    bands.dedup();
    let tol = WINDOW_TOLERANCE;
    let mut out = Vec::new();
    for band in bands {
        let idx: Vec<usize> = (0..epochs.len()).filter(|&i| epochs[i].band == band && epochs[i].mjd <= now_mjd + tol && now_mjd - epochs[i].mjd < longest + tol).collect();
        let refs: Vec<&StackEpoch> = idx.iter().map(|&i| &epochs[i]).collect();
        // Latest first, so each window is a leading run of this list.
        let order: Vec<usize> = canonical_order(&refs).into_iter().map(|k| idx[k]).collect();
        let mut prev: Option<(usize, f64)> = None;
        for &w in &ws {
            let n = order.iter().take_while(|&&i| now_mjd - epochs[i].mjd < w + tol).count();
            if n == 0 {
                continue;
            }
            let same_as = match prev {
                Some((pn, pw)) if pn == n => Some(pw),
                _ => None,
            };
            if same_as.is_none() {
                prev = Some((n, w));
            }
            out.push(WindowPlan { band: band.to_string(), nights: w, epochs: order[..n].to_vec(), same_as });
        }
    }
    out
}

/// The window stacks of one object's `epochs` at `now_mjd` on the CPU (`cpu::stack`).
pub fn windows(epochs: &[StackEpoch], now_mjd: f64, nights: &[f64]) -> Result<Vec<WindowStack>, StackError> {
    let mut all = windows_batch(&[(epochs, now_mjd)], nights, |b| Ok(crate::cpu::stack::coadd(b)))?;
    Ok(all.pop().unwrap_or_default())
}

/// The window stacks of many objects (`(epochs, now_mjd)` each, all stamps of one shape) in one
/// [`StackBatch`], made by `coadd`: `cpu::stack::coadd`, or
/// `gpu::kernels::stack::GpuStack::coadd` for one dispatch on the device. Each band's epochs
/// enter the batch once; its windows are nested ranges of them, and a duplicate window
/// (`same_as`) gets a copy of the shorter one's stack rather than a second one.
pub fn windows_batch<F>(objects: &[(&[StackEpoch], f64)], nights: &[f64], coadd: F) -> Result<Vec<Vec<WindowStack>>, StackError>
where
    F: FnOnce(&StackBatch) -> Result<Vec<Stack>, StackError>,
{
    let Some(first) = objects.iter().find_map(|(e, _)| e.first()) else {
        return Ok(objects.iter().map(|_| Vec::new()).collect());
    };
    let mut b = StackBatch::new(first.width, first.height);
    // Per object: (plan, stack index in the batch, or the plan whose stack it shares).
    let mut plans: Vec<Vec<(WindowPlan, Result<usize, usize>)>> = Vec::with_capacity(objects.len());
    for (epochs, now) in objects {
        let mut mine = Vec::new();
        let mut run: Option<(String, std::ops::Range<usize>)> = None;
        let ps = plan_windows(epochs, *now, nights);
        for (k, p) in ps.iter().enumerate() {
            // The band's epochs (its longest window's, which all others lead) enter once.
            if run.as_ref().is_none_or(|(band, _)| *band != p.band) {
                let longest = ps[k..].iter().take_while(|q| q.band == p.band).map(|q| &q.epochs).max_by_key(|e| e.len()).cloned().unwrap_or_default();
                let start = b.epochs();
                for &i in &longest {
                    b.push_epoch(&epochs[i], i)?;
                }
                run = Some((p.band.clone(), start..b.epochs()));
            }
            let start = run.as_ref().map_or(0, |(_, r)| r.start);
            let slot = match p.same_as {
                Some(w) => Err(mine.iter().position(|(q, _): &(WindowPlan, _)| q.band == p.band && q.nights == w).unwrap_or(0)),
                None => Ok(b.push_stack(start..start + p.epochs.len())?),
            };
            mine.push((p.clone(), slot));
        }
        plans.push(mine);
    }
    b.validate()?;
    let stacks = if b.stacks.is_empty() { Vec::new() } else { coadd(&b)? };
    if stacks.len() != b.stacks.len() {
        return Err(StackError::BadBatch(format!("{} stacks back for {}", stacks.len(), b.stacks.len())));
    }
    let mut out = Vec::with_capacity(plans.len());
    for mine in plans {
        let mut ws: Vec<WindowStack> = Vec::with_capacity(mine.len());
        for (p, slot) in mine {
            let stack = match slot {
                Ok(k) => stacks.get(k),
                Err(j) => ws.get(j).map(|w| &w.stack),
            };
            let stack = stack.cloned().ok_or_else(|| StackError::BadBatch(format!("no stack for the {}-night window of band {}", p.nights, p.band)))?;
            ws.push(WindowStack { band: p.band, nights: p.nights, epochs: p.epochs, same_as: p.same_as, stack });
        }
        out.push(ws);
    }
    Ok(out)
}
