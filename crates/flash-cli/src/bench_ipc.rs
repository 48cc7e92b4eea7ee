//! `flash bench-ipc` (hidden): how long a second process takes to get usable
//! device pointers to a large allocation of this one, by way of sharing.
//!
//! For every size and method the parent allocates and exports one buffer
//! (writing a marker at its start and end), then starts a child process of
//! the same binary (`--child SPEC`) which creates its CUDA context first (not
//! timed), then `--repeat` times: opens/imports the memory (`open_ms`), reads
//! both markers back (`usable_ms`, from the start of the open), and closes it
//! again (`close_ms`). Methods:
//!
//! - `legacy`: `cuMemAlloc` + `cuIpcGetMemHandle`; the child calls
//!   `cuIpcOpenMemHandle` (the daemon's share mode today);
//! - `vmm-min`, `vmm-rec`: one `cuMemCreate` handle sized to the minimum or
//!   recommended granularity, exported as a POSIX descriptor the child
//!   inherits; the child imports, reserves, maps and sets access;
//! - `vmm-chunk1g`, `vmm-chunk2g`: the same with 1 GiB or 2 GiB handles
//!   mapped back to back into one range (is the cost per handle or per byte?).
//!
//! A method that fails (say VMM unsupported) gives an error row; the others
//! still run.

use anyhow::{anyhow, bail, Context, Result};
use flash_sys::cuda::vmm::{self, Granularity, VmmMemory, VmmOptions};
use flash_sys::cuda::{self, DeviceMemory, Gpu, IpcHandle};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;
const HEAD_MARK: [u8; 4] = 0x600D_F00Du32.to_le_bytes();
const TAIL_MARK: [u8; 4] = 0xC0FF_EE42u32.to_le_bytes();

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    #[value(name = "legacy")]
    Legacy,
    #[value(name = "vmm-min")]
    VmmMin,
    #[value(name = "vmm-rec")]
    VmmRec,
    #[value(name = "vmm-chunk1g")]
    VmmChunk1g,
    #[value(name = "vmm-chunk2g")]
    VmmChunk2g,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Legacy => "legacy",
            Method::VmmMin => "vmm-min",
            Method::VmmRec => "vmm-rec",
            Method::VmmChunk1g => "vmm-chunk1g",
            Method::VmmChunk2g => "vmm-chunk2g",
        }
    }

    /// (granularity, bytes per handle) of a VMM method; None for legacy.
    fn vmm(self) -> Option<VmmOptions> {
        let (granularity, chunk_bytes) = match self {
            Method::Legacy => return None,
            Method::VmmMin => (Granularity::Minimum, None),
            Method::VmmRec => (Granularity::Recommended, None),
            Method::VmmChunk1g => (Granularity::Recommended, Some(1usize << 30)),
            Method::VmmChunk2g => (Granularity::Recommended, Some(2usize << 30)),
        };
        Some(VmmOptions {
            granularity,
            chunk_bytes,
        })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchIpcArgs {
    /// Buffer sizes in GiB (fractions allowed), comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,4,16", value_parser = parse_gib)]
    pub sizes: Vec<usize>,
    /// Methods to measure, comma-separated
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "legacy,vmm-min,vmm-rec,vmm-chunk1g,vmm-chunk2g"
    )]
    pub methods: Vec<Method>,
    /// Opens per size and method (each in the same child, one after the other)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// GPU ordinal
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// One JSON object per line instead of a table
    #[arg(long)]
    pub json: bool,
    /// GiB of host memory the exporting process pins first (registered, as
    /// the daemon's memory tier is), to see whether that changes the cost of
    /// opening its exports
    #[arg(long, value_parser = parse_gib, value_name = "GIB")]
    pub pin_host: Option<usize>,
    /// The child opens the exports without first allocating and copying
    /// anything on the GPU (a fresh context, as a client's may be)
    #[arg(long)]
    pub no_warmup: bool,
    /// Internal: run as the importing child
    #[arg(long, hide = true, value_name = "SPEC")]
    pub child: Option<String>,
}

/// "1.5" (GiB) → bytes, rounded up to 4 KiB.
fn parse_gib(s: &str) -> Result<usize, String> {
    let g: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size in GiB"))?;
    if !g.is_finite() || g <= 0.0 || g > 4096.0 {
        return Err(format!("{s:?}: a size in GiB must be in (0, 4096]"));
    }
    let bytes = (g * GIB).ceil() as usize;
    Ok(bytes.div_ceil(4096) * 4096)
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode_handle(s: &str) -> Result<IpcHandle> {
    if s.len() != 128 || !s.is_ascii() {
        bail!(
            "an IPC handle is 128 hex digits, got {} characters",
            s.len()
        );
    }
    let mut out = [0u8; 64];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| anyhow!("bad hex digits {:?} in an IPC handle", &s[2 * i..2 * i + 2]))?;
    }
    Ok(out)
}

