//! `flash`: the command-line front of flashtensors. It parses arguments,
//! turns them into the libraries' options, draws progress bars, prints
//! tables or JSON and sets the exit code; the work itself is done by the
//! library crates (flash-store, flash-load, flash-synth, flash-engine, the
//! daemon's flash-daemon and flash-client, and flash-check for the
//! doctor, the benchmarks and the self-checks).
//!
//! Modules, each depending only on those listed before it (no circle):
//! - `args`: every clap struct (depends on nothing of the crate);
//! - `ctx`: what every command resolves the same way (the store, model
//!   names and folders, the kernel cache, a GPU);
//! - `progress`: progress bars;
//! - `daemon` (start, stop, status, ps, load, unload, attach), then
//!   `run_remote` (`flash run` through the daemon), then `run` (`flash run`
//!   in this process, or handed to `run_remote`);
//! - one module per group of commands: `commands` (the store), `bench`,
//!   `doctor`, `engine_cli`, `selftest`, `kernels_cli`, `daemon_bench`.

mod args;
mod bench;
mod clock;
mod commands;
mod ctx;
mod daemon;
mod daemon_bench;
mod doctor;
mod engine_cli;
mod kernels_cli;
mod progress;
mod run;
mod run_remote;
mod selftest;

use args::{Cli, Command};
use clap::{CommandFactory, Parser};
use std::process::ExitCode;

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Library errors often name their
/// cause in their own message too; a cause already said is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = ctx::Ctx::new(cli.storage.clone(), cli.quiet);
    match cli.command {
        Command::Pull(a) => commands::pull(&ctx, a),
        Command::List { json } => commands::list(&ctx, json),
        Command::Info { model, json } => commands::info(&ctx, &model, json),
        Command::Rm { model } => commands::rm(&ctx, &model),
        Command::Verify { model, json } => commands::verify(&ctx, &model, json),
        Command::Export {
            model,
            to,
            shard_size,
            rank,
        } => commands::export(&ctx, &model, &to, shard_size, rank),
        Command::Synth(a) => commands::synth(&ctx, a),
        Command::Config { key, value, json } => {
            commands::config(&ctx, key.as_deref(), value.as_deref(), json)
        }
        Command::Bench(a) => bench::run(&ctx, a),
        Command::BenchDisk(a) => bench::disk(a),
        Command::Doctor { json } => {
            let store = ctx.store()?;
            doctor::run(store.root(), json).map(|_| ExitCode::SUCCESS)
        }
        Command::Selftest {
            require_gpu,
            json,
            daemon: true,
            ..
        } => selftest::run_daemon(require_gpu, json),
        Command::Selftest {
            require_gpu,
            json,
            engine_only,
            ..
        } => selftest::run(&ctx, require_gpu, json, engine_only),
        Command::BenchEngine(a) => engine_cli::bench(&ctx, a),
        Command::EngineLogits(a) => engine_cli::logits(&ctx, a),
        Command::Kernels(a) => kernels_cli::run(a),
        Command::Run(a) => run::run(&ctx, a),
        Command::Start(a) => daemon::start(&cli.storage, cli.verbose, a),
        Command::Stop { timeout } => daemon::stop(&cli.storage, timeout),
        Command::Status { json } => daemon::status(&cli.storage, json),
        Command::Ps { json } => daemon::ps(&cli.storage, json),
        Command::Load {
            model,
            gpu,
            memory,
            keep,
            json,
        } => daemon::load(&cli.storage, &model, gpu, memory, keep, json),
        Command::Unload { model, tier } => daemon::unload(&cli.storage, &model, tier.as_deref()),
        Command::Attach(a) => daemon::attach(&cli.storage, a),
        Command::BenchDaemon(a) => daemon_bench::run(&ctx, a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "flash", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}
