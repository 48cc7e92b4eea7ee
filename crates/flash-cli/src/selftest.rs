//! `flash selftest`: the binary checks itself on machines that have no Rust
//! toolchain; the exit code says it all. The checks are flash-check's: the
//! load path (`selftest`: synthesized models through every path to every GPU
//! and the host, every byte against the import's checksums), the inference
//! engine (`engine::selftest`), and with `--daemon` the daemon
//! (`daemon::selftest`, a real daemon started from this binary). This
//! module prints their reports.

use crate::ctx::Ctx;
use crate::engine_cli;
use anyhow::Result;
use flash_check::engine::{self, EngineSelftest};
use flash_check::selftest::{self as checks, Check};
use flash_check::ScratchDir;
use std::process::ExitCode;

/// `flash selftest [--engine-only]`: in a scratch folder of the store.
pub fn run(ctx: &Ctx, require_gpu: bool, json: bool, engine_only: bool) -> Result<ExitCode> {
    let scratch = ScratchDir::new(
        ctx.store()?
            .root()
            .join("tmp")
            .join(format!("selftest-{}-0", std::process::id())),
    )?;
    let (gpus, no_gpu) = checks::gpus()?;
    if let Some(why) = &no_gpu {
        eprintln!("selftest: no GPU ({why}); checking the host paths only");
    }
    let loads = if engine_only {
        Vec::new()
    } else {
        checks::load_checks(scratch.path(), &gpus, |_| {})?
    };
    let engine = engine::selftest(scratch.path(), gpus.first(), true, |p| {
        engine_cli::print_progress(&p)
    });
    let failed = loads.iter().filter(|c| !c.ok).count() + usize::from(!engine.ok);
    let gpu_missing = require_gpu && gpus.is_empty();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed == 0 && !gpu_missing,
                "gpus": gpus.len(),
                // Host loads of the compressed models decode with it.
                "cpu_decoder": flash_codec::cpu_decoder(),
                "checks": loads,
                "engine": engine,
            }))?
        );
    } else {
        print_checks(&loads, &engine, failed, gpus.len());
    }
    if gpu_missing {
        eprintln!("selftest: --require-gpu given but no GPU is usable");
    }
    Ok(if failed == 0 && !gpu_missing {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_checks(loads: &[Check], engine: &EngineSelftest, failed: usize, gpus: usize) {
    for c in loads {
        println!(
            "{:<4} {:<11} {:<7} {:<11} {:<8} {:<6} {:>4} tensors {:>12} bytes {:>7.3}s{}",
            if c.ok { "ok" } else { "FAIL" },
            c.model,
            c.device,
            c.source,
            c.io,
            if c.subset { "subset" } else { "all" },
            c.tensors,
            c.bytes,
            c.seconds,
            if c.wrong.is_empty() {
                String::new()
            } else {
                format!("  wrong: {}", c.wrong.join(", "))
            }
        );
    }
    engine_cli::print(engine);
    println!(
        "selftest: {} checks, {failed} failed, {gpus} GPU(s), CPU decoder {}",
        loads.len(),
        flash_codec::cpu_decoder(),
    );
}

/// `flash selftest --daemon`: a daemon started from this binary on a
/// scratch store, checked from this process and a second one.
pub fn run_daemon(require_gpu: bool, json: bool) -> Result<ExitCode> {
    let steps = flash_check::daemon::selftest(&std::env::current_exe()?, require_gpu)?;
    let all_ok = steps.iter().all(|s| s.ok);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": all_ok, "checks": steps}))?
        );
    } else {
        for s in &steps {
            println!(
                "{:<4} {:<44} {}",
                if s.ok { "ok" } else { "FAIL" },
                s.name,
                s.detail
            );
        }
        println!(
            "{}",
            if all_ok {
                "daemon selftest passed"
            } else {
                "daemon selftest FAILED"
            }
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
