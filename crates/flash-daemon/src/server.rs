//! The daemon process: how it is configured, the state every request
//! shares, and its start and stop — the tiers built, the listeners opened
//! (gRPC on the Unix socket and optionally TCP, HTTP), signals, and the
//! release of every lease and all memory at the end. [`run`] is the entry
//! point. The files it keeps in its home are `home`'s, the gRPC calls
//! `service`'s, leases and fills `lease`'s.
//!
//! # Threads
//! gRPC and HTTP run on a small tokio runtime. Every call into the tier
//! manager or the store (which block: loads take seconds) runs on
//! `spawn_blocking`, never on the reactor. A session is one task waiting for
//! its client's stream to end.

use crate::fresh::Freshness;
use crate::home;
use crate::metrics::{self, Histograms};
use crate::service::Service;
use crate::text::{TextCache, TextParts};
use crate::tiers::{build_tiers_with, HostMemory, SetupError, TierConfig, Tiers};
use flash_client::proto::flash_server::FlashServer;
use flash_client::{AUTH_HEADER, SOCKET_FILE};
use flash_load::LoadOptions;
use flash_store::{ModelName, Store, StoreError};
use flash_sys::cuda::{self, Cuda};
use flash_tier::{ModelId, Tier};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::{Request, Status};
use tracing::{info, warn};

pub use crate::home::{shm_dir, LOCK_FILE, LOG_FILE, PID_FILE};

/// How the daemon is started (`flash start`).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `$FLASH_HOME`: the store, the socket and the daemon's files.
    pub home: PathBuf,
    /// Bytes of the memory tier (the host pool).
    pub memory_budget: u64,
    pub gpu_mem_util: f64,
    /// Bytes of each GPU tier, instead of `gpu_mem_util`.
    pub gpu_budget: Option<u64>,
    pub load: LoadOptions,
    /// TCP listener for gRPC (requires the token).
    pub tcp: Option<SocketAddr>,
    /// HTTP listener (`/metrics`, `/health`, and the routes given to `run`).
    pub http: Option<SocketAddr>,
    /// Ignore the GPUs (a CPU-only daemon on a GPU machine).
    pub no_gpu: bool,
    /// The half-life of a request's weight in a model's popularity, which
    /// orders evictions ([`flash_tier::popularity`]).
    pub popularity_half_life: std::time::Duration,
    /// Loads reading the store's disk at once (0: no limit;
    /// [`flash_tier::TierBuilder::disk_loads`]).
    pub disk_loads: usize,
}

