//! [`Block`]: one piece of memory holding tensors (a host buffer, a GPU
//! allocation, a daemon's leased copy), handed to Python, which builds numpy
//! arrays or torch tensors on it without copying (`__array_interface__`,
//! `__cuda_array_interface__`). Every array keeps its block alive, and the
//! block owns the memory (or the lease that keeps the daemon's copy put), so
//! memory outlives the tensors on it.

use flash_load::TensorView;
use flash_sys::cuda::DeviceMemory;
use flash_sys::shm::ShmFile;
use pyo3::exceptions::PyAttributeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where a block's bytes live, and what keeps them alive.
pub enum Memory {
    /// Loaded in this process into host memory.
    Host(flash_load::HostModel),
    /// Loaded in this process onto a GPU.
    Gpu(flash_load::GpuModel),
    /// A GPU allocation of this process (copy mode: the daemon filled it).
    GpuOwned(DeviceMemory),
    /// A shared-memory file of this process (copy mode on the CPU).
    Shm(ShmFile),
    /// The daemon's GPU copy, mapped through CUDA IPC (share mode). Field
    /// order matters: the mapping closes before the lease ends.
    GpuLease {
        mem: std::sync::Arc<DeviceMemory>,
        _lease: LeaseGuard,
    },
    /// The daemon's memory-tier copy (share mode): Python maps the file
    /// (copy-on-write, so writes stay private) and keeps this block alive.
    ShmLease {
        path: PathBuf,
        offset: u64,
        _lease: LeaseGuard,
    },
    /// Nothing (a model without tensor bytes).
    Empty,
}

/// Ends a lease when dropped (the last tensor of the block is gone).
pub struct LeaseGuard {
    pub client: Arc<Mutex<Option<flash_client::Client>>>,
    pub id: u64,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut guard = match self.client.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = guard.as_mut() {
            // A failure means the session is gone, and the daemon released
            // the lease with it.
            let _ = c.release_id(self.id);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    Cpu,
    Cuda(u32),
}

/// Memory holding tensors, with their table.
#[pyclass(frozen, module = "flashtensors._native")]
pub struct Block {
    mem: Memory,
    dev: Dev,
    address: u64,
    nbytes: u64,
    readonly: bool,
    tensors: Vec<TensorView>,
    /// Facts of the load for reports (tier, served_from, seconds...).
    facts: Vec<(String, String)>,
}

impl Block {
    pub fn new(mem: Memory, tensors: Vec<TensorView>) -> Block {
        let (dev, address, nbytes, readonly) = match &mem {
            Memory::Host(m) => {
                let b = m.buffer();
                (Dev::Cpu, b.as_ptr() as u64, b.len() as u64, false)
            }
            Memory::Gpu(m) => (
                Dev::Cuda(m.mem.gpu().ordinal() as u32),
                m.mem.device_ptr(),
                m.mem.len() as u64,
                false,
            ),
            Memory::GpuOwned(m) => (
                Dev::Cuda(m.gpu().ordinal() as u32),
                m.device_ptr(),
                m.len() as u64,
                false,
            ),
            Memory::GpuLease { mem: m, .. } => (
                Dev::Cuda(m.gpu().ordinal() as u32),
                m.device_ptr(),
                m.len() as u64,
                false,
            ),
            Memory::Shm(f) => (Dev::Cpu, f.as_ptr() as u64, f.len() as u64, false),
            Memory::ShmLease { .. } => (Dev::Cpu, 0, 0, true),
            Memory::Empty => (Dev::Cpu, 0, 0, false),
        };
        let nbytes = match &mem {
            Memory::ShmLease { .. } => tensors
                .iter()
                .map(|t| t.offset + t.length)
                .max()
                .unwrap_or(0),
            _ => nbytes,
        };
        Block {
            mem,
            dev,
            address,
            nbytes,
            readonly,
            tensors,
            facts: Vec::new(),
        }
    }

    pub fn with_nbytes(mut self, nbytes: u64) -> Block {
        if matches!(self.mem, Memory::ShmLease { .. }) {
            self.nbytes = nbytes;
        }
        self
    }

