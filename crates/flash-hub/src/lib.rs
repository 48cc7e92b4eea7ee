//! Hugging Face Hub client: downloads model repos into the standard Hub cache.
//!
//! # What this crate owns
//! `flash pull ORG/NAME [--revision R]` goes through [`HubClient::snapshot`]: resolve the
//! revision to a commit, list the repo's files, download the wanted ones into the local Hub
//! cache, and hand back the snapshot folder. It owns the HTTP side (endpoint, token, retries,
//! progress bars, gated/missing errors) and the cache layout; what to do with the files
//! (import, conversion) belongs to `flash-store`.
//!
//! # Cache layout (the one of `huggingface_hub`, so Python tools share it)
//! ```text
//! <cache>/models--<org>--<name>/
//!     blobs/<etag>                    file bytes; <etag> is the ETag (the sha256 for LFS files)
//!     blobs/<etag>.incomplete         a download in progress (resumed with Range next time)
//!     refs/<revision>                 the commit the branch/tag pointed to at the last pull
//!     snapshots/<commit>/<path>       relative symlink to ../../blobs/<etag>
//!     trees/<commit>.json             the commit's file listing (recent huggingface_hub writes
//!                                     it; read here, never written: ours would list files
//!                                     this client does not fetch)
//! ```
//! A file whose `snapshots/<commit>/<path>` exists is not requested again; a file whose blob is
//! already there (same content in another commit) is linked, not downloaded.
//!
//! Each blob is written under an exclusive lock on `<cache>/.locks/models--<org>--<name>/<etag>.lock`
//! (std's `File::lock`, as huggingface_hub's `filelock`), held through the download and the
//! rename: concurrent pulls of the same blob, from any process, take turns on its `.incomplete`
//! file, and one that finds the blob finished once it holds the lock only links it.
//!
//! # Environment (read by [`HubClient::from_env`])
//! - `HF_ENDPOINT`: the Hub's URL (default `https://huggingface.co`).
//! - `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the token file `HF_TOKEN_PATH`,
//!   else `$HF_HOME/token`: sent as `Authorization: Bearer`, only to the endpoint's origin.
//! - `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`; `HF_HOME`
//!   defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
//! - `HF_HUB_DISABLE_PROGRESS_BARS=1` turns the progress bars off.
//! - `HF_HUB_OFFLINE` (else `TRANSFORMERS_OFFLINE`) set to `1`, `ON`, `YES` or `TRUE` (any
//!   case, as huggingface_hub reads it): offline mode, see below.
//!
//! # Without the Hub
//! In offline mode [`HubClient::snapshot`] makes no request: the revision resolves through
//! `refs/<revision>` (a 40-hex commit hash resolves to itself), and that commit's snapshot
//! must be complete: every wanted file of `trees/<commit>.json` when the cache has it, of the
//! listed size; `config.json`; the shards that `model.safetensors.index.json` names, or
//! without an index `model.safetensors` (any `*.safetensors`; a sharded set without its index
//! is incomplete). Otherwise [`HubError::NotCachedOffline`] names the repo, the revision, the
//! cache and what is missing ([`CacheMiss`]). The cache is only read.
//!
//! Online, when the Hub cannot be reached ([`HubError::is_unreachable`]: a network error, or
//! a 5xx/429/408 after the retries), the same complete snapshot is used with a warning. On a
//! network error that happens at once, without retries, when the cache has the snapshot (as
//! huggingface_hub, which does not retry there either); otherwise the retries run and the
//! error, [`HubError::UnreachableNotCached`], names the network failure and what the cache
//! lacks. Answers about the repo (not found, gated) are never replaced by the cache.
//!
//! # HTTP
//! `GET {endpoint}/api/models/{repo}/revision/{revision}` (JSON: `sha`, `siblings[].rfilename`),
//! then per missing file `HEAD {endpoint}/{repo}/resolve/{commit}/{path}` without following
//! redirects (the Hub's answer carries `X-Linked-Etag`/`ETag`, `X-Linked-Size`/`Content-Length`,
//! `X-Repo-Commit`, and for LFS files a `Location` on the CDN), then `GET` of the bytes.
//! Network errors, 5xx, 408 and 429 are retried with exponential backoff (5 tries by default).
//!
//! # Why not the `hf-hub` crate
//! `hf-hub` 1.x pulls `hf-xet` and `aws-lc-sys` (too heavy for CI). `hf-hub` 0.4.3 with only
//! its `ureq` feature was evaluated and does not fit: it reads neither `HF_TOKEN` nor
//! `HF_HUB_CACHE`; retries cover only the body of a download (not the metadata calls, not 5xx),
//! with a fixed 300 ms backoff tests cannot shorten; errors are a boxed `ureq::Error`; it renames
//! a download into the cache without checking its size against `X-Linked-Size` (a truncated
//! file becomes a blob); it does not check that file paths stay inside the snapshot; it
//! `unwrap`s and `assert!`s on server data; and it brings `ureq` 2 with `url`/`idna` (about 100
//! crates against about 50 here). So this is a small client on `ureq` 3 (rustls + ring).