/// Why the daemon could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("a flash daemon is already running on {home} (pid {pid}, socket {socket})")]
    AlreadyRunning {
        home: PathBuf,
        pid: String,
        socket: PathBuf,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Serve(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the HTTP routes added by other crates (the inference API) can reach.
#[derive(Clone)]
pub struct DaemonHandle {
    inner: Arc<Daemon>,
}

impl DaemonHandle {
    /// The tier manager (blocking: call it from `spawn_blocking`).
    pub fn tiers(&self) -> &Tiers {
        &self.inner.tiers
    }

    /// The store's root.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// The CUDA driver, when the daemon has GPU tiers.
    pub fn cuda(&self) -> Option<&Cuda> {
        self.inner.cuda.as_ref()
    }

    /// Drops the copies of `model` if the store changed it since they were
    /// made (see the `fresh` module) and returns its epoch: an engine built at
    /// another epoch holds stale weights.
    pub fn fresh(&self, model: &ModelId) -> Result<u64, String> {
        self.inner
            .fresh
            .check(&self.inner.tiers, model)
            .map_err(|e| e.to_string())
    }

    /// The config and tokenizer of `model` at `epoch` (see the `text` module):
    /// cached, waited for when a parse is in flight, else parsed now.
    pub fn text_parts(&self, model: &ModelId, epoch: u64) -> Result<Arc<TextParts>, String> {
        let dir = self.inner.model_dir(model)?;
        self.inner.text.get(model, epoch, &dir)
    }

    /// Starts parsing `model`'s config and tokenizer in the background
    /// unless they are cached or being parsed.
    pub fn prefetch_text(&self, model: &ModelId, epoch: u64) {
        self.inner.prefetch_text(model, epoch);
    }
}

/// The daemon's state shared by every request.
pub(crate) struct Daemon {
    pub tiers: Tiers,
    pub store: Store,
    pub home: PathBuf,
    pub cuda: Option<Cuda>,
    pub started: Instant,
    pub socket: PathBuf,
    pub tcp: String,
    pub http: String,
    /// The leases each open session holds (see `lease`).
    pub(crate) sessions: Mutex<HashMap<u64, HashSet<u64>>>,
    pub(crate) next_session: AtomicU64,
    /// Flipped once to stop the listeners and end the sessions.
    pub(crate) shutdown: watch::Sender<bool>,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub filled_bytes: AtomicU64,
    /// Request latency (acquire, fill) by tier and where the bytes came from.
    pub switch: Mutex<Histograms>,
    pub memory_shareable: bool,
    pub memory_pinned: bool,
    /// Which version of each model the tiers' copies and the engines hold.
    pub(crate) fresh: Freshness,
    /// Each served model's config and tokenizer, parsed ahead of requests.
    pub(crate) text: TextCache,
}

impl Daemon {
    /// The store folder of the plain (unranked) model `model`.
    pub(crate) fn model_dir(&self, model: &ModelId) -> Result<PathBuf, String> {
        let name: ModelName = model
            .as_str()
            .parse()
            .map_err(|e: flash_store::name::NameError| e.to_string())?;
        self.store.existing(&name).map_err(|e| e.to_string())
    }

    /// [`DaemonHandle::prefetch_text`]; a model not in the store is skipped
    /// (its request reports that).
    pub(crate) fn prefetch_text(&self, model: &ModelId, epoch: u64) {
        if let Ok(dir) = self.model_dir(model) {
            self.text.prefetch(model, epoch, dir);
        }
    }

    /// Records a request's latency (acquire, fill) by tier and source.
    pub(crate) fn observe(&self, tier: Tier, from: Tier, seconds: f64) {
        self.switch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(tier, from, seconds);
    }

    /// Counts a request, and an error when it failed.
    pub(crate) fn count<T>(&self, r: &Result<T, Status>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the daemon until `Shutdown`, SIGTERM or SIGINT. `routes` adds HTTP
/// routes (the inference API) to the listener of `/metrics` and `/health`.
/// Blocks the calling thread; returns once everything is released.
pub fn run(
    cfg: DaemonConfig,
    routes: impl FnOnce(&DaemonHandle) -> axum::Router,
) -> Result<(), DaemonError> {
    let claimed = home::claim(&cfg.home)?;
    let result = serve(&cfg, claimed.shm(), routes);
    claimed.release();
    result
}

/// The daemon's life in its home: tiers, listeners and state made, served
/// until asked to stop, then everything released.
fn serve(
    cfg: &DaemonConfig,
    shm: &Path,
    routes: impl FnOnce(&DaemonHandle) -> axum::Router,
) -> Result<(), DaemonError> {
    let home = &cfg.home;
    let store = Store::open(home)?;
    let cuda = probe_gpus(cfg.no_gpu);
    let (tiers, host) = ready_tiers(cfg, shm, cuda.as_ref())?;
    let tcp_listener = cfg.tcp.map(bind).transpose()?;
    let http_listener = cfg.http.map(bind).transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flash-daemon")
        .enable_all()
        .build()
        .map_err(io_err(home))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let socket = home.join(SOCKET_FILE);
    let (memory_shareable, memory_pinned) = (host.is_shareable(), host.is_pinned());
    drop(host);
    let daemon = Arc::new(Daemon {
        tiers,
        store,
        home: home.clone(),
        cuda,
        started: Instant::now(),
        socket: socket.clone(),
        tcp: local_addr(&tcp_listener),
        http: local_addr(&http_listener),
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        shutdown: stop_tx,
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        filled_bytes: AtomicU64::new(0),
        switch: Mutex::new(Histograms::default()),
        memory_shareable,
        memory_pinned,
        fresh: Freshness::default(),
        text: TextCache::default(),
    });
    let handle = DaemonHandle {
        inner: daemon.clone(),
    };
    crate::serve::warm_up(&handle);
    let extra = routes(&handle);
    let tcp = match tcp_listener {
        Some(listener) => Some((listener, home::write_token(home)?)),
        None => None,
    };
    let listeners = Listeners {
        socket,
        tcp,
        http: http_listener,
        routes: extra,
    };
    let result = rt.block_on(listen(&daemon, listeners, &stop_rx));
    release_all(rt, daemon, handle);
    result
}

/// The CUDA driver, unless the daemon ignores the GPUs or none is found (a
/// daemon without GPU tiers, not an error).
fn probe_gpus(no_gpu: bool) -> Option<Cuda> {
    if no_gpu {
        return None;
    }
    match cuda::probe() {
        Ok(c) => Some(c),
        Err(why) => {
            info!("no GPU tier: {why}");
            None
        }
    }
}

/// Builds the tiers: the memory tier's host pool (its file where
/// `home::pool_file` puts it) and one tier per GPU.
fn ready_tiers(
    cfg: &DaemonConfig,
    shm: &Path,
    cuda: Option<&Cuda>,
) -> Result<(Tiers, HostMemory), DaemonError> {
    let home = &cfg.home;
    let t = Instant::now();
    let tier_cfg = TierConfig {
        memory_budget: cfg.memory_budget,
        gpu_mem_util: cfg.gpu_mem_util,
        gpu_budget: cfg.gpu_budget,
        load: cfg.load.clone(),
        pool_file: home::pool_file(home, shm, cfg.memory_budget, cuda.is_some()),
        popularity_half_life: cfg.popularity_half_life,
        disk_loads: cfg.disk_loads,
    };
    let (tiers, host) = build_tiers_with(Store::open(home)?, &tier_cfg, cuda)?;
    if let Some(p) = host.pool().and_then(|p| p.path()) {
        info!(path = %p.display(), pinned = host.is_pinned(), "host pool");
    }
    info!(seconds = t.elapsed().as_secs_f64(), tiers = ?tiers.tiers(), "tiers ready");
    Ok((tiers, host))
}

/// A TCP listener on `addr`, bound before the runtime starts so that a
/// taken port fails the start.
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, DaemonError> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|source| DaemonError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The address a listener got (port 0 picks one), as the status reports it;
/// empty without a listener.
fn local_addr(l: &Option<std::net::TcpListener>) -> String {
    l.as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// The listeners `serve` opened, handed to the runtime.
struct Listeners {
    socket: PathBuf,
    /// The TCP listener and the token its clients must send.
    tcp: Option<(std::net::TcpListener, String)>,
    http: Option<std::net::TcpListener>,
    /// Routes added by other crates, served beside `/metrics`.
    routes: axum::Router,
}

/// One task per listener, each ending with its server.
type Servers = JoinSet<Result<(), DaemonError>>;

/// Serves every listener until the stop channel flips (or one fails, which
/// stops the others); the first error.
async fn listen(
    daemon: &Arc<Daemon>,
    l: Listeners,
    stop_rx: &watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let uds = bind_socket(&l.socket)?;
    let svc = Service::new(daemon.clone());
    let mut tasks = Servers::new();
    serve_unix(&mut tasks, uds, svc.clone(), stop_rx);
    if let Some((listener, token)) = l.tcp {
        serve_tcp(
            &mut tasks,
            listener,
            &token,
            svc.clone(),
            stop_rx,
            &daemon.tcp,
        )?;
    }
    if let Some(listener) = l.http {
        serve_http(&mut tasks, listener, daemon, l.routes, stop_rx)?;
    }
    info!(socket = %l.socket.display(), pid = std::process::id(), "flash daemon ready");
    stop_on_signals(daemon.clone());
    join_servers(tasks, daemon).await
}

/// Binds the Unix socket, readable and writable by this user only.
fn bind_socket(socket: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let uds = tokio::net::UnixListener::bind(socket).map_err(|source| DaemonError::Listen {
        addr: socket.display().to_string(),
        source,
    })?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600)).map_err(io_err(socket))?;
    Ok(uds)
}

/// gRPC on the Unix socket.
fn serve_unix(
    tasks: &mut Servers,
    uds: tokio::net::UnixListener,
    svc: Service,
    stop_rx: &watch::Receiver<bool>,
) {
    let stop = wait_stop(stop_rx.clone());
    let uds_server = tonic::transport::Server::builder()
        .add_service(FlashServer::new(svc).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(uds), stop);
    tasks.spawn(async move {
        uds_server
            .await
            .map_err(|e| DaemonError::Serve(e.to_string()))
    });
}

/// gRPC on TCP, every call checked for the token.
fn serve_tcp(
    tasks: &mut Servers,
    listener: std::net::TcpListener,
    token: &str,
    svc: Service,
    stop_rx: &watch::Receiver<bool>,
    addr: &str,
) -> Result<(), DaemonError> {
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let want: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| DaemonError::Serve("bad token".into()))?;
    let check = move |req: Request<()>| match req.metadata().get(AUTH_HEADER) {
        Some(v) if *v == want => Ok(req),
        _ => Err(Status::unauthenticated(
            "a token is required on TCP: pass the contents of $FLASH_HOME/daemon.token",
        )),
    };
    let stop = wait_stop(stop_rx.clone());
    // Over a network a client's machine can vanish without closing
    // the connection: HTTP/2 pings end its session (and leases).
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(FlashServer::with_interceptor(svc, check))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        );
    tasks.spawn(async move { server.await.map_err(|e| DaemonError::Serve(e.to_string())) });
    info!(%addr, "gRPC on TCP (token required)");
    Ok(())
}

/// HTTP: `/metrics`, `/health` and the routes of other crates.
fn serve_http(
    tasks: &mut Servers,
    listener: std::net::TcpListener,
    daemon: &Arc<Daemon>,
    routes: axum::Router,
    stop_rx: &watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let addr = &daemon.http;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
            addr: addr.clone(),
            source,
        })?;
    let app = metrics::router(daemon.clone()).merge(routes);
    let stop = wait_stop(stop_rx.clone());
    tasks.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| DaemonError::Serve(e.to_string()))
    });
    info!(%addr, "HTTP (/metrics, /health)");
    Ok(())
}

