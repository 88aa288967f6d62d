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

// Row pass: Σ g·w·T, Σ g·w and Σ g²·w·V along x.
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
    var st = 0.0;
    var sw = 0.0;
    var sv = 0.0;
    for (var j = lo; j <= hi; j += 1) {
        let g = gauss(j - x, sigma);
        let q = u32(j);
        let gw = g * pix[pw + q];
        st += gw * pix[pt + q];
        sw += gw;
        sv += g * gw * pix[pv + q];
    }
    work[plane(WORK_ROW_T, s) + i] = st;
    work[plane(WORK_ROW_W, s) + i] = sw;
    work[plane(WORK_ROW_V, s) + i] = sv;
}

// Column pass over the row sums, then the normalisation.
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
        t = st / sw;
        v = sv / (sw * sw);
    }
    work[plane(WORK_CONV_T, s) + i] = t;
    work[plane(WORK_CONV_V, s) + i] = v;
}
