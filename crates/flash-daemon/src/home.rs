//! The daemon's files in its home (`$FLASH_HOME`) and in its shared-memory
//! folder: creating them at start, checking who holds the home, removing
//! what a dead daemon left, and removing them again at a clean stop. What a
//! daemon leaves on disk, and what the next start may therefore remove, is
//! decided here and nowhere else.
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
//!   removed at start (the lock proves no daemon of this home runs). So are
//!   the pools of other homes' daemons and the copy-mode files of clients
//!   (`<shm>/flash-client-<pid>-<n>`) whose process is gone
//!   ([`clean_orphans`]): a daemon killed with its home deleted (a temporary
//!   store) would otherwise hold its pool's memory until the machine
//!   reboots. A file whose pid is alive stays, whoever that process is, and
//!   so does one whose `flock` is held (pools and client files are locked
//!   while in use).

use crate::server::{io_err, DaemonError};
use flash_client::{SOCKET_FILE, TOKEN_FILE};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The lock file in `$FLASH_HOME`.
pub const LOCK_FILE: &str = "daemon.lock";
/// The pid file in `$FLASH_HOME`.
pub const PID_FILE: &str = "daemon.pid";
/// The log file `flash start` sends a detached daemon's output to.
pub const LOG_FILE: &str = "daemon.log";

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

