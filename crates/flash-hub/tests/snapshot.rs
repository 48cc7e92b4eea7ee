//! `HubClient::snapshot` against the local Hub server of `common`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{etag_for, HubServer, Truncate};
use flash_hub::{HubClient, HubError};

const REPO: &str = "acme/tiny";
const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn config() -> Vec<u8> {
    br#"{"model_type":"qwen3","hidden_size":8}"#.to_vec()
}
fn weights() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}
fn vocab() -> Vec<u8> {
    b"a\nb\nc\n".to_vec()
}
fn other_weights() -> Vec<u8> {
    vec![9u8; 1000]
}

/// A server with `acme/tiny`: commit C1 (main), with three wanted files and one unwanted.
fn server() -> HubServer {
    let s = HubServer::start();
    s.add_commit(
        REPO,
        C1,
        &[
            ("config.json", &config()),
            ("model.safetensors", &weights()),
            ("tokenizer/vocab.txt", &vocab()),
            ("pytorch_model.bin", &other_weights()),
        ],
    );
    s.set_ref(REPO, "main", C1);
    s
}

struct Env {
    _cache: tempfile::TempDir,
    cache: PathBuf,
}

fn env() -> Env {
    let cache = tempfile::tempdir().expect("cache dir");
    Env {
        cache: cache.path().to_path_buf(),
        _cache: cache,
    }
}

fn client(s: &HubServer, e: &Env) -> HubClient {
    HubClient::from_env()
        .with_endpoint(&s.url)
        .with_cache_dir(&e.cache)
        .with_token(None)
        .with_progress(false)
        .with_retries(3, Duration::from_millis(1))
}

fn no_bin(path: &str) -> bool {
    !path.ends_with(".bin")
}

fn repo_dir(e: &Env) -> PathBuf {
    e.cache.join("models--acme--tiny")
}

fn is_resolve_or_cdn(r: &common::Request) -> bool {
    r.path.contains("/resolve/") || r.path.starts_with("/cdn/")
}

fn blob_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn full_snapshot_has_the_hub_cache_layout() {
    let s = server();
    let e = env();
    let snap = client(&s, &e)
        .with_progress(true)
        .snapshot(REPO, "main", &no_bin)
        .expect("snapshot");

    let repo = repo_dir(&e);
    assert_eq!(snap.repo, REPO);
    assert_eq!(snap.commit, C1);
    assert_eq!(snap.dir, repo.join("snapshots").join(C1));
    assert_eq!(
        snap.files,
        ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    );
    assert_eq!(
        snap.downloaded_bytes,
        (config().len() + weights().len() + vocab().len()) as u64
    );
    assert_eq!(snap.cached_files, 0);

    // The cache is tagged for backup tools, as huggingface_hub tags it.
    let tag = fs::read_to_string(e.cache.join("CACHEDIR.TAG")).expect("CACHEDIR.TAG");
    assert!(
        tag.starts_with("Signature: 8a477f597d28d172789f06886806bc55\n"),
        "{tag}"
    );

    // refs/main holds the commit, with no newline (as huggingface_hub writes it).
    assert_eq!(fs::read_to_string(repo.join("refs/main")).expect("ref"), C1);

    // blobs/<etag>: the X-Linked-Etag (sha256) for LFS files, the ETag for the others.
    let lfs = etag_for("model.safetensors", &weights());
    let cfg = etag_for("config.json", &config());
    let voc = etag_for("vocab.txt", &vocab());
    assert_eq!(lfs.len(), 64);
    let mut expect = vec![lfs.clone(), cfg.clone(), voc.clone()];
    expect.sort();
    assert_eq!(
        blob_names(&repo.join("blobs")),
        expect,
        "no .incomplete left, no extra blob"
    );
    assert_eq!(
        fs::read(repo.join("blobs").join(&lfs)).expect("blob"),
        weights()
    );

    // snapshots/<commit>/<path> are relative symlinks into blobs/.
    let link = |p: &str| fs::read_link(snap.dir.join(p)).expect("symlink");
    assert_eq!(link("config.json"), Path::new("../../blobs").join(&cfg));
    assert_eq!(
        link("model.safetensors"),
        Path::new("../../blobs").join(&lfs)
    );
    assert_eq!(
        link("tokenizer/vocab.txt"),
        Path::new("../../../blobs").join(&voc)
    );
    assert_eq!(
        fs::read(snap.dir.join("config.json")).expect("read"),
        config()
    );
    assert_eq!(
        fs::read(snap.dir.join("tokenizer/vocab.txt")).expect("read"),
        vocab()
    );
    assert_eq!(
        fs::read(snap.dir.join("model.safetensors")).expect("read"),
        weights()
    );

    // The unwanted file was neither requested nor written.
    assert!(!snap.dir.join("pytorch_model.bin").exists());
    assert_eq!(s.count(|r| r.path.contains("pytorch_model.bin")), 0);
    // LFS bytes came from the CDN route after a HEAD on resolve.
    assert_eq!(
        s.count(|r| r.method == "HEAD" && r.path.contains("/resolve/")),
        3
    );
    assert_eq!(
        s.count(|r| r.method == "GET" && r.path.starts_with("/cdn/")),
        1
    );

    // The offline lookup finds it.
    let c = client(&s, &e);
    assert_eq!(
        c.cached_snapshot_dir(REPO, "main").expect("lookup"),
        Some(snap.dir.clone())
    );
    assert_eq!(
        c.cached_snapshot_dir(REPO, C1).expect("lookup"),
        Some(snap.dir.clone())
    );
    assert_eq!(c.cached_snapshot_dir(REPO, "v9").expect("lookup"), None);
    assert_eq!(
        c.cached_snapshot_dir("acme/other", "main").expect("lookup"),
        None
    );
}

