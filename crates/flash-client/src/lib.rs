//! The flashtensors daemon's API and its blocking Rust client, shared by the
//! `flash` CLI and the Python SDK.
//!
//! The API is gRPC (`proto/flash.proto`, package `flash.v1`), generated into
//! [`proto`] (client and server; the daemon implements the server). The
//! daemon listens on the Unix socket `$FLASH_HOME/flash.sock` (mode 0600),
//! and on TCP only when started with `--host/--port`, where every request
//! must carry the token of `$FLASH_HOME/daemon.token`.
//!
//! [`Client`] is blocking: it owns a small tokio runtime (one worker thread,
//! which also keeps the session alive between calls), so callers need no
//! async code. Do not call it from inside another tokio runtime's task.
//!
//! # Leases and sessions
//!
//! [`Client::acquire`] (share mode) leases a copy of a model in a tier and
//! says where its bytes are: for a GPU copy a CUDA IPC handle
//! ([`Lease::map_gpu`] maps it), for a memory copy a range of the daemon's
//! shared-memory file ([`Lease::map_host`] maps it read-only). While the lease
//! lives, the daemon neither evicts nor unloads that copy. A lease ends with
//! [`Client::release`], or when the client's session ends: the client opens a
//! session stream on its first acquire and holds it open for as long as the
//! `Client` lives; when it is dropped or the process dies, the socket closes
//! and the daemon releases every lease of the session.
//!
//! [`Client::fill`] (copy mode) makes the daemon copy a model's image into
//! buffers the client owns: CUDA allocations (by IPC handle) or, on machines
//! without a GPU, shared-memory files ([`Client::fill_shm`]).
//!
//! # Example
//!
//! ```no_run
//! use flash_client::{Client, Place};
//! let mut client = Client::connect(std::path::Path::new("/home/me/.cache/flashtensors"))?;
//! let lease = client.acquire("Qwen/Qwen3-0.6B", Place::Memory)?;
//! let bytes = lease.map_host()?; // zero-copy view of the daemon's copy
//! let t = lease.tensor("model.norm.weight").unwrap();
//! let _norm = &bytes[t.offset as usize..(t.offset + t.length) as usize];
//! client.release(lease)?;
//! # Ok::<(), flash_client::ClientError>(())
//! ```

#![forbid(unsafe_code)]

/// The generated gRPC code (messages, client and server) of `flash.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("flash.v1");
}

use flash_sys::cuda::{DeviceMemory, Gpu, IpcHandle};
use flash_sys::shm::{ShmFile, ShmView};
use hyper_util::rt::TokioIo;
use proto::flash_client::FlashClient;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};

pub use proto::{
    FillReply, ListReply, LoadReply, ModelInfo, PullReply, RemoveReply, ResidentModel, StatusReply,
    TensorInfo, TierStatus, UnloadReply,
};

/// The daemon's socket, in `$FLASH_HOME`.
pub const SOCKET_FILE: &str = "flash.sock";
/// The token required on TCP, in `$FLASH_HOME` (mode 0600).
pub const TOKEN_FILE: &str = "daemon.token";
/// The metadata key carrying the session id on `Acquire` and `Release`.
pub const SESSION_HEADER: &str = "flash-session";
/// The metadata key carrying the TCP token (`Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";

/// The store (and daemon) folder when none is given: `$FLASH_HOME`, else
/// `$XDG_CACHE_HOME/flashtensors`, else `~/.cache/flashtensors` (as
/// `flash-store`'s default on Linux).
pub fn default_home() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(h) = var("FLASH_HOME") {
        return h;
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("flashtensors")
}

/// The daemon's socket for the store at `home`.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join(SOCKET_FILE)
}

