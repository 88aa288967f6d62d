// ring: the window stacks of one object's resident squares, measured at its candidate; one
// workgroup per object (a "job"), only sums per window come back.
//
// The squares (31×31, three planes: D, V, VT) of recent epochs stay on the device in a pool of
// cells (`cells`, CELL floats each; host index: src/pipeline/ring.rs). A job lists the object's
// epochs in summation order (latest first; every window is a leading run of them) and the
// epoch counts of the windows to measure. For each pixel X of the matched filter's footprint
// around the candidate's pixel p, epoch after epoch:
//   shift:   (D', V', VT') = Σ kx ky (D, kx ky V, kx ky VT) over the 6×6 Lanczos-3 taps of the
//            epoch's offset (masked where a tap of non-zero weight leaves the square or is not
//            usable), as shaders/stack/shift.wgsl;
//   coadd:   the terms (w, w D', w² (Ve − VTe), w √VTe) of shaders/stack/coadd.wgsl;
//   PSF:     the epoch's Gaussian (σ, half side h) at the candidate's phase f, unit sum on its
//            square, weighted by the epoch's mean c/V' over the 5×5 box at the square's centre
//            (cpu::stack::EpochPsfs; equal weights when those do not sum to a positive number);
// and at each window's last epoch the window's stack pixel S, Var and effective PSF P there
// add P S/Var and P²/Var to the window's sums (where S is finite and Var > 0, and |X − p| is
// within the window's largest h). Out per job and window: (Σ P S/Var, Σ P²/Var, centre usable).
// The host makes score = num/√den, flux = num/den, error = 1/√den.
// CPU twin: `cpu::ring::measure` (src/cpu/ring.rs); dispatcher: src/gpu/kernels/ring.rs.

// Keep in sync with `RingParams` in src/gpu/kernels/ring.rs (size checked by a test).
struct RingParams {
    // Jobs in this dispatch.
    jobs: u32,
    // Index of this dispatch's first job in `jobs` and `out`.
    first: u32,
    pad0: u32,
    pad1: u32,
}

// Keep in sync with src/cpu/ring.rs.
const WG: u32 = 64u;
const SIDE: u32 = 31u;
const NPIX: u32 = 961u;
const CELL: u32 = 2883u;
const TAPS: u32 = 6u;
const MAX_WINDOWS: u32 = 8u;
const JOB_STRIDE: u32 = 16u;
const ENTRY_STRIDE: u32 = 18u;
const OUT_STRIDE: u32 = 24u;
// The 5×5 box whose mean weight an epoch's PSF gets (cpu::stack::CORE_RADIUS = 2).
const CORE_RADIUS: i32 = 2;

@group(0) @binding(0) var<uniform> prm: RingParams;
// The cells: per cell D, V, VT planes of NPIX each.
@group(0) @binding(1) var<storage, read> cells: array<f32>;
// Per job: first entry, entries, windows, px, py, fx bits, fy bits, largest h, then the
// windows' epoch counts (MAX_WINDOWS).
@group(0) @binding(2) var<storage, read> jobs: array<u32>;
// Per entry: kx[6], ky[6], ix, iy, c, sigma, h, cell bits.
@group(0) @binding(3) var<storage, read> entries: array<f32>;
// Per entry: the PSF weight and 1/Z of its Gaussian (written here, read after the barrier).
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;
// Per job: MAX_WINDOWS × (num, den, centre usable).
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> red_num: array<f32, 512>;
var<workgroup> red_den: array<f32, 512>;

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn usable(d: f32, v: f32, vt: f32) -> bool {
    return finite(d) && finite(v) && v > 0.0 && finite(vt) && vt >= 0.0;
}

// Entry `g`'s square shifted onto the common grid at pixel (x, y): (D', V', VT', 1), or all 0
// where masked.
fn shifted(g: u32, x: i32, y: i32) -> vec4<f32> {
    let b = g * ENTRY_STRIDE;
    let ix = i32(entries[b + 2u * TAPS]);
    let iy = i32(entries[b + 2u * TAPS + 1u]);
    let base = bitcast<u32>(entries[b + 2u * TAPS + 5u]) * CELL;
    var s = vec3<f32>(0.0, 0.0, 0.0);
    for (var j = 0u; j < TAPS; j++) {
        let ky = entries[b + TAPS + j];
        if (ky == 0.0) {
            continue;
        }
        let sy = y + iy + i32(j) - 2;
        if (sy < 0 || sy >= i32(SIDE)) {
            return vec4<f32>(0.0);
        }
        for (var t = 0u; t < TAPS; t++) {
            let kx = entries[b + t];
            if (kx == 0.0) {
                continue;
            }
            let sx = x + ix + i32(t) - 2;
            if (sx < 0 || sx >= i32(SIDE)) {
                return vec4<f32>(0.0);
            }
            let p = base + u32(sy) * SIDE + u32(sx);
            let d = cells[p];
            let v = cells[NPIX + p];
            let vt = cells[2u * NPIX + p];
            if (!usable(d, v, vt)) {
                return vec4<f32>(0.0);
            }
            let k = kx * ky;
            s += vec3<f32>(k * d, k * k * v, k * k * vt);
        }
    }
    return vec4<f32>(s, 1.0);
}

// exp(−(x − f)² / 2σ²)
fn gauss(x: f32, f: f32, sigma: f32) -> f32 {
    let u = (x - f) / sigma;
    return exp(-0.5 * u * u);
}

