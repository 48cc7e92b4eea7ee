//! `flashtensors._native`: the Rust half of the Python SDK (see
//! `python/flashtensors`). Loads and saves in-process (flash-load,
//! flash-format), the store (flash-store, flash-hub), and the daemon's client
//! (flash-client). Memory is handed to Python as `Block`s (`block.rs`), on which
//! the Python half builds numpy arrays and torch tensors without copying.
#![forbid(unsafe_code)]

mod block;
mod daemon;
mod errors;
mod local;
mod store;

use pyo3::prelude::*;

/// The CUDA devices this process sees (0 without a usable driver), and why not.
#[pyfunction]
fn cuda_devices() -> (usize, Option<String>) {
    match flash_sys::cuda::probe() {
        Ok(c) => (c.device_count(), None),
        Err(e) => (0, Some(e.to_string())),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<block::Block>()?;
    m.add_class::<daemon::PyClient>()?;
    m.add_function(wrap_pyfunction!(local::load_local, m)?)?;
    m.add_function(wrap_pyfunction!(local::save_flash, m)?)?;
    m.add_function(wrap_pyfunction!(local::save_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(local::read_table, m)?)?;
    m.add_function(wrap_pyfunction!(store::store_list, m)?)?;
    m.add_function(wrap_pyfunction!(store::store_info, m)?)?;
    m.add_function(wrap_pyfunction!(store::store_model_dir, m)?)?;
    m.add_function(wrap_pyfunction!(store::store_import, m)?)?;
    m.add_function(wrap_pyfunction!(store::hub_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(daemon::daemon_running, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_devices, m)?)?;
    Ok(())
}
