//! Writes one synthetic checkpoint (the folder the Python compatibility test
//! reads).
//!
//! ```text
//! cargo run -p flash-synth --example synth -- ARCH SIZE OUT [SEED] [DTYPE] [MAX_SHARD_BYTES]
//! cargo run -p flash-synth --example synth -- qwen3 tiny /tmp/qwen3-tiny 1
//! cargo run --release -p flash-synth --example synth -- --bench-gen   # generator alone
//! ```

use flash_format::DType;
use flash_synth::{spec, synth, tensor_data, Arch, SynthOptions};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Generator speed without the disk: one thread refilling a warm 64 MiB
/// buffer, then Qwen3-8B's embedding (1.2 GB of BF16, fresh memory) on one
/// thread and on all of them.
fn bench_gen() -> Result<(), String> {
    for dtype in [DType::BF16, DType::F32] {
        let filler =
            flash_synth::random::Filler::new(flash_synth::Init::Normal { std: 0.02 }, dtype)
                .map_err(|e| format!("{e}"))?;
        let mut buf = vec![0u8; 64 << 20];
        let rounds = 16u64;
        let start = std::time::Instant::now();
        for r in 0..rounds {
            filler.fill(0, 1, r, &mut buf);
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{dtype}: fill a warm buffer on 1 thread: {:.0} MB/s",
            (rounds * buf.len() as u64) as f64 / 1e6 / secs
        );
    }
    let model = spec(Arch::Qwen3, "8b").map_err(|e| format!("{e}"))?;
    let embed = model.tensors(DType::BF16).swap_remove(0);
    let threads = rayon::current_num_threads();
    for n in [1, threads] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| format!("{e}"))?;
        let start = std::time::Instant::now();
        let data = pool
            .install(|| tensor_data(0, &embed))
            .map_err(|e| format!("{e}"))?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "generate {} MB on {n} thread(s): {:.0} MB/s",
            data.len() / 1_000_000,
            data.len() as f64 / 1e6 / secs
        );
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--bench-gen") {
        return bench_gen();
    }
    if args.len() < 3 {
        return Err("usage: synth ARCH SIZE OUT [SEED] [DTYPE] [MAX_SHARD_BYTES]".into());
    }
    let arch = args[0].parse().map_err(|e| format!("{e}"))?;
    let model = spec(arch, &args[1]).map_err(|e| format!("{e}"))?;
    let mut opts = SynthOptions::default();
    if let Some(s) = args.get(3) {
        opts.seed = s.parse().map_err(|e| format!("seed {s:?}: {e}"))?;
    }
    if let Some(d) = args.get(4) {
        opts.dtype = d.to_uppercase().parse().map_err(|e| format!("{e}"))?;
    }
    if let Some(m) = args.get(5) {
        opts.max_shard_bytes = m
            .parse()
            .map_err(|e| format!("max shard bytes {m:?}: {e}"))?;
    }
    // Print a line per GB written.
    let next = Arc::new(AtomicU64::new(1_000_000_000));
    opts.progress = Some(Arc::new(move |done, total| {
        if done >= next.load(Ordering::Relaxed) {
            next.fetch_add(1_000_000_000, Ordering::Relaxed);
            eprintln!("{:.1} / {:.1} GB", done as f64 / 1e9, total as f64 / 1e9);
        }
    }));
    let report = synth(&model, args[2].as_ref(), &opts).map_err(|e| format!("{e}"))?;
    let secs = report.elapsed.as_secs_f64();
    println!(
        "{}: {} tensors, {} params, {} files, {} bytes in {:.2} s ({:.0} MB/s) -> {}",
        model.name(),
        report.tensors,
        report.params,
        report.files.len(),
        report.total_bytes,
        secs,
        report.total_bytes as f64 / 1e6 / secs.max(1e-9),
        report.dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
