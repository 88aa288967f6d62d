//! Reading frames and templates of a night folder: the first 2-D image HDU of a FITS file
//! (cfitsio: any `BITPIX`, `BSCALE`/`BZERO`, tile compression) and its header keys, read
//! liberally as `docs/night-format.md` says ("Readers accept").

use std::path::{Path, PathBuf};

use fitsio::hdu::{FitsHdu, HduInfo};
use fitsio::FitsFile;

use super::DetectError;
use crate::sim::night::wcs::TanWcs;

/// Largest image blink reads, in pixels (64k × 64k would be 16 GiB of f32).
pub const MAX_PIXELS: usize = 1 << 28;

/// What the header says about an image, with the reader's fallbacks applied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageHeader {
    /// Start of the exposure, MJD; `None` without a time key (detection on a night needs one,
    /// `blink subtract` does not).
    pub mjd_start: Option<f64>,
    /// Seconds; 0 when absent.
    pub exptime: f64,
    pub band: Option<String>,
    /// e⁻/ADU; `None` when absent (estimated from the sky by [`ImageHeader::gain_or_estimate`]).
    pub gain: Option<f64>,
    /// e⁻ RMS; 0 when absent.
    pub read_noise: f64,
    /// ADU; `None`: no saturation mask.
    pub saturate: Option<f64>,
    pub zero_point: Option<f64>,
    /// PSF FWHM in pixels; `None`: estimate it from the image.
    pub seeing: Option<f64>,
    pub wcs: Option<TanWcs>,
    /// Templates: exposures averaged.
    pub ncombine: Option<f64>,
}

impl ImageHeader {
    /// Mid-exposure MJD.
    pub fn mjd_mid(&self) -> Option<f64> {
        self.mjd_start.map(|m| m + self.exptime / 2.0 / 86400.0)
    }
}

/// One image in ADU with its header; NaN marks pixels with no data.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
    pub header: ImageHeader,
    /// Problems the reader worked around (missing keys), one line each, for the log.
    pub warnings: Vec<String>,
}

fn fits_err(path: &Path, e: impl std::fmt::Display) -> DetectError {
    DetectError::Fits { path: path.to_path_buf(), message: e.to_string() }
}

/// The first key of `names` present and numeric.
fn key_f64(f: &mut FitsFile, hdu: &FitsHdu, names: &[&str]) -> Option<f64> {
    names.iter().find_map(|k| hdu.read_key::<f64>(f, k).ok().filter(|v| v.is_finite()))
}

fn key_str(f: &mut FitsFile, hdu: &FitsHdu, names: &[&str]) -> Option<String> {
    names.iter().find_map(|k| hdu.read_key::<String>(f, k).ok()).map(|s| s.trim().to_string())
}

/// MJD from an ISO 8601 `DATE-OBS` (`YYYY-MM-DD[THH:MM:SS[.fff]]`).
pub fn mjd_from_iso(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00"));
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.split(':');
    let hh: f64 = t.next()?.parse().ok()?;
    let mm: f64 = t.next().unwrap_or("0").parse().ok()?;
    let ss: f64 = t.next().unwrap_or("0").parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm), then MJD = days since 1858-11-17.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days_since_1970 = era * 146097 + doe - 719468;
    Some(days_since_1970 as f64 + 40587.0 + (hh * 3600.0 + mm * 60.0 + ss) / 86400.0)
}

