//! Command-line arguments.

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
    },
    /// Write a Hugging Face style checkpoint with random weights and real shapes
    Synth(SynthArgs),
    /// Measure load speed against a baseline and the hardware's limits
    Bench(BenchArgs),
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
    },
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
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
    #[arg(long)]
    pub json: bool,
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
    /// Bytes of one pinned staging buffer on the way to a GPU (suffixes K, M, G)
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub staging_size: u64,
    /// Reader threads [default: two per core, 4 to 32]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Bytes per read (suffixes K, M, G)
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Timed runs per loader and scenario (the best is reported)
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// One JSON object per measurement, one per line
    #[arg(long)]
    pub json: bool,
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
    fn sizes() {
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("5G").unwrap(), 5 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
    }
}
