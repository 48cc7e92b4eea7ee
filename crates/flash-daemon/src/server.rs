//! The daemon process: its files in `$FLASH_HOME`, the gRPC service
//! (`flash.v1.Flash`, generated in `flash-client`) over the Unix socket and
//! optionally TCP, the HTTP listener, and a graceful stop.
//!
//! # Files
//! - `daemon.lock`: held with an exclusive `flock` for the daemon's life. A
//!   second daemon on the same store fails to take it and says which pid and
//!   socket the first one has. The kernel drops the lock when the process
//!   dies, so a `kill -9` leaves nothing that blocks the next start.
//! - `daemon.pid`, `flash.sock` (mode 0600), `daemon.token` (0600, only with
//!   TCP): written after the lock is taken, removed at a clean stop, replaced
//!   at the next start after a crash.
//! - the host pool: `<shm>/flashtensors-<hash of the home path>/pool-<pid>`
//!   (`/dev/shm` when it exists). Files left there by a dead daemon are
//!   removed at start (the lock proves no daemon of this home runs).
//!
//! # Threads
//! gRPC and HTTP run on a small tokio runtime. Every call into the tier
//! manager or the store (which block: loads take seconds) runs on
//! `spawn_blocking`, never on the reactor. A session is one task waiting for
//! its client's stream to end.

use crate::fresh::Freshness;
use crate::metrics::{self, Histograms};
use crate::tiers::{build_tiers_with, SetupError, TierConfig, Tiers};
use flash_client::proto::flash_server::{Flash, FlashServer};
use flash_client::proto::{self, acquire_reply, region};
use flash_client::{AUTH_HEADER, SESSION_HEADER, SOCKET_FILE, TOKEN_FILE};
use flash_load::LoadOptions;
use flash_store::{DtypeChoice, ImportOptions, ModelName, Store, StoreError};
use flash_sys::cuda::{self, Cuda, DeviceMemory};
use flash_tier::{ClientId, LeaseId, ModelId, Tier, TierError};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

/// The lock file in `$FLASH_HOME`.
pub const LOCK_FILE: &str = "daemon.lock";
/// The pid file in `$FLASH_HOME`.
pub const PID_FILE: &str = "daemon.pid";
/// The log file `flash start` sends a detached daemon's output to.
pub const LOG_FILE: &str = "daemon.log";

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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
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
    /// made (see [`crate::fresh`]) and returns its epoch: an engine built at
    /// another epoch holds stale weights.
    pub fn fresh(&self, model: &ModelId) -> Result<u64, String> {
        self.inner
            .fresh
            .check(&self.inner.tiers, model)
            .map_err(|e| e.to_string())
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
    sessions: Mutex<HashMap<u64, HashSet<u64>>>,
    next_session: AtomicU64,
    shutdown: watch::Sender<bool>,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub filled_bytes: AtomicU64,
    /// Request latency (acquire, fill) by tier and where the bytes came from.
    pub switch: Mutex<Histograms>,
    pub memory_shareable: bool,
    pub memory_pinned: bool,
    /// Which version of each model the tiers' copies and the engines hold.
    pub(crate) fresh: Freshness,
}