#[test]
fn second_snapshot_downloads_nothing() {
    let s = server();
    let e = env();
    let c = client(&s, &e);
    let first = c.snapshot(REPO, "main", &no_bin).expect("first");
    s.clear_requests();

    let again = c.snapshot(REPO, "main", &no_bin).expect("second");
    assert_eq!(again.commit, first.commit);
    assert_eq!(again.files, first.files);
    assert_eq!(again.downloaded_bytes, 0);
    assert_eq!(again.cached_files, 3);
    // Only the revision lookup: no HEAD, no GET of any file.
    let reqs = s.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0]
        .path
        .starts_with("/api/models/acme/tiny/revision/main"));
}

#[test]
fn new_commit_reuses_blobs_and_downloads_only_what_changed() {
    let s = server();
    let e = env();
    let c = client(&s, &e);
    c.snapshot(REPO, "main", &no_bin).expect("first");

    // C2 changes only config.json.
    let new_config = br#"{"model_type":"qwen3","hidden_size":16}"#.to_vec();
    s.add_commit(
        REPO,
        C2,
        &[
            ("config.json", &new_config),
            ("model.safetensors", &weights()),
            ("tokenizer/vocab.txt", &vocab()),
        ],
    );
    s.set_ref(REPO, "main", C2);
    s.clear_requests();

    let snap = c.snapshot(REPO, "main", &no_bin).expect("second");
    assert_eq!(snap.commit, C2);
    assert_eq!(snap.downloaded_bytes, new_config.len() as u64);
    assert_eq!(snap.cached_files, 2);
    assert_eq!(s.count(|r| r.method == "GET" && is_resolve_or_cdn(r)), 1);
    assert_eq!(
        fs::read_to_string(repo_dir(&e).join("refs/main")).expect("ref"),
        C2
    );
    assert_eq!(
        fs::read(snap.dir.join("config.json")).expect("read"),
        new_config
    );
    assert_eq!(
        fs::read(snap.dir.join("model.safetensors")).expect("read"),
        weights()
    );
    // The old snapshot is untouched.
    let old = repo_dir(&e).join("snapshots").join(C1).join("config.json");
    assert_eq!(fs::read(old).expect("read"), config());
}

#[test]
fn tags_branches_and_commits_resolve() {
    let s = server();
    s.add_commit(REPO, C2, &[("config.json", b"{}")]);
    s.set_ref(REPO, "v1.0", C1);
    s.set_ref(REPO, "dev", C2);
    s.set_ref(REPO, "refs/pr/1", C2);
    let e = env();
    let c = client(&s, &e);
    let refs = repo_dir(&e).join("refs");

    let tag = c.snapshot(REPO, "v1.0", &no_bin).expect("tag");
    assert_eq!(tag.commit, C1);
    assert_eq!(fs::read_to_string(refs.join("v1.0")).expect("ref"), C1);

    let branch = c.snapshot(REPO, "dev", &|_| true).expect("branch");
    assert_eq!(branch.commit, C2);
    assert_eq!(branch.files, ["config.json"]);
    assert_eq!(fs::read_to_string(refs.join("dev")).expect("ref"), C2);

    // A revision with `/` is encoded in the URL and nests under refs/.
    let pr = c.snapshot(REPO, "refs/pr/1", &|_| true).expect("pr");
    assert_eq!(pr.commit, C2);
    assert!(s.count(|r| r.path.ends_with("/revision/refs%2Fpr%2F1")) >= 1);
    assert_eq!(fs::read_to_string(refs.join("refs/pr/1")).expect("ref"), C2);

    // A commit resolves to itself and writes no ref.
    let by_commit = c.snapshot(REPO, C1, &no_bin).expect("commit");
    assert_eq!(by_commit.commit, C1);
    assert!(!refs.join(C1).exists());
}

