//! Writes test data for the GPU decoder check (tests/gpu_check.py):
//!
//!     cargo run -p flash-codec --release --example gpu_testdata -- DIR
//!
//! DIR/stored.bin   the stored chunks, each at a 16-byte aligned offset
//! DIR/decoded.bin  the decoded tensors, back to back (each tensor at a
//!                  256-byte aligned offset)
//! DIR/chunks.bin   per chunk 32 bytes, little-endian: u64 offset in
//!                  stored.bin, u64 offset in decoded.bin, u32 elements,
//!                  u32 kind (GpuChunk::kind), u32 stored length, u32 tensor
//! DIR/tensors.txt  one line per tensor: index, layout, elements, what

use flash_codec::{encode_tensor, ChunkInfo, Codec, GpuChunk, Layout, CHUNK_ELEMS};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::Write;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{normal, to_bytes};

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: gpu_testdata DIR"));
    std::fs::create_dir_all(&dir)?;
    let mut rng = SmallRng::seed_from_u64(2024);
    let mut random = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill(&mut v[..]);
        v
    };
    let mut rng2 = SmallRng::seed_from_u64(7);
    let tensors: Vec<(Layout, Vec<u8>, &str)> = vec![
        (
            Layout::Bf16,
            to_bytes(Layout::Bf16, &normal(&mut rng2, 6 << 20, 0.02)),
            "bf16 normal(0, 0.02)",
        ),
        (
            Layout::F16,
            to_bytes(Layout::F16, &normal(&mut rng2, (1 << 20) + 1234, 1.0)),
            "f16 normal(0, 1)",
        ),
        (
            Layout::F32,
            to_bytes(Layout::F32, &normal(&mut rng2, (1 << 20) + 77, 0.5)),
            "f32 normal(0, 0.5)",
        ),
        (
            Layout::Bf16,
            to_bytes(Layout::Bf16, &vec![0.125; 70_000]),
            "bf16 constant",
        ),
        (
            Layout::Bf16,
            random(2 * 200_000 + 6),
            "bf16 random bytes (raw chunks)",
        ),
        (
            Layout::F32,
            random(4 * 100_001),
            "f32 random bytes (raw chunks)",
        ),
        (
            Layout::Bf16,
            to_bytes(Layout::Bf16, &normal(&mut rng2, 45, 0.02)),
            "bf16 tiny",
        ),
    ];
    let mut stored = Vec::new();
    let mut decoded = Vec::new();
    let mut chunks = Vec::new();
    let mut lines = String::new();
    let (mut rans, mut raw) = (0, 0);
    for (t, (layout, data, what)) in tensors.iter().enumerate() {
        decoded.resize(decoded.len().div_ceil(256) * 256, 0);
        let eb = layout.elem_bytes();
        lines.push_str(&format!("{t} {layout:?} {} {what}\n", data.len() / eb));
        for (i, (codec, bytes)) in encode_tensor(*layout, data, CHUNK_ELEMS)
            .into_iter()
            .enumerate()
        {
            let part = &data[i * CHUNK_ELEMS * eb..((i + 1) * CHUNK_ELEMS * eb).min(data.len())];
            let elems = part.len() / eb;
            if codec == Codec::Rans {
                ChunkInfo::parse(*layout, elems, &bytes).expect("valid");
                rans += 1;
            } else {
                raw += 1;
            }
            stored.resize(stored.len().div_ceil(16) * 16, 0);
            chunks.extend_from_slice(&(stored.len() as u64).to_le_bytes());
            chunks.extend_from_slice(&(decoded.len() as u64).to_le_bytes());
            chunks.extend_from_slice(&(elems as u32).to_le_bytes());
            chunks.extend_from_slice(&GpuChunk::kind_of(*layout, codec).to_le_bytes());
            chunks.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            chunks.extend_from_slice(&(t as u32).to_le_bytes());
            stored.extend_from_slice(&bytes);
            decoded.extend_from_slice(part);
        }
    }
    std::fs::write(dir.join("stored.bin"), &stored)?;
    std::fs::write(dir.join("decoded.bin"), &decoded)?;
    std::fs::write(dir.join("chunks.bin"), &chunks)?;
    std::fs::File::create(dir.join("tensors.txt"))?.write_all(lines.as_bytes())?;
    println!(
        "{} chunks ({rans} rans, {raw} raw), {} stored bytes, {} decoded bytes in {}",
        chunks.len() / 32,
        stored.len(),
        decoded.len(),
        dir.display()
    );
    Ok(())
}
