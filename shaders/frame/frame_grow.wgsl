// frame_grow: a mask grown by `radius` pixels, a square of side 2r + 1 around each set pixel
// (`detect::al`'s masks grown by the kernel's reach), as two 1-D passes: any set pixel within r
// along the row, then along the column. CPU twin: `cpu::frame::grow`; dispatcher:
// src/gpu/kernels/frame.rs. Validated alone by build.rs.
//
// Bindings (u32 masks, 1 = set): `grow_rows`: s0 → s1; `grow_cols`: s1 → s2.
// `pack_mask`: s0 (the w × h mask) → s1, 32 pixels a word: bit b of word k is pixel 32k + b;
// `count` words, word k computed by invocation (x, y) with k = y · mx + x. CPU twin:
// `cpu::frame::pack_mask`. A mask comes back to the host in 1/32 of a plane's bytes.
// FrameParams `prm`, WG_X/WG_Y/MAX_TAPS and the uniform `taps` come from
// shaders/frame/shared/frame_params.wgsl, prepended.
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

@compute @workgroup_size(16, 16, 1)
fn pack_mask(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.mx) {
        return;
    }
    let k = id.y * prm.mx + id.x;
    if (k >= prm.count) {
        return;
    }
    let n = prm.width * prm.height;
    var word = 0u;
    for (var b = 0u; b < 32u; b++) {
        let i = 32u * k + b;
        if (i < n && s0[i] != 0u) {
            word = word | (1u << b);
        }
    }
    s1[k] = word;
}
