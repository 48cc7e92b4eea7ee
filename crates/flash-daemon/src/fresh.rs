//! The daemon never serves what the store no longer holds.
//!
//! A model can change under a running daemon: `flash pull --force` or
//! `save_dict` into the store (a new folder renamed into place), `flash rm`,
//! in this process or any other. Every request that names a model first asks
//! [`Freshness::check`]: the identity of the model's manifest (device, inode,
//! modification time, length; a replaced model is a new file, a removed one
//! has none) is compared with the one its copies were made from. When it
//! changed, every tier's copy is dropped (refused, with the reason, while a
//! client holds one: the old bytes are still in use), the cached load plan
//! is forgotten, and the model's epoch moves on, so engines built on the old
//! weights ([`crate::serve`]) see they are stale and are built again.

use crate::tiers::Tiers;
use flash_format::manifest::MANIFEST_FILE;
use flash_store::RankedName;
use flash_tier::{ModelId, TierError};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

/// What identifies one version of a model in the store: its manifest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

impl Identity {
    /// The identity of the model in folder `dir`, `None` when it has none
    /// (removed).
    fn of(dir: &Path) -> Option<Identity> {
        let m = std::fs::metadata(dir.join(MANIFEST_FILE)).ok()?;
        Some(Identity {
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            len: m.len(),
        })
    }
}

struct Known {
    identity: Option<Identity>,
    epoch: u64,
}

/// The version of every model the daemon has seen, and its epoch.
#[derive(Default)]
pub(crate) struct Freshness {
    known: Mutex<HashMap<ModelId, Known>>,
}

/// Why a model's stale copies could not be dropped.
#[derive(Debug, thiserror::Error)]
#[error(
    "{model} changed in the store while a client holds its old copy ({cause}); \
     the old bytes stay until it is released: release it, then ask again"
)]
pub(crate) struct StillLeased {
    pub model: ModelId,
    pub cause: TierError,
}

impl Freshness {
    /// Makes sure no tier holds a copy of an older version of `model` (see
    /// the module doc) and returns the model's epoch. The first sight of a
    /// model records its version as it is.
    pub fn check(&self, tiers: &Tiers, model: &ModelId) -> Result<u64, StillLeased> {
        let now = stored_identity(tiers, model);
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let k = known.entry(model.clone()).or_insert(Known {
                identity: now,
                epoch: 0,
            });
            if k.identity == now {
                return Ok(k.epoch);
            }
        }
        // Changed: drop every copy (no lock held: unloading waits for loads
        // in flight and frees device memory).
        tiers.unload(model, None).map_err(|cause| StillLeased {
            model: model.clone(),
            cause,
        })?;
        tiers.transfers().forget(model);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.get_mut(model).expect("inserted above");
        k.identity = now;
        k.epoch += 1;
        tracing::info!(%model, epoch = k.epoch, removed = now.is_none(), "the model changed in the store: its copies and engines were dropped");
        Ok(k.epoch)
    }

    /// Records that the daemon itself replaced or removed `model` (after
    /// dropping its copies): the next check sees the new version as current
    /// and engines built on the old one as stale.
    pub fn changed(&self, tiers: &Tiers, model: &ModelId) {
        let now = stored_identity(tiers, model);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.entry(model.clone()).or_insert(Known {
            identity: now,
            epoch: 0,
        });
        k.identity = now;
        k.epoch += 1;
    }
}

/// The identity of `model`'s folder in the store now (`None`: not stored);
/// a rank's image (`ORG/NAME#R`) is its model's.
fn stored_identity(tiers: &Tiers, model: &ModelId) -> Option<Identity> {
    let ranked = model.as_str().parse::<RankedName>().ok()?;
    Identity::of(&tiers.transfers().store().model_dir(&ranked.name))
}
