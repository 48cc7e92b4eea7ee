//! [`DevView`]: a byte range of a [`DeviceMemory`], checked against its
//! allocation when made. Kernels get device memory only as views (see
//! [`crate::module::LaunchArgs`]), and every op checks each view's size,
//! alignment and GPU against its shapes before anything is queued.
//!
//! Device memory outlives queued work because [`DeviceMemory`]'s drop
//! synchronises its context before freeing, so a view's borrow may end as
//! soon as the work is queued.

use crate::ffi;
use flash_sys::cuda::{check_range, CudaError, DeviceMemory, Gpu};

/// A byte range of device memory, checked against its allocation. Cheap to
/// copy; borrows the allocation.
#[derive(Debug, Clone, Copy)]
pub struct DevView<'a> {
    mem: &'a DeviceMemory,
    offset: usize,
    len: usize,
}

impl<'a> DevView<'a> {
    /// `mem[offset..offset + len]`; refused when outside the allocation.
    pub fn new(mem: &'a DeviceMemory, offset: usize, len: usize) -> Result<Self, CudaError> {
        check_range("device view", offset, len, mem.len())?;
        Ok(DevView { mem, offset, len })
    }

    /// The whole allocation.
    pub fn whole(mem: &'a DeviceMemory) -> Self {
        DevView {
            mem,
            offset: 0,
            len: mem.len(),
        }
    }

    /// `self[offset..offset + len]`.
    pub fn sub(&self, offset: usize, len: usize) -> Result<Self, CudaError> {
        check_range("device sub-view", offset, len, self.len)?;
        Ok(DevView {
            mem: self.mem,
            offset: self.offset + offset,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first byte.
    pub fn device_ptr(&self) -> u64 {
        self.mem.device_ptr() + self.offset as u64
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.mem.gpu()
    }

    /// Refuses a view shorter than `bytes`.
    pub fn require(&self, what: &str, bytes: usize) -> Result<(), CudaError> {
        if self.len < bytes {
            return Err(CudaError::Usage(format!(
                "{what}: the view holds {} bytes, {bytes} are needed",
                self.len
            )));
        }
        Ok(())
    }

    /// Refuses a view whose first byte is not `align`-byte aligned.
    pub fn aligned(&self, what: &str, align: u64) -> Result<(), CudaError> {
        if self.device_ptr() % align != 0 {
            return Err(CudaError::Usage(format!(
                "{what}: device address {:#x} is not {align}-byte aligned",
                self.device_ptr()
            )));
        }
        Ok(())
    }

    /// Refuses a view of another GPU's memory than `gpu`.
    pub fn same_gpu(&self, gpu: &Gpu, what: &str) -> Result<(), CudaError> {
        if self.mem.gpu() != gpu {
            return Err(CudaError::Usage(format!(
                "{what}: memory of GPU {} used on GPU {}",
                self.mem.gpu().ordinal(),
                gpu.ordinal()
            )));
        }
        Ok(())
    }

    /// Downloads the view (after all queued work on its GPU).
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<(), CudaError> {
        check_range("view download", 0, dst.len(), self.len)?;
        self.mem.copy_to_host(self.offset, dst)
    }

    /// Uploads into the view (after all queued work on its GPU).
    pub fn copy_from_host(&self, src: &[u8]) -> Result<(), CudaError> {
        check_range("view upload", 0, src.len(), self.len)?;
        self.mem.copy_from_host(self.offset, src)
    }

    /// Downloads `dst.len()` f32 values from the start of the view.
    pub fn copy_to_host_f32(&self, dst: &mut [f32]) -> Result<(), CudaError> {
        self.copy_to_host(ffi::f32s_as_bytes_mut(dst))
    }

    /// Uploads i32 values (token ids) to the start of the view.
    pub fn copy_from_host_i32(&self, src: &[i32]) -> Result<(), CudaError> {
        self.copy_from_host(ffi::i32s_as_bytes(src))
    }
}
