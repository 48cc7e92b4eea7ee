//! The daemon's inference engines ([`EngineHost`]): one engine per model
//! named in requests, built on the model's copy in a tier and kept between
//! requests.
//!
//! - **Where the weights are.** With a GPU tier, a request leases the
//!   model's copy on a GPU (a hit costs one lock; a miss swaps it in through
//!   the tiers: memory → GPU, or disk → GPU filling the memory tier on the
//!   way) and the GPU engine
//!   reads the weights **in place** in that `cuMemAlloc` allocation: the
//!   engine is *bound* to the lease for the request and *unbound* after, so
//!   an idle engine holds no lease and the tier may evict its copy under
//!   budget pressure; the next request leases it again (and the engine
//!   rebinds to wherever the copy now lies). The engine itself (kernels,
//!   cuBLAS, activations, KV cache) stays, its buffers counted in the GPU
//!   tier's budget (a reservation taken before they are allocated).
//!   Without a GPU, the CPU engine is built once from the memory tier's
//!   copy (leased while its weights are converted to f32, then released:
//!   the CPU engine owns its f32 weights).
//! - **One request at a time per engine.** Each model has a slot with a
//!   fair (FIFO) async mutex; a request waits for it, then runs on a
//!   blocking thread, and streams [`GenEvent`]s back through a channel.
//!   Requests for different models run side by side.
//! - **Engines are an LRU.** At most `max_engines` engines live (default 2,
//!   `FLASH_MAX_ENGINES`); building one more drops the least recently used
//!   idle engine (a busy one is never dropped).
//! - **Cancellation.** When the receiver is dropped (the HTTP client went
//!   away), generation stops at the next token, even while no text is
//!   streamed; a request still queued for its slot leaves the queue.
//! - **No request takes the daemon down.** The number of tokens is bounded
//!   by the model's context before anything is allocated
//!   ([`token_budget`]); the CPU engine's KV cache is reserved for the
//!   request fallibly (503 when the machine refuses); a panic on a
//!   request's thread is caught, answered with 500, and the engine it may
//!   have left half-updated is dropped (rebuilt by the next request).

use crate::server::DaemonHandle;
use flash_engine::generate::generate_cancellable;
use flash_engine::gpu::GpuWeights;
use flash_engine::{
    Backend, CpuModel, CpuOptions, EngineError, FinishReason, GenerateOptions, GpuEngine,
    GpuOptions, Message, ModelConfig, ModelTensors, SamplingRequest, TextTokenizer,
};
use flash_format::DType;
use flash_load::TensorView;
use flash_store::ModelName;
use flash_sys::cuda::{DeviceMemory, Gpu};
use flash_tier::{ClientId, Lease, ModelId, Reservation, Tier, TierError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

use crate::tiers::StoreTransfers;

/// The client id of the engines' own leases (shown in refusals as who holds
/// a copy). gRPC sessions count up from 1, so they never meet it.
pub const ENGINE_CLIENT: ClientId = ClientId(u64::MAX);

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text tokenized as is (with the tokenizer's special tokens, e.g. BOS).
    Text(String),
    /// Token ids, as is (checked against the model's vocabulary).
    Tokens(Vec<u32>),
    /// Messages through the model's chat template (with the generation
    /// prompt); a model without a template gets the contents joined by
    /// newlines, raw.
    Chat(Vec<Message>),
}

impl Prompt {
    /// The request field it came from, for error messages.
    pub fn param(&self) -> &'static str {
        match self {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) | Prompt::Tokens(_) => "prompt",
        }
    }
}

/// How many tokens a request may generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxTokens {
    /// The endpoint's default (not asked for): cut to the room the context
    /// leaves after the prompt.
    Default(usize),
    /// Asked for in the field `param` (`max_tokens` or
    /// `max_completion_tokens`): more than the context leaves is refused.
    Requested { n: u64, param: &'static str },
}

