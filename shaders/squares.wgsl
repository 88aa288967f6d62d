// squares: each stamp's difference, variance and template share (a²·ConvV) cut to the square of
// side SQUARE_SIDE centred on the candidate's pixel (floor(cand + 0.5)), NaN where the pixel is
// masked (weight 0) or off the stamp: what the history store keeps of a stamp (issue 5). Written
// stamp after stamp into the work buffer's first planes (the convolution's row planes, free once
// `convolve` has run; the square is never larger than a stamp when this runs), so that only
// these 3·n·SQUARE_SIDE² floats are read back instead of three whole planes.
// One invocation per square pixel; workgroups (ceil(side²/WG), n).
// CPU twin: `engine::StampSquares::from_planes` on `StampPlanes::from_images`;
// dispatcher: src/gpu/kernels/squares.rs.

// Keep in sync with `SQUARE_HALF` in src/gpu/kernels/squares.rs (checked by a test).
const SQUARE_SIDE: u32 = 31u;

@compute @workgroup_size(WG)
fn squares(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.y;
    let k = gid.x;
    let area = SQUARE_SIDE * SQUARE_SIDE;
    if (s >= batch.n || k >= area) {
        return;
    }
    let half = i32(SQUARE_SIDE / 2u);
    let st = stamps[s];
    let x = i32(floor(st.cand_x + 0.5)) - half + i32(k % SQUARE_SIDE);
    let y = i32(floor(st.cand_y + 0.5)) - half + i32(k / SQUARE_SIDE);
    let nan = bitcast<f32>(0x7fc00000u);
    var d = nan;
    var v = nan;
    var t = nan;
    if (x >= 0 && y >= 0 && x < i32(batch.width) && y < i32(batch.height)) {
        let i = u32(y) * batch.width + u32(x);
        if (pix[plane(PIX_WEIGHT, s) + i] > 0.0) {
            let a = results[s * RESULT_STRIDE];
            d = work[plane(WORK_DIFF, s) + i];
            v = work[plane(WORK_VAR, s) + i];
            t = a * a * work[plane(WORK_CONV_V, s) + i];
        }
    }
    let o = s * area + k;
    let len = batch.n * area;
    work[o] = d;
    work[len + o] = v;
    work[2u * len + o] = t;
}
