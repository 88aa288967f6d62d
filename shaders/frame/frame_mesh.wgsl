// frame_mesh: a smooth background map (`detect::frame::mesh_background`, its CPU twin; also
// `cpu::frame::mesh_background`): the median of each `mesh`×`mesh` cell over its valid finite
// pixels (a cell with under a quarter of mesh² valid is NaN), NaN cells replaced by the median
// of the others (0 when none), bilinear interpolation between cell centres. Dispatcher:
// src/gpu/kernels/frame.rs. Validated alone by build.rs.
//
// The medians are exact (the lower median, element (n − 1)/2 in total order, as the CPU's
// `select_nth_unstable`): a radix select over the f32 bits mapped to an order-preserving u32,
// 8 bits a pass, one workgroup per cell with a 256-bin histogram in workgroup memory. Only the
// interpolation is f32 where the CPU uses f64.
//
// Validity (`mode`): 0: s1 is a mask, valid where 0 (the image's sky: not saturated);
// 1: s1 is a variance, valid where > 0 (a difference's residual background). In mode 1 with
// `prm.f0` = κ² > 0 a cell's median is taken again over the valid pixels within κ·sqrt(var) of
// the first, (x − m)² ≤ κ²·var in f32 as the CPU does (its first median kept when fewer than a
// quarter of the cell are left): sources' light no longer pulls the estimate up.
// Bindings: s0 = image (f32), s1 = validity plane (u32 view), s2 = grid (mx·my cells, then the
// fill value), s3 = output plane (`mesh_apply`).
// FrameParams `prm`, WG_X/WG_Y/MAX_TAPS and the uniform `taps` come from
// shaders/frame/shared/frame_params.wgsl, prepended.
@group(0) @binding(2) var<storage, read_write> s0: array<f32>;
@group(0) @binding(3) var<storage, read_write> s1: array<u32>;
@group(0) @binding(4) var<storage, read_write> s2: array<f32>;
@group(0) @binding(5) var<storage, read_write> s3: array<f32>;

const MESH_WG: u32 = 256u;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> total: atomic<u32>;
var<workgroup> shared_n: u32;
var<workgroup> sel_prefix: u32;
var<workgroup> sel_k: u32;

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// f32 → u32 with the same order as `f32::total_cmp`.
fn key_of(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x80000000u) != 0u) {
        return ~u;
    }
    return u | 0x80000000u;
}

fn value_of(k: u32) -> f32 {
    if ((k & 0x80000000u) != 0u) {
        return bitcast<f32>(k & 0x7fffffffu);
    }
    return bitcast<f32>(~k);
}

// Element j of the set being selected from: (1 if valid, key). `cell` = (x0, y0, cell width);
// `grid_mode`: the finite cells of the grid instead; `clip`: in mode 1, only the pixels with
// (x − centre)² ≤ prm.f0·var.
fn element(j: u32, cell: vec3<u32>, grid_mode: bool, clip: bool, centre: f32) -> vec2<u32> {
    if (grid_mode) {
        let g = s2[j];
        return vec2<u32>(select(0u, 1u, finite(g)), key_of(g));
    }
    let i = (cell.y + j / cell.z) * prm.width + cell.x + j % cell.z;
    let v = s0[i];
    var ok = finite(v);
    if (prm.mode == 0u) {
        ok = ok && s1[i] == 0u;
    } else {
        let vr = bitcast<f32>(s1[i]);
        ok = ok && vr > 0.0;
        if (clip) {
            let r = v - centre;
            ok = ok && r * r <= prm.f0 * vr;
        }
    }
    return vec2<u32>(select(0u, 1u, ok), key_of(v));
}