/// The tokens a request may generate on a model whose engine holds
/// `context` positions (`config_context`: its `max_position_embeddings`),
/// for a prompt of `prompt_len` tokens; or the 400 that says why none.
pub fn token_budget(
    model: &str,
    context: usize,
    config_context: usize,
    prompt_len: usize,
    max: MaxTokens,
    prompt_param: &str,
) -> Result<usize, ServeError> {
    let ctx = if context < config_context {
        format!(
            "a context of {context} tokens (this daemon's engine; the model's config allows \
             {config_context})"
        )
    } else {
        format!("a context of {context} tokens")
    };
    if prompt_len >= context {
        return Err(ServeError::invalid(
            prompt_param,
            Some("context_length_exceeded"),
            format!(
                "the prompt uses {prompt_len} tokens but model {model} has {ctx}: no room is left \
                 to generate. Please reduce the length of the {prompt_param}."
            ),
        ));
    }
    let room = context - prompt_len;
    match max {
        MaxTokens::Default(n) => Ok(n.min(room)),
        MaxTokens::Requested { n, .. } if n <= room as u64 => Ok(n as usize),
        MaxTokens::Requested { n, param } => Err(ServeError::invalid(
            param,
            Some("context_length_exceeded"),
            format!(
                "{param} is {n} but model {model} has {ctx} and the prompt uses {prompt_len}: at \
                 most {room} tokens can be generated. Please reduce {param} or the length of the \
                 {prompt_param}."
            ),
        )),
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// A store name (`ORG/NAME[@REV]`).
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: MaxTokens,
    pub sampling: SamplingRequest,
    pub stop: Vec<String>,
}

/// What the engine reports once the prompt is known (before the first token).
#[derive(Clone, Debug)]
pub struct Started {
    /// The store name of the model.
    pub model: String,
    pub prompt_token_ids: Vec<u32>,
    /// Where it runs: `"cpu"`, `"cuda:0 (NVIDIA H100 ...)"`.
    pub device: String,
}

/// The end of a generation, with its timings.
#[derive(Clone, Debug)]
pub struct Report {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Seconds the daemon spent making the model ready for this request:
    /// `resident_s` + `engine_s`.
    pub load_s: f64,
    /// Seconds to lease the model's copy (0 when the CPU engine already
    /// existed; near 0 on a hit; a swap through the tiers on a miss).
    pub resident_s: f64,
    /// Seconds to build the engine (kernels, buffers, f32 conversion on
    /// the CPU) or bind it to the copy's memory.
    pub engine_s: f64,
    /// Where the copy's bytes came from: the tier itself on a hit, else
    /// `memory` or `disk`; `engine` when a CPU engine was reused.
    pub served_from: String,
    /// Seconds from the request's arrival to the first token (queueing,
    /// load and prefill included).
    pub ttft_s: f64,
    /// Seconds spent waiting for the engine (another request ran).
    pub queue_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub tokens_per_s: f64,
    pub seed: u64,
}

/// What a request streams back: `Started`, then `Text` pieces, then `Done`;
/// or `Error` (at any point; nothing follows it).
#[derive(Debug)]
pub enum GenEvent {
    Started(Started),
    Text(String),
    Done(Box<Report>),
    Error(ServeError),
}

/// Why a request failed, with the HTTP status it maps to (and OpenAI's
/// error `type`, `param` and `code`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// 400: a malformed request; `param` names the field, `code` is
    /// OpenAI's (`invalid_type`, `context_length_exceeded`, ...).
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 404: the model is not in the store (or not a store name).
    #[error("{0}")]
    NotFound(String),
    /// 408: the request body did not arrive in time.
    #[error("{0}")]
    Timeout(String),
    /// 413: the request body is larger than the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 503: the tiers have no room for it now (leased or kept copies).
    #[error("{0}")]
    NoRoom(String),
    /// 503: the machine refused an allocation for this request (host or
    /// GPU memory); the daemon goes on.
    #[error("{0}")]
    OutOfMemory(String),
    /// 500: anything else (a damaged model, a device error, a panic).
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    /// A 400 without a named field.
    pub fn bad(message: impl Into<String>) -> Self {
        ServeError::BadRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A 400 about the field `param`.
    pub fn invalid(
        param: impl Into<String>,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ServeError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
            code,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ServeError::BadRequest { .. } => 400,
            ServeError::NotFound(_) => 404,
            ServeError::Timeout(_) => 408,
            ServeError::TooLarge(_) => 413,
            ServeError::NoRoom(_) | ServeError::OutOfMemory(_) => 503,
            ServeError::Internal(_) => 500,
        }
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::BadRequest { .. }
            | ServeError::NotFound(_)
            | ServeError::Timeout(_)
            | ServeError::TooLarge(_) => "invalid_request_error",
            ServeError::NoRoom(_) | ServeError::OutOfMemory(_) | ServeError::Internal(_) => {
                "server_error"
            }
        }
    }

    /// The request field at fault.
    pub fn param(&self) -> Option<&str> {
        match self {
            ServeError::BadRequest { param, .. } => param.as_deref(),
            ServeError::NotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// OpenAI's error `code` (or ours where OpenAI has none).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ServeError::BadRequest { code, .. } => *code,
            ServeError::NotFound(_) => Some("model_not_found"),
            ServeError::Timeout(_) => Some("request_timeout"),
            ServeError::TooLarge(_) => Some("request_too_large"),
            ServeError::NoRoom(_) => Some("no_room"),
            ServeError::OutOfMemory(_) => Some("out_of_memory"),
            ServeError::Internal(_) => None,
        }
    }

    fn from_tier(e: TierError) -> Self {
        match &e {
            TierError::Model { message, .. } if message.contains("not in the store") => {
                ServeError::NotFound(e.to_string())
            }
            _ if e.is_capacity() => ServeError::NoRoom(e.to_string()),
            _ => ServeError::Internal(e.to_string()),
        }
    }

    fn from_engine(e: EngineError) -> Self {
        match e {
            EngineError::ContextFull { .. } => ServeError::BadRequest {
                message: e.to_string(),
                param: None,
                code: Some("context_length_exceeded"),
            },
            EngineError::Invalid(_) => ServeError::bad(e.to_string()),
            e if e.is_out_of_memory() => ServeError::OutOfMemory(e.to_string()),
            e => ServeError::Internal(e.to_string()),
        }
    }

    /// An engine that could not be built or bound: the model's fault
    /// (500), or memory the machine does not have now (503).
    fn from_build(id: &ModelId, e: EngineError) -> Self {
        if e.is_out_of_memory() {
            ServeError::OutOfMemory(format!("{id}: {e}"))
        } else {
            ServeError::Internal(format!("{id}: {e}"))
        }
    }

    /// [`ServeError::from_engine`] with the model's name in front.
    fn from_engine_of(id: &ModelId, e: EngineError) -> Self {
        match ServeError::from_engine(e) {
            ServeError::OutOfMemory(m) => ServeError::OutOfMemory(format!("{id}: {m}")),
            ServeError::Internal(m) => ServeError::Internal(format!("{id}: {m}")),
            other => other,
        }
    }
}

