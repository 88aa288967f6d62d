//! [`StackBatch`]: many objects' epochs and the stacks to make of them, laid out for one
//! dispatch of `shaders/stack/*.wgsl` (or their CPU twins in `cpu::stack`).

use std::ops::Range;

use super::{canonical_order, StackEpoch, StackError};
use crate::subtract::decorr::PsfImage;

/// Equal-shape epochs, plane after plane, and stacks as ranges of them. A stack sums its
/// epochs in the batch's order: [`StackBatch::for_epochs`] pushes them in
/// [`canonical_order`], and one object's windows are nested ranges of one run of epochs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StackBatch {
    pub width: usize,
    pub height: usize,
    /// Epoch planes, `epochs() × width × height` each, epoch after epoch.
    pub diff: Vec<f32>,
    pub var: Vec<f32>,
    pub var_template: Vec<f32>,
    /// Per epoch: offset from the common grid `(dx, dy)`, and PSF.
    pub shifts: Vec<(f64, f64)>,
    pub psfs: Vec<PsfImage>,
    /// Per stack: the epochs it sums.
    pub stacks: Vec<Range<usize>>,
}

impl StackBatch {
    /// An empty batch of `width × height` stamps.
    pub fn new(width: usize, height: usize) -> StackBatch {
        StackBatch { width, height, ..Default::default() }
    }

    /// A batch holding `epochs` in [`canonical_order`] (no stacks yet).
    pub fn for_epochs(epochs: &[&StackEpoch]) -> Result<StackBatch, StackError> {
        let first = epochs.first().ok_or(StackError::Empty)?;
        let mut b = StackBatch::new(first.width, first.height);
        for i in canonical_order(epochs) {
            b.push_epoch(epochs[i], i)?;
        }
        Ok(b)
    }

    pub fn npix(&self) -> usize {
        self.width * self.height
    }

    pub fn epochs(&self) -> usize {
        self.shifts.len()
    }

    /// Append an epoch (checked; `index` names it in an error); returns its place in the batch.
    pub fn push_epoch(&mut self, e: &StackEpoch, index: usize) -> Result<usize, StackError> {
        e.validate(index)?;
        if (e.width, e.height) != (self.width, self.height) {
            return Err(StackError::BadEpoch { index, what: format!("a {}x{} stamp in a batch of {}x{}", e.width, e.height, self.width, self.height) });
        }
        self.diff.extend_from_slice(&e.diff);
        self.var.extend_from_slice(&e.var);
        self.var_template.extend_from_slice(&e.var_template);
        self.shifts.push((e.dx, e.dy));
        self.psfs.push(e.psf.clone());
        Ok(self.shifts.len() - 1)
    }

    /// Append a stack of the epochs `r` (non-empty, within the batch); returns its index.
    pub fn push_stack(&mut self, r: Range<usize>) -> Result<usize, StackError> {
        if r.is_empty() || r.end > self.epochs() {
            return Err(StackError::BadBatch(format!("stack of epochs {r:?} in a batch of {}", self.epochs())));
        }
        self.stacks.push(r);
        Ok(self.stacks.len() - 1)
    }

    /// Plane lengths, per-epoch vectors and stack ranges agree.
    pub fn validate(&self) -> Result<(), StackError> {
        let (n, ne) = (self.npix(), self.epochs());
        if n == 0 || u32::try_from(n).is_err() {
            return Err(StackError::BadBatch(format!("{}x{} stamps", self.width, self.height)));
        }
        for (name, len) in [("diff", self.diff.len()), ("var", self.var.len()), ("var_template", self.var_template.len())] {
            if len != ne * n {
                return Err(StackError::BadBatch(format!("{name} has {len} values for {ne} epochs of {n} pixels")));
            }
        }
        if self.psfs.len() != ne {
            return Err(StackError::BadBatch(format!("{} PSFs for {ne} epochs", self.psfs.len())));
        }
        if let Some((i, p)) = self.psfs.iter().enumerate().find(|(_, p)| p.side % 2 == 0 || p.pixels.len() != p.side * p.side) {
            return Err(StackError::BadBatch(format!("PSF {i}: side {} with {} values", p.side, p.pixels.len())));
        }
        if let Some((i, s)) = self.shifts.iter().enumerate().find(|(_, s)| !(s.0.abs() <= super::MAX_SHIFT && s.1.abs() <= super::MAX_SHIFT)) {
            return Err(StackError::BadBatch(format!("epoch {i}: offset {s:?}")));
        }
        if let Some(r) = self.stacks.iter().find(|r| r.is_empty() || r.end > ne) {
            return Err(StackError::BadBatch(format!("stack of epochs {r:?} in a batch of {ne}")));
        }
        Ok(())
    }
}
