//! PNG plots of `blink bench` frames mode, and the stamp gallery.
//!
//! - `completeness.png`: completeness against |optimal SNR| (log axis), one curve per kind and
//!   `all`, one panel per timescale; each point is a bin with targets, at the bin's centre.
//! - `completeness_mag.png`: the same against injected magnitude (0.5 mag bins).
//! - `false_positives.png`: false positives per frame, stacked by class, frames in manifest
//!   order, with the mean as a dashed line.
//! - `gallery.png` ([`write_gallery`]): one row per stamp, science | template | difference, each
//!   stamp stretched on its own (asinh about the median, scale from the MAD; the difference
//!   symmetric about its median: black negative, white positive); NaN pixels are magenta.
//!
//! Drawing uses `plotters`' bitmap backend and text through `ab_glyph` with DejaVu Sans embedded
//! from `assets/fonts/` (no system font libraries). PNGs are encoded with `image`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::matching::{FpClass, NightMatch};
use super::stats::{Bin, FramesSummary, ALL, KINDS};
use crate::detect::catalog::{flags, Detection};

/// DejaVu Sans (Bitstream Vera licence, `assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// One gallery row: three stamps of `size`×`size` pixels, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GalleryRow {
    /// Shown to the right of the stamps; `\n` starts a new line.
    pub label: String,
    /// Row 0 is the lowest y and is drawn at the bottom (as DS9 shows FITS images).
    pub size: usize,
    pub science: Vec<f32>,
    pub template: Vec<f32>,
    pub difference: Vec<f32>,
}

/// Where the caller should cut a gallery stamp.
#[derive(Debug, Clone, PartialEq)]
pub struct GalleryPick {
    pub frame: String,
    /// Template-grid pixel, 0-based.
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// The three gallery sections.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GalleryPicks {
    /// Matched targets with the highest |score| (at the detection's position).
    pub best: Vec<GalleryPick>,
    /// Missed targets with the highest |optimal SNR| (at the truth position).
    pub missed: Vec<GalleryPick>,
    /// False positives with the highest |score|.
    pub false_positives: Vec<GalleryPick>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Register the embedded font with plotters once per process.
fn font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).map_err(|_| "the embedded font (assets/fonts/DejaVuSans.ttf) is not a valid font".to_string()))
        .clone()
}

/// Choose the stamps to show: up to `n` per section (see [`GalleryPicks`]).
pub fn gallery_picks(m: &NightMatch, dets: &[Detection], n: usize) -> GalleryPicks {
    let score = |i: usize| dets.get(i).map_or(0.0, |d| d.score.abs());
    let mut best: Vec<(usize, usize)> = m.targets.iter().enumerate().filter_map(|(k, t)| t.detection.filter(|&i| i < dets.len()).map(|i| (k, i))).collect();
    best.sort_by(|a, b| score(b.1).total_cmp(&score(a.1)).then(a.0.cmp(&b.0)));
    let best = best
        .into_iter()
        .take(n)
        .map(|(k, i)| {
            let t = &m.targets[k].truth;
            let d = &dets[i];
            GalleryPick {
                frame: d.frame.clone(),
                x: d.x,
                y: d.y,
                label: format!(
                    "{} {}  |snr| {:.1}  score {:.1}\n{} ({:.1}, {:.1})  {:.2} px off",
                    t.kind,
                    t.id,
                    t.snr.unwrap_or(f64::NAN).abs(),
                    d.score,
                    d.frame,
                    d.x,
                    d.y,
                    m.targets[k].distance.unwrap_or(f64::NAN)
                ),
            }
        })
        .collect();

    let snr = |k: usize| m.targets[k].truth.snr.map_or(0.0, f64::abs);
    let mut missed: Vec<usize> = (0..m.targets.len()).filter(|&k| m.targets[k].detection.is_none()).collect();
    missed.sort_by(|&a, &b| snr(b).total_cmp(&snr(a)).then(a.cmp(&b)));
    let missed = missed
        .into_iter()
        .take(n)
        .map(|k| {
            let t = &m.targets[k].truth;
            GalleryPick {
                frame: t.frame.clone(),
                x: t.x,
                y: t.y,
                label: format!("{} {}  |snr| {:.1}  mag {}\n{} ({:.1}, {:.1})", t.kind, t.id, snr(k), t.mag.map_or_else(|| "—".into(), |m| format!("{m:.2}")), t.frame, t.x, t.y),
            }
        })
        .collect();

    let mut fps: Vec<(usize, FpClass)> = m.false_positives.iter().filter(|f| f.detection < dets.len()).map(|f| (f.detection, f.class)).collect();
    fps.sort_by(|a, b| score(b.0).total_cmp(&score(a.0)).then(a.0.cmp(&b.0)));
    let false_positives = fps
        .into_iter()
        .take(n)
        .map(|(i, class)| {
            let d = &dets[i];
            let f = flags::to_names(d.flags);
            GalleryPick {
                frame: d.frame.clone(),
                x: d.x,
                y: d.y,
                label: format!("{}  score {:.1}{}\n{} ({:.1}, {:.1})", class.name().replace('_', " "), d.score, if f.is_empty() { String::new() } else { format!("  [{f}]") }, d.frame, d.x, d.y),
            }
        })
        .collect();
    GalleryPicks { best, missed, false_positives }
}

