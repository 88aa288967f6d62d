//! Writing a night folder: FITS images with the header keys of `docs/night-format.md`, the
//! manifest, and the truth table (CSV, one row per source or artifact per frame).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use fitsio::images::{ImageDescription, ImageType};
use fitsio::FitsFile;

use super::epoch::{Frame, TruthRow};
use super::manifest::{FrameEntry, Manifest, TemplateEntry};
use super::template::Template;
use super::wcs::TanWcs;
use super::{NightError, SimConfig};

pub const TRUTH_HEADER: &str = "id,kind,host,frame,mjd,x,y,ra,dec,mag,flux,ref_flux,snr";

/// The header of one image.
pub struct Header<'a> {
    pub mjd: f64,
    pub exptime: f64,
    pub band: &'a str,
    pub gain: f64,
    pub read_noise: f64,
    pub saturate: f64,
    pub zero_point: f64,
    pub seeing: f64,
    /// Moffat β of the PSF (`PSFBETA`, the simulator's own key: `blink bench` computes the ideal
    /// stack SNR from each frame's PSF and the template's).
    pub beta: f64,
    pub wcs: TanWcs,
    pub field: &'a str,
    pub image_type: &'a str,
    pub sky: f64,
    pub ncombine: Option<usize>,
}

/// Write a `width`×`height` f32 image with `hdr` as a single-HDU FITS file.
pub fn write_fits(path: &Path, width: usize, height: usize, data: &[f32], hdr: &Header) -> Result<(), NightError> {
    let fe = |source| NightError::Fits { path: path.to_path_buf(), error: source };
    let desc = ImageDescription { data_type: ImageType::Float, dimensions: &[height, width] };
    let mut f = FitsFile::create(path).with_custom_primary(&desc).overwrite().open().map_err(fe)?;
    let hdu = f.primary_hdu().map_err(fe)?;
    hdu.write_image(&mut f, data).map_err(fe)?;
    let s = |v: &str| v.to_string();
    let keys_f: [(&str, f64, &str); 16] = [
        ("MJD-OBS", hdr.mjd, "start of exposure, MJD (TAI)"),
        ("EXPTIME", hdr.exptime, "exposure time, s"),
        ("GAIN", hdr.gain, "e-/ADU"),
        ("RDNOISE", hdr.read_noise, "read noise, e- RMS"),
        ("SATURATE", hdr.saturate, "saturation level, ADU"),
        ("MAGZP", hdr.zero_point, "m = MAGZP - 2.5 log10(flux in ADU)"),
        ("SEEING", hdr.seeing, "PSF FWHM at the frame centre, pixels"),
        ("PSFBETA", hdr.beta, "Moffat beta of the PSF (simulated)"),
        ("SKYLEVEL", hdr.sky, "sky at the frame centre, ADU"),
        ("CRVAL1", hdr.wcs.crval[0], "RA at CRPIX, deg"),
        ("CRVAL2", hdr.wcs.crval[1], "Dec at CRPIX, deg"),
        ("CRPIX1", hdr.wcs.crpix[0], "reference pixel (1-based)"),
        ("CRPIX2", hdr.wcs.crpix[1], "reference pixel (1-based)"),
        ("CD1_1", hdr.wcs.cd[0][0], "deg/pixel"),
        ("CD1_2", hdr.wcs.cd[0][1], "deg/pixel"),
        ("CD2_1", hdr.wcs.cd[1][0], "deg/pixel"),
    ];
    for (k, v, c) in keys_f {
        hdu.write_key(&mut f, k, (v, c)).map_err(fe)?;
    }
    hdu.write_key(&mut f, "CD2_2", (hdr.wcs.cd[1][1], "deg/pixel")).map_err(fe)?;
    let keys_s: [(&str, String, &str); 9] = [
        ("FILTER", s(hdr.band), "band"),
        ("CTYPE1", s("RA---TAN"), ""),
        ("CTYPE2", s("DEC--TAN"), ""),
        ("CUNIT1", s("deg"), ""),
        ("CUNIT2", s("deg"), ""),
        ("RADESYS", s("ICRS"), ""),
        ("BUNIT", s("adu"), ""),
        ("FIELD", s(hdr.field), "field name (manifest)"),
        ("IMAGETYP", s(hdr.image_type), "science or template"),
    ];
    for (k, v, c) in keys_s {
        hdu.write_key(&mut f, k, (v, c)).map_err(fe)?;
    }
    hdu.write_key(&mut f, "EQUINOX", (2000.0f64, "")).map_err(fe)?;
    hdu.write_key(&mut f, "TIMESYS", (s("TAI"), "")).map_err(fe)?;
    if let Some(n) = hdr.ncombine {
        hdu.write_key(&mut f, "NCOMBINE", (n as i64, "epochs in the mean")).map_err(fe)?;
    }
    hdu.write_key(&mut f, "ORIGIN", (s("blink simulate"), "")).map_err(fe)?;
    Ok(())
}