/// A hash of the home path, to name its shared-memory folder (FNV-1a).
fn home_tag(home: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in home.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The folder of this home's shared-memory files.
pub fn shm_dir(home: &Path) -> PathBuf {
    let home = home.canonicalize().unwrap_or_else(|_| home.to_path_buf());
    std::env::var_os("FLASH_SHM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(flash_sys::shm::default_shm_dir)
        .join(format!("flashtensors-{}", home_tag(&home)))
}

fn write_private(path: &Path, text: &str) -> Result<(), DaemonError> {
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

fn random_token() -> Result<String, DaemonError> {
    let p = Path::new("/dev/urandom");
    let mut b = [0u8; 24];
    File::open(p)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io_err(p))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Takes the lock of `home`, or says who holds it.
fn take_lock(home: &Path) -> Result<File, DaemonError> {
    let path = home.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    if flash_sys::shm::try_lock_exclusive(&f).map_err(io_err(&path))? {
        return Ok(f);
    }
    let pid = fs::read_to_string(home.join(PID_FILE))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Err(DaemonError::AlreadyRunning {
        home: home.to_path_buf(),
        pid,
        socket: home.join(SOCKET_FILE),
    })
}

/// Where the host pool's file goes: the shared-memory folder when it has
/// room for the whole pool; else, with a GPU, no file (anonymous pinned
/// memory: GPU clients share GPU copies, only the memory tier's share mode is
/// lost), and without one `$FLASH_HOME/run` (a file on disk, mapped shared:
/// slower to fill, but share mode still works). A pool that cannot be pinned
/// in the shared folder also falls back to anonymous memory
/// (`tiers::host_memory`).
fn pool_dir(home: &Path, shm: &Path, bytes: u64, gpu: bool) -> Option<PathBuf> {
    match flash_sys::shm::available_bytes(shm) {
        Ok(free) if free >= bytes => Some(shm.to_path_buf()),
        r if gpu => {
            warn!(
                shm = %shm.display(),
                free = ?r.ok(),
                bytes,
                "the shared-memory folder is too small for the pool: anonymous pinned memory, \
                 the memory tier cannot be shared with clients"
            );
            None
        }
        r => {
            let run = home.join("run");
            warn!(
                shm = %shm.display(),
                free = ?r.ok(),
                bytes,
                "the shared-memory folder is too small for the pool: using {}",
                run.display()
            );
            let _ = fs::create_dir_all(&run);
            let _ = fs::set_permissions(&run, fs::Permissions::from_mode(0o700));
            Some(run)
        }
    }
}

/// Removes what a dead daemon of `home` left (we hold the lock).
fn clean_stale(home: &Path, shm: &Path) {
    for f in [SOCKET_FILE, PID_FILE, TOKEN_FILE] {
        let p = home.join(f);
        if p.exists() {
            info!(path = %p.display(), "removing a file of a daemon that did not stop cleanly");
            let _ = fs::remove_file(&p);
        }
    }
    for e in [shm.to_path_buf(), home.join("run")]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
    {
        info!(path = %e.path().display(), "removing shared memory of a dead daemon");
        let _ = fs::remove_file(e.path());
    }
}

/// Runs the daemon until `Shutdown`, SIGTERM or SIGINT. `routes` adds HTTP
/// routes (the inference API) to the listener of `/metrics` and `/health`.
/// Blocks the calling thread; returns once everything is released.
pub fn run(
    cfg: DaemonConfig,
    routes: impl FnOnce(&DaemonHandle) -> axum::Router,
) -> Result<(), DaemonError> {
    let home = &cfg.home;
    fs::create_dir_all(home).map_err(io_err(home))?;
    let lock = take_lock(home)?;
    let shm = shm_dir(home);
    clean_stale(home, &shm);
    fs::create_dir_all(&shm).map_err(io_err(&shm))?;
    let _ = fs::set_permissions(&shm, fs::Permissions::from_mode(0o700));
    let pid_path = home.join(PID_FILE);
    write_private(&pid_path, &format!("{}\n", std::process::id()))?;

    let result = serve(&cfg, &shm, routes);

    let _ = fs::remove_file(home.join(SOCKET_FILE));
    let _ = fs::remove_file(home.join(TOKEN_FILE));
    let _ = fs::remove_file(&pid_path);
    let _ = fs::remove_dir(&shm);
    let _ = fs::remove_dir(home.join("run"));
    drop(lock);
    result
}

fn serve(
    cfg: &DaemonConfig,
    shm: &Path,
    routes: impl FnOnce(&DaemonHandle) -> axum::Router,
) -> Result<(), DaemonError> {
    let home = &cfg.home;
    let store = Store::open(home)?;
    let cuda = if cfg.no_gpu {
        None
    } else {
        match cuda::probe() {
            Ok(c) => Some(c),
            Err(why) => {
                info!("no GPU tier: {why}");
                None
            }
        }
    };
    let t = Instant::now();
    let tier_cfg = TierConfig {
        memory_budget: cfg.memory_budget,
        gpu_mem_util: cfg.gpu_mem_util,
        gpu_budget: cfg.gpu_budget,
        load: cfg.load.clone(),
        pool_file: pool_dir(home, shm, cfg.memory_budget, cuda.is_some())
            .map(|d| d.join(format!("pool-{}", std::process::id()))),
    };
    let (tiers, host) = build_tiers_with(Store::open(home)?, &tier_cfg, cuda.as_ref())?;
    if let Some(p) = host.pool().and_then(|p| p.path()) {
        info!(path = %p.display(), pinned = host.is_pinned(), "host pool");
    }
    info!(seconds = t.elapsed().as_secs_f64(), tiers = ?tiers.tiers(), "tiers ready");

    let bind = |addr: SocketAddr| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|source| DaemonError::Listen {
                addr: addr.to_string(),
                source,
            })
    };
    let tcp_listener = cfg.tcp.map(bind).transpose()?;
    let http_listener = cfg.http.map(bind).transpose()?;
    let local = |l: &Option<std::net::TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let (tcp_addr, http_addr) = (local(&tcp_listener), local(&http_listener));
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
        tcp: tcp_addr.clone(),
        http: http_addr.clone(),
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
    });
    let handle = DaemonHandle {
        inner: daemon.clone(),
    };
    crate::serve::warm_up(&handle);
    let extra = routes(&handle);
    let token = match tcp_listener {
        Some(_) => {
            let t = random_token()?;
            write_private(&home.join(TOKEN_FILE), &t)?;
            Some(t)
        }
        None => None,
    };

    let result = rt.block_on(async {
        let uds =
            tokio::net::UnixListener::bind(&socket).map_err(|source| DaemonError::Listen {
                addr: socket.display().to_string(),
                source,
            })?;
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(io_err(&socket))?;
        let svc = Service { d: daemon.clone() };
        let mut tasks = tokio::task::JoinSet::new();
        let stop = wait_stop(stop_rx.clone());
        let uds_server = tonic::transport::Server::builder()
            .add_service(FlashServer::new(svc.clone()).max_decoding_message_size(64 << 20))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(uds),
                stop,
            );
        tasks.spawn(async move {
            uds_server
                .await
                .map_err(|e| DaemonError::Serve(e.to_string()))
        });
        if let (Some(listener), Some(token)) = (tcp_listener, token) {
            let addr = tcp_addr.clone();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
                DaemonError::Listen {
                    addr: addr.clone(),
                    source,
                }
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
                .add_service(FlashServer::with_interceptor(svc.clone(), check))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop,
                );
            tasks.spawn(async move { server.await.map_err(|e| DaemonError::Serve(e.to_string())) });
            info!(%addr, "gRPC on TCP (token required)");
        }
        if let Some(listener) = http_listener {
            let addr = http_addr.clone();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
                DaemonError::Listen {
                    addr: addr.clone(),
                    source,
                }
            })?;
            let app = metrics::router(daemon.clone()).merge(extra);
            let stop = wait_stop(stop_rx.clone());
            tasks.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(|e| DaemonError::Serve(e.to_string()))
            });
            info!(%addr, "HTTP (/metrics, /health)");
        }
        info!(socket = %socket.display(), pid = std::process::id(), "flash daemon ready");
        // Signals stop it gracefully too.
        let d = daemon.clone();
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
    });
    // Loads in flight ended with their requests; sessions are gone. Release
    // every lease left (none, normally) and the memory with the tiers.
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
    result
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Service {
    d: Arc<Daemon>,
}

