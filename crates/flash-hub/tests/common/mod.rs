//! A local server that speaks the Hub's HTTP API from a folder of fixture files, for tests.
//!
//! Fixtures live in `<root>/<repo>/<commit>/<files>`; refs (branches, tags) map to commits.
//! Files named `*.safetensors` / `*.bin` are served like LFS files: the `resolve` route answers
//! 302 to a `/cdn/<sha>` URL with `X-Linked-Etag` / `X-Linked-Size`; other files are answered
//! directly with `ETag` / `Content-Length`. Every request is recorded; faults (error statuses,
//! truncated bodies, gated repos, a required token, bogus file names) can be injected.
//!
//! std only: a few hundred lines beat a server crate here, because tests need to send bodies
//! shorter than their Content-Length and to close connections at will.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The raw (still percent-encoded) path.
    pub path: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How to cut a file's body short.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Truncate {
    /// Announce the full Content-Length, send half, close the connection.
    ShortBody,
    /// Announce and send half (a consistent but short response).
    ShortLength,
}

struct Fault {
    path_contains: String,
    times: u32,
    status: u16,
    headers: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    /// repo -> ref name -> commit.
    refs: HashMap<String, HashMap<String, String>>,
    /// Extra names listed in `siblings` (files that do not exist).
    extra_siblings: HashMap<String, Vec<String>>,
    requests: Vec<Request>,
    faults: Vec<Fault>,
    required_token: Option<String>,
    gated: HashSet<String>,
    /// File name -> how to truncate it.
    truncate: HashMap<String, Truncate>,
    /// File name -> HEAD requests for it to await before sending its body (see `hold_body`).
    hold: HashMap<String, usize>,
    /// Base URL of the CDN route (this server, or the second listener of `start_cdn`).
    cdn_base: String,
}

pub struct HubServer {
    pub url: String,
    pub root: PathBuf,
    _fixtures: tempfile::TempDir,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    listeners: Vec<String>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl HubServer {
    pub fn start() -> HubServer {
        let fixtures = tempfile::tempdir().expect("fixture dir");
        let root = fixtures.path().to_path_buf();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let addr = listen(&root, &state, &stop);
        let url = format!("http://{addr}");
        lock(&state).cdn_base = url.clone();
        HubServer {
            url,
            root,
            _fixtures: fixtures,
            state,
            stop,
            listeners: vec![addr],
        }
    }

    /// Serves the CDN route from a second port (another origin) and returns its base URL.
    pub fn start_cdn(&mut self) -> String {
        let addr = listen(&self.root, &self.state, &self.stop);
        let url = format!("http://{addr}");
        lock(&self.state).cdn_base = url.clone();
        self.listeners.push(addr);
        url
    }

    /// Writes the files of `commit` of `repo` into the fixture folder.
    pub fn add_commit(&self, repo: &str, commit: &str, files: &[(&str, &[u8])]) {
        let dir = self.root.join(repo).join(commit);
        for (path, bytes) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, bytes).expect("write fixture");
        }
        std::fs::create_dir_all(&dir).expect("mkdir");
    }

    pub fn set_ref(&self, repo: &str, name: &str, commit: &str) {
        lock(&self.state)
            .refs
            .entry(repo.to_string())
            .or_default()
            .insert(name.to_string(), commit.to_string());
    }

    pub fn add_sibling(&self, repo: &str, name: &str) {
        lock(&self.state)
            .extra_siblings
            .entry(repo.to_string())
            .or_default()
            .push(name.to_string());
    }

    /// The next `times` requests whose path contains `path_contains` get `status`.
    pub fn fail(&self, path_contains: &str, times: u32, status: u16, headers: &[(&str, &str)]) {
        lock(&self.state).faults.push(Fault {
            path_contains: path_contains.to_string(),
            times,
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
    }

    pub fn require_token(&self, token: &str) {
        lock(&self.state).required_token = Some(token.to_string());
    }

    pub fn gate(&self, repo: &str) {
        lock(&self.state).gated.insert(repo.to_string());
    }

    pub fn truncate(&self, file_name: &str, how: Option<Truncate>) {
        let mut s = lock(&self.state);
        match how {
            Some(t) => s.truncate.insert(file_name.to_string(), t),
            None => s.truncate.remove(file_name),
        };
    }

    /// A GET of `file_name` sends its headers at once but its body only after `heads` HEAD
    /// requests for that file were received (then 200 ms more), or after 10 s: lets a test
    /// make a second client arrive while the first is mid-download.
    pub fn hold_body(&self, file_name: &str, heads: usize) {
        lock(&self.state).hold.insert(file_name.to_string(), heads);
    }

    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    pub fn count(&self, pred: impl Fn(&Request) -> bool) -> usize {
        lock(&self.state)
            .requests
            .iter()
            .filter(|r| pred(r))
            .count()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for addr in &self.listeners {
            // Wake the accept loop.
            let _ = TcpStream::connect(addr);
        }
    }
}

/// Whether a file is served like an LFS file.
pub fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin")
}