mod cache;
mod error;
mod http;
mod names;

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{debug, info, warn};

pub use cache::CacheMiss;
pub use error::HubError;
use http::Ctx;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Talks to one Hub endpoint and writes into one cache folder. Cheap to clone.
#[derive(Clone)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    cache_dir: PathBuf,
    /// Set in offline mode: what turned it on (`HF_HUB_OFFLINE=1`), for messages.
    offline: Option<String>,
    progress: bool,
    max_attempts: u32,
    retry_base: Duration,
    parallelism: usize,
    /// Follows redirects (API calls, downloads).
    agent: ureq::Agent,
    /// Follows none (file metadata: the Hub's own answer carries the etag).
    no_redirect_agent: ureq::Agent,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base", &self.retry_base)
            .field("parallelism", &self.parallelism)
            .finish()
    }
}

/// A downloaded snapshot: every wanted file is under `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub repo: String,
    /// The commit the revision resolved to.
    pub commit: String,
    /// `<cache>/models--org--name/snapshots/<commit>`.
    pub dir: PathBuf,
    /// The wanted files, as paths relative to `dir`, in the server's order.
    pub files: Vec<String>,
    /// Bytes received over the network by this call.
    pub downloaded_bytes: u64,
    /// Wanted files that needed no download (already in the snapshot, or their blob was).
    pub cached_files: usize,
    /// True when the snapshot came from the cache alone: offline mode, or the Hub could not be
    /// reached (then a warning was logged).
    pub cache_only: bool,
}

