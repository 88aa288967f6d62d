// difference_score: D = S − a·T' − b and V = S_var + a²·T'var per pixel (written to the work
// buffer), and the matched filter with the profile at the candidate: flux = Σ P·D·w/V / Σ P²·w/V,
// flux_err = 1/sqrt(Σ P²·w/V), score = flux/flux_err. One workgroup per stamp.
// CPU twin: src/cpu/difference_score.rs; dispatcher: src/gpu/kernels/difference_score.rs.
// Shared declarations (BatchParams, StampGpu, planes, bindings): shaders/shared/batch.wgsl,
// prepended when the module is built (src/gpu/kernels/mod.rs `shader_source`, build.rs).

// Keep in sync with `FLUX_ERR_NONE` in src/engine/mod.rs (f32::MAX).
const FLUX_ERR_NONE: f32 = 3.40282347e38;

var<workgroup> r0: array<f32, WG>;
var<workgroup> r1: array<f32, WG>;

@compute @workgroup_size(WG)
fn difference_score(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let s = wid.x;
    if (s >= batch.n) {
        return;
    }
    let o = s * RESULT_STRIDE;
    let a = results[o];
    let b = results[o + 1u];
    let ps = plane(PIX_SCIENCE, s);
    let psv = plane(PIX_SCIENCE_VAR, s);
    let pw = plane(PIX_WEIGHT, s);
    let pp = plane(PIX_PROFILE, s);
    let pt = plane(WORK_CONV_T, s);
    let ptv = plane(WORK_CONV_V, s);
    let pd = plane(WORK_DIFF, s);
    let pv = plane(WORK_VAR, s);
    var num = 0.0;
    var den = 0.0;
    for (var i = lid; i < batch.npix; i += WG) {
        let w = pix[pw + i];
        var d = 0.0;
        var v = 0.0;
        if (w > 0.0) {
            d = pix[ps + i] - a * work[pt + i] - b;
            v = pix[psv + i] + a * a * work[ptv + i];
            if (v > 0.0) {
                let p = pix[pp + i];
                num += p * d * w / v;
                den += p * p * w / v;
            }
        }
        work[pd + i] = d;
        work[pv + i] = v;
    }
    r0[lid] = num;
    r1[lid] = den;
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            r0[lid] += r0[lid + stride];
            r1[lid] += r1[lid + stride];
        }
    }
    workgroupBarrier();
    if (lid == 0u) {
        let n_sum = r0[0];
        let d_sum = r1[0];
        var flux = 0.0;
        var err = FLUX_ERR_NONE;
        var score = 0.0;
        if (d_sum > 0.0) {
            flux = n_sum / d_sum;
            err = 1.0 / sqrt(d_sum);
            score = n_sum / sqrt(d_sum);
        }
        results[o + 2u] = flux;
        results[o + 3u] = err;
        results[o + 4u] = score;
        results[o + 5u] = n_sum;
        results[o + 6u] = d_sum;
    }
}
