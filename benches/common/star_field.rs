//! A simulated star field shared by the frame benches (`frames.rs`, `frame_gpu.rs`): Gaussian
//! stars of the given FWHM at the same positions in every image (fluxes times `scale`), sky 500,
//! Poisson-like noise at gain 1.5, a header with zero point, saturation and seeing.

use std::path::PathBuf;

use blink::detect::image::{Image, ImageHeader};

pub fn image(side: usize, fwhm: f64, seed: u64, scale: f32) -> Image {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let sky = 500.0f32;
    let mut data = vec![sky; side * side];
    // The same stars in both images (positions from a fixed stream), fluxes scaled.
    let mut pos = {
        let mut s = 0x2545f4914f6cdd1du64;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    };
    let sigma = fwhm / 2.3548;
    let n_stars = side * side / 1500;
    for _ in 0..n_stars {
        let (x0, y0) = (pos() * side as f64, pos() * side as f64);
        let flux = 200.0 * (1.0 / (pos() + 0.01)) as f32 * scale;
        let r = (4.0 * sigma).ceil() as i64;
        for y in (y0 as i64 - r).max(0)..(y0 as i64 + r + 1).min(side as i64) {
            for x in (x0 as i64 - r).max(0)..(x0 as i64 + r + 1).min(side as i64) {
                let d2 = (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2);
                data[y as usize * side + x as usize] += flux * ((-0.5 * d2 / (sigma * sigma)).exp() / (2.0 * std::f64::consts::PI * sigma * sigma)) as f32;
            }
        }
    }
    for v in &mut data {
        // Approximately Gaussian noise with the Poisson variance (gain 1.5).
        let g = (0..4).map(|_| uniform()).sum::<f64>() - 2.0;
        *v += (g * (3.0f64).sqrt() * ((*v as f64 / 1.5).max(1.0)).sqrt() / 1.5) as f32;
    }
    Image {
        path: PathBuf::from(format!("bench-{seed}.fits")),
        width: side,
        height: side,
        data,
        header: ImageHeader {
            mjd_start: Some(61000.0),
            exptime: 30.0,
            band: Some("r".into()),
            gain: Some(1.5),
            read_noise: 5.0,
            saturate: Some(60000.0),
            zero_point: Some(28.5),
            seeing: Some(fwhm),
            wcs: None,
            ncombine: None,
        },
        warnings: Vec::new(),
    }
}