/// The linear WCS from `CD`, or `PC` + `CDELT`, or `CDELT` + `CROTA2`; `None` unless the axes
/// are RA/Dec TAN-like (`RA---TAN`, `RA---TAN-SIP`; SIP terms ignored).
fn read_wcs(f: &mut FitsFile, hdu: &FitsHdu) -> Option<TanWcs> {
    let c1 = key_str(f, hdu, &["CTYPE1"])?;
    let c2 = key_str(f, hdu, &["CTYPE2"])?;
    if !(c1.starts_with("RA---TAN") && c2.starts_with("DEC--TAN")) {
        return None;
    }
    let crval = [key_f64(f, hdu, &["CRVAL1"])?, key_f64(f, hdu, &["CRVAL2"])?];
    let crpix = [key_f64(f, hdu, &["CRPIX1"])?, key_f64(f, hdu, &["CRPIX2"])?];
    let cd = if let Some(c11) = key_f64(f, hdu, &["CD1_1"]) {
        let g = |f: &mut FitsFile, k| key_f64(f, hdu, &[k]).unwrap_or(0.0);
        [[c11, g(f, "CD1_2")], [g(f, "CD2_1"), g(f, "CD2_2")]]
    } else {
        let (d1, d2) = (key_f64(f, hdu, &["CDELT1"])?, key_f64(f, hdu, &["CDELT2"])?);
        if let Some(p11) = key_f64(f, hdu, &["PC1_1"]) {
            let g = |f: &mut FitsFile, k| key_f64(f, hdu, &[k]).unwrap_or(0.0);
            let (p12, p21, p22) = (g(f, "PC1_2"), g(f, "PC2_1"), key_f64(f, hdu, &["PC2_2"]).unwrap_or(1.0));
            [[d1 * p11, d1 * p12], [d2 * p21, d2 * p22]]
        } else {
            let rot = key_f64(f, hdu, &["CROTA2"]).unwrap_or(0.0).to_radians();
            [[d1 * rot.cos(), -d2 * rot.sin()], [d1 * rot.sin(), d2 * rot.cos()]]
        }
    };
    Some(TanWcs { crval, crpix, cd })
}

/// Read the first 2-D image HDU of `path` and its header. Errors name the file and what is wrong;
/// missing optional keys become warnings (see [`Image::warnings`]).
/// The file's first 2-D image HDU, open, with its width and height.
fn first_image(path: &Path) -> Result<(FitsFile, FitsHdu, usize, usize), DetectError> {
    if !path.is_file() {
        return Err(DetectError::Fits { path: path.to_path_buf(), message: "no such file".into() });
    }
    let mut f = FitsFile::open(path).map_err(|e| fits_err(path, format!("not a FITS file ({e})")))?;
    let n = f.num_hdus().map_err(|e| fits_err(path, e))?;
    for i in 0..n {
        let hdu = f.hdu(i).map_err(|e| fits_err(path, e))?;
        if let HduInfo::ImageInfo { shape, .. } = &hdu.info {
            if shape.len() == 2 && shape[0] > 0 && shape[1] > 0 {
                let (width, height) = (shape[1], shape[0]);
                return Ok((f, hdu, width, height));
            }
        }
    }
    Err(fits_err(path, "no 2-D image HDU (NAXIS = 2) in the file: not an image"))
}

/// Numeric header keys of the file's first 2-D image, without reading its pixels (`None` for
/// a key that is absent or not a number).
pub fn read_keys(path: &Path, names: &[&str]) -> Result<Vec<Option<f64>>, DetectError> {
    let (mut f, hdu, _, _) = first_image(path)?;
    Ok(names.iter().map(|n| key_f64(&mut f, &hdu, &[n])).collect())
}

