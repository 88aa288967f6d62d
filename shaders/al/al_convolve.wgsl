// al_convolve: a frame convolved with the spatially varying Alard–Lupton kernel, written as
//   out(x, y) = Σ_t m_t(x, y) · (Q_t ⊗ image)(x, y)
// with m_t the monomials of the normalised position (spatial_terms(order) in src/subtract/mod.rs)
// and Q_t one full (2h+1)² kernel per monomial, built on the CPU. CPU twin: src/cpu/al.rs
// (`convolve_terms`); dispatcher: src/gpu/kernels/al.rs. Not prepended with
// shaders/shared/batch.wgsl (its own bindings); build.rs validates it on its own.
//
// One pass handles TERMS monomials (term0 .. term0 + TERMS); more terms are more passes adding
// into `out`. The frame may come in bands of rows: `image` holds frame rows in_y0.., `out` rows
// out_y0 .. out_y0 + out_rows.
//
// A workgroup (TX × TY invocations) makes a tile of TW × TY output pixels, each invocation PX
// neighbours along x. The input tile sits in workgroup memory as vec4s; kernel rows are staged
// one at a time (all TERMS kernels interleaved per tap), so each image tap read feeds
// PX × TERMS multiply-adds, the kernel values being broadcasts. Kernel rows are padded with
// zeros to `taps4` (a multiple of 4) so the window advances by one vec4 per 4 taps. The tile
// holds TILE_ROWS input rows: kernel rows are taken CHUNK at a time (one chunk for h ≤ 9, two
// for h ≤ 19, three up to MAX_HALF), the tile reloaded for each.
//
// Non-finite input pixels enter the tile as 0 and are marked in a bitmask; in a chunk that saw
// any, each invocation checks its pixels' boxes and writes NaN where a box holds a marked pixel
// (WGSL lets an implementation assume no NaN arithmetic, so propagation is not left to the
// multiply).
//
// Kernel rows are double-buffered: row bb + 1 is fetched from `kern` into the other buffer while
// row bb is used, so the global load's latency hides behind the arithmetic and a row costs one
// barrier.
//
// Workgroup memory: 783·16 + 208·16 + 98·4 + 4 = 16252 bytes, under WebGPU's 16 KiB minimum.

// Keep in sync with `AlConvParams` in src/gpu/kernels/al.rs (size checked by a test).
struct AlConvParams {
    width: u32,
    height: u32,
    // Frame row of row 0 of `image`.
    in_y0: u32,
    // Frame rows of `out`: out_y0 .. out_y0 + out_rows.
    out_y0: u32,
    out_rows: u32,
    half: u32,
    // Kernel row length padded to a multiple of 4 (≥ 2h + 1).
    taps4: u32,
    order: u32,
    // First monomial of this pass.
    term0: u32,
    // Offset of this pass's kernels in `kern`, vec4s.
    kern_off: u32,
    // 1: add to `out`; 0: overwrite.
    accumulate: u32,
    // Bits of the NaN written (a uniform, so no NaN constant reaches naga's folding).
    nan_bits: u32,
};

// Keep in sync with the constants of the same names in src/gpu/kernels/al.rs.
const TX: u32 = 16u;
const TY: u32 = 8u;
const TW: u32 = 64u;          // TX * PX, PX = 4
const TERMS: u32 = 6u;
const MAX_HALF: u32 = 24u;
const MAX_TAPS4: u32 = 52u;   // 2 * MAX_HALF + 1 rounded up to 4
const IN_W4: u32 = 29u;       // (TW + MAX_TAPS4) / 4: tile row stride, vec4s
const IN_W: u32 = 116u;       // IN_W4 * 4
const TILE_ROWS: u32 = 27u;
const CHUNK: u32 = 20u;       // kernel rows per tile load: TILE_ROWS - TY + 1
const MASK_WORDS: u32 = 98u;  // ceil(IN_W * TILE_ROWS / 32)
const KROW: u32 = 104u;       // 2 * MAX_TAPS4: one staged kernel row, vec4s

@group(0) @binding(0) var<uniform> prm: AlConvParams;
@group(0) @binding(1) var<storage, read> image: array<f32>;
// Per pass, per kernel row b (flipped: a correlation), per tap a < taps4: two vec4s, terms 0–3
// and terms 4–5 (then two zeros).
@group(0) @binding(2) var<storage, read> kern: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> tile: array<vec4<f32>, 783>;   // IN_W4 * TILE_ROWS
var<workgroup> krow: array<vec4<f32>, 208>;   // 2 * KROW: double-buffered kernel rows
var<workgroup> bad: array<atomic<u32>, 98>;   // MASK_WORDS
var<workgroup> any_bad: atomic<u32>;