/// Makes the token TCP clients must send and writes it to `daemon.token`
/// (0600: only this user can read it).
pub(crate) fn write_token(home: &Path) -> Result<String, DaemonError> {
    let t = random_token()?;
    write_private(&home.join(TOKEN_FILE), &t)?;
    Ok(t)
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

/// The host pool's file, `pool-<pid>` in the folder [`pool_dir`] picks;
/// `None` for anonymous memory.
pub(crate) fn pool_file(home: &Path, shm: &Path, bytes: u64, gpu: bool) -> Option<PathBuf> {
    pool_dir(home, shm, bytes, gpu).map(|d| d.join(format!("pool-{}", std::process::id())))
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

/// The pid in the name of a pool (`pool-<pid>`) or a client's copy-mode
/// file (`flash-client-<pid>-<n>`).
fn owner_pid(name: &str) -> Option<u32> {
    if let Some(pid) = name.strip_prefix("pool-") {
        return pid.parse().ok();
    }
    name.strip_prefix("flash-client-")?
        .split_once('-')?
        .0
        .parse()
        .ok()
}

/// Removes, under the shared-memory folder `base`, the pools of other homes'
/// daemons and the copy-mode files of clients whose process is gone; `own`
/// (this home's folder) is [`clean_stale`]'s. The homes' folders stay, empty
/// or not: one may belong to a daemon starting now, between making its
/// folder and its pool, and an empty folder holds no memory.
fn clean_orphans(base: &Path, own: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    // Gone: its pid is not alive here, and nobody holds the file's lock
    // (a pool or client file of a process in another pid namespace that
    // shares this folder is locked while in use).
    let dead = |p: &Path| {
        p.file_name()
            .and_then(|n| owner_pid(&n.to_string_lossy()))
            .is_some_and(|pid| !flash_sys::shm::pid_alive(pid))
            && File::open(p)
                .and_then(|f| flash_sys::shm::try_lock_exclusive(&f))
                .unwrap_or(false)
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("flash-client-") && dead(&path) {
            info!(path = %path.display(), "removing the copy-mode file of a client that is gone");
            let _ = fs::remove_file(&path);
        } else if name.starts_with("flashtensors-") && path != own {
            let Ok(files) = fs::read_dir(&path) else {
                continue;
            };
            for f in files.flatten() {
                let fp = f.path();
                if f.file_name().to_string_lossy().starts_with("pool-") && dead(&fp) {
                    info!(path = %fp.display(), "removing the pool of a daemon that is gone");
                    let _ = fs::remove_file(&fp);
                }
            }
        }
    }
}

/// This process's hold on a home: its lock, and the files it wrote there.
/// Given back with [`Claimed::release`] (not on drop: a daemon that panics
/// leaves its files, as a crash does, for the next start to remove).
pub(crate) struct Claimed {
    lock: File,
    home: PathBuf,
    shm: PathBuf,
    pid_path: PathBuf,
}

/// Takes `home` for this process: creates it, takes its lock, removes what a
/// dead daemon left, creates the shared-memory folder (0700) and writes the
/// pid file.
pub(crate) fn claim(home: &Path) -> Result<Claimed, DaemonError> {
    fs::create_dir_all(home).map_err(io_err(home))?;
    let lock = take_lock(home)?;
    let shm = shm_dir(home);
    clean_stale(home, &shm);
    if let Some(base) = shm.parent() {
        clean_orphans(base, &shm);
    }
    fs::create_dir_all(&shm).map_err(io_err(&shm))?;
    let _ = fs::set_permissions(&shm, fs::Permissions::from_mode(0o700));
    let pid_path = home.join(PID_FILE);
    write_private(&pid_path, &format!("{}\n", std::process::id()))?;
    Ok(Claimed {
        lock,
        home: home.to_path_buf(),
        shm,
        pid_path,
    })
}

impl Claimed {
    /// The folder of this home's shared-memory files.
    pub(crate) fn shm(&self) -> &Path {
        &self.shm
    }

    /// Removes the socket, token and pid files and the (by now empty)
    /// shared-memory folders, then lets go of the lock: last, so that no
    /// other daemon starts while they are still there.
    pub(crate) fn release(self) {
        let home = &self.home;
        let _ = fs::remove_file(home.join(SOCKET_FILE));
        let _ = fs::remove_file(home.join(TOKEN_FILE));
        let _ = fs::remove_file(&self.pid_path);
        let _ = fs::remove_dir(&self.shm);
        let _ = fs::remove_dir(home.join("run"));
        drop(self.lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphaned_pools_and_client_files_go_live_ones_stay() {
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        // A pid that surely ended: a child that exited and was reaped.
        let gone = std::process::Command::new("true")
            .spawn()
            .and_then(|mut c| c.wait().map(|_| c.id()))
            .unwrap();
        let me = std::process::id();
        let own = b.join("flashtensors-own");
        for (dir, file) in [
            ("flashtensors-deleted-home", format!("pool-{gone}")),
            ("flashtensors-live-home", format!("pool-{me}")),
            ("flashtensors-live-home", "notes".to_string()),
            ("flashtensors-own", format!("pool-{gone}")),
        ] {
            fs::create_dir_all(b.join(dir)).unwrap();
            fs::write(b.join(dir).join(file), b"x").unwrap();
        }
        for f in [
            format!("flash-client-{gone}-0"),
            format!("flash-client-{gone}-1"),
            format!("flash-client-{me}-3"),
            "other".into(),
        ] {
            fs::write(b.join(f), b"x").unwrap();
        }
        // A file of a pid this process cannot see (another pid namespace)
        // that is in use: locked, so it stays.
        let held = File::open(b.join(format!("flash-client-{gone}-1"))).unwrap();
        assert!(flash_sys::shm::try_lock_exclusive(&held).unwrap());
        clean_orphans(b, &own);
        assert!(b.join(format!("flash-client-{gone}-1")).exists());
        drop(held);
        // The dead daemon's pool (not its folder) and the dead client's
        // file are gone.
        assert!(!b
            .join("flashtensors-deleted-home")
            .join(format!("pool-{gone}"))
            .exists());
        assert!(b.join("flashtensors-deleted-home").is_dir());
        assert!(!b.join(format!("flash-client-{gone}-0")).exists());
        // What lives, what is not ours to judge, and this home's folder
        // (clean_stale's) stay.
        assert!(b
            .join("flashtensors-live-home")
            .join(format!("pool-{me}"))
            .exists());
        assert!(b.join("flashtensors-live-home").join("notes").exists());
        assert!(b.join(format!("flash-client-{me}-3")).exists());
        assert!(b.join("other").exists());
        assert!(own.join(format!("pool-{gone}")).exists());
        assert_eq!(owner_pid("pool-17"), Some(17));
        assert_eq!(owner_pid("flash-client-42-7"), Some(42));
        assert_eq!(owner_pid("flash-client-x-7"), None);
        assert_eq!(owner_pid("pool-"), None);
    }

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
