//! The squares of recent epochs, kept where the stacks are made: on the GPU next to the engine
//! (`gpu::kernels::ring`), or in host memory with the CPU engine (`cpu::ring`, the twin). The
//! streaming stacks of an object are then made from its resident squares in one dispatch per
//! batch, without reading the history store; the store stays the durable copy.
//!
//! A cell holds one epoch's 31×31 square (three planes). Per object and band a slot lists its
//! resident epochs, and the `horizon`: the slot holds every epoch of the store (of that object,
//! band and square shape) newer than it. An object's stacks at MJD `now` are made from its
//! slot when its windows reach no further back than the horizon; otherwise (a restart, an
//! object not seen here, a slot given up for room) the object's epochs are read from the store
//! once and fill the slot. Slots used least recently give up their cells when the pool is
//! full. `docs/stacking.md`, "Streaming", says why and what it costs.
//!
//! The epochs the store drops to stay within its size bound are not dropped here: within its
//! windows a resident slot may then hold an epoch the store no longer has.

use std::collections::{BTreeMap, HashMap};

use crate::cpu::ring::{self, RingEntry, RingJob, WindowSums, CELL, NPIX, SIDE};
use crate::engine::{Engine, EngineError};
use crate::history::Epoch;
use crate::stack::{DEFAULT_WINDOWS, WINDOW_TOLERANCE};

/// Epochs are kept this many nights beyond the longest window measured from the newest one, so
/// that alerts arriving up to a night out of order are still served from the slot.
const SLACK_NIGHTS: f64 = 1.0;

/// The MJD the windows ending at `now` reach back to (exclusive): an epoch is in the longest
/// window when `mjd > reach(now)` ([`WINDOW_TOLERANCE`] included).
fn reach(now: f64) -> f64 {
    now - longest() - WINDOW_TOLERANCE
}

/// The longest of the windows, nights.
fn longest() -> f64 {
    DEFAULT_WINDOWS.iter().copied().fold(0.0, f64::max)
}

/// The store's epochs the ring can hold: those of `band` on the ring's square with a Gaussian
/// PSF, each with its width.
fn ring_epochs<'a>(epochs: &'a [Epoch], band: &'a str) -> impl Iterator<Item = (&'a Epoch, f64)> + 'a {
    epochs.iter().filter(move |e| e.band == band && e.stamps.difference.shape() == (SIDE, SIDE)).filter_map(|e| Some((e, psf_sigma(&e.stamps.psf)?)))
}

/// Where the cells live.
#[derive(Debug)]
pub enum Backend {
    /// In host memory, grown as cells are first used up to `capacity` cells; measured by the
    /// CPU twin over the cores.
    Host { cells: Vec<f32>, capacity: usize },
    /// On the device (`gpu::kernels::ring`).
    Gpu(Box<crate::gpu::kernels::ring::GpuRing>),
}

impl Backend {
    /// Cells on the host for up to `bytes` of them (at least one).
    pub fn host(bytes: u64) -> Backend {
        Backend::Host { cells: Vec::new(), capacity: ((bytes / (CELL * 4) as u64) as usize).max(1) }
    }

    /// The engine's device when it has one, else the host; `bytes` of cells either way.
    pub fn for_engine(engine: &mut dyn Engine, bytes: u64) -> Backend {
        let cells = ((bytes / (CELL * 4) as u64) as usize).max(1);
        if let Some(gpu) = engine.gpu() {
            match crate::gpu::kernels::ring::GpuRing::new(gpu, cells) {
                Ok(r) => return Backend::Gpu(Box::new(r)),
                Err(e) => tracing::warn!(error = %e, "resident stacks on the host instead of the device"),
            }
        }
        Backend::host(bytes)
    }

    pub fn capacity(&self) -> usize {
        match self {
            Backend::Host { capacity, .. } => *capacity,
            Backend::Gpu(g) => g.capacity(),
        }
    }

    fn write(&mut self, cell: u32, square: &[f32]) {
        match self {
            Backend::Host { cells, capacity } => {
                let end = (cell as usize + 1) * CELL;
                if cell as usize >= *capacity || square.len() != CELL {
                    return;
                }
                if cells.len() < end {
                    // Cells are handed out from 0 up: grow in steps, not to the whole pool.
                    cells.resize(end.max(2 * cells.len()).min(*capacity * CELL), f32::NAN);
                }
                cells[end - CELL..end].copy_from_slice(square);
            }
            Backend::Gpu(g) => g.write(cell, square),
        }
    }