/// Runs `f` on a slot's engine; a panic in it becomes a 500 and the engine
/// is dropped (it may be half-updated: the next request builds a new one),
/// so neither the daemon nor the model's slot goes down with a request.
fn contain<E>(
    model: &str,
    engine: &mut Option<E>,
    f: impl FnOnce(&mut Option<E>) -> Result<(), ServeError>,
) -> Result<(), ServeError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *engine))) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            tracing::error!(%model, %why, "a request's engine thread panicked: engine dropped");
            // Dropping the engine could panic again (a device in a bad
            // state); that one is contained too.
            let old = engine.take();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(old)));
            Err(ServeError::Internal(format!(
                "the engine of {model} failed on this request ({why}); it is rebuilt for the \
                 next request"
            )))
        }
    }
}

/// A model's copy on a GPU, leased for one request: the GPU engine reads
/// its weights in place while it is bound to it.
struct LeasedWeights {
    lease: Lease<StoreTransfers>,
    tensors: HashMap<String, TensorView>,
}

impl GpuWeights for LeasedWeights {
    fn memory(&self) -> &DeviceMemory {
        match self.lease.gpu() {
            Some(m) => m,
            // Built only from GPU leases (checked in `LeasedWeights::new`).
            None => unreachable!("a GPU lease without its device memory"),
        }
    }

    fn tensor(&self, name: &str) -> Option<&TensorView> {
        self.tensors.get(name)
    }
}

impl LeasedWeights {
    fn new(lease: Lease<StoreTransfers>, tensors: Vec<TensorView>) -> Result<Self, ServeError> {
        if lease.gpu().is_none() {
            return Err(ServeError::Internal(format!(
                "the lease of {} in {} has no device memory",
                lease.model(),
                lease.tier()
            )));
        }
        Ok(LeasedWeights {
            lease,
            tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
        })
    }
}

enum EngineKind {
    Cpu(Box<CpuModel>),
    Gpu {
        engine: Box<GpuEngine>,
        gpu: u16,
        /// The engine's buffers in the GPU tier's budget; released after
        /// the engine (fields drop in order).
        _room: Reservation<StoreTransfers>,
    },
}

/// A model's engine: tokenizer, template and backend with its KV cache.
struct Engine {
    cfg: ModelConfig,
    tok: Arc<TextTokenizer>,
    kind: EngineKind,
    /// The model's epoch it was built at (`DaemonHandle::fresh`): another
    /// epoch means the store replaced the model since, and the engine's
    /// weights or tokenizer are stale.
    epoch: u64,
}

/// A model's place in the host: its engine (when built) behind a FIFO lock.
struct Slot {
    engine: Arc<tokio::sync::Mutex<Option<Engine>>>,
    last_used: AtomicU64,
}

/// Builds, keeps and runs the engines of the daemon. Cheap to clone.
#[derive(Clone)]
pub struct EngineHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    daemon: DaemonHandle,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    clock: AtomicU64,
    max_engines: usize,
    /// GPU engines' options (KV cache size).
    gpu_opts: GpuOptions,
}

