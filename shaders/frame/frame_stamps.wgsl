// frame_stamps: the Alard–Lupton fit's stars found and cut on the device, so a fit on planes
// that stay there (`detect::al`'s `DeviceStamps`) reads the squares around its stars instead
// of four whole planes. Dispatcher: src/gpu/kernels/frame_stamps.rs. Validated alone by
// build.rs. CPU twins: `subtract::stamps::{stamp_candidates, Squares::from_pair}` and a
// strided `step_by` (the samples).
//
// Bindings: s0, s2, s3 f32 planes; s1 a u32 list (atomics).
// - `stamp_peaks`: s0 the template (the image convolved). Every pixel at least `side` (the
//   stamps' reach) from each edge whose value v is finite, above `f0` (the floor), below `f1`
//   (the template's saturation, +∞ where none), the peak of its square of half-side `radius`
//   (ties to the first in raster order), whose four neighbours are above f2 + (v − f2) / 4
//   (f2 the sky), and whose square of half-side `side` is finite and below f1 throughout, is
//   appended to s1: s1[0] counts them, entry k < `count` (the list's room) is
//   s1[2 + 2k] = y · width + x and s1[3 + 2k] = v's bits.
// - `stamp_usable`: the entries k < min(s1[0], count) (invocation (x, y) with k = y · mx + x)
//   whose square of half-side `radius` is not usable get the index 0xffffffff: usable is s0
//   (the image not convolved) finite and below f3 (its saturation), s2 (its variance) finite
//   and > 0, and, with mode 1, s3 (the template's variance) finite and ≥ 0.
// - `stamp_squares`: the squares of half-side `radius` around the `count` centres s1[k] (pixel
//   indices) of the plane s0, into s2: square k's pixel (sx, sy) at k · side² + sy · side + sx
//   (side = 2 · radius + 1, invocation (sx, k · side + sy)), NaN off the frame.
// - `stamp_sample`: s2[k] = s0[k · side] for k < count (invocation (x, y) with k = y · mx + x);
//   with mode 1, 0 where the mask s3 (u32 bits read through f32) is set.
// - `sample_hist` (workgroups of 256, invocation k = (group.y · mx + group.x) · 256 + local):
//   of the samples s0[k · side] (k < count; with mode 1, none where the mask s3 is set) that
//   are finite and > 0, those whose bits above bit `radius` + 8 equal `mesh` (all of them when
//   `radius` is 24) are counted by their 8 bits from bit `radius` into s1[0..256] (zeroed by
//   the host). Four passes (radius 24, 16, 8, 0) give the k-th smallest exactly: a radix
//   select on the bits, which order positive floats as their values. CPU twin:
//   `detect::frame::median_of_variances` of the sample.
// FrameParams `prm`, WG_X/WG_Y/MAX_TAPS and the uniform `taps` come from
// shaders/frame/shared/frame_params.wgsl, prepended.
@group(0) @binding(2) var<storage, read_write> s0: array<f32>;
@group(0) @binding(3) var<storage, read_write> s1: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> s2: array<f32>;
@group(0) @binding(5) var<storage, read_write> s3: array<f32>;

const NEG_INF_BITS: u32 = 0xff800000u;
const POS_INF_BITS: u32 = 0x7f800000u;
const NO_STAR: u32 = 0xffffffffu;

// Not NaN and not ±∞, by the exponent bits (a compiler may assume comparisons see no NaN).
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// u < v (v finite) as the CPU compares f32: −∞ is below, NaN and +∞ are not.
fn below(u: f32, v: f32) -> bool {
    if (!finite(u)) {
        return bitcast<u32>(u) == NEG_INF_BITS;
    }
    return u < v;
}

// u > q (q finite) as the CPU compares f32: +∞ is above, NaN and −∞ are not.
fn above(u: f32, q: f32) -> bool {
    if (!finite(u)) {
        return bitcast<u32>(u) == POS_INF_BITS;
    }
    return u > q;
}