    /// Every job's window sums: one dispatch on the device, or the twin with the jobs spread
    /// over the cores.
    pub fn measure(&mut self, jobs: &[RingJob]) -> Result<Vec<Vec<WindowSums>>, EngineError> {
        match self {
            Backend::Gpu(g) => g.measure(jobs),
            Backend::Host { cells, .. } => Ok(measure_host(cells, jobs)),
        }
    }
}

/// The twin over the cores, jobs in contiguous runs (the results keep their order).
pub fn measure_host(cells: &[f32], jobs: &[RingJob]) -> Vec<Vec<WindowSums>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len() / 4).max(1);
    if threads == 1 {
        return jobs.iter().map(|j| ring::measure(cells, j)).collect();
    }
    let per = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs.chunks(per).map(|run| scope.spawn(move || run.iter().map(|j| ring::measure(cells, j)).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// One epoch's square as it arrives: its planes (each `SIDE²`, NaN where masked), the
/// candidate on it, and its PSF (a Gaussian of width `sigma` on a square of half side `half`).
#[derive(Debug, Clone, Copy)]
pub struct NewSquare<'a> {
    pub alert_id: &'a str,
    pub mjd: f64,
    pub x: f64,
    pub y: f64,
    pub sigma: f64,
    pub half: u32,
    pub planes: [&'a [f32]; 3],
}

impl<'a> NewSquare<'a> {
    /// A stored epoch's square (its PSF a Gaussian of width `sigma`).
    pub fn of(e: &'a Epoch, sigma: f64) -> NewSquare<'a> {
        let s = &e.stamps;
        NewSquare {
            alert_id: &e.alert_id,
            mjd: e.mjd,
            x: e.stamp_x,
            y: e.stamp_y,
            sigma,
            half: (s.psf.width / 2) as u32,
            planes: [&s.difference.data, &s.variance.data, &s.template_variance.data],
        }
    }
}

#[derive(Debug, Clone)]
struct Resident {
    cell: u32,
    alert_id: String,
    mjd: f64,
    x: f64,
    y: f64,
    sigma: f64,
    half: u32,
}

#[derive(Debug, Clone)]
struct Slot {
    epochs: Vec<Resident>,
    /// Every stored epoch newer than this is resident.
    horizon: f64,
    used: u64,
}

/// Counts since start: objects served from their slot, slots filled from the store, slots
/// given up for room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    pub hits: u64,
    pub fills: u64,
    pub evictions: u64,
}

/// The windows to measure: each one's length in nights and its epoch count.
pub type Windows = Vec<(f64, usize)>;

/// The windows an object's stacks are measured over, made from the epochs' MJDs: the order
/// they are summed in (latest first, then by alert id, so that the order they came in does not
/// matter) and, per window to measure, its length in nights and its epoch count. Windows that
/// repeat a shorter one or hold a single epoch are not measured (never announced).
pub fn plan(epochs: &[(f64, &str)], now: f64) -> (Vec<usize>, Windows) {
    let tol = WINDOW_TOLERANCE;
    let mut order: Vec<usize> = (0..epochs.len()).filter(|&i| epochs[i].0 <= now + tol && now - epochs[i].0 < longest() + tol).collect();
    order.sort_by(|&a, &b| epochs[b].0.total_cmp(&epochs[a].0).then_with(|| epochs[a].1.cmp(epochs[b].1)));
    let mut windows: Windows = Vec::new();
    let mut prev = 0;
    for &w in &DEFAULT_WINDOWS {
        let n = order.iter().take_while(|&&i| now - epochs[i].0 < w + tol).count();
        if n > prev && n >= 2 {
            windows.push((w, n));
        }
        prev = prev.max(n);
    }
    (order, windows)
}

/// The width of a stored PSF, a unit-sum Gaussian sampled at whole pixels (what the pipeline
/// stores): from its centre and the mean of its four neighbours, `g(1)/g(0) = exp(−1/2σ²)`.
/// `None` for a PSF that is not an odd square with a peak at its centre.
pub fn psf_sigma(psf: &crate::alert::Image) -> Option<f64> {
    let s = psf.width;
    if s != psf.height || s.is_multiple_of(2) || s < 3 || psf.data.len() != s * s {
        return None;
    }
    let h = s / 2;
    let at = |x: usize, y: usize| f64::from(psf.data[y * s + x]);
    let (c, n) = (at(h, h), (at(h - 1, h) + at(h + 1, h) + at(h, h - 1) + at(h, h + 1)) / 4.0);
    let sigma = (-0.5 / (n / c).ln()).sqrt();
    (c > 0.0 && n > 0.0 && n < c && sigma.is_finite()).then_some(sigma)
}

/// The resident squares and their index ([`SquareRing::new`]).
#[derive(Debug)]
pub struct SquareRing {
    backend: Backend,
    free: Vec<u32>,
    slots: HashMap<(String, String), Slot>,
    lru: BTreeMap<u64, (String, String)>,
    tick: u64,
    stats: RingStats,
}

impl SquareRing {
    pub fn new(backend: Backend) -> SquareRing {
        let free = (0..backend.capacity() as u32).rev().collect();
        SquareRing { backend, free, slots: HashMap::new(), lru: BTreeMap::new(), tick: 0, stats: RingStats::default() }
    }

    pub fn stats(&self) -> RingStats {
        self.stats
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Every slot given up and the counts reset (the cells stay allocated).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.lru.clear();
        self.free = (0..self.backend.capacity() as u32).rev().collect();
        self.stats = RingStats::default();
    }

    fn touch(&mut self, key: &(String, String)) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(s) = self.slots.get_mut(key) {
            self.lru.remove(&s.used);
            s.used = tick;
            self.lru.insert(tick, key.clone());
        }
    }

    fn drop_slot(&mut self, key: &(String, String)) {
        if let Some(s) = self.slots.remove(key) {
            self.lru.remove(&s.used);
            self.free.extend(s.epochs.iter().map(|e| e.cell));
        }
    }

    /// A free cell, taking the least recently used slot's other than `keep`'s when none is.
    fn alloc(&mut self, keep: &(String, String)) -> Option<u32> {
        loop {
            if let Some(c) = self.free.pop() {
                return Some(c);
            }
            let victim = self.lru.values().find(|k| *k != keep)?.clone();
            self.drop_slot(&victim);
            self.stats.evictions += 1;
        }
    }

    /// Drop a slot's epochs that no window will reach again (older than the longest window
    /// plus [`SLACK_NIGHTS`] before its newest), raising its horizon.
    fn trim(&mut self, key: &(String, String)) {
        let Some(s) = self.slots.get_mut(key) else { return };
        let newest = s.epochs.iter().map(|e| e.mjd).fold(f64::NEG_INFINITY, f64::max);
        let cut = reach(newest) - SLACK_NIGHTS;
        if !cut.is_finite() {
            return;
        }
        let (keep, gone): (Vec<Resident>, Vec<Resident>) = std::mem::take(&mut s.epochs).into_iter().partition(|e| e.mjd > cut);
        s.epochs = keep;
        if !gone.is_empty() {
            s.horizon = s.horizon.max(cut);
        }
        self.free.extend(gone.iter().map(|e| e.cell));
    }

    /// Put one square of `(object, band)` into its cell. `new_object`: the store has just
    /// created the object, so this epoch starts a complete slot. An object without a slot
    /// otherwise gets none here (its first measurement fills it from the store, this epoch
    /// included). A square already resident (by alert id) is not added twice.
    pub fn add(&mut self, object: &str, band: &str, sq: &NewSquare<'_>, new_object: bool) {
        let key = (object.to_string(), band.to_string());
        if !self.slots.contains_key(&key) {
            if !new_object {
                tracing::debug!(object, band, alert_id = sq.alert_id, "no slot: filled from the store when stacked");
                return;
            }
            self.slots.insert(key.clone(), Slot { epochs: Vec::new(), horizon: f64::NEG_INFINITY, used: 0 });
        }
        self.touch(&key);
        if self.slots.get(&key).is_some_and(|s| s.epochs.iter().any(|e| e.alert_id == sq.alert_id)) {
            return;
        }
        if sq.planes.iter().any(|p| p.len() != NPIX) {
            // Not a square of the ring's shape: the slot can no longer say it holds everything.
            self.drop_slot(&key);
            return;
        }
        let Some(cell) = self.alloc(&key) else {
            self.drop_slot(&key);
            return;
        };
        let mut square = Vec::with_capacity(CELL);
        for p in sq.planes {
            square.extend_from_slice(p);
        }
        self.backend.write(cell, &square);
        if let Some(s) = self.slots.get_mut(&key) {
            s.epochs.push(Resident { cell, alert_id: sq.alert_id.to_string(), mjd: sq.mjd, x: sq.x, y: sq.y, sigma: sq.sigma, half: sq.half });
        }
        self.trim(&key);
    }

    /// Whether `(object, band)`'s windows at `now` can be made from its slot.
    pub fn serves(&self, object: &str, band: &str, now: f64) -> bool {
        self.slots.get(&(object.to_string(), band.to_string())).is_some_and(|s| reach(now) >= s.horizon)
    }

    /// Replace `(object, band)`'s slot with `epochs` (the store's epochs of that object, any
    /// band and shape: those of `band` and the ring's square are taken), keeping those a window
    /// from `now` or later can reach. False, with no slot, when they do not fit in the pool.
    pub fn fill(&mut self, object: &str, band: &str, epochs: &[Epoch], now: f64) -> bool {
        let key = (object.to_string(), band.to_string());
        self.drop_slot(&key);
        self.stats.fills += 1;
        let cut = reach(now) - SLACK_NIGHTS;
        let mine: Vec<(&Epoch, f64)> = ring_epochs(epochs, band).filter(|(e, _)| e.mjd > cut).collect();
        if mine.len() > self.backend.capacity() {
            return false;
        }
        self.slots.insert(key.clone(), Slot { epochs: Vec::new(), horizon: cut, used: 0 });
        self.touch(&key);
        for (e, sigma) in mine {
            self.add(object, band, &NewSquare::of(e, sigma), false);
            if !self.slots.contains_key(&key) {
                return false;
            }
        }
        // `add` trims from the newest epoch; the horizon is the fill's own cut at least.
        if let Some(s) = self.slots.get_mut(&key) {
            s.horizon = s.horizon.max(cut);
        }
        true
    }

    /// The job measuring `(object, band)`'s windows at `now` with its candidate at `(x, y)` on
    /// its square, from its slot, with the windows' lengths (nights) and epoch counts. `None`
    /// when the slot does not serve it ([`SquareRing::serves`]) or no window holds two epochs.
    pub fn job(&mut self, object: &str, band: &str, now: f64, x: f64, y: f64) -> Option<(RingJob, Windows)> {
        if !self.serves(object, band, now) {
            return None;
        }
        let key = (object.to_string(), band.to_string());
        self.touch(&key);
        self.stats.hits += 1;
        let s = self.slots.get(&key)?;
        let meta: Vec<(f64, &str)> = s.epochs.iter().map(|e| (e.mjd, e.alert_id.as_str())).collect();
        let (order, windows) = plan(&meta, now);
        let n = windows.last()?.1;
        let entries = order[..n]
            .iter()
            .map(|&i| {
                let e = &s.epochs[i];
                RingEntry { cell: e.cell, dx: e.x - x, dy: e.y - y, sigma: e.sigma, half: e.half }
            })
            .collect();
        Some((RingJob { entries, counts: windows.iter().map(|w| w.1).collect(), x, y }, windows))
    }

    /// Measure `jobs` on the backend.
    pub fn measure(&mut self, jobs: &[RingJob]) -> Result<Vec<Vec<WindowSums>>, EngineError> {
        self.backend.measure(jobs)
    }
}

/// The job for `epochs` (the store's, as [`SquareRing::fill`] takes them) measured on cells of
/// their own: for an object whose epochs do not fit in the pool. The cells and the job, with
/// the windows' lengths and counts; `None` when no window holds two epochs.
pub fn standalone_job(epochs: &[Epoch], band: &str, now: f64, x: f64, y: f64) -> Option<(Vec<f32>, RingJob, Windows)> {
    let mine: Vec<(&Epoch, f64)> = ring_epochs(epochs, band).collect();
    let meta: Vec<(f64, &str)> = mine.iter().map(|(e, _)| (e.mjd, e.alert_id.as_str())).collect();
    let (order, windows) = plan(&meta, now);
    let n = windows.last()?.1;
    let mut cells = Vec::with_capacity(n * CELL);
    let mut entries = Vec::with_capacity(n);
    for (k, &i) in order[..n].iter().enumerate() {
        let (e, sigma) = mine[i];
        let s = &e.stamps;
        for p in [&s.difference.data, &s.variance.data, &s.template_variance.data] {
            cells.extend_from_slice(p);
        }
        entries.push(RingEntry { cell: k as u32, dx: e.stamp_x - x, dy: e.stamp_y - y, sigma, half: (s.psf.width / 2) as u32 });
    }
    Some((cells, RingJob { entries, counts: windows.iter().map(|w| w.1).collect(), x, y }, windows))
}
