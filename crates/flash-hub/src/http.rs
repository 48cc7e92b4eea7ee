//! Requests: the two agents, status classification, retries with backoff, and the three
//! calls the client makes (revision info, file metadata, blob download).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::thread;
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Deserialize;
use tracing::{debug, warn};
use ureq::http::Response;
use ureq::Body;

use crate::names;
use crate::{HubClient, HubError};

/// The biggest revision-info JSON we read (repos with tens of thousands of files stay below).
const MAX_JSON: u64 = 64 << 20;
/// Redirects followed by hand for file metadata (the Hub's relative ones: renamed repos).
const MAX_HOPS: usize = 10;

pub(crate) fn agent(follow_redirects: bool) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(if follow_redirects { 10 } else { 0 })
        .user_agent(format!("flash-hub/{}", env!("CARGO_PKG_VERSION")))
        // Sizes are compared with Content-Length / X-Linked-Size: no transfer encoding.
        .accept_encoding("identity")
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// What the repo and revision are, for turning statuses into `NotFound`/`Gated`.
pub(crate) struct Ctx<'a> {
    pub repo: &'a str,
    pub revision: &'a str,
}

/// One try's result.
pub(crate) enum Try<T> {
    Done(T),
    /// Worth another try; with the server's `Retry-After` if it sent one.
    Again(HubError, Option<Duration>),
    Fail(HubError),
}

