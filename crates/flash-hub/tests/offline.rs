//! The cache without the Hub: `HF_HUB_OFFLINE`, and the fallback when the Hub cannot be
//! reached. Caches are laid out by hand as huggingface_hub leaves them; the only server is
//! the local one of `common`, there to prove that no request was made.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{etag_for, HubServer};
use flash_hub::{CacheMiss, HubClient, HubError};

const REPO: &str = "acme/tiny";
const FOLDER: &str = "models--acme--tiny";
const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The files `flash pull` wants: top-level, no README.
fn want(path: &str) -> bool {
    !path.contains('/') && !path.ends_with(".md") && !path.starts_with('.')
}

fn index() -> Vec<u8> {
    format!(r#"{{"metadata":{{}},"weight_map":{{"a":"{SHARD1}","b":"{SHARD2}","c":"{SHARD2}"}}}}"#)
        .into_bytes()
}

/// A Hub cache laid out by hand.
struct Cache {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Cache {
    fn new() -> Cache {
        let tmp = tempfile::tempdir().expect("cache dir");
        Cache {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }

    fn repo(&self) -> PathBuf {
        self.root.join(FOLDER)
    }

    /// `blobs/<etag>` and the relative link `snapshots/<commit>/<path>` to it.
    fn put(&self, commit: &str, path: &str, bytes: &[u8]) {
        let etag = etag_for(path, bytes);
        let blobs = self.repo().join("blobs");
        fs::create_dir_all(&blobs).expect("mkdir blobs");
        fs::write(blobs.join(&etag), bytes).expect("write blob");
        let link = self.repo().join("snapshots").join(commit).join(path);
        fs::create_dir_all(link.parent().expect("parent")).expect("mkdir snapshot");
        let mut target = PathBuf::new();
        for _ in 0..path.split('/').count() + 1 {
            target.push("..");
        }
        target.push("blobs");
        target.push(&etag);
        std::os::unix::fs::symlink(target, link).expect("symlink");
    }

    fn blob_of(&self, path: &str, bytes: &[u8]) -> PathBuf {
        self.repo().join("blobs").join(etag_for(path, bytes))
    }

    fn unlink(&self, commit: &str, path: &str) {
        fs::remove_file(self.repo().join("snapshots").join(commit).join(path)).expect("unlink");
    }

    fn set_ref(&self, revision: &str, content: &str) {
        let p = self.repo().join("refs").join(revision);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir refs");
        fs::write(p, content).expect("write ref");
    }

    /// huggingface_hub's `trees/<commit>.json` (format 1).
    fn listing(&self, commit: &str, files: &[(&str, u64)], version: u64) {
        let files: serde_json::Map<String, serde_json::Value> = files
            .iter()
            .map(|(p, size)| {
                let v = if p.ends_with(".safetensors") {
                    serde_json::json!({"size": size, "blob_id": "b", "lfs_sha256": "s", "lfs_size": size})
                } else {
                    serde_json::json!({"size": size, "blob_id": "b"})
                };
                (p.to_string(), v)
            })
            .collect();
        let body = serde_json::json!({"format_version": version, "files": files});
        let dir = self.repo().join("trees");
        fs::create_dir_all(&dir).expect("mkdir trees");
        fs::write(dir.join(format!("{commit}.json")), body.to_string()).expect("write listing");
    }

    /// A complete sharded model at `commit`, plus a README, and `refs/main` -> `commit`.
    fn sharded(commit: &str) -> Cache {
        let c = Cache::new();
        c.put(commit, "config.json", b"{\"model_type\":\"llama\"}");
        c.put(commit, INDEX, &index());
        c.put(commit, SHARD1, &[1u8; 100]);
        c.put(commit, SHARD2, &[2u8; 200]);
        c.put(commit, "tokenizer.json", b"{}");
        c.put(commit, "README.md", b"# tiny");
        c.set_ref("main", commit);
        c
    }

    /// Every path under the cache, with its link target or size: to check nothing changed.
    fn tree(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).expect("read_dir").flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).expect("prefix").display().to_string();
                let meta = fs::symlink_metadata(&p).expect("lstat");
                if meta.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(&p, base, out);
                } else if meta.file_type().is_symlink() {
                    out.push(format!(
                        "{rel} -> {}",
                        fs::read_link(&p).expect("readlink").display()
                    ));
                } else {
                    out.push(format!("{rel} {}", meta.len()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }
}

/// A client configured through its environment variables.
fn client_env(vars: &[(&str, &str)]) -> HubClient {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    HubClient::from_lookup(|k| vars.get(k).cloned(), None)
        .with_progress(false)
        .with_retries(3, Duration::from_millis(1))
}

/// Offline, with `HF_HUB_OFFLINE=1`, endpoint on the local server (which must see nothing).
fn offline(cache: &Cache, server: &HubServer) -> HubClient {
    client_env(&[
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_CACHE", cache.root.to_str().expect("utf-8")),
        ("HF_ENDPOINT", &server.url),
    ])
}

fn online(cache: &Cache, endpoint: &str) -> HubClient {
    client_env(&[
        ("HF_HUB_CACHE", cache.root.to_str().expect("utf-8")),
        ("HF_ENDPOINT", endpoint),
    ])
}

/// An endpoint nobody listens on: connections are refused.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

fn offline_miss(err: HubError) -> CacheMiss {
    match err {
        HubError::NotCachedOffline { missing, .. } => *missing,
        other => panic!("expected NotCachedOffline, got {other:?}"),
    }
}

#[test]
fn offline_values_are_read_as_huggingface_hub_reads_them() {
    for on in ["1", "ON", "on", "Yes", "TRUE", "true"] {
        assert!(client_env(&[("HF_HUB_OFFLINE", on)]).is_offline(), "{on:?}");
    }
    for off in ["0", "false", "no", "off", "2", " 1", "", "  ", "enabled"] {
        assert!(
            !client_env(&[("HF_HUB_OFFLINE", off)]).is_offline(),
            "{off:?}"
        );
    }
    assert!(!client_env(&[]).is_offline());
    // TRANSFORMERS_OFFLINE counts when HF_HUB_OFFLINE is not set (or empty)...
    assert!(client_env(&[("TRANSFORMERS_OFFLINE", "1")]).is_offline());
    assert!(client_env(&[("HF_HUB_OFFLINE", ""), ("TRANSFORMERS_OFFLINE", "yes")]).is_offline());
    // ...and not when it is set to anything else.
    assert!(!client_env(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")]).is_offline());
    assert!(HubClient::from_lookup(|_| None, None)
        .with_offline(true)
        .is_offline());
    assert!(!client_env(&[("HF_HUB_OFFLINE", "1")])
        .with_offline(false)
        .is_offline());
}

#[test]
fn offline_complete_snapshot_through_refs_makes_no_request_and_writes_nothing() {
    let s = HubServer::start();
    let c = Cache::sharded(C1);
    let before = c.tree();
    let snap = offline(&c, &s)
        .snapshot(REPO, "main", &want)
        .expect("complete snapshot");
    assert_eq!(snap.repo, REPO);
    assert_eq!(snap.commit, C1);
    assert_eq!(snap.dir, c.repo().join("snapshots").join(C1));
    assert_eq!(
        snap.files,
        ["config.json", SHARD1, SHARD2, INDEX, "tokenizer.json"],
        "wanted files, sorted; README.md is not wanted"
    );
    assert_eq!(snap.downloaded_bytes, 0);
    assert_eq!(snap.cached_files, 5);
    assert!(snap.cache_only);
    assert!(s.requests().is_empty(), "{:?}", s.requests());
    assert_eq!(c.tree(), before, "offline mode wrote into the cache");

    // A ref written by hand with a newline works too.
    c.set_ref("main", &format!("{C1}\n"));
    let snap = offline(&c, &s)
        .snapshot(REPO, "main", &want)
        .expect("ref with newline");
    assert_eq!(snap.commit, C1);
    assert!(s.requests().is_empty());
}

#[test]
fn offline_commit_hash_needs_no_ref_but_a_branch_does() {
    let s = HubServer::start();
    let c = Cache::sharded(C1);
    fs::remove_dir_all(c.repo().join("refs")).expect("rm refs");

    let snap = offline(&c, &s)
        .snapshot(REPO, C1, &want)
        .expect("by commit");
    assert_eq!(snap.commit, C1);

    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "offline (HF_HUB_OFFLINE=1): acme/tiny@main is not in the Hugging Face cache at {}: no refs/main",
            c.root.display()
        )),
        "{msg}"
    );
    assert_eq!(
        offline_miss(err),
        CacheMiss::NoRef {
            revision: "main".into()
        }
    );

    // A tag under refs/ and a nested ref (refs/pr/1) resolve like branches.
    c.set_ref("v1.0", C1);
    c.set_ref("refs/pr/1", C1);
    for rev in ["v1.0", "refs/pr/1"] {
        let snap = offline(&c, &s).snapshot(REPO, rev, &want).expect(rev);
        assert_eq!(snap.commit, C1, "{rev}");
    }
    // An abbreviated or upper-case hash is a ref name (as for huggingface_hub): no such ref.
    let err = offline(&c, &s)
        .snapshot(REPO, "1111111", &want)
        .unwrap_err();
    assert!(matches!(offline_miss(err), CacheMiss::NoRef { .. }));
    assert!(s.requests().is_empty());
}

#[test]
fn offline_misses_name_what_is_missing() {
    let s = HubServer::start();

    // Nothing of the repo.
    let c = Cache::new();
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert!(
        err.to_string().contains(&format!("no {FOLDER} folder")),
        "{err}"
    );
    assert!(matches!(offline_miss(err), CacheMiss::NoRepo { .. }));

    // A ref to a commit never downloaded.
    let c = Cache::sharded(C1);
    c.set_ref("main", C2);
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert!(
        err.to_string().contains(&format!("no snapshots/{C2}")),
        "{err}"
    );
    assert_eq!(
        offline_miss(err),
        CacheMiss::NoSnapshot { commit: C2.into() }
    );

    // A ref that holds no commit.
    c.set_ref("main", "../../etc");
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert!(matches!(offline_miss(err), CacheMiss::BadRef { .. }));

    // A missing shard of the index.
    let c = Cache::sharded(C1);
    c.unlink(C1, SHARD2);
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("snapshot {C1} lacks {SHARD2}")),
        "{err}"
    );
    assert_eq!(
        offline_miss(err),
        CacheMiss::Incomplete {
            commit: C1.into(),
            missing: vec![SHARD2.into()]
        }
    );

    // A link whose blob was deleted is missing too.
    let c = Cache::sharded(C1);
    fs::remove_file(c.blob_of("config.json", b"{\"model_type\":\"llama\"}")).expect("rm blob");
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert_eq!(
        offline_miss(err),
        CacheMiss::Incomplete {
            commit: C1.into(),
            missing: vec!["config.json".into()]
        }
    );

    // An index that is not JSON.
    let c = Cache::new();
    c.put(C1, "config.json", b"{}");
    c.put(C1, INDEX, b"{not json");
    c.put(C1, SHARD1, b"w");
    c.set_ref("main", C1);
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert!(matches!(offline_miss(err), CacheMiss::BadIndex { .. }));
    assert!(s.requests().is_empty());
}

