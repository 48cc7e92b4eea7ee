//! The daemon's client (`flash-client`, gRPC over the Unix socket) for Python.

use crate::block::{Block, LeaseGuard, Memory};
use crate::errors::{client_err, device, flash, invalid};
use flash_client::{Client, Location, Place, PullSpec, Region, Target};
use flash_format::DType;
use flash_load::TensorView;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A connection to the daemon. Thread-safe: calls are serialised, and the
/// GIL is released while one waits for the daemon.
#[pyclass(frozen, module = "flashtensors._native", name = "Client")]
pub struct PyClient {
    /// Shared with the [`LeaseGuard`]s of live blocks: the connection (and
    /// with it the session that owns the leases) lives until the last of
    /// them is gone, even after `close()`.
    inner: Arc<Mutex<Option<Client>>>,
    closed: AtomicBool,
    target: String,
}

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| flash(format!("internal: {e}")))
}

fn place(tier: &str) -> PyResult<Place> {
    tier.parse().map_err(invalid)
}

fn views(tensors: &[flash_client::TensorInfo]) -> PyResult<Vec<TensorView>> {
    tensors
        .iter()
        .map(|t| {
            let dtype: DType = t
                .dtype
                .parse()
                .map_err(|e| flash(format!("the daemon sent tensor {:?}: {e}", t.name)))?;
            Ok(TensorView {
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
                offset: t.offset,
                length: t.length,
            })
        })
        .collect()
}

fn gpu(n: u32) -> PyResult<flash_sys::cuda::Gpu> {
    let cuda = flash_sys::cuda::probe().map_err(|e| {
        device(format!(
            "GPU {n} asked for, but CUDA is not usable here: {e}"
        ))
    })?;
    if n as usize >= cuda.device_count() {
        return Err(device(format!(
            "GPU {n} asked for, but this machine has {} GPU(s)",
            cuda.device_count()
        )));
    }
    cuda.device(n as usize).map_err(|e| device(e.to_string()))
}

impl PyClient {
    /// Runs `f` on the client with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Client) -> flash_client::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = self.inner.clone();
        let target = self.target.clone();
        if self.closed.load(Ordering::Acquire) {
            return Err(crate::errors::DaemonNotRunningError::new_err(format!(
                "this connection to {target} is closed"
            )));
        }
        py.detach(move || {
            let mut g = match inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match g.as_mut() {
                Some(c) => f(c).map_err(Err),
                None => Err(Ok(target)),
            }
        })
        .map_err(|e| match e {
            Ok(target) => crate::errors::DaemonNotRunningError::new_err(format!(
                "this connection to {target} is closed"
            )),
            Err(e) => client_err(e),
        })
    }
}

#[pymethods]
impl PyClient {
    /// Connects to the daemon of the store at `home` (its `flash.sock`).
    #[new]
    fn new(py: Python<'_>, home: PathBuf) -> PyResult<Self> {
        let c = py.detach(|| Client::connect(&home)).map_err(client_err)?;
        Ok(PyClient {
            target: c.target().to_string(),
            inner: Arc::new(Mutex::new(Some(c))),
            closed: AtomicBool::new(false),
        })
    }

    /// Connects over TCP (`host:port`) with the daemon's token.
    #[staticmethod]
    fn tcp(py: Python<'_>, addr: String, token: String) -> PyResult<Self> {
        let c = py
            .detach(|| Client::connect_tcp(&addr, &token))
            .map_err(client_err)?;
        Ok(PyClient {
            target: c.target().to_string(),
            inner: Arc::new(Mutex::new(Some(c))),
            closed: AtomicBool::new(false),
        })
    }

