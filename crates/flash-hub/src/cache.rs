//! The cache without the Hub: which commit a revision names (`refs/<revision>`, or a commit
//! hash given directly, as huggingface_hub resolves them) and whether that commit's snapshot
//! holds everything a model needs. Reads only: nothing in the cache is created or changed.
//!
//! A snapshot is complete when it has
//! - every wanted file of the commit's listing, `trees/<commit>.json`, when huggingface_hub
//!   (recent versions) left one (its `format_version` 1; an unknown or corrupt one is ignored, as
//!   huggingface_hub does), each of the listed size;
//! - `config.json`;
//! - the weights: the shards named by `model.safetensors.index.json` when the snapshot has
//!   one; else, without a listing, every shard `<name>-<i>-of-<n>.safetensors` of a sharded
//!   set (and then the index, which such a set always comes with) or at least one
//!   `*.safetensors` (`model.safetensors` is named when there is none).
//!
//! A snapshot symlink whose blob is gone counts as missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::{debug, warn};

use crate::names;
use crate::HubError;

const INDEX: &str = "model.safetensors.index.json";
const CONFIG: &str = "config.json";
const SINGLE: &str = "model.safetensors";
/// How many missing files a message names.
const SHOWN: usize = 5;
/// Deepest folder walked in a snapshot that has no listing.
const MAX_DEPTH: usize = 16;
/// The `trees/<commit>.json` format this reads.
const LISTING_VERSION: u64 = 1;

/// Why the cache cannot serve a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheMiss {
    /// No `models--org--name` folder: nothing of the repo was ever downloaded here.
    NoRepo { folder: String },
    /// A branch or tag with no `refs/<revision>` file.
    NoRef { revision: String },
    /// `refs/<revision>` does not hold a commit hash.
    BadRef { revision: String, content: String },
    /// No `snapshots/<commit>` folder.
    NoSnapshot { commit: String },
    /// The snapshot lacks files, or holds some of another size than the listing's (then the
    /// entry says so after the file name).
    Incomplete {
        commit: String,
        missing: Vec<String>,
    },
    /// The snapshot's `model.safetensors.index.json` cannot be used.
    BadIndex { commit: String, why: String },
}

impl fmt::Display for CacheMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheMiss::NoRepo { folder } => write!(f, "no {folder} folder"),
            CacheMiss::NoRef { revision } => write!(f, "no refs/{revision}"),
            CacheMiss::BadRef { revision, content } => {
                write!(f, "refs/{revision} holds {content:?}, not a commit hash")
            }
            CacheMiss::NoSnapshot { commit } => write!(f, "no snapshots/{commit}"),
            CacheMiss::Incomplete { commit, missing } => {
                write!(f, "snapshot {commit} lacks ")?;
                for (i, m) in missing.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(m)?;
                }
                if missing.len() > SHOWN {
                    write!(f, " and {} more", missing.len() - SHOWN)?;
                }
                Ok(())
            }
            CacheMiss::BadIndex { commit, why } => {
                write!(f, "snapshot {commit}: {INDEX} is unusable: {why}")
            }
        }
    }
}

/// A complete snapshot found in the cache.
#[derive(Debug)]
pub(crate) struct Cached {
    pub commit: String,
    pub dir: PathBuf,
    /// The wanted files, relative to `dir`, sorted.
    pub files: Vec<String>,
}