/// Prepares, once and in the background from the daemon's start, what the
/// first request on each GPU would otherwise pay for: the decoder of
/// compressed models and the engine's kernels (from the kernel cache, or
/// compiled), cuBLAS's libraries (hundreds of MB read from disk on a cold
/// start; the process keeps them loaded) and its kernels for the GEMMs of a
/// prefill ([`flash_kernels::blas::Blas::warm_up`]). Building an engine then
/// costs its own buffers and a cuBLAS handle. Failures are logged: the
/// request that needs the piece makes it and reports why it cannot.
pub fn warm_up(daemon: &DaemonHandle) {
    let Some(cuda) = daemon.cuda() else {
        return;
    };
    let gpus: Vec<Gpu> = (0..cuda.device_count())
        .filter_map(|i| cuda.device(i).ok())
        .collect();
    let daemon = daemon.clone();
    let spawned = std::thread::Builder::new()
        .name("flash-warm-up".into())
        .spawn(move || {
            for gpu in gpus {
                let t = Instant::now();
                let decoder = daemon.tiers().transfers().decoder(&gpu);
                let decoder_ok = decoder.get().is_some_and(Option::is_some);
                let cache = flash_kernels::default_kernel_cache(Some(daemon.home()));
                let kernels = flash_kernels::ops::Kernels::load(&gpu, cache.as_deref())
                    .map(|k| k.info().cache_hit);
                let blas = gpu.stream().and_then(|s| {
                    let blas = flash_kernels::blas::Blas::new(&s)?;
                    blas.warm_up()
                });
                tracing::info!(
                    gpu = gpu.ordinal(),
                    decoder = decoder_ok,
                    kernels = ?kernels,
                    cublas = ?blas.as_ref().map(|_| ()),
                    seconds = t.elapsed().as_secs_f64(),
                    "GPU prepared for the first request"
                );
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no warm-up thread: {e}");
    }
}

/// Most engines alive at once: `FLASH_MAX_ENGINES`, else 2.
fn max_engines_from_env() -> usize {
    std::env::var("FLASH_MAX_ENGINES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

impl EngineHost {
    pub fn new(daemon: DaemonHandle) -> Self {
        let kernel_cache = flash_kernels::default_kernel_cache(Some(daemon.home()));
        EngineHost {
            inner: Arc::new(HostInner {
                daemon,
                slots: Mutex::new(HashMap::new()),
                clock: AtomicU64::new(0),
                max_engines: max_engines_from_env(),
                // The kernel cache in the daemon's home, where `warm_up`
                // and the decoder of compressed models keep theirs.
                gpu_opts: GpuOptions {
                    kernel_cache,
                    ..GpuOptions::default()
                },
            }),
        }
    }

    pub fn daemon(&self) -> &DaemonHandle {
        &self.inner.daemon
    }

    /// The store's models, by name (for `/v1/models`), with their import
    /// times (seconds since the epoch, 0 when unknown).
    pub fn models(&self) -> Result<Vec<(String, u64)>, ServeError> {
        let store = self.inner.daemon.tiers().transfers().store();
        let list = store
            .list()
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        Ok(list
            .into_iter()
            .map(|m| {
                let created = std::fs::metadata(&m.path)
                    .and_then(|md| md.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                (m.model_id, created)
            })
            .collect())
    }

    /// The canonical store name of `model`, or why it cannot be served.
    /// Names are parsed before the store is looked at, and a parsed name
    /// cannot leave the store's folder (no `..`, `/` or leading `.` in its
    /// parts): a path-like name is a 404, never a file access elsewhere.
    pub fn check_model(&self, model: &str) -> Result<String, ServeError> {
        let name: ModelName = model.parse().map_err(|e: flash_store::name::NameError| {
            let shown: String = match model.char_indices().nth(100) {
                Some((i, _)) => format!("{}…", &model[..i]),
                None => model.to_string(),
            };
            ServeError::NotFound(format!(
                "The model {shown:?} does not exist: it is not a store name ({}; names are \
                 ORG/NAME, see GET /v1/models)",
                e.why
            ))
        })?;
        let store = self.inner.daemon.tiers().transfers().store();
        if !store.contains(&name) {
            return Err(ServeError::NotFound(format!(
                "The model {name} does not exist in the daemon's store (see GET /v1/models or \
                 `flash list`; `flash pull {name}` adds it)"
            )));
        }
        Ok(name.to_string())
    }

    /// Starts `req`: returns the stream of its events. The request waits for
    /// its model's engine (one request at a time per engine), then runs on
    /// a blocking thread. Dropping the receiver cancels it.
    pub fn submit(&self, req: GenRequest) -> mpsc::UnboundedReceiver<GenEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let host = self.clone();
        let arrived = Instant::now();
        tokio::spawn(async move {
            let name = match host.check_model(&req.model) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(GenEvent::Error(e));
                    return;
                }
            };
            let slot = host.slot(&name);
            // A client that goes away while queued leaves the queue.
            let guard = tokio::select! {
                g = slot.engine.clone().lock_owned() => g,
                _ = tx.closed() => return,
            };
            let queue_s = arrived.elapsed().as_secs_f64();
            let h = host.clone();
            let tx2 = tx.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let mut guard = guard;
                contain(&name, &mut guard, |engine| {
                    h.run(&name, engine, &slot, req, arrived, queue_s, &tx2)
                })
            })
            .await;
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = tx.send(GenEvent::Error(e));
                }
                Err(e) => {
                    let _ = tx.send(GenEvent::Error(ServeError::Internal(format!(
                        "the engine's thread failed: {e}"
                    ))));
                }
            }
        });
        rx
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    engine: Arc::new(tokio::sync::Mutex::new(None)),
                    last_used: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Drops least recently used idle engines until fewer than
    /// `max_engines` remain besides `keep`'s.
    fn make_room(&self, keep: &str) {
        let slots: Vec<(String, Arc<Slot>)> = {
            let s = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            s.iter()
                .filter(|(k, _)| k.as_str() != keep)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut built: Vec<(u64, String, Arc<Slot>)> = Vec::new();
        let mut busy = 0;
        for (name, slot) in slots {
            match slot.engine.try_lock() {
                Ok(g) if g.is_some() => {
                    built.push((slot.last_used.load(Ordering::Relaxed), name, slot.clone()))
                }
                Ok(_) => {}
                Err(_) => busy += 1,
            }
        }
        built.sort_by_key(|(t, _, _)| *t);
        let mut alive = built.len() + busy;
        for (_, name, slot) in built {
            if alive < self.inner.max_engines {
                break;
            }
            if let Ok(mut g) = slot.engine.try_lock() {
                if g.take().is_some() {
                    tracing::info!(model = %name, "engine dropped (least recently used)");
                    alive -= 1;
                }
            }
        }
    }

    /// The GPU a model's engine runs on: one that holds the model, else 0;
    /// `None` without a GPU tier, or for a model that is not all bf16 (the
    /// GPU engine reads bf16 weights; others run on the CPU engine).
    fn gpu_for(&self, id: &ModelId) -> Option<u16> {
        let tiers = self.inner.daemon.tiers();
        if !tiers.tiers().iter().any(|t| matches!(t, Tier::Gpu(_))) {
            return None;
        }
        let bf16 = tiers
            .transfers()
            .tensors(id)
            .map(|ts| ts.iter().all(|t| t.dtype == DType::BF16))
            .unwrap_or(true);
        if !bf16 {
            tracing::info!(model = %id, "not bf16: served by the CPU engine");
            return None;
        }
        let here = tiers.locate(id).into_iter().find_map(|t| match t {
            Tier::Gpu(g) => Some(g),
            _ => None,
        });
        Some(here.unwrap_or(0))
    }

    fn acquire(&self, id: &ModelId, tier: Tier) -> Result<Lease<StoreTransfers>, ServeError> {
        self.inner
            .daemon
            .tiers()
            .acquire(id, tier, ENGINE_CLIENT)
            .map_err(ServeError::from_tier)
    }

    /// Runs one request on its model's engine (blocking thread).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        name: &str,
        slot_engine: &mut Option<Engine>,
        slot: &Slot,
        req: GenRequest,
        arrived: Instant,
        queue_s: f64,
        tx: &mpsc::UnboundedSender<GenEvent>,
    ) -> Result<(), ServeError> {
        slot.last_used.store(
            self.inner.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let id = ModelId::new(name);
        let t0 = Instant::now();
        // A model replaced or removed in the store since: its copies are
        // dropped (refused while leased) and an engine built on it goes.
        let epoch = self.inner.daemon.fresh(&id).map_err(ServeError::NoRoom)?;
        if slot_engine.as_ref().is_some_and(|e| e.epoch != epoch) {
            *slot_engine = None;
        }
        if slot_engine.is_none() {
            // The tokenizer parses while the weights are made resident.
            self.inner.daemon.prefetch_text(&id, epoch);
        }
        let mut resident_s = 0.0;
        let mut engine_s = 0.0;
        let mut served_from = String::from("engine");
        let mut weights: Option<Arc<LeasedWeights>> = None;

        match self.gpu_for(&id) {
            Some(gpu) => {
                let lease = self.acquire(&id, Tier::Gpu(gpu))?;
                resident_s = t0.elapsed().as_secs_f64();
                served_from = lease.served_from().to_string();
                let tensors = self
                    .inner
                    .daemon
                    .tiers()
                    .transfers()
                    .tensors(&id)
                    .map_err(ServeError::from_tier)?;
                weights = Some(Arc::new(LeasedWeights::new(lease, tensors)?));
            }
            None => {
                if slot_engine.is_none() {
                    let lease = self.acquire(&id, Tier::Memory)?;
                    resident_s = t0.elapsed().as_secs_f64();
                    served_from = lease.served_from().to_string();
                    let t1 = Instant::now();
                    self.make_room(name);
                    *slot_engine = Some(self.build_cpu(&id, &lease, epoch)?);
                    drop(lease);
                    engine_s = t1.elapsed().as_secs_f64();
                }
            }
        }

        if let Some(w) = &weights {
            let t1 = Instant::now();
            let gpu = match w.lease.tier() {
                Tier::Gpu(g) => g,
                _ => 0,
            };
            let rebuild = !matches!(slot_engine, Some(Engine { kind: EngineKind::Gpu { gpu: g, .. }, .. }) if *g == gpu);
            if rebuild {
                *slot_engine = None;
                self.make_room(name);
                *slot_engine = Some(self.build_gpu(&id, w.clone(), gpu, epoch)?);
            } else if let Some(Engine {
                kind: EngineKind::Gpu { engine, .. },
                ..
            }) = slot_engine
            {
                engine
                    .bind(w.clone())
                    .map_err(|e| ServeError::from_build(&id, e))?;
            }
            engine_s = t1.elapsed().as_secs_f64();
        }
        drop(weights);

        let Some(engine) = slot_engine.as_mut() else {
            return Err(ServeError::Internal(format!("no engine for {name}")));
        };
        let result = generate_on(engine, name, req, tx, |g| Report {
            token_ids: g.token_ids.clone(),
            text: g.text.clone(),
            finish_reason: g.finish_reason,
            load_s: resident_s + engine_s,
            resident_s,
            engine_s,
            served_from: served_from.clone(),
            ttft_s: 0.0,
            queue_s,
            prefill_s: g.prefill_s,
            decode_s: g.decode_s,
            tokens_per_s: g.tokens_per_s(),
            seed: g.seed,
        });
        // The lease goes back as soon as the request ends: an idle engine
        // never keeps its copy from being evicted.
        if let EngineKind::Gpu { engine, .. } = &mut engine.kind {
            engine.unbind();
        }
        let mut report = result?;
        // ttft: from arrival; the engine measured from its own start.
        report.ttft_s += (t0 - arrived).as_secs_f64() + report.load_s;
        let _ = tx.send(GenEvent::Done(Box::new(report)));
        Ok(())
    }

    /// `id`'s config and tokenizer at `epoch` (parsed ahead when they could
    /// be, see [`crate::text`]).
    fn text_parts(
        &self,
        id: &ModelId,
        epoch: u64,
    ) -> Result<(ModelConfig, Arc<TextTokenizer>), ServeError> {
        let t = Instant::now();
        let parts = self
            .inner
            .daemon
            .text_parts(id, epoch)
            .map_err(ServeError::Internal)?;
        tracing::debug!(model = %id, waited_s = t.elapsed().as_secs_f64(), "text side ready");
        Ok((parts.cfg.clone(), parts.tok.clone()))
    }

    /// The CPU engine of `id` from its memory-tier copy (converted to f32).
    fn build_cpu(
        &self,
        id: &ModelId,
        lease: &Lease<StoreTransfers>,
        epoch: u64,
    ) -> Result<Engine, ServeError> {
        let (cfg, tok) = self.text_parts(id, epoch)?;
        let Some(image) = lease.memory() else {
            return Err(ServeError::Internal(format!(
                "the memory lease of {id} has no buffer"
            )));
        };
        let plan = self
            .inner
            .daemon
            .tiers()
            .transfers()
            .plan(id)
            .map_err(ServeError::from_tier)?;
        let by_name: HashMap<&str, &TensorView> =
            plan.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let views = ModelTensors::resolve(&cfg, |n| by_name.get(n).copied())
            .map_err(|e| ServeError::Internal(format!("{id}: {e}")))?;
        let bytes: &[u8] = image;
        let w = views
            .try_map(|n, t| {
                // A compressed model's memory copy holds its stored bytes:
                // the tensor is decoded from it first.
                let range = t.offset..t.offset + t.length;
                let decoded;
                let b = if plan.is_encoded() {
                    let mut out = Vec::new();
                    out.try_reserve_exact(t.length as usize).map_err(|_| {
                        EngineError::OutOfMemory {
                            what: format!("decoding tensor {n}"),
                            bytes: t.length,
                        }
                    })?;
                    out.resize(t.length as usize, 0);
                    flash_load::decode::decode_range(&plan, bytes, range, &mut out)
                        .map_err(|e| EngineError::Invalid(format!("tensor {n}: {e}")))?;
                    decoded = out;
                    &decoded[..]
                } else {
                    bytes
                        .get(range.start as usize..range.end as usize)
                        .ok_or_else(|| {
                            EngineError::Invalid(format!(
                                "tensor {n} lies outside the model's image"
                            ))
                        })?
                };
                flash_engine::weights::to_f32(n, t.dtype, b)
            })
            .map_err(|e| ServeError::from_build(id, e))?;
        let model = CpuModel::new(cfg.clone(), w, &CpuOptions::default())
            .map_err(|e| ServeError::from_build(id, e))?;
        tracing::info!(model = %id, "CPU engine built");
        Ok(Engine {
            cfg,
            tok,
            kind: EngineKind::Cpu(Box::new(model)),
            epoch,
        })
    }

    /// The GPU engine of `id` on its copy in GPU `gpu`'s tier (in place).
    fn build_gpu(
        &self,
        id: &ModelId,
        weights: Arc<LeasedWeights>,
        gpu: u16,
        epoch: u64,
    ) -> Result<Engine, ServeError> {
        let t0 = Instant::now();
        let (cfg, tok) = self.text_parts(id, epoch)?;
        let text_s = t0.elapsed().as_secs_f64();
        // The engine's buffers come out of the GPU tier's budget, like the
        // copies beside it: room is made (idle copies evicted) or the
        // request is refused with what holds the tier, before any
        // allocation can fail.
        let bytes = self.inner.gpu_opts.engine_bytes(&cfg);
        let room = self
            .inner
            .daemon
            .tiers()
            .reserve(Tier::Gpu(gpu), bytes, id, ENGINE_CLIENT)
            .map_err(ServeError::from_tier)?;
        let t1 = Instant::now();
        let engine = GpuEngine::with_weights(cfg.clone(), weights, &self.inner.gpu_opts)
            .map_err(|e| ServeError::from_build(id, e))?;
        tracing::info!(
            model = %id,
            gpu,
            reserved = bytes,
            text_s,
            room_s = (t1 - t0).as_secs_f64() - text_s,
            engine_s = t1.elapsed().as_secs_f64(),
            "GPU engine built"
        );
        Ok(Engine {
            cfg,
            tok,
            kind: EngineKind::Gpu {
                engine: Box::new(engine),
                gpu,
                _room: room,
            },
            epoch,
        })
    }
}