/// The blob name the client must use for these bytes: a 64-hex "sha256" for LFS files, a 40-hex
/// "git sha1" for others (deterministic stand-ins; the client does not hash).
pub fn etag_for(path: &str, bytes: &[u8]) -> String {
    let words = if is_lfs(path) { 4 } else { 3 };
    let mut s: String = (0..words)
        .map(|seed| format!("{:016x}", fnv(seed, bytes)))
        .collect();
    s.truncate(if is_lfs(path) { 64 } else { 40 });
    s
}

fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn listen(root: &Path, state: &Arc<Mutex<State>>, stop: &Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (root, state, stop) = (root.to_path_buf(), state.clone(), stop.clone());
    thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let (root, state) = (root.clone(), state.clone());
            thread::spawn(move || {
                let _ = serve(conn, &root, &state);
            });
        }
    });
    addr
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Content-Length to announce when it differs from the body (truncation).
    announce: Option<usize>,
    /// Send the body only once this many HEAD requests for this file name arrived.
    hold: Option<(String, usize)>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            announce: None,
            hold: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn body(mut self, b: Vec<u8>) -> Reply {
        self.body = b;
        self
    }
}

fn serve(conn: TcpStream, root: &Path, state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Request {
        method: method.clone(),
        path,
        headers,
    };
    let mut reply = route(&req, root, state);
    let mut conn = conn;
    let len = reply.announce.unwrap_or(reply.body.len());
    let mut head = format!(
        "HTTP/1.1 {} X\r\nConnection: close\r\nContent-Length: {len}\r\n",
        reply.status
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if let Some((name, heads)) = reply.hold.take().filter(|_| method == "GET") {
        conn.flush()?;
        let suffix = format!("/{name}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && lock(state)
                .requests
                .iter()
                .filter(|r| r.method == "HEAD" && r.path.ends_with(&suffix))
                .count()
                < heads
        {
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(200));
    }
    if method != "HEAD" {
        conn.write_all(&reply.body)?;
    }
    conn.flush()?;
    // Half-close, then wait for the client to close: closing with unread input would reset
    // the connection and could lose the tail of the response.
    let _ = conn.shutdown(Shutdown::Write);
    let _ = reader.read_to_end(&mut Vec::new());
    Ok(())
}

fn route(req: &Request, root: &Path, state: &Mutex<State>) -> Reply {
    let mut s = lock(state);
    s.requests.push(req.clone());
    let path = req.path.split('?').next().unwrap_or("").to_string();

    if let Some(i) = s
        .faults
        .iter()
        .position(|f| f.times > 0 && path.contains(&f.path_contains))
    {
        let f = &mut s.faults[i];
        f.times -= 1;
        let mut r = Reply::new(f.status).body(b"injected fault".to_vec());
        for (k, v) in &f.headers {
            r = r.header(k, v.clone());
        }
        return r;
    }

    if let Some(sha) = path.strip_prefix("/cdn/") {
        // Presigned: no token needed. Find the file with this etag.
        return match find_blob(root, sha) {
            Some((name, bytes)) => file_reply(req, &s, &name, bytes, None),
            None => Reply::new(404),
        };
    }

    if let Some(want) = &s.required_token {
        if req.header("authorization") != Some(&format!("Bearer {want}")) {
            return Reply::new(401).body(b"Invalid credentials".to_vec());
        }
    }

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, rev)) = rest.split_once("/revision/") else {
            return Reply::new(400);
        };
        let rev = percent_decode(rev);
        let Some(commit) = resolve(root, &s, repo, &rev) else {
            return Reply::new(404).body(b"Repository not found".to_vec());
        };
        let mut files = Vec::new();
        list_files(&root.join(repo).join(&commit), "", &mut files);
        files.sort();
        files.extend(s.extra_siblings.get(repo).cloned().unwrap_or_default());
        let siblings: Vec<_> = files
            .iter()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": repo, "sha": commit, "siblings": siblings });
        return Reply::new(200)
            .header("Content-Type", "application/json")
            .body(body.to_string().into_bytes());
    }

    if let Some((repo, rest)) = path[1..].split_once("/resolve/") {
        let repo = repo.to_string();
        if s.gated.contains(&repo) {
            return Reply::new(403)
                .header("X-Error-Code", "GatedRepo")
                .header("X-Error-Message", "Access to this repo is restricted");
        }
        let Some((rev, file)) = rest.split_once('/') else {
            return Reply::new(400);
        };
        let (rev, file) = (percent_decode(rev), percent_decode(file));
        let Some(commit) = resolve(root, &s, &repo, &rev) else {
            return Reply::new(404).header("X-Error-Code", "RevisionNotFound");
        };
        let Ok(bytes) = std::fs::read(root.join(&repo).join(&commit).join(&file)) else {
            return Reply::new(404).header("X-Error-Code", "EntryNotFound");
        };
        let etag = etag_for(&file, &bytes);
        if is_lfs(&file) {
            return Reply::new(302)
                .header("Location", format!("{}/cdn/{etag}", s.cdn_base))
                .header("X-Repo-Commit", commit.clone())
                .header("ETag", "\"ffff-not-the-blob\"")
                .header("X-Linked-Etag", format!("\"{etag}\""))
                .header("X-Linked-Size", bytes.len().to_string());
        }
        let name = file.rsplit('/').next().unwrap_or(&file).to_string();
        return file_reply(req, &s, &name, bytes, Some(&commit))
            .header("ETag", format!("\"{etag}\""));
    }
    Reply::new(404)
}