impl HubClient {
    /// Endpoint from `HF_ENDPOINT`, token from `HF_TOKEN` or the token file, cache from
    /// `HF_HUB_CACHE` / `HF_HOME`, offline mode from `HF_HUB_OFFLINE` (see the crate doc).
    /// Never fails: a missing home folder leaves the cache relative to the working directory.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok(), dirs::home_dir())
    }

    /// [`HubClient::from_env`] with the variables read through `var` and `home` as the home
    /// folder (`~`): for tests and for programs that hold their own environment. Empty values
    /// count as unset.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let expand = |v: String| -> PathBuf {
            match (v.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => h.join(rest),
                _ if v == "~" => home.clone().unwrap_or_else(|| PathBuf::from(v)),
                _ => PathBuf::from(v),
            }
        };
        let hf_home = var("HF_HOME").map(expand).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(expand)
                .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                match fs::read_to_string(&path) {
                    Ok(t) => Some(t.trim().to_string()).filter(|t| !t.is_empty()),
                    Err(e) => {
                        if e.kind() != io::ErrorKind::NotFound {
                            debug!(path = %path.display(), error = %e, "cannot read token file");
                        }
                        None
                    }
                }
            });
        let progress = !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        // As huggingface_hub: `HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE`, true when one of
        // 1/ON/YES/TRUE in any case (no trimming: " 1" is not true there either).
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
            .into_iter()
            .find_map(|k| var(k).map(|v| (k, v)))
            .filter(|(_, v)| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
            .map(|(k, v)| format!("{k}={v}"));
        Self {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            cache_dir,
            offline,
            progress,
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            parallelism: 4,
            agent: http::agent(true),
            no_redirect_agent: http::agent(false),
        }
        .with_endpoint(&var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()))
        .with_token(token)
    }

    /// The Hub's base URL (a trailing `/` is dropped).
    pub fn with_endpoint(mut self, url: &str) -> Self {
        self.endpoint = url.trim().trim_end_matches('/').to_string();
        self
    }

    /// The Hub cache folder (the one holding `models--*` folders).
    pub fn with_cache_dir(mut self, dir: &Path) -> Self {
        self.cache_dir = dir.to_path_buf();
        self
    }

    /// The token sent as `Authorization: Bearer`; `None` (or an empty one) sends none.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.trim().is_empty());
        self
    }

    /// Offline mode: [`HubClient::snapshot`] reads the cache only and never makes a request.
    /// [`HubClient::from_env`] turns it on from `HF_HUB_OFFLINE`.
    pub fn with_offline(mut self, on: bool) -> Self {
        self.offline = on.then(|| "set by the caller".to_string());
        self
    }

    /// Whether offline mode is on (see [`HubClient::with_offline`]).
    pub fn is_offline(&self) -> bool {
        self.offline.is_some()
    }

    /// Progress bars on stderr (indicatif hides them when stderr is not a terminal).
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Tries per request (at least 1) and the first retry's delay; each retry doubles it, up
    /// to 64 times `base_delay`, which also caps a server's `Retry-After`. Default: 5, 500 ms.
    pub fn with_retries(mut self, attempts: u32, base_delay: Duration) -> Self {
        self.max_attempts = attempts.max(1);
        self.retry_base = base_delay;
        self
    }

    /// Files fetched at once (at least 1). Default 4.
    pub fn with_parallelism(mut self, n: usize) -> Self {
        self.parallelism = n.max(1);
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `<cache>/models--org--name`, after checking the name.
    pub fn repo_dir(&self, repo: &str) -> Result<PathBuf, HubError> {
        names::validate_repo(repo)?;
        Ok(self.cache_dir.join(names::repo_folder(repo)))
    }

    /// The snapshot folder a previous pull left for `revision` (a ref name, or a commit),
    /// without any request: for working offline. `None` when there is none.
    pub fn cached_snapshot_dir(
        &self,
        repo: &str,
        revision: &str,
    ) -> Result<Option<PathBuf>, HubError> {
        let repo_dir = self.repo_dir(repo)?;
        names::validate_revision(revision)?;
        let ref_path = repo_dir.join("refs").join(revision);
        let commit = match fs::read_to_string(&ref_path) {
            Ok(c) => c.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => revision.to_string(),
            Err(e) => return Err(HubError::io(ref_path, e)),
        };
        if names::check_component("commit", &commit).is_err() {
            return Ok(None);
        }
        let dir = repo_dir.join("snapshots").join(commit);
        Ok(dir.is_dir().then_some(dir))
    }

    /// The complete snapshot of `revision` in the cache, without any request: `revision` is a
    /// commit hash or names one through `refs/<revision>`, and the snapshot must hold every
    /// wanted file of huggingface_hub's listing of the commit when there is one, `config.json`
    /// and the weights (see the crate doc). `Ok(Err(miss))` says what the cache lacks.
    pub fn snapshot_from_cache(
        &self,
        repo: &str,
        revision: &str,
        want: &dyn Fn(&str) -> bool,
    ) -> Result<Result<Snapshot, CacheMiss>, HubError> {
        let repo_dir = self.repo_dir(repo)?;
        names::validate_revision(revision)?;
        Ok(
            cache::resolve(&repo_dir, revision, want)?.map(|c| Snapshot {
                repo: repo.to_string(),
                commit: c.commit,
                dir: c.dir,
                cached_files: c.files.len(),
                files: c.files,
                downloaded_bytes: 0,
                cache_only: true,
            }),
        )
    }

    /// Resolves `revision` (branch, tag or commit; the caller passes "main" by default) to a
    /// commit, lists the repo's files, and downloads those for which `want(path)` is true into
    /// the cache, skipping files already there. Writes `refs/<revision>` when `revision` is not
    /// the commit itself. Names are checked before any request; every file path the server
    /// lists is checked to stay inside the snapshot folder before anything is downloaded.
    ///
    /// In offline mode the snapshot comes from the cache ([`HubClient::snapshot_from_cache`])
    /// and no request is made; [`HubError::NotCachedOffline`] says what the cache lacks.
    /// When the Hub cannot be reached (see [`HubError::is_unreachable`]) a complete cached
    /// snapshot of `revision` is used, with a warning: at once on a network error (no retries:
    /// the cache answers), after the retries on a 5xx; with none complete, the error is
    /// [`HubError::UnreachableNotCached`].
    pub fn snapshot(
        &self,
        repo: &str,
        revision: &str,
        want: &dyn Fn(&str) -> bool,
    ) -> Result<Snapshot, HubError> {
        names::validate_repo(repo)?;
        names::validate_revision(revision)?;
        if let Some(setting) = &self.offline {
            return match self.snapshot_from_cache(repo, revision, want)? {
                Ok(snap) => {
                    info!(
                        repo, revision, commit = %snap.commit, files = snap.files.len(),
                        "offline ({setting}): using the cached snapshot"
                    );
                    Ok(snap)
                }
                Err(missing) => Err(HubError::NotCachedOffline {
                    setting: setting.clone(),
                    repo: repo.to_string(),
                    revision: revision.to_string(),
                    cache: self.cache_dir.clone(),
                    missing: Box::new(missing),
                }),
            };
        }
        let ctx = Ctx { repo, revision };
        let repo_dir = self.cache_dir.join(names::repo_folder(repo));

        // Whether the cache could serve this revision; looked at once, on the first network
        // error, to stop retrying.
        let cache_complete = OnceCell::new();
        let give_up = |e: &HubError| {
            matches!(e, HubError::Network { .. })
                && *cache_complete.get_or_init(|| {
                    matches!(self.snapshot_from_cache(repo, revision, want), Ok(Ok(_)))
                })
        };
        let (commit, listed) = match self.revision_info(&ctx, &give_up) {
            Ok(v) => v,
            Err(e) if e.is_unreachable() => return self.fall_back(repo, revision, want, e),
            Err(e) => return Err(e),
        };
        let mut seen = HashSet::new();
        let files: Vec<String> = listed
            .into_iter()
            .filter(|f| want(f) && seen.insert(f.clone()))
            .collect();
        let dir = repo_dir.join("snapshots").join(&commit);
        let blobs = repo_dir.join("blobs");
        create_dir(&dir)?;
        create_dir(&blobs)?;
        tag_cache_dir(&self.cache_dir);

        let missing: Vec<&String> = files.iter().filter(|f| !dir.join(f).is_file()).collect();
        let mut cached_files = files.len() - missing.len();
        info!(
            repo, revision, %commit,
            wanted = files.len(), missing = missing.len(),
            "resolved snapshot"
        );

        let metas = par_map(&missing, self.parallelism, |f| {
            self.file_meta(&ctx, &commit, f)
        })?;

        // One download per blob: paths with the same content share it. A file whose blob is
        // already on disk (same content in another commit) is only linked.
        let mut on_disk: HashSet<&str> = HashSet::new();
        let mut sizes: HashMap<&str, u64> = HashMap::new();
        let mut jobs: Vec<&http::FileMeta> = Vec::new();
        for meta in &metas {
            if let Some(&size) = sizes.get(meta.etag.as_str()) {
                if size != meta.size {
                    return Err(HubError::bad(
                        &meta.url,
                        format!("blob {} announced with two sizes", meta.etag),
                    ));
                }
                continue;
            }
            sizes.insert(&meta.etag, meta.size);
            let blob = blobs.join(&meta.etag);
            if fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size) {
                on_disk.insert(&meta.etag);
            } else {
                jobs.push(meta);
            }
        }
        cached_files += metas
            .iter()
            .filter(|m| on_disk.contains(m.etag.as_str()))
            .count();

        let (downloaded_bytes, finished_elsewhere) = self.download_all(&ctx, &jobs, &blobs)?;
        cached_files += metas
            .iter()
            .filter(|m| finished_elsewhere.contains(m.etag.as_str()))
            .count();

        for (path, meta) in missing.iter().zip(&metas) {
            link(&repo_dir, &dir, path, &meta.etag)?;
        }
        if revision != commit {
            write_ref(&repo_dir, revision, &commit)?;
        }
        info!(repo, %commit, downloaded_bytes, cached_files, "snapshot ready");
        Ok(Snapshot {
            repo: repo.to_string(),
            commit,
            dir,
            files,
            downloaded_bytes,
            cached_files,
            cache_only: false,
        })
    }

    /// The Hub could not be reached (`error`): the cached snapshot of `revision`, if complete.
    fn fall_back(
        &self,
        repo: &str,
        revision: &str,
        want: &dyn Fn(&str) -> bool,
        error: HubError,
    ) -> Result<Snapshot, HubError> {
        match self.snapshot_from_cache(repo, revision, want) {
            Ok(Ok(snap)) => {
                warn!(
                    "the Hub at {} could not be reached ({error}); using the cached snapshot {} \
                     of {repo}@{revision} from {}",
                    self.endpoint,
                    snap.commit,
                    self.cache_dir.display()
                );
                Ok(snap)
            }
            Ok(Err(missing)) => Err(HubError::UnreachableNotCached {
                source: Box::new(error),
                repo: repo.to_string(),
                revision: revision.to_string(),
                cache: self.cache_dir.clone(),
                missing: Box::new(missing),
            }),
            Err(cache_error) => {
                warn!(error = %cache_error, "cannot read the Hugging Face cache");
                Err(error)
            }
        }
    }

    /// Fetches the blobs of `jobs`. Returns the bytes received and the etags of the blobs that
    /// another process finished while this one waited for their lock (none downloaded here).
    fn download_all<'m>(
        &self,
        ctx: &Ctx,
        jobs: &[&'m http::FileMeta],
        blobs: &Path,
    ) -> Result<(u64, HashSet<&'m str>), HubError> {
        if jobs.is_empty() {
            return Ok((0, HashSet::new()));
        }
        let multi = MultiProgress::with_draw_target(if self.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let total_size: u64 = jobs.iter().map(|j| j.size).sum();
        let total = multi.add(ProgressBar::new(total_size));
        total.set_style(style(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ));
        total.set_message(format!("{} files", jobs.len()));
        let received = par_map(jobs, self.parallelism, |meta| {
            let bar = multi.add(ProgressBar::new(meta.size));
            bar.set_style(style("{msg:>12} [{bar:30}] {bytes}/{total_bytes}"));
            bar.set_message(short_name(&meta.url));
            let r = self.fetch_blob(ctx, meta, blobs, &bar, &total);
            bar.finish_and_clear();
            multi.remove(&bar);
            r
        });
        total.finish_and_clear();
        let received = received?;
        let finished_elsewhere = jobs
            .iter()
            .zip(&received)
            .filter(|(_, r)| r.is_none())
            .map(|(m, _)| m.etag.as_str())
            .collect();
        Ok((received.iter().flatten().sum(), finished_elsewhere))
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The last path segment of a URL, without the query, for a progress bar.
fn short_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut s: String = name.chars().take(24).collect();
    if name.chars().count() > 24 {
        s.push('…');
    }
    s
}

/// The first line of a `CACHEDIR.TAG` (the Cache Directory Tagging Specification).
const CACHEDIR_SIGNATURE: &str = "Signature: 8a477f597d28d172789f06886806bc55";

/// Writes `<cache>/CACHEDIR.TAG` when there is none, as huggingface_hub does, so that backup
/// tools skip the cache. Best effort: a read-only cache is no error.
fn tag_cache_dir(cache_dir: &Path) {
    let path = cache_dir.join("CACHEDIR.TAG");
    if fs::symlink_metadata(&path).is_ok() {
        return;
    }
    let text = format!(
        "{CACHEDIR_SIGNATURE}\n# This file is a cache directory tag created by flash-hub \
         (the Hugging Face cache).\n"
    );
    if let Err(e) = fs::write(&path, text) {
        debug!(path = %path.display(), error = %e, "cannot write the cache directory tag");
    }
}

fn create_dir(dir: &Path) -> Result<(), HubError> {
    fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))
}

