//! The one error type of the crate.

use std::path::PathBuf;

use crate::cache::CacheMiss;

/// Everything [`crate::HubClient`] can fail with.
///
/// `NotFound` and `Gated` are the two a user can act on, so their messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The repo or the revision does not exist (or is private and no token with access was sent:
    /// the Hub answers both the same way).
    #[error(
        "model repo `{repo}` at revision `{revision}` was not found on the Hub: check the name and \
         the revision (a private repo also needs HF_TOKEN set to a token with access)"
    )]
    NotFound { repo: String, revision: String },

    /// 401/403: the repo is gated (licence not accepted) or private, or the token is wrong.
    #[error(
        "access to model repo `{repo}` was refused: it is gated or private. Accept its licence on \
         the repo's Hub page, then set HF_TOKEN (or save a token with `hf auth login`) to a token \
         of an account that has access"
    )]
    Gated { repo: String },

    /// Any other HTTP error status (after retries, for the retryable ones: 5xx, 429, 408).
    #[error("HTTP {status} from {url}: {message}")]
    Http {
        url: String,
        status: u16,
        /// The Hub's `X-Error-Message`, else the status' reason phrase.
        message: String,
    },

    /// Connection, TLS, timeout or read errors, after `attempts` tries.
    #[error("network error on {url} after {attempts} attempt(s): {source}")]
    Network {
        url: String,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Reading or writing the local cache failed.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The server answered something this client will not use: bad JSON, missing headers,
    /// a truncated download, a file path that would escape the snapshot folder...
    #[error("unexpected response from {url}: {why}")]
    BadResponse { url: String, why: String },

    /// Refused before any request: not `org/name` or `name`.
    #[error("invalid model repo name `{repo}`: {why} (expected `org/name` or `name`)")]
    InvalidRepo { repo: String, why: String },

    /// Refused before any request: empty, `..`, absolute, or odd characters.
    #[error("invalid revision `{revision}`: {why}")]
    InvalidRevision { revision: String, why: String },

    /// Offline mode (`HF_HUB_OFFLINE`) is on, so the Hub was not asked, and the cache cannot
    /// serve `repo@revision`: `missing` says what it lacks.
    #[error(
        "offline ({setting}): {repo}@{revision} is not in the Hugging Face cache at {}: {missing}. \
         Pull it once with network access (HF_HUB_OFFLINE unset) into this cache",
        .cache.display()
    )]
    NotCachedOffline {
        /// What turned offline mode on, e.g. `HF_HUB_OFFLINE=1`.
        setting: String,
        repo: String,
        revision: String,
        /// The cache folder (the one holding `models--*`).
        cache: PathBuf,
        missing: Box<CacheMiss>,
    },

    /// The Hub could not be reached (`source`: the network error, or a 5xx after retries) and
    /// the cache cannot serve `repo@revision` either.
    #[error(
        "the Hub could not be reached ({source}), and {repo}@{revision} is not in the Hugging Face \
         cache at {}: {missing}",
        .cache.display()
    )]
    UnreachableNotCached {
        #[source]
        source: Box<HubError>,
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: Box<CacheMiss>,
    },
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the Hub could not be reached: a network error (connection refused, DNS,
    /// timeout, TLS, a read that failed), or an HTTP status that says the Hub is down or
    /// overloaded (5xx, 429, 408) after the retries. A cached snapshot may stand in then;
    /// not for an answer about the repo itself (not found, gated).
    pub fn is_unreachable(&self) -> bool {
        match self {
            HubError::Network { .. } => true,
            HubError::Http { status, .. } => crate::http::retryable_status(*status),
            _ => false,
        }
    }

    pub(crate) fn bad(url: &str, why: impl Into<String>) -> Self {
        HubError::BadResponse {
            url: url.to_string(),
            why: why.into(),
        }
    }
}