fn file_reply(req: &Request, s: &State, name: &str, bytes: Vec<u8>, commit: Option<&str>) -> Reply {
    let full = bytes.len();
    let mut r = Reply::new(200);
    if let Some(c) = commit {
        r = r.header("X-Repo-Commit", c);
    }
    let mut body = bytes;
    if req.method == "GET" {
        if let Some(from) = req
            .header("range")
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse::<usize>().ok())
        {
            if from >= full {
                return Reply::new(416);
            }
            r.status = 206;
            r = r.header("Content-Range", format!("bytes {from}-{}/{full}", full - 1));
            body = body[from..].to_vec();
        }
        r.hold = s.hold.get(name).map(|&n| (name.to_string(), n));
        match s.truncate.get(name) {
            Some(Truncate::ShortBody) => {
                r.announce = Some(body.len());
                body.truncate(body.len() / 2);
            }
            Some(Truncate::ShortLength) => body.truncate(body.len() / 2),
            None => {}
        }
    }
    r.body(body)
}

fn resolve(root: &Path, s: &State, repo: &str, rev: &str) -> Option<String> {
    if !root.join(repo).is_dir() {
        return None;
    }
    if let Some(c) = s.refs.get(repo).and_then(|m| m.get(rev)) {
        return Some(c.clone());
    }
    let is_commit = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    (is_commit && root.join(repo).join(rev).is_dir()).then(|| rev.to_string())
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if e.path().is_dir() {
            list_files(&e.path(), &rel, out);
        } else {
            out.push(rel);
        }
    }
}

fn find_blob(root: &Path, sha: &str) -> Option<(String, Vec<u8>)> {
    fn walk(dir: &Path, sha: &str) -> Option<(String, Vec<u8>)> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(found) = walk(&p, sha) {
                    return Some(found);
                }
            } else if let Ok(bytes) = std::fs::read(&p) {
                let name = e.file_name().to_string_lossy().into_owned();
                if etag_for(&name, &bytes) == sha {
                    return Some((name, bytes));
                }
            }
        }
        None
    }
    walk(root, sha)
}
