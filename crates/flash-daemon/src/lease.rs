//! Leases and fills: how a client gets a model's bytes, in either mode.
//!
//! - **Share** (`Acquire`): the client gets the copy itself — the CUDA IPC
//!   handle of a GPU copy, or the range of the host pool's file holding a
//!   memory copy — and the lease is detached from its `Lease` value and
//!   recorded under the client's session, so it lasts until `Release` or the
//!   session's end.
//! - **Copy** (`Fill`): the daemon leases the fastest copy for the request's
//!   duration and writes the requested ranges of the decoded image into the
//!   client's buffers (its CUDA allocations by IPC handle, or its
//!   shared-memory files), decoding a compressed model's memory copy on the
//!   way.
//!
//! The session table (which leases each session holds) is kept here too:
//! sessions exist to own leases, and every change to one goes with a lease
//! taken or given back.

use crate::server::Daemon;
use crate::service::{status_of, tensors_of};
use crate::tiers::StoreTransfers;
use flash_client::proto::{self, acquire_reply, region};
use flash_load::LoadPlan;
use flash_sys::cuda::{Cuda, DeviceMemory};
use flash_tier::{ClientId, Lease, LeaseId, ModelId, Tier};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tonic::Status;
use tracing::debug;

/// Opens a session (the `Session` stream's start) and returns its id.
pub(crate) fn open_session(d: &Daemon) -> u64 {
    let id = d.next_session.fetch_add(1, Ordering::Relaxed);
    d.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, HashSet::new());
    id
}

/// Forgets session `id` (its stream ended) and returns how many leases it
/// held; the tier manager ends them with `client_gone`.
pub(crate) fn end_session(d: &Daemon, id: u64) -> usize {
    d.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id)
        .map_or(0, |s| s.len())
}

impl Daemon {
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
}