/// Make an Avro object container byte-for-byte reproducible: apache-avro writes a random sync
/// marker and its header metadata in hash-map order. Re-emit the header with the keys sorted and a
/// marker derived from the seed and the frame, and put that marker after every block. Returns
/// `None` on anything that is not a well-formed container (the caller keeps the bytes as they are).
fn reproducible_container(bytes: &[u8], seed: u64, frame: u64) -> Option<Vec<u8>> {
    use rand::RngCore;
    fn read_long(b: &[u8], i: &mut usize) -> Option<i64> {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
    }
    fn write_long(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }
    fn read_bytes<'b>(b: &'b [u8], i: &mut usize) -> Option<&'b [u8]> {
        let n = usize::try_from(read_long(b, i)?).ok()?;
        let s = b.get(*i..i.checked_add(n)?)?;
        *i += n;
        Some(s)
    }
    if !bytes.starts_with(b"Obj\x01") {
        return None;
    }
    let mut i = 4;
    let mut meta: Vec<(&[u8], &[u8])> = Vec::new();
    loop {
        let n = read_long(bytes, &mut i)?;
        if n == 0 {
            break;
        }
        if n < 0 {
            read_long(bytes, &mut i)?; // block size in bytes, unused
        }
        for _ in 0..n.unsigned_abs() {
            meta.push((read_bytes(bytes, &mut i)?, read_bytes(bytes, &mut i)?));
        }
    }
    let old = bytes.get(i..i + 16)?;
    i += 16;
    meta.sort();
    let mut marker = [0u8; 16];
    super::rng_for(seed, 4, frame).fill_bytes(&mut marker);
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(b"Obj\x01");
    write_long(&mut out, meta.len() as i64);
    for (k, v) in &meta {
        write_long(&mut out, k.len() as i64);
        out.extend_from_slice(k);
        write_long(&mut out, v.len() as i64);
        out.extend_from_slice(v);
    }
    write_long(&mut out, 0);
    out.extend_from_slice(&marker);
    while i < bytes.len() {
        let start = i;
        read_long(bytes, &mut i)?; // objects in the block
        let size = usize::try_from(read_long(bytes, &mut i)?).ok()?;
        let end = i.checked_add(size)?;
        out.extend_from_slice(bytes.get(start..end)?);
        if bytes.get(end..end + 16)? != old {
            return None;
        }
        out.extend_from_slice(&marker);
        i = end + 16;
    }
    Some(out)
}

/// Writes a night folder file by file; `finish` writes the manifest last, so a folder with a
/// manifest is complete.
pub struct NightWriter {
    out: PathBuf,
    width: usize,
    height: usize,
    field: String,
    band: String,
    exptime: f64,
    gain: f64,
    read_noise: f64,
    saturate: f64,
    wcs: TanWcs,
    manifest: Manifest,
    truth: BufWriter<File>,
    truth_path: PathBuf,
}