/// What went wrong, by kind, so that the SDK can raise the right exception.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nothing answers on the socket (or address).
    #[error("the flash daemon is not running: nothing answers on {target} ({reason}); start it with `flash start`")]
    NotRunning { target: String, reason: String },
    /// The model is not in the daemon's store.
    #[error("{0}")]
    UnknownModel(String),
    /// The tier has no room for the model (the message names what holds it).
    #[error("{0}")]
    NoSpace(String),
    /// The request is wrong: a bad name or tier, an unknown lease, a copy in use.
    #[error("{0}")]
    BadRequest(String),
    /// The TCP token was missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// The daemon failed to do it (a load error, a damaged model...).
    #[error("the daemon failed: {0}")]
    Server(String),
    /// The connection broke.
    #[error("talking to the daemon: {0}")]
    Transport(String),
    /// A local step failed: mapping memory, a CUDA call.
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    fn from_status(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => ClientError::UnknownModel(msg),
            Code::ResourceExhausted => ClientError::NoSpace(msg),
            Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
                ClientError::BadRequest(msg)
            }
            Code::Unauthenticated | Code::PermissionDenied => ClientError::Unauthorized(msg),
            Code::Unavailable | Code::Cancelled | Code::Unknown if msg.is_empty() => {
                ClientError::Transport(format!("{:?}", s.code()))
            }
            Code::Unavailable => ClientError::Transport(msg),
            _ => ClientError::Server(msg),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Which tier a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Place {
    /// GPU 0 when the daemon has a GPU, else memory.
    #[default]
    Auto,
    Memory,
    Gpu(u32),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Auto => Ok(()),
            Place::Memory => f.write_str("memory"),
            Place::Gpu(n) => write!(f, "gpu:{n}"),
        }
    }
}

/// Parses `auto` (or empty), `memory` (`mem`), `gpu` (GPU 0), `gpu:N`.
impl FromStr for Place {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "" | "auto" => Ok(Place::Auto),
            "memory" | "mem" => Ok(Place::Memory),
            "gpu" => Ok(Place::Gpu(0)),
            _ => s
                .strip_prefix("gpu:")
                .and_then(|n| n.parse().ok())
                .map(Place::Gpu)
                .ok_or_else(|| format!("unknown tier {s:?} (expected memory, gpu or gpu:N)")),
        }
    }
}

/// Where a model is imported from ([`Client::pull`]).
#[derive(Debug, Clone, Default)]
pub struct PullSpec {
    /// `ORG/NAME[:REVISION]` on the Hub, or the store name for `from_dir`.
    pub model: String,
    /// A local Hugging Face style folder (on the daemon's machine).
    pub from_dir: Option<PathBuf>,
    pub revision: Option<String>,
    /// `auto` (default), `bf16`, `fp16`, `fp32`.
    pub dtype: Option<String>,
    pub force: bool,
    /// Store floating-point tensors compressed; `None`: the store's setting.
    pub compress: Option<bool>,
}

/// Where a leased copy's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// One `cuMemAlloc` allocation of the daemon on GPU `device`.
    Cuda {
        ipc_handle: IpcHandle,
        device: u32,
        size: u64,
    },
    /// `size` bytes at `offset` of the daemon's shared-memory file.
    Shm {
        path: PathBuf,
        offset: u64,
        size: u64,
    },
}

/// A lease on a model's copy in a tier (share mode). The copy stays put
/// until [`Client::release`] or the end of the client's session.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: u64,
    pub model: String,
    /// `memory` or `gpu:N`.
    pub tier: String,
    pub bytes: u64,
    /// Where the bytes came from for this request (`tier` itself for a hit).
    pub served_from: String,
    /// Seconds the daemon spent on the request.
    pub seconds: f64,
    pub tensors: Vec<TensorInfo>,
    pub location: Location,
}

/// The GPU copies this process has mapped, by (GPU ordinal, IPC handle).
type IpcMappings = Mutex<HashMap<(usize, IpcHandle), Weak<DeviceMemory>>>;
static IPC_MAPPINGS: OnceLock<IpcMappings> = OnceLock::new();

impl Lease {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Maps a memory-tier copy read-only (zero copy). Valid while the lease is
    /// held; it reads other bytes once the daemon has reused the memory.
    pub fn map_host(&self) -> Result<ShmView> {
        match &self.location {
            Location::Shm { path, offset, size } => {
                let len = usize::try_from(*size).map_err(|_| local("size exceeds memory"))?;
                ShmView::open(path, *offset, len)
                    .map_err(|e| local(format!("mapping {}: {e}", path.display())))
            }
            Location::Cuda { device, .. } => Err(ClientError::BadRequest(format!(
                "{} is leased on GPU {device}: map it with map_gpu",
                self.model
            ))),
        }
    }

