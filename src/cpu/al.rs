//! CPU twin of the Alard–Lupton kernels `shaders/al/al_convolve.wgsl` and
//! `shaders/al/al_gram.wgsl` (dispatchers: `gpu::kernels::al`), in the formulation the GPU uses.
//!
//! **Frame convolution.** A fitted [`KernelSolution`] has coefficients `a_k(x, y) = Σ_t c_{k,t}
//! m_t(x, y)`, `m_t` the monomials of [`spatial_terms`]`(order)` at the normalised position.
//! Instead of convolving with every basis function (`Σ_k a_k · (B_k ⊗ I)`, what
//! [`KernelSolution::convolve`] does separably) the GPU convolves with one full kernel per
//! monomial, `Q_t = Σ_k c_{k,t} B_k` (built here in f64, [`term_kernels`]):
//!
//! ```text
//! out(x, y) = Σ_t m_t(x, y) · (Q_t ⊗ I)(x, y)
//! ```
//!
//! six 2-D convolutions for spatial order 2 instead of 49 separable ones, with each image tap
//! reused for every term. The exact variance of the result, `Σ_uv K(x,y;u,v)² V(x−u, y−v)`, is
//! the same computation with the kernels `R_s = Σ_{t,t'} Q_t ∘ Q_t'` (elementwise products)
//! gathered by the monomial `m_t m_t'` of twice the order ([`variance_kernels`]): 15 terms for
//! order 2. Edges are the edge pixel extended (as [`pad_clamped`]); a non-finite pixel makes
//! every output pixel whose `(2h+1)²` box holds it NaN.
//!
//! **Stamp Gram sums.** For each fitting stamp, `C_k = B_k ⊗ cutout` by direct 2-D convolution
//! with the basis grids, and the weighted sums of every pair of the stamp's columns
//! `[C_0 … C_{nk−1}, background monomials…, science]` ([`StampGram`]), all in f64 here.

use crate::subtract::basis::{pad_clamped, Basis};
use crate::subtract::solve::{GramInput, StampGram};
use crate::subtract::{monomials, normalised, spatial_terms, KernelSolution, SubtractError};

/// The kernels `Q_t = Σ_k c_{k,t} B_k`, one per monomial of [`spatial_terms`]`(sol.spatial_order)`,
/// each `(2h+1)²` in the layout of [`Basis::function`]. A coefficient list shorter than the
/// terms (the constant scale of `a_0`) contributes to the first terms only.
pub fn term_kernels(sol: &KernelSolution) -> Vec<Vec<f64>> {
    let nsp = spatial_terms(sol.spatial_order).len();
    let side = sol.basis.side();
    let mut q = vec![vec![0.0f64; side * side]; nsp];
    for (k, coefs) in sol.kernel.iter().enumerate().take(sol.basis.len()) {
        let grid = sol.basis.function(k);
        for (qt, &c) in q.iter_mut().zip(coefs) {
            if c != 0.0 {
                qt.iter_mut().zip(grid).for_each(|(o, b)| *o += c * b);
            }
        }
    }
    q
}

/// The kernels of the exact convolved variance: `R_s = Σ_{t,t'} Q_t ∘ Q_t'` over the pairs whose
/// monomials multiply to monomial `s` of [`spatial_terms`]`(2 · order)`. Returns `(2 · order,
/// kernels)`.
pub fn variance_kernels(sol: &KernelSolution) -> (usize, Vec<Vec<f64>>) {
    let q = term_kernels(sol);
    let (terms, terms2) = (spatial_terms(sol.spatial_order), spatial_terms(2 * sol.spatial_order));
    let n = q.first().map_or(0, Vec::len);
    let mut r = vec![vec![0.0f64; n]; terms2.len()];
    for (t1, &(p1, q1)) in terms.iter().enumerate() {
        for (t2, &(p2, q2)) in terms.iter().enumerate() {
            if let Some(s) = terms2.iter().position(|&e| e == (p1 + p2, q1 + q2)) {
                for ((o, a), b) in r[s].iter_mut().zip(&q[t1]).zip(&q[t2]) {
                    *o += a * b;
                }
            }
        }
    }
    (2 * sol.spatial_order, r)
}

