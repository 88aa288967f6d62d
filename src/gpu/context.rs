//! The wgpu context: instance, adapter, device, queue, and the engine's bind-group layout,
//! pipeline layout and pipelines, all built once.

use super::kernels::{convolve, difference_score, fit, shader_source, squares, WORKGROUP_SIZE};
use crate::engine::EngineError;

/// The compute pipelines, one per entry point.
#[derive(Debug)]
pub struct Pipelines {
    pub convolve_rows: wgpu::ComputePipeline,
    pub convolve_cols: wgpu::ComputePipeline,
    pub fit: wgpu::ComputePipeline,
    pub difference_score: wgpu::ComputePipeline,
    pub squares: wgpu::ComputePipeline,
}

#[derive(Debug)]
pub struct GpuContext {
    pub adapter_info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub layout: wgpu::BindGroupLayout,
    pub pipelines: Pipelines,
    /// Held by each user of this device through a submission and its read-back: the engine's
    /// batches, and the resident stacks (`kernels::ring`) on the sink's thread. Concurrent
    /// waits on one NVIDIA device from several threads have deadlocked in the driver
    /// (docs/engine.md, "Known issue"), so they take turns.
    pub turns: std::sync::Arc<std::sync::Mutex<()>>,
}

/// "Backend | name | device type", e.g. "Gl | llvmpipe (LLVM 15.0.7, 256 bits) | Cpu": the
/// device type says honestly when the adapter is a software rasteriser.
pub fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{:?} | {} | {:?}", info.backend, info.name, info.device_type)
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Every adapter that can run compute shaders, best first, filtered by `BLINK_ADAPTER`
/// (case-insensitive substring of the adapter name) when set.
pub fn compute_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let filter = std::env::var("BLINK_ADAPTER").ok().filter(|s| !s.is_empty()).map(|s| s.to_lowercase());
    let mut adapters: Vec<wgpu::Adapter> = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .filter(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS))
        .filter(|a| filter.as_ref().is_none_or(|f| a.get_info().name.to_lowercase().contains(f)))
        .collect();
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    adapters
}

fn new_instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

impl GpuContext {
    /// Open the best compute-capable adapter (see [`compute_adapters`]) and build the pipelines.
    pub fn new() -> Result<GpuContext, EngineError> {
        let instance = new_instance();
        let adapters = compute_adapters(&instance);
        let mut last_err = None;
        for adapter in adapters {
            match GpuContext::with_adapter(adapter) {
                Ok(ctx) => return Ok(ctx),
                Err(e) => {
                    tracing::warn!(error = %e, "adapter unusable, trying the next");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            let filter = std::env::var("BLINK_ADAPTER").map(|f| format!(" matching BLINK_ADAPTER={f:?}")).unwrap_or_default();
            EngineError::NoAdapter(format!("no compute-capable wgpu adapter{filter}"))
        }))
    }

    pub fn with_adapter(adapter: wgpu::Adapter) -> Result<GpuContext, EngineError> {
        let info = adapter.get_info();
        let name = describe(&info);
        let limits = adapter.limits();
        if limits.max_compute_invocations_per_workgroup < WORKGROUP_SIZE
            || limits.max_compute_workgroup_size_x < WORKGROUP_SIZE
        {
            return Err(EngineError::Gpu(format!(
                "{name}: workgroups of {WORKGROUP_SIZE} unsupported (max {})",
                limits.max_compute_invocations_per_workgroup
            )));
        }
        if limits.max_storage_buffers_per_shader_stage < 4 {
            return Err(EngineError::Gpu(format!(
                "{name}: needs 4 storage buffers per stage, has {}",
                limits.max_storage_buffers_per_shader_stage
            )));
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("blink.engine"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| EngineError::Gpu(format!("{name}: request_device: {e}")))?;
        // Errors outside an error scope must not abort the process: log them; the scopes around
        // pipeline creation and each batch turn them into `EngineError`s.
        device.on_uncaptured_error(std::sync::Arc::new(|e: wgpu::Error| {
            tracing::error!(error = %e, "uncaptured wgpu error");
        }));
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let (layout, pipelines) = build_pipelines(&device);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(EngineError::Gpu(format!("{name}: building pipelines: {e}")));
        }
        Ok(GpuContext { adapter_info: info, limits, device, queue, layout, pipelines, turns: Default::default() })
    }

    pub fn adapter_name(&self) -> String {
        describe(&self.adapter_info)
    }

    /// Whether the adapter is a software rasteriser (llvmpipe, lavapipe, WARP): correct, but
    /// slower than the CPU code on the large full-frame kernels.
    pub fn is_software(&self) -> bool {
        self.adapter_info.device_type == wgpu::DeviceType::Cpu
    }
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn build_pipelines(device: &wgpu::Device) -> (wgpu::BindGroupLayout, Pipelines) {
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("blink.engine"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
            storage(1, true),
            storage(2, true),
            storage(3, false),
            storage(4, false),
        ],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("blink.engine"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let module = |kernel: &str| {
        let src = shader_source(kernel).unwrap_or_default();
        device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&format!("blink.{kernel}")),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        })
    };
    let pipeline = |module: &wgpu::ShaderModule, entry: &str| {
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&format!("blink.{entry}")),
            layout: Some(&pipeline_layout),
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let m_conv = module("convolve");
    let m_fit = module("fit");
    let m_diff = module("difference_score");
    let m_squares = module("squares");
    let pipelines = Pipelines {
        convolve_rows: pipeline(&m_conv, convolve::ENTRY_ROWS),
        convolve_cols: pipeline(&m_conv, convolve::ENTRY_COLS),
        fit: pipeline(&m_fit, fit::ENTRY),
        difference_score: pipeline(&m_diff, difference_score::ENTRY),
        squares: pipeline(&m_squares, squares::ENTRY),
    };
    (layout, pipelines)
}
