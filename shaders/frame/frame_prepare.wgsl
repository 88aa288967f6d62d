// frame_prepare: what subtraction needs of one image, per pixel (`detect::frame::Prepared`):
// the smoothed variance `max(v̄, 0)/gain + rn²` with v̄ the mean of the finite pixels of the 3×3
// box (NaN where the pixel is not finite; `Image::variance_smoothed`) and the saturation mask
// (value ≥ 99.9% of SATURATE). CPU twins: `cpu::frame::{variance_smoothed, saturation}`;
// dispatcher: src/gpu/kernels/frame.rs. Validated alone by build.rs.
//
// Bindings: s0 = image, s1 = variance out, s2 = saturation mask out (u32, 1 = saturated).
// f0 = gain, f1 = rn², f2 = saturation level; mode 1: the image has a SATURATE level.
// FrameParams `prm`, WG_X/WG_Y/MAX_TAPS and the uniform `taps` come from
// shaders/frame/shared/frame_params.wgsl, prepended.
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
