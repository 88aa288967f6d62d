// frame_prepare: what subtraction needs of one image, per pixel (`detect::frame::Prepared`):
// the smoothed variance `max(v̄, 0)/gain + rn²` with v̄ the mean of the finite pixels of the 3×3
// box (NaN where the pixel is not finite; `Image::variance_smoothed`) and the saturation mask
// (value ≥ 99.9% of SATURATE). CPU twins: `cpu::frame::{variance_smoothed, saturation}`;
// dispatcher: src/gpu/kernels/frame.rs. Validated alone by build.rs.
//
// Bindings: s0 = image, s1 = variance out, s2 = saturation mask out (u32, 1 = saturated).
// f0 = gain, f1 = rn², f2 = saturation level; mode 1: the image has a SATURATE level.
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
// Small per-dispatch constants (4 per vec4): unused here.
@group(0) @binding(1) var<uniform> taps: array<vec4<f32>, 64>;
@group(0) @binding(2) var<storage, read_write> s0: array<f32>;
@group(0) @binding(3) var<storage, read_write> s1: array<f32>;
@group(0) @binding(4) var<storage, read_write> s2: array<u32>;
@group(0) @binding(5) var<storage, read_write> s3: array<f32>;

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(16, 16, 1)
fn prepare(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = prm.width;
    let h = prm.height;
    if (id.x >= w || id.y >= h) {
        return;
    }
    let i = id.y * w + id.x;
    let v0 = s0[i];
    s2[i] = select(0u, 1u, prm.mode == 1u && v0 >= prm.f2);
    if (!finite(v0)) {
        s1[i] = bitcast<f32>(prm.nan_bits);
        return;
    }
    var s = 0.0;
    var n = 0.0;
    for (var yy = max(id.y, 1u) - 1u; yy <= min(id.y + 1u, h - 1u); yy++) {
        for (var xx = max(id.x, 1u) - 1u; xx <= min(id.x + 1u, w - 1u); xx++) {
            let v = s0[yy * w + xx];
            if (finite(v)) {
                s += v;
                n += 1.0;
            }
        }
    }
    s1[i] = max(s / n, 0.0) / prm.f0 + prm.f1;
}
