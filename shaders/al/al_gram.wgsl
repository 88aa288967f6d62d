// al_gram: the per-stamp work of the Alard–Lupton fit, for a batch of stamps.
// - `al_stamp_convolve`: C_k = B_k ⊗ cutout on the stamp, for every basis function, by direct
//   2-D convolution with the (flipped) basis grids.
// - `al_stamp_gram`: the weighted sums Σ_i w_i V_a(i) V_b(i), a ≤ b, over the stamp's columns
//   V = [C_0 … C_{nk−1}, background monomials …, science] (packed upper triangle, as
//   `StampGram::sums` in src/subtract/solve.rs).
// CPU twin: src/cpu/al.rs (`stamp_grams`); dispatcher: src/gpu/kernels/al.rs. Not prepended with
// shaders/shared/batch.wgsl; build.rs validates it on its own.
//
// Input per stamp, `in_stride` floats from s · in_stride: the template cutout (cside², cside =
// side + 2h), then the science (npix = side²), √weight (npix), background monomials (nbg · npix).
//
// Sums: each invocation owns up to PAIRS_PER pairs; pixels come in chunks of CH through
// workgroup memory (√w · V, so a pair is a plain dot product); a chunk's 32-term f32 sum is added
// to the pair's total with Kahan compensation: blocked, compensated summation, whose error does
// not grow with the stamp's size.

// Keep in sync with `AlGramParams` in src/gpu/kernels/al.rs (size checked by a test).
struct AlGramParams {
    // Stamps in this dispatch.
    n: u32,
    side: u32,
    cside: u32,
    half: u32,
    nk: u32,
    nbg: u32,
    // nk + nbg + 1.
    ncols: u32,
    npix: u32,
    in_stride: u32,
    // ncols (ncols + 1) / 2.
    pairs: u32,
    // Tiles of STAMP_TILE² output pixels per stamp row: ceil(side / STAMP_TILE).
    tiles_x: u32,
    pad: u32,
};

// Keep in sync with the constants of the same names in src/gpu/kernels/al.rs.
const STAMP_TILE: u32 = 16u;
const GROUP: u32 = 8u;          // basis functions per `al_stamp_convolve` workgroup
const MAX_HALF: u32 = 24u;
const TILE_COLS: u32 = 64u;     // STAMP_TILE + 2 * MAX_HALF
const TILE_ROWS: u32 = 48u;
const CHUNK: u32 = 33u;         // kernel rows per tile load: TILE_ROWS - STAMP_TILE + 1
const GRAM_WG: u32 = 256u;
const MAX_COLS: u32 = 64u;
const PAIRS_PER: u32 = 9u;      // ceil(MAX_COLS (MAX_COLS + 1) / 2 / GRAM_WG)
const CH: u32 = 32u;            // pixels per chunk
const CHP: u32 = 33u;           // chunk stride in workgroup memory (odd: no bank conflicts)

@group(0) @binding(0) var<uniform> prm: AlGramParams;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
// Flipped basis grids: per group of GROUP functions, per row b, per tap a: two vec4s
// (functions 8g .. 8g+3, 8g+4 .. 8g+7; zeros past nk).
@group(0) @binding(2) var<storage, read> basis: array<vec4<f32>>;
// C_k, (stamp · nk + k) · npix + pixel.
@group(0) @binding(3) var<storage, read_write> conv: array<f32>;
// Per stamp, `pairs` sums.
@group(0) @binding(4) var<storage, read_write> sums: array<f32>;

var<workgroup> ctile: array<f32, 3072>;      // TILE_COLS * TILE_ROWS
var<workgroup> krow: array<vec4<f32>, 98>;   // 2 (2 MAX_HALF + 1)
var<workgroup> vals: array<f32, 2112>;       // MAX_COLS * CHP