#[test]
fn without_a_listing_the_weights_and_config_decide() {
    let s = HubServer::start();

    // One unsharded file and a config: complete.
    let c = Cache::new();
    c.put(C1, "config.json", b"{}");
    c.put(C1, "model.safetensors", b"weights");
    c.set_ref("main", C1);
    let snap = offline(&c, &s)
        .snapshot(REPO, "main", &want)
        .expect("single file");
    assert_eq!(snap.files, ["config.json", "model.safetensors"]);

    // No weights at all.
    let c = Cache::new();
    c.put(C1, "config.json", b"{}");
    c.put(C1, "tokenizer.json", b"{}");
    c.set_ref("main", C1);
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert_eq!(
        offline_miss(err),
        CacheMiss::Incomplete {
            commit: C1.into(),
            missing: vec!["model.safetensors".into()]
        }
    );

    // Shards without their index: the index and the other shards are missing; so is config.
    let c = Cache::new();
    c.put(C1, "model-00002-of-00003.safetensors", b"w");
    c.set_ref("main", C1);
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert_eq!(
        offline_miss(err),
        CacheMiss::Incomplete {
            commit: C1.into(),
            missing: vec![
                INDEX.into(),
                "model-00001-of-00003.safetensors".into(),
                "model-00003-of-00003.safetensors".into(),
                "config.json".into(),
            ]
        }
    );
    assert!(s.requests().is_empty());
}