fn status_of(e: &TierError) -> Status {
    let msg = e.to_string();
    if e.is_capacity() {
        return Status::resource_exhausted(msg);
    }
    match e {
        TierError::NoSuchTier { .. } | TierError::UnknownLease(_) | TierError::LeaseAttached(_) => {
            Status::invalid_argument(msg)
        }
        TierError::Busy { .. } | TierError::NotResident { .. } => Status::failed_precondition(msg),
        _ => Status::internal(msg),
    }
}

/// The copies an unload freed, as the reply lists them.
fn tier_bytes(freed: Vec<(Tier, u64)>) -> Vec<proto::TierBytes> {
    freed
        .into_iter()
        .map(|(t, b)| proto::TierBytes {
            tier: t.to_string(),
            bytes: b,
        })
        .collect()
}

fn store_status(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Name(_) | StoreError::Split { .. } => Status::invalid_argument(msg),
        StoreError::Exists(_) => Status::already_exists(msg),
        _ => Status::internal(msg),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the request's thread failed: {e}")))?
}

fn session_of<T>(req: &Request<T>) -> Result<u64, Status> {
    req.metadata()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "leases need a session: open the Session stream and send its id as `{SESSION_HEADER}`"
            ))
        })
}

fn tensors_of(d: &Daemon, model: &ModelId) -> Result<Vec<proto::TensorInfo>, Status> {
    Ok(d.tiers
        .transfers()
        .tensors(model)
        .map_err(|e| status_of(&e))?
        .into_iter()
        .map(|t| proto::TensorInfo {
            name: t.name,
            dtype: t.dtype.to_string(),
            shape: t.shape,
            offset: t.offset,
            length: t.length,
        })
        .collect())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<proto::SessionEvent, Status>> + Send>>;

impl Daemon {
    /// The store name of a request's model, checked; NOT_FOUND when absent.
    fn model(&self, s: &str) -> Result<(ModelName, ModelId), Status> {
        let name: ModelName = s
            .parse()
            .map_err(|e: flash_store::name::NameError| Status::invalid_argument(e.to_string()))?;
        // A model replaced or removed since its copies were made: they go
        // first (refused while leased).
        self.fresh
            .check(&self.tiers, &ModelId::new(name.to_string()))
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        if !self.store.contains(&name) {
            return Err(Status::not_found(format!(
                "model {name} is not in the store (see `flash list`)"
            )));
        }
        let id = ModelId::new(name.to_string());
        Ok((name, id))
    }

    fn tier(&self, s: &str) -> Result<Tier, Status> {
        if s.is_empty() || s == "auto" {
            return Ok(if self.tiers.tiers().len() > 1 {
                Tier::Gpu(0)
            } else {
                Tier::Memory
            });
        }
        match s.parse::<Tier>() {
            Ok(Tier::Disk) => Err(Status::invalid_argument(
                "the disk is not a cache tier: use memory, gpu or gpu:N",
            )),
            Ok(t) if self.tiers.tiers().contains(&t) => Ok(t),
            Ok(t) => Err(Status::invalid_argument(format!(
                "{t} is not a tier of this daemon (tiers: {})",
                self.tiers
                    .tiers()
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Err(e) => Err(Status::invalid_argument(e)),
        }
    }

    fn live_session(&self, id: u64) -> Result<(), Status> {
        if self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
        {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "session {id} is not open (closed, or from a previous daemon): reconnect"
            )))
        }
    }

    fn observe(&self, tier: Tier, from: Tier, seconds: f64) {
        self.switch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(tier, from, seconds);
    }

    fn count<T>(&self, r: &Result<T, Status>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tonic::async_trait]
impl Flash for Service {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<tonic::Streaming<proto::SessionPing>>,
    ) -> Result<Response<SessionStream>, Status> {
        let d = self.d.clone();
        let id = d.next_session.fetch_add(1, Ordering::Relaxed);
        d.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, HashSet::new());
        info!(session = id, "session opened");
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.try_send(Ok(proto::SessionEvent { session_id: id }));
        let mut stop = d.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = async { while let Ok(Some(_)) = inbound.message().await {} } => {}
                _ = async { while !*stop.borrow_and_update() { if stop.changed().await.is_err() { break; } } } => {}
            }
            drop(tx); // ends the response stream
            let leases = d
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id)
                .map_or(0, |s| s.len());
            let d2 = d.clone();
            let released = tokio::task::spawn_blocking(move || d2.tiers.client_gone(ClientId(id)))
                .await
                .unwrap_or(0);
            info!(session = id, leases, released, "session closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        let d = self.d.clone();
        blocking(move || Ok(status_reply(&d)))
            .await
            .map(Response::new)
    }

    async fn list(
        &self,
        _req: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListReply>, Status> {
        let d = self.d.clone();
        blocking(move || {
            let models = d.store.list().map_err(store_status)?;
            Ok(proto::ListReply {
                models: models
                    .into_iter()
                    .map(|m| {
                        let id = ModelId::new(&m.model_id);
                        model_info(&d, m, &id)
                    })
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn info(
        &self,
        req: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let d = self.d.clone();
        let r = req.into_inner();
        blocking(move || {
            let (name, id) = d.model(&r.model)?;
            let info = d.store.info(&name).map_err(store_status)?;
            let mut out = model_info(&d, info, &id);
            out.image_bytes = d
                .tiers
                .transfers()
                .decoded_bytes(&id)
                .map_err(|e| status_of(&e))?;
            if r.tensors {
                out.tensors = tensors_of(&d, &id)?;
            }
            Ok(out)
        })
        .await
        .map(Response::new)
    }

    async fn pull(
        &self,
        req: Request<proto::PullRequest>,
    ) -> Result<Response<proto::PullReply>, Status> {
        let d = self.d.clone();
        let r = req.into_inner();
        let res = blocking(move || pull(&d, r)).await;
        self.d.count(&res);
        res.map(Response::new)
    }

    async fn load(
        &self,
        req: Request<proto::LoadRequest>,
    ) -> Result<Response<proto::LoadReply>, Status> {
        let d = self.d.clone();
        let r = req.into_inner();
        let res = blocking(move || {
            let t0 = Instant::now();
            let (_, id) = d.model(&r.model)?;
            let tier = d.tier(&r.tier)?;
            let l = d.tiers.load(&id, tier, r.keep).map_err(|e| status_of(&e))?;
            if r.keep {
                // `load` keeps an existing mark; make sure it is set.
                let _ = d.tiers.set_keep(&id, tier, true);
            }
            Ok(proto::LoadReply {
                tier: l.tier.to_string(),
                bytes: l.bytes,
                served_from: l.served_from.to_string(),
                seconds: t0.elapsed().as_secs_f64(),
            })
        })
        .await;
        self.d.count(&res);
        res.map(Response::new)
    }

    async fn acquire(
        &self,
        req: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireReply>, Status> {
        let session = session_of(&req)?;
        let d = self.d.clone();
        let r = req.into_inner();
        let res = blocking(move || acquire(&d, session, r)).await;
        self.d.count(&res);
        res.map(Response::new)
    }

    async fn fill(
        &self,
        req: Request<proto::FillRequest>,
    ) -> Result<Response<proto::FillReply>, Status> {
        let session = session_of(&req).unwrap_or(0);
        let d = self.d.clone();
        let r = req.into_inner();
        let res = blocking(move || fill(&d, session, r)).await;
        self.d.count(&res);
        res.map(Response::new)
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseReply>, Status> {
        let session = session_of(&req)?;
        let d = self.d.clone();
        let lease = req.into_inner().lease_id;
        blocking(move || {
            {
                let mut s = d.sessions.lock().unwrap_or_else(|p| p.into_inner());
                let owned = s.get_mut(&session).is_some_and(|set| set.remove(&lease));
                if !owned {
                    return Err(Status::invalid_argument(format!(
                        "lease {lease} is not held by session {session}"
                    )));
                }
            }
            d.tiers.release(LeaseId(lease)).map_err(|e| status_of(&e))?;
            Ok(proto::ReleaseReply {})
        })
        .await
        .map(Response::new)
    }

    async fn unload(
        &self,
        req: Request<proto::UnloadRequest>,
    ) -> Result<Response<proto::UnloadReply>, Status> {
        let d = self.d.clone();
        let r = req.into_inner();
        blocking(move || {
            let (_, id) = d.model(&r.model)?;
            let tier = if r.tier.is_empty() {
                None
            } else {
                Some(d.tier(&r.tier)?)
            };
            let freed = d.tiers.unload(&id, tier).map_err(|e| status_of(&e))?;
            Ok(proto::UnloadReply {
                freed: tier_bytes(freed),
            })
        })
        .await
        .map(Response::new)
    }

    async fn remove(
        &self,
        req: Request<proto::RemoveRequest>,
    ) -> Result<Response<proto::RemoveReply>, Status> {
        let d = self.d.clone();
        let r = req.into_inner();
        blocking(move || {
            let (name, id) = d.model(&r.model)?;
            // The copies first: a client holding one keeps the model.
            let freed = d.tiers.unload(&id, None).map_err(|e| status_of(&e))?;
            d.store.remove(&name).map_err(store_status)?;
            d.tiers.transfers().forget(&id);
            d.fresh.changed(&d.tiers, &id);
            info!(model = %id, "removed from the store");
            Ok(proto::RemoveReply {
                model: id.to_string(),
                freed: tier_bytes(freed),
            })
        })
        .await
        .map(Response::new)
    }

    async fn shutdown(
        &self,
        _req: Request<proto::ShutdownRequest>,
    ) -> Result<Response<proto::ShutdownReply>, Status> {
        info!("shutdown requested");
        let _ = self.d.shutdown.send(true);
        Ok(Response::new(proto::ShutdownReply {}))
    }
}

fn model_info(d: &Daemon, m: flash_store::ModelInfo, id: &ModelId) -> proto::ModelInfo {
    proto::ModelInfo {
        model: m.model_id,
        size: m.size,
        image_bytes: 0,
        dtype: m.dtype.map(|t| t.to_string()).unwrap_or_default(),
        architecture: m.architecture.unwrap_or_default(),
        tensor_count: m.tensor_count as u32,
        source: m.source,
        path: m.path.display().to_string(),
        tiers: d.tiers.locate(id).iter().map(|t| t.to_string()).collect(),
        tensors: Vec::new(),
        stored_bytes: m.stored_bytes,
        compressed: m.compressed,
    }
}

pub(crate) fn status_reply(d: &Daemon) -> proto::StatusReply {
    // Copies of models replaced or removed behind the daemon's back go
    // before they are reported (a leased one stays, and says so when asked).
    let resident: HashSet<ModelId> = d
        .tiers
        .status()
        .tiers
        .iter()
        .flat_map(|t| t.models.iter().map(|m| m.model.clone()))
        .collect();
    for model in &resident {
        if let Err(e) = d.fresh.check(&d.tiers, model) {
            debug!("{e}");
        }
    }
    let st = d.tiers.status();
    let sessions = d.sessions.lock().map(|s| s.len()).unwrap_or(0);
    proto::StatusReply {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_seconds: d.started.elapsed().as_secs_f64(),
        socket: d.socket.display().to_string(),
        tcp: d.tcp.clone(),
        http: d.http.clone(),
        store: d.home.display().to_string(),
        tiers: st
            .tiers
            .iter()
            .map(|t| proto::TierStatus {
                tier: t.tier.to_string(),
                budget: t.budget,
                used: t.used,
                resident: t.resident,
                loading: t.loading,
                hits: t.counters.hits,
                coalesced: t.counters.coalesced,
                misses: t.counters.misses,
                loads: t.counters.loads,
                load_failures: t.counters.load_failures,
                loaded_bytes: t.counters.loaded_bytes,
                evictions: t.counters.evictions,
                evicted_bytes: t.counters.evicted_bytes,
                unloads: t.counters.unloads,
                models: t
                    .models
                    .iter()
                    .map(|m| proto::ResidentModel {
                        model: m.model.to_string(),
                        bytes: m.bytes,
                        state: match m.state {
                            flash_tier::ModelState::Loading => "loading".into(),
                            flash_tier::ModelState::Ready => "ready".into(),
                        },
                        loaded_from: m.loaded_from.to_string(),
                        leases: m.leases,
                        kept: m.kept,
                        idle_ms: m.idle_ms,
                    })
                    .collect(),
            })
            .collect(),
        sessions: sessions as u32,
        leases: st.leases as u32,
        filled_bytes: d.filled_bytes.load(Ordering::Relaxed),
        requests: d.requests.load(Ordering::Relaxed),
        errors: d.errors.load(Ordering::Relaxed),
        memory_shareable: d.memory_shareable,
        memory_pinned: d.memory_pinned,
        gpus: (d.tiers.tiers().len() - 1) as u32,
    }
}

fn pull(d: &Daemon, r: proto::PullRequest) -> Result<proto::PullReply, Status> {
    let dtype: DtypeChoice = if r.dtype.is_empty() {
        DtypeChoice::default()
    } else {
        r.dtype.parse().map_err(Status::invalid_argument)?
    };
    let mut name: ModelName = r
        .model
        .parse()
        .map_err(|e: flash_store::name::NameError| Status::invalid_argument(e.to_string()))?;
    if !r.revision.is_empty() {
        name.revision = Some(r.revision.clone());
    }
    let id = ModelId::new(name.to_string());
    let compress = match r.compress {
        Some(c) => c,
        None => d.store.settings().map_err(store_status)?.compress,
    };
    if r.force && d.store.contains(&name) {
        // The old bytes must leave the tiers first; refused while leased.
        d.tiers.unload(&id, None).map_err(|e| status_of(&e))?;
    }
    let report = if r.from_dir.is_empty() {
        let hub = flash_hub::HubClient::from_env();
        let opts = ImportOptions {
            dtype,
            force: r.force,
            compress,
            ..Default::default()
        };
        d.store.pull(&hub, &name, &opts).map_err(store_status)?
    } else {
        let dir = PathBuf::from(&r.from_dir);
        let abs = dir
            .canonicalize()
            .map_err(|e| Status::invalid_argument(format!("{}: {e}", dir.display())))?;
        let opts = ImportOptions {
            dtype,
            force: r.force,
            source: flash_format::manifest::Source {
                kind: "local".into(),
                path: Some(abs.display().to_string()),
                ..Default::default()
            },
            progress: None,
            compress,
        };
        d.store.import(&abs, &name, &opts).map_err(store_status)?
    };
    d.tiers.transfers().forget(&id);
    d.fresh.changed(&d.tiers, &id);
    Ok(proto::PullReply {
        model: report.model_id,
        path: report.path.display().to_string(),
        tensors: report.tensors as u32,
        aliases: report.aliases as u32,
        bytes: report.bytes,
        seconds: report.seconds,
        tensor_bytes: report.tensor_bytes,
        compressed: report.compressed,
    })
}

fn acquire(
    d: &Daemon,
    session: u64,
    r: proto::AcquireRequest,
) -> Result<proto::AcquireReply, Status> {
    let t0 = Instant::now();
    d.live_session(session)?;
    let (_, id) = d.model(&r.model)?;
    let tier = d.tier(&r.tier)?;
    if tier == Tier::Memory && !d.memory_shareable {
        return Err(Status::failed_precondition(
            "this daemon's memory tier cannot be shared (it has no memory tier): ask for a GPU tier, or use copy mode",
        ));
    }
    if tier == Tier::Memory
        && d.tiers
            .transfers()
            .is_compressed(&id)
            .map_err(|e| status_of(&e))?
    {
        return Err(Status::failed_precondition(format!(
            "{id} is stored compressed: its memory-tier copy holds compressed bytes, which cannot be \
             shared as tensors; ask for a GPU tier (decoded there), or use copy mode (the daemon decodes)"
        )));
    }
    let tensors = if r.no_tensors {
        Vec::new()
    } else {
        tensors_of(d, &id)?
    };
    let t_tensors = t0.elapsed();
    let lease = d
        .tiers
        .acquire(&id, tier, ClientId(session))
        .map_err(|e| status_of(&e))?;
    let t_lease = t0.elapsed();
    let location = if let Some(img) = lease.memory() {
        let (path, offset) = img.shared_location().ok_or_else(|| {
            Status::failed_precondition("this daemon's memory tier is not in shared memory")
        })?;
        acquire_reply::Location::Shm(proto::ShmLocation {
            path: path.display().to_string(),
            offset,
            size: lease.bytes(),
        })
    } else if let Some(dev) = lease.gpu() {
        let handle = dev
            .ipc_handle()
            .map_err(|e| Status::internal(format!("IPC handle of {id} on {tier}: {e}")))?;
        acquire_reply::Location::Cuda(proto::CudaLocation {
            ipc_handle: handle.to_vec(),
            device: dev.gpu().ordinal() as u32,
            size: lease.bytes(),
        })
    } else {
        return Err(Status::internal("a lease without a buffer"));
    };
    let (bytes, served_from) = (lease.bytes(), lease.served_from());
    let lease_id = lease.detach();
    {
        let mut s = d.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match s.get_mut(&session) {
            Some(set) => {
                set.insert(lease_id.0);
            }
            None => {
                drop(s);
                let _ = d.tiers.release(lease_id);
                return Err(Status::cancelled(format!(
                    "session {session} closed during the request"
                )));
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    d.observe(tier, served_from, seconds);
    debug!(
        model = %id,
        %tier,
        tensors_ms = t_tensors.as_secs_f64() * 1e3,
        lease_ms = (t_lease - t_tensors).as_secs_f64() * 1e3,
        total_ms = seconds * 1e3,
        "acquire"
    );
    Ok(proto::AcquireReply {
        lease_id: lease_id.0,
        model: id.to_string(),
        tier: tier.to_string(),
        bytes,
        served_from: served_from.to_string(),
        seconds,
        tensors,
        location: Some(location),
    })
}

/// A client's CUDA buffer, opened once per fill.
struct Opened {
    mem: DeviceMemory,
}

fn fill(d: &Daemon, session: u64, r: proto::FillRequest) -> Result<proto::FillReply, Status> {
    let t0 = Instant::now();
    let (_, id) = d.model(&r.model)?;
    if r.regions.is_empty() {
        return Err(Status::invalid_argument("a fill needs at least one region"));
    }
    let image = d
        .tiers
        .transfers()
        .decoded_bytes(&id)
        .map_err(|e| status_of(&e))?;
    let mut cuda_devices = HashSet::new();
    for (i, g) in r.regions.iter().enumerate() {
        if g.src_offset.checked_add(g.length).is_none_or(|e| e > image) {
            return Err(Status::invalid_argument(format!(
                "region {i}: [{}, +{}) lies outside the image of {id} ({image} bytes)",
                g.src_offset, g.length
            )));
        }
        match &g.target {
            None => {
                return Err(Status::invalid_argument(format!(
                    "region {i} has no target"
                )))
            }
            Some(region::Target::Cuda(c)) => {
                if c.ipc_handle.len() != 64 {
                    return Err(Status::invalid_argument(format!(
                        "region {i}: an IPC handle has 64 bytes, not {}",
                        c.ipc_handle.len()
                    )));
                }
                cuda_devices.insert(c.device);
            }
            Some(region::Target::ShmPath(_)) => {}
        }
    }
    if !cuda_devices.is_empty() && d.cuda.is_none() {
        return Err(Status::failed_precondition(
            "CUDA targets need a daemon with a GPU",
        ));
    }
    // The source: the requested tier, else a GPU copy on the targets' GPU,
    // else the memory tier (loading it there if needed).
    let source = if !r.source_tier.is_empty() {
        d.tier(&r.source_tier)?
    } else {
        let here = d.tiers.locate(&id);
        let on_gpu = cuda_devices
            .iter()
            .map(|&g| Tier::Gpu(g as u16))
            .find(|t| here.contains(t));
        match on_gpu {
            Some(t) => t,
            None if d
                .tiers
                .status()
                .tier(Tier::Memory)
                .is_some_and(|t| t.budget > 0) =>
            {
                Tier::Memory
            }
            None => d.tier("")?,
        }
    };
    let lease = d
        .tiers
        .acquire(&id, source, ClientId(session))
        .map_err(|e| status_of(&e))?;
    // A compressed model's memory copy holds its stored bytes: regions of
    // the decoded image are decoded from it.
    let plan = d.tiers.transfers().plan(&id).map_err(|e| status_of(&e))?;
    fn from_memory<'i>(
        plan: &flash_load::LoadPlan,
        id: &ModelId,
        img: &'i [u8],
        s: usize,
        len: usize,
    ) -> Result<std::borrow::Cow<'i, [u8]>, Status> {
        if !plan.is_encoded() {
            return Ok(std::borrow::Cow::Borrowed(&img[s..s + len]));
        }
        let mut out = vec![0u8; len];
        flash_load::decode::decode_range(plan, img, s as u64..(s + len) as u64, &mut out)
            .map_err(|e| Status::internal(format!("decoding {id}: {e}")))?;
        Ok(std::borrow::Cow::Owned(out))
    }
    let mut opened: HashMap<(u32, Vec<u8>), Opened> = HashMap::new();
    let mut total = 0u64;
    for (i, g) in r.regions.iter().enumerate() {
        let (s, len) = (g.src_offset as usize, g.length as usize);
        match g.target.as_ref().expect("checked above") {
            region::Target::ShmPath(p) => {
                let path = Path::new(p);
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Status::invalid_argument(format!("region {i}: {p}: {e}")))?;
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                if g.dst_offset.checked_add(g.length).is_none_or(|e| e > size) {
                    return Err(Status::invalid_argument(format!(
                        "region {i}: [{}, +{}) lies outside {p} ({size} bytes)",
                        g.dst_offset, g.length
                    )));
                }
                let write = |bytes: &[u8]| {
                    f.write_all_at(bytes, g.dst_offset)
                        .map_err(|e| Status::internal(format!("writing {p}: {e}")))
                };
                if let Some(img) = lease.memory() {
                    write(&from_memory(&plan, &id, img, s, len)?)?;
                } else if let Some(dev) = lease.gpu() {
                    let mut tmp = vec![0u8; len];
                    dev.copy_to_host(s, &mut tmp)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    write(&tmp)?;
                }
            }
            region::Target::Cuda(c) => {
                let cuda = d.cuda.as_ref().expect("checked above");
                let key = (c.device, c.ipc_handle.clone());
                if !opened.contains_key(&key) {
                    let need = r
                        .regions
                        .iter()
                        .filter_map(|x| match &x.target {
                            Some(region::Target::Cuda(y))
                                if y.device == c.device && y.ipc_handle == c.ipc_handle =>
                            {
                                Some(x.dst_offset + x.length)
                            }
                            _ => None,
                        })
                        .max()
                        .unwrap_or(0);
                    let gpu = cuda
                        .device(c.device as usize)
                        .map_err(|e| Status::invalid_argument(format!("region {i}: {e}")))?;
                    let handle: [u8; 64] = c.ipc_handle.as_slice().try_into().expect("checked");
                    let mem = gpu.open_ipc(&handle, need as usize).map_err(|e| {
                        Status::invalid_argument(format!(
                            "region {i}: opening the client's IPC handle: {e}"
                        ))
                    })?;
                    opened.insert(key.clone(), Opened { mem });
                }
                let dst = &opened[&key].mem;
                if let Some(img) = lease.memory() {
                    dst.copy_from_host(
                        g.dst_offset as usize,
                        &from_memory(&plan, &id, img, s, len)?,
                    )
                    .map_err(|e| Status::internal(format!("region {i}: {e}")))?;
                } else if let Some(dev) = lease.gpu() {
                    let stream = dev
                        .gpu()
                        .stream()
                        .map_err(|e| Status::internal(e.to_string()))?;
                    dev.copy_to_device(s, dst, g.dst_offset as usize, len, &stream)
                        .and_then(|_| stream.synchronize())
                        .map_err(|e| Status::internal(format!("region {i}: {e}")))?;
                }
            }
        }
        total += g.length;
    }
    drop(opened);
    let served_from = lease.served_from();
    drop(lease);
    d.filled_bytes.fetch_add(total, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    d.observe(source, served_from, seconds);
    Ok(proto::FillReply {
        bytes: total,
        source_tier: source.to_string(),
        loaded_from: if served_from == source {
            String::new()
        } else {
            served_from.to_string()
        },
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_home_gets_its_own_shared_memory_folder() {
        let a = shm_dir(Path::new("/srv/a"));
        assert_eq!(a, shm_dir(Path::new("/srv/a")));
        assert_ne!(a, shm_dir(Path::new("/srv/b")));
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("flashtensors-"));
    }

    #[test]
    fn a_pool_too_large_for_shared_memory_goes_elsewhere() {
        let home = tempfile::tempdir().unwrap();
        let shm = home.path().join("shm");
        fs::create_dir_all(&shm).unwrap();
        assert_eq!(pool_dir(home.path(), &shm, 4096, false), Some(shm.clone()));
        assert_eq!(
            pool_dir(home.path(), &shm, u64::MAX, false),
            Some(home.path().join("run"))
        );
        assert_eq!(pool_dir(home.path(), &shm, u64::MAX, true), None);
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        let m = ModelId::new("a/b");
        let code = |e: TierError| status_of(&e).code();
        assert_eq!(
            code(TierError::TooLarge {
                model: m.clone(),
                tier: Tier::Memory,
                needed: 2,
                budget: 1
            }),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            code(TierError::Busy {
                model: m.clone(),
                tier: Tier::Memory,
                holders: vec![ClientId(1)]
            }),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(TierError::UnknownLease(LeaseId(3))),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(TierError::backend("disk on fire")),
            tonic::Code::Internal
        );
        assert_eq!(
            store_status(StoreError::NotFound("a/b".into())).code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn a_held_lock_names_the_running_daemon() {
        let home = tempfile::tempdir().unwrap();
        let first = take_lock(home.path()).unwrap();
        fs::write(home.path().join(PID_FILE), "4242\n").unwrap();
        let e = take_lock(home.path()).unwrap_err().to_string();
        assert!(
            e.contains("already running") && e.contains("4242") && e.contains("flash.sock"),
            "{e}"
        );
        drop(first);
        assert!(take_lock(home.path()).is_ok());
    }
}