#[test]
fn missing_repo_or_revision_is_not_found() {
    let s = server();
    let e = env();
    let c = client(&s, &e);

    let err = c.snapshot("acme/nope", "main", &|_| true).unwrap_err();
    assert!(
        matches!(&err, HubError::NotFound { repo, revision } if repo == "acme/nope" && revision == "main"),
        "{err:?}"
    );
    assert!(err.to_string().contains("acme/nope"), "{err}");
    // Not retried: a 404 is an answer.
    assert_eq!(s.count(|r| r.path.contains("acme/nope")), 1);

    let err = c.snapshot(REPO, "no-such-branch", &|_| true).unwrap_err();
    assert!(matches!(&err, HubError::NotFound { revision, .. } if revision == "no-such-branch"));
    assert!(err.to_string().contains("no-such-branch"));

    // The Hub answers 401 + X-Error-Code for a missing repo when no token is sent.
    s.fail(
        "/api/models/acme/tiny/",
        1,
        401,
        &[("X-Error-Code", "RepositoryNotFound")],
    );
    let err = c.snapshot(REPO, "main", &|_| true).unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");
    assert!(!repo_dir(&e).join("snapshots").exists());
}

#[test]
fn gated_or_unauthorized_is_gated_and_says_hf_token() {
    let s = server();
    s.gate(REPO);
    let e = env();
    let c = client(&s, &e);

    // Like the Hub: the revision info is public, the files are not.
    let err = c.snapshot(REPO, "main", &no_bin).unwrap_err();
    assert!(
        matches!(&err, HubError::Gated { repo } if repo == REPO),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("HF_TOKEN") && msg.contains(REPO), "{msg}");
    assert!(blob_names(&repo_dir(&e).join("blobs")).is_empty());
    assert!(!repo_dir(&e).join("refs/main").exists());

    // A plain 401/403 from the API (no error code) is reported the same way.
    for status in [401, 403] {
        let s = server();
        s.fail("/api/models/", 1, status, &[]);
        let err = client(&s, &e).snapshot(REPO, "main", &no_bin).unwrap_err();
        assert!(matches!(err, HubError::Gated { .. }), "{status}: {err:?}");
        assert_eq!(s.requests().len(), 1, "auth errors are not retried");
    }
}

#[test]
fn token_is_sent_as_bearer_to_the_hub_only() {
    let mut s = server();
    let cdn = s.start_cdn();
    s.require_token("hf_secret");
    let e = env();

    let err = client(&s, &e).snapshot(REPO, "main", &no_bin).unwrap_err();
    assert!(matches!(err, HubError::Gated { .. }), "{err:?}");

    s.clear_requests();
    let snap = client(&s, &e)
        .with_token(Some("hf_secret".into()))
        .snapshot(REPO, "main", &no_bin)
        .expect("with token");
    assert_eq!(
        fs::read(snap.dir.join("model.safetensors")).expect("read"),
        weights()
    );

    let reqs = s.requests();
    let (to_cdn, to_hub): (Vec<_>, Vec<_>) = reqs.iter().partition(|r| r.path.starts_with("/cdn/"));
    assert!(!to_hub.is_empty() && !to_cdn.is_empty());
    for r in to_hub {
        assert_eq!(r.header("authorization"), Some("Bearer hf_secret"), "{r:?}");
    }
    // The CDN (another origin) never sees the token.
    assert!(cdn.starts_with("http://127.0.0.1:"));
    for r in to_cdn {
        assert_eq!(r.header("authorization"), None, "{r:?}");
    }
}

#[test]
fn server_errors_are_retried() {
    let s = server();
    s.fail("/api/models/", 2, 500, &[]);
    s.fail("/cdn/", 2, 503, &[("Retry-After", "1")]);
    s.fail("/resolve/", 1, 429, &[]);
    let e = env();
    let snap = client(&s, &e)
        .snapshot(REPO, "main", &no_bin)
        .expect("succeeds on the third try");
    assert_eq!(
        fs::read(snap.dir.join("model.safetensors")).expect("read"),
        weights()
    );
    assert_eq!(s.count(|r| r.path.starts_with("/api/models/")), 3);
    assert_eq!(s.count(|r| r.path.starts_with("/cdn/")), 3);
}

