// convolve: template ⊗ Gaussian(kernel_sigma) and template_var ⊗ Gaussian², mask-normalised and
// separable (`convolve_rows` then `convolve_cols`). CPU twin: src/cpu/convolve.rs; dispatcher:
// src/gpu/kernels/convolve.rs. One invocation per output pixel, grid (pixels, stamps).
// Shared declarations (BatchParams, StampGpu, planes, bindings): shaders/shared/batch.wgsl,
// prepended when the module is built (src/gpu/kernels/mod.rs `shader_source`, build.rs).

// Keep in sync with `MAX_RADIUS` and `SIGMA_MIN` in src/cpu/convolve.rs.
const MAX_RADIUS: i32 = 32;
const SIGMA_MIN: f32 = 1e-3;

fn radius(sigma: f32) -> i32 {
    if (sigma >= SIGMA_MIN) {
        return min(i32(ceil(4.0 * sigma)), MAX_RADIUS);
    }
    return 0;
}

fn gauss(k: i32, sigma: f32) -> f32 {
    if (k == 0) {
        return 1.0;
    }
    let t = f32(k) / sigma;
    return exp(-0.5 * t * t);
}

// A level near the template's sky, subtracted before the sums and added back after
// (T' = c + Σ g·w·(T − c) / Σ g·w, exact for any c): in f32 the sums then carry the sources and
// noise instead of a pedestal hundreds of times larger, whose rounding (~1e-7 of it) would
// otherwise be as large as the smoothed noise that the fit regresses on. c is the mean of the
// usable corner pixels (0 when none is); both passes compute the same value.
fn pedestal(s: u32) -> f32 {
    let w = batch.width;
    let h = batch.height;
    let pt = plane(PIX_TEMPLATE, s);
    let pw = plane(PIX_WEIGHT, s);
    var sum = 0.0;
    var cnt = 0.0;
    for (var k = 0u; k < 4u; k += 1u) {
        let i = select(0u, w - 1u, (k & 1u) == 1u) + select(0u, (h - 1u) * w, (k & 2u) == 2u);
        if (pix[pw + i] > 0.0) {
            sum += pix[pt + i];
            cnt += 1.0;
        }
    }
    return select(0.0, sum / max(cnt, 1.0), cnt > 0.0);
}

// Row pass: Σ g·w·(T − c), Σ g·w and Σ g²·w·V along x.
@compute @workgroup_size(WG)
fn convolve_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let s = gid.y;
    if (i >= batch.npix || s >= batch.n) {
        return;
    }
    let w = i32(batch.width);
    let x = i32(i % batch.width);
    let row = i - u32(x);
    let sigma = stamps[s].kernel_sigma;
    let r = radius(sigma);
    let lo = max(x - r, 0);
    let hi = min(x + r, w - 1);
    let pt = plane(PIX_TEMPLATE, s) + row;
    let pv = plane(PIX_TEMPLATE_VAR, s) + row;
    let pw = plane(PIX_WEIGHT, s) + row;
    let c = pedestal(s);
    var st = 0.0;
    var sw = 0.0;
    var sv = 0.0;
    for (var j = lo; j <= hi; j += 1) {
        let g = gauss(j - x, sigma);
        let q = u32(j);
        let gw = g * pix[pw + q];
        st += gw * (pix[pt + q] - c);
        sw += gw;
        sv += g * gw * pix[pv + q];
    }
    work[plane(WORK_ROW_T, s) + i] = st;
    work[plane(WORK_ROW_W, s) + i] = sw;
    work[plane(WORK_ROW_V, s) + i] = sv;
}

// Column pass over the row sums, then the normalisation (and the pedestal back).
@compute @workgroup_size(WG)
fn convolve_cols(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let s = gid.y;
    if (i >= batch.npix || s >= batch.n) {
        return;
    }
    let w = batch.width;
    let x = i % w;
    let y = i32(i / w);
    let sigma = stamps[s].kernel_sigma;
    let r = radius(sigma);
    let lo = max(y - r, 0);
    let hi = min(y + r, i32(batch.height) - 1);
    let pt = plane(WORK_ROW_T, s) + x;
    let pw = plane(WORK_ROW_W, s) + x;
    let pv = plane(WORK_ROW_V, s) + x;
    var st = 0.0;
    var sw = 0.0;
    var sv = 0.0;
    for (var j = lo; j <= hi; j += 1) {
        let g = gauss(j - y, sigma);
        let q = u32(j) * w;
        st += g * work[pt + q];
        sw += g * work[pw + q];
        sv += g * g * work[pv + q];
    }
    var t = 0.0;
    var v = 0.0;
    if (sw > 0.0) {
        t = st / sw + pedestal(s);
        v = sv / (sw * sw);
    }
    work[plane(WORK_CONV_T, s) + i] = t;
    work[plane(WORK_CONV_V, s) + i] = v;
}
