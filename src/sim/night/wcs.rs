//! The celestial WCS the simulated frames carry: a gnomonic (TAN) projection with a CD matrix,
//! north up and east left (RA grows towards −x), as most survey frames are written.

/// A TAN projection: `crpix` is 1-based (FITS), `cd` in degrees per pixel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TanWcs {
    pub crval: [f64; 2],
    pub crpix: [f64; 2],
    pub cd: [[f64; 2]; 2],
}

impl TanWcs {
    /// Centred on a `width`×`height` frame at (ra, dec) degrees, `scale` arcsec per pixel.
    pub fn centred(ra: f64, dec: f64, scale: f64, width: usize, height: usize) -> TanWcs {
        let s = scale / 3600.0;
        TanWcs {
            crval: [ra, dec],
            crpix: [(width as f64 + 1.0) / 2.0, (height as f64 + 1.0) / 2.0],
            cd: [[-s, 0.0], [0.0, s]],
        }
    }

    /// The same sky on a grid shifted by (dx, dy) pixels (a source at template pixel x lies at
    /// x + dx in the shifted frame).
    pub fn shifted(&self, dx: f64, dy: f64) -> TanWcs {
        TanWcs { crpix: [self.crpix[0] + dx, self.crpix[1] + dy], ..*self }
    }

    /// (ra, dec) in degrees of the 0-based pixel position (x, y).
    pub fn pixel_to_sky(&self, x: f64, y: f64) -> (f64, f64) {
        let (px, py) = (x + 1.0 - self.crpix[0], y + 1.0 - self.crpix[1]);
        let xi = (self.cd[0][0] * px + self.cd[0][1] * py).to_radians();
        let eta = (self.cd[1][0] * px + self.cd[1][1] * py).to_radians();
        let (ra0, dec0) = (self.crval[0].to_radians(), self.crval[1].to_radians());
        let den = dec0.cos() - eta * dec0.sin();
        let ra = ra0 + xi.atan2(den);
        let dec = (eta * dec0.cos() + dec0.sin()).atan2((xi * xi + den * den).sqrt());
        (ra.to_degrees().rem_euclid(360.0), dec.to_degrees())
    }

    /// The 0-based pixel position of (ra, dec) in degrees; `None` on the far side of the sky or
    /// with a singular CD matrix.
    pub fn sky_to_pixel(&self, ra: f64, dec: f64) -> Option<(f64, f64)> {
        let (ra, dec) = (ra.to_radians(), dec.to_radians());
        let (ra0, dec0) = (self.crval[0].to_radians(), self.crval[1].to_radians());
        let cosc = dec0.sin() * dec.sin() + dec0.cos() * dec.cos() * (ra - ra0).cos();
        if !(cosc > 0.0) {
            return None;
        }
        let xi = (dec.cos() * (ra - ra0).sin() / cosc).to_degrees();
        let eta = ((dec0.cos() * dec.sin() - dec0.sin() * dec.cos() * (ra - ra0).cos()) / cosc).to_degrees();
        let [[a, b], [c, d]] = self.cd;
        let det = a * d - b * c;
        if !(det.abs() > 0.0) {
            return None;
        }
        let px = (d * xi - b * eta) / det;
        let py = (-c * xi + a * eta) / det;
        Some((px + self.crpix[0] - 1.0, py + self.crpix[1] - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_and_directions() {
        let w = TanWcs::centred(150.0, 2.2, 1.0, 101, 101);
        let (ra, dec) = w.pixel_to_sky(50.0, 50.0);
        assert!((ra - 150.0).abs() < 1e-12 && (dec - 2.2).abs() < 1e-12);
        let (ra2, dec2) = w.pixel_to_sky(60.0, 50.0);
        assert!(ra2 < ra, "east is left");
        assert!((dec2 - dec).abs() < 1e-6);
        let (_, dec3) = w.pixel_to_sky(50.0, 86.0);
        assert!((dec3 - dec - 36.0 / 3600.0).abs() < 1e-8);
        for (x, y) in [(0.0, 0.0), (100.0, 3.5), (-20.0, 80.25)] {
            let (r, d) = w.pixel_to_sky(x, y);
            let (bx, by) = w.sky_to_pixel(r, d).unwrap();
            assert!((bx - x).abs() < 1e-7 && (by - y).abs() < 1e-7, "{x},{y} -> {bx},{by}");
        }
    }
}