/// Colour of a kind's curve.
fn kind_colour(kind: &str) -> RGBColor {
    match kind {
        ALL => RGBColor(0, 0, 0),
        "fast" => RGBColor(214, 39, 40),
        "sn" => RGBColor(31, 119, 180),
        "slow" => RGBColor(44, 160, 44),
        "variable" => RGBColor(148, 103, 189),
        _ => RGBColor(127, 127, 127),
    }
}

fn class_colour(c: FpClass) -> RGBColor {
    match c {
        FpClass::OnStar => RGBColor(255, 127, 14),
        FpClass::OnSky => RGBColor(31, 119, 180),
        FpClass::Artifact => RGBColor(127, 127, 127),
    }
}

/// Kinds to draw, `all` first, then the standard kinds, then any other.
fn ordered_kinds<V>(map: &std::collections::BTreeMap<String, V>) -> Vec<&str> {
    let mut v: Vec<&str> = std::iter::once(ALL).chain(KINDS).filter(|k| map.contains_key(*k)).collect();
    v.extend(map.keys().map(String::as_str).filter(|k| *k != ALL && !KINDS.contains(k)));
    v
}

/// Render into an RGB buffer with plotters and write it as PNG.
fn render_png(path: &Path, (w, h): (u32, u32), draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<(), String>) -> Result<(), String> {
    font()?;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(root.clone())?;
        root.present().map_err(err)?;
    }
    save_rgb(path, w, h, buf)
}

fn save_rgb(path: &Path, w: u32, h: u32, buf: Vec<u8>) -> Result<(), String> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| format!("{}: image buffer of the wrong size", path.display()))?;
    img.save_with_format(path, image::ImageFormat::Png).map_err(|e| format!("{}: {e}", path.display()))
}

fn tick(v: f64) -> String {
    if v >= 1.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Draw one completeness panel: curves per kind over bins. `x` maps a bin to its position.
fn completeness_panel<X>(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    x_range: X,
    curves: &[(&str, String, &[Bin])],
    x_of: &dyn Fn(&Bin) -> f64,
) -> Result<(), String>
where
    X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x_range, -0.02f64..1.02f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("completeness")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    let (x0, x1) = {
        let r = chart.x_range();
        (r.start, r.end)
    };
    chart.draw_series(DashedLineSeries::new(vec![(x0, 0.5), (x1, 0.5)], 6, 4, RGBColor(150, 150, 150).stroke_width(1))).map_err(err)?;
    let mut any = false;
    for (kind, legend, bins) in curves {
        let kind = *kind;
        let pts: Vec<(f64, f64)> = bins.iter().filter_map(|b| b.fraction.map(|f| (x_of(b), f))).filter(|p| p.0 >= x0 && p.0 <= x1).collect();
        if pts.is_empty() {
            continue;
        }
        any = true;
        let c = kind_colour(kind);
        let width = if kind == ALL { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(width)))
            .map_err(err)?
            .label(legend.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(width)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(err)?;
    }
    if any {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    } else {
        area.draw(&Text::new("no targets", (area.dim_in_pixel().0 as i32 / 2 - 40, area.dim_in_pixel().1 as i32 / 2), (FAMILY, 20))).map_err(err)?;
    }
    Ok(())
}

