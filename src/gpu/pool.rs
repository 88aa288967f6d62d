//! Buffers pooled by usage and size class (the next power of two, at least 4 KiB), so batches of
//! similar size reuse the same allocations instead of creating buffers per batch.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct BufferPool {
    free: HashMap<(u32, u64), Vec<wgpu::Buffer>>,
}

/// The size class a request of `size` bytes is served from.
pub fn size_class(size: u64) -> u64 {
    size.max(4096).next_power_of_two()
}

impl BufferPool {
    pub fn new() -> BufferPool {
        BufferPool::default()
    }

    /// A buffer of at least `size` bytes with exactly `usage`, reused when one is free.
    pub fn acquire(&mut self, device: &wgpu::Device, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let class = size_class(size);
        if let Some(buf) = self.free.get_mut(&(usage.bits(), class)).and_then(|v| v.pop()) {
            return buf;
        }
        device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: class, usage, mapped_at_creation: false })
    }

    /// Give a buffer back for the next batch.
    pub fn release(&mut self, buf: wgpu::Buffer) {
        self.free.entry((buf.usage().bits(), buf.size())).or_default().push(buf);
    }

    /// Buffers currently free in the pool.
    pub fn free_count(&self) -> usize {
        self.free.values().map(Vec::len).sum()
    }
}