@compute @workgroup_size(16, 16, 1)
fn stamp_peaks(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = prm.width;
    let reach = prm.side;
    let r = prm.radius;
    if (id.x < reach || id.y < reach || id.x + reach >= w || id.y + reach >= prm.height) {
        return;
    }
    let i = id.y * w + id.x;
    let v = s0[i];
    if (!finite(v) || !(v > prm.f0) || !(v < prm.f1)) {
        return;
    }
    // The peak of its stamp: every other pixel below it, or equal and later in raster order.
    for (var yy = id.y - r; yy <= id.y + r; yy++) {
        for (var xx = id.x - r; xx <= id.x + r; xx++) {
            let u = s0[yy * w + xx];
            let later = yy > id.y || (yy == id.y && xx >= id.x);
            if (!(below(u, v) || (finite(u) && u == v && later))) {
                return;
            }
        }
    }
    // Not a hot pixel: each of the four neighbours above a quarter of the peak over the sky.
    let q = prm.f2 + 0.25 * (v - prm.f2);
    if (!above(s0[i - 1u], q) || !above(s0[i + 1u], q) || !above(s0[i - w], q) || !above(s0[i + w], q)) {
        return;
    }
    // The template usable over the whole cutout the fit convolves.
    for (var yy = id.y - reach; yy <= id.y + reach; yy++) {
        for (var xx = id.x - reach; xx <= id.x + reach; xx++) {
            let u = s0[yy * w + xx];
            if (!finite(u) || !(u < prm.f1)) {
                return;
            }
        }
    }
    let k = atomicAdd(&s1[0], 1u);
    if (k < prm.count) {
        atomicStore(&s1[2u + 2u * k], i);
        atomicStore(&s1[3u + 2u * k], bitcast<u32>(v));
    }
}

@compute @workgroup_size(16, 16, 1)
fn stamp_usable(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.mx) {
        return;
    }
    let k = id.y * prm.mx + id.x;
    if (k >= min(atomicLoad(&s1[0]), prm.count)) {
        return;
    }
    let w = prm.width;
    let i = atomicLoad(&s1[2u + 2u * k]);
    let x = i % w;
    let y = i / w;
    let r = prm.radius;
    var ok = true;
    for (var yy = y - r; yy <= y + r; yy++) {
        for (var xx = x - r; xx <= x + r; xx++) {
            let j = yy * w + xx;
            let s = s0[j];
            let sv = s2[j];
            ok = ok && finite(s) && s < prm.f3 && finite(sv) && sv > 0.0;
            if (prm.mode == 1u) {
                let tv = s3[j];
                ok = ok && finite(tv) && tv >= 0.0;
            }
        }
    }
    if (!ok) {
        atomicStore(&s1[2u + 2u * k], NO_STAR);
    }
}

@compute @workgroup_size(16, 16, 1)
fn stamp_squares(@builtin(global_invocation_id) id: vec3<u32>) {
    let r = prm.radius;
    let side = 2u * r + 1u;
    if (id.x >= side || id.y >= side * prm.count) {
        return;
    }
    let k = id.y / side;
    let sy = id.y % side;
    let w = prm.width;
    let c = atomicLoad(&s1[k]);
    let x = i32(c % w) + i32(id.x) - i32(r);
    let y = i32(c / w) + i32(sy) - i32(r);
    var v = bitcast<f32>(prm.nan_bits);
    if (x >= 0 && y >= 0 && x < i32(w) && y < i32(prm.height)) {
        v = s0[u32(y) * w + u32(x)];
    }
    s2[k * side * side + sy * side + id.x] = v;
}

@compute @workgroup_size(16, 16, 1)
fn stamp_sample(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.mx) {
        return;
    }
    let k = id.y * prm.mx + id.x;
    if (k >= prm.count) {
        return;
    }
    let i = k * prm.side;
    var v = s0[i];
    if (prm.mode == 1u && bitcast<u32>(s3[i]) != 0u) {
        v = 0.0;
    }
    s2[k] = v;
}

var<workgroup> bins: array<atomic<u32>, 256>;

@compute @workgroup_size(256, 1, 1)
fn sample_hist(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    atomicStore(&bins[li], 0u);
    workgroupBarrier();
    let k = (wg.y * prm.mx + wg.x) * 256u + li;
    if (k < prm.count) {
        let i = k * prm.side;
        let v = s0[i];
        let masked = prm.mode == 1u && bitcast<u32>(s3[i]) != 0u;
        if (!masked && finite(v) && v > 0.0) {
            let b = bitcast<u32>(v);
            let sh = prm.radius;
            if (sh >= 24u || (b >> (sh + 8u)) == prm.mesh) {
                atomicAdd(&bins[(b >> sh) & 255u], 1u);
            }
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&bins[li]);
    if (c > 0u) {
        atomicAdd(&s1[li], c);
    }
}