pub fn read_image(path: &Path) -> Result<Image, DetectError> {
    let (mut f, hdu, width, height) = first_image(path)?;
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(fits_err(path, format!("image of {width}x{height} pixels is larger than blink reads ({MAX_PIXELS})")));
    }
    let data: Vec<f32> = hdu.read_image(&mut f).map_err(|e| fits_err(path, format!("reading pixels: {e}")))?;
    if data.len() != width * height {
        return Err(fits_err(path, format!("read {} pixels, expected {width}x{height}", data.len())));
    }
    let mut warnings = Vec::new();
    let exptime = key_f64(&mut f, &hdu, &["EXPTIME", "EXPOSURE"]).unwrap_or(0.0);
    let mjd_start = key_f64(&mut f, &hdu, &["MJD-OBS", "MJD"])
        .or_else(|| key_str(&mut f, &hdu, &["DATE-OBS"]).as_deref().and_then(mjd_from_iso));
    let gain = key_f64(&mut f, &hdu, &["GAIN", "EGAIN"]).filter(|g| *g > 0.0);
    if gain.is_none() {
        warnings.push("no GAIN: estimated from the sky (mean / variance)".into());
    }
    let read_noise = key_f64(&mut f, &hdu, &["RDNOISE", "READNOIS", "RON"]).unwrap_or_else(|| {
        warnings.push("no RDNOISE: read noise taken as 0".into());
        0.0
    });
    let saturate = key_f64(&mut f, &hdu, &["SATURATE", "SATLEVEL"]);
    if saturate.is_none() {
        warnings.push("no SATURATE: no saturation mask".into());
    }
    let zero_point = key_f64(&mut f, &hdu, &["MAGZP", "MAGZPT", "PHOTZP", "ZP"]);
    let seeing = key_f64(&mut f, &hdu, &["SEEING", "FWHM"]).filter(|s| *s > 0.0);
    let wcs = read_wcs(&mut f, &hdu);
    let header = ImageHeader {
        mjd_start,
        exptime,
        band: key_str(&mut f, &hdu, &["FILTER", "BAND"]),
        gain,
        read_noise,
        saturate,
        zero_point,
        seeing,
        wcs,
        ncombine: key_f64(&mut f, &hdu, &["NCOMBINE"]),
    };
    Ok(Image { path: path.to_path_buf(), width, height, data, header, warnings })
}

/// Write a `width`×`height` f32 image as a single-HDU FITS file (replacing `path`), with numeric
/// and text header keys `(name, value, comment)`.
pub fn write_image(
    path: &Path,
    width: usize,
    height: usize,
    data: &[f32],
    numbers: &[(&str, f64, &str)],
    texts: &[(&str, String, &str)],
) -> Result<(), DetectError> {
    use fitsio::images::{ImageDescription, ImageType};
    let fe = |e: fitsio::errors::Error| fits_err(path, format!("writing: {e}"));
    let desc = ImageDescription { data_type: ImageType::Float, dimensions: &[height, width] };
    let mut f = FitsFile::create(path).with_custom_primary(&desc).overwrite().open().map_err(fe)?;
    let hdu = f.primary_hdu().map_err(fe)?;
    hdu.write_image(&mut f, data).map_err(fe)?;
    for (k, v, c) in numbers {
        if v.is_finite() {
            hdu.write_key(&mut f, k, (*v, *c)).map_err(fe)?;
        }
    }
    for (k, v, c) in texts {
        hdu.write_key(&mut f, k, (v.clone(), *c)).map_err(fe)?;
    }
    Ok(())
}

/// Write a cube of `planes` images of `width`×`height` f32 (FITS axes: NAXIS1 = width,
/// NAXIS2 = height, NAXIS3 = planes) with header keys, overwriting `path`.
pub fn write_cube(
    path: &Path,
    width: usize,
    height: usize,
    planes: usize,
    data: &[f32],
    numbers: &[(String, f64, String)],
    texts: &[(String, String, String)],
) -> Result<(), DetectError> {
    use fitsio::images::{ImageDescription, ImageType};
    let fe = |e: fitsio::errors::Error| fits_err(path, format!("writing: {e}"));
    let desc = ImageDescription { data_type: ImageType::Float, dimensions: &[planes, height, width] };
    let mut f = FitsFile::create(path).with_custom_primary(&desc).overwrite().open().map_err(fe)?;
    let hdu = f.primary_hdu().map_err(fe)?;
    hdu.write_image(&mut f, data).map_err(fe)?;
    for (k, v, c) in numbers {
        if v.is_finite() {
            hdu.write_key(&mut f, k, (*v, c.as_str())).map_err(fe)?;
        }
    }
    for (k, v, c) in texts {
        hdu.write_key(&mut f, k, (v.clone(), c.as_str())).map_err(fe)?;
    }
    Ok(())
}

/// Median of finite values (lower median); `None` when there are none.
pub fn median(mut v: Vec<f32>) -> Option<f32> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    let k = (v.len() - 1) / 2;
    let (_, m, _) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    Some(*m)
}