/// Share mode: leases `r.model`'s copy in `r.tier` to `session` and returns
/// where the client finds it.
pub(crate) fn acquire(
    d: &Daemon,
    session: u64,
    r: proto::AcquireRequest,
) -> Result<proto::AcquireReply, Status> {
    let t0 = Instant::now();
    d.live_session(session)?;
    let (_, id) = d.model_image(&r.model)?;
    let tier = d.tier(&r.tier)?;
    check_shareable(d, &id, tier)?;
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
    let location = location_of(&lease, &id, tier)?;
    let (bytes, served_from) = (lease.bytes(), lease.served_from());
    let lease_id = lease.detach();
    record_lease(d, session, lease_id)?;
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

/// Refuses to share a memory-tier copy that clients cannot read as tensors:
/// one not in shared memory, or one holding a compressed model's stored
/// bytes.
fn check_shareable(d: &Daemon, id: &ModelId, tier: Tier) -> Result<(), Status> {
    if tier == Tier::Memory && !d.memory_shareable {
        return Err(Status::failed_precondition(
            "this daemon's memory tier cannot be shared (it has no memory tier): ask for a GPU tier, or use copy mode",
        ));
    }
    if tier == Tier::Memory
        && d.tiers
            .transfers()
            .is_compressed(id)
            .map_err(|e| status_of(&e))?
    {
        return Err(Status::failed_precondition(format!(
            "{id} is stored compressed: its memory-tier copy holds compressed bytes, which cannot be \
             shared as tensors; ask for a GPU tier (decoded there), or use copy mode (the daemon decodes)"
        )));
    }
    Ok(())
}

/// Where the client finds a leased copy: a range of the host pool's file, or
/// the CUDA IPC handle of the GPU allocation.
fn location_of(
    lease: &Lease<StoreTransfers>,
    id: &ModelId,
    tier: Tier,
) -> Result<acquire_reply::Location, Status> {
    if let Some(img) = lease.memory() {
        let (path, offset) = img.shared_location().ok_or_else(|| {
            Status::failed_precondition("this daemon's memory tier is not in shared memory")
        })?;
        Ok(acquire_reply::Location::Shm(proto::ShmLocation {
            path: path.display().to_string(),
            offset,
            size: lease.bytes(),
        }))
    } else if let Some(dev) = lease.gpu() {
        let handle = dev
            .ipc_handle()
            .map_err(|e| Status::internal(format!("IPC handle of {id} on {tier}: {e}")))?;
        Ok(acquire_reply::Location::Cuda(proto::CudaLocation {
            ipc_handle: handle.to_vec(),
            device: dev.gpu().ordinal() as u32,
            size: lease.bytes(),
        }))
    } else {
        Err(Status::internal("a lease without a buffer"))
    }
}

/// Records a detached lease under `session`; when the session closed
/// meanwhile, gives the lease back at once (nobody would release it).
fn record_lease(d: &Daemon, session: u64, lease_id: LeaseId) -> Result<(), Status> {
    let mut s = d.sessions.lock().unwrap_or_else(|p| p.into_inner());
    match s.get_mut(&session) {
        Some(set) => {
            set.insert(lease_id.0);
            Ok(())
        }
        None => {
            drop(s);
            let _ = d.tiers.release(lease_id);
            Err(Status::cancelled(format!(
                "session {session} closed during the request"
            )))
        }
    }
}

/// Ends `lease`, which only the session holding it may do.
pub(crate) fn release(d: &Daemon, session: u64, lease: u64) -> Result<proto::ReleaseReply, Status> {
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
}

/// Copy mode: writes the requested ranges of `r.model`'s decoded image into
/// the client's buffers from the fastest copy, leased for the request only.
pub(crate) fn fill(
    d: &Daemon,
    session: u64,
    r: proto::FillRequest,
) -> Result<proto::FillReply, Status> {
    let t0 = Instant::now();
    let (_, id) = d.model_image(&r.model)?;
    if r.regions.is_empty() {
        return Err(Status::invalid_argument("a fill needs at least one region"));
    }
    let image = d
        .tiers
        .transfers()
        .decoded_bytes(&id)
        .map_err(|e| status_of(&e))?;
    let cuda_devices = check_regions(&r.regions, &id, image)?;
    if !cuda_devices.is_empty() && d.cuda.is_none() {
        return Err(Status::failed_precondition(
            "CUDA targets need a daemon with a GPU",
        ));
    }
    let source = fill_source(d, &r.source_tier, &id, &cuda_devices)?;
    let lease = d
        .tiers
        .acquire(&id, source, ClientId(session))
        .map_err(|e| status_of(&e))?;
    // A compressed model's memory copy holds its stored bytes: regions of
    // the decoded image are decoded from it.
    let plan = d.tiers.transfers().plan(&id).map_err(|e| status_of(&e))?;
    let from = Leased {
        lease: &lease,
        plan: &plan,
        id: &id,
    };
    let total = copy_regions(d, &r.regions, &from)?;
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

/// Checks every region before a byte moves: its range lies inside the image,
/// it has a target, a CUDA target's handle is whole. Returns the GPUs the
/// CUDA targets are on.
fn check_regions(
    regions: &[proto::Region],
    id: &ModelId,
    image: u64,
) -> Result<HashSet<u32>, Status> {
    let mut cuda_devices = HashSet::new();
    for (i, g) in regions.iter().enumerate() {
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
    Ok(cuda_devices)
}

/// The tier a fill copies from: the requested tier, else a GPU copy on the
/// targets' GPU, else the memory tier (loading it there if needed).
fn fill_source(
    d: &Daemon,
    requested: &str,
    id: &ModelId,
    cuda_devices: &HashSet<u32>,
) -> Result<Tier, Status> {
    if !requested.is_empty() {
        return d.tier(requested);
    }
    let here = d.tiers.locate(id);
    let on_gpu = cuda_devices
        .iter()
        .map(|&g| Tier::Gpu(g as u16))
        .find(|t| here.contains(t));
    match on_gpu {
        Some(t) => Ok(t),
        None if d
            .tiers
            .status()
            .tier(Tier::Memory)
            .is_some_and(|t| t.budget > 0) =>
        {
            Ok(Tier::Memory)
        }
        None => d.tier(""),
    }
}

/// The copy a fill reads, with the plan that decodes a compressed model's
/// memory copy.
struct Leased<'a> {
    lease: &'a Lease<StoreTransfers>,
    plan: &'a LoadPlan,
    id: &'a ModelId,
}

impl Leased<'_> {
    /// Bytes `[s, s + len)` of the decoded image from a memory copy: the
    /// copy's own bytes, or decoded from them when it holds stored
    /// (compressed) bytes.
    fn memory_range<'i>(
        &self,
        img: &'i [u8],
        s: usize,
        len: usize,
    ) -> Result<Cow<'i, [u8]>, Status> {
        if !self.plan.is_encoded() {
            return Ok(Cow::Borrowed(&img[s..s + len]));
        }
        let mut out = vec![0u8; len];
        flash_load::decode::decode_range(self.plan, img, s as u64..(s + len) as u64, &mut out)
            .map_err(|e| Status::internal(format!("decoding {}: {e}", self.id)))?;
        Ok(Cow::Owned(out))
    }
}

