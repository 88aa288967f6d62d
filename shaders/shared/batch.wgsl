// Declarations shared by every engine kernel: parameter structs, plane indices, bindings.
// Prepended to each shaders/<k>.wgsl when its module is built (src/gpu/kernels/mod.rs
// `shader_source`) and when build.rs validates it.
// Keep in sync with `BatchParams` in src/gpu/kernels/mod.rs (size checked by a test).
struct BatchParams {
    width: u32,
    height: u32,
    // Stamps in this dispatch and pixels per stamp.
    n: u32,
    npix: u32,
};

// Keep in sync with `StampGpu` in src/gpu/kernels/mod.rs (size checked by a test).
struct StampGpu {
    kernel_sigma: f32,
    cand_x: f32,
    cand_y: f32,
    fit_radius: f32,
    // > 0: the flux scale to use instead of fitting it (only the background is fitted).
    fixed_scale: f32,
};

// Workgroup size; keep in sync with `WORKGROUP_SIZE` in src/gpu/kernels/mod.rs.
const WG: u32 = 256u;

// Planes of `pix` (inputs) and `work` (intermediates), each `n * npix` floats; keep in sync with
// `Pix` and `Work` in src/gpu/kernels/mod.rs.
const PIX_SCIENCE: u32 = 0u;
const PIX_TEMPLATE: u32 = 1u;
const PIX_SCIENCE_VAR: u32 = 2u;
const PIX_TEMPLATE_VAR: u32 = 3u;
const PIX_WEIGHT: u32 = 4u;
const PIX_PROFILE: u32 = 5u;
const WORK_ROW_T: u32 = 0u;
const WORK_ROW_W: u32 = 1u;
const WORK_ROW_V: u32 = 2u;
const WORK_CONV_T: u32 = 3u;
const WORK_CONV_V: u32 = 4u;
const WORK_DIFF: u32 = 5u;
const WORK_VAR: u32 = 6u;
// Per-stamp results: scale, background, flux, flux_err, score, num, den, fit status; keep in
// sync with `RESULT_STRIDE` in src/gpu/kernels/mod.rs.
const RESULT_STRIDE: u32 = 8u;

@group(0) @binding(0) var<uniform> batch: BatchParams;
@group(0) @binding(1) var<storage, read> pix: array<f32>;
@group(0) @binding(2) var<storage, read> stamps: array<StampGpu>;
@group(0) @binding(3) var<storage, read_write> work: array<f32>;
@group(0) @binding(4) var<storage, read_write> results: array<f32>;

fn plane(p: u32, s: u32) -> u32 {
    return (p * batch.n + s) * batch.npix;
}