#[test]
fn a_listing_in_the_cache_decides_which_files_are_needed() {
    let s = HubServer::start();
    let c = Cache::sharded(C1);
    c.unlink(C1, "tokenizer.json");
    let sizes = [
        (".gitattributes", 10),
        ("README.md", 6),
        ("config.json", 22),
        (INDEX, index().len() as u64),
        (SHARD1, 100),
        (SHARD2, 200),
        ("tokenizer.json", 2),
        ("tokenizer_config.json", 2),
        ("original/consolidated.pth", 5),
    ];
    c.listing(C1, &sizes, 1);

    // Listed and wanted, but not in the snapshot: missing. Not wanted (README, sub-folder,
    // .gitattributes): not needed.
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert_eq!(
        offline_miss(err),
        CacheMiss::Incomplete {
            commit: C1.into(),
            missing: vec!["tokenizer.json".into(), "tokenizer_config.json".into()]
        }
    );

    c.put(C1, "tokenizer.json", b"{}");
    c.put(C1, "tokenizer_config.json", b"{}");
    let snap = offline(&c, &s)
        .snapshot(REPO, "main", &want)
        .expect("complete");
    assert_eq!(
        snap.files,
        [
            "config.json",
            SHARD1,
            SHARD2,
            INDEX,
            "tokenizer.json",
            "tokenizer_config.json"
        ],
        "the listing's wanted files, in its order"
    );

    // A file of another size than listed (a truncated shard) is not complete.
    let mut wrong = sizes.to_vec();
    wrong[5] = (SHARD2, 201);
    c.listing(C1, &wrong, 1);
    let err = offline(&c, &s).snapshot(REPO, "main", &want).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("{SHARD2} (200 bytes, the listing says 201)")),
        "{err}"
    );

    // A listing of an unknown format, or a corrupt one, is ignored (as huggingface_hub does):
    // the snapshot is judged without it.
    c.listing(C1, &[("never-downloaded.json", 1)], 2);
    offline(&c, &s)
        .snapshot(REPO, "main", &want)
        .expect("listing v2 ignored");
    fs::write(c.repo().join("trees").join(format!("{C1}.json")), "{oops").expect("write");
    offline(&c, &s)
        .snapshot(REPO, "main", &want)
        .expect("corrupt listing ignored");
    assert!(s.requests().is_empty());
}

