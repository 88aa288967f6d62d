//! Detection on full frames: `blink detect NIGHT`. Each frame of a night folder
//! (`docs/night-format.md`) is subtracted from its template by the engine (tiles of the frame
//! as a batch of stamps), a matched-filter score image is built, and its local extrema above
//! threshold become [`catalog::Detection`]s (`docs/detections.md`).

pub mod catalog;
