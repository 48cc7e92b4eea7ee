//! Rust errors as the Python exceptions of `flashtensors.errors`.

use flash_load::LoadError;
use flash_store::StoreError;
use pyo3::PyErr;

pyo3::import_exception!(flashtensors.errors, FlashError);
pyo3::import_exception!(flashtensors.errors, ModelNotFoundError);
pyo3::import_exception!(flashtensors.errors, DaemonNotRunningError);
pyo3::import_exception!(flashtensors.errors, BudgetFullError);
pyo3::import_exception!(flashtensors.errors, DeviceError);
pyo3::import_exception!(flashtensors.errors, InvalidRequestError);
pyo3::import_exception!(flashtensors.errors, FormatError);

pub fn load_err(e: LoadError) -> PyErr {
    match e {
        LoadError::Device(m) => DeviceError::new_err(m),
        LoadError::Io { .. } => FlashError::new_err(e.to_string()),
        other => FormatError::new_err(other.to_string()),
    }
}

pub fn store_err(e: StoreError) -> PyErr {
    match e {
        StoreError::NotFound(_) => ModelNotFoundError::new_err(e.to_string()),
        StoreError::Name(_) | StoreError::Split { .. } => {
            InvalidRequestError::new_err(e.to_string())
        }
        StoreError::Exists(_) => InvalidRequestError::new_err(e.to_string()),
        StoreError::Load(l) => load_err(l),
        other => FlashError::new_err(other.to_string()),
    }
}

pub fn client_err(e: flash_client::ClientError) -> PyErr {
    use flash_client::ClientError as C;
    let msg = e.to_string();
    match e {
        C::NotRunning { .. } => DaemonNotRunningError::new_err(msg),
        C::UnknownModel(_) => ModelNotFoundError::new_err(msg),
        C::NoSpace(_) => BudgetFullError::new_err(msg),
        C::BadRequest(_) => InvalidRequestError::new_err(msg),
        C::Unauthorized(_) => pyo3::exceptions::PyPermissionError::new_err(msg),
        _ => FlashError::new_err(msg),
    }
}

pub fn flash(msg: impl Into<String>) -> PyErr {
    FlashError::new_err(msg.into())
}

pub fn device(msg: impl Into<String>) -> PyErr {
    DeviceError::new_err(msg.into())
}

pub fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidRequestError::new_err(msg.into())
}