/// huggingface_hub's `REGEX_COMMIT_HASH`: 40 lower-case hex digits.
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Finds the snapshot of `revision` in `repo_dir` (`<cache>/models--org--name`) and checks it
/// is complete. `Ok(Err(miss))` says what the cache lacks; `Err` is an I/O error other than a
/// missing file. The names must have been validated.
pub(crate) fn resolve(
    repo_dir: &Path,
    revision: &str,
    want: &dyn Fn(&str) -> bool,
) -> Result<Result<Cached, CacheMiss>, HubError> {
    if !repo_dir.is_dir() {
        let folder = repo_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(Err(CacheMiss::NoRepo { folder }));
    }
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        let path = repo_dir.join("refs").join(revision);
        match fs::read_to_string(&path) {
            Ok(c) => {
                // huggingface_hub writes no newline; one added by hand is tolerated.
                let c = c.trim();
                if names::check_component("commit", c).is_err() {
                    return Ok(Err(CacheMiss::BadRef {
                        revision: revision.to_string(),
                        content: c.chars().take(80).collect(),
                    }));
                }
                c.to_string()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::IsADirectory
                        | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(Err(CacheMiss::NoRef {
                    revision: revision.to_string(),
                }))
            }
            Err(e) => return Err(HubError::io(path, e)),
        }
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Ok(Err(CacheMiss::NoSnapshot { commit }));
    }

    let mut missing = Missing::default();
    let files = match read_listing(repo_dir, &commit) {
        Some(listing) => {
            let wanted: Vec<(String, u64)> = listing.into_iter().filter(|(f, _)| want(f)).collect();
            for (f, expected) in &wanted {
                let expected = *expected;
                match file_len(&dir.join(f)) {
                    None => missing.push(f.clone()),
                    Some(len) if len != expected => {
                        missing.push(format!("{f} ({len} bytes, the listing says {expected})"))
                    }
                    Some(_) => {}
                }
            }
            if !wanted.iter().any(|(f, _)| f.ends_with(".safetensors")) {
                missing.push(SINGLE.to_string());
            }
            wanted.into_iter().map(|(f, _)| f).collect()
        }
        None => {
            let mut present = Vec::new();
            let mut dangling = Vec::new();
            walk(&dir, "", 0, &mut present, &mut dangling)?;
            present.retain(|f| want(f));
            present.sort();
            dangling.sort();
            for f in dangling.into_iter().filter(|f| want(f)) {
                missing.push(f);
            }
            unlisted_weights(&dir, &mut missing)?;
            present
        }
    };
    if file_len(&dir.join(CONFIG)).is_none() {
        missing.push(CONFIG.to_string());
    }
    if let Err(miss) = indexed_shards(&dir, &commit, &mut missing)? {
        return Ok(Err(miss));
    }
    if !missing.0.is_empty() {
        return Ok(Err(CacheMiss::Incomplete {
            commit,
            missing: missing.0,
        }));
    }
    Ok(Ok(Cached { commit, dir, files }))
}

/// Names, each once, in the order found.
#[derive(Default)]
struct Missing(Vec<String>);

impl Missing {
    fn push(&mut self, name: String) {
        if !self.0.contains(&name) {
            self.0.push(name);
        }
    }
}

/// The size of a regular file (through symlinks), `None` when there is none.
fn file_len(path: &Path) -> Option<u64> {
    fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

#[derive(Deserialize)]
struct Listing {
    format_version: Option<u64>,
    files: BTreeMap<String, ListedFile>,
}

#[derive(Deserialize)]
struct ListedFile {
    size: u64,
    lfs_size: Option<u64>,
}

/// huggingface_hub's listing of the commit, `trees/<commit>.json`: path -> size. `None` when
/// there is none, or it cannot be used (logged).
fn read_listing(repo_dir: &Path, commit: &str) -> Option<BTreeMap<String, u64>> {
    let path = repo_dir.join("trees").join(format!("{commit}.json"));
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the cached file listing; ignoring it");
            return None;
        }
    };
    let listing: Listing = match serde_json::from_str(&text) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "corrupt cached file listing; ignoring it");
            return None;
        }
    };
    if listing.format_version != Some(LISTING_VERSION) {
        debug!(path = %path.display(), version = ?listing.format_version, "unknown listing format; ignoring it");
        return None;
    }
    let mut out = BTreeMap::new();
    for (name, f) in listing.files {
        if let Err(why) = names::check_repo_file(&name) {
            warn!(path = %path.display(), %why, "unsafe path in the cached file listing; ignoring it");
            return None;
        }
        out.insert(name, f.lfs_size.unwrap_or(f.size));
    }
    Some(out)
}

/// Files of a snapshot (through symlinks), relative with `/`; symlinks whose target is gone go
/// to `dangling`. Folders that are symlinks are not followed.
fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    present: &mut Vec<String>,
    dangling: &mut Vec<String>,
) -> Result<(), HubError> {
    let rd = fs::read_dir(dir).map_err(|e| HubError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| HubError::io(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| HubError::io(&path, e))?;
        if ft.is_dir() {
            if depth < MAX_DEPTH {
                walk(&path, &rel, depth + 1, present, dangling)?;
            }
            continue;
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => present.push(rel),
            Ok(_) => {}
            Err(_) if ft.is_symlink() => dangling.push(rel),
            Err(e) => return Err(HubError::io(&path, e)),
        }
    }
    Ok(())
}

