//! The gRPC service `flash.v1.Flash` (generated in `flash-client`): each
//! call's request checked and mapped onto the store or the tier manager,
//! run on `spawn_blocking`, and answered with its reply; tier and store
//! errors mapped onto gRPC codes the client turns back into `ClientError`
//! kinds. The calls that hand out memory (`Acquire`, `Fill`, `Release`)
//! and the session table they use are `lease`'s: this module only carries
//! them to and from the wire.

use crate::lease;
use crate::server::Daemon;
use flash_client::proto;
use flash_client::proto::flash_server::Flash;
use flash_client::SESSION_HEADER;
use flash_store::{DtypeChoice, ImportOptions, ModelName, RankedName, StoreError};
use flash_tier::{ClientId, ModelId, Tier, TierError};
use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

/// The service the listeners serve: every connection's calls reach the one
/// daemon state.
#[derive(Clone)]
pub(crate) struct Service {
    d: Arc<Daemon>,
}

impl Service {
    pub(crate) fn new(d: Arc<Daemon>) -> Self {
        Service { d }
    }
}

/// The gRPC code of a tier refusal: no room is `RESOURCE_EXHAUSTED`, a bad
/// tier or lease `INVALID_ARGUMENT`, a copy in use `FAILED_PRECONDITION`.
pub(crate) fn status_of(e: &TierError) -> Status {
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

/// The gRPC code of a store error: an absent model is `NOT_FOUND`.
fn store_status(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Name(_) | StoreError::Split { .. } => Status::invalid_argument(msg),
        StoreError::Exists(_) => Status::already_exists(msg),
        _ => Status::internal(msg),
    }
}

/// Runs `f` on a blocking thread: the store and the tier manager block
/// (loads take seconds), the reactor must not.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the request's thread failed: {e}")))?
}

/// The session a lease request belongs to (its `flash-session` metadata).
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

