//! Sky cells for positional matching: HEALPix, NESTED scheme (cdshealpix).
//!
//! Objects are indexed by their depth-[`INDEX_DEPTH`] cell (~12.9 arcsec). A cone search takes
//! the cell holding the position plus its 8 neighbours, at the deepest depth where a disk of the
//! match radius cannot reach past them (`cdshealpix::best_starting_depth`, capped at the index
//! depth). In the NESTED scheme a coarser cell is one contiguous range of index cells, so every
//! radius comes down to at most 9 range scans; a match across a cell edge is found because the
//! neighbours are scanned.

use cdshealpix::nested;

/// Depth of the sky index: 12·4¹⁴ cells of ~12.9 arcsec (~3.9e-9 sr each).
pub const INDEX_DEPTH: u8 = 14;
/// Depth of the cell that names an object matched by position only (~0.4 mas).
pub(crate) const KEY_DEPTH: u8 = 29;

fn lon_lat(ra_deg: f64, dec_deg: f64) -> (f64, f64) {
    (ra_deg.rem_euclid(360.0).to_radians(), dec_deg.clamp(-90.0, 90.0).to_radians())
}

/// The NESTED cell at `depth` holding a position (degrees).
pub(crate) fn cell(depth: u8, ra_deg: f64, dec_deg: f64) -> u64 {
    let (lon, lat) = lon_lat(ra_deg, dec_deg);
    nested::get(depth).hash(lon, lat)
}

/// Ranges `[lo, hi)` of depth-[`INDEX_DEPTH`] cells that together cover every point within
/// `radius_rad` of the position. `radius_rad` must be below ~48° (the config keeps it ≤ 1°).
pub(crate) fn cone_ranges(ra_deg: f64, dec_deg: f64, radius_rad: f64) -> Vec<(u64, u64)> {
    let depth = if cdshealpix::has_best_starting_depth(radius_rad) {
        cdshealpix::best_starting_depth(radius_rad).min(INDEX_DEPTH)
    } else {
        0
    };
    let (lon, lat) = lon_lat(ra_deg, dec_deg);
    let layer = nested::get(depth);
    let shift = 2 * u32::from(INDEX_DEPTH - depth);
    let mut cells = layer.neighbours(layer.hash(lon, lat), true).values_vec();
    if depth == 0 {
        cells = (0..12).collect();
    }
    cells.sort_unstable();
    cells.dedup();
    cells.into_iter().map(|c| (c << shift, (c + 1) << shift)).collect()
}

/// Angular distance between two positions (degrees in), radians.
pub(crate) fn distance_rad(ra1: f64, dec1: f64, ra2: f64, dec2: f64) -> f64 {
    let (l1, b1) = lon_lat(ra1, dec1);
    let (l2, b2) = lon_lat(ra2, dec2);
    cdshealpix::haversine_dist(l1, b1, l2, b2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    const ARCSEC: f64 = std::f64::consts::PI / (180.0 * 3600.0);

    /// Every point within the radius falls in one of the ranges, wherever the centre is
    /// (cell edges, base-cell corners, poles) and for radii from 0.1 arcsec to 1 degree.
    #[test]
    fn cone_ranges_cover_the_disk() {
        let mut rng = crate::testing::rng();
        for _ in 0..2000 {
            let radius = 10f64.powf(rng.gen_range(-1.0..3.56)) * ARCSEC;
            let (ra, dec) = if rng.gen_bool(0.2) {
                // A cell corner: the hardest place.
                let c = rng.gen_range(0..nested::n_hash(INDEX_DEPTH));
                let (l, b) = nested::vertices(INDEX_DEPTH, c)[rng.gen_range(0..4)];
                (l.to_degrees(), b.to_degrees())
            } else {
                (rng.gen_range(0.0..360.0), rng.gen_range(-90.0f64..90.0))
            };
            let ranges = cone_ranges(ra, dec, radius);
            assert!(ranges.len() <= 12);
            for _ in 0..20 {
                // A point at distance < radius in a random direction (small-angle offset).
                let (d, pa) = (radius * rng.gen_range(0.0..0.999), rng.gen_range(0.0..std::f64::consts::TAU));
                let dec2 = dec + (d * pa.cos()).to_degrees();
                if !(-90.0..=90.0).contains(&dec2) {
                    continue;
                }
                let ra2 = ra + (d * pa.sin()).to_degrees() / dec.to_radians().cos().max(1e-9);
                if distance_rad(ra, dec, ra2, dec2) >= radius {
                    continue;
                }
                let c = cell(INDEX_DEPTH, ra2, dec2);
                assert!(
                    ranges.iter().any(|(lo, hi)| (*lo..*hi).contains(&c)),
                    "({ra2}, {dec2}) within {} arcsec of ({ra}, {dec}) is in cell {c}, outside {ranges:?}",
                    radius / ARCSEC
                );
            }
        }
    }

    #[test]
    fn index_cells_are_a_few_arcsec() {
        let side = (4.0 * std::f64::consts::PI / nested::n_hash(INDEX_DEPTH) as f64).sqrt() / ARCSEC;
        assert!((10.0..15.0).contains(&side), "{side}");
        assert!((distance_rad(10.0, 20.0, 10.0, 20.0 + 1.0 / 3600.0) / ARCSEC - 1.0).abs() < 1e-6);
    }
}