const PANEL: (u32, u32) = (900, 560);

/// Legend text of a curve: kind, targets and the 50 % point.
fn legend(kind: &str, n: usize, at_50: Option<String>) -> String {
    match at_50 {
        Some(v) => format!("{kind}: {n} targets, 50% at {v}"),
        None => format!("{kind}: {n} targets"),
    }
}

/// Write `completeness.png`, `completeness_mag.png` and `false_positives.png` into `dir`
/// (created if missing); returns their paths.
pub fn write_plots(dir: &Path, summary: &FramesSummary) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let timescales: Vec<(&String, &super::stats::TimescaleStats)> = summary.timescales.iter().collect();
    let panels = timescales.len().max(1) as u32;
    let size = (PANEL.0 * panels, PANEL.1);
    let mut written = Vec::new();

    let path = dir.join("completeness.png");
    render_png(&path, size, |root| {
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((1, panels as usize));
        if timescales.is_empty() {
            return completeness_panel(&areas[0], "completeness vs |optimal SNR|", "|optimal SNR|", (0.3f64..200f64).log_scale(), &[], &|b| b.centre());
        }
        for ((name, ts), area) in timescales.iter().zip(&areas) {
            let curves: Vec<(&str, String, &[Bin])> = ordered_kinds(&ts.completeness_vs_snr)
                .into_iter()
                .map(|k| {
                    let c = &ts.completeness_vs_snr[k];
                    (k, legend(k, c.n, c.snr_50.map(|v| format!("{v:.1}"))), c.bins.as_slice())
                })
                .collect();
            let caption = format!("completeness vs |optimal SNR| ({name}, {} frames)", ts.frames);
            // The open top bin sits at its lower edge (100); bin [0, 1) at 0.5.
            completeness_panel(area, &caption, "|optimal SNR| (bin centres)", (0.3f64..200f64).log_scale(), &curves, &|b| b.centre())?;
        }
        Ok(())
    })?;
    written.push(path);

    let path = dir.join("completeness_mag.png");
    render_png(&path, size, |root| {
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((1, panels as usize));
        if timescales.is_empty() {
            return completeness_panel(&areas[0], "completeness vs magnitude", "injected magnitude", 15f64..25f64, &[], &|b| b.centre());
        }
        for ((name, ts), area) in timescales.iter().zip(&areas) {
            let all = ts.completeness_vs_mag.get(ALL);
            let lo = all.and_then(|c| c.bins.first()).map_or(15.0, |b| b.lo);
            let hi = all.and_then(|c| c.bins.last()).and_then(|b| b.hi).unwrap_or(lo + 10.0).max(lo + 1.0);
            let curves: Vec<(&str, String, &[Bin])> = ordered_kinds(&ts.completeness_vs_mag)
                .into_iter()
                .map(|k| {
                    let c = &ts.completeness_vs_mag[k];
                    (k, legend(k, c.n, c.mag_50.map(|v| format!("{v:.2}"))), c.bins.as_slice())
                })
                .collect();
            let caption = format!("completeness vs injected magnitude ({name})");
            completeness_panel(area, &caption, "magnitude (0.5 mag bins)", lo..hi, &curves, &|b| b.centre())?;
        }
        Ok(())
    })?;
    written.push(path);

    let path = dir.join("false_positives.png");
    let fp = &summary.false_positives;
    render_png(&path, (1000, 520), |root| {
        root.fill(&WHITE).map_err(err)?;
        let n = fp.per_frame.len();
        let ymax = fp.per_frame.iter().map(|f| f.counts.total).max().unwrap_or(0).max(1) as f64 * 1.15;
        let caption = match fp.per_frame_mean {
            Some(r) => format!("false positives per frame: mean {:.2} (on star {:.2}, on sky {:.2}, artifact {:.2})", r.total, r.on_star, r.on_sky, r.artifact),
            None => "false positives per frame: no frames".to_string(),
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5f64..(n.max(1) as f64 - 0.5), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("frame (manifest order)")
            .y_desc("false positives")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(err)?;
        let half = 0.4;
        for class in FpClass::ALL {
            let c = class_colour(class);
            let bars = fp.per_frame.iter().enumerate().map(|(i, f)| {
                // Stack in FpClass::ALL order: on star at the bottom.
                let below: usize = FpClass::ALL.iter().take_while(|k| **k != class).map(|k| f.counts.get(*k)).sum();
                let x = i as f64;
                Rectangle::new([(x - half, below as f64), (x + half, (below + f.counts.get(class)) as f64)], c.filled())
            });
            chart
                .draw_series(bars)
                .map_err(err)?
                .label(class.name().replace('_', " "))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        }
        if let Some(r) = fp.per_frame_mean {
            chart
                .draw_series(DashedLineSeries::new(vec![(-0.5, r.total), (n as f64 - 0.5, r.total)], 6, 4, BLACK.stroke_width(1)))
                .map_err(err)?
                .label(format!("mean {:.2}", r.total))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK.stroke_width(1)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).label_font((FAMILY, 15)).background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(err)?;
        Ok(())
    })?;
    written.push(path);
    Ok(written)
}

