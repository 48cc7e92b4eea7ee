//! Daemon commands: start, stop, status, ps, load, unload, attach. Thin: the
//! daemon is `flash-daemon`, the client `flash-client`.

use crate::args::{AttachArgs, StartArgs};
use anyhow::{anyhow, bail, Context, Result};
use flash_check::daemon::{compare, reference};
use flash_client::{
    Client, ClientError, FillReply, Lease, Location, ModelInfo, Place, StatusReply,
};
use flash_daemon::{DaemonConfig, LOCK_FILE, LOG_FILE, PID_FILE};
use flash_load::{HostModel, LoadOptions};
use flash_store::Store;
use flash_sys::cuda::Gpu;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Set in the environment of a daemon started in the background.
const DETACHED_ENV: &str = "FLASH_DAEMON_DETACHED";

pub fn home(storage: &Option<PathBuf>) -> PathBuf {
    storage.clone().unwrap_or_else(Store::default_root)
}

fn human(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Connects, or explains that no daemon runs.
pub fn connect(home: &Path) -> Result<Client> {
    Client::connect(home).map_err(|e| anyhow!(e))
}

fn default_mem_pool() -> u64 {
    (flash_sys::os::physical_memory() / 4).clamp(1 << 30, 32 << 30)
}

fn addr(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("{s:?} is not an address (HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("{s:?} resolves to no address"))
}

/// The last `n` lines of the daemon's log, for error messages.
fn log_tail(home: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(home.join(LOG_FILE)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn start(storage: &Option<PathBuf>, verbose: u8, a: StartArgs) -> Result<ExitCode> {
    let home = home(storage);
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    if a.foreground {
        return foreground(&home, a);
    }
    // Refuse at once when a daemon holds the store (the child would too,
    // but only in the log).
    {
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(home.join(LOCK_FILE))
            .with_context(|| format!("opening {}", home.join(LOCK_FILE).display()))?;
        if !flash_sys::shm::try_lock_exclusive(&lock)? {
            let pid = std::fs::read_to_string(home.join(PID_FILE)).unwrap_or_default();
            bail!(
                "a flash daemon is already running on {} (pid {}, socket {})",
                home.display(),
                pid.trim(),
                flash_client::socket_path(&home).display()
            );
        }
    }
    let s = spawn(&home, verbose, &a)?;
    println!(
        "flash daemon started (pid {}): socket {}{}{}",
        s.pid,
        s.socket,
        if s.http.is_empty() {
            String::new()
        } else {
            format!(", http://{}/metrics", s.http)
        },
        if s.tcp.is_empty() {
            String::new()
        } else {
            format!(
                ", tcp {} (token in {})",
                s.tcp,
                home.join(flash_client::TOKEN_FILE).display()
            )
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts the daemon of `home` in the background (`flash start` and `flash
/// run`) and waits until it answers; its status.
pub(crate) fn spawn(home: &Path, verbose: u8, a: &StartArgs) -> Result<StatusReply> {
    let log_path = home.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the flash binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--storage").arg(home);
    cmd.arg(format!("-{}", "v".repeat(verbose.max(1) as usize)));
    cmd.arg("start").arg("--foreground");
    if let Some(m) = a.mem_pool {
        cmd.arg("--mem-pool").arg(m.to_string());
    }
    cmd.arg("--gpu-mem-util").arg(a.gpu_mem_util.to_string());
    if let Some(b) = a.gpu_budget {
        cmd.arg("--gpu-budget").arg(b.to_string());
    }
    cmd.arg("--chunk-size").arg(a.chunk_size.to_string());
    if let Some(t) = a.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if let (Some(h), Some(p)) = (&a.host, a.port) {
        cmd.arg("--host").arg(h).arg("--port").arg(p.to_string());
    }
    cmd.arg("--http").arg(&a.http);
    if a.no_gpu {
        cmd.arg("--no-gpu");
    }
    cmd.arg("--popularity-half-life")
        .arg(a.popularity_half_life.to_string());
    cmd.arg("--disk-loads").arg(a.disk_loads.to_string());
    let mut child = cmd
        .env(DETACHED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let t0 = Instant::now();
    loop {
        if let Ok(c) = Client::connect(home) {
            if let Ok(s) = c.status() {
                return Ok(s);
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the daemon exited ({status}) before answering; the end of {}:\n{}",
                log_path.display(),
                log_tail(home, 15)
            );
        }
        if t0.elapsed() > Duration::from_secs(a.wait) {
            bail!(
                "the daemon (pid {}) did not answer within {} s; the end of {}:\n{}",
                child.id(),
                a.wait,
                log_path.display(),
                log_tail(home, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn foreground(home: &Path, a: StartArgs) -> Result<ExitCode> {
    if std::env::var_os(DETACHED_ENV).is_some() {
        // Leave the terminal's session: no SIGHUP when it closes.
        let _ = flash_sys::shm::setsid();
    }
    let mut load = LoadOptions {
        chunk_bytes: a.chunk_size,
        ..LoadOptions::default()
    };
    if let Some(t) = a.threads {
        load.threads = t.max(1);
    }
    let tcp = match (&a.host, a.port) {
        (Some(h), Some(p)) => Some(addr(&format!("{h}:{p}"))?),
        _ => None,
    };
    let http = match a.http.as_str() {
        "off" | "" => None,
        s => Some(addr(s)?),
    };
    let cfg = DaemonConfig {
        home: home.to_path_buf(),
        memory_budget: a.mem_pool.unwrap_or_else(default_mem_pool),
        gpu_mem_util: a.gpu_mem_util,
        gpu_budget: a.gpu_budget,
        load,
        tcp,
        http,
        no_gpu: a.no_gpu,
        popularity_half_life: std::time::Duration::from_secs_f64(a.popularity_half_life),
        disk_loads: a.disk_loads,
    };
    // The OpenAI-compatible API of the daemon's engines (flash-daemon's openai module).
    flash_daemon::run(cfg, flash_daemon::openai::routes)?;
    Ok(ExitCode::SUCCESS)
}

pub fn stop(storage: &Option<PathBuf>, timeout: u64) -> Result<ExitCode> {
    let home = home(storage);
    let pid = match Client::connect(&home) {
        Ok(c) => {
            let pid = c.status().ok().map(|s| s.pid);
            c.shutdown().map_err(|e| anyhow!(e))?;
            pid
        }
        Err(ClientError::NotRunning { .. }) => {
            // Maybe a daemon that no longer answers: signal it.
            let pid = std::fs::read_to_string(home.join(PID_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|p| flash_sys::shm::pid_alive(*p) && is_flash(*p));
            match pid {
                Some(p) => {
                    flash_sys::shm::terminate(p)?;
                    Some(p)
                }
                None => {
                    println!("no flash daemon is running on {}", home.display());
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        Err(e) => return Err(anyhow!(e)),
    };
    let t0 = Instant::now();
    if let Some(pid) = pid {
        while flash_sys::shm::pid_alive(pid) {
            if t0.elapsed() > Duration::from_secs(timeout) {
                bail!("the daemon (pid {pid}) is still running after {timeout} s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The socket disappears last (after the memory is returned).
    while flash_client::socket_path(&home).exists() && t0.elapsed() < Duration::from_secs(timeout) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("flash daemon stopped");
    Ok(ExitCode::SUCCESS)
}

/// Whether `pid` runs a flash binary (so a recycled pid is never signalled).
fn is_flash(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .map(|c| c.contains("flash"))
        .unwrap_or(false)
}

fn fmt_duration(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

fn get_status(home: &Path) -> Result<StatusReply> {
    connect(home)?.status().map_err(|e| anyhow!(e))
}

pub fn status(storage: &Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let s = get_status(&home(storage))?;
    if json {
        print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "flash daemon {} (pid {}), up {}",
        s.version,
        s.pid,
        fmt_duration(s.uptime_seconds)
    );
    println!("store   {}", s.store);
    println!("socket  {}", s.socket);
    println!(
        "http    {}",
        if s.http.is_empty() {
            "off".to_string()
        } else {
            format!("http://{}/metrics", s.http)
        }
    );
    println!("tcp     {}", if s.tcp.is_empty() { "off" } else { &s.tcp });
    println!(
        "clients {} sessions, {} leases; {} requests, {} errors",
        s.sessions, s.leases, s.requests, s.errors
    );
    let turns = match s.disk_loads_limit {
        0 => "no limit".to_string(),
        1 => "1 at a time".to_string(),
        n => format!("{n} at a time"),
    };
    println!(
        "disk    loads {turns}: {} reading, {} waiting",
        s.disk_loads_reading, s.disk_loads_waiting
    );
    println!();
    println!(
        "{:<8} {:>11} {:>11} {:>11} {:>6} {:>7} {:>7} {:>9} {:>10}",
        "TIER", "BUDGET", "USED", "ENGINES", "MODELS", "HITS", "MISSES", "COALESCED", "EVICTIONS"
    );
    for t in &s.tiers {
        let mut name = t.tier.clone();
        if t.tier == "memory" && s.memory_pinned {
            name.push('*');
        }
        println!(
            "{:<8} {:>11} {:>11} {:>11} {:>6} {:>7} {:>7} {:>9} {:>10}",
            name,
            human(t.budget),
            human(t.used),
            human(t.reserved),
            t.models.len(),
            t.hits,
            t.misses,
            t.coalesced,
            t.evictions
        );
    }
    if s.memory_pinned {
        println!("(* pinned)");
    }
    println!();
    print_ps(&s);
    Ok(ExitCode::SUCCESS)
}

fn print_ps(s: &StatusReply) {
    let rows: Vec<_> = s
        .tiers
        .iter()
        .flat_map(|t| t.models.iter().map(move |m| (&t.tier, m)))
        .collect();
    if rows.is_empty() {
        println!("no model resident (load one with `flash load MODEL`)");
        return;
    }
    let w = rows
        .iter()
        .map(|(_, m)| m.model.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$}  {:<7} {:>11}  {:<8} {:<7} {:>6}  {:<5} {:>8} {:>10}",
        "MODEL", "TIER", "SIZE", "STATE", "FROM", "LEASES", "KEEP", "IDLE", "POPULARITY"
    );
    for (tier, m) in rows {
        println!(
            "{:<w$}  {:<7} {:>11}  {:<8} {:<7} {:>6}  {:<5} {:>8} {:>10.1}",
            m.model,
            tier,
            human(m.bytes),
            m.state,
            m.loaded_from,
            m.leases,
            if m.kept { "yes" } else { "" },
            m.idle_ms
                .map(|ms| fmt_duration(ms as f64 / 1000.0))
                .unwrap_or_default(),
            m.popularity
        );
    }
}

pub fn ps(storage: &Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let s = get_status(&home(storage))?;
    if json {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            tier: &'a str,
            #[serde(flatten)]
            model: &'a flash_client::ResidentModel,
        }
        let rows: Vec<Row> = s
            .tiers
            .iter()
            .flat_map(|t| {
                t.models.iter().map(move |m| Row {
                    tier: &t.tier,
                    model: m,
                })
            })
            .collect();
        print_json(&rows)?;
    } else {
        print_ps(&s);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn load(
    storage: &Option<PathBuf>,
    model: &str,
    gpu: Option<u32>,
    memory: bool,
    keep: bool,
    json: bool,
) -> Result<ExitCode> {
    let place = match (gpu, memory) {
        (Some(n), _) => Place::Gpu(n),
        (None, true) => Place::Memory,
        (None, false) => Place::Auto,
    };
    let c = connect(&home(storage))?;
    let r = c.load(model, place, keep).map_err(|e| anyhow!(e))?;
    if json {
        print_json(&r)?;
    } else if r.served_from == r.tier {
        println!("{model}: already in {} ({})", r.tier, human(r.bytes));
    } else {
        println!(
            "{model}: loaded into {} from {} ({}) in {:.3} s{}",
            r.tier,
            r.served_from,
            human(r.bytes),
            r.seconds,
            if keep { ", kept" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unload(storage: &Option<PathBuf>, model: &str, tier: Option<&str>) -> Result<ExitCode> {
    let place = match tier {
        None => Place::Auto,
        Some(t) => t.parse::<Place>().map_err(anyhow::Error::msg)?,
    };
    let c = connect(&home(storage))?;
    let r = c.unload(model, place).map_err(|e| anyhow!(e))?;
    if r.freed.is_empty() {
        println!("{model}: not resident");
    }
    for f in r.freed {
        println!("{model}: unloaded from {} ({})", f.tier, human(f.bytes));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct AttachReport {
    model: String,
    mode: &'static str,
    tier: String,
    served_from: String,
    bytes: u64,
    lease_id: Option<u64>,
    /// Seconds the daemon spent.
    daemon_seconds: f64,
    /// Seconds from connecting to usable bytes or device pointers.
    attach_seconds: f64,
    verified: bool,
}

pub fn attach(storage: &Option<PathBuf>, a: AttachArgs) -> Result<ExitCode> {
    let home = home(storage);
    let place: Place = a.tier.parse().map_err(anyhow::Error::msg)?;
    let want = if a.verify {
        Some(reference(&home, &a.model)?)
    } else {
        None
    };
    // A real client has its CUDA context before it attaches: make it first.
    let early_gpu = early_gpu(place);
    let t0 = Instant::now();
    let mut client = connect(&home)?;
    let at = Attach {
        a: &a,
        place,
        want: want.as_ref(),
        early_gpu: early_gpu.as_ref(),
        t0,
    };
    let mut hold: Held = Vec::new();
    let (report, lease_to_release) = if a.copy {
        (at.copy(&client, &mut hold)?, None)
    } else {
        let (report, lease) = at.share(&mut client, &mut hold)?;
        (report, Some(lease))
    };
    print_attach(&report, a.json)?;
    hold_for(a.hold);
    drop(hold);
    if let Some(l) = lease_to_release {
        client.release(l).map_err(|e| anyhow!(e))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What keeps the attached bytes usable (a mapping, a buffer) until the
/// attach ends.
type Held = Vec<Box<dyn std::any::Any>>;

/// The GPU of a `gpu:N` attach, bound to this thread, when it can be made.
fn early_gpu(place: Place) -> Option<Gpu> {
    match place {
        Place::Gpu(n) => flash_sys::cuda::probe()
            .ok()
            .and_then(|c| c.device(n as usize).ok())
            .filter(|g| g.bind_to_thread().is_ok()),
        _ => None,
    }
}

/// One attach: what was asked, the store's bytes to verify against, the GPU
/// made before connecting, and when the clock started (at connecting).
struct Attach<'a> {
    a: &'a AttachArgs,
    place: Place,
    want: Option<&'a HostModel>,
    early_gpu: Option<&'a Gpu>,
    t0: Instant,
}

impl Attach<'_> {
    /// The GPU `device`: the one made before connecting, else opened now.
    fn gpu_for(&self, device: u32) -> Result<Gpu> {
        if let Some(g) = self.early_gpu.filter(|g| g.ordinal() == device as usize) {
            return Ok(g.clone());
        }
        let cuda =
            flash_sys::cuda::probe().map_err(|e| anyhow!("a GPU copy needs CUDA here: {e}"))?;
        Ok(cuda.device(device as usize)?)
    }

    /// Copy mode: the daemon fills a buffer of this process (a shared-memory
    /// file, or a GPU allocation for a GPU place).
    fn copy(&self, client: &Client, hold: &mut Held) -> Result<AttachReport> {
        let a = self.a;
        let info = client
            .info(&a.model)
            .map_err(|e| anyhow!(e))?
            .ok_or_else(|| anyhow!("model {} is not in the store (see `flash list`)", a.model))?;
        let device = match self.place {
            Place::Gpu(n) => Some(n),
            Place::Memory => None,
            Place::Auto => client
                .status()
                .map_err(|e| anyhow!(e))?
                .gpus
                .gt(&0)
                .then_some(0),
        };
        let (image, r) = match device {
            None => {
                let (file, _, r) = client.fill_shm(&a.model).map_err(|e| anyhow!(e))?;
                let bytes = file.to_vec();
                hold.push(Box::new(file));
                (bytes, r)
            }
            Some(d) => self.fill_gpu(client, &info, d, hold)?,
        };
        let attach_seconds = self.t0.elapsed().as_secs_f64();
        if let Some(w) = self.want {
            compare(&a.model, &info.tensors, &image, w)?;
        }
        Ok(AttachReport {
            model: a.model.clone(),
            mode: "copy",
            tier: r.source_tier.clone(),
            served_from: if r.loaded_from.is_empty() {
                r.source_tier
            } else {
                r.loaded_from
            },
            bytes: r.bytes,
            lease_id: None,
            daemon_seconds: r.seconds,
            attach_seconds,
            verified: self.want.is_some(),
        })
    }

    /// Has the daemon fill a new allocation on GPU `d` with the whole image;
    /// the image's bytes read back when verifying.
    fn fill_gpu(
        &self,
        client: &Client,
        info: &ModelInfo,
        d: u32,
        hold: &mut Held,
    ) -> Result<(Vec<u8>, FillReply)> {
        let gpu = self.gpu_for(d)?;
        let mem = gpu.alloc(info.image_bytes as usize)?;
        let r = client
            .fill(
                &self.a.model,
                Place::Auto,
                &[flash_client::Region {
                    target: flash_client::Target::Cuda {
                        ipc_handle: mem.ipc_handle()?,
                        device: d,
                    },
                    dst_offset: 0,
                    src_offset: 0,
                    length: info.image_bytes,
                }],
            )
            .map_err(|e| anyhow!(e))?;
        let mut host = vec![0u8; mem.len()];
        if self.a.verify {
            mem.copy_to_host(0, &mut host)?;
        }
        hold.push(Box::new(mem));
        Ok((host, r))
    }

    /// Share mode: leases the daemon's copy and maps it into this process.
    fn share(&self, client: &mut Client, hold: &mut Held) -> Result<(AttachReport, Lease)> {
        let a = self.a;
        let lease = client
            .acquire(&a.model, self.place)
            .map_err(|e| anyhow!(e))?;
        let image = self.map(&lease, hold)?;
        let attach_seconds = self.t0.elapsed().as_secs_f64();
        if let Some(w) = self.want {
            compare(&a.model, &lease.tensors, &image, w)?;
        }
        let report = AttachReport {
            model: lease.model.clone(),
            mode: "share",
            tier: lease.tier.clone(),
            served_from: lease.served_from.clone(),
            bytes: lease.bytes,
            lease_id: Some(lease.id),
            daemon_seconds: lease.seconds,
            attach_seconds,
            verified: self.want.is_some(),
        };
        Ok((report, lease))
    }

    /// Maps a leased copy (a shared-memory range, or a GPU allocation through
    /// CUDA IPC); its bytes when verifying, else none.
    fn map(&self, lease: &Lease, hold: &mut Held) -> Result<Vec<u8>> {
        match &lease.location {
            Location::Shm { .. } => {
                let view = lease.map_host().map_err(|e| anyhow!(e))?;
                let image = if self.a.verify {
                    view.to_vec()
                } else {
                    Vec::new()
                };
                hold.push(Box::new(view));
                Ok(image)
            }
            Location::Cuda { device, .. } => {
                let gpu = self.gpu_for(*device)?;
                let mem = lease.map_gpu(&gpu).map_err(|e| anyhow!(e))?;
                let mut host = Vec::new();
                if self.a.verify {
                    host = vec![0u8; mem.len()];
                    mem.copy_to_host(0, &mut host)?;
                }
                hold.push(Box::new(mem));
                Ok(host)
            }
        }
    }
}

/// Prints the report (a JSON line with `--json`) and flushes it: a caller
/// holding the lease reads it before the attach ends.
fn print_attach(report: &AttachReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "{}: {} mode, {} in {} (from {}), usable after {:.2} ms{}",
            report.model,
            report.mode,
            human(report.bytes),
            report.tier,
            report.served_from,
            report.attach_seconds * 1e3,
            if report.verified {
                ", every tensor matches the store"
            } else {
                ""
            }
        );
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// `--hold`: keeps the attach this many seconds; 0 or less: until killed.
fn hold_for(seconds: Option<f64>) {
    if let Some(h) = seconds {
        if h <= 0.0 {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        std::thread::sleep(Duration::from_secs_f64(h));
    }
}