/// The prompt's token ids for `engine`.
fn prompt_ids(name: &str, engine: &Engine, prompt: &Prompt) -> Result<Vec<u32>, ServeError> {
    let tok = &engine.tok;
    let param = prompt.param();
    let encode = |text: &str, special: bool| {
        tok.encode(text, special)
            .map_err(|e| ServeError::invalid(param, None, e.to_string()))
    };
    let ids = match prompt {
        Prompt::Tokens(ids) => {
            let vocab = engine.cfg.vocab_size;
            if let Some((i, bad)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
                return Err(ServeError::invalid(
                    format!("prompt[{i}]"),
                    Some("invalid_value"),
                    format!(
                        "Invalid 'prompt[{i}]': token id {bad} is outside the vocabulary of \
                         model {name} (ids 0 to {})",
                        vocab.saturating_sub(1)
                    ),
                ));
            }
            ids.clone()
        }
        Prompt::Text(t) => encode(t, true)?,
        Prompt::Chat(messages) => {
            if tok.has_chat_template() {
                let text = tok
                    .apply_chat_template(messages, true)
                    .map_err(|e| ServeError::invalid(param, None, e.to_string()))?;
                encode(&text, false)?
            } else {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                encode(&text.join("\n"), true)?
            }
        }
    };
    if ids.is_empty() {
        return Err(ServeError::invalid(
            param,
            None,
            "the prompt is empty (no tokens to start from)",
        ));
    }
    Ok(ids)
}