#[test]
fn offline_refuses_bad_names_and_says_which_variable() {
    let s = HubServer::start();
    let c = Cache::sharded(C1);
    let err = offline(&c, &s).snapshot("../x", "main", &want).unwrap_err();
    assert!(matches!(err, HubError::InvalidRepo { .. }), "{err:?}");
    let err = offline(&c, &s)
        .snapshot(REPO, "../main", &want)
        .unwrap_err();
    assert!(matches!(err, HubError::InvalidRevision { .. }), "{err:?}");

    let client = client_env(&[
        ("TRANSFORMERS_OFFLINE", "yes"),
        ("HF_HUB_CACHE", c.root.to_str().expect("utf-8")),
    ]);
    let err = client.snapshot(REPO, "dev", &want).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("offline (TRANSFORMERS_OFFLINE=yes): acme/tiny@dev"),
        "{err}"
    );
}

#[test]
fn unreachable_hub_falls_back_to_a_complete_cache_at_once() {
    let c = Cache::sharded(C1);
    let before = c.tree();
    // Were the connection errors retried, this would take 1 + 2 + 4 s.
    let client = online(&c, &dead_endpoint()).with_retries(4, Duration::from_secs(1));
    let start = Instant::now();
    let snap = client.snapshot(REPO, "main", &want).expect("fallback");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert!(snap.cache_only);
    assert_eq!(snap.commit, C1);
    assert_eq!(snap.files.len(), 5);
    assert_eq!(c.tree(), before);
}