@compute @workgroup_size(64, 1, 1)
fn ring(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    // Uniform across the workgroup: every invocation returns, or none does.
    if (wid.x >= prm.jobs) {
        return;
    }
    let job = prm.first + wid.x;
    let jb = job * JOB_STRIDE;
    let e0 = jobs[jb];
    let ne = jobs[jb + 1u];
    let nw = min(jobs[jb + 2u], MAX_WINDOWS);
    let px = i32(jobs[jb + 3u]);
    let py = i32(jobs[jb + 4u]);
    let fx = bitcast<f32>(jobs[jb + 5u]);
    let fy = bitcast<f32>(jobs[jb + 6u]);
    let hmax = i32(jobs[jb + 7u]);

    // Phase 1: each epoch's PSF weight (its mean c/V' over the centre box) and 1/Z.
    for (var k = li; k < ne; k += WG) {
        let g = e0 + k;
        let b = g * ENTRY_STRIDE;
        let c = entries[b + 2u * TAPS + 2u];
        let centre = i32(SIDE / 2u);
        var wsum = 0.0;
        for (var y = centre - CORE_RADIUS; y <= centre + CORE_RADIUS; y++) {
            for (var x = centre - CORE_RADIUS; x <= centre + CORE_RADIUS; x++) {
                let s = shifted(g, x, y);
                if (s.w > 0.0) {
                    wsum += c / s.y;
                }
            }
        }
        let sigma = entries[b + 2u * TAPS + 3u];
        let h = i32(entries[b + 2u * TAPS + 4u]);
        var zx = 0.0;
        var zy = 0.0;
        for (var u = -h; u <= h; u++) {
            zx += gauss(f32(u), fx, sigma);
            zy += gauss(f32(u), fy, sigma);
        }
        let n = f32((2 * CORE_RADIUS + 1) * (2 * CORE_RADIUS + 1));
        weights[2u * g] = wsum / n;
        weights[2u * g + 1u] = 1.0 / (zx * zy);
    }
    storageBarrier();
    workgroupBarrier();

    // Phase 2: the footprint's pixels, spread over the invocations.
    var num = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    var den = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let fs = 2 * hmax + 1;
    let ob = job * OUT_STRIDE;
    for (var q = i32(li); q < fs * fs; q += i32(WG)) {
        let u = q % fs - hmax;
        let v = q / fs - hmax;
        let x = px + u;
        let y = py + v;
        if (x < 0 || y < 0 || x >= i32(SIDE) || y >= i32(SIDE)) {
            continue;
        }
        var wsum = 0.0;
        var sd = 0.0;
        var a = 0.0;
        var bt = 0.0;
        var used = 0u;
        var wtot = 0.0;
        var pw = 0.0;
        var pe = 0.0;
        var hrun = 0;
        var w = 0u;
        for (var k = 0u; k < ne; k++) {
            let g = e0 + k;
            let b = g * ENTRY_STRIDE;
            let s = shifted(g, x, y);
            if (s.w > 0.0) {
                let c = entries[b + 2u * TAPS + 2u];
                let ve = s.y / c;
                let vte = min(s.z / c, ve);
                let wt = 1.0 / ve;
                wsum += wt;
                sd += wt * s.x;
                a += wt * wt * (ve - vte);
                bt += wt * sqrt(vte);
                used += 1u;
            }
            let h = i32(entries[b + 2u * TAPS + 4u]);
            hrun = max(hrun, h);
            let wk = weights[2u * g];
            wtot += wk;
            if (abs(u) <= h && abs(v) <= h) {
                let sigma = entries[b + 2u * TAPS + 3u];
                let gv = gauss(f32(u), fx, sigma) * gauss(f32(v), fy, sigma) * weights[2u * g + 1u];
                pw += wk * gv;
                pe += gv;
            }
            if (w < nw && k + 1u == jobs[jb + 8u + w]) {
                // The window's stack at this pixel.
                var ok = false;
                var st = 0.0;
                var var_s = 0.0;
                if (used > 0u) {
                    let bw = bt / wsum;
                    st = sd / wsum;
                    var_s = a / wsum / wsum + bw * bw;
                    ok = finite(st) && finite(var_s) && var_s > 0.0;
                }
                if (u == 0 && v == 0) {
                    out[ob + 3u * w + 2u] = select(0.0, 1.0, ok);
                }
                if (ok && abs(u) <= hrun && abs(v) <= hrun) {
                    var p = pe / f32(k + 1u);
                    if (wtot > 0.0 && finite(wtot)) {
                        p = pw / wtot;
                    }
                    num[w] += p * st / var_s;
                    den[w] += p * p / var_s;
                }
                w += 1u;
            }
        }
    }
    for (var w = 0u; w < MAX_WINDOWS; w++) {
        red_num[w * WG + li] = num[w];
        red_den[w * WG + li] = den[w];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (li < stride) {
            for (var w = 0u; w < MAX_WINDOWS; w++) {
                red_num[w * WG + li] += red_num[w * WG + li + stride];
                red_den[w * WG + li] += red_den[w * WG + li + stride];
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        for (var w = 0u; w < nw; w++) {
            out[ob + 3u * w] = red_num[w * WG];
            out[ob + 3u * w + 1u] = red_den[w * WG];
        }
    }
}
