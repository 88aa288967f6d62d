// shift: every epoch's difference D, variance V and template variance VT resampled onto the
// common grid with the separable Lanczos-3 weights the host computed (`cpu::stack::ShiftTaps`),
// here as the full 6×6 sum:
//   D' = Σ kx ky D,   V' = Σ (kx ky)² V,   VT' = Σ (kx ky)² VT     over the taps of weight ≠ 0
// NaN in all three where one of those taps leaves the stamp or is not `usable`.
// CPU twin: `cpu::stack::shift` (src/cpu/stack.rs); dispatcher: src/gpu/kernels/stack.rs.
// One invocation per (pixel, epoch): x over pixels, y over epochs.
//
// StackParams `prm`, WG, TAPS, EPOCH_STRIDE and `usable` come from
// shaders/stack/shared/stack_params.wgsl, prepended.

// D, V, VT planes, each `epochs × npix`, epoch after epoch.
@group(0) @binding(1) var<storage, read> src: array<f32>;
// Per epoch, EPOCH_STRIDE values.
@group(0) @binding(2) var<storage, read> eps: array<f32>;
// D', V', VT', laid out as `src`.
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn shift(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    let e = id.y;
    if (i >= prm.npix || e >= prm.epochs) {
        return;
    }
    let w = i32(prm.width);
    let h = i32(prm.height);
    let x = i32(i % prm.width);
    let y = i32(i / prm.width);
    let b = e * EPOCH_STRIDE;
    let ix = i32(eps[b + 2u * TAPS]);
    let iy = i32(eps[b + 2u * TAPS + 1u]);
    let base = e * prm.npix;
    let plane = prm.epochs * prm.npix;
    var ok = true;
    var sd = 0.0;
    var sv = 0.0;
    var st = 0.0;
    for (var j = 0u; j < TAPS; j++) {
        let ky = eps[b + TAPS + j];
        if (ky == 0.0) {
            continue;
        }
        let sy = y + iy + i32(j) - 2;
        if (sy < 0 || sy >= h) {
            ok = false;
            break;
        }
        for (var t = 0u; t < TAPS; t++) {
            let kx = eps[b + t];
            if (kx == 0.0) {
                continue;
            }
            let sx = x + ix + i32(t) - 2;
            if (sx < 0 || sx >= w) {
                ok = false;
                break;
            }
            let p = base + u32(sy * w + sx);
            let d = src[p];
            let v = src[plane + p];
            let vt = src[2u * plane + p];
            if (!usable(d, v, vt)) {
                ok = false;
                break;
            }
            let k = kx * ky;
            sd += k * d;
            sv += k * k * v;
            st += k * k * vt;
        }
        if (!ok) {
            break;
        }
    }
    let o = base + i;
    if (ok) {
        dst[o] = sd;
        dst[plane + o] = sv;
        dst[2u * plane + o] = st;
    } else {
        let nan = bitcast<f32>(prm.nan_bits);
        dst[o] = nan;
        dst[plane + o] = nan;
        dst[2u * plane + o] = nan;
    }
}
