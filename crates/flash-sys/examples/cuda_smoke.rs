//! Smoke test of `flash_sys::cuda` on a real GPU.
//!
//! `cargo run --release -p flash-sys --example cuda_smoke`
//!
//! Probes the driver, prints every GPU, allocates 1 GiB of device and pinned
//! memory, measures pinned host-to-device and device-to-host bandwidth (64 MiB
//! pieces over 2 streams, best of 3), checks the bytes round-trip, measures a
//! device-to-device copy, and has a child process map the memory through CUDA
//! IPC and check it. Exits non-zero on any mismatch or CUDA error; prints
//! "no CUDA: <reason>" and exits 0 where there is no usable driver.

use std::process::ExitCode;
use std::time::Instant;

use flash_sys::cuda::{self, Direction, Gpu, PinnedBuffer};

const GIB: usize = 1 << 30;
const PIECE: usize = 64 << 20;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2654435761) >> 7) as u8 ^ (i >> 20) as u8
}

fn fill_pattern(buf: &mut [u8], base: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(base + i);
    }
}

fn first_mismatch(buf: &[u8], base: usize) -> Option<usize> {
    buf.iter()
        .enumerate()
        .find(|(i, &b)| b != pattern(base + i))
        .map(|(i, _)| base + i)
}

/// FNV-1a over the bytes: what the IPC child reports back.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("ipc-child") {
        return ipc_child(&args[2..]);
    }
    let cuda = match cuda::probe() {
        Ok(c) => c,
        Err(reason) => {
            println!("no CUDA: {reason}");
            return ExitCode::SUCCESS;
        }
    };
    println!(
        "CUDA {} (driver API {}), kernel driver {}, {} GPU(s)",
        cuda.cuda_version(),
        cuda.api_version(),
        cuda.driver_version().unwrap_or("unknown"),
        cuda.device_count()
    );
    for i in 0..cuda.device_count() {
        match cuda.device(i).and_then(|g| g.info()) {
            Ok(info) => println!(
                "GPU {}: {} {} cc {}.{} mem {:.1}/{:.1} GiB free, PCIe {} gen {:?} x{:?} (~{} GB/s)",
                info.ordinal,
                info.name,
                info.uuid,
                info.compute_capability.0,
                info.compute_capability.1,
                info.free_bytes as f64 / GIB as f64,
                info.total_bytes as f64 / GIB as f64,
                info.pci_bus_id,
                info.pcie_link_gen,
                info.pcie_link_width,
                info.pcie_link_gbps().map(|g| format!("{g:.1}")).unwrap_or("?".into()),
            ),
            Err(e) => {
                println!("GPU {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let gpu = match cuda.device(0) {
        Ok(g) => g,
        Err(e) => {
            println!("FAIL: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&gpu) {
        Ok(()) => {
            println!("cuda_smoke: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(gpu: &Gpu) -> Result<(), String> {
    let e = |e: cuda::CudaError| e.to_string();
    let mem = gpu.alloc(GIB).map_err(e)?;
    let t = Instant::now();
    let mut bufs: Vec<PinnedBuffer> = Vec::new();
    for _ in 0..2 {
        bufs.push(gpu.pinned(GIB / 2).map_err(e)?);
    }
    let pin_s = t.elapsed().as_secs_f64();
    println!(
        "pinned 1 GiB (2 x 512 MiB, zeroed) in {pin_s:.3} s: {:.2} GB/s",
        gbps(GIB, pin_s)
    );
    let mut base = 0;
    for b in bufs.iter_mut() {
        fill_pattern(b, base);
        base += b.len();
    }
    let streams = [gpu.stream().map_err(e)?, gpu.stream().map_err(e)?];
    mem.fill(0).map_err(e)?;

    // Host to device, best of 3.
    let mut best = f64::MAX;
    for _ in 0..3 {
        let (d, back) =
            cuda::timed_pinned_copies(Direction::HostToDevice, &mem, bufs, &streams, PIECE)
                .map_err(e)?;
        bufs = back;
        best = best.min(d.as_secs_f64());
    }
    println!(
        "H2D pinned 1 GiB, 64 MiB pieces, 2 streams: {:.2} GB/s (best of 3)",
        gbps(GIB, best)
    );

    // The bytes arrived: read them back synchronously into pageable memory.
    // Touched up front, so the timing is the copy, not page faults.
    let mut host = vec![0x11u8; GIB];
    let t = Instant::now();
    mem.copy_to_host(0, &mut host).map_err(e)?;
    println!(
        "D2H pageable (sync) 1 GiB: {:.2} GB/s",
        gbps(GIB, t.elapsed().as_secs_f64())
    );
    if let Some(at) = first_mismatch(&host, 0) {
        return Err(format!("H2D round trip: byte {at} differs"));
    }
    println!("H2D round trip: 1 GiB equal");

    // Pageable host to device (synchronous), 64 MiB pieces.
    let t = Instant::now();
    for (i, chunk) in host.chunks(PIECE).enumerate() {
        mem.copy_from_host(i * PIECE, chunk).map_err(e)?;
    }
    println!(
        "H2D pageable (sync) 1 GiB: {:.2} GB/s",
        gbps(GIB, t.elapsed().as_secs_f64())
    );

    // Device to host into pinned buffers, after poisoning them.
    let mut best = f64::MAX;
    for _ in 0..3 {
        for b in bufs.iter_mut() {
            b.fill(0x5A);
        }
        let (d, back) =
            cuda::timed_pinned_copies(Direction::DeviceToHost, &mem, bufs, &streams, PIECE)
                .map_err(e)?;
        bufs = back;
        best = best.min(d.as_secs_f64());
    }
    println!(
        "D2H pinned 1 GiB, 64 MiB pieces, 2 streams: {:.2} GB/s (best of 3)",
        gbps(GIB, best)
    );
    let mut base = 0;
    for b in &bufs {
        if let Some(at) = first_mismatch(b, base) {
            return Err(format!("D2H round trip: byte {at} differs"));
        }
        base += b.len();
    }
    println!("D2H round trip: 1 GiB equal");

    // Bounds are enforced.
    let t = bufs.pop().expect("two buffers").lend(&streams[0]);
    let mut t = t;
    if t.copy_to_device(0..16, &mem, GIB - 8).is_ok() {
        return Err("an out-of-bounds upload was accepted".into());
    }
    bufs.push(t.wait().map_err(e)?);

    // Device to device, timed with events.
    let dst = gpu.alloc(GIB).map_err(e)?;
    let start = gpu.event(true).map_err(e)?;
    let end = gpu.event(true).map_err(e)?;
    let mut best_ms = f32::MAX;
    for _ in 0..3 {
        start.record(&streams[0]).map_err(e)?;
        mem.copy_to_device(0, &dst, 0, GIB, &streams[0])
            .map_err(e)?;
        end.record(&streams[0]).map_err(e)?;
        best_ms = best_ms.min(start.elapsed_ms(&end).map_err(e)?);
    }
    println!(
        "D2D 1 GiB: {:.3} ms, {:.0} GB/s copied ({:.0} GB/s read+write)",
        best_ms,
        gbps(GIB, best_ms as f64 / 1e3),
        gbps(2 * GIB, best_ms as f64 / 1e3)
    );
    let mut probe = vec![0u8; 1 << 20];
    dst.copy_to_host(GIB - probe.len(), &mut probe).map_err(e)?;
    if let Some(at) = first_mismatch(&probe, GIB - probe.len()) {
        return Err(format!("D2D copy: byte {at} differs"));
    }
    println!("D2D copy: last MiB equal");

    // CUDA IPC: a child process maps the allocation and checksums a prefix.
    let handle = mem.ipc_handle().map_err(e)?;
    println!("cuIpcGetMemHandle: OK");
    let check_len = 64 << 20;
    let expect = fnv(&host[..check_len]);
    let hex: String = handle.iter().map(|b| format!("{b:02x}")).collect();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(["ipc-child", "0", &hex, &check_len.to_string()])
        .output()
        .map_err(|e| format!("spawning the IPC child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got = stdout.trim();
    if !out.status.success() || got != expect.to_string() {
        return Err(format!(
            "IPC child: status {}, checksum {got:?}, expected {expect}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!("IPC: child process mapped the handle and read 64 MiB equal");
    drop(bufs);
    Ok(())
}

fn ipc_child(args: &[String]) -> ExitCode {
    let run = || -> Result<u64, String> {
        let ordinal: usize = args
            .first()
            .ok_or("ordinal")?
            .parse()
            .map_err(|_| "ordinal")?;
        let hex = args.get(1).ok_or("handle")?;
        let len: usize = args.get(2).ok_or("len")?.parse().map_err(|_| "len")?;
        let mut handle = [0u8; 64];
        for (i, b) in handle.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or("short handle")?, 16)
                .map_err(|_| "bad handle")?;
        }
        let cuda = cuda::probe().map_err(|e| e.to_string())?;
        let gpu = cuda.device(ordinal).map_err(|e| e.to_string())?;
        let mem = gpu.open_ipc(&handle, len).map_err(|e| e.to_string())?;
        let mut host = vec![0u8; len];
        mem.copy_to_host(0, &mut host).map_err(|e| e.to_string())?;
        if gpu.open_ipc(&handle, usize::MAX / 2).is_ok() {
            return Err("an IPC mapping larger than the allocation was accepted".into());
        }
        Ok(fnv(&host))
    };
    match run() {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ipc-child: {e}");
            ExitCode::FAILURE
        }
    }
}
