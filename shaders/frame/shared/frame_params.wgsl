// Declarations every whole-frame kernel (shaders/frame/*.wgsl) shares, prepended to each by
// src/gpu/kernels/frame.rs and by build.rs. Each kernel declares its own storage bindings
// (u32 masks or f32 planes).
// Keep in sync with `FrameParams` in src/gpu/kernels/frame.rs (size checked by a test).
struct FrameParams {
    width: u32,
    height: u32,
    mode: u32,
    radius: u32,
    mesh: u32,
    mx: u32,
    my: u32,
    count: u32,
    side: u32,
    nan_bits: u32,
    inf_bits: u32,
    pad: u32,
    f0: f32,
    f1: f32,
    f2: f32,
    f3: f32,
}

// Keep in sync with `WG_X`, `WG_Y` and `MAX_TAPS` in src/gpu/kernels/frame.rs.
const WG_X: u32 = 16u;
const WG_Y: u32 = 16u;
const MAX_TAPS: u32 = 256u;

@group(0) @binding(0) var<uniform> prm: FrameParams;
// Small per-dispatch constants, 4 per vec4 (what they hold: each kernel says).
@group(0) @binding(1) var<uniform> taps: array<vec4<f32>, 64>;
