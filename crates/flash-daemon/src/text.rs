//! The text side of the models the inference API serves: each model's
//! config and tokenizer, parsed once per version of the model and shared by
//! the engines built on it.
//!
//! Parsing a tokenizer is not free (about 0.1 s for Qwen3's 11 MB
//! `tokenizer.json`), and a first request should not wait for it: when a
//! model is put in a tier (`flash load`), its text side is parsed in the
//! background, and a request for a model not parsed yet starts the parse
//! while its weights are made resident ([`TextCache::prefetch`]). A request
//! that needs the parts before a parse in flight has ended waits for that
//! parse rather than starting a second one.
//!
//! Entries are keyed by the model's epoch ([`crate::fresh`]): a model
//! replaced in the store is parsed again. At most [`TEXT_KEPT`] models are
//! kept, the least recently used dropped first (an engine keeps its own
//! reference to the tokenizer it was built with).

use flash_engine::{ModelConfig, TextTokenizer};
use flash_tier::ModelId;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Models whose text side is kept parsed (a Qwen3 tokenizer holds tens of
/// MB; engines hold their own).
pub const TEXT_KEPT: usize = 8;

/// A model's config and tokenizer.
pub struct TextParts {
    pub cfg: ModelConfig,
    pub tok: Arc<TextTokenizer>,
}

/// A parse, done or in flight: the first caller runs it, the others wait.
#[derive(Default)]
struct Parse {
    result: OnceLock<Result<Arc<TextParts>, String>>,
    /// Set by the first prefetch, so that a second one starts no thread.
    prefetched: AtomicBool,
}

struct Entry {
    epoch: u64,
    parse: Arc<Parse>,
    used: u64,
}

/// The parsed text sides of recently used models.
#[derive(Default)]
pub(crate) struct TextCache {
    entries: Mutex<HashMap<ModelId, Entry>>,
    clock: AtomicU64,
}

impl TextCache {
    /// The parse of `model` at `epoch`: the cached one, or a new (empty)
    /// one replacing an older epoch's.
    fn parse_of(&self, model: &ModelId, epoch: u64) -> Arc<Parse> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(model).filter(|e| e.epoch == epoch) {
            e.used = now;
            return e.parse.clone();
        }
        let parse = Arc::new(Parse::default());
        entries.insert(
            model.clone(),
            Entry {
                epoch,
                parse: parse.clone(),
                used: now,
            },
        );
        while entries.len() > TEXT_KEPT {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => entries.remove(&id),
                None => break,
            };
        }
        parse
    }

    /// The config and tokenizer of `model` (version `epoch`, in folder
    /// `dir`), parsed now unless cached or in flight (then waited for).
    pub fn get(&self, model: &ModelId, epoch: u64, dir: &Path) -> Result<Arc<TextParts>, String> {
        self.parse_of(model, epoch)
            .result
            .get_or_init(|| parse(dir))
            .clone()
    }

    /// Starts parsing `model`'s text side on a thread of its own unless it
    /// is cached or in flight; returns at once.
    pub fn prefetch(&self, model: &ModelId, epoch: u64, dir: PathBuf) {
        let parse = self.parse_of(model, epoch);
        if parse.result.get().is_some() || parse.prefetched.swap(true, Ordering::Relaxed) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("flash-text".into())
            .spawn({
                let model = model.clone();
                move || {
                    parse.result.get_or_init(|| parse_logged(&model, &dir));
                }
            });
        if let Err(e) = spawned {
            // The request that needs the parts parses them itself.
            tracing::warn!("no thread to parse {model}'s tokenizer: {e}");
        }
    }

    /// How many models are cached (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn parse(dir: &Path) -> Result<Arc<TextParts>, String> {
    let cfg = ModelConfig::from_dir(dir).map_err(|e| e.to_string())?;
    let tok = TextTokenizer::from_dir(dir).map_err(|e| e.to_string())?;
    Ok(Arc::new(TextParts {
        cfg,
        tok: Arc::new(tok),
    }))
}

fn parse_logged(model: &ModelId, dir: &Path) -> Result<Arc<TextParts>, String> {
    let t = std::time::Instant::now();
    let r = parse(dir);
    match &r {
        Ok(_) => tracing::info!(
            %model,
            seconds = t.elapsed().as_secs_f64(),
            "tokenizer parsed ahead of the first request"
        ),
        // Not every stored model is a language model the engine can run;
        // a request for it reports this error.
        Err(e) => tracing::debug!(%model, "no text side: {e}"),
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth(dir: &Path, seed: u64) {
        flash_synth::synth(
            &flash_synth::spec(flash_synth::Arch::Qwen3, "tiny").unwrap(),
            dir,
            &flash_synth::SynthOptions {
                seed,
                ..Default::default()
            },
        )
        .unwrap();
    }

    #[test]
    fn a_parse_is_shared_and_a_new_epoch_parses_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        synth(&dir, 1);
        let cache = TextCache::default();
        let id = ModelId::new("org/m");
        cache.prefetch(&id, 1, dir.clone());
        let a = cache.get(&id, 1, &dir).unwrap();
        let b = cache.get(&id, 1, &dir).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same epoch is parsed once");
        let c = cache.get(&id, 2, &dir).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "a new epoch is parsed again");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn errors_name_the_file_and_the_cache_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = TextCache::default();
        let err = cache
            .get(&ModelId::new("org/none"), 0, &tmp.path().join("none"))
            .err()
            .unwrap();
        assert!(err.contains("config.json"), "{err}");
        for i in 0..(TEXT_KEPT + 3) {
            let _ = cache.get(&ModelId::new(format!("org/m{i}")), 0, tmp.path());
        }
        assert_eq!(cache.len(), TEXT_KEPT);
    }
}