/// What the child is told to open.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChildSpec {
    Legacy {
        method: String,
        len: usize,
        handle: IpcHandle,
    },
    Vmm {
        method: String,
        len: usize,
        align: usize,
        /// (inherited descriptor number, handle size)
        fds: Vec<(i32, usize)>,
    },
}

impl ChildSpec {
    fn method(&self) -> &str {
        match self {
            ChildSpec::Legacy { method, .. } | ChildSpec::Vmm { method, .. } => method,
        }
    }

    fn len(&self) -> usize {
        match self {
            ChildSpec::Legacy { len, .. } | ChildSpec::Vmm { len, .. } => *len,
        }
    }

    fn to_arg(&self) -> String {
        match self {
            ChildSpec::Legacy {
                method,
                len,
                handle,
            } => format!("legacy/{method}/{len}/{}", hex_encode(handle)),
            ChildSpec::Vmm {
                method,
                len,
                align,
                fds,
            } => {
                let fds: Vec<String> = fds.iter().map(|(fd, n)| format!("{fd}:{n}")).collect();
                format!("vmm/{method}/{len}/{align}/{}", fds.join(","))
            }
        }
    }

    fn parse(s: &str) -> Result<ChildSpec> {
        let parts: Vec<&str> = s.split('/').collect();
        let num = |x: &str, what: &str| -> Result<usize> {
            x.parse::<usize>()
                .map_err(|_| anyhow!("child spec {s:?}: bad {what} {x:?}"))
        };
        match parts.as_slice() {
            ["legacy", method, len, hex] => Ok(ChildSpec::Legacy {
                method: method.to_string(),
                len: num(len, "length")?,
                handle: hex_decode_handle(hex)?,
            }),
            ["vmm", method, len, align, fds] => {
                let fds = fds
                    .split(',')
                    .map(|p| {
                        let (fd, n) = p
                            .split_once(':')
                            .ok_or_else(|| anyhow!("child spec {s:?}: bad handle {p:?}"))?;
                        let fd = fd
                            .parse::<i32>()
                            .map_err(|_| anyhow!("child spec {s:?}: bad descriptor {fd:?}"))?;
                        Ok((fd, num(n, "handle size")?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(ChildSpec::Vmm {
                    method: method.to_string(),
                    len: num(len, "length")?,
                    align: num(align, "alignment")?,
                    fds,
                })
            }
            _ => bail!("child spec {s:?} is neither legacy/... nor vmm/..."),
        }
    }
}

/// One measurement: written by the child (one JSON line each), completed by
/// the parent (its own times, the size in GiB).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
struct Row {
    method: String,
    gib: f64,
    iter: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    open_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usable_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    close_ms: Option<f64>,
    /// VMM steps of the child's open (import, reserve, map, set access).
    #[serde(skip_serializing_if = "Option::is_none")]
    import_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserve_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    map_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handles: Option<usize>,
    /// The parent's allocation (cuMemAlloc, or create+reserve+map+access)
    /// and export (cuIpcGetMemHandle or cuMemExportToShareableHandle) times.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_alloc_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_export_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_free_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn run(a: BenchIpcArgs) -> Result<ExitCode> {
    if let Some(spec) = &a.child {
        return child(&a, spec);
    }
    if a.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if a.sizes.is_empty() || a.methods.is_empty() {
        bail!("bench-ipc needs at least one size and one method");
    }
    let cuda = cuda::probe().map_err(|e| anyhow!("bench-ipc needs a CUDA GPU: {e}"))?;
    let gpu = cuda.device(a.gpu).context("bench-ipc")?;
    let exe = std::env::current_exe().context("finding this program for the child process")?;
    let _pinned_host = a
        .pin_host
        .map(|bytes| {
            gpu.pinned(bytes)
                .with_context(|| format!("pinning {bytes} bytes of host memory"))
        })
        .transpose()?;
    if !a.json {
        let info = gpu.info().context("reading the GPU's description")?;
        println!(
            "bench-ipc on GPU {} ({}), CUDA {}, {} repeat(s) per size and method",
            a.gpu,
            info.name,
            cuda.cuda_version(),
            a.repeat
        );
        if let Err(e) = gpu.vmm_supported() {
            println!("VMM: {e}");
        } else {
            let g = |k| {
                gpu.vmm_granularity(k)
                    .map(|b| format!("{} KiB", b >> 10))
                    .unwrap_or_else(|e| e.to_string())
            };
            println!(
                "VMM granularity: minimum {}, recommended {}",
                g(Granularity::Minimum),
                g(Granularity::Recommended)
            );
        }
    }
    let mut all = Vec::new();
    for &len in &a.sizes {
        for &m in &a.methods {
            let rows = measure(&a, &exe, &gpu, m, len);
            if a.json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            }
            all.extend(rows);
        }
    }
    if !a.json {
        print_table(&all);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the parent holds while the child maps it (kept alive, then freed).
struct Exported {
    _legacy: Option<DeviceMemory>,
    _vmm: Option<VmmMemory>,
    /// The exported descriptors (VMM), inheritable by the child.
    fds: Vec<OwnedFd>,
}

fn error_row(m: Method, len: usize, e: impl std::fmt::Display) -> Row {
    Row {
        method: m.name().to_string(),
        gib: len as f64 / GIB,
        error: Some(e.to_string()),
        ..Row::default()
    }
}

fn measure(a: &BenchIpcArgs, exe: &std::path::Path, gpu: &Gpu, m: Method, len: usize) -> Vec<Row> {
    let (held, spec, alloc_ms, export_ms) = match export(gpu, m, len) {
        Ok(x) => x,
        Err(e) => return vec![error_row(m, len, format!("{e:#}"))],
    };
    let out = Command::new(exe)
        .arg("bench-ipc")
        .arg("--gpu")
        .arg(a.gpu.to_string())
        .arg("--repeat")
        .arg(a.repeat.to_string())
        .args(a.no_warmup.then_some("--no-warmup"))
        .arg("--child")
        .arg(spec.to_arg())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    // The parent's copies of the descriptors are not needed once the child
    // has them (or failed to start).
    let mut held = held;
    held.fds.clear();
    let t = Instant::now();
    drop(held);
    let free_ms = ms(t.elapsed());
    let out = match out {
        Ok(o) => o,
        Err(e) => return vec![error_row(m, len, format!("starting the child: {e}"))],
    };
    let mut rows: Vec<Row> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Row>(l).ok())
        .collect();
    if rows.is_empty() || !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("no output").to_string();
        rows.push(error_row(
            m,
            len,
            format!("child exited with {}: {last}", out.status),
        ));
    }
    for r in &mut rows {
        r.method = m.name().to_string();
        r.gib = len as f64 / GIB;
        r.parent_alloc_ms = Some(alloc_ms);
        r.parent_export_ms = Some(export_ms);
        r.parent_free_ms = Some(free_ms);
    }
    rows
}

/// Allocates and exports `len` bytes by method `m`, every byte written,
/// then the markers.
fn export(gpu: &Gpu, m: Method, len: usize) -> Result<(Exported, ChildSpec, f64, f64)> {
    if len < 8 {
        bail!("a buffer of {len} bytes cannot hold the markers");
    }
    match m.vmm() {
        None => {
            let t = Instant::now();
            let mem = gpu.alloc(len).context("cuMemAlloc")?;
            let alloc_ms = ms(t.elapsed());
            // Every page written, as a loaded model's are (mapping costs
            // what is backed).
            mem.fill(0x5a)?;
            mem.copy_from_host(0, &HEAD_MARK)?;
            mem.copy_from_host(len - 4, &TAIL_MARK)?;
            let t = Instant::now();
            let handle = mem.ipc_handle()?;
            let export_ms = ms(t.elapsed());
            let spec = ChildSpec::Legacy {
                method: m.name().to_string(),
                len,
                handle,
            };
            let held = Exported {
                _legacy: Some(mem),
                _vmm: None,
                fds: Vec::new(),
            };
            Ok((held, spec, alloc_ms, export_ms))
        }
        Some(opts) => {
            let align = gpu.vmm_granularity(opts.granularity)?;
            let t = Instant::now();
            let mem = gpu.vmm_alloc_exportable_with(len, opts)?;
            let alloc_ms = ms(t.elapsed());
            mem.fill(0x5a)?;
            mem.copy_from_host(0, &HEAD_MARK)?;
            mem.copy_from_host(len - 4, &TAIL_MARK)?;
            let t = Instant::now();
            let fds = mem.export_fds()?;
            let export_ms = ms(t.elapsed());
            let mut spec_fds = Vec::with_capacity(fds.len());
            let mut owned = Vec::with_capacity(fds.len());
            for (fd, size) in fds {
                vmm::set_fd_inheritable(fd.as_fd(), true)
                    .context("letting the child inherit a VMM descriptor")?;
                spec_fds.push((fd.as_raw_fd(), size));
                owned.push(fd);
            }
            let spec = ChildSpec::Vmm {
                method: m.name().to_string(),
                len,
                align,
                fds: spec_fds,
            };
            let held = Exported {
                _legacy: None,
                _vmm: Some(mem),
                fds: owned,
            };
            Ok((held, spec, alloc_ms, export_ms))
        }
    }
}

/// The importing child: one JSON line per open; errors as rows, exit 0 once
/// its context exists (the parent reports what it printed).
fn child(a: &BenchIpcArgs, spec: &str) -> Result<ExitCode> {
    let spec = ChildSpec::parse(spec)?;
    let cuda = cuda::probe().map_err(|e| anyhow!("bench-ipc child: {e}"))?;
    let gpu = cuda.device(a.gpu)?;
    // Own the inherited descriptors (closed when the child ends).
    let fds: Vec<(OwnedFd, usize)> = match &spec {
        ChildSpec::Legacy { .. } => Vec::new(),
        ChildSpec::Vmm { fds, .. } => fds
            .iter()
            .map(|&(fd, n)| {
                vmm::take_inherited_fd(fd)
                    .map(|o| (o, n))
                    .with_context(|| format!("inherited VMM descriptor {fd}"))
            })
            .collect::<Result<_>>()?,
    };
    // Context creation and first-use costs stay out of the timings.
    if matches!(spec, ChildSpec::Vmm { .. }) {
        gpu.vmm_supported()?;
    }
    if !a.no_warmup {
        let warm = gpu.alloc(1 << 20)?;
        warm.copy_from_host(0, &[1, 2, 3, 4])?;
        let mut b = [0u8; 4];
        warm.copy_to_host(0, &mut b)?;
    }
    let len = spec.len();
    for iter in 0..a.repeat.max(1) {
        let mut row = Row {
            method: spec.method().to_string(),
            iter,
            ..Row::default()
        };
        match open_once(&gpu, &spec, &fds, len, &mut row) {
            Ok(()) => println!("{}", serde_json::to_string(&row)?),
            Err(e) => {
                row.error = Some(format!("{e:#}"));
                println!("{}", serde_json::to_string(&row)?);
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_marks(head: [u8; 4], tail: [u8; 4]) -> Result<()> {
    if head != HEAD_MARK || tail != TAIL_MARK {
        bail!(
            "markers read back wrong: head {} (want {}), tail {} (want {})",
            hex_encode(&head),
            hex_encode(&HEAD_MARK),
            hex_encode(&tail),
            hex_encode(&TAIL_MARK)
        );
    }
    Ok(())
}

fn open_once(
    gpu: &Gpu,
    spec: &ChildSpec,
    fds: &[(OwnedFd, usize)],
    len: usize,
    row: &mut Row,
) -> Result<()> {
    let (mut head, mut tail) = ([0u8; 4], [0u8; 4]);
    match spec {
        ChildSpec::Legacy { handle, .. } => {
            let t = Instant::now();
            let mem = gpu.open_ipc(handle, len).context("cuIpcOpenMemHandle")?;
            row.open_ms = Some(ms(t.elapsed()));
            mem.copy_to_host(0, &mut head)?;
            mem.copy_to_host(len - 4, &mut tail)?;
            row.usable_ms = Some(ms(t.elapsed()));
            let t = Instant::now();
            drop(mem);
            row.close_ms = Some(ms(t.elapsed()));
        }
        ChildSpec::Vmm { align, .. } => {
            let borrowed: Vec<_> = fds.iter().map(|(f, n)| (f.as_fd(), *n)).collect();
            let t = Instant::now();
            let mem = gpu
                .vmm_import_chunks(&borrowed, len, *align)
                .context("VMM import")?;
            row.open_ms = Some(ms(t.elapsed()));
            mem.copy_to_host(0, &mut head)?;
            mem.copy_to_host(len - 4, &mut tail)?;
            row.usable_ms = Some(ms(t.elapsed()));
            let st = mem.times();
            row.import_ms = Some(ms(st.handles));
            row.reserve_ms = Some(ms(st.reserve));
            row.map_ms = Some(ms(st.map));
            row.access_ms = Some(ms(st.set_access));
            row.handles = Some(fds.len());
            let t = Instant::now();
            drop(mem);
            row.close_ms = Some(ms(t.elapsed()));
        }
    }
    check_marks(head, tail)
}

fn f(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<12} {:>7} {:>4} {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>4} | {:>9} {:>9} {:>9}",
        "method",
        "GiB",
        "iter",
        "open ms",
        "usable ms",
        "close ms",
        "import",
        "reserve",
        "map",
        "access",
        "hdl",
        "p.alloc",
        "p.export",
        "p.free"
    );
    for r in rows {
        if let Some(e) = &r.error {
            println!("{:<12} {:>7.3} {:>4} error: {e}", r.method, r.gib, r.iter);
            continue;
        }
        println!(
            "{:<12} {:>7.3} {:>4} {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>4} | {:>9} {:>9} {:>9}",
            r.method,
            r.gib,
            r.iter,
            f(r.open_ms),
            f(r.usable_ms),
            f(r.close_ms),
            f(r.import_ms),
            f(r.reserve_ms),
            f(r.map_ms),
            f(r.access_ms),
            r.handles.map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
            f(r.parent_alloc_ms),
            f(r.parent_export_ms),
            f(r.parent_free_ms),
        );
    }
    // Best time to usable pointers per method and size.
    println!("\nbest usable ms (min over iterations):");
    let mut keys: Vec<(String, u64)> = Vec::new();
    for r in rows {
        let k = (r.method.clone(), r.gib.to_bits());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (method, gib_bits) in keys {
        let gib = f64::from_bits(gib_bits);
        let best = rows
            .iter()
            .filter(|r| r.method == method && r.gib.to_bits() == gib_bits)
            .filter_map(|r| r.usable_ms)
            .fold(None, |b: Option<f64>, x| Some(b.map_or(x, |b| b.min(x))));
        println!("  {method:<12} {gib:>7.3} GiB  {}", f(best));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_gib() {
        assert_eq!(parse_gib("1"), Ok(1 << 30));
        assert_eq!(parse_gib("16"), Ok(16 << 30));
        assert_eq!(parse_gib("0.5"), Ok(512 << 20));
        // Rounded up to 4 KiB.
        assert_eq!(parse_gib("0.000001"), Ok(4096));
        assert!(parse_gib("0").is_err());
        assert!(parse_gib("-1").is_err());
        assert!(parse_gib("abc").is_err());
        assert!(parse_gib("nan").is_err());
        assert!(parse_gib("1e9").is_err());
    }

    #[test]
    fn handle_hex_round_trip() {
        let mut h = [0u8; 64];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 37 + 5) as u8;
        }
        h[0] = 0;
        h[63] = 0xff;
        let s = hex_encode(&h);
        assert_eq!(s.len(), 128);
        assert_eq!(hex_decode_handle(&s).unwrap(), h);
        assert!(hex_decode_handle(&s[..126]).is_err());
        let mut bad = s.clone();
        bad.replace_range(10..12, "zz");
        assert!(hex_decode_handle(&bad).is_err());
    }

    #[test]
    fn child_spec_round_trip() {
        let specs = [
            ChildSpec::Legacy {
                method: "legacy".into(),
                len: 1 << 30,
                handle: [7u8; 64],
            },
            ChildSpec::Vmm {
                method: "vmm-chunk1g".into(),
                len: (3 << 30) + 4096,
                align: 2 << 20,
                fds: vec![(5, 1 << 30), (6, 1 << 30), (7, 1 << 30), (8, 2 << 20)],
            },
        ];
        for s in specs {
            assert_eq!(ChildSpec::parse(&s.to_arg()).unwrap(), s);
        }
        assert!(ChildSpec::parse("vmm/x/10/0/5").is_err());
        assert!(ChildSpec::parse("legacy/x/10/abcd").is_err());
        assert!(ChildSpec::parse("other/x").is_err());
    }

    #[test]
    fn rows_round_trip_through_json() {
        let r = Row {
            method: "vmm-rec".into(),
            gib: 4.0,
            iter: 2,
            open_ms: Some(1.5),
            usable_ms: Some(2.25),
            close_ms: Some(0.5),
            map_ms: Some(0.75),
            handles: Some(1),
            ..Row::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains("error"));
        assert_eq!(serde_json::from_str::<Row>(&line).unwrap(), r);
        assert!(check_marks(HEAD_MARK, TAIL_MARK).is_ok());
        assert!(check_marks(TAIL_MARK, HEAD_MARK).is_err());
    }
}
