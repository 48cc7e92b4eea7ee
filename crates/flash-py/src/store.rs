//! The store on disk, used in-process (without the daemon), and Hub downloads.

use crate::errors::{flash, invalid, store_err};
use flash_store::{DtypeChoice, ImportOptions, ModelName, Store};
use pyo3::prelude::*;
use std::path::{Path, PathBuf};

fn name(model: &str) -> PyResult<ModelName> {
    model
        .parse()
        .map_err(|e: flash_store::name::NameError| invalid(e.to_string()))
}

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| flash(format!("internal: {e}")))
}

fn open(root: &Path) -> PyResult<Store> {
    Store::open(root).map_err(store_err)
}

/// Every model of the store at `root`, as JSON (`flash list --json`).
#[pyfunction]
pub fn store_list(py: Python<'_>, root: PathBuf) -> PyResult<String> {
    let list = py.detach(|| open(&root)?.list().map_err(store_err))?;
    json(&list)
}

/// One model's info as JSON, or None when it is not stored.
#[pyfunction]
pub fn store_info(py: Python<'_>, root: PathBuf, model: &str) -> PyResult<Option<String>> {
    let n = name(model)?;
    let r = py.detach(|| match open(&root)?.info(&n) {
        Ok(i) => Ok(Some(i)),
        Err(flash_store::StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(store_err(e)),
    })?;
    r.as_ref().map(json).transpose()
}

/// The folder of a stored model, or None.
#[pyfunction]
pub fn store_model_dir(root: PathBuf, model: &str) -> PyResult<Option<PathBuf>> {
    let n = name(model)?;
    Ok(open(&root)?.existing(&n).ok())
}

/// Imports a local Hugging Face style folder as `model` (in-process).
#[pyfunction]
#[pyo3(signature = (root, src_dir, model, dtype="auto", force=false, compress=None))]
pub fn store_import(
    py: Python<'_>,
    root: PathBuf,
    src_dir: PathBuf,
    model: &str,
    dtype: &str,
    force: bool,
    compress: Option<bool>,
) -> PyResult<String> {
    let n = name(model)?;
    let dtype: DtypeChoice = dtype.parse().map_err(invalid)?;
    let report = py.detach(|| {
        let store = open(&root)?;
        let compress = match compress {
            Some(c) => c,
            None => store.settings().map_err(store_err)?.compress_imports(),
        };
        let opts = ImportOptions {
            compress,
            dtype,
            force,
            source: flash_format::manifest::Source {
                kind: "local".into(),
                path: Some(src_dir.display().to_string()),
                ..Default::default()
            },
            progress: None,
        };
        store.import(&src_dir, &n, &opts).map_err(store_err)
    })?;
    json(&report)
}

/// Downloads a Hub repository's safetensors, config and tokenizer files into
/// the Hugging Face cache (files already there are not downloaded again) and
/// returns `(snapshot folder, commit, bytes downloaded)`.
#[pyfunction]
#[pyo3(signature = (model, token=None))]
pub fn hub_snapshot(
    py: Python<'_>,
    model: &str,
    token: Option<String>,
) -> PyResult<(PathBuf, String, u64)> {
    let n = name(model)?;
    let snap = py.detach(|| {
        let mut hub = flash_hub::HubClient::from_env().with_progress(false);
        if token.is_some() {
            hub = hub.with_token(token);
        }
        let revision = n.revision.as_deref().unwrap_or("main");
        hub.snapshot(&n.repo(), revision, &flash_store::pull::wanted_file)
            .map_err(|e| hub_err(&n, e))
    })?;
    Ok((snap.dir, snap.commit, snap.downloaded_bytes))
}

fn hub_err(n: &ModelName, e: flash_hub::HubError) -> PyErr {
    let msg = format!("{n}: {e}");
    let lower = msg.to_ascii_lowercase();
    if lower.contains("not found") || lower.contains("404") {
        crate::errors::ModelNotFoundError::new_err(msg)
    } else {
        flash(msg)
    }
}