// Accumulators of the PX pixels: terms 0–3 in a_j, terms 4–5 in b_j. One kernel row goes
// into r_j / s_j, then into a_j / b_j (blocked summation: the f32 error grows with the taps of
// a row plus the rows, not with their product).
var<private> r0: vec4<f32>;
var<private> r1: vec4<f32>;
var<private> r2: vec4<f32>;
var<private> r3: vec4<f32>;
var<private> s0: vec2<f32>;
var<private> s1: vec2<f32>;
var<private> s2: vec2<f32>;
var<private> s3: vec2<f32>;
var<private> a0: vec4<f32>;
var<private> a1: vec4<f32>;
var<private> a2: vec4<f32>;
var<private> a3: vec4<f32>;
var<private> b0: vec2<f32>;
var<private> b1: vec2<f32>;
var<private> b2: vec2<f32>;
var<private> b3: vec2<f32>;

// One kernel tap (k: terms 0–3, kb.xy: terms 4–5) against the PX pixels' image values.
fn tap(k: vec4<f32>, kb: vec4<f32>, p0: f32, p1: f32, p2: f32, p3: f32) {
    let k2 = kb.xy;
    r0 += k * p0;
    s0 += k2 * p0;
    r1 += k * p1;
    s1 += k2 * p1;
    r2 += k * p2;
    s2 += k2 * p2;
    r3 += k * p3;
    s3 += k2 * p3;
}

// The row sums into the totals.
fn end_row() {
    a0 += r0;
    a1 += r1;
    a2 += r2;
    a3 += r3;
    b0 += s0;
    b1 += s1;
    b2 += s2;
    b3 += s3;
    r0 = vec4<f32>(0.0);
    r1 = vec4<f32>(0.0);
    r2 = vec4<f32>(0.0);
    r3 = vec4<f32>(0.0);
    s0 = vec2<f32>(0.0);
    s1 = vec2<f32>(0.0);
    s2 = vec2<f32>(0.0);
    s3 = vec2<f32>(0.0);
}

// Pixel coordinate mapped to [−1, 1] (`normalised` in src/subtract/mod.rs).
fn normalised(x: u32, n: u32) -> f32 {
    if (n <= 1u) {
        return 0.0;
    }
    return 2.0 * f32(x) / f32(n - 1u) - 1.0;
}

fn ipow(v: f32, e: u32) -> f32 {
    var r = 1.0;
    for (var i = 0u; i < e; i += 1u) {
        r *= v;
    }
    return r;
}

struct Mono {
    m4: vec4<f32>,
    m2: vec2<f32>,
};

// The monomials term0 .. term0 + TERMS at (xn, yn); 0 past the last term of the order.
fn monomials(xn: f32, yn: f32) -> Mono {
    var m = array<f32, 6>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    var t = 0u;
    for (var d = 0u; d <= prm.order; d += 1u) {
        for (var q = 0u; q <= d; q += 1u) {
            if (t >= prm.term0 && t < prm.term0 + TERMS) {
                m[t - prm.term0] = ipow(xn, d - q) * ipow(yn, q);
            }
            t += 1u;
        }
    }
    return Mono(vec4<f32>(m[0], m[1], m[2], m[3]), vec2<f32>(m[4], m[5]));
}

// Whether the part in the tile (nb kernel rows) of the (2h+1)² box of tile pixel (lx, ly) (its
// top-left corner) holds a marked pixel.
fn box_bad(lx: u32, ly: u32, nb: u32) -> bool {
    let side = 2u * prm.half + 1u;
    for (var r = ly; r < ly + nb; r += 1u) {
        for (var c = lx; c < lx + side; c += 1u) {
            let bit = r * IN_W + c;
            if ((atomicLoad(&bad[bit / 32u]) & (1u << (bit % 32u))) != 0u) {
                return true;
            }
        }
    }
    return false;
}

fn emit(lx: u32, ly: u32, x0: u32, y: u32, yn: f32, flagged: bool, a: vec4<f32>, b: vec2<f32>) {
    let x = x0 + lx;
    if (x >= prm.width) {
        return;
    }
    let m = monomials(normalised(x, prm.width), yn);
    var v = dot(a, m.m4) + dot(b, m.m2);
    let o = (y - prm.out_y0) * prm.width + x;
    if (prm.accumulate != 0u) {
        v += out[o];
    }
    if (flagged) {
        v = bitcast<f32>(prm.nan_bits);
    }
    out[o] = v;
}