/// `Σ_t m_t(x, y) · (kernels[t] ⊗ image)(x, y)` with `m_t` the monomials of
/// [`spatial_terms`]`(order)`, by direct 2-D convolution in f64. `kernels` are `(2·half+1)²`
/// each (layout of [`Basis::function`]); at most as many as the terms are used.
pub fn convolve_terms(kernels: &[Vec<f64>], half: usize, order: usize, image: &[f32], w: usize, h: usize) -> Vec<f32> {
    let side = 2 * half + 1;
    let nt = kernels.len().min(spatial_terms(order).len());
    if w == 0 || h == 0 || image.len() != w * h {
        return Vec::new();
    }
    let padded = pad_clamped(image, w, h, half);
    let pw = w + 2 * half;
    let mut out = vec![0.0f32; w * h];
    let mut acc = vec![0.0f64; nt];
    let mut m = Vec::new();
    for y in 0..h {
        for x in 0..w {
            acc.fill(0.0);
            // (K ⊗ I)(x, y) = Σ_{u,v} K(u, v) I(x − u, y − v); padded (x + h − u, y + h − v).
            for v in 0..side {
                let row = &padded[(y + 2 * half - v) * pw..];
                for u in 0..side {
                    let px = row[x + 2 * half - u] as f64;
                    let i = v * side + u;
                    for (a, k) in acc.iter_mut().zip(kernels) {
                        *a += k[i] * px;
                    }
                }
            }
            monomials(order, normalised(x as f64, w), normalised(y as f64, h), &mut m);
            let s: f64 = acc.iter().zip(&m).map(|(a, m)| a * m).sum();
            out[y * w + x] = s as f32;
        }
    }
    out
}

fn check(sol: &KernelSolution, what: &str, len: usize, w: usize, h: usize) -> Result<(), SubtractError> {
    if len != w * h || w == 0 || h == 0 || (w, h) != (sol.width, sol.height) {
        return Err(SubtractError::Shape {
            what: format!("{what} has {len} pixels for a {w}x{h} frame; the kernel was fitted on {}x{}", sol.width, sol.height),
        });
    }
    Ok(())
}

/// The twin of `GpuEngine::al_convolve`: [`KernelSolution::convolve`] as a sum over monomials.
pub fn convolve(sol: &KernelSolution, image: &[f32], w: usize, h: usize) -> Result<Vec<f32>, SubtractError> {
    check(sol, "image to convolve", image.len(), w, h)?;
    Ok(convolve_terms(&term_kernels(sol), sol.half(), sol.spatial_order, image, w, h))
}

/// The twin of `GpuEngine::al_convolve_variance`: the exact `Σ_uv K(x,y;u,v)² V(x−u, y−v)`
/// (where [`KernelSolution::convolve_variance`] approximates the shape of `K²`).
pub fn convolve_variance(sol: &KernelSolution, variance: &[f32], w: usize, h: usize) -> Result<Vec<f32>, SubtractError> {
    check(sol, "variance to convolve", variance.len(), w, h)?;
    let (order2, r) = variance_kernels(sol);
    Ok(convolve_terms(&r, sol.half(), order2, variance, w, h))
}

/// The twin of the GPU stamp Gram sums: per stamp, `C_k = B_k ⊗ cutout` on the stamp by direct
/// 2-D convolution (f64, stored as f32 like the GPU's), then the weighted sums of every pair of
/// columns in f64. `inputs` as [`GramInput`] says; `nbg` background monomials per stamp.
pub fn stamp_grams(basis: &Basis, nbg: usize, inputs: &[GramInput]) -> Result<Vec<StampGram>, SubtractError> {
    let (nk, kh, side) = (basis.len(), basis.half, basis.side());
    inputs
        .iter()
        .map(|g| {
            g.check(basis, nbg)?;
            let (s, cs) = (g.side, g.side + 2 * kh);
            let npix = s * s;
            let mut conv = vec![0.0f32; nk * npix];
            for k in 0..nk {
                let grid = basis.function(k);
                for y in 0..s {
                    for x in 0..s {
                        let mut acc = 0.0f64;
                        for v in 0..side {
                            for u in 0..side {
                                acc += grid[v * side + u] * g.cutout[(y + 2 * kh - v) * cs + x + 2 * kh - u] as f64;
                            }
                        }
                        conv[k * npix + y * s + x] = acc as f32;
                    }
                }
            }
            Ok(StampGram::from_columns(nk, nbg, npix, &conv, g))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subtract::solve::tests_support::random_solution;
    use rand::{Rng, SeedableRng};

    #[test]
    fn terms_formulation_matches_kernel_solution_convolve() {
        let seed = crate::testing::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (w, h) = (41usize, 29usize);
        let sol = random_solution(&mut rng, w, h);
        let img: Vec<f32> = (0..w * h).map(|_| rng.gen_range(0.0..100.0)).collect();
        let want = sol.convolve(&img, w, h).unwrap();
        let got = convolve(&sol, &img, w, h).unwrap();
        let scale = img.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let worst = want.iter().zip(&got).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max) / scale;
        assert!(worst < 1e-5, "seed {seed}: terms vs separable differ by {worst} of max |image|");
        // The exact variance on a flat variance is ΣK² · v.
        let flat = vec![3.0f32; w * h];
        let var = convolve_variance(&sol, &flat, w, h).unwrap();
        for &(x, y) in &[(0usize, 0usize), (20, 14), (40, 28)] {
            let s2: f64 = sol.kernel_at(x as f64, y as f64).iter().map(|v| v * v).sum();
            assert!((var[y * w + x] as f64 / (3.0 * s2) - 1.0).abs() < 1e-5, "seed {seed}: ({x},{y})");
        }
    }
}