    /// Maps a GPU copy into this process (`cuIpcOpenMemHandle`): the tensors
    /// lie at their offsets from the returned memory's `device_ptr()`. Must be
    /// another process than the daemon (CUDA refuses its own handles).
    ///
    /// CUDA maps one allocation at most once per context (a second
    /// `cuIpcOpenMemHandle` of it fails with `CUDA_ERROR_ALREADY_MAPPED`), so
    /// the leases of this process that name the same allocation share one
    /// mapping, closed when the last of them drops it.
    pub fn map_gpu(&self, gpu: &Gpu) -> Result<Arc<DeviceMemory>> {
        match &self.location {
            Location::Cuda {
                ipc_handle, size, ..
            } => {
                let len = usize::try_from(*size).map_err(|_| local("size exceeds memory"))?;
                let key = (gpu.ordinal(), *ipc_handle);
                let mut open = IPC_MAPPINGS
                    .get_or_init(Default::default)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                open.retain(|_, m| m.strong_count() > 0);
                if let Some(mem) = open.get(&key).and_then(Weak::upgrade) {
                    if mem.len() >= len {
                        return Ok(mem);
                    }
                }
                let mem = gpu
                    .open_ipc(ipc_handle, len)
                    .map(Arc::new)
                    .map_err(|e| local(format!("opening the IPC handle of {}: {e}", self.model)))?;
                open.insert(key, Arc::downgrade(&mem));
                Ok(mem)
            }
            Location::Shm { .. } => Err(ClientError::BadRequest(format!(
                "{} is leased in host memory: map it with map_host",
                self.model
            ))),
        }
    }
}

/// One range copied by [`Client::fill`]: `length` bytes of the model's image
/// at `src_offset` into a buffer of the client at `dst_offset`.
#[derive(Debug, Clone)]
pub struct Region {
    pub target: Target,
    pub dst_offset: u64,
    pub src_offset: u64,
    pub length: u64,
}

/// A buffer of the client.
#[derive(Debug, Clone)]
pub enum Target {
    /// The IPC handle of a `cuMemAlloc` allocation's base, on GPU `device`.
    Cuda { ipc_handle: IpcHandle, device: u32 },
    /// A file the client created (see [`ShmFile`]).
    Shm(PathBuf),
}

fn local(m: impl Into<String>) -> ClientError {
    ClientError::Local(m.into())
}

