// frame_score: the matched filter of a whole difference image (method step 4 of
// src/detect/frame.rs): with P the scoring profile,
//   num = P ⋆ (D/V),  den = P² ⋆ (1/V)        (over pixels with V > 0, zero outside the frame)
//   score = num / √den / inflate,  flux = num / den,  err = inflate / √den   (where kept)
//   score = 0, flux = 0, err = +∞                                        (elsewhere)
// CPU twin: `cpu::frame::score` (src/cpu/frame.rs); dispatcher: src/gpu/kernels/frame.rs. Not
// prepended with shaders/shared/batch.wgsl (its own bindings).
//
// Two routes, f32 throughout, each with the rules of the CPU code it stands for:
// - separable P = g ⊗ g (the Gaussian of `detect::frame::score_image`): `score_rows` correlates
//   each row with g and g² (taps in the uniform `taps`), `score_cols` the columns and finishes;
//   a pixel is kept where den > 0.
// - any odd square P (an empirical PSF, `detect::psf::matched_filter`): `score_prep` writes
//   (D/V, 1/V) once (0 where V is not > 0 or D not finite), `score_full` correlates them with
//   P and P² directly, `score_reduce` takes the
//   largest den, `score_finish` keeps a pixel where its own V > 0 and den > f1 · max den
//   (`cpu::frame::DEN_FLOOR`).
// Storage bindings s0..s3 play a role per entry point (named at each); at most 4 are bound, as
// GL allows.

// FrameParams `prm`, WG_X/WG_Y/MAX_TAPS and the uniform `taps` come from
// shaders/frame/shared/frame_params.wgsl, prepended.
// `taps` here: 1-D taps g of the separable route (4 per vec4).
@group(0) @binding(2) var<storage, read_write> s0: array<f32>;
@group(0) @binding(3) var<storage, read_write> s1: array<f32>;
@group(0) @binding(4) var<storage, read_write> s2: array<f32>;
@group(0) @binding(5) var<storage, read_write> s3: array<f32>;

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn tap(j: u32) -> f32 {
    return taps[j / 4u][j % 4u];
}

// score, flux, err from (num, den) into s1, s2, s3 at pixel i, kept where den > floor;
// f0 = inflate.
fn finish(i: u32, num: f32, den: f32, lim: f32) {
    if (den > lim) {
        let sd = sqrt(den);
        s1[i] = num / sd / prm.f0;
        s2[i] = num / den;
        s3[i] = prm.f0 / sd;
    } else {
        s1[i] = 0.0;
        s2[i] = 0.0;
        s3[i] = bitcast<f32>(prm.inf_bits);
    }
}

// s0 = D, s1 = V, s2 = rows (num, den interleaved, 2 per pixel); radius r, 2r + 1 taps.
@compute @workgroup_size(16, 16, 1)
fn score_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = prm.width;
    if (id.x >= w || id.y >= prm.height) {
        return;
    }
    let r = i32(prm.radius);
    let x = i32(id.x);
    let row = id.y * w;
    let lo = max(x - r, 0);
    let hi = min(x + r, i32(w) - 1);
    var sn = 0.0;
    var sd = 0.0;
    for (var j = lo; j <= hi; j++) {
        let v = s1[row + u32(j)];
        if (v > 0.0) {
            let g = tap(u32(j - x + r));
            sn += g * (s0[row + u32(j)] / v);
            sd += g * g / v;
        }
    }
    let o = 2u * (row + id.x);
    s2[o] = sn;
    s2[o + 1u] = sd;
}