/// Robust (median, sigma) of a sample: sigma = 1.4826 × the median absolute deviation.
pub fn robust_stats(v: &[f32]) -> Option<(f32, f32)> {
    let m = median(v.to_vec())?;
    let mad = median(v.iter().map(|x| (x - m).abs()).collect())?;
    Some((m, 1.4826 * mad))
}

/// Every `step`-th finite pixel (a sample for sky statistics).
fn sample(data: &[f32], step: usize) -> Vec<f32> {
    data.iter().step_by(step.max(1)).copied().filter(|v| v.is_finite()).collect()
}

impl Image {
    /// The gain from the header, else estimated as sky mean / (sky variance − read-noise term):
    /// Poisson statistics of the sky in electrons.
    pub fn gain_or_estimate(&self) -> f64 {
        if let Some(g) = self.header.gain {
            return g;
        }
        let s = sample(&self.data, 7);
        let Some((sky, sigma)) = robust_stats(&s) else { return 1.0 };
        // var_adu = sky/g + (rn/g)²  ⇒  g = (sky + sqrt(sky² + 4 var rn²)) / (2 var).
        let (var, rn) = (sigma as f64 * sigma as f64, self.header.read_noise);
        let g = (sky as f64 + (sky as f64 * sky as f64 + 4.0 * var * rn * rn).sqrt()) / (2.0 * var);
        if g.is_finite() && g > 0.0 {
            g
        } else {
            1.0
        }
    }

    /// Per-pixel variance in ADU²: `max(value, 0)/gain + (read noise/gain)²`; NaN stays NaN.
    pub fn variance(&self) -> Vec<f32> {
        let g = self.gain_or_estimate();
        let rn2 = (self.header.read_noise / g).powi(2);
        self.data.iter().map(|&v| if v.is_finite() { (v.max(0.0) as f64 / g + rn2) as f32 } else { f32::NAN }).collect()
    }

    /// [`Image::variance`] of the 3×3 mean around each pixel (NaN neighbours left out): the
    /// pixel's own noise barely enters its variance, so inverse-variance weights do not favour
    /// pixels that fluctuated low.
    pub fn variance_smoothed(&self) -> Vec<f32> {
        let (w, h) = (self.width, self.height);
        let g = self.gain_or_estimate();
        let rn2 = (self.header.read_noise / g).powi(2);
        let mut out = vec![f32::NAN; w * h];
        for y in 0..h {
            for x in 0..w {
                if !self.data[y * w + x].is_finite() {
                    continue;
                }
                let (mut s, mut n) = (0.0f64, 0.0f64);
                for yy in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                    for xx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                        let v = self.data[yy * w + xx];
                        if v.is_finite() {
                            s += v as f64;
                            n += 1.0;
                        }
                    }
                }
                out[y * w + x] = ((s / n).max(0.0) / g + rn2) as f32;
            }
        }
        out
    }

    /// The header's seeing, else an estimate from the image ([`estimate_fwhm`]).
    pub fn fwhm(&self) -> Result<f64, DetectError> {
        if let Some(s) = self.header.seeing {
            return Ok(s);
        }
        estimate_fwhm(self).ok_or_else(|| DetectError::Header {
            path: self.path.clone(),
            key: "SEEING".into(),
            message: "no SEEING or FWHM key and too few isolated stars to estimate it".into(),
        })
    }
}

/// Bright, unsaturated, isolated point sources: the brightest pixel within `r` (nothing NaN or
/// saturated there), at least 50σ of sky above the sky, at least `r` from the edge, with each of
/// its four neighbours above a quarter of its height (hot pixels and cosmic rays are sharper); at
/// most 400, in raster order, with the global sky and its σ.
pub(crate) struct Stars {
    pub(crate) at: Vec<(usize, usize)>,
    pub(crate) sky: f32,
}