impl NightWriter {
    pub fn create(out: &Path, cfg: &SimConfig) -> Result<NightWriter, NightError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NightError::Io { path, error: source }
        };
        for d in [out.to_path_buf(), out.join("frames"), out.join("templates")] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // A stale manifest would describe a half-written folder.
        let mpath = out.join("manifest.toml");
        if mpath.exists() {
            std::fs::remove_file(&mpath).map_err(io(&mpath))?;
        }
        let truth_path = out.join("truth.csv");
        let mut truth = BufWriter::new(File::create(&truth_path).map_err(io(&truth_path))?);
        writeln!(truth, "{TRUTH_HEADER}").map_err(io(&truth_path))?;
        let mut manifest = Manifest::new(&format!("blink simulate {} (seed {})", env!("CARGO_PKG_VERSION"), cfg.seed));
        manifest.truth = Some("truth.csv".into());
        Ok(NightWriter {
            out: out.to_path_buf(),
            width: cfg.width,
            height: cfg.height,
            field: cfg.field.name.clone(),
            band: cfg.field.band.clone(),
            exptime: cfg.camera.exptime,
            gain: cfg.camera.gain,
            read_noise: cfg.camera.read_noise,
            saturate: cfg.camera.saturate,
            wcs: TanWcs::centred(cfg.field.ra, cfg.field.dec, cfg.field.pixel_scale, cfg.width, cfg.height),
            manifest,
            truth,
            truth_path,
        })
    }

    pub fn template_file(&self) -> String {
        format!("templates/{}-{}.fits", self.field, self.band)
    }

    pub fn write_template(&mut self, t: &Template) -> Result<(), NightError> {
        let file = self.template_file();
        let hdr = Header {
            mjd: t.mjd,
            exptime: self.exptime,
            band: &self.band,
            gain: t.gain,
            read_noise: t.read_noise,
            saturate: self.saturate,
            zero_point: t.zero_point,
            seeing: t.psf.fwhm,
            beta: t.psf.beta,
            wcs: self.wcs,
            field: &self.field,
            image_type: "template",
            sky: t.sky,
            ncombine: Some(t.depth),
        };
        write_fits(&self.out.join(&file), self.width, self.height, &t.image, &hdr)?;
        self.manifest.templates.push(TemplateEntry { file, field: self.field.clone(), band: self.band.clone() });
        Ok(())
    }

    /// Write one science frame and its truth rows; returns its file name inside the folder.
    pub fn write_frame(&mut self, fr: &Frame) -> Result<String, NightError> {
        let file = format!("frames/{}-{}-{:04}.fits", self.field, self.band, fr.index);
        let hdr = Header {
            mjd: fr.mjd,
            exptime: self.exptime,
            band: &self.band,
            gain: self.gain,
            read_noise: self.read_noise,
            saturate: self.saturate,
            zero_point: fr.zero_point,
            seeing: fr.psf.fwhm,
            beta: fr.psf.beta,
            wcs: self.wcs.shifted(fr.dx, fr.dy),
            field: &self.field,
            image_type: "science",
            sky: fr.sky,
            ncombine: None,
        };
        write_fits(&self.out.join(&file), self.width, self.height, &fr.image, &hdr)?;
        for r in &fr.truth {
            self.truth_row(r, &file, fr.mjd_mid)?;
        }
        self.manifest.frames.push(FrameEntry {
            file: file.clone(),
            field: self.field.clone(),
            band: self.band.clone(),
            template: self.template_file(),
            mjd: Some(fr.mjd),
        });
        Ok(file)
    }

    fn truth_row(&mut self, r: &TruthRow, frame: &str, mjd: f64) -> Result<(), NightError> {
        let (ra, dec) = self.wcs.pixel_to_sky(r.x, r.y);
        let opt = |v: Option<f64>, p: usize| v.map(|v| format!("{v:.p$}")).unwrap_or_default();
        writeln!(
            self.truth,
            "{},{},{},{},{:.6},{:.3},{:.3},{:.7},{:.7},{},{:.3},{:.3},{}",
            r.id,
            r.kind,
            r.host.map(|h| h.to_string()).unwrap_or_default(),
            frame,
            mjd,
            r.x,
            r.y,
            ra,
            dec,
            opt(r.mag, 4),
            r.flux,
            r.ref_flux,
            opt(r.snr, 3)
        )
        .map_err(|source| NightError::Io { path: self.truth_path.clone(), error: source })
    }

    /// Write the frame's alerts to `alerts/<frame stem>.avro`; returns how many.
    pub fn write_alerts(&mut self, cfg: &SimConfig, fr: &Frame, tmpl: &Template) -> Result<usize, NightError> {
        let dir = self.out.join("alerts");
        std::fs::create_dir_all(&dir).map_err(|source| NightError::Io { path: dir.clone(), error: source })?;
        let stem = format!("{}-{}-{:04}", self.field, self.band, fr.index);
        let path = dir.join(format!("{stem}.avro"));
        let sim = super::alerts::frame_alerts(cfg, fr, tmpl, &self.wcs.shifted(fr.dx, fr.dy), &stem);
        let alerts: Vec<crate::alert::Alert> = sim.iter().map(|a| a.alert.clone()).collect();
        let recontain = |bytes: Vec<u8>, tag: u64, path: &Path| {
            reproducible_container(&bytes, cfg.seed, tag).ok_or_else(|| NightError::Alerts {
                path: path.to_path_buf(),
                message: "the Avro writer produced a container this code cannot re-emit".into(),
            })
        };
        let zpath = dir.join(format!("{stem}.ztf.avro"));
        let ztf = || -> Result<(), NightError> {
            let diffs: Vec<_> = sim.iter().map(|a| a.difference.clone()).collect();
            let xy: Vec<_> = sim.iter().map(|a| (a.x, a.y)).collect();
            // Unique per night: frame index and truth id.
            let candid: Vec<i64> = sim.iter().map(|a| (fr.index as i64 + 1) * 10_000_000 + a.truth_id as i64).collect();
            let bytes = super::ztf::encode(&alerts, &diffs, &candid, &xy)
                .map_err(|message| NightError::Alerts { path: zpath.clone(), message })?;
            let bytes = recontain(bytes, 1_000_000 + fr.index as u64, &zpath)?;
            std::fs::write(&zpath, bytes).map_err(|source| NightError::Io { path: zpath.clone(), error: source })
        };
        let native = || -> Result<(), NightError> {
            let bytes = crate::decode::encode_native(&alerts)
                .map_err(|e| NightError::Alerts { path: path.clone(), message: e.to_string() })?;
            let bytes = recontain(bytes, fr.index as u64, &path)?;
            std::fs::write(&path, bytes).map_err(|source| NightError::Io { path: path.clone(), error: source })
        };
        // The two encodings (deflate, gzip) are independent: one on another core.
        std::thread::scope(|s| {
            let z = cfg.alerts.ztf.then(|| s.spawn(ztf));
            native()?;
            match z.map(|h| h.join()) {
                Some(Ok(r)) => r,
                Some(Err(_)) => Err(NightError::Alerts { path: zpath.clone(), message: "the ZTF encoding thread panicked".into() }),
                None => Ok(()),
            }
        })?;
        self.manifest.alerts = Some("alerts".into());
        Ok(alerts.len())
    }

    /// Flush the truth table and write the manifest.
    pub fn finish(mut self) -> Result<(), NightError> {
        self.truth.flush().map_err(|source| NightError::Io { path: self.truth_path.clone(), error: source })?;
        let path = self.out.join("manifest.toml");
        std::fs::write(&path, self.manifest.to_toml()).map_err(|source| NightError::Io { path, error: source })
    }
}
