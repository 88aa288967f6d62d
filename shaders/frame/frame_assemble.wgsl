// frame_assemble: the per-pixel assembly of an Alard–Lupton difference on the device
// (`detect::al::subtract_al`, whose loops are the CPU twin; `cpu::frame::{al_difference,
// al_variance}` spell them out per pixel). Dispatcher: src/gpu/kernels/frame.rs. Validated
// alone by build.rs.
//
// A pixel is masked where the guarding variance (the broad image's variance with the grown
// mask zeroed by `mask_zero`) is not > 0: every unmasked pixel has a positive variance.
// - `mask_zero`: s0 (f32) = 0 where the mask s1 (u32) is set, in place.
// - `al_difference`: s3 = (s0 − s1 − bg(x, y)) · f0 where s2 > 0, else 0: s0 the broad image,
//   s1 the model (K ⊗ sharp), bg the background polynomial (`subtract::polynomial_image`:
//   `count` terms as (coefficient, x power, y power) in `taps`, normalised coordinates).
// - `al_variance`: s3 = (f2 · s0 + f3 · s1 + f1 · s2²) · f0 where s0 > 0, else 0: s0 the guarding
//   variance, s1 the convolved variance, s2 the model (f1 = ε², f0 = the swap's m²; f2 = f3 =
//   1, or Σφ² and its convolved twin after decorrelation).
// - `nan_unless`: s0 (f32) = NaN, in place, where the guard s2 is not > 0 (mode 0) or not
//   finite (mode 1): a product's masked pixels as `blink subtract` writes them. Twin
//   `cpu::frame::nan_unless`.
// - `bad_mask`: s1 (u32) = 1 where an image's own pixel cannot be used: the sky-subtracted image
//   s0 or the variance s2 not finite, the variance not > 0, or the saturation mask s3 (a u32
//   mask, read through its f32 bits) set; else 0. Twin `cpu::frame::bad_mask`.
// FrameParams `prm`, WG_X/WG_Y/MAX_TAPS and the uniform `taps` come from
// shaders/frame/shared/frame_params.wgsl, prepended.
// `taps` here: the background polynomial of `al_difference`.
@group(0) @binding(2) var<storage, read_write> s0: array<f32>;
@group(0) @binding(3) var<storage, read_write> s1: array<u32>;
@group(0) @binding(4) var<storage, read_write> s2: array<f32>;
@group(0) @binding(5) var<storage, read_write> s3: array<f32>;

// As `subtract::normalised`: pixel p of n mapped to [−1, 1].
fn normalised(p: u32, n: u32) -> f32 {
    if (n <= 1u) {
        return 0.0;
    }
    return 2.0 * f32(p) / f32(n - 1u) - 1.0;
}

// Not NaN and not ±∞, by the exponent bits (a compiler may assume comparisons see no NaN).
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn tap(j: u32) -> f32 {
    return taps[j / 4u][j % 4u];
}

@compute @workgroup_size(16, 16, 1)
fn mask_zero(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let i = id.y * prm.width + id.x;
    if (s1[i] != 0u) {
        s0[i] = 0.0;
    }
}

@compute @workgroup_size(16, 16, 1)
fn al_difference(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let i = id.y * prm.width + id.x;
    if (!(s2[i] > 0.0)) {
        s3[i] = 0.0;
        return;
    }
    let xn = normalised(id.x, prm.width);
    let yn = normalised(id.y, prm.height);
    var bg = 0.0;
    for (var t = 0u; t < prm.count; t++) {
        let c = tap(3u * t);
        let p = i32(tap(3u * t + 1u));
        let q = i32(tap(3u * t + 2u));
        var m = c;
        for (var k = 0; k < p; k++) {
            m *= xn;
        }
        for (var k = 0; k < q; k++) {
            m *= yn;
        }
        bg += m;
    }
    s3[i] = (s0[i] - bitcast<f32>(s1[i]) - bg) * prm.f0;
}

@compute @workgroup_size(16, 16, 1)
fn al_variance(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let i = id.y * prm.width + id.x;
    let v = s0[i];
    if (!(v > 0.0)) {
        s3[i] = 0.0;
        return;
    }
    let m = s2[i];
    s3[i] = (prm.f2 * v + prm.f3 * bitcast<f32>(s1[i]) + prm.f1 * m * m) * prm.f0;
}

@compute @workgroup_size(16, 16, 1)
fn bad_mask(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let i = id.y * prm.width + id.x;
    let v = s2[i];
    let bad = bitcast<u32>(s3[i]) != 0u || !finite(s0[i]) || !finite(v) || !(v > 0.0);
    s1[i] = select(0u, 1u, bad);
}

@compute @workgroup_size(16, 16, 1)
fn nan_unless(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let i = id.y * prm.width + id.x;
    let g = s2[i];
    let keep = select(finite(g) && g > 0.0, finite(g), prm.mode == 1u);
    if (!keep) {
        s0[i] = bitcast<f32>(prm.nan_bits);
    }
}