/// `snapshots/<commit>/<path>` -> `../../blobs/<etag>` (one more `..` per folder in `path`).
fn link(repo_dir: &Path, snap_dir: &Path, path: &str, etag: &str) -> Result<(), HubError> {
    let dst = snap_dir.join(path);
    if let Some(parent) = dst.parent() {
        create_dir(parent)?;
    }
    let depth = path.split('/').count();
    let mut target = PathBuf::new();
    for _ in 0..depth + 1 {
        target.push("..");
    }
    target.push("blobs");
    target.push(etag);
    place_link(&repo_dir.join("blobs").join(etag), &target, &dst)
}

#[cfg(unix)]
fn place_link(_blob: &Path, target: &Path, dst: &Path) -> Result<(), HubError> {
    if let Ok(meta) = fs::symlink_metadata(dst) {
        if meta.file_type().is_symlink() && fs::read_link(dst).is_ok_and(|t| t == target) {
            return Ok(());
        }
        fs::remove_file(dst).map_err(|e| HubError::io(dst, e))?;
    }
    match std::os::unix::fs::symlink(target, dst) {
        Ok(()) => Ok(()),
        // Another process linked it meanwhile.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dst.is_file() => Ok(()),
        Err(e) => Err(HubError::io(dst, e)),
    }
}

