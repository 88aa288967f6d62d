//! `blink simulate` against its own claims, reading its output back as a user would (cfitsio,
//! the manifest, the CSV): the sky noise follows gain and read noise; an injected transient's
//! flux comes back from an aperture sum at the truth position; the template is √M quieter than an
//! epoch and its header says so; headers carry every key `docs/night-format.md` requires; the
//! manifest and truth table parse; the same seed gives the same files.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use blink::sim::night::manifest::Manifest;
use blink::sim::night::write::TRUTH_HEADER;
use blink::sim::night::{simulate, SimConfig};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blink-sim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(cfg: &SimConfig, out: &Path) -> Manifest {
    simulate(cfg, out, &mut |_| {}).expect("simulate");
    Manifest::read(out).expect("manifest")
}

/// A field with nothing but sky, read and shot noise.
fn empty_sky(w: usize, h: usize) -> SimConfig {
    let mut c = SimConfig { width: w, height: h, nights: 1, epochs_per_night: 2, seed: 7, ..Default::default() };
    c.stars.per_mpix = 0.0;
    c.galaxies.per_mpix = 0.0;
    c.transients.fast = 0;
    c.transients.sn = 0;
    c.transients.slow = 0;
    c.variables.count = 0;
    c.artifacts.cosmic_rays_per_mpix = 0.0;
    c.artifacts.hot_pixel_fraction = 0.0;
    c.artifacts.bad_column = false;
    c
}

struct Img {
    w: usize,
    h: usize,
    data: Vec<f32>,
    f: fitsio::FitsFile,
}

fn open(path: &Path) -> Img {
    let mut f = fitsio::FitsFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let hdu = f.primary_hdu().expect("primary");
    let w: i64 = hdu.read_key(&mut f, "NAXIS1").expect("NAXIS1");
    let h: i64 = hdu.read_key(&mut f, "NAXIS2").expect("NAXIS2");
    let data: Vec<f32> = hdu.read_image(&mut f).expect("pixels");
    Img { w: w as usize, h: h as usize, data, f }
}

impl Img {
    fn key(&mut self, k: &str) -> f64 {
        let hdu = self.f.primary_hdu().expect("primary");
        hdu.read_key::<f64>(&mut self.f, k).unwrap_or_else(|e| panic!("key {k}: {e}"))
    }
    fn skey(&mut self, k: &str) -> String {
        let hdu = self.f.primary_hdu().expect("primary");
        hdu.read_key::<String>(&mut self.f, k).unwrap_or_else(|e| panic!("key {k}: {e}"))
    }
    fn at(&self, x: usize, y: usize) -> f64 {
        self.data[y * self.w + x] as f64
    }
}

/// Mean of d²/(2 var) over horizontally adjacent pixel pairs (disjoint), where var is the
/// per-pixel variance the header promises at the pair's level: 1 when the noise is as claimed.
/// Pair differences cancel the sky gradient.
fn noise_ratio(img: &mut Img) -> f64 {
    let (g, rn) = (img.key("GAIN"), img.key("RDNOISE"));
    let (mut s, mut n) = (0.0, 0usize);
    for y in 0..img.h {
        for x in (0..img.w - 1).step_by(2) {
            let (a, b) = (img.at(x, y), img.at(x + 1, y));
            let var = 0.5 * (a + b) / g + (rn / g).powi(2);
            s += (a - b).powi(2) / (2.0 * var);
            n += 1;
        }
    }
    s / n as f64
}