    #[getter]
    fn target(&self) -> String {
        self.target.clone()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection for new calls. Leases still held by live
    /// tensors keep it (and their session) open until the last is gone.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if Arc::strong_count(&self.inner) == 1 {
            let mut g = match self.inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *g = None;
        }
    }

    fn status(&self, py: Python<'_>) -> PyResult<String> {
        json(&self.with(py, |c| c.status())?)
    }

    fn list(&self, py: Python<'_>) -> PyResult<String> {
        json(&self.with(py, |c| c.list())?)
    }

    fn info(&self, py: Python<'_>, model: String) -> PyResult<Option<String>> {
        self.with(py, move |c| c.info(&model))?
            .as_ref()
            .map(json)
            .transpose()
    }

    #[pyo3(signature = (model, from_dir=None, revision=None, dtype=None, force=false, compress=None))]
    #[allow(clippy::too_many_arguments)]
    fn pull(
        &self,
        py: Python<'_>,
        model: String,
        from_dir: Option<PathBuf>,
        revision: Option<String>,
        dtype: Option<String>,
        force: bool,
        compress: Option<bool>,
    ) -> PyResult<String> {
        let spec = PullSpec {
            model,
            from_dir,
            revision,
            dtype,
            force,
            compress,
        };
        json(&self.with(py, move |c| c.pull(&spec))?)
    }

    #[pyo3(signature = (model, tier="", keep=false))]
    fn load(&self, py: Python<'_>, model: String, tier: &str, keep: bool) -> PyResult<String> {
        let p = place(tier)?;
        json(&self.with(py, move |c| c.load(&model, p, keep))?)
    }

    #[pyo3(signature = (model, tier=""))]
    fn unload(&self, py: Python<'_>, model: String, tier: &str) -> PyResult<String> {
        let p = place(tier)?;
        json(&self.with(py, move |c| c.unload(&model, p))?)
    }

    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.shutdown())
    }

    fn release(&self, py: Python<'_>, lease_id: u64) -> PyResult<()> {
        self.with(py, move |c| c.release_id(lease_id))
    }

    /// Share mode: leases the daemon's copy of `model` in `tier` (`memory`,
    /// `gpu:N`, or "" for the daemon's choice) and returns a block on it:
    /// for a GPU copy, mapped here through CUDA IPC; for a memory copy, the
    /// file range to map (`Block.shm_location`). The lease ends when the
    /// block is garbage collected.
    #[pyo3(signature = (model, tier=""))]
    fn acquire(&self, py: Python<'_>, model: String, tier: &str) -> PyResult<Block> {
        let p = place(tier)?;
        if let Place::Gpu(n) = p {
            gpu(n)?; // a wrong GPU fails here, before the daemon loads anything
        }
        let lease = self.with(py, move |c| c.acquire(&model, p))?;
        let guard = LeaseGuard {
            client: self.inner.clone(),
            id: lease.id,
        };
        let tensors = views(&lease.tensors)?;
        let block = match &lease.location {
            Location::Cuda { device, .. } => {
                let g = gpu(*device)?;
                let mem = py.detach(|| lease.map_gpu(&g)).map_err(client_err)?;
                Block::new(Memory::GpuLease { mem, _lease: guard }, tensors)
            }
            Location::Shm { path, offset, size } => Block::new(
                Memory::ShmLease {
                    path: path.clone(),
                    offset: *offset,
                    _lease: guard,
                },
                tensors,
            )
            .with_nbytes(*size),
        };
        Ok(block
            .with_fact("lease_id", lease.id)
            .with_fact("tier", &lease.tier)
            .with_fact("served_from", &lease.served_from)
            .with_fact("seconds", lease.seconds))
    }

    /// Copy mode into host memory of this process: the daemon fills a new
    /// shared-memory file with the model's image.
    fn fill_host(&self, py: Python<'_>, model: String) -> PyResult<Block> {
        let (file, info, reply) = self.with(py, move |c| c.fill_shm(&model))?;
        let tensors = views(&info.tensors)?;
        Ok(Block::new(Memory::Shm(file), tensors)
            .with_fact("served_from", &reply.source_tier)
            .with_fact("loaded_from", &reply.loaded_from)
            .with_fact("seconds", reply.seconds))
    }

    /// Copy mode onto GPU `device`: a new allocation of this process that
    /// the daemon fills (from its fastest copy) through CUDA IPC.
    fn fill_gpu(&self, py: Python<'_>, model: String, device: u32) -> PyResult<Block> {
        let g = gpu(device)?;
        let m = model.clone();
        let info = self.with(py, move |c| c.info(&m))?.ok_or_else(|| {
            crate::errors::ModelNotFoundError::new_err(format!("model {model} is not in the store"))
        })?;
        let tensors = views(&info.tensors)?;
        let len = info.image_bytes;
        let mem = g.alloc(len.max(1) as usize).map_err(|e| {
            crate::errors::BudgetFullError::new_err(format!(
                "cannot allocate {len} bytes on GPU {device} for {model}: {e}"
            ))
        })?;
        if len == 0 {
            return Ok(Block::new(Memory::GpuOwned(mem), tensors));
        }
        let handle = mem.ipc_handle().map_err(|e| flash(e.to_string()))?;
        let regions = [Region {
            target: Target::Cuda {
                ipc_handle: handle,
                device,
            },
            dst_offset: 0,
            src_offset: 0,
            length: len,
        }];
        let reply = self.with(py, move |c| c.fill(&model, Place::Auto, &regions))?;
        Ok(Block::new(Memory::GpuOwned(mem), tensors)
            .with_fact("served_from", &reply.source_tier)
            .with_fact("loaded_from", &reply.loaded_from)
            .with_fact("seconds", reply.seconds))
    }

    fn __repr__(&self) -> String {
        format!("<flashtensors Client {}>", self.target)
    }
}

/// True when a daemon answers on the socket of the store at `home`.
#[pyfunction]
pub fn daemon_running(py: Python<'_>, home: PathBuf) -> bool {
    py.detach(|| Client::connect(&home).and_then(|c| c.status()).is_ok())
}