pub(crate) fn isolated_stars(img: &Image, r: usize) -> Option<Stars> {
    let (w, h) = (img.width, img.height);
    let (sky, sigma) = robust_stats(&sample(&img.data, 5))?;
    let sat = img.header.saturate.map(|s| s as f32 * 0.8).unwrap_or(f32::INFINITY);
    let at = |x: usize, y: usize| img.data[y * w + x];
    let mut out = Vec::new();
    if w <= 2 * r || h <= 2 * r {
        return Some(Stars { at: out, sky });
    }
    for y in r..h - r {
        for x in r..w - r {
            let v = at(x, y);
            if !(v - sky > 50.0 * sigma) || v >= sat {
                continue;
            }
            let mut ok = true;
            'win: for yy in y - r..=y + r {
                for xx in x - r..=x + r {
                    let u = at(xx, yy);
                    if !u.is_finite() || u >= sat || (u > v) || (u == v && (yy, xx) < (y, x)) {
                        ok = false;
                        break 'win;
                    }
                }
            }
            // Not a hot pixel or cosmic ray: all four neighbours carry a share of the peak.
            let floor = sky + 0.25 * (v - sky);
            if ok && [at(x - 1, y), at(x + 1, y), at(x, y - 1), at(x, y + 1)].iter().all(|&u| u > floor) {
                out.push((x, y));
                if out.len() >= 400 {
                    return Some(Stars { at: out, sky });
                }
            }
        }
    }
    Some(Stars { at: out, sky })
}

/// PSF FWHM estimated from the image: the median, over bright, unsaturated, isolated stars, of
/// `2·sqrt(A/π)` with `A` the number of pixels above half the peak (sky subtracted): the FWHM
/// whatever the profile's wings. Returns `None` with fewer than 5 usable stars.
pub fn estimate_fwhm(img: &Image) -> Option<f64> {
    estimate_fwhm_from(img, &isolated_stars(img, FWHM_STAR_RADIUS)?)
}

/// Isolation radius of the stars [`estimate_fwhm`] measures.
pub(crate) const FWHM_STAR_RADIUS: usize = 7;

/// [`estimate_fwhm`] on stars already found (`isolated_stars(img, FWHM_STAR_RADIUS)`).
pub(crate) fn estimate_fwhm_from(img: &Image, found: &Stars) -> Option<f64> {
    let w = img.width;
    let r = FWHM_STAR_RADIUS;
    let (stars, sky) = (&found.at, found.sky);
    let mut fwhms = Vec::new();
    for &(x, y) in stars {
        let half = 0.5 * (img.data[y * w + x] - sky);
        let mut area = 0usize;
        for yy in y - r..=y + r {
            for xx in x - r..=x + r {
                if img.data[yy * w + xx] - sky >= half {
                    area += 1;
                }
            }
        }
        fwhms.push((2.0 * (area as f64 / std::f64::consts::PI).sqrt()) as f32);
    }
    if fwhms.len() < 5 {
        return None;
    }
    median(fwhms).map(|v| v as f64)
}

/// Flux in an aperture of radius `r_ap` around (x, y) minus the median of the annulus out to
/// `r_ap + 5`, and that sky level; `None` when the annulus runs off the image, the aperture holds
/// a NaN or the annulus nothing finite.
fn aperture_flux(img: &Image, x: usize, y: usize, r_ap: usize) -> Option<(f64, f64)> {
    let (w, h) = (img.width, img.height);
    let r_out = r_ap + 5;
    if x < r_out || y < r_out || x + r_out >= w || y + r_out >= h {
        return None;
    }
    let mut ann = Vec::new();
    let (mut ap, mut nap) = (0.0f64, 0.0f64);
    for yy in y - r_out..=y + r_out {
        for xx in x - r_out..=x + r_out {
            let d2 = (xx as f64 - x as f64).powi(2) + (yy as f64 - y as f64).powi(2);
            let v = img.data[yy * w + xx];
            if !v.is_finite() {
                if d2 <= (r_ap * r_ap) as f64 {
                    return None;
                }
                continue;
            }
            if d2 <= (r_ap * r_ap) as f64 {
                ap += v as f64;
                nap += 1.0;
            } else if d2 <= (r_out * r_out) as f64 {
                ann.push(v);
            }
        }
    }
    let sky = median(ann)? as f64;
    Some((ap - nap * sky, sky))
}