fn generate_on(
    engine: &mut Engine,
    name: &str,
    req: GenRequest,
    tx: &mpsc::UnboundedSender<GenEvent>,
    report: impl FnOnce(&flash_engine::Generation) -> Report,
) -> Result<Report, ServeError> {
    let ids = prompt_ids(name, engine, &req.prompt)?;
    let sampling = req.sampling.resolve(&engine.cfg.generation);
    sampling.validate().map_err(ServeError::bad)?;
    let config_context = engine.cfg.max_position_embeddings;
    let Engine { tok, kind, .. } = engine;
    let backend: &mut dyn Backend = match kind {
        EngineKind::Cpu(m) => {
            let context = m.max_seq_len();
            let max_tokens = token_budget(
                name,
                context,
                config_context,
                ids.len(),
                req.max_tokens,
                req.prompt.param(),
            )?;
            // The KV cache for this request, reserved up front: a machine
            // without the memory answers 503 here instead of aborting later.
            m.reset();
            m.reserve(ids.len() + max_tokens)
                .map_err(|e| ServeError::from_engine_of(&ModelId::new(name), e))?;
            return run_generation(m.as_mut(), tok, ids, max_tokens, &req, name, tx, report);
        }
        EngineKind::Gpu { engine, .. } => engine.as_mut(),
    };
    let max_tokens = token_budget(
        name,
        backend.max_seq_len(),
        config_context,
        ids.len(),
        req.max_tokens,
        req.prompt.param(),
    )?;
    run_generation(backend, tok, ids, max_tokens, &req, name, tx, report)
}

