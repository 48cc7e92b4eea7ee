//! Chunks written by the first encoder of the flash format (the plain
//! reference in flash-load's `codec_ref.rs`, commit 2ec1a43, copied here
//! with release-build arithmetic) decode with this crate: models already
//! stored stay readable.

mod common;

use common::*;
use flash_codec::{decode_chunk, Codec, Layout, CHUNK_ELEMS};

const PB: u32 = 11;
const M: u32 = 1 << PB;
const L: u32 = 1 << 16;

fn pad(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

fn split(layout: Layout, e: &[u8]) -> (u8, u32) {
    match layout {
        Layout::Bf16 => {
            let v = u16::from_le_bytes([e[0], e[1]]);
            (
                ((v >> 7) & 0xff) as u8,
                (((v >> 15) << 7) | (v & 0x7f)) as u32,
            )
        }
        Layout::F16 => (e[1], e[0] as u32),
        Layout::F32 => {
            let v = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            (
                ((v >> 23) & 0xff) as u8,
                ((v >> 31) << 23) | (v & 0x7f_ffff),
            )
        }
    }
}

fn normalise(counts: &[u64; 256]) -> [u32; 256] {
    let total: u64 = counts.iter().sum();
    let mut f = [0u32; 256];
    let mut sum = 0i64;
    for s in 0..256 {
        if counts[s] > 0 {
            f[s] = ((counts[s] as u128 * M as u128 / total as u128) as u32).max(1);
            sum += f[s] as i64;
        }
    }
    while sum != M as i64 {
        let mut order: Vec<usize> = (0..256).filter(|&s| f[s] > 0).collect();
        order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
        for &s in &order {
            if sum > M as i64 && f[s] > 1 {
                f[s] -= 1;
                sum -= 1;
            } else if sum < M as i64 {
                f[s] += 1;
                sum += 1;
            }
            if sum == M as i64 {
                break;
            }
        }
    }
    f
}

fn old_encode_chunk(layout: Layout, decoded: &[u8], out: &mut Vec<u8>) -> Codec {
    let eb = layout.elem_bytes();
    let n = decoded.len() / eb;
    let rb = layout.raw_bytes_per_elem();
    let mut syms = Vec::with_capacity(n);
    let mut raw = Vec::with_capacity(n * rb);
    let mut counts = [0u64; 256];
    for e in decoded.chunks_exact(eb) {
        let (s, r) = split(layout, e);
        syms.push(s);
        counts[s as usize] += 1;
        raw.extend_from_slice(&r.to_le_bytes()[..rb]);
    }
    if n == 0 {
        return Codec::Raw;
    }
    let freq = normalise(&counts);
    let mut cum = [0u32; 257];
    for s in 0..256 {
        cum[s + 1] = cum[s] + freq[s];
    }
    let mut x = [L; 32];
    let mut words: Vec<u16> = Vec::new();
    for j in (0..n).rev() {
        let lane = j % 32;
        let s = syms[j] as usize;
        let f = freq[s];
        // Release builds wrap here when f == M (one symbol).
        if x[lane] >= ((L >> PB) << 16).wrapping_mul(f) {
            words.push(x[lane] as u16);
            x[lane] >>= 16;
        }
        x[lane] = ((x[lane] / f) << PB) + (x[lane] % f) + cum[s];
    }
    words.reverse();
    let present: Vec<usize> = (0..256).filter(|&s| freq[s] > 0).collect();
    let k = present.len();
    let table = pad(3 * k, 4);
    let total = 8 + 4 * 32 + table + pad(2 * words.len(), 16) + pad(n * rb, 16);
    if total * 100 > decoded.len() * 98 {
        out.extend_from_slice(decoded);
        return Codec::Raw;
    }
    let start = out.len();
    out.extend_from_slice(&(words.len() as u32).to_le_bytes());
    out.extend_from_slice(&(k as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for &s in &present {
        out.extend_from_slice(&(freq[s] as u16).to_le_bytes());
    }
    for &s in &present {
        out.push(s as u8);
    }
    out.resize(start + 8 + 4 * 32 + table, 0);
    for w in &words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.resize(start + 8 + 4 * 32 + table + pad(2 * words.len(), 16), 0);
    out.extend_from_slice(&raw);
    out.resize(start + total, 0);
    Codec::Rans
}

#[test]
fn chunks_of_the_first_encoder_decode() {
    for (i, layout) in LAYOUTS.into_iter().enumerate() {
        let mut data = normal_bytes(layout, CHUNK_ELEMS + 4321, 0.02, i as u64);
        data.extend(to_bytes(layout, &vec![1.5; 3000]));
        data.extend(random_bytes(3000 * layout.elem_bytes(), 9));
        let mut rans = 0;
        for part in data
            .chunks(7000 * layout.elem_bytes())
            .chain([&data[..40 * layout.elem_bytes()]])
        {
            let mut stored = Vec::new();
            let codec = old_encode_chunk(layout, part, &mut stored);
            rans += (codec == Codec::Rans) as usize;
            let mut out = vec![0u8; part.len()];
            decode_chunk(layout, codec, &stored, &mut out).unwrap();
            assert!(out == part);
        }
        assert!(rans >= 9, "{layout:?}: {rans}");
    }
}