#[test]
fn retries_are_bounded() {
    let s = server();
    s.fail("/api/models/", 10, 502, &[]);
    let e = env();
    // With nothing in the cache to fall back on, the error is the last answer.
    let err = client(&s, &e).snapshot(REPO, "main", &no_bin).unwrap_err();
    assert!(
        matches!(&err, HubError::UnreachableNotCached { source, .. }
            if matches!(**source, HubError::Http { status: 502, .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("HTTP 502"), "{err}");
    assert_eq!(s.requests().len(), 3, "with_retries(3, ..) means 3 tries");

    // Nobody listening: a network error, after the same number of tries.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let err = client(&s, &e)
        .with_endpoint(&dead)
        .snapshot(REPO, "main", &no_bin)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::UnreachableNotCached { source, .. }
            if matches!(&**source, HubError::Network { attempts: 3, url, .. } if url.starts_with(&dead))),
        "{err:?}"
    );
}

#[test]
fn unsafe_paths_from_the_server_are_refused() {
    for bad in [
        "../../evil.txt",
        "a/../../evil.txt",
        "/tmp/evil.txt",
        "a//b",
    ] {
        let s = server();
        s.add_sibling(REPO, bad);
        let e = env();
        let err = client(&s, &e)
            .snapshot(REPO, "main", &|_| true)
            .unwrap_err();
        assert!(
            matches!(err, HubError::BadResponse { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains(bad), "{err}");
        // Refused before anything was fetched or written.
        assert_eq!(s.count(is_resolve_or_cdn), 0);
        assert!(!repo_dir(&e).join("snapshots").exists());
        assert!(!e.cache.join("evil.txt").exists());
    }
}

#[test]
fn invalid_names_are_refused_before_any_request() {
    let s = server();
    let e = env();
    let c = client(&s, &e);
    for repo in [
        "../acme",
        "acme/../../x",
        "/etc/passwd",
        "a/b/c",
        "",
        "acme/ti ny",
        "a--b",
    ] {
        let err = c.snapshot(repo, "main", &|_| true).unwrap_err();
        assert!(
            matches!(err, HubError::InvalidRepo { .. }),
            "{repo:?}: {err:?}"
        );
    }
    for rev in ["", "../main", "/main", "a/../../b"] {
        let err = c.snapshot(REPO, rev, &|_| true).unwrap_err();
        assert!(
            matches!(err, HubError::InvalidRevision { .. }),
            "{rev:?}: {err:?}"
        );
    }
    assert!(s.requests().is_empty());
    assert!(fs::read_dir(&e.cache).expect("cache").next().is_none());
}

#[test]
fn truncated_downloads_leave_no_blob_and_resume_later() {
    let s = server();
    let e = env();
    let c = client(&s, &e);
    let lfs = etag_for("model.safetensors", &weights());
    let blobs = repo_dir(&e).join("blobs");
    let full = weights().len();

    // Content-Length announces the whole file; the connection closes halfway.
    s.truncate("model.safetensors", Some(Truncate::ShortBody));
    let err = c.snapshot(REPO, "main", &no_bin).unwrap_err();
    assert!(
        matches!(err, HubError::Network { .. } | HubError::BadResponse { .. }),
        "{err:?}"
    );
    assert!(!blobs.join(&lfs).exists(), "no blob for a truncated file");
    let snap_dir = repo_dir(&e).join("snapshots").join(C1);
    assert!(!snap_dir.join("model.safetensors").exists());
    assert!(!repo_dir(&e).join("refs/main").exists());
    // Every try resumed from what the previous one wrote.
    let ranges: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn/"))
        .map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[0], None);
    assert!(ranges[1].is_some() && ranges[2].is_some(), "{ranges:?}");
    let part_len = fs::metadata(blobs.join(format!("{lfs}.incomplete")))
        .expect("partial file kept for resuming")
        .len() as usize;
    assert!(part_len > 0 && part_len < full);

    // A consistent but short response (Content-Length < X-Linked-Size) is no blob either.
    let e2 = env();
    s.truncate("model.safetensors", Some(Truncate::ShortLength));
    let err = client(&s, &e2).snapshot(REPO, "main", &no_bin).unwrap_err();
    assert!(
        matches!(&err, HubError::BadResponse { why, .. } if why.contains("bytes")),
        "{err:?}"
    );
    assert!(!repo_dir(&e2).join("blobs").join(&lfs).exists());

    // Once the server behaves, the next pull resumes the partial file with Range.
    s.truncate("model.safetensors", None);
    s.clear_requests();
    let snap = c.snapshot(REPO, "main", &no_bin).expect("resumed");
    let cdn: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(cdn.len(), 1);
    assert_eq!(
        cdn[0].header("range"),
        Some(format!("bytes={part_len}-").as_str())
    );
    assert_eq!(
        fs::read(snap.dir.join("model.safetensors")).expect("read"),
        weights()
    );
    assert!(!blobs.join(format!("{lfs}.incomplete")).exists());
    // Only the missing tail (plus the files that were not downloaded before) came over the wire.
    assert!(snap.downloaded_bytes < (full + config().len() + vocab().len()) as u64);
}

#[test]
fn identical_files_share_one_blob_and_one_download() {
    let s = HubServer::start();
    s.add_commit(
        "solo",
        C1,
        &[
            ("a/model.safetensors", &weights()),
            ("b/model.safetensors", &weights()),
        ],
    );
    s.set_ref("solo", "main", C1);
    let e = env();
    let snap = client(&s, &e)
        .with_parallelism(8)
        .snapshot("solo", "main", &|_| true)
        .expect("snapshot");
    assert_eq!(snap.files.len(), 2);
    assert_eq!(snap.downloaded_bytes, weights().len() as u64);
    assert_eq!(s.count(|r| r.path.starts_with("/cdn/")), 1);
    let blobs = e.cache.join("models--solo").join("blobs");
    assert_eq!(blob_names(&blobs).len(), 1);
    for f in &snap.files {
        assert_eq!(fs::read(snap.dir.join(f)).expect("read"), weights());
    }
}

#[test]
fn an_empty_repo_selection_still_resolves() {
    let s = server();
    let e = env();
    let snap = client(&s, &e)
        .snapshot(REPO, "main", &|_| false)
        .expect("snapshot");
    assert!(snap.files.is_empty());
    assert_eq!(snap.downloaded_bytes, 0);
    assert!(snap.dir.is_dir());
    assert_eq!(s.count(is_resolve_or_cdn), 0);
}

#[test]
fn concurrent_pulls_into_one_cache_download_each_blob_once() {
    let s = server();
    let e = env();
    // The first GET of the weights holds its body until both clients asked for the file's
    // metadata: the second then finds no blob and must wait on the first one's lock.
    s.hold_body("model.safetensors", 2);
    let pull = || {
        client(&s, &e)
            .snapshot(REPO, "main", &no_bin)
            .expect("snapshot")
    };
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(pull);
        let b = sc.spawn(pull);
        (a.join().expect("thread a"), b.join().expect("thread b"))
    });

    let lfs = etag_for("model.safetensors", &weights());
    let cdn_gets = s.count(|r| r.method == "GET" && r.path == format!("/cdn/{lfs}"));
    assert_eq!(cdn_gets, 1, "the weights were fetched {cdn_gets} times");
    // Every blob came over the wire once in all; the client that waited only linked it.
    let all = (config().len() + weights().len() + vocab().len()) as u64;
    assert_eq!(a.downloaded_bytes + b.downloaded_bytes, all);
    assert_eq!(a.cached_files + b.cached_files, 3);
    let waited = if a.downloaded_bytes < b.downloaded_bytes {
        &a
    } else {
        &b
    };
    assert!(waited.downloaded_bytes <= all - weights().len() as u64);

    let repo = repo_dir(&e);
    assert_eq!(
        fs::read(repo.join("blobs").join(&lfs)).expect("blob"),
        weights()
    );
    for snap in [&a, &b] {
        assert_eq!(snap.commit, C1);
        assert_eq!(
            fs::read(snap.dir.join("model.safetensors")).expect("read"),
            weights()
        );
        assert_eq!(
            fs::read(snap.dir.join("config.json")).expect("read"),
            config()
        );
        assert_eq!(
            fs::read(snap.dir.join("tokenizer/vocab.txt")).expect("read"),
            vocab()
        );
    }
    assert!(!blob_names(&repo.join("blobs"))
        .iter()
        .any(|n| n.ends_with(".incomplete")));
    assert!(e
        .cache
        .join(".locks/models--acme--tiny")
        .join(format!("{lfs}.lock"))
        .is_file());
}