    pub fn with_fact(mut self, key: &str, value: impl ToString) -> Block {
        self.facts.push((key.to_string(), value.to_string()));
        self
    }
}

fn interface<'py>(
    py: Python<'py>,
    address: u64,
    nbytes: u64,
    readonly: bool,
    cuda: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("shape", PyTuple::new(py, [nbytes])?)?;
    d.set_item("typestr", "|u1")?;
    d.set_item("data", (address, readonly))?;
    d.set_item("version", 3)?;
    if cuda {
        // No stream: the bytes are complete (loads synchronise before
        // returning), so consumers need not wait on anything.
        d.set_item("stream", py.None())?;
    } else {
        d.set_item("strides", py.None())?;
    }
    Ok(d)
}

#[pymethods]
impl Block {
    /// `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> String {
        match self.dev {
            Dev::Cpu => "cpu".into(),
            Dev::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// GPU ordinal, or None on the CPU.
    #[getter]
    fn device_index(&self) -> Option<u32> {
        match self.dev {
            Dev::Cpu => None,
            Dev::Cuda(n) => Some(n),
        }
    }

    #[getter]
    fn address(&self) -> u64 {
        self.address
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    #[getter]
    fn readonly(&self) -> bool {
        self.readonly
    }

    /// What kind of memory: `host`, `gpu`, `gpu-copy`, `shm-copy`,
    /// `gpu-lease`, `shm-lease`, `empty`.
    #[getter]
    fn kind(&self) -> &'static str {
        match self.mem {
            Memory::Host(_) => "host",
            Memory::Gpu(_) => "gpu",
            Memory::GpuOwned(_) => "gpu-copy",
            Memory::Shm(_) => "shm-copy",
            Memory::GpuLease { .. } => "gpu-lease",
            Memory::ShmLease { .. } => "shm-lease",
            Memory::Empty => "empty",
        }
    }

    /// For a memory-tier lease: `(path, offset, nbytes)` of the daemon's
    /// shared-memory file to map; None otherwise.
    #[getter]
    fn shm_location(&self) -> Option<(String, u64, u64)> {
        match &self.mem {
            Memory::ShmLease { path, offset, .. } => {
                Some((path.display().to_string(), *offset, self.nbytes))
            }
            _ => None,
        }
    }

    /// `[(name, dtype, shape, offset, length)]`, dtype named as safetensors
    /// names it (`"BF16"`); offsets from the block's start. Aliases (tied
    /// tensors) share their target's offset.
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.tensors
            .iter()
            .map(|t| {
                PyTuple::new(
                    py,
                    [
                        t.name.as_str().into_pyobject(py)?.into_any(),
                        t.dtype.name().into_pyobject(py)?.into_any(),
                        PyTuple::new(py, &t.shape)?.into_any(),
                        t.offset.into_pyobject(py)?.into_any(),
                        t.length.into_pyobject(py)?.into_any(),
                    ],
                )
            })
            .collect()
    }

    /// Facts of the load: `{"tier": ..., "served_from": ..., "seconds": ...}`.
    #[getter]
    fn facts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.facts {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// numpy's array interface over the whole block (bytes), for host memory.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match (&self.mem, self.dev) {
            (Memory::ShmLease { .. }, _) => Err(PyAttributeError::new_err(
                "a memory-tier lease is mapped from its shm_location",
            )),
            (_, Dev::Cpu) => interface(py, self.address, self.nbytes, self.readonly, false),
            (_, Dev::Cuda(_)) => Err(PyAttributeError::new_err(
                "GPU memory: use __cuda_array_interface__",
            )),
        }
    }

    /// The CUDA array interface over the whole block (bytes), for GPU memory.
    #[getter]
    fn __cuda_array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match self.dev {
            Dev::Cuda(_) => interface(py, self.address, self.nbytes, self.readonly, true),
            Dev::Cpu => Err(PyAttributeError::new_err(
                "host memory: use __array_interface__",
            )),
        }
    }

    fn __len__(&self) -> usize {
        self.tensors.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<flashtensors Block {} {} tensors, {} bytes on {}>",
            self.kind(),
            self.tensors.len(),
            self.nbytes,
            self.device()
        )
    }
}