#[allow(clippy::too_many_arguments)]
fn run_generation(
    backend: &mut dyn Backend,
    tok: &TextTokenizer,
    ids: Vec<u32>,
    max_tokens: usize,
    req: &GenRequest,
    name: &str,
    tx: &mpsc::UnboundedSender<GenEvent>,
    report: impl FnOnce(&flash_engine::Generation) -> Report,
) -> Result<Report, ServeError> {
    let cfg = backend.config();
    let opts = GenerateOptions {
        max_tokens,
        sampling: req.sampling.resolve(&cfg.generation),
        stop_strings: req.stop.clone(),
        eos_token_ids: cfg.eos_token_ids.clone(),
        keep_prompt_logits: false,
    };
    let _ = tx.send(GenEvent::Started(Started {
        model: name.to_string(),
        prompt_token_ids: ids.clone(),
        device: backend.device(),
    }));
    let mut on_text = |piece: &str| tx.send(GenEvent::Text(piece.to_string())).is_ok();
    // The client went away (its receiver is gone): stop at the next token.
    let mut cancelled = || tx.is_closed();
    let g = generate_cancellable(backend, tok, &ids, &opts, &mut on_text, &mut cancelled)
        .map_err(|e| ServeError::from_engine_of(&ModelId::new(name), e))?;
    if g.finish_reason == FinishReason::Cancelled {
        tracing::info!(
            model = %name,
            tokens = g.token_ids.len(),
            max_tokens,
            "request cancelled: the client went away"
        );
    }
    let mut r = report(&g);
    r.ttft_s = g.ttft_s;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_bounded_by_the_context() {
        let req = |n| MaxTokens::Requested {
            n,
            param: "max_tokens",
        };
        assert_eq!(
            token_budget("o/m", 100, 100, 12, req(88), "prompt").unwrap(),
            88
        );
        assert_eq!(
            token_budget("o/m", 100, 100, 12, MaxTokens::Default(512), "prompt").unwrap(),
            88
        );
        assert_eq!(
            token_budget("o/m", 100, 100, 12, MaxTokens::Default(16), "prompt").unwrap(),
            16
        );
        let e =
            token_budget("o/m", 40960, 40960, 12, req(1_000_000_000_000), "prompt").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.param(), Some("max_tokens"));
        assert_eq!(e.code(), Some("context_length_exceeded"));
        let m = e.to_string();
        assert!(
            m.starts_with(
                "max_tokens is 1000000000000 but model o/m has a context of 40960 tokens and \
                 the prompt uses 12: at most 40948 tokens"
            ),
            "{m}"
        );
        let e = token_budget("o/m", 100, 100, 12, req(89), "messages").unwrap_err();
        assert!(e.to_string().contains("at most 88"), "{e}");
        // A prompt that fills the context leaves nothing, even by default.
        let e = token_budget("o/m", 100, 100, 100, MaxTokens::Default(16), "messages").unwrap_err();
        assert_eq!(e.param(), Some("messages"));
        assert_eq!(e.code(), Some("context_length_exceeded"));
        assert!(e.to_string().contains("uses 100 tokens"), "{e}");
        // An engine holding less than the model's context says so.
        let e = token_budget("o/m", 8192, 40960, 1, req(9000), "prompt").unwrap_err();
        assert!(e.to_string().contains("config allows 40960"), "{e}");
    }

    #[test]
    fn a_panic_in_a_request_is_an_error_and_the_slot_stays_usable() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let slot = Arc::new(tokio::sync::Mutex::new(Some(7u32)));
            let guard = slot.clone().lock_owned().await;
            let r = tokio::task::spawn_blocking(move || {
                let mut guard = guard;
                contain("o/m", &mut guard, |e| {
                    *e = Some(8);
                    panic!("index out of bounds");
                })
            })
            .await
            .expect("the blocking task itself does not fail");
            let e = r.unwrap_err();
            assert_eq!(e.status(), 500);
            assert!(e.to_string().contains("index out of bounds"), "{e}");
            // The slot is free again and its (maybe half-updated) engine gone.
            let mut g = tokio::time::timeout(std::time::Duration::from_secs(5), slot.lock())
                .await
                .expect("the slot was left locked");
            assert_eq!(*g, None);
            // The next request runs normally.
            contain("o/m", &mut g, |e| {
                *e = Some(9);
                Ok(())
            })
            .unwrap();
            assert_eq!(*g, Some(9));
            // Errors pass through untouched.
            let e = contain("o/m", &mut g, |_| Err(ServeError::bad("no"))).unwrap_err();
            assert_eq!(e.status(), 400);
            assert_eq!(*g, Some(9));
        });
    }
}
