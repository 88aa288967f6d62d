// Declarations both stacking kernels (shaders/stack/*.wgsl) share, prepended to each by
// src/gpu/kernels/stack.rs and by build.rs.
// Keep in sync with `StackParams` in src/gpu/kernels/stack.rs (size checked by a test).
struct StackParams {
    width: u32,
    height: u32,
    npix: u32,
    epochs: u32,
    stacks: u32,
    nan_bits: u32,
    pad0: u32,
    pad1: u32,
}

// Keep in sync with `WG`, `TAPS` and `EPOCH_STRIDE` in src/gpu/kernels/stack.rs (and `TAPS` in
// src/cpu/stack.rs).
const WG: u32 = 64u;
const TAPS: u32 = 6u;
// f32 per epoch in `eps`: kx[0..6], ky[0..6], whole-pixel shift ix, iy, c = cx·cy, unused.
const EPOCH_STRIDE: u32 = 16u;

@group(0) @binding(0) var<uniform> prm: StackParams;

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// A pixel the kernels may use (`cpu::stack::usable`).
fn usable(d: f32, v: f32, vt: f32) -> bool {
    return finite(d) && finite(v) && v > 0.0 && finite(vt) && vt >= 0.0;
}