@compute @workgroup_size(16, 8, 1)
fn al_convolve(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let h = prm.half;
    let side = 2u * h + 1u;
    let cols4 = (TW + prm.taps4) / 4u;
    let groups = prm.taps4 / 4u;
    let lx = 4u * lid.x;
    // Frame position of the pixel under output (0, 0) and kernel tap (0, 0).
    let x0 = i32(wid.x * TW) - i32(h);
    let y0 = i32(prm.out_y0 + wid.y * TY) - i32(h);
    let wmax = i32(prm.width) - 1;
    let hmax = i32(prm.height) - 1;
    end_row();
    a0 = vec4<f32>(0.0);
    a1 = vec4<f32>(0.0);
    a2 = vec4<f32>(0.0);
    a3 = vec4<f32>(0.0);
    b0 = vec2<f32>(0.0);
    b1 = vec2<f32>(0.0);
    b2 = vec2<f32>(0.0);
    b3 = vec2<f32>(0.0);
    // Bit j: pixel j's box holds a non-finite pixel.
    var flags = 0u;
    for (var kb0 = 0u; kb0 < side; kb0 += CHUNK) {
        let nb = min(CHUNK, side - kb0);
        let rows = TY + nb - 1u;
        workgroupBarrier();
        for (var i = tid; i < MASK_WORDS; i += TX * TY) {
            atomicStore(&bad[i], 0u);
        }
        if (tid == 0u) {
            atomicStore(&any_bad, 0u);
        }
        workgroupBarrier();
        // Tile row r is frame row y0 + kb0 + r (clamped: the edge extended).
        for (var i = tid; i < rows * cols4; i += TX * TY) {
            let r = i / cols4;
            let c4 = i % cols4;
            let base = (u32(clamp(y0 + i32(kb0 + r), 0, hmax)) - prm.in_y0) * prm.width;
            var v = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j += 1u) {
                let c = c4 * 4u + j;
                let p = image[base + u32(clamp(x0 + i32(c), 0, wmax))];
                if ((bitcast<u32>(p) & 0x7f800000u) == 0x7f800000u) {
                    let bit = r * IN_W + c;
                    atomicOr(&bad[bit / 32u], 1u << (bit % 32u));
                    atomicStore(&any_bad, 1u);
                } else {
                    v[j] = p;
                }
            }
            tile[r * IN_W4 + c4] = v;
        }
        workgroupBarrier();
        if (atomicLoad(&any_bad) != 0u) {
            for (var j = 0u; j < 4u; j += 1u) {
                if (box_bad(lx + j, lid.y, nb)) {
                    flags |= 1u << j;
                }
            }
        }
        let kw = 2u * prm.taps4;
        if (tid < kw) {
            krow[tid] = kern[prm.kern_off + kb0 * kw + tid];
        }
        workgroupBarrier();
        for (var bb = 0u; bb < nb; bb += 1u) {
            let cur = (bb & 1u) * KROW;
            // The next row: loaded now, stored after this row's arithmetic into the other
            // buffer (which every invocation finished reading before the last barrier).
            let stage = tid < kw && bb + 1u < nb;
            var next = vec4<f32>(0.0);
            if (stage) {
                next = kern[prm.kern_off + (kb0 + bb + 1u) * kw + tid];
            }
            // Pixel j of this invocation, tap a = 4m + i, reads tile column 4·lid.x + j + a: a
            // window of two vec4s, lo (columns 4(lid.x + m) ..) and hi (the next four).
            let trow = (lid.y + bb) * IN_W4 + lid.x;
            var lo = tile[trow];
            for (var m = 0u; m < groups; m += 1u) {
                let hi = tile[trow + m + 1u];
                let k = cur + 8u * m;
                tap(krow[k], krow[k + 1u], lo.x, lo.y, lo.z, lo.w);
                tap(krow[k + 2u], krow[k + 3u], lo.y, lo.z, lo.w, hi.x);
                tap(krow[k + 4u], krow[k + 5u], lo.z, lo.w, hi.x, hi.y);
                tap(krow[k + 6u], krow[k + 7u], lo.w, hi.x, hi.y, hi.z);
                lo = hi;
            }
            end_row();
            if (stage) {
                krow[KROW - cur + tid] = next;
            }
            workgroupBarrier();
        }
    }
    let y = prm.out_y0 + wid.y * TY + lid.y;
    if (y >= prm.out_y0 + prm.out_rows) {
        return;
    }
    let yn = normalised(y, prm.height);
    let xt = wid.x * TW;
    emit(lx, lid.y, xt, y, yn, (flags & 1u) != 0u, a0, b0);
    emit(lx + 1u, lid.y, xt, y, yn, (flags & 2u) != 0u, a1, b1);
    emit(lx + 2u, lid.y, xt, y, yn, (flags & 4u) != 0u, a2, b2);
    emit(lx + 3u, lid.y, xt, y, yn, (flags & 8u) != 0u, a3, b3);
}