/// The flux ratio science / template measured on stars: the median over bright isolated stars
/// of the template of the ratio of their aperture fluxes (radius 4 × `fwhm`, the broader FWHM)
/// in the two images. Apertures that wide hold nearly all the flux whatever the PSF shapes, so
/// unlike a least-squares fit on pixels this is not pulled by mismatched wings. `None` with fewer
/// than 5 stars.
pub fn photometric_scale(science: &Image, template: &Image, fwhm: f64) -> Option<f64> {
    let r_ap = (4.0 * fwhm).ceil().max(4.0) as usize;
    let stars = isolated_stars(template, r_ap + 5)?.at;
    let mut ratios = Vec::new();
    for (x, y) in stars {
        let (Some((s, _)), Some((t, _))) = (aperture_flux(science, x, y, r_ap), aperture_flux(template, x, y, r_ap)) else { continue };
        if t > 0.0 && s.is_finite() {
            ratios.push((s / t) as f32);
        }
    }
    if ratios.len() < 5 {
        return None;
    }
    median(ratios).map(|v| v as f64)
}

/// Aperture correction of a Gaussian matched filter of `sigma` pixels on this image's PSF: the
/// median over bright isolated stars of (filter flux at the peak pixel) / (flux in a 4-FWHM
/// aperture, local sky from the annulus outside it). Real PSFs have wider wings than a Gaussian,
/// so this is below 1; dividing filter fluxes by it gives total fluxes. `None` with fewer than 3
/// stars.
pub fn aperture_correction(img: &Image, sigma: f64) -> Option<f64> {
    let rf = (3.5 * sigma).ceil() as i64;
    let g: Vec<f64> = (-rf..=rf).flat_map(|dy| (-rf..=rf).map(move |dx| (dx, dy))).map(|(dx, dy)| (-0.5 * ((dx * dx + dy * dy) as f64) / (sigma * sigma)).exp()).collect();
    let gs: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / gs).collect();
    aperture_correction_profile(img, &g, (2 * rf + 1) as usize, sigma)
}