fn transport(e: impl fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// A connection to the daemon. Blocking; not `Clone` (open one per thread,
/// or share it behind a mutex).
pub struct Client {
    rt: tokio::runtime::Runtime,
    rpc: FlashClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    session: Option<Session>,
    target: String,
}

struct Session {
    id: u64,
    /// Dropping it ends the request stream: the daemon sees the session end.
    _tx: tokio::sync::mpsc::Sender<proto::SessionPing>,
    /// Drains the daemon's events (so the stream's end is noticed).
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.target)
            .field("session", &self.session.as_ref().map(|s| s.id))
            .finish()
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("flash-client")
        .enable_all()
        .build()
        .map_err(|e| local(format!("cannot start the client's runtime: {e}")))
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// Connects to the daemon of [`default_home`].
    pub fn connect_default() -> Result<Client> {
        Self::connect(&default_home())
    }

    /// Connects to the daemon of the store at `home` through its Unix socket.
    pub fn connect(home: &Path) -> Result<Client> {
        Self::connect_socket(&socket_path(home))
    }

    /// Connects through the Unix socket at `socket`.
    pub fn connect_socket(socket: &Path) -> Result<Client> {
        let target = socket.display().to_string();
        let not_running = |reason: String| ClientError::NotRunning {
            target: target.clone(),
            reason,
        };
        if !socket.exists() {
            return Err(not_running("no socket".into()));
        }
        let rt = runtime()?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required by the API and ignored by the connector.
                Endpoint::from_static("http://flash.local")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .map_err(|e| not_running(error_chain(&e)))?;
        Ok(Client {
            rt,
            rpc: FlashClient::new(channel).max_decoding_message_size(256 << 20),
            token: None,
            session: None,
            target,
        })
    }

    /// Connects over TCP (`host:port`) with the daemon's token.
    pub fn connect_tcp(addr: &str, token: &str) -> Result<Client> {
        let rt = runtime()?;
        let not_running = |reason: String| ClientError::NotRunning {
            target: addr.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClientError::BadRequest(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = rt
            .block_on(endpoint.connect())
            .map_err(|e| not_running(error_chain(&e)))?;
        let token = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            ClientError::BadRequest("the token has characters metadata cannot carry".into())
        })?;
        Ok(Client {
            rt,
            rpc: FlashClient::new(channel).max_decoding_message_size(256 << 20),
            token: Some(token),
            session: None,
            target: addr.to_string(),
        })
    }

    /// What this client talks to (socket path or address).
    pub fn target(&self) -> &str {
        &self.target
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert(AUTH_HEADER, t.clone());
        }
        if let Some(s) = &self.session {
            r.metadata_mut()
                .insert(SESSION_HEADER, MetadataValue::from(s.id));
        }
        r
    }

    /// The session's id, opening the session if needed.
    pub fn session_id(&mut self) -> Result<u64> {
        if let Some(s) = &self.session {
            if !s.task.is_finished() {
                return Ok(s.id);
            }
            return Err(ClientError::Transport(
                "the daemon closed this client's session (it stopped or restarted); its leases are gone: connect again".into(),
            ));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut rpc = self.rpc.clone();
        let (id, task) = self.rt.block_on(async move {
            let mut events = rpc
                .session(req)
                .await
                .map_err(ClientError::from_status)?
                .into_inner();
            let first = events
                .message()
                .await
                .map_err(ClientError::from_status)?
                .ok_or_else(|| transport("the daemon closed the session at once"))?;
            let task =
                tokio::spawn(async move { while let Ok(Some(_)) = events.message().await {} });
            Ok::<_, ClientError>((first.session_id, task))
        })?;
        self.session = Some(Session { id, _tx: tx, task });
        Ok(id)
    }

    fn call<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce(FlashClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let rpc = self.rpc.clone();
        self.rt
            .block_on(f(rpc))
            .map(|r| r.into_inner())
            .map_err(ClientError::from_status)
    }

    /// Version, uptime, tiers with budgets and use, resident models, counters.
    pub fn status(&self) -> Result<StatusReply> {
        let req = self.request(proto::StatusRequest {});
        self.call(|mut c| async move { c.status(req).await })
    }

    /// The models of the store, with the tiers holding each.
    pub fn list(&self) -> Result<Vec<ModelInfo>> {
        let req = self.request(proto::ListRequest {});
        Ok(self.call(|mut c| async move { c.list(req).await })?.models)
    }

    /// One model's details and tensor table; `None` when it is not stored.
    pub fn info(&self, model: &str) -> Result<Option<ModelInfo>> {
        let req = self.request(proto::InfoRequest {
            model: model.into(),
            tensors: true,
        });
        match self.call(|mut c| async move { c.info(req).await }) {
            Ok(i) => Ok(Some(i)),
            Err(ClientError::UnknownModel(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Imports a local folder or downloads a Hub model into the daemon's store.
    pub fn pull(&self, spec: &PullSpec) -> Result<PullReply> {
        let req = self.request(proto::PullRequest {
            model: spec.model.clone(),
            from_dir: spec
                .from_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            revision: spec.revision.clone().unwrap_or_default(),
            dtype: spec.dtype.clone().unwrap_or_default(),
            force: spec.force,
            compress: spec.compress,
        });
        self.call(|mut c| async move { c.pull(req).await })
    }

    /// Prewarms: makes `model` resident in `place` (`keep`: never evicted).
    pub fn load(&self, model: &str, place: Place, keep: bool) -> Result<LoadReply> {
        let req = self.request(proto::LoadRequest {
            model: model.into(),
            tier: place.to_string(),
            keep,
        });
        self.call(|mut c| async move { c.load(req).await })
    }

    /// Share mode: leases `model`'s copy in `place` (loading it if needed).
    pub fn acquire(&mut self, model: &str, place: Place) -> Result<Lease> {
        self.session_id()?;
        let req = self.request(proto::AcquireRequest {
            model: model.into(),
            tier: place.to_string(),
            no_tensors: false,
        });
        let r = self.call(|mut c| async move { c.acquire(req).await })?;
        let location = match r.location {
            Some(proto::acquire_reply::Location::Cuda(c)) => Location::Cuda {
                ipc_handle: c
                    .ipc_handle
                    .as_slice()
                    .try_into()
                    .map_err(|_| transport("an IPC handle is not 64 bytes"))?,
                device: c.device,
                size: c.size,
            },
            Some(proto::acquire_reply::Location::Shm(s)) => Location::Shm {
                path: PathBuf::from(s.path),
                offset: s.offset,
                size: s.size,
            },
            None => return Err(transport("the daemon sent no location")),
        };
        Ok(Lease {
            id: r.lease_id,
            model: r.model,
            tier: r.tier,
            bytes: r.bytes,
            served_from: r.served_from,
            seconds: r.seconds,
            tensors: r.tensors,
            location,
        })
    }

    /// Ends a lease.
    pub fn release(&mut self, lease: Lease) -> Result<()> {
        self.release_id(lease.id)
    }

    /// Ends a lease by id (it must belong to this client's session).
    pub fn release_id(&mut self, lease: u64) -> Result<()> {
        self.session_id()?;
        let req = self.request(proto::ReleaseRequest { lease_id: lease });
        self.call(|mut c| async move { c.release(req).await })
            .map(|_| ())
    }

    /// Copy mode: the daemon copies ranges of `model`'s image into the
    /// client's buffers, from `source` (`Auto`: the fastest copy).
    pub fn fill(&self, model: &str, source: Place, regions: &[Region]) -> Result<FillReply> {
        let regions = regions
            .iter()
            .map(|r| proto::Region {
                target: Some(match &r.target {
                    Target::Cuda { ipc_handle, device } => {
                        proto::region::Target::Cuda(proto::CudaTarget {
                            ipc_handle: ipc_handle.to_vec(),
                            device: *device,
                        })
                    }
                    Target::Shm(p) => proto::region::Target::ShmPath(p.display().to_string()),
                }),
                dst_offset: r.dst_offset,
                src_offset: r.src_offset,
                length: r.length,
            })
            .collect();
        let req = self.request(proto::FillRequest {
            model: model.into(),
            source_tier: source.to_string(),
            regions,
        });
        self.call(|mut c| async move { c.fill(req).await })
    }

    /// Copy mode into a new shared-memory file of this process holding the
    /// whole image (tensors at the offsets of [`Client::info`]'s table).
    /// The file is removed when the returned value is dropped.
    pub fn fill_shm(&self, model: &str) -> Result<(ShmFile, ModelInfo, FillReply)> {
        let info = self
            .info(model)?
            .ok_or_else(|| ClientError::UnknownModel(format!("{model} is not in the store")))?;
        let len = usize::try_from(info.image_bytes).map_err(|_| local("size exceeds memory"))?;
        let path = flash_sys::shm::default_shm_dir().join(format!(
            "flash-client-{}-{}",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        let file = ShmFile::create(&path, len)
            .map_err(|e| local(format!("creating {}: {e}", path.display())))?;
        let reply = self.fill(
            model,
            Place::Auto,
            &[Region {
                target: Target::Shm(path),
                dst_offset: 0,
                src_offset: 0,
                length: info.image_bytes,
            }],
        )?;
        Ok((file, info, reply))
    }

    /// Drops `model`'s copy from `place` (`Auto`: from every cache tier).
    pub fn unload(&self, model: &str, place: Place) -> Result<UnloadReply> {
        let req = self.request(proto::UnloadRequest {
            model: model.into(),
            tier: place.to_string(),
        });
        self.call(|mut c| async move { c.unload(req).await })
    }

    /// Removes `model` from the daemon's store: its copies first (refused
    /// while a client holds one), then its folder.
    pub fn remove(&self, model: &str) -> Result<RemoveReply> {
        let req = self.request(proto::RemoveRequest {
            model: model.into(),
        });
        self.call(|mut c| async move { c.remove(req).await })
    }

    /// Asks the daemon to stop (it finishes loads in flight first).
    pub fn shutdown(&self) -> Result<()> {
        let req = self.request(proto::ShutdownRequest {});
        self.call(|mut c| async move { c.shutdown(req).await })
            .map(|_| ())
    }
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            s.task.abort();
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_parse_and_print() {
        for (s, p) in [
            ("", Place::Auto),
            ("memory", Place::Memory),
            ("gpu", Place::Gpu(0)),
            ("gpu:3", Place::Gpu(3)),
        ] {
            assert_eq!(s.parse::<Place>().unwrap(), p);
        }
        assert_eq!(Place::Gpu(2).to_string(), "gpu:2");
        assert_eq!(Place::Auto.to_string(), "");
        assert!("disk".parse::<Place>().is_err());
        assert!("gpu:x".parse::<Place>().is_err());
    }

    #[test]
    fn no_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::connect(dir.path()).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("flash.sock") && msg.contains("flash start"),
            "{msg}"
        );
        // A socket file with nobody behind it.
        let _l = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET_FILE)).unwrap();
        drop(_l);
        let e = Client::connect(dir.path()).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
    }

    #[test]
    fn statuses_map_to_kinds() {
        use tonic::{Code, Status};
        let k = |c: Code| ClientError::from_status(Status::new(c, "m"));
        assert!(matches!(k(Code::NotFound), ClientError::UnknownModel(_)));
        assert!(matches!(
            k(Code::ResourceExhausted),
            ClientError::NoSpace(_)
        ));
        assert!(matches!(
            k(Code::InvalidArgument),
            ClientError::BadRequest(_)
        ));
        assert!(matches!(
            k(Code::Unauthenticated),
            ClientError::Unauthorized(_)
        ));
        assert!(matches!(k(Code::Internal), ClientError::Server(_)));
    }
}
