// fit: per stamp, weighted least squares science ≈ a·T' + b, weights = fit weight /
// (science_var + T'var), one workgroup per stamp with shared-memory reductions (means first,
// then centred sums), the 2x2 solved here. With `fixed_scale` > 0, a = fixed_scale and
// b = my − a·mx (the weighted mean of S − a·T'). Singular (flat T') → a = 1, b = median(S − T') by
// bisection; no usable pixel → a = 1, b = 0. CPU twin: src/cpu/fit.rs; dispatcher:
// src/gpu/kernels/fit.rs.
// Shared declarations (BatchParams, StampGpu, planes, bindings): shaders/shared/batch.wgsl,
// prepended when the module is built (src/gpu/kernels/mod.rs `shader_source`, build.rs).

// Keep in sync with `SINGULAR_REL` in src/cpu/fit.rs (f32 here, so it rounds the same way).
const SINGULAR_REL: f32 = 1e-12;
const MEDIAN_STEPS: u32 = 48u;
const STATUS_SOLVED: u32 = 0u;
const STATUS_SINGULAR: u32 = 1u;
const STATUS_EMPTY: u32 = 2u;

var<workgroup> r0: array<f32, WG>;
var<workgroup> r1: array<f32, WG>;
var<workgroup> r2: array<f32, WG>;
var<workgroup> r3: array<f32, WG>;
var<workgroup> status: u32;

// Sums r0..r3 into element 0. Call from uniform control flow.
fn reduce_sum(lid: u32) {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            r0[lid] += r0[lid + stride];
            r1[lid] += r1[lid + stride];
            r2[lid] += r2[lid + stride];
            r3[lid] += r3[lid + stride];
        }
    }
    workgroupBarrier();
}

// Minimum of r0 and maximum of r1 into element 0.
fn reduce_min_max(lid: u32) {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            r0[lid] = min(r0[lid], r0[lid + stride]);
            r1[lid] = max(r1[lid], r1[lid + stride]);
        }
    }
    workgroupBarrier();
}

// The pixel's fit weight (0 when it stays out of the fit).
fn fit_weight(s: u32, i: u32, st: StampGpu) -> f32 {
    let m = pix[plane(PIX_WEIGHT, s) + i];
    let v = pix[plane(PIX_SCIENCE_VAR, s) + i] + work[plane(WORK_CONV_V, s) + i];
    let dx = f32(i % batch.width) - st.cand_x;
    let dy = f32(i / batch.width) - st.cand_y;
    if (m > 0.0 && v > 0.0 && dx * dx + dy * dy >= st.fit_radius * st.fit_radius) {
        return m / v;
    }
    return 0.0;
}

@compute @workgroup_size(WG)
fn fit(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let s = wid.x;
    if (s >= batch.n) {
        return;
    }
    let st = stamps[s];
    let pt = plane(WORK_CONV_T, s);
    let ps = plane(PIX_SCIENCE, s);

    // Pass 1: Σw, Σw·x, Σw·y and the pixel count.
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    for (var i = lid; i < batch.npix; i += WG) {
        let w = fit_weight(s, i, st);
        if (w > 0.0) {
            a0 += w;
            a1 += w * work[pt + i];
            a2 += w * pix[ps + i];
            a3 += 1.0;
        }
    }
    r0[lid] = a0;
    r1[lid] = a1;
    r2[lid] = a2;
    r3[lid] = a3;
    reduce_sum(lid);
    let sw = r0[0];
    let mx = r1[0] / sw;
    let my = r2[0] / sw;
    let count = r3[0];
    workgroupBarrier();

    // Pass 2: centred Σw·(x−mx)², Σw·(x−mx)(y−my).
    var c0 = 0.0;
    var c1 = 0.0;
    if (sw > 0.0) {
        for (var i = lid; i < batch.npix; i += WG) {
            let w = fit_weight(s, i, st);
            if (w > 0.0) {
                let dx = work[pt + i] - mx;
                c0 += w * dx * dx;
                c1 += w * dx * (pix[ps + i] - my);
            }
        }
    }
    r0[lid] = c0;
    r1[lid] = c1;
    r2[lid] = 0.0;
    r3[lid] = 0.0;
    reduce_sum(lid);
    let sxx = r0[0];
    let sxy = r1[0];
    workgroupBarrier();

    if (lid == 0u) {
        var code = STATUS_SINGULAR;
        let var_x = sxx / sw;
        if (!(sw > 0.0)) {
            code = STATUS_EMPTY;
        } else if (st.fixed_scale > 0.0 || (var_x > SINGULAR_REL * mx * mx && var_x > 0.0)) {
            code = STATUS_SOLVED;
        }
        status = code;
    }
    let code = workgroupUniformLoad(&status);

    var a = 1.0;
    var b = 0.0;
    if (code == STATUS_SOLVED && st.fixed_scale > 0.0) {
        a = st.fixed_scale;
        b = my - a * mx;
    } else if (code == STATUS_SOLVED) {
        a = sxy / sxx;
        b = my - a * mx;
    } else if (code == STATUS_SINGULAR) {
        // Lower median of d = S − T' over the fit pixels: bisect on the value until
        // count(d <= hi) >= k with k = floor((count − 1) / 2) + 1.
        let k = floor((count - 1.0) * 0.5) + 1.0;
        var lo_l = 3.0e38;
        var hi_l = -3.0e38;
        for (var i = lid; i < batch.npix; i += WG) {
            if (fit_weight(s, i, st) > 0.0) {
                let d = pix[ps + i] - work[pt + i];
                lo_l = min(lo_l, d);
                hi_l = max(hi_l, d);
            }
        }
        r0[lid] = lo_l;
        r1[lid] = hi_l;
        reduce_min_max(lid);
        var lo = r0[0];
        var hi = r1[0];
        workgroupBarrier();
        for (var it = 0u; it < MEDIAN_STEPS; it += 1u) {
            let mid = 0.5 * (lo + hi);
            var c = 0.0;
            for (var i = lid; i < batch.npix; i += WG) {
                if (fit_weight(s, i, st) > 0.0 && pix[ps + i] - work[pt + i] <= mid) {
                    c += 1.0;
                }
            }
            r0[lid] = c;
            r1[lid] = 0.0;
            r2[lid] = 0.0;
            r3[lid] = 0.0;
            reduce_sum(lid);
            let total = r0[0];
            workgroupBarrier();
            if (total >= k) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        b = hi;
    }
    if (lid == 0u) {
        let o = s * RESULT_STRIDE;
        results[o] = a;
        results[o + 1u] = b;
        results[o + 7u] = f32(code);
    }
}
