//! Command-line arguments: every clap struct of the binary, and nothing
//! else of the crate (this module depends on no other), so each command
//! module reads its arguments from here and turns them into the libraries'
//! options.
//!
//! The doc comments below are clap's `--help` text, plain text read in a
//! terminal (`ORG/NAME[:REVISION]`, `bench/<arch>-<size>-<i>`), not Markdown.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "flash",
    version,
    about = "Load model weights from SSD into GPU memory as fast as the hardware allows",
    long_about = "flash keeps models in a local store in the flash format (aligned, checksummed, \
                  laid out for O_DIRECT and GPU copies) and loads them with a pipeline that keeps \
                  storage, staging and PCIe busy at once.\n\n\
                  Quick start:\n  flash synth qwen3 tiny /tmp/tiny\n  flash pull --from /tmp/tiny --name demo/tiny\n  \
                  flash bench demo/tiny\n  flash verify demo/tiny"
)]
pub struct Cli {
    /// The store's folder [default: $FLASH_HOME, else the user's cache folder]
    #[arg(long, global = true, value_name = "PATH")]
    pub storage: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bars
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download a model from the Hugging Face Hub (or import a local folder) into the store
    Pull(PullArgs),
    /// List the models in the store
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a model's details
    Info {
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a model from the store
    Rm { model: String },
    /// Re-read every chunk of a model and check it against its checksums
    Verify {
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a model back out as safetensors (through the load path)
    Export {
        model: String,
        /// Folder to create (must not exist, or be empty)
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Largest shard, in bytes (suffixes K, M, G)
        #[arg(long, default_value = "5G", value_parser = parse_size)]
        shard_size: u64,
        /// Of a model pulled with --tp: write this rank's tensors alone
        /// (their names, the part's shape) [default: all ranks gathered
        /// back into the whole model]
        #[arg(long, value_name = "R")]
        rank: Option<u32>,
    },
    /// Write a Hugging Face style checkpoint with random weights and real shapes
    Synth(SynthArgs),
    /// Show or change the store's defaults: `flash config`, `flash config compress on`
    Config {
        /// A setting: compress
        key: Option<String>,
        /// Its new value: on, off or auto (compress where an NVIDIA GPU is
        /// present, the default)
        value: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Measure load speed against a baseline and the hardware's limits
    Bench(BenchArgs),
    /// Compare ways of reading files cold (O_DIRECT or buffered, readers,
    /// request size, order, readahead, io_uring), alternating round by round
    BenchDisk(BenchDiskArgs),
    /// Report the machine's limits: GPUs, PCIe and disk bandwidth, io_uring
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Synthesize a model, load it to every GPU (or the CPU) and check every byte
    Selftest {
        /// Fail when no GPU is usable
        #[arg(long)]
        require_gpu: bool,
        #[arg(long)]
        json: bool,
        /// Only the inference engine's checks (ops, kernel cache, GPU vs. CPU forward)
        #[arg(long)]
        engine_only: bool,
        /// Only the daemon's check: start a daemon on a scratch store, load a tiny
        /// model to the GPU (or memory), attach from this and a second process in
        /// share mode, fill a buffer of this process in copy mode, compare every byte, stop
        #[arg(long, conflicts_with = "engine_only")]
        daemon: bool,
    },
    /// Prefill and decode speed of the GPU engine with the model resident, against the roofline
    BenchEngine(BenchEngineArgs),
    /// Teacher-forced logits of every position, written as f32 (checks against a reference)
    #[command(hide = true)]
    EngineLogits(EngineLogitsArgs),
    /// Compile every CUDA source the binary carries with NVRTC, without a GPU
    #[command(hide = true)]
    Kernels(KernelsArgs),
    /// Generate text with a model: streams to stdout, timings on stderr
    Run(RunArgs),
    /// Start the daemon (in the background, unless --foreground)
    Start(StartArgs),
    /// Stop the daemon gracefully (loads in flight finish, memory is returned)
    Stop {
        /// Seconds to wait for the daemon to exit
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// The daemon's version, uptime, tiers (budgets, use, hits, misses) and models
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Models resident in the daemon's tiers
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Load a model into a tier of the daemon ahead of use (prewarm)
    Load {
        /// ORG/NAME, or ORG/NAME#R for rank R of a model pulled with --tp
        model: String,
        /// GPU ordinal [default: GPU 0 when the daemon has one, else memory]
        #[arg(long, value_name = "N")]
        gpu: Option<u32>,
        /// Load into the memory tier
        #[arg(long, conflicts_with = "gpu")]
        memory: bool,
        /// Never evict it (until `flash unload`)
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        json: bool,
    },
    /// Drop a model from the daemon's tiers
    Unload {
        model: String,
        /// gpu, gpu:N or memory [default: every tier]
        #[arg(long)]
        tier: Option<String>,
    },
    /// Lease a model from the daemon like a client would: map it (share mode)
    /// or have it copied into a buffer of this process (copy mode), check the
    /// bytes against the store, optionally hold the lease
    Attach(AttachArgs),
    /// Daemon benchmarks: memory tier -> GPU, attaching in share mode, and a
    /// swap workload (many models, concurrent clients, Zipf requests)
    BenchDaemon(BenchDaemonArgs),
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
}

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// Bytes of the memory tier, one pool made (and pinned, with a GPU) at start
    /// [default: a quarter of the machine's memory, at most 32G]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem_pool: Option<u64>,
    /// Share of each GPU's memory for its tier
    #[arg(long, default_value_t = 0.8, value_name = "F")]
    pub gpu_mem_util: f64,
    /// Bytes of each GPU's tier (instead of --gpu-mem-util)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub gpu_budget: Option<u64>,
    /// Bytes per read (suffixes K, M, G); the loader's default, measured on
    /// the GPU machine's disk
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Reader threads per load [default: one per core, 4 to 16]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also serve gRPC on TCP at this host (requires --port; clients need $FLASH_HOME/daemon.token)
    #[arg(long, requires = "port")]
    pub host: Option<String>,
    #[arg(long, requires = "host")]
    pub port: Option<u16>,
    /// HTTP listener for the OpenAI API (/v1), /metrics and /health, or "off"
    #[arg(long, default_value = "127.0.0.1:7777", value_name = "ADDR")]
    pub http: String,
    /// Ignore GPUs (memory tier only)
    #[arg(long)]
    pub no_gpu: bool,
    /// Seconds after which a request counts half as much in a model's
    /// popularity (the tiers evict the least popular idle copies first):
    /// longer protects models used steadily from bursts of others, shorter
    /// follows a changing workload sooner
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS",
          value_parser = parse_half_life)]
    pub popularity_half_life: f64,
    /// Loads that read the store's disk at once (0: no limit); the others
    /// wait for a turn, the smallest first, without holding room in a tier
    /// (one at most a quarter of the size of every load reading starts
    /// beside them). One load keeps the disk busy, so a second would only
    /// share its rate
    #[arg(long, default_value_t = flash_daemon::DEFAULT_DISK_LOADS, value_name = "N")]
    pub disk_loads: usize,
    /// Run in this process instead of in the background
    #[arg(long)]
    pub foreground: bool,
    /// Seconds to wait for a background daemon to answer
    #[arg(long, default_value_t = 180)]
    pub wait: u64,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// ORG/NAME, or ORG/NAME#R for rank R of a model pulled with --tp
    pub model: String,
    /// memory, gpu, gpu:N [default: GPU 0 when the daemon has one, else memory]
    #[arg(long, default_value = "auto")]
    pub tier: String,
    /// Copy mode: have the daemon fill a buffer of this process instead of mapping its copy
    #[arg(long)]
    pub copy: bool,
    /// Compare every tensor with the store's bytes
    #[arg(long)]
    pub verify: bool,
    /// Hold the lease this many seconds before releasing it (0: until killed)
    #[arg(long, value_name = "SECONDS")]
    pub hold: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchDaemonArgs {
    /// upload (memory tier -> GPU), attach (a second process to usable
    /// pointers, share mode), swap (the workload below), or all
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// The model of upload and attach [default: the first swap model]
    #[arg(long)]
    pub model: Option<String>,
    /// Swap models: synthesize ARCH:SIZE models named bench/<arch>-<size>-<i>
    /// into the store when missing (pulled with --no-compress unless
    /// --compress)
    #[arg(long, default_value = "qwen3:tiny", value_name = "ARCH:SIZE")]
    pub synth: String,
    /// Keep only this many decoder layers of the synthesized models (smaller
    /// models of real width, e.g. 0.6b with 2 layers is ~0.37 GB)
    #[arg(long)]
    pub layers: Option<usize>,
    /// Store the synthesized swap models compressed (named
    /// bench/<arch>-<size>-c-<i>): the memory tier then holds more of them
    /// and each load from disk reads about two thirds of the bytes
    #[arg(long)]
    pub compress: bool,
    /// Number of swap models
    #[arg(long, default_value_t = 100)]
    pub models: usize,
    /// Concurrent clients (each its own connection and session)
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Zipf exponent of model popularity
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Seconds of swap workload
    #[arg(long, default_value_t = 300.0)]
    pub duration: f64,
    /// Tier each request asks for [default: GPU 0 when the daemon has one, else memory]
    #[arg(long, default_value = "auto")]
    pub tier: String,
    /// Open each GPU lease's IPC handle (pointers usable), as a real client would
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub map: bool,
    /// Runs of upload and attach (the best and the median are reported)
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// ORG/NAME[:REVISION] on the Hub (or the store name with --from)
    pub model: Option<String>,
    /// Import this local Hugging Face style folder instead of downloading
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    /// Store name for --from [default: local/<folder name>]
    #[arg(long, value_name = "ORG/NAME")]
    pub name: Option<String>,
    /// Hub revision: branch, tag or commit
    #[arg(long)]
    pub revision: Option<String>,
    /// Convert floating tensors: auto (keep), bf16, fp16, fp32
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Replace the model if the store has it
    #[arg(long)]
    pub force: bool,
    /// Store floating-point tensors compressed (lossless: exponents
    /// entropy-coded, decoded on the GPU while loading) [default: the
    /// store's setting, see `flash config`]
    #[arg(long, overrides_with = "no_compress")]
    pub compress: bool,
    /// Store tensors verbatim, whatever the store's setting
    #[arg(long)]
    pub no_compress: bool,
    /// Store the model split for tensor parallelism into N ranks (one
    /// per GPU), as vLLM splits Qwen3, Llama and Qwen2 layers
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub tp: u32,
    #[arg(long)]
    pub json: bool,
}

impl PullArgs {
    /// Whether to compress: the flag given, else the store's default.
    pub fn compress_or(&self, default: bool) -> bool {
        if self.compress {
            true
        } else if self.no_compress {
            false
        } else {
            default
        }
    }
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// qwen3 or llama
    pub arch: String,
    /// qwen3: tiny 0.6b 1.7b 4b 8b 14b 32b; llama: tiny 1b 8b
    pub size: String,
    /// Folder to create
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// bf16, fp16 or fp32
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Largest shard, in bytes (suffixes K, M, G)
    #[arg(long, default_value = "5G", value_parser = parse_size)]
    pub shard_size: u64,
    /// Another attention head size than the preset's (even; e.g. 64 for
    /// runtimes whose attention takes only some sizes)
    #[arg(long)]
    pub head_dim: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A store model (ORG/NAME) or a folder (flash format or safetensors)
    #[arg(required_unless_present = "synth")]
    pub target: Option<String>,
    /// Synthesize ARCH:SIZE into the store's scratch space and bench that
    #[arg(long, value_name = "ARCH:SIZE", conflicts_with = "target")]
    pub synth: Option<String>,
    /// cold (page cache evicted), warm (page cache filled), pinned (source
    /// already in pinned host memory; GPU only), or all
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// auto (cuda:0 when a GPU is usable, else cpu), cpu, or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Loaders to run, comma-separated: disk, flash, mmap [default: all]
    #[arg(long, value_delimiter = ',')]
    pub loader: Vec<String>,
    /// How flash reads files: auto (O_DIRECT unless the page cache holds
    /// the file), direct, or buffered
    #[arg(long, default_value = "auto")]
    pub io: String,
    /// How the readers walk the files: shared (one queue in file order) or
    /// per-file (readers spread over the files, each read front to back)
    /// [default: the loader's]
    #[arg(long)]
    pub order: Option<String>,
    /// Kernel hint for files read through the page cache: sequential,
    /// willneed (ask for the next window ahead), none [default: the loader's]
    #[arg(long)]
    pub advice: Option<String>,
    /// A whole read pattern, IO:ORDER:THREADSxREQUEST[:ADVICE] (e.g.
    /// buffered:per-file:4x16M), instead of --io, --order, --threads,
    /// --chunk-size and --advice
    #[arg(long, conflicts_with_all = ["io", "order", "threads", "chunk_size", "advice"])]
    pub pattern: Option<String>,
    /// Bytes of one pinned staging buffer on the way to a GPU (suffixes K, M,
    /// G) [default: the read size]
    #[arg(long, value_parser = parse_size)]
    pub staging_size: Option<u64>,
    /// Pinned staging buffers per reader (all readers together pin at most 1 GiB)
    #[arg(long, default_value_t = 2)]
    pub staging_buffers: usize,
    /// Reader threads [default: one per core, 4 to 16]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Bytes per read (suffixes K, M, G); the loader's default, measured on
    /// the GPU machine's disk
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Timed runs per loader and scenario (the best is reported)
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// One JSON object per measurement, one per line
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchDiskArgs {
    /// Files to read, or folders (their *.safetensors, or a flash model's
    /// data files)
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// A read pattern IO:ORDER:THREADSxREQUEST[:ADVICE][:qdN], repeatable
    /// (e.g. direct:shared:16x32M, buffered:per-file:4x16M:willneed,
    /// direct:per-file:4x8M:qd8 for io_uring) [default: the doctor's candidates]
    #[arg(long)]
    pub pattern: Vec<String>,
    /// Rounds; each round reads with every pattern, the order rotated by one
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Read only the first SIZE bytes of each file (suffixes K, M, G)
    #[arg(long, value_parser = parse_size)]
    pub limit: Option<u64>,
    /// One JSON object per read, then one with the medians
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A store model (ORG/NAME) or a model folder (Hugging Face or flash format)
    pub model: String,
    /// The prompt; read from stdin when absent or "-"
    pub prompt: Option<String>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy [default: the model's
    /// generation_config.json when it samples, else greedy]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability
    /// [default: generation_config.json, else off]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens; 0 = off [default:
    /// generation_config.json, else off]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Penalty on tokens already seen (1 = off) [default:
    /// generation_config.json, else off]
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler (same seed, same text)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable)
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// A system message before the prompt (chat template only)
    #[arg(long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,
    /// Send the prompt as is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object at the end instead of streaming text
    #[arg(long)]
    pub json: bool,
    /// With --json: add "last_logits", the logits at the prompt's last
    /// position (for checking the engine against a reference)
    #[arg(long, requires = "json")]
    pub logits: bool,
    /// Run in this process instead of through the flash daemon
    #[arg(long)]
    pub no_daemon: bool,
    /// auto (a GPU when one is usable and the model is bf16, else the
    /// CPU), cpu, or cuda:N (that GPU, or an error); cpu and cuda:N run in
    /// this process
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct BenchEngineArgs {
    /// A store model (ORG/NAME) or a model folder
    pub model: String,
    /// Tokens of the timed prefill
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens decoded one at a time after the prefill
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Timed repetitions (the best is reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// GPU ordinal
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Decode with cuBLAS products only (not the fused decode kernels)
    #[arg(long)]
    pub no_fused_decode: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EngineLogitsArgs {
    /// A store model (ORG/NAME) or a model folder
    pub model: String,
    /// Token ids, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// File to write: little-endian f32 [tokens, vocab]
    #[arg(long)]
    pub out: PathBuf,
    /// gpu or cpu (the f32 reference)
    #[arg(long, default_value = "gpu")]
    pub device: String,
    /// Decode one token at a time after a prefill of this many (0: one
    /// batched pass over all tokens)
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// GPU: logits rounded to bf16, as transformers' bf16 lm_head gives them
    #[arg(long)]
    pub bf16_logits: bool,
    /// GPU: round like transformers' bf16 forward (bf16 residual stream, bf16 RoPE)
    #[arg(long)]
    pub hf_rounding: bool,
}

#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Compile every source with NVRTC, load nothing (the only mode so far)
    #[arg(long, required = true)]
    pub compile_only: bool,
    /// Target architecture (sm_90, sm_100, 8.9, ...)
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
    #[arg(long)]
    pub json: bool,
}

/// A half-life in seconds: finite and above 0.
fn parse_half_life(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds above 0")),
    }
}

/// Parses `123`, `16M`, `5G`, `1.5GiB`... (binary multiples, except that a
/// bare `G`/`GB` after digits is also read as 2^30 for simplicity).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 16M or 5G)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G or T)")),
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn read_size_defaults_are_the_loaders() {
        for args in [vec!["flash", "start"], vec!["flash", "bench", "demo/tiny"]] {
            let chunk = match Cli::try_parse_from(&args).unwrap().command {
                Command::Start(a) => a.chunk_size,
                Command::Bench(a) => a.chunk_size,
                _ => unreachable!("{args:?}"),
            };
            assert_eq!(chunk, flash_load::DEFAULT_READ_BYTES, "{args:?}");
        }
        // The staging buffers follow the read size unless set.
        let Command::Bench(a) = Cli::try_parse_from(["flash", "bench", "demo/tiny"])
            .unwrap()
            .command
        else {
            unreachable!()
        };
        assert_eq!(a.staging_size, None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("5G").unwrap(), 5 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
    }
}