// The lower median of the `len` elements' valid ones, NaN when fewer than `need` are valid.
// Called by every invocation of the workgroup (uniform control flow).
fn radix_median(lid: u32, len: u32, cell: vec3<u32>, grid_mode: bool, need: u32, clip: bool, centre: f32) -> f32 {
    if (lid == 0u) {
        atomicStore(&total, 0u);
    }
    workgroupBarrier();
    var c = 0u;
    for (var j = lid; j < len; j += MESH_WG) {
        c += element(j, cell, grid_mode, clip, centre).x;
    }
    atomicAdd(&total, c);
    workgroupBarrier();
    if (lid == 0u) {
        shared_n = atomicLoad(&total);
    }
    let n = workgroupUniformLoad(&shared_n);
    if (n < need || n == 0u) {
        return bitcast<f32>(prm.nan_bits);
    }
    var k = (n - 1u) / 2u;
    var prefix = 0u;
    var mask = 0u;
    for (var round = 0u; round < 4u; round++) {
        let shift = 24u - 8u * round;
        atomicStore(&hist[lid], 0u);
        workgroupBarrier();
        for (var j = lid; j < len; j += MESH_WG) {
            let e = element(j, cell, grid_mode, clip, centre);
            if (e.x == 1u && (e.y & mask) == prefix) {
                atomicAdd(&hist[(e.y >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            var cum = 0u;
            var digit = 255u;
            for (var b = 0u; b < 256u; b++) {
                let hb = atomicLoad(&hist[b]);
                if (cum + hb > k) {
                    digit = b;
                    break;
                }
                cum += hb;
            }
            sel_prefix = prefix | (digit << shift);
            sel_k = k - cum;
        }
        prefix = workgroupUniformLoad(&sel_prefix);
        k = workgroupUniformLoad(&sel_k);
        mask = mask | (255u << shift);
    }
    return value_of(prefix);
}

// One workgroup per cell (gx, gy): its median (clipped in mode 1 when prm.f0 > 0) into s2.
@compute @workgroup_size(256, 1, 1)
fn mesh_cells(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let mesh = prm.mesh;
    let x0 = wg.x * mesh;
    let y0 = wg.y * mesh;
    let cw = min(mesh, prm.width - x0);
    let ch = min(mesh, prm.height - y0);
    let need = mesh * mesh / 4u;
    var m = radix_median(lid, cw * ch, vec3<u32>(x0, y0, cw), false, need, false, 0.0);
    if (prm.mode == 1u && prm.f0 > 0.0 && finite(m)) {
        let clipped = radix_median(lid, cw * ch, vec3<u32>(x0, y0, cw), false, need, true, m);
        m = select(m, clipped, finite(clipped));
    }
    if (lid == 0u) {
        s2[wg.y * prm.mx + wg.x] = m;
    }
}

// One workgroup: the median of the finite cells (0 when none) into s2[mx·my].
@compute @workgroup_size(256, 1, 1)
fn mesh_fill(@builtin(local_invocation_index) lid: u32) {
    let n = prm.mx * prm.my;
    let m = radix_median(lid, n, vec3<u32>(0u, 0u, 1u), true, 1u, false, 0.0);
    if (lid == 0u) {
        s2[n] = select(0.0, m, finite(m));
    }
}

fn cell_value(i: u32, j: u32) -> f32 {
    let g = s2[min(j, prm.my - 1u) * prm.mx + min(i, prm.mx - 1u)];
    return select(s2[prm.mx * prm.my], g, finite(g));
}

// Cell index and fraction along one axis: pixel p between cell centres, n cells.
fn coord(p: u32, n: u32) -> vec2<f32> {
    if (n < 2u) {
        return vec2<f32>(0.0, 0.0);
    }
    let t = clamp((f32(p) + 0.5) / f32(prm.mesh) - 0.5, 0.0, f32(n - 1u));
    let i = min(u32(floor(t)), n - 2u);
    return vec2<f32>(f32(i), clamp(t - f32(i), 0.0, 1.0));
}

// The interpolated background b at each pixel. mode 0: s3 = s0 − b (the image less its sky);
// 1: s0 −= b where s1 (a variance) > 0, in place (a difference's residual background);
// 2: s3 = b.
@compute @workgroup_size(16, 16, 1)
fn mesh_apply(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= prm.width || id.y >= prm.height) {
        return;
    }
    let cx = coord(id.x, prm.mx);
    let cy = coord(id.y, prm.my);
    let ix = u32(cx.x);
    let iy = u32(cy.x);
    let fx = cx.y;
    let fy = cy.y;
    let b = (1.0 - fx) * (1.0 - fy) * cell_value(ix, iy) + fx * (1.0 - fy) * cell_value(ix + 1u, iy)
        + (1.0 - fx) * fy * cell_value(ix, iy + 1u) + fx * fy * cell_value(ix + 1u, iy + 1u);
    let i = id.y * prm.width + id.x;
    if (prm.mode == 0u) {
        s3[i] = s0[i] - b;
    } else if (prm.mode == 1u) {
        if (bitcast<f32>(s1[i]) > 0.0) {
            s0[i] = s0[i] - b;
        }
    } else {
        s3[i] = b;
    }
}