#[test]
fn unreachable_hub_and_incomplete_cache_names_both() {
    let c = Cache::sharded(C1);
    c.unlink(C1, SHARD1);
    let dead = dead_endpoint();
    let err = online(&c, &dead).snapshot(REPO, "main", &want).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("could not be reached"), "{msg}");
    assert!(msg.contains(&dead), "{msg}");
    assert!(
        msg.contains(&format!(
            "acme/tiny@main is not in the Hugging Face cache at {}: snapshot {C1} lacks {SHARD1}",
            c.root.display()
        )),
        "{msg}"
    );
    match err {
        HubError::UnreachableNotCached {
            source, missing, ..
        } => {
            // Nothing to fall back on: the network errors were retried as usual.
            assert!(
                matches!(*source, HubError::Network { attempts: 3, .. }),
                "{source:?}"
            );
            assert!(matches!(*missing, CacheMiss::Incomplete { .. }));
        }
        other => panic!("{other:?}"),
    }

    // Nothing cached at all.
    let empty = Cache::new();
    let err = online(&empty, &dead)
        .snapshot(REPO, "main", &want)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::UnreachableNotCached { missing, .. }
            if matches!(**missing, CacheMiss::NoRepo { .. })),
        "{err:?}"
    );
}

#[test]
fn a_hub_answering_5xx_falls_back_after_the_retries() {
    let s = HubServer::start();
    s.fail("/api/models/", 10, 503, &[]);
    let c = Cache::sharded(C1);
    let snap = online(&c, &s.url)
        .snapshot(REPO, "main", &want)
        .expect("fallback after retries");
    assert!(snap.cache_only);
    assert_eq!(snap.commit, C1);
    assert_eq!(
        s.requests().len(),
        3,
        "with_retries(3, ..): three tries first"
    );
}

#[test]
fn answers_about_the_repo_are_not_hidden_by_the_cache() {
    // The server knows no `acme/tiny`: a 404 is an answer, not an outage.
    let s = HubServer::start();
    let c = Cache::sharded(C1);
    let err = online(&c, &s.url)
        .snapshot(REPO, "main", &want)
        .unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");

    // The Hub's code for a missing repo (401 without a token) is understood as well.
    let s = HubServer::start();
    s.fail("/api/models/", 1, 401, &[("X-Error-Code", "RepoNotFound")]);
    let err = online(&c, &s.url)
        .snapshot(REPO, "main", &want)
        .unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");
}

#[test]
fn a_reachable_hub_is_asked_even_with_a_complete_cache() {
    let s = HubServer::start();
    s.add_commit(
        REPO,
        C1,
        &[
            ("config.json", b"{\"model_type\":\"llama\"}"),
            ("model.safetensors", b"w"),
        ],
    );
    s.set_ref(REPO, "main", C1);
    let c = Cache::sharded(C1);
    let snap = online(&c, &s.url)
        .snapshot(REPO, "main", &want)
        .expect("online");
    assert!(!snap.cache_only);
    assert_eq!(snap.files, ["config.json", "model.safetensors"]);
    assert!(s.count(|r| r.path.starts_with("/api/models/")) == 1);
}