/// Robust centre and scale of the finite pixels: median and 1.4826·MAD.
fn robust(v: &[f32]) -> Option<(f64, f64)> {
    let mut s: Vec<f64> = v.iter().map(|&x| f64::from(x)).filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let med = s[s.len() / 2];
    let mut dev: Vec<f64> = s.iter().map(|x| (x - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    Some((med, 1.4826 * dev[dev.len() / 2]))
}

/// Grey levels (0–255) for a stamp, or None for a non-finite pixel. `symmetric`: about the
/// median (differences), else from median − 2σ up to the maximum.
fn stretch(v: &[f32], symmetric: bool) -> Vec<Option<u8>> {
    let Some((med, sigma)) = robust(v) else { return vec![None; v.len()] };
    let finite = || v.iter().map(|&x| f64::from(x)).filter(|x| x.is_finite());
    let level = |t: f64| Some((t.clamp(0.0, 1.0) * 255.0).round() as u8);
    if symmetric {
        let amax = finite().map(|x| (x - med).abs()).fold(0.0, f64::max);
        let soft = if sigma > 0.0 { 2.0 * sigma } else { (amax / 10.0).max(f64::MIN_POSITIVE) };
        let norm = (amax / soft).asinh().max(f64::MIN_POSITIVE);
        v.iter().map(|&x| if x.is_finite() { level(0.5 + 0.5 * ((f64::from(x) - med) / soft).asinh() / norm) } else { None }).collect()
    } else {
        let lo = med - 2.0 * sigma;
        let hi = finite().fold(f64::MIN, f64::max);
        let soft = if sigma > 0.0 { 3.0 * sigma } else { ((hi - lo) / 10.0).max(f64::MIN_POSITIVE) };
        let norm = ((hi - lo) / soft).asinh().max(f64::MIN_POSITIVE);
        v.iter().map(|&x| if x.is_finite() { level(((f64::from(x) - lo) / soft).asinh() / norm) } else { None }).collect()
    }
}

const MARGIN: u32 = 10;
const GAP: u32 = 10;
const TOP: u32 = 40;
const SECTION: u32 = 34;
const EMPTY_SECTION: u32 = 28;
const LABEL_WIDTH: u32 = 440;
/// Stamps are magnified by an integer factor to about this many screen pixels.
const STAMP_PX: usize = 120;

fn magnification(size: usize) -> usize {
    (STAMP_PX / size.max(1)).max(1)
}

/// Width, height and the stamp cell size of a gallery.
fn gallery_layout(sections: &[(&str, Vec<GalleryRow>)]) -> (u32, u32, u32) {
    let cell = sections.iter().flat_map(|(_, rows)| rows.iter()).map(|r| (r.size * magnification(r.size)).min(4096) as u32).max().unwrap_or(STAMP_PX as u32);
    let width = MARGIN + 3 * (cell + GAP) + LABEL_WIDTH;
    let height = TOP + sections.iter().map(|(_, rows)| SECTION + if rows.is_empty() { EMPTY_SECTION } else { rows.len() as u32 * (cell + GAP) }).sum::<u32>() + MARGIN;
    (width, height, cell)
}

/// Write the stamp gallery: per section a header, then one row per stamp (see module docs).
pub fn write_gallery(path: &Path, sections: &[(&str, Vec<GalleryRow>)]) -> Result<(), String> {
    font()?;
    let (w, h, cell) = gallery_layout(sections);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    let put = |buf: &mut [u8], x: u32, y: u32, rgb: [u8; 3]| {
        if x < w && y < h {
            let i = (y as usize * w as usize + x as usize) * 3;
            buf[i..i + 3].copy_from_slice(&rgb);
        }
    };
    // Pixels first (section bars and stamps), then text over them.
    let mut texts: Vec<(String, u32, u32, u32)> = vec![];
    for (j, name) in ["science", "template", "difference"].iter().enumerate() {
        texts.push((name.to_string(), MARGIN + j as u32 * (cell + GAP), 12, 18));
    }
    let mut y = TOP;
    for (title, rows) in sections {
        for yy in y..y + SECTION - 6 {
            for xx in 0..w {
                put(&mut buf, xx, yy, [228, 232, 240]);
            }
        }
        texts.push((format!("{title} ({})", rows.len()), MARGIN, y + 5, 19));
        y += SECTION;
        if rows.is_empty() {
            texts.push(("(none)".into(), MARGIN, y + 2, 16));
            y += EMPTY_SECTION;
            continue;
        }
        for row in rows {
            let ok = row.size > 0 && [&row.science, &row.template, &row.difference].iter().all(|v| v.len() == row.size * row.size);
            let mag = magnification(row.size);
            for (j, stamp) in [&row.science, &row.template, &row.difference].iter().enumerate() {
                let x0 = MARGIN + j as u32 * (cell + GAP);
                if !ok {
                    for yy in 0..cell {
                        for xx in 0..cell {
                            put(&mut buf, x0 + xx, y + yy, [190, 190, 190]);
                        }
                    }
                    continue;
                }
                let grey = stretch(stamp, j == 2);
                // FITS convention: row 0 at the bottom.
                for (i, g) in grey.iter().enumerate() {
                    let (sx, sy) = (i % row.size, row.size - 1 - i / row.size);
                    let rgb = g.map_or([220, 0, 220], |g| [g, g, g]);
                    for dy in 0..mag {
                        for dx in 0..mag {
                            put(&mut buf, x0 + (sx * mag + dx) as u32, y + (sy * mag + dy) as u32, rgb);
                        }
                    }
                }
            }
            let lx = MARGIN + 3 * (cell + GAP);
            let mut lines: Vec<String> = row.label.lines().map(str::to_string).collect();
            if !ok {
                lines.push(format!("(stamps are not {0}×{0})", row.size));
            }
            for (k, l) in lines.iter().enumerate() {
                texts.push((l.clone(), lx, y + 6 + 22 * k as u32, 16));
            }
            y += cell + GAP;
        }
    }
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        for (t, x, y, size) in &texts {
            root.draw(&Text::new(t.as_str(), (*x as i32, *y as i32 + size.div_ceil(4) as i32), (FAMILY, *size as f64).into_font().color(&BLACK))).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    save_rgb(path, w, h, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matching::tests::night;
    use crate::bench::matching::{match_night, MATCH_RADIUS_PX};
    use crate::bench::stats::summarize;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blink-bench-plots-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn picks_follow_score_and_snr() {
        let (d, t, frames) = night();
        let m = match_night(&d, &t, &frames, MATCH_RADIUS_PX);
        let p = gallery_picks(&m, &d, 2);
        // Best: T10 (score 9) and T9 (8), at the detections' positions.
        assert_eq!(p.best.iter().map(|g| (g.x, g.y)).collect::<Vec<_>>(), vec![(1000.5, 100.0), (900.0, 101.0)]);
        assert!(p.best[0].label.starts_with("variable 3000010"), "{}", p.best[0].label);
        // Missed: T11 (snr 20) then T8 (snr 8), at truth positions.
        assert_eq!(p.missed.iter().map(|g| (g.frame.as_str(), g.x)).collect::<Vec<_>>(), vec![("frames/B.fits", 50.0), ("frames/A.fits", 800.0)]);
        // FPs: the cosmic (score 12) then the near miss (7).
        assert_eq!(p.false_positives.iter().map(|g| g.x).collect::<Vec<_>>(), vec![505.0, 801.6]);
        assert!(p.false_positives[0].label.starts_with("artifact"));
        let none = gallery_picks(&match_night(&[], &[], &[], 1.5), &[], 5);
        assert_eq!(none, GalleryPicks::default());
    }

    #[test]
    fn plots_are_pngs_of_the_expected_size() {
        let (d, t, frames) = night();
        let m = match_night(&d, &t, &frames, MATCH_RADIUS_PX);
        let s = summarize(&m, &d, 5.0);
        let dir = tmp("plots");
        let paths = write_plots(&dir, &s).unwrap();
        let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["completeness.png", "completeness_mag.png", "false_positives.png"]);
        let sizes: Vec<(u32, u32)> = paths.iter().map(|p| image::open(p).unwrap().to_rgb8().dimensions()).collect();
        assert_eq!(sizes, [(900, 560), (900, 560), (1000, 520)]);
        // Something was drawn: the plots are not blank white, and hold the `all` curve's black.
        let img = image::open(&paths[0]).unwrap().to_rgb8();
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 40)).count();
        assert!(dark > 2000, "{dark} dark pixels");
        // The FP plot has the on-sky blue bars.
        let fpimg = image::open(&paths[2]).unwrap().to_rgb8();
        assert!(fpimg.pixels().filter(|p| p.0 == [31, 119, 180]).count() > 1000);

        // Empty summary: still three readable plots.
        let empty = summarize(&match_night(&[], &[], &[], 1.5), &[], 5.0);
        let paths = write_plots(&tmp("empty"), &empty).unwrap();
        assert_eq!(image::open(&paths[0]).unwrap().to_rgb8().dimensions(), (900, 560));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(tmp("empty")).ok();
    }

    #[test]
    fn gallery_layout_and_stretch() {
        let n = 15;
        // A point source in the middle of a flat, slightly noisy background.
        let mut sci: Vec<f32> = (0..n * n).map(|i| 100.0 + (i % 7) as f32).collect();
        sci[7 * n + 7] = 5000.0;
        let tmpl: Vec<f32> = (0..n * n).map(|i| 100.0 + (i % 5) as f32).collect();
        let mut diff: Vec<f32> = sci.iter().zip(&tmpl).map(|(a, b)| a - b).collect();
        diff[0] = f32::NAN;
        let row = GalleryRow { label: "sn 2000001  snr 30\nframes/A.fits (7.0, 7.0)".into(), size: n, science: sci, template: tmpl, difference: diff };
        let bad = GalleryRow { label: "short".into(), size: n, science: vec![0.0; 3], template: vec![], difference: vec![] };
        let sections = vec![("best detections", vec![row.clone(), bad]), ("missed", vec![])];
        let dir = tmp("gallery");
        let path = dir.join("gallery.png");
        write_gallery(&path, &sections).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // 15 px stamps ×8 = 120 px cells; 2 rows, 1 empty section.
        let cell = 120;
        assert_eq!(img.dimensions(), (MARGIN + 3 * (cell + GAP) + LABEL_WIDTH, TOP + SECTION + 2 * (cell + GAP) + SECTION + EMPTY_SECTION + MARGIN));
        // The star is white in the science stamp, the sky darker; NaN is magenta (pixel 0 of
        // the difference is the bottom-left corner).
        let y0 = TOP + SECTION;
        let centre = img.get_pixel(MARGIN + 7 * 8 + 4, y0 + 7 * 8 + 4).0;
        let sky = img.get_pixel(MARGIN + 4, y0 + 4).0;
        assert_eq!(centre, [255, 255, 255]);
        assert!(sky[0] < 200, "{sky:?}");
        let nan = img.get_pixel(MARGIN + 2 * (cell + GAP) + 2, y0 + cell - 3).0;
        assert_eq!(nan, [220, 0, 220]);
        // The bad row is a grey placeholder.
        assert_eq!(img.get_pixel(MARGIN + 5, y0 + cell + GAP + 5).0, [190, 190, 190]);
        std::fs::remove_dir_all(&dir).ok();
        // No rows at all: still a valid image.
        let p2 = tmp("gallery-empty").join("g.png");
        write_gallery(&p2, &[]).unwrap();
        assert!(image::open(&p2).is_ok());
        std::fs::remove_dir_all(p2.parent().unwrap()).ok();
    }
}
