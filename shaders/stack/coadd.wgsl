// coadd: each stack's inverse-variance weighted mean of its epochs' shifted planes (from
// `shift`), per pixel, over the epochs `usable` there, in the order given. With c the epoch's
// correlation factor, Ve = V'/c, VTe = min(VT'/c, Ve), w = 1/Ve, W = Σ w:
//   S = Σ w D' / W
//   Var(S)  = Σ w² (Ve − VTe) / W² + (Σ w √VTe / W)²    (template noise common to all epochs)
//   VarT(S) = (Σ w √VTe / W)²
// and the count of epochs used; NaN, NaN, NaN, 0 where none is.
// CPU twin: `cpu::stack::coadd_pixel` / `coadd` (src/cpu/stack.rs); dispatcher:
// src/gpu/kernels/stack.rs. One invocation per (pixel, stack): x over pixels, y over stacks.
//
// StackParams `prm`, WG, EPOCH_STRIDE and `usable` come from
// shaders/stack/shared/stack_params.wgsl, prepended.

// D', V', VT' planes from `shift`, each `epochs × npix`.
@group(0) @binding(1) var<storage, read> aligned: array<f32>;
// Per epoch, EPOCH_STRIDE values (c at 2·TAPS + 2).
@group(0) @binding(2) var<storage, read> eps: array<f32>;
// Per stack: first epoch, number of epochs.
@group(0) @binding(3) var<storage, read> ranges: array<u32>;
// S, Var, VarT, count planes, each `stacks × npix`.
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn coadd(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    let s = id.y;
    if (i >= prm.npix || s >= prm.stacks) {
        return;
    }
    let plane = prm.epochs * prm.npix;
    let e0 = ranges[2u * s];
    let n = ranges[2u * s + 1u];
    var wsum = 0.0;
    var sd = 0.0;
    var a = 0.0;
    var b = 0.0;
    var count = 0u;
    for (var k = 0u; k < n; k++) {
        let e = e0 + k;
        let p = e * prm.npix + i;
        let d = aligned[p];
        let v = aligned[plane + p];
        let vt = aligned[2u * plane + p];
        if (!usable(d, v, vt)) {
            continue;
        }
        let c = eps[e * EPOCH_STRIDE + 2u * TAPS + 2u];
        let ve = v / c;
        let vte = min(vt / c, ve);
        let wt = 1.0 / ve;
        wsum += wt;
        sd += wt * d;
        a += wt * wt * (ve - vte);
        b += wt * sqrt(vte);
        count += 1u;
    }
    let q = prm.stacks * prm.npix;
    let o = s * prm.npix + i;
    if (count == 0u) {
        let nan = bitcast<f32>(prm.nan_bits);
        out[o] = nan;
        out[q + o] = nan;
        out[2u * q + o] = nan;
        out[3u * q + o] = 0.0;
    } else {
        let bw = b / wsum;
        out[o] = sd / wsum;
        out[q + o] = a / wsum / wsum + bw * bw;
        out[2u * q + o] = bw * bw;
        out[3u * q + o] = f32(count);
    }
}