/// SIGTERM and SIGINT stop the daemon gracefully, as `Shutdown` does.
fn stop_on_signals(d: Arc<Daemon>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        let _ = d.shutdown.send(true);
    });
}

/// Waits for every server to end; the first failure stops the others and is
/// returned.
async fn join_servers(mut tasks: Servers, daemon: &Daemon) -> Result<(), DaemonError> {
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = daemon.shutdown.send(true);
                first_err.get_or_insert(e);
            }
            Err(e) => {
                let _ = daemon.shutdown.send(true);
                first_err.get_or_insert(DaemonError::Serve(e.to_string()));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// After the servers stopped: loads in flight ended with their requests and
/// sessions are gone. Releases every lease left (none, normally) and the
/// memory with the tiers.
fn release_all(rt: tokio::runtime::Runtime, daemon: Arc<Daemon>, handle: DaemonHandle) {
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    let leftover = daemon.sessions.lock().map(|s| s.len()).unwrap_or(0);
    if leftover > 0 {
        warn!(sessions = leftover, "sessions still open at stop");
    }
    drop(handle);
    match Arc::try_unwrap(daemon) {
        Ok(d) => drop(d),
        Err(_) => warn!("the daemon's state is still referenced at stop"),
    }
    info!("flash daemon stopped");
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
