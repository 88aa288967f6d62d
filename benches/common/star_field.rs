//! A simulated star field shared by the frame benches (`frames.rs`, `frame_gpu.rs`) and the frame
//! parity tests (`tests/integration/frame_parity.rs`): Gaussian
//! stars of the given FWHM at the same positions in every image (fluxes times `scale`), sky 500,
//! Poisson-like noise at gain 1.5, a header with zero point, saturation and seeing.

use std::path::PathBuf;

use blink::detect::image::{Image, ImageHeader};

#[allow(dead_code)] // the parity tests call `render` only
pub fn image(side: usize, fwhm: f64, seed: u64, scale: f32) -> Image {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
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
    let stars: Vec<(f64, f64, f64)> =
        (0..side * side / 1500).map(|_| (pos() * side as f64, pos() * side as f64, (200.0 * (1.0 / (pos() + 0.01)) as f32 * scale) as f64)).collect();
    render(side, fwhm, &stars, uniform)
}

/// Gaussian stars `(x, y, flux)` of FWHM `fwhm` on sky 500, noise with the Poisson variance at
/// gain 1.5 from `uniform` (values in [0, 1): the sum of four, centred, is near Gaussian), and
/// the header.
#[allow(dead_code)] // not every user of this file calls it directly
pub fn render(side: usize, fwhm: f64, stars: &[(f64, f64, f64)], mut uniform: impl FnMut() -> f64) -> Image {
    let sigma = fwhm / 2.3548;
    let mut data = vec![500.0f32; side * side];
    for &(x0, y0, flux) in stars {
        let r = (4.0 * sigma).ceil() as i64;
        for y in (y0 as i64 - r).max(0)..(y0 as i64 + r + 1).min(side as i64) {
            for x in (x0 as i64 - r).max(0)..(x0 as i64 + r + 1).min(side as i64) {
                let d2 = (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2);
                data[y as usize * side + x as usize] += (flux * (-0.5 * d2 / (sigma * sigma)).exp() / (2.0 * std::f64::consts::PI * sigma * sigma)) as f32;
            }
        }
    }
    for v in &mut data {
        let g = (0..4).map(|_| uniform()).sum::<f64>() - 2.0;
        *v += (g * (3.0f64).sqrt() * ((*v as f64 / 1.5).max(1.0)).sqrt() / 1.5) as f32;
    }
    Image {
        path: PathBuf::from("star-field.fits"),
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