/// The tensor table of `model`'s image, as replies list it.
pub(crate) fn tensors_of(d: &Daemon, model: &ModelId) -> Result<Vec<proto::TensorInfo>, Status> {
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
    /// The store name (and rank, `ORG/NAME#R`) of a request's model,
    /// checked, and the id of its image in the tiers; NOT_FOUND when absent.
    pub(crate) fn model(&self, s: &str) -> Result<(RankedName, ModelId), Status> {
        let ranked: RankedName = s
            .parse()
            .map_err(|e: flash_store::name::NameError| Status::invalid_argument(e.to_string()))?;
        let id = ModelId::new(ranked.to_string());
        // A model replaced or removed since its copies were made: they go
        // first (refused while leased).
        self.fresh
            .check(&self.tiers, &id)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let name = &ranked.name;
        if !self.store.contains(name) {
            return Err(Status::not_found(format!(
                "model {name} is not in the store (see `flash list`)"
            )));
        }
        if let Some(rank) = ranked.rank {
            let ranks = self.ranks(name)?;
            if rank >= ranks {
                return Err(Status::invalid_argument(if ranks == 1 {
                    format!("{id}: {name} is not split into ranks (`flash pull --tp N`); name it without '#'")
                } else {
                    format!(
                        "{id}: {name} has {ranks} tensor-parallel ranks (#0 to #{})",
                        ranks - 1
                    )
                }));
            }
        }
        Ok((ranked, id))
    }

    /// As [`Daemon::model`], for requests on a model's image in a tier: a
    /// model split into ranks has one image per rank, so the request must
    /// name one.
    pub(crate) fn model_image(&self, s: &str) -> Result<(RankedName, ModelId), Status> {
        let (ranked, id) = self.model(s)?;
        if ranked.rank.is_none() {
            let name = &ranked.name;
            let ranks = self.ranks(name)?;
            if ranks > 1 {
                return Err(Status::invalid_argument(format!(
                    "{name} is split into {ranks} tensor-parallel ranks, one image per GPU: \
                     name one as {name}#R (R from 0 to {})",
                    ranks - 1
                )));
            }
        }
        Ok((ranked, id))
    }

    /// How many tensor-parallel ranks `name` is stored as (1: not split).
    fn ranks(&self, name: &ModelName) -> Result<u32, Status> {
        let dir = self.store.existing(name).map_err(store_status)?;
        flash_load::ModelSource::ranks(&dir).map_err(|e| Status::internal(format!("{name}: {e}")))
    }

    /// Unloads the copies of `name` and of each of its ranks from `tier`,
    /// or from every tier (before the store replaces or removes it): all or
    /// nothing per image, refused while a client holds one.
    pub(crate) fn unload_everywhere(
        &self,
        name: &ModelName,
        tier: Option<Tier>,
    ) -> Result<Vec<(Tier, u64)>, Status> {
        let base = name.to_string();
        let mut ids: Vec<ModelId> = vec![ModelId::new(base.clone())];
        for t in self.tiers.status().tiers {
            for m in t.models {
                let of_name = m
                    .model
                    .as_str()
                    .parse::<RankedName>()
                    .is_ok_and(|r| r.rank.is_some() && r.name == *name);
                if of_name && !ids.contains(&m.model) {
                    ids.push(m.model);
                }
            }
        }
        let mut freed = Vec::new();
        for id in &ids {
            freed.extend(self.tiers.unload(id, tier).map_err(|e| status_of(&e))?);
            if tier.is_none() {
                self.tiers.transfers().forget(id);
            }
        }
        Ok(freed)
    }

    /// The tier a request names; empty or `auto`: GPU 0 when there is one,
    /// else the memory tier.
    pub(crate) fn tier(&self, s: &str) -> Result<Tier, Status> {
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
}

#[tonic::async_trait]
impl Flash for Service {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<tonic::Streaming<proto::SessionPing>>,
    ) -> Result<Response<SessionStream>, Status> {
        let d = self.d.clone();
        let id = lease::open_session(&d);
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
            let leases = lease::end_session(&d, id);
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
            let (ranked, id) = d.model(&r.model)?;
            let name = &ranked.name;
            let info = d.store.info(name).map_err(store_status)?;
            let mut out = model_info(&d, info, &id);
            // A split model named without a rank has no one image: its
            // facts only (each rank's with `#R`).
            let one_image = ranked.rank.is_some() || d.ranks(name)? == 1;
            if one_image {
                out.image_bytes = d
                    .tiers
                    .transfers()
                    .decoded_bytes(&id)
                    .map_err(|e| status_of(&e))?;
                if r.tensors {
                    out.tensors = tensors_of(&d, &id)?;
                }
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
            let (ranked, id) = d.model_image(&r.model)?;
            let tier = d.tier(&r.tier)?;
            if ranked.rank.is_none() && !d.http.is_empty() {
                // A model put in a tier is about to be served: its tokenizer
                // parses while it loads, so that a request sent as soon as
                // the load returns finds it ready.
                if let Ok(epoch) = d.fresh.check(&d.tiers, &id) {
                    d.prefetch_text(&id, epoch);
                }
            }
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
        let res = blocking(move || lease::acquire(&d, session, r)).await;
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
        let res = blocking(move || lease::fill(&d, session, r)).await;
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
        blocking(move || lease::release(&d, session, lease))
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
            let (ranked, id) = d.model(&r.model)?;
            let tier = if r.tier.is_empty() {
                None
            } else {
                Some(d.tier(&r.tier)?)
            };
            // A model named without a rank: its ranks' images too.
            let freed = if ranked.rank.is_none() {
                d.unload_everywhere(&ranked.name, tier)?
            } else {
                d.tiers.unload(&id, tier).map_err(|e| status_of(&e))?
            };
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
            let (ranked, id) = d.model(&r.model)?;
            let name = ranked.name;
            if ranked.rank.is_some() {
                return Err(Status::invalid_argument(format!(
                    "{id}: remove the model ({name}), not one of its ranks"
                )));
            }
            // The copies first (every rank's): a client holding one keeps
            // the model.
            let freed = d.unload_everywhere(&name, None)?;
            d.store.remove(&name).map_err(store_status)?;
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

/// A store model's facts, with the tiers holding a copy of it.
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

/// The daemon's status: `Status`'s reply, and what `/metrics` is written from.
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
                reserved: t.reserved,
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
                        popularity: m.popularity,
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
        disk_loads_limit: st.disk_loads_limit as u32,
        disk_loads_reading: st.disk_reading as u32,
        disk_loads_waiting: st.disk_waiting as u32,
        gpus: (d.tiers.tiers().len() - 1) as u32,
    }
}

/// Imports a model from the Hub or a folder (`Pull`); copies of an older
/// version leave the tiers first.
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
        None => d.store.settings().map_err(store_status)?.compress_imports(),
    };
    if r.force && d.store.contains(&name) {
        // The old bytes must leave the tiers first (every rank's); refused
        // while leased.
        d.unload_everywhere(&name, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use flash_tier::LeaseId;

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
}