#[test]
fn sky_noise_follows_gain_and_read_noise() {
    let out = tmp("noise");
    let m = run(&empty_sky(256, 256), &out);
    assert_eq!(m.frames.len(), 2);
    for fr in &m.frames {
        let mut img = open(&out.join(&fr.file));
        let r = noise_ratio(&mut img);
        // Standard deviation within 2% of sqrt(sky/gain + (rn/gain)²) in ADU.
        assert!((r.sqrt() - 1.0).abs() < 0.02, "{}: noise / expected = {:.4}", fr.file, r.sqrt());
        // And the level is the header's sky (the gradient is a plane through the centre).
        let mean = img.data.iter().map(|&v| v as f64).sum::<f64>() / img.data.len() as f64;
        let sky = img.key("SKYLEVEL");
        assert!((mean / sky - 1.0).abs() < 0.005, "{}: mean {mean} vs SKYLEVEL {sky}", fr.file);
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn template_noise_matches_its_depth() {
    let out = tmp("depth");
    let mut cfg = empty_sky(256, 256);
    cfg.observing.sky_range = [500.0, 500.0];
    cfg.template.depth = 25;
    let m = run(&cfg, &out);
    let mut t = open(&out.join(&m.templates[0].file));
    assert_eq!(t.key("NCOMBINE"), 25.0);
    // The header describes the mean image: its noise is as its GAIN and RDNOISE say...
    let rt = noise_ratio(&mut t);
    assert!((rt.sqrt() - 1.0).abs() < 0.02, "template noise / header's = {:.4}", rt.sqrt());
    // ...which is one epoch's noise over √M.
    let pair_std = |img: &Img| {
        let (mut s, mut n) = (0.0, 0usize);
        for y in 0..img.h {
            for x in (0..img.w - 1).step_by(2) {
                s += (img.at(x, y) - img.at(x + 1, y)).powi(2) / 2.0;
                n += 1;
            }
        }
        (s / n as f64).sqrt()
    };
    let e = open(&out.join(&m.frames[0].file));
    let ratio = pair_std(&e) / pair_std(&t) / 5.0;
    assert!((ratio - 1.0).abs() < 0.03, "epoch noise / (template noise · √M) = {ratio:.4}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn injected_flux_comes_back_from_an_aperture_sum() {
    let out = tmp("flux");
    let mut cfg = empty_sky(400, 400);
    cfg.nights = 8;
    cfg.epochs_per_night = 1;
    cfg.transients.sn = 1;
    cfg.transients.sn_peak_mag = [16.5, 17.5];
    cfg.transients.host_fraction = 0.0;
    let m = run(&cfg, &out);
    let truth = read_truth(&out);
    let sn: Vec<&Row> = truth.iter().filter(|r| r.kind == "sn").collect();
    let (r_ap, r_in, r_out) = (45.0, 55.0, 75.0);
    let mut checked = 0;
    for r in &sn {
        let isolated = sn.iter().all(|o| o.id == r.id || (o.x - r.x).hypot(o.y - r.y) > r_out + r_ap);
        let inside = r.x > r_out && r.y > r_out && r.x < 399.0 - r_out && r.y < 399.0 - r_out;
        if r.flux < 20_000.0 || !isolated || !inside {
            continue;
        }
        let mut img = open(&out.join(&r.frame));
        let (g, rn) = (img.key("GAIN"), img.key("RDNOISE"));
        let mut ring = Vec::new();
        let (mut sum, mut n_ap, mut cx, mut cy) = (0.0, 0usize, 0.0, 0.0);
        for y in 0..img.h {
            for x in 0..img.w {
                let d = (x as f64 - r.x).hypot(y as f64 - r.y);
                if d <= r_ap {
                    sum += img.at(x, y);
                    n_ap += 1;
                } else if (r_in..r_out).contains(&d) {
                    ring.push(img.at(x, y));
                }
            }
        }
        ring.sort_by(f64::total_cmp);
        let sky = ring[ring.len() / 2];
        let flux = sum - sky * n_ap as f64;
        let var = n_ap as f64 * (sky / g + (rn / g).powi(2)) * (1.0 + n_ap as f64 / ring.len() as f64) + r.flux / g;
        let sigma = var.sqrt();
        assert!(r.flux > 10.0 * sigma, "test needs a clear source: flux {} vs σ {sigma}", r.flux);
        assert!((flux - r.flux).abs() < 4.0 * sigma, "{} in {}: measured {flux:.0}, injected {:.0} (σ {sigma:.0})", r.id, r.frame, r.flux);
        // The truth position is the light's centre (0-based pixels).
        for y in (r.y - 8.0) as usize..=(r.y + 8.0) as usize {
            for x in (r.x - 8.0) as usize..=(r.x + 8.0) as usize {
                let v = img.at(x, y) - sky;
                cx += v * x as f64;
                cy += v * y as f64;
            }
        }
        let s: f64 = ((r.y - 8.0) as usize..=(r.y + 8.0) as usize)
            .flat_map(|y| ((r.x - 8.0) as usize..=(r.x + 8.0) as usize).map(move |x| (x, y)))
            .map(|(x, y)| img.at(x, y) - sky)
            .sum();
        assert!((cx / s - r.x).abs() < 0.2 && (cy / s - r.y).abs() < 0.2, "centroid ({}, {}) vs truth ({}, {})", cx / s, cy / s, r.x, r.y);
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} usable epochs of {} SN rows: the test field needs bright isolated SNe", sn.len());
    assert_eq!(m.frames.len(), 8);
    let _ = std::fs::remove_dir_all(&out);
}

#[derive(Debug)]
struct Row {
    id: u64,
    kind: String,
    frame: String,
    x: f64,
    y: f64,
    ra: f64,
    dec: f64,
    flux: f64,
    snr: Option<f64>,
}

fn read_truth(dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(dir.join("truth.csv")).expect("truth.csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(TRUTH_HEADER));
    let cols: Vec<&str> = TRUTH_HEADER.split(',').collect();
    lines
        .map(|l| {
            let v: Vec<&str> = l.split(',').collect();
            assert_eq!(v.len(), cols.len(), "row {l}");
            let f = |i: usize| v[i].parse::<f64>().unwrap_or_else(|e| panic!("{} {:?} in {l}: {e}", cols[i], v[i]));
            Row {
                id: v[0].parse().expect("id"),
                kind: v[1].to_string(),
                frame: v[3].to_string(),
                x: f(5),
                y: f(6),
                ra: f(7),
                dec: f(8),
                flux: f(10),
                snr: (!v[12].is_empty()).then(|| f(12)),
            }
        })
        .collect()
}

/// A small field with everything switched on.
fn busy(seed: u64) -> SimConfig {
    let mut c = SimConfig { width: 192, height: 128, nights: 2, epochs_per_night: 2, seed, ..Default::default() };
    c.stars.per_mpix = 3000.0;
    c.galaxies.per_mpix = 300.0;
    c.transients.fast = 3;
    c.transients.sn = 4;
    c.transients.slow = 30;
    c.variables.count = 3;
    c.artifacts.cosmic_rays_per_mpix = 200.0;
    c.artifacts.hot_pixel_fraction = 1e-3;
    c
}

#[test]
fn headers_carry_every_required_key() {
    let out = tmp("headers");
    let cfg = busy(3);
    let m = run(&cfg, &out);
    let required = [
        "MJD-OBS", "EXPTIME", "GAIN", "RDNOISE", "SATURATE", "MAGZP", "SEEING", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1",
        "CD1_2", "CD2_1", "CD2_2",
    ];
    let files: Vec<(String, Option<f64>)> =
        m.templates.iter().map(|t| (t.file.clone(), None)).chain(m.frames.iter().map(|f| (f.file.clone(), f.mjd))).collect();
    for (i, (file, mjd)) in files.iter().enumerate() {
        let mut img = open(&out.join(file));
        assert_eq!((img.w, img.h), (192, 128), "{file}: NAXIS1 is the width");
        for k in required {
            let v = img.key(k);
            assert!(v.is_finite(), "{file}: {k} = {v}");
        }
        assert_eq!(img.skey("FILTER"), "r");
        assert_eq!(img.skey("CTYPE1"), "RA---TAN");
        assert_eq!(img.skey("CTYPE2"), "DEC--TAN");
        assert!(img.key("SEEING") > 1.0 && img.key("GAIN") > 0.0 && img.key("EXPTIME") == 30.0);
        let sat = img.key("SATURATE");
        assert!(img.data.iter().all(|&v| (v as f64) <= sat && v.is_finite()), "{file}: a pixel above SATURATE");
        if let Some(mjd) = mjd {
            assert!((img.key("MJD-OBS") - mjd).abs() < 1e-8, "{file}: header and manifest MJD");
            assert_eq!(img.skey("IMAGETYP"), "science");
        }
        if i == 0 {
            assert_eq!(img.key("NCOMBINE"), cfg.template.depth as f64);
            assert_eq!(img.skey("IMAGETYP"), "template");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn manifest_and_truth_parse_and_agree() {
    let out = tmp("truth");
    let cfg = busy(4);
    let m = run(&cfg, &out);
    assert_eq!(m.frames.len(), cfg.nights * cfg.epochs_per_night);
    assert_eq!(m.templates.len(), 1);
    assert_eq!(m.truth.as_deref(), Some("truth.csv"));
    for f in &m.frames {
        assert!(out.join(&f.file).is_file(), "{} missing", f.file);
        assert_eq!(f.template, m.templates[0].file);
    }
    let truth = read_truth(&out);
    // The library's reader agrees with this file's own.
    let lib = blink::sim::night::truth::read(&out.join("truth.csv")).expect("truth reader");
    assert_eq!(lib.len(), truth.len());
    for (a, b) in lib.iter().zip(&truth) {
        assert_eq!((a.id, a.kind.as_str(), a.frame.as_str(), a.x, a.snr), (b.id, b.kind.as_str(), b.frame.as_str(), b.x, b.snr));
    }
    let frames: BTreeSet<&str> = m.frames.iter().map(|f| f.file.as_str()).collect();
    let kinds: BTreeSet<&str> = truth.iter().map(|r| r.kind.as_str()).collect();
    for k in ["star", "galaxy", "fast", "sn", "slow", "variable", "cosmic", "hot_pixel", "bad_column"] {
        assert!(kinds.contains(k), "no {k} in truth: {kinds:?}");
    }
    let mut per_frame: HashMap<&str, usize> = HashMap::new();
    for r in &truth {
        assert!(frames.contains(r.frame.as_str()), "truth names unknown frame {}", r.frame);
        *per_frame.entry(&r.frame).or_default() += 1;
        assert!((r.ra - 150.0).abs() < 0.1 && (r.dec - 2.2).abs() < 0.1, "{r:?}");
        assert!(r.flux >= 0.0);
    }
    assert_eq!(per_frame.len(), frames.len(), "every frame has truth rows");
    // Slow transients are made to sit at an optimal SNR of 1.5–3 per epoch at median conditions;
    // epochs scatter about that with seeing and sky.
    let slow: Vec<f64> = truth.iter().filter(|r| r.kind == "slow").filter_map(|r| r.snr).collect();
    assert!(!slow.is_empty());
    let mean = slow.iter().sum::<f64>() / slow.len() as f64;
    assert!((1.3..3.5).contains(&mean), "mean per-epoch SNR of slow transients {mean:.2}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn same_seed_same_files_other_seed_other_pixels() {
    let (a, b, c) = (tmp("seed-a"), tmp("seed-b"), tmp("seed-c"));
    let m = run(&busy(11), &a);
    run(&busy(11), &b);
    run(&busy(12), &c);
    let mut files: Vec<String> = m.frames.iter().map(|f| f.file.clone()).collect();
    files.push(m.templates[0].file.clone());
    for f in &m.frames {
        let stem = Path::new(&f.file).file_stem().and_then(|s| s.to_str()).expect("stem");
        files.push(format!("alerts/{stem}.avro"));
    }
    files.push("truth.csv".into());
    files.push("manifest.toml".into());
    for f in &files {
        let (x, y) = (std::fs::read(a.join(f)).expect("a"), std::fs::read(b.join(f)).expect("b"));
        assert!(x == y, "{f} differs between two runs with the same seed");
    }
    let f0 = &m.frames[0].file;
    assert_ne!(open(&a.join(f0)).data, open(&c.join(f0)).data, "another seed gives other pixels");
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn bad_config_is_refused_with_the_key() {
    let out = tmp("bad");
    let mut cfg = empty_sky(256, 256);
    cfg.observing.beta_range = [4.0, 2.0];
    let e = simulate(&cfg, &out, &mut |_| {}).expect_err("inverted range");
    assert!(e.to_string().contains("beta_range"), "{e}");
    let e = toml::from_str::<SimConfig>("[stars]\ncount = 3\n").expect_err("unknown key");
    assert!(e.to_string().contains("count"), "{e}");
    let ok: SimConfig = toml::from_str("width = 300\n[camera]\ngain = 2.0\n").expect("partial config");
    assert_eq!((ok.width, ok.height, ok.camera.gain, ok.camera.read_noise), (300, 2048, 2.0, 5.0));
}

#[test]
fn alerts_decode_and_match_the_truth() {
    let out = tmp("alerts");
    let cfg = busy(5);
    let m = run(&cfg, &out);
    assert_eq!(m.alerts.as_deref(), Some("alerts"));
    let truth = read_truth(&out);
    let decoder = blink::decode::Decoder::new(blink::decode::DecoderConfig::default()).expect("decoder");
    let mut total = 0;
    for f in &m.frames {
        let stem = Path::new(&f.file).file_stem().and_then(|s| s.to_str()).expect("stem").to_string();
        let alerts: Vec<_> = decoder
            .decode_file(&out.join("alerts").join(format!("{stem}.avro")))
            .expect("alert file")
            .into_iter()
            .map(|a| a.expect("alert decodes"))
            .collect();
        let expected: Vec<&Row> = truth
            .iter()
            .filter(|r| r.frame == f.file)
            .filter(|r| r.kind == "cosmic" || (["fast", "sn", "slow", "variable"].contains(&r.kind.as_str()) && r.snr.unwrap_or(0.0) >= 5.0))
            .collect();
        assert_eq!(alerts.len(), expected.len(), "{}: alerts vs truth rows that should raise one", f.file);
        for a in &alerts {
            let r = expected.iter().find(|r| r.id.to_string() == a.object_id).expect("alert names a truth id");
            assert!((a.ra - r.ra).abs() < 1e-6 && (a.dec - r.dec).abs() < 1e-6, "{}: position", a.alert_id);
            assert_eq!(a.triplet.science.width(), 63);
            if r.kind != "cosmic" {
                assert!((a.candidate.survey_snr.expect("snr") - r.snr.expect("snr")).abs() < 1e-2);
            }
            // The candidate sits at the cutout's centre, within half a pixel.
            assert!((a.candidate.stamp_x - 31.0).abs() <= 0.5 && (a.candidate.stamp_y - 31.0).abs() <= 0.5);
        }
        // The same alerts, ZTF-shaped, read by blink's ZTF decoder.
        let ztf: Vec<_> = decoder
            .decode_file(&out.join("alerts").join(format!("{stem}.ztf.avro")))
            .expect("ZTF alert file")
            .into_iter()
            .map(|a| a.expect("ZTF alert decodes"))
            .collect();
        assert_eq!(ztf.len(), alerts.len(), "{}: ZTF packets vs native alerts", f.file);
        for (z, a) in ztf.iter().zip(&alerts) {
            assert_eq!(z.survey, blink::alert::Survey::Ztf);
            assert_eq!(z.object_id, format!("ZTFsim{}", a.object_id));
            assert!((z.ra - a.ra).abs() < 1e-9 && (z.dec - a.dec).abs() < 1e-9);
            assert!((z.mjd_tai - a.mjd_tai).abs() < 1e-6, "ZTF jd is UTC exposure start: {} vs {}", z.mjd_tai, a.mjd_tai);
            if a.triplet.science.nan_count() == 0 {
                let (dx, dy) = (z.candidate.stamp_x - a.candidate.stamp_x, z.candidate.stamp_y - a.candidate.stamp_y);
                assert!(dx.abs() < 0.01 && dy.abs() < 0.01, "{}: stamp position off by ({dx}, {dy})", a.alert_id);
            }
            if let Some(snr) = a.candidate.survey_snr {
                assert!((z.candidate.survey_snr.expect("sigmapsf") / snr - 1.0).abs() < 1e-4);
            }
            if a.triplet.science.nan_count() == 0 {
                assert_eq!(z.triplet.science.image, a.triplet.science.image, "same science cutout");
            } else {
                assert!(z.triplet.science.width() * z.triplet.science.height() < 63 * 63, "ZTF truncates at the edge");
            }
            assert!(z.triplet.difference.is_some());
        }
        total += alerts.len();
    }
    assert!(total > 0, "no alerts in the busy field");
    let _ = std::fs::remove_dir_all(&out);
}

/// The truth's optimal SNR is what a matched filter on science − template achieves: projecting
/// the actual noise of both images onto the source's PSF, weighted by the claimed variance, gives
/// unit scatter, and Δf·sqrt(Σ P²/V) is the truth's `snr`.
#[test]
fn optimal_snr_matches_the_noise_a_matched_filter_sees() {
    use blink::sim::night::{epoch, field, template, transients};
    let mut cfg = empty_sky(384, 384);
    cfg.nights = 12;
    cfg.epochs_per_night = 1;
    cfg.transients.slow = 25;
    cfg.template.depth = 20;
    let f = field::Field::generate(&cfg);
    let pop = transients::Population::generate(&cfg, &f);
    let t = template::render(&cfg, &f, &pop);
    let (w, h) = (cfg.width, cfg.height);
    let (g, rn) = (cfg.camera.gain, cfg.camera.read_noise);
    let m = cfg.template.depth as f64;
    let mut z = Vec::new();
    for i in 0..cfg.n_epochs() {
        let fr = epoch::render(&cfg, &f, &pop, &t, i);
        let s = 10f64.powf(0.4 * (fr.zero_point - t.zero_point));
        for row in fr.truth.iter().filter(|r| r.kind == "slow") {
            let (x, y) = (row.x + fr.dx, row.y + fr.dy);
            let p = fr.psf.point(x, y, fr.psf.radius_for(fr.psf.fwhm_at(x, y), row.flux));
            let (mut num, mut info) = (0.0, 0.0);
            for sy in 0..p.h {
                for sx in 0..p.w {
                    let (px, py) = (p.x0 + sx as i64, p.y0 + sy as i64);
                    if px < 0 || py < 0 || px >= w as i64 || py >= h as i64 {
                        continue;
                    }
                    let k = py as usize * w + px as usize;
                    let noise = (fr.image[k] - fr.expected[k]) as f64 - s * (t.image[k] - t.expected[k]) as f64;
                    let v = fr.expected[k] as f64 / g + (rn / g).powi(2) + s * s * (t.expected[k] as f64 / (m * g) + (rn / g).powi(2) / m);
                    let pk = p.data[sy * p.w + sx];
                    num += pk * noise / v;
                    info += pk * pk / v;
                }
            }
            let snr = (row.flux - row.ref_flux) * info.sqrt();
            assert!((snr - row.snr.expect("snr")).abs() < 1e-6 * snr.max(1.0), "snr {snr} vs truth {:?}", row.snr);
            // 1.5–3 at median conditions; seeing and sky move single epochs by up to about ×1.7 either way.
            assert!((0.7..5.5).contains(&snr), "slow transient at snr {snr}");
            z.push(num / info.sqrt());
        }
    }
    let n = z.len() as f64;
    let mean = z.iter().sum::<f64>() / n;
    let sd = (z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(n >= 250.0, "{n} measurements");
    assert!(mean.abs() < 4.0 / n.sqrt(), "matched-filter noise mean {mean:.3}");
    assert!((sd - 1.0).abs() < 0.12, "matched-filter noise / claimed = {sd:.3} over {n} measurements");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_puts_every_alert_on_the_topic() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let out = tmp("publish");
    let m = run(&busy(6), &out);
    let mut expected = 0;
    for f in &m.frames {
        let stem = Path::new(&f.file).file_stem().and_then(|s| s.to_str()).expect("stem");
        let path = out.join("alerts").join(format!("{stem}.avro"));
        let bytes = std::fs::read(&path).expect("alerts file");
        expected += blink::source::replay::split_container(&bytes, "test").expect("container").len();
    }
    assert!(expected > 0);
    let kafka = blink::source::kafka::EmbeddedKafka::start(&["sim".into(), "simz".into()], 1).expect("embedded kafka");
    let brokers = kafka.bootstrap_servers();
    let n = blink::cli::simulate::publish(&out, &brokers, "sim", false).await.expect("publish");
    assert_eq!(n, expected);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("consumer");
    let (lo, hi) = consumer.fetch_watermarks("sim", 0, std::time::Duration::from_secs(10)).expect("watermarks");
    assert_eq!((hi - lo) as usize, expected, "messages on the topic");
    let nz = blink::cli::simulate::publish(&out, &brokers, "simz", true).await.expect("publish ZTF");
    assert_eq!(nz, expected, "one ZTF packet per alert");
    let (lo, hi) = consumer.fetch_watermarks("simz", 0, std::time::Duration::from_secs(10)).expect("watermarks");
    assert_eq!((hi - lo) as usize, expected, "ZTF packets on the topic");
    let _ = std::fs::remove_dir_all(&out);
}

/// With registration jitter on, a frame's WCS follows its pixels: the source sits at the truth
/// position (template grid) plus the frame's CRPIX offset from the template's.
#[test]
fn jittered_frames_carry_their_offset_in_the_wcs() {
    let out = tmp("jitter");
    let mut cfg = empty_sky(200, 200);
    cfg.nights = 6;
    cfg.epochs_per_night = 1;
    cfg.observing.jitter_px = 0.5;
    cfg.observing.fwhm_variation = 0.0;
    // A steady star, present in every frame.
    cfg.variables.count = 1;
    cfg.variables.mag_range = [15.5, 15.5];
    cfg.variables.amplitude = [0.0, 0.0];
    let m = run(&cfg, &out);
    let mut t = open(&out.join(&m.templates[0].file));
    let (tx, ty) = (t.key("CRPIX1"), t.key("CRPIX2"));
    let truth = read_truth(&out);
    let mut offsets = Vec::new();
    for r in truth.iter().filter(|r| r.kind == "variable") {
        let mut img = open(&out.join(&r.frame));
        let (dx, dy) = (img.key("CRPIX1") - tx, img.key("CRPIX2") - ty);
        let sky = img.key("SKYLEVEL");
        let (mut s, mut sx, mut sy) = (0.0, 0.0, 0.0);
        assert!(r.x > 10.0 && r.y > 10.0 && r.x < 189.0 && r.y < 189.0, "the star must be away from the edges: {r:?}");
        let (x0, y0) = (r.x.round() as usize, r.y.round() as usize);
        for y in y0 - 10..=y0 + 10 {
            for x in x0 - 10..=x0 + 10 {
                let v = img.at(x, y) - sky;
                (s, sx, sy) = (s + v, sx + v * x as f64, sy + v * y as f64);
            }
        }
        let (cx, cy) = (sx / s - r.x, sy / s - r.y);
        assert!((cx - dx).abs() < 0.1 && (cy - dy).abs() < 0.1, "{}: light offset ({cx:.3}, {cy:.3}) vs CRPIX offset ({dx:.3}, {dy:.3})", r.frame);
        offsets.push(dx.abs().max(dy.abs()));
    }
    assert_eq!(offsets.len(), 6);
    assert!(offsets.iter().any(|&o| o > 0.1), "jitter moved nothing: {offsets:?}");
    let _ = std::fs::remove_dir_all(&out);
}
