//! What every command resolves the same way: the store (its folder, the
//! daemon's `$FLASH_HOME`), model names, a model given as a store name or a
//! folder, the kernel cache, a GPU by ordinal. Depends on nothing of the
//! crate, so any command module can use it without a circle.

use anyhow::{anyhow, Context, Result};
use flash_store::{ModelName, Store};
use flash_sys::cuda::{self, Gpu};
use std::path::{Path, PathBuf};

/// The global options every command shares.
pub struct Ctx {
    storage: Option<PathBuf>,
    pub quiet: bool,
}

impl Ctx {
    pub fn new(storage: Option<PathBuf>, quiet: bool) -> Self {
        Ctx { storage, quiet }
    }

    /// The store's folder (`$FLASH_HOME` of the daemon), without opening it.
    pub fn home(&self) -> PathBuf {
        self.storage.clone().unwrap_or_else(Store::default_root)
    }

    pub fn store(&self) -> Result<Store> {
        let root = self.home();
        Store::open(&root).with_context(|| format!("cannot open the store at {}", root.display()))
    }
}

pub fn model_name(s: &str) -> Result<ModelName> {
    Ok(s.parse::<ModelName>()?)
}

/// The model folder of `model`: a folder path, else a store name (ORG/NAME).
pub fn model_dir(ctx: &Ctx, model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let name = model_name(model).with_context(|| {
        format!("{model:?} is neither a folder nor a store model name (ORG/NAME)")
    })?;
    Ok(ctx.store()?.existing(&name)?)
}

/// GPU `ordinal`, or an error that names it (`cuda:N`) and says why it is
/// not usable (no driver, no such GPU). Never panics without a driver.
pub fn gpu(ordinal: usize) -> Result<Gpu> {
    let c = cuda::probe().map_err(|why| anyhow!("cuda:{ordinal}: no usable GPU: {why}"))?;
    c.device(ordinal)
        .with_context(|| format!("cuda:{ordinal} is not usable"))
}

/// Where compiled kernels are cached: `$FLASH_KERNEL_CACHE`, else the
/// store's `kernels` folder (the daemon's too, so a warm start hits it).
pub fn kernel_cache(ctx: &Ctx) -> Option<PathBuf> {
    flash_kernels::default_kernel_cache(Some(&ctx.home()))
}