/// Copies every region to its target, in order; the bytes copied.
fn copy_regions(d: &Daemon, regions: &[proto::Region], from: &Leased) -> Result<u64, Status> {
    // The client's CUDA buffers, each opened once per fill.
    let mut opened: HashMap<(u32, Vec<u8>), DeviceMemory> = HashMap::new();
    let mut total = 0u64;
    for (i, g) in regions.iter().enumerate() {
        match g.target.as_ref().expect("checked above") {
            region::Target::ShmPath(p) => fill_file(i, g, p, from)?,
            region::Target::Cuda(c) => {
                let cuda = d.cuda.as_ref().expect("checked above");
                let key = (c.device, c.ipc_handle.clone());
                if !opened.contains_key(&key) {
                    let mem = open_client_buffer(cuda, regions, i, c)?;
                    opened.insert(key.clone(), mem);
                }
                fill_device(i, g, &opened[&key], from)?;
            }
        }
        total += g.length;
    }
    Ok(total)
}

/// Writes region `i` into the client's shared-memory file `p` (from a GPU
/// copy, through this process's memory).
fn fill_file(i: usize, g: &proto::Region, p: &str, from: &Leased) -> Result<(), Status> {
    let (s, len) = (g.src_offset as usize, g.length as usize);
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
    if let Some(img) = from.lease.memory() {
        write(&from.memory_range(img, s, len)?)?;
    } else if let Some(dev) = from.lease.gpu() {
        let mut tmp = vec![0u8; len];
        dev.copy_to_host(s, &mut tmp)
            .map_err(|e| Status::internal(e.to_string()))?;
        write(&tmp)?;
    }
    Ok(())
}

/// Opens the client's CUDA buffer that region `i` targets, as large as the
/// furthest region of the fill into it.
fn open_client_buffer(
    cuda: &Cuda,
    regions: &[proto::Region],
    i: usize,
    c: &proto::CudaTarget,
) -> Result<DeviceMemory, Status> {
    let need = regions
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
    gpu.open_ipc(&handle, need as usize).map_err(|e| {
        Status::invalid_argument(format!("region {i}: opening the client's IPC handle: {e}"))
    })
}

/// Copies region `i` into the client's CUDA buffer `dst`: host to device
/// from a memory copy, device to device from a GPU copy.
fn fill_device(
    i: usize,
    g: &proto::Region,
    dst: &DeviceMemory,
    from: &Leased,
) -> Result<(), Status> {
    let (s, len) = (g.src_offset as usize, g.length as usize);
    if let Some(img) = from.lease.memory() {
        dst.copy_from_host(g.dst_offset as usize, &from.memory_range(img, s, len)?)
            .map_err(|e| Status::internal(format!("region {i}: {e}")))?;
    } else if let Some(dev) = from.lease.gpu() {
        let stream = dev
            .gpu()
            .stream()
            .map_err(|e| Status::internal(e.to_string()))?;
        dev.copy_to_device(s, dst, g.dst_offset as usize, len, &stream)
            .and_then(|_| stream.synchronize())
            .map_err(|e| Status::internal(format!("region {i}: {e}")))?;
    }
    Ok(())
}