fn header<'a>(resp: &'a Response<Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn network(url: &str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HubError {
    HubError::Network {
        url: url.to_string(),
        attempts: 1,
        source: source.into(),
    }
}

/// Transport errors that may go away on their own are retried; configuration errors are not.
fn transport_error<T>(url: &str, err: ureq::Error) -> Try<T> {
    let again = matches!(
        err,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    );
    let e = network(url, err);
    if again {
        Try::Again(e, None)
    } else {
        Try::Fail(e)
    }
}

pub(crate) fn retryable_status(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// Who answered: the Hub's API, its `resolve` route, or another host (a CDN).
#[derive(Clone, Copy, PartialEq)]
enum Route {
    Api,
    Resolve,
    Other,
}

/// Maps an error status to the error a user can act on, using the Hub's `X-Error-Code` when
/// it sent one (it answers 401 for a missing repo when no token is sent).
fn status_error(ctx: &Ctx, url: &str, resp: &Response<Body>, route: Route) -> HubError {
    let status = resp.status().as_u16();
    if route == Route::Other {
        return plain_http_error(url, resp);
    }
    let not_found = || HubError::NotFound {
        repo: ctx.repo.to_string(),
        revision: ctx.revision.to_string(),
    };
    let gated = || HubError::Gated {
        repo: ctx.repo.to_string(),
    };
    match header(resp, "x-error-code") {
        // The Hub sends `RepoNotFound` (with 401 when no token is sent); `RepositoryNotFound` too.
        Some("RepoNotFound" | "RepositoryNotFound" | "RevisionNotFound") => return not_found(),
        Some("GatedRepo") => return gated(),
        _ => {}
    }
    match status {
        401 | 403 => gated(),
        404 if route == Route::Api => not_found(),
        _ => plain_http_error(url, resp),
    }
}

fn plain_http_error(url: &str, resp: &Response<Body>) -> HubError {
    HubError::Http {
        url: url.to_string(),
        status: resp.status().as_u16(),
        message: header(resp, "x-error-message")
            .map(str::to_string)
            .or_else(|| resp.status().canonical_reason().map(str::to_string))
            .unwrap_or_default(),
    }
}

fn retry_after(resp: &Response<Body>) -> Option<Duration> {
    header(resp, "retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
    siblings: Option<Vec<Sibling>>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// Where and what a file's bytes are.
pub(crate) struct FileMeta {
    /// The blob name: the normalized `X-Linked-Etag`, else `ETag`.
    pub etag: String,
    pub size: u64,
    /// The URL to GET the bytes from (the CDN one for LFS files).
    pub url: String,
}

/// A GET or a HEAD.
#[derive(Clone, Copy)]
enum Method {
    Get,
    Head,
}

impl HubClient {
    fn send(
        &self,
        method: Method,
        url: &str,
        range_from: Option<u64>,
    ) -> Result<Response<Body>, ureq::Error> {
        let mut req = match method {
            Method::Get => self.agent.get(url),
            Method::Head => self.no_redirect_agent.head(url),
        };
        if let Some(token) = &self.token {
            if names::same_origin(url, &self.endpoint) {
                req = req.header("Authorization", format!("Bearer {token}"));
            }
        }
        if let Some(from) = range_from {
            req = req.header("Range", format!("bytes={from}-"));
        }
        req.call()
    }

    /// The delay before try number `attempt + 1`.
    pub(crate) fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let cap = self.retry_base.saturating_mul(64);
        match hint {
            Some(d) => d.min(cap),
            None => self
                .retry_base
                .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
                .min(cap),
        }
    }

    /// Runs `op` until it is done, fails for good, or `max_attempts` tries are used up.
    pub(crate) fn retrying<T>(&self, url: &str, op: impl FnMut() -> Try<T>) -> Result<T, HubError> {
        self.retrying_unless(url, op, &|_| false)
    }

    /// [`HubClient::retrying`], which also stops at a retryable error for which `give_up` is
    /// true.
    pub(crate) fn retrying_unless<T>(
        &self,
        url: &str,
        mut op: impl FnMut() -> Try<T>,
        give_up: &dyn Fn(&HubError) -> bool,
    ) -> Result<T, HubError> {
        let mut attempt = 1;
        loop {
            match op() {
                Try::Done(v) => return Ok(v),
                Try::Fail(e) => return Err(e),
                Try::Again(mut e, hint) => {
                    if attempt >= self.max_attempts || give_up(&e) {
                        if let HubError::Network { attempts, .. } = &mut e {
                            *attempts = attempt;
                        }
                        return Err(e);
                    }
                    let delay = self.backoff(attempt, hint);
                    warn!(%url, attempt, ?delay, error = %e, "retrying");
                    thread::sleep(delay);
                    attempt += 1;
                }
            }
        }
    }

    /// `GET /api/models/{repo}/revision/{revision}`: the commit and the file list. Retries stop
    /// early at an error for which `give_up` is true.
    pub(crate) fn revision_info(
        &self,
        ctx: &Ctx,
        give_up: &dyn Fn(&HubError) -> bool,
    ) -> Result<(String, Vec<String>), HubError> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            ctx.repo,
            names::encode(ctx.revision, false)
        );
        let body = self.retrying_unless(
            &url,
            || {
                let mut resp = match self.send(Method::Get, &url, None) {
                    Ok(r) => r,
                    Err(e) => return transport_error(&url, e),
                };
                let status = resp.status().as_u16();
                if retryable_status(status) {
                    return Try::Again(
                        status_error(ctx, &url, &resp, Route::Api),
                        retry_after(&resp),
                    );
                }
                if !(200..300).contains(&status) {
                    return Try::Fail(status_error(ctx, &url, &resp, Route::Api));
                }
                match resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_JSON)
                    .read_to_string()
                {
                    Ok(s) => Try::Done(s),
                    Err(ureq::Error::BodyExceedsLimit(n)) => {
                        Try::Fail(HubError::bad(&url, format!("JSON larger than {n} bytes")))
                    }
                    Err(e) => transport_error(&url, e),
                }
            },
            give_up,
        )?;
        let info: RevisionInfo = serde_json::from_str(&body)
            .map_err(|e| HubError::bad(&url, format!("invalid revision JSON: {e}")))?;
        let sha = info
            .sha
            .ok_or_else(|| HubError::bad(&url, "revision JSON has no `sha`"))?;
        names::check_component("commit", &sha).map_err(|why| HubError::bad(&url, why))?;
        let siblings = info
            .siblings
            .ok_or_else(|| HubError::bad(&url, "revision JSON has no `siblings`"))?;
        let mut files = Vec::with_capacity(siblings.len());
        for s in siblings {
            names::check_repo_file(&s.rfilename).map_err(|why| {
                HubError::bad(&url, format!("{why}: it would escape the snapshot folder"))
            })?;
            files.push(s.rfilename);
        }
        Ok((sha, files))
    }

    /// `HEAD {endpoint}/{repo}/resolve/{commit}/{path}` without following redirects, as
    /// huggingface_hub does: the Hub's answer (a 302 to the CDN for LFS files) carries the
    /// etag and size; relative redirects (renamed repos) are followed here.
    pub(crate) fn file_meta(
        &self,
        ctx: &Ctx,
        commit: &str,
        path: &str,
    ) -> Result<FileMeta, HubError> {
        let mut url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            ctx.repo,
            names::encode(commit, false),
            names::encode(path, true)
        );
        for _ in 0..MAX_HOPS {
            let (meta, next) = self.retrying(&url, || {
                let resp = match self.send(Method::Head, &url, None) {
                    Ok(r) => r,
                    Err(e) => return transport_error(&url, e),
                };
                let status = resp.status().as_u16();
                if retryable_status(status) {
                    return Try::Again(
                        status_error(ctx, &url, &resp, Route::Resolve),
                        retry_after(&resp),
                    );
                }
                if status >= 400 {
                    return Try::Fail(status_error(ctx, &url, &resp, Route::Resolve));
                }
                let mut download = url.clone();
                if (300..400).contains(&status) {
                    let Some(loc) = header(&resp, "location") else {
                        return Try::Fail(HubError::bad(
                            &url,
                            format!("HTTP {status} without Location"),
                        ));
                    };
                    let Some(target) = names::join_location(&url, loc) else {
                        return Try::Fail(HubError::bad(&url, format!("bad Location {loc:?}")));
                    };
                    let absolute = loc.starts_with("http://")
                        || loc.starts_with("https://")
                        || loc.starts_with("//");
                    if !absolute {
                        return Try::Done((None, Some(target)));
                    }
                    download = target;
                }
                match parse_meta(&url, &resp, commit, download) {
                    Ok(m) => Try::Done((Some(m), None)),
                    Err(e) => Try::Fail(e),
                }
            })?;
            match (meta, next) {
                (Some(m), _) => return Ok(m),
                (None, Some(next)) => {
                    debug!(from = %url, to = %next, "following relative redirect");
                    url = next;
                }
                (None, None) => break,
            }
        }
        Err(HubError::bad(&url, "too many redirects"))
    }

    /// Downloads one blob to `blobs/<etag>.incomplete` (resuming it with `Range` when it
    /// exists), checks its size, and renames it to `blobs/<etag>`. Returns the bytes received,
    /// or `None` when another process finished the blob while this one waited for its lock.
    ///
    /// The whole download and the rename happen under an exclusive lock on
    /// `<cache>/.locks/models--org--name/<etag>.lock`, the file huggingface_hub locks, so two
    /// processes (Rust or Python) never write the same `.incomplete` file at once.
    pub(crate) fn fetch_blob(
        &self,
        ctx: &Ctx,
        meta: &FileMeta,
        blobs: &Path,
        bar: &ProgressBar,
        total: &ProgressBar,
    ) -> Result<Option<u64>, HubError> {
        let blob = blobs.join(&meta.etag);
        let part = blobs.join(format!("{}.incomplete", meta.etag));
        // Held (and released on drop) until the blob is in place or the download failed.
        let _lock = self.lock_blob(ctx.repo, &meta.etag)?;
        if fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size) {
            debug!(etag = %meta.etag, "blob finished by another process meanwhile");
            return Ok(None);
        }
        let mut received = 0u64;
        let url = &meta.url;
        if meta.size == 0 {
            File::create(&part).map_err(|e| HubError::io(&part, e))?;
        } else {
            self.retrying(url, || {
                self.fetch_try(ctx, meta, &part, &mut received, bar, total)
            })?;
        }
        let len = fs::metadata(&part)
            .map_err(|e| HubError::io(&part, e))?
            .len();
        if len != meta.size {
            // Cannot happen unless someone else writes the same file; do not keep it.
            let _ = fs::remove_file(&part);
            return Err(HubError::bad(
                url,
                format!("downloaded {len} bytes, expected {}", meta.size),
            ));
        }
        fs::rename(&part, &blob).map_err(|e| HubError::io(&blob, e))?;
        Ok(Some(received))
    }

    /// Takes the exclusive lock of one blob, `<cache>/.locks/<repo folder>/<etag>.lock`
    /// (creating the folders), waiting for whoever holds it. Dropping the file releases it.
    fn lock_blob(&self, repo: &str, etag: &str) -> Result<File, HubError> {
        let dir = self.cache_dir.join(".locks").join(names::repo_folder(repo));
        fs::create_dir_all(&dir).map_err(|e| HubError::io(&dir, e))?;
        let path = dir.join(format!("{etag}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| HubError::io(&path, e))?;
        file.lock().map_err(|e| HubError::io(&path, e))?;
        Ok(file)
    }

    fn fetch_try(
        &self,
        ctx: &Ctx,
        meta: &FileMeta,
        part: &Path,
        received: &mut u64,
        bar: &ProgressBar,
        total: &ProgressBar,
    ) -> Try<()> {
        let url = &meta.url;
        let have = match fs::metadata(part) {
            Ok(m) if m.len() < meta.size => m.len(),
            Ok(_) => 0, // as long or longer than the file: start again
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Try::Fail(HubError::io(part, e)),
        };
        let resp = match self.send(Method::Get, url, (have > 0).then_some(have)) {
            Ok(r) => r,
            Err(e) => return transport_error(url, e),
        };
        let status = resp.status().as_u16();
        // The bytes may come from a CDN: its 401/403 (an expired signed URL) is no gating.
        let route = if names::same_origin(url, &self.endpoint) {
            Route::Resolve
        } else {
            Route::Other
        };
        let start = match status {
            206 if have > 0 => {
                let expect = format!("bytes {have}-");
                if header(&resp, "content-range").is_some_and(|r| r.trim().starts_with(&expect)) {
                    have
                } else {
                    let _ = fs::remove_file(part);
                    return Try::Again(
                        HubError::bad(url, "Content-Range does not match the resume point"),
                        Some(Duration::ZERO),
                    );
                }
            }
            200 => 0,
            416 => {
                let _ = fs::remove_file(part);
                return Try::Again(
                    HubError::bad(url, "range not satisfiable"),
                    Some(Duration::ZERO),
                );
            }
            s if retryable_status(s) => {
                return Try::Again(status_error(ctx, url, &resp, route), retry_after(&resp))
            }
            _ => return Try::Fail(status_error(ctx, url, &resp, route)),
        };
        let opened = if start > 0 {
            OpenOptions::new().append(true).open(part)
        } else {
            File::create(part)
        };
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => return Try::Fail(HubError::io(part, e)),
        };
        if start > 0 {
            debug!(%url, from = start, "resuming download");
        }
        bar.set_position(start);
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = start;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Try::Again(network(url, e), None),
            };
            let n64 = n as u64;
            if pos + n64 > meta.size {
                drop(file);
                let _ = fs::remove_file(part);
                return Try::Fail(HubError::bad(
                    url,
                    format!("server sent more than the {} bytes announced", meta.size),
                ));
            }
            if let Err(e) = file.write_all(&buf[..n]) {
                return Try::Fail(HubError::io(part, e));
            }
            pos += n64;
            *received += n64;
            bar.inc(n64);
            total.inc(n64);
        }
        if let Err(e) = file.flush() {
            return Try::Fail(HubError::io(part, e));
        }
        if pos != meta.size {
            return Try::Again(
                HubError::bad(
                    url,
                    format!("download ended after {pos} of {} bytes", meta.size),
                ),
                None,
            );
        }
        Try::Done(())
    }
}

fn parse_meta(
    url: &str,
    resp: &Response<Body>,
    commit: &str,
    download: String,
) -> Result<FileMeta, HubError> {
    if let Some(c) = header(resp, "x-repo-commit") {
        if c != commit {
            warn!(%url, expected = commit, got = c, "X-Repo-Commit differs from the resolved commit");
        }
    }
    let etag = header(resp, "x-linked-etag")
        .or_else(|| header(resp, "etag"))
        .map(names::normalize_etag)
        .ok_or_else(|| HubError::bad(url, "no ETag or X-Linked-Etag header"))?;
    names::check_component("etag", etag).map_err(|why| HubError::bad(url, why))?;
    let size = header(resp, "x-linked-size")
        .or_else(|| header(resp, "content-length"))
        .ok_or_else(|| HubError::bad(url, "no X-Linked-Size or Content-Length header"))?;
    let size = size
        .trim()
        .parse::<u64>()
        .map_err(|_| HubError::bad(url, format!("bad file size {size:?}")))?;
    Ok(FileMeta {
        etag: etag.to_string(),
        size,
        url: download,
    })
}