// Grid (tiles_x², stamps, ceil(nk / GROUP)).
@compute @workgroup_size(16, 16, 1)
fn al_stamp_convolve(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let s = wid.y;
    let g = wid.z;
    let h = prm.half;
    let side = 2u * h + 1u;
    let tw = STAMP_TILE + 2u * h;
    let tx0 = (wid.x % prm.tiles_x) * STAMP_TILE;
    let ty0 = (wid.x / prm.tiles_x) * STAMP_TILE;
    let cut = s * prm.in_stride;
    let cmax = prm.cside - 1u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    // The tile holds TILE_ROWS cutout rows: kernel rows CHUNK at a time.
    for (var kb0 = 0u; kb0 < side; kb0 += CHUNK) {
        let nb = min(CHUNK, side - kb0);
        let rows = STAMP_TILE + nb - 1u;
        workgroupBarrier();
        for (var i = tid; i < rows * tw; i += STAMP_TILE * STAMP_TILE) {
            let r = i / tw;
            let c = i % tw;
            // Past the cutout only for outputs past the stamp, which are not written.
            ctile[r * TILE_COLS + c] = inp[cut + min(ty0 + kb0 + r, cmax) * prm.cside + min(tx0 + c, cmax)];
        }
        for (var bb = 0u; bb < nb; bb += 1u) {
            workgroupBarrier();
            if (tid < 2u * side) {
                krow[tid] = basis[(g * side + kb0 + bb) * side * 2u + tid];
            }
            workgroupBarrier();
            let base = (lid.y + bb) * TILE_COLS + lid.x;
            // One kernel row, then into the totals (blocked summation).
            var row0 = vec4<f32>(0.0);
            var row1 = vec4<f32>(0.0);
            for (var a = 0u; a < side; a += 1u) {
                let v = ctile[base + a];
                row0 += krow[2u * a] * v;
                row1 += krow[2u * a + 1u] * v;
            }
            acc0 += row0;
            acc1 += row1;
        }
    }
    let x = tx0 + lid.x;
    let y = ty0 + lid.y;
    if (x >= prm.side || y >= prm.side) {
        return;
    }
    let o = y * prm.side + x;
    let acc = array<f32, 8>(acc0.x, acc0.y, acc0.z, acc0.w, acc1.x, acc1.y, acc1.z, acc1.w);
    for (var j = 0u; j < GROUP; j += 1u) {
        let k = g * GROUP + j;
        if (k < prm.nk) {
            conv[(s * prm.nk + k) * prm.npix + o] = acc[j];
        }
    }
}

// Grid (stamps, 1, 1).
@compute @workgroup_size(256, 1, 1)
fn al_stamp_gram(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let s = wid.x;
    let nc = prm.ncols;
    let nk = prm.nk;
    let npix = prm.npix;
    // This invocation's pairs (a, b): q = tid + GRAM_WG · r, row a holding nc − a pairs.
    var pa: array<u32, 9>;
    var pb: array<u32, 9>;
    var tot: array<f32, 9>;
    var comp: array<f32, 9>;
    for (var r = 0u; r < PAIRS_PER; r += 1u) {
        var q = tid + GRAM_WG * r;
        var a = 0u;
        while (a < nc && q >= nc - a) {
            q -= nc - a;
            a += 1u;
        }
        pa[r] = min(a, nc - 1u);
        pb[r] = min(a + q, nc - 1u);
        tot[r] = 0.0;
        comp[r] = 0.0;
    }
    let base = s * prm.in_stride + prm.cside * prm.cside;
    let sqw = base + npix;
    let bgm = sqw + npix;
    for (var p0 = 0u; p0 < npix; p0 += CH) {
        workgroupBarrier();
        for (var i = tid; i < nc * CH; i += GRAM_WG) {
            let col = i / CH;
            let p = p0 + i % CH;
            var v = 0.0;
            if (p < npix) {
                if (col < nk) {
                    v = conv[(s * nk + col) * npix + p];
                } else if (col < nc - 1u) {
                    v = inp[bgm + (col - nk) * npix + p];
                } else {
                    v = inp[base + p];
                }
                v *= inp[sqw + p];
            }
            vals[col * CHP + i % CH] = v;
        }
        workgroupBarrier();
        for (var r = 0u; r < PAIRS_PER; r += 1u) {
            if (tid + GRAM_WG * r < prm.pairs) {
                let ia = pa[r] * CHP;
                let ib = pb[r] * CHP;
                var c = 0.0;
                for (var p = 0u; p < CH; p += 1u) {
                    c += vals[ia + p] * vals[ib + p];
                }
                let y = c - comp[r];
                let t = tot[r] + y;
                comp[r] = (t - tot[r]) - y;
                tot[r] = t;
            }
        }
    }
    for (var r = 0u; r < PAIRS_PER; r += 1u) {
        let q = tid + GRAM_WG * r;
        if (q < prm.pairs) {
            sums[s * prm.pairs + q] = tot[r];
        }
    }
}
