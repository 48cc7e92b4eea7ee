//! Test data shared by the integration tests.
#![allow(dead_code)]

use flash_codec::Layout;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const LAYOUTS: [Layout; 3] = [Layout::Bf16, Layout::F16, Layout::F32];

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// `n` samples of normal(0, std) (Box-Muller).
pub fn normal(rng: &mut SmallRng, n: usize, std: f64) -> Vec<f32> {
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        v.push((r * a.cos()) as f32);
        v.push((r * a.sin()) as f32);
    }
    v.truncate(n);
    v
}

/// The little-endian bytes of `values` in `layout`.
pub fn to_bytes(layout: Layout, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * layout.elem_bytes());
    for &v in values {
        match layout {
            Layout::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
            Layout::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
            Layout::F32 => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
    out
}

/// Normal(0, std) data of `n` elements in `layout`.
pub fn normal_bytes(layout: Layout, n: usize, std: f64, seed: u64) -> Vec<u8> {
    to_bytes(layout, &normal(&mut rng(seed), n, std))
}

/// Uniformly random bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng(seed).fill(&mut v[..]);
    v
}

/// A plain, element-by-element decoder written from the format text
/// (docs/FORMAT.md): no steps, no lookup table, checked arithmetic. The
/// optimised decoders must agree with it.
pub fn reference_decode(layout: Layout, stored: &[u8], elems: usize, pb: u32) -> Option<Vec<u8>> {
    let rd16 = |b: &[u8], at: usize| -> Option<u32> {
        Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]) as u32)
    };
    let rd32 = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let words = rd32(stored, 0)? as usize;
    let k = rd16(stored, 4)? as usize;
    let pad = |n: usize, to: usize| n.div_ceil(to) * to;
    let rb = layout.raw_bytes_per_elem();
    let stream = 136 + pad(3 * k, 4);
    let raw = stream + pad(2 * words, 16);
    if stored.len() != raw + pad(elems * rb, 16) {
        return None;
    }
    let mut x: Vec<u32> = (0..32)
        .map(|j| rd32(stored, 8 + 4 * j))
        .collect::<Option<_>>()?;
    let mut freq = vec![];
    let mut cum = vec![];
    let mut syms = vec![];
    let mut c = 0u32;
    for i in 0..k {
        let f = rd16(stored, 136 + 2 * i)?;
        freq.push(f);
        cum.push(c);
        c += f;
        syms.push(*stored.get(136 + 2 * k + i)?);
    }
    if c != 1 << pb {
        return None;
    }
    let mut pos = 0usize;
    let eb = layout.elem_bytes();
    let mut out = vec![0u8; elems * eb];
    for j in 0..elems {
        let lane = j % 32;
        let slot = x[lane] & ((1 << pb) - 1);
        let s = (0..k).find(|&s| cum[s] <= slot && slot < cum[s] + freq[s])?;
        x[lane] = freq[s]
            .checked_mul(x[lane] >> pb)?
            .checked_add(slot - cum[s])?;
        if x[lane] < 1 << 16 {
            if pos >= words {
                return None;
            }
            x[lane] = (x[lane] << 16) | rd16(stored, stream + 2 * pos)?;
            pos += 1;
        }
        let sym = syms[s] as u32;
        let r = stored.get(raw + j * rb..raw + (j + 1) * rb)?;
        let e = &mut out[j * eb..(j + 1) * eb];
        match layout {
            Layout::Bf16 => {
                let r = r[0] as u32;
                let v = ((r >> 7) << 15) | (sym << 7) | (r & 0x7f);
                e.copy_from_slice(&(v as u16).to_le_bytes());
            }
            Layout::F16 => {
                e[0] = r[0];
                e[1] = sym as u8;
            }
            Layout::F32 => {
                let r = u32::from_le_bytes([r[0], r[1], r[2], 0]);
                let v = ((r >> 23) << 31) | (sym << 23) | (r & 0x7f_ffff);
                e.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    if pos != words || x.iter().any(|&v| v != 1 << 16) {
        return None;
    }
    Some(out)
}