/// [`aperture_correction`] for a matched filter with the unit-sum profile `p` (`side`² values,
/// row-major, centred), e.g. a PSF measured on stars ([`super::psf::empirical_psf`]); `sigma`
/// sets the aperture (4 FWHM of a Gaussian of that σ).
pub fn aperture_correction_profile(img: &Image, p: &[f64], side: usize, sigma: f64) -> Option<f64> {
    let w = img.width;
    let r_ap = (4.0 * 2.3548 * sigma).ceil().max(4.0) as usize;
    let rf = (side / 2) as i64;
    if side.is_multiple_of(2) || p.len() != side * side {
        return None;
    }
    let stars = isolated_stars(img, r_ap.max(rf as usize) + 5)?.at;
    let mut ratios = Vec::new();
    for (x, y) in stars {
        let Some((total, sky)) = aperture_flux(img, x, y, r_ap) else { continue };
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for dy in -rf..=rf {
            for dx in -rf..=rf {
                let pv = p[((dy + rf) * side as i64 + dx + rf) as usize];
                let v = img.data[(y as i64 + dy) as usize * w + (x as i64 + dx) as usize] as f64 - sky;
                num += pv * v;
                den += pv * pv;
            }
        }
        if total > 0.0 && den > 0.0 {
            ratios.push(((num / den) / total) as f32);
        }
    }
    if ratios.len() < 3 {
        return None;
    }
    median(ratios).map(|v| v as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(mjd_from_iso("1858-11-17"), Some(0.0));
        assert_eq!(mjd_from_iso("2000-01-01T12:00:00"), Some(51544.5));
        let m = mjd_from_iso("2026-11-26T06:00:00.0Z").unwrap();
        assert!((m - 61370.25).abs() < 1e-9, "{m}");
        assert_eq!(mjd_from_iso("2026-13-01"), None);
        assert_eq!(mjd_from_iso("yesterday"), None);
    }

    /// A 400² frame of Gaussian stars of FWHM `fwhm` on sky 500 with noise, plus hot pixels.
    fn star_field(fwhm: f64) -> Image {
        use rand::{Rng, SeedableRng};
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (w, h) = (400usize, 400usize);
        let sigma = fwhm / 2.3548;
        let mut data = vec![500.0f32; w * h];
        for _ in 0..60 {
            let (x0, y0, f) = (rng.gen_range(20.0..380.0), rng.gen_range(20.0..380.0), rng.gen_range(2e4..2e5));
            for y in (y0 as usize - 15)..(y0 as usize + 16) {
                for x in (x0 as usize - 15)..(x0 as usize + 16) {
                    let d2 = (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2);
                    data[y * w + x] += (f * (-0.5 * d2 / (sigma * sigma)).exp() / (2.0 * std::f64::consts::PI * sigma * sigma)) as f32;
                }
            }
        }
        let n = Normal::new(0.0f32, 1.0).unwrap();
        for v in &mut data {
            *v += n.sample(&mut rng) * (*v / 1.5).sqrt() / 1.5f32.sqrt();
        }
        for _ in 0..100 {
            let p = rng.gen_range(0..w * h);
            data[p] += 20000.0;
        }
        let header = ImageHeader {
            mjd_start: Some(61000.0),
            exptime: 30.0,
            band: None,
            gain: Some(1.5),
            read_noise: 5.0,
            saturate: Some(1e7),
            zero_point: None,
            seeing: None,
            wcs: None,
            ncombine: None,
        };
        Image { path: PathBuf::from("stars.fits"), width: w, height: h, data, header, warnings: Vec::new() }
    }

    #[test]
    fn seeing_and_aperture_correction_from_isolated_stars() {
        for fwhm in [2.5, 4.0] {
            let img = star_field(fwhm);
            // The area above half maximum, in whole pixels, reads a little wide.
            let est = estimate_fwhm(&img).expect("enough stars");
            assert!(est > 0.95 * fwhm && est < 1.2 * fwhm, "FWHM {fwhm}: estimated {est}");
            assert_eq!(img.fwhm().unwrap(), est, "no SEEING key: the estimate is used");
            // A Gaussian filter on a Gaussian PSF of the same width reads the total flux.
            let ac = aperture_correction(&img, fwhm / 2.3548).expect("enough stars");
            assert!((ac - 1.0).abs() < 0.05, "FWHM {fwhm}: aperture correction {ac}");
            // A filter narrower than the PSF reads low (2σf²/(σf² + σ²) of the flux centred, less
            // off-centre), a wider one high.
            let (narrow, wide) = (aperture_correction(&img, 0.6 * fwhm / 2.3548).unwrap(), aperture_correction(&img, 1.6 * fwhm / 2.3548).unwrap());
            assert!(narrow < 0.6 && narrow > 0.3, "FWHM {fwhm}: narrow filter {narrow}");
            assert!(wide > 1.05 && wide < 1.5, "FWHM {fwhm}: wide filter {wide}");
        }
    }

    #[test]
    fn flux_scale_from_aperture_photometry_ignores_psf_shape() {
        // The same stars (same seed) with another PSF width, at a quarter of the flux.
        let template = star_field(2.5);
        let mut science = star_field(4.0);
        science.data.iter_mut().for_each(|v| *v = 500.0 + 0.25 * (*v - 500.0));
        let a = photometric_scale(&science, &template, 4.0).expect("enough stars");
        assert!((a - 0.25).abs() < 0.01, "scale {a}");
        // Without stars there is nothing to measure.
        let mut blank = template.clone();
        blank.data.iter_mut().for_each(|v| *v = 500.0);
        assert_eq!(photometric_scale(&science, &blank, 4.0), None);
    }

    #[test]
    fn robust_sigma_of_gaussian_noise() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = Normal::new(100.0f32, 4.0).unwrap();
        let mut v: Vec<f32> = (0..20000).map(|_| n.sample(&mut rng)).collect();
        v.extend([1e6f32; 500]); // outliers: stars
        let (m, s) = robust_stats(&v).unwrap();
        assert!((m - 100.0).abs() < 0.3 && (s - 4.0).abs() < 0.2, "{m} {s}");
    }
}
