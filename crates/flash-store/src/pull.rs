//! `flash pull ORG/NAME`: a Hub snapshot into the Hub cache, then an import.

use crate::error::{Result, StoreError};
use crate::name::ModelName;
use crate::store::{ImportOptions, ImportReport, Store};
use flash_format::manifest::Source;
use flash_hub::HubClient;

/// Files of a repository the store needs: top-level safetensors weights,
/// their index, JSON configs, tokenizer and template files. Other weight
/// formats and sub-folders (`original/`, `onnx/`...) are not downloaded.
pub fn wanted_file(path: &str) -> bool {
    if path.contains('/') {
        return false;
    }
    path.ends_with(".safetensors")
        || path.ends_with(".json")
        || path.ends_with(".jinja")
        || path.ends_with(".txt")
        || path.ends_with(".tiktoken")
        || path == "tokenizer.model"
}

impl Store {
    /// Downloads `name` (its revision, default `main`) from the Hub and
    /// imports it. Files already in the Hub cache are not downloaded again.
    pub fn pull(
        &self,
        hub: &HubClient,
        name: &ModelName,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        self.pull_tp(hub, name, opts, 1)
    }

    /// [`Store::pull`], stored split into `tp` tensor-parallel ranks
    /// ([`Store::import_tp`]). A model that cannot be split so is refused
    /// after the download (the files stay in the Hub cache), before
    /// anything is written to the store.
    pub fn pull_tp(
        &self,
        hub: &HubClient,
        name: &ModelName,
        opts: &ImportOptions,
        tp: u32,
    ) -> Result<ImportReport> {
        if self.contains(name) && !opts.force {
            return Err(StoreError::Exists(name.to_string()));
        }
        let revision = name.revision.as_deref().unwrap_or("main");
        let snap = hub.snapshot(&name.repo(), revision, &wanted_file)?;
        if !snap.files.iter().any(|f| f.ends_with(".safetensors")) {
            return Err(StoreError::invalid(
                &snap.dir,
                format!("{} has no safetensors weights at revision {revision} (flash reads safetensors only)", name.repo()),
            ));
        }
        let opts = ImportOptions {
            source: Source {
                kind: "hub".into(),
                repo: Some(name.repo()),
                revision: Some(snap.commit.clone()),
                path: None,
            },
            ..*opts
        };
        self.import_tp(&snap.dir, name, &opts, tp)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wanted_files() {
        for yes in [
            "model.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "tokenizer.json",
            "merges.txt",
            "tokenizer.model",
            "chat_template.jinja",
        ] {
            assert!(super::wanted_file(yes), "{yes}");
        }
        for no in [
            "pytorch_model.bin",
            "original/consolidated.00.pth",
            "onnx/model.onnx",
            "README.md",
            "sub/config.json",
        ] {
            assert!(!super::wanted_file(no), "{no}");
        }
    }
}