/// `<prefix>-<i>-of-<n>.safetensors` -> (prefix, digits of i, n).
fn shard_name(name: &str) -> Option<(&str, usize, u32)> {
    let stem = name.strip_suffix(".safetensors")?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, index) = head.rsplit_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if prefix.is_empty() || !all_digits(index) || !all_digits(total) {
        return None;
    }
    let n: u32 = total.parse().ok()?;
    (n > 0 && n <= 100_000).then_some((prefix, index.len(), n))
}

/// Without a listing: the weights a snapshot without an index must have (see the module doc).
fn unlisted_weights(dir: &Path, missing: &mut Missing) -> Result<(), HubError> {
    if fs::symlink_metadata(dir.join(INDEX)).is_ok() {
        // `indexed_shards` checks it.
        return Ok(());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| HubError::io(dir, e))? {
        let entry = entry.map_err(|e| HubError::io(dir, e))?;
        if let Ok(name) = entry.file_name().into_string() {
            if name.ends_with(".safetensors") {
                names.push(name);
            }
        }
    }
    names.sort();
    let sets: BTreeSet<(String, usize, u32)> = names
        .iter()
        .filter_map(|name| shard_name(name))
        .map(|(prefix, width, n)| (prefix.to_string(), width, n))
        .collect();
    if !sets.is_empty() {
        missing.push(INDEX.to_string());
        for (prefix, width, n) in &sets {
            for i in 1..=*n {
                let shard = format!("{prefix}-{i:0width$}-of-{n:0width$}.safetensors");
                if file_len(&dir.join(&shard)).is_none() {
                    missing.push(shard);
                }
            }
        }
    } else if !names.iter().any(|n| file_len(&dir.join(n)).is_some()) {
        missing.push(SINGLE.to_string());
    }
    Ok(())
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// When the snapshot has `model.safetensors.index.json`: every shard its `weight_map` names.
fn indexed_shards(
    dir: &Path,
    commit: &str,
    missing: &mut Missing,
) -> Result<Result<(), CacheMiss>, HubError> {
    let path = dir.join(INDEX);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if fs::symlink_metadata(&path).is_ok() {
                // A link whose blob is gone.
                missing.push(INDEX.to_string());
            }
            return Ok(Ok(()));
        }
        Err(e) => return Err(HubError::io(path, e)),
    };
    let bad = |why: String| {
        Ok(Err(CacheMiss::BadIndex {
            commit: commit.to_string(),
            why,
        }))
    };
    let index: Index = match serde_json::from_str(&text) {
        Ok(i) => i,
        Err(e) => return bad(format!("invalid JSON: {e}")),
    };
    let mut shards: Vec<&String> = index.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return bad("its weight_map is empty".to_string());
    }
    for shard in shards {
        if let Err(why) = names::check_repo_file(shard) {
            return bad(why);
        }
        if file_len(&dir.join(shard)).is_none() {
            missing.push(shard.clone());
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_hashes() {
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
        assert!(!is_commit_hash("0123456789abcdef"));
    }

    #[test]
    fn shard_names() {
        assert_eq!(
            shard_name("model-00002-of-00004.safetensors"),
            Some(("model", 5, 4))
        );
        assert_eq!(
            shard_name("diffusion-pytorch-model-1-of-2.safetensors"),
            Some(("diffusion-pytorch-model", 1, 2))
        );
        for no in [
            "model.safetensors",
            "model-00001-of-00000.safetensors",
            "model-x-of-2.safetensors",
            "-1-of-2.safetensors",
            "model-00001-of-00002.bin",
        ] {
            assert_eq!(shard_name(no), None, "{no}");
        }
    }

    #[test]
    fn miss_messages() {
        let m = CacheMiss::Incomplete {
            commit: "c".into(),
            missing: (1..=7).map(|i| format!("f{i}")).collect(),
        };
        assert_eq!(
            m.to_string(),
            "snapshot c lacks f1, f2, f3, f4, f5 and 2 more"
        );
        assert_eq!(
            CacheMiss::NoRef {
                revision: "main".into()
            }
            .to_string(),
            "no refs/main"
        );
    }
}