// s0 = rows from `score_rows`; s1, s2, s3 = score, flux, err.
@compute @workgroup_size(16, 16, 1)
fn score_cols(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = prm.width;
    let h = prm.height;
    if (id.x >= w || id.y >= h) {
        return;
    }
    let r = i32(prm.radius);
    let y = i32(id.y);
    let lo = max(y - r, 0);
    let hi = min(y + r, i32(h) - 1);
    var num = 0.0;
    var den = 0.0;
    for (var j = lo; j <= hi; j++) {
        let g = tap(u32(j - y + r));
        let o = 2u * (u32(j) * w + id.x);
        num += g * s0[o];
        den += g * g * s0[o + 1u];
    }
    finish(id.y * w + id.x, num, den, 0.0);
}

var<workgroup> wmax: array<f32, 256>;

// s0 = D, s1 = V, s2 = (D/V, 1/V) interleaved, 0 where V is not > 0 or D not finite.
@compute @workgroup_size(16, 16, 1)
fn score_prep(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let i = id.y * prm.width + id.x;
    let v = s1[i];
    let d = s0[i];
    var a = 0.0;
    var b = 0.0;
    if (v > 0.0 && finite(d)) {
        a = d / v;
        b = 1.0 / v;
    }
    s2[2u * i] = a;
    s2[2u * i + 1u] = b;
}

// s0 = (D/V, 1/V) from `score_prep`; s2 = (num, den) interleaved (den 0 where the pixel's own
// 1/V is not > 0), then from 2·N the largest den of each workgroup; s3 = P (side², row-major,
// P[(v + r)·side + u + r] weighs the pixel at offset (u, v)). `count` = workgroups along x.
@compute @workgroup_size(16, 16, 1)
fn score_full(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = prm.width;
    let h = prm.height;
    var den = 0.0;
    if (id.x < w && id.y < h) {
        let r = i32(prm.radius);
        let side = prm.side;
        let x = i32(id.x);
        let y = i32(id.y);
        let x0 = max(x - r, 0);
        let x1 = min(x + r, i32(w) - 1);
        let y0 = max(y - r, 0);
        let y1 = min(y + r, i32(h) - 1);
        var num = 0.0;
        for (var yy = y0; yy <= y1; yy++) {
            let prow = u32(yy - y + r) * side;
            let irow = u32(yy) * w;
            for (var xx = x0; xx <= x1; xx++) {
                let k = 2u * (irow + u32(xx));
                let p = s3[prow + u32(xx - x + r)];
                num += p * s0[k];
                den += p * p * s0[k + 1u];
            }
        }
        let i = id.y * w + id.x;
        let own = s0[2u * i + 1u] > 0.0;
        s2[2u * i] = num;
        s2[2u * i + 1u] = select(0.0, den, own);
    }
    wmax[lid] = den;
    workgroupBarrier();
    for (var step = 128u; step > 0u; step = step / 2u) {
        if (lid < step) {
            wmax[lid] = max(wmax[lid], wmax[lid + step]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        s2[2u * w * h + wg.y * prm.count + wg.x] = wmax[0];
    }
}

// One workgroup: s2[2N + groups] = the largest of the `mx` per-workgroup maxima of `score_full`.
@compute @workgroup_size(256, 1, 1)
fn score_reduce(@builtin(local_invocation_index) lid: u32) {
    let base = 2u * prm.width * prm.height;
    var m = 0.0;
    for (var j = lid; j < prm.mx; j += 256u) {
        m = max(m, s2[base + j]);
    }
    wmax[lid] = m;
    workgroupBarrier();
    for (var step = 128u; step > 0u; step = step / 2u) {
        if (lid < step) {
            wmax[lid] = max(wmax[lid], wmax[lid + step]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        s2[base + prm.mx] = wmax[0];
    }
}

// s0 = the buffer `score_full` and `score_reduce` wrote (N·2 + mx + 1); s1, s2, s3 = score,
// flux, err.
@compute @workgroup_size(16, 16, 1)
fn score_finish(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let n2 = 2u * prm.width * prm.height;
    let lim = prm.f1 * s0[n2 + prm.mx];
    let i = id.y * prm.width + id.x;
    finish(i, s0[2u * i], s0[2u * i + 1u], lim);
}
