// frame_grow: a mask grown by `radius` pixels, a square of side 2r + 1 around each set pixel
// (`detect::al`'s masks grown by the kernel's reach), as two 1-D passes: any set pixel within r
// along the row, then along the column. CPU twin: `cpu::frame::grow`; dispatcher:
// src/gpu/kernels/frame.rs. Validated alone by build.rs.
//
// Bindings (u32 masks, 1 = set): `grow_rows`: s0 → s1; `grow_cols`: s1 → s2.
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
@group(0) @binding(2) var<storage, read_write> s0: array<u32>;
@group(0) @binding(3) var<storage, read_write> s1: array<u32>;
@group(0) @binding(4) var<storage, read_write> s2: array<u32>;
@group(0) @binding(5) var<storage, read_write> s3: array<u32>;

@compute @workgroup_size(16, 16, 1)
fn grow_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = prm.width;
    if (id.x >= w || id.y >= prm.height) {
        return;
    }
    let r = prm.radius;
    let row = id.y * w;
    var hit = 0u;
    for (var x = max(id.x, r) - r; x <= min(id.x + r, w - 1u); x++) {
        hit = hit | s0[row + x];
    }
    s1[row + id.x] = select(0u, 1u, hit != 0u);
}

@compute @workgroup_size(16, 16, 1)
fn grow_cols(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = prm.width;
    let h = prm.height;
    if (id.x >= w || id.y >= h) {
        return;
    }
    let r = prm.radius;
    var hit = 0u;
    for (var y = max(id.y, r) - r; y <= min(id.y + r, h - 1u); y++) {
        hit = hit | s1[y * w + id.x];
    }
    s2[id.y * w + id.x] = hit;
}