/// Without symlinks, huggingface_hub copies the blob; so do we.
#[cfg(not(unix))]
fn place_link(blob: &Path, _target: &Path, dst: &Path) -> Result<(), HubError> {
    fs::copy(blob, dst)
        .map(|_| ())
        .map_err(|e| HubError::io(dst, e))
}

/// `refs/<revision>` holds the commit (no newline, as huggingface_hub writes it), written
/// through a temporary file and a rename. The temporary name carries the process id and a
/// per-process counter, so concurrent pulls (other processes, or other threads of this one)
/// never share it.
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<(), HubError> {
    static TMP_SEQ: AtomicUsize = AtomicUsize::new(0);
    let path = repo_dir.join("refs").join(revision);
    if fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, commit).map_err(|e| HubError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        HubError::io(&path, e)
    })
}

/// Maps `f` over `items` on up to `workers` threads (this one included), in order. After the
/// first error no new item is started, and the error of the lowest index is returned.
fn par_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> Result<R, HubError> + Sync,
) -> Result<Vec<R>, HubError> {
    let workers = workers.clamp(1, items.len().max(1));
    if workers == 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let error: Mutex<Option<(usize, HubError)>> = Mutex::new(None);
    let work = || loop {
        if error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else { break };
        match f(item) {
            Ok(r) => results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r),
            Err(e) => {
                let mut slot = error.lock().unwrap_or_else(PoisonError::into_inner);
                if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                    *slot = Some((i, e));
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            // Too few threads only slows things down.
            if let Err(e) = std::thread::Builder::new()
                .name("flash-hub".into())
                .spawn_scoped(s, work)
            {
                debug!(error = %e, "cannot start a download thread");
            }
        }
        work();
    });
    if let Some((_, e)) = error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e);
    }
    results
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .collect::<Option<Vec<R>>>()
        .ok_or_else(|| HubError::bad("", "internal: a download task did not finish"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(vars: &[(&str, &str)], home: Option<&str>) -> HubClient {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubClient::from_lookup(|k| vars.get(k).cloned(), home.map(PathBuf::from))
    }

    #[test]
    fn env_defaults() {
        let c = client(&[], Some("/nonexistent-home"));
        assert_eq!(c.endpoint(), DEFAULT_ENDPOINT);
        assert_eq!(
            c.cache_dir(),
            Path::new("/nonexistent-home/.cache/huggingface/hub")
        );
        assert!(!c.has_token());
        assert!(c.progress);
    }

    #[test]
    fn env_overrides() {
        let c = client(
            &[
                ("HF_ENDPOINT", "http://mirror.local:8080/"),
                ("HF_HOME", "~/hf"),
                ("HF_TOKEN", " hf_abc \n"),
                ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ],
            Some("/h"),
        );
        assert_eq!(c.endpoint(), "http://mirror.local:8080");
        assert_eq!(c.cache_dir(), Path::new("/h/hf/hub"));
        assert_eq!(c.token.as_deref(), Some("hf_abc"));
        assert!(!c.progress);

        let c = client(&[("HF_HOME", "/x"), ("HF_HUB_CACHE", "/cache")], Some("/h"));
        assert_eq!(c.cache_dir(), Path::new("/cache"));
        let c = client(&[("XDG_CACHE_HOME", "/xdg")], Some("/h"));
        assert_eq!(c.cache_dir(), Path::new("/xdg/huggingface/hub"));
    }

    #[test]
    fn token_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("token"), "hf_from_file\n").expect("write");
        let home = tmp.path().to_str().expect("utf-8");
        let c = client(&[("HF_HOME", home)], None);
        assert_eq!(c.token.as_deref(), Some("hf_from_file"));
        // HF_TOKEN wins over the file.
        let c = client(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")], None);
        assert_eq!(c.token.as_deref(), Some("hf_env"));
        // Debug never shows it.
        assert!(!format!("{c:?}").contains("hf_env"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = client(&[], None).with_retries(5, Duration::from_millis(10));
        assert_eq!(c.backoff(1, None), Duration::from_millis(10));
        assert_eq!(c.backoff(2, None), Duration::from_millis(20));
        assert_eq!(c.backoff(4, None), Duration::from_millis(80));
        assert_eq!(c.backoff(30, None), Duration::from_millis(640));
        assert_eq!(
            c.backoff(1, Some(Duration::from_secs(3600))),
            Duration::from_millis(640)
        );
    }

    #[test]
    fn par_map_keeps_order_and_reports_first_error() {
        let items: Vec<u32> = (0..50).collect();
        let out = par_map(&items, 4, |&i| Ok(i * 2)).expect("no error");
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let err = par_map(&items, 4, |&i| {
            if i == 7 {
                Err(HubError::bad("u", "seven"))
            } else {
                Ok(i)
            }
        });
        assert!(matches!(err, Err(HubError::BadResponse { why, .. }) if why == "seven"));
    }

    #[test]
    fn link_targets_are_relative() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("models--a--b");
        let snap = repo.join("snapshots").join("c0ffee");
        fs::create_dir_all(repo.join("blobs")).expect("mkdir");
        fs::write(repo.join("blobs").join("e1"), b"x").expect("write");
        link(&repo, &snap, "sub/dir/f.txt", "e1").expect("link");
        link(&repo, &snap, "sub/dir/f.txt", "e1").expect("link again");
        link(&repo, &snap, "top.txt", "e1").expect("link");
        #[cfg(unix)]
        {
            assert_eq!(
                fs::read_link(snap.join("sub/dir/f.txt")).expect("readlink"),
                Path::new("../../../../blobs/e1")
            );
            assert_eq!(
                fs::read_link(snap.join("top.txt")).expect("readlink"),
                Path::new("../../blobs/e1")
            );
        }
        assert_eq!(fs::read(snap.join("sub/dir/f.txt")).expect("read"), b"x");
    }
}
