//! A plain reference of the chunk codec (docs/FORMAT.md, "The `rans`
//! chunk"), used until the optimised `flash-codec` crate lands. Same stream,
//! same API shape.

use std::fmt;

pub const CHUNK_ELEMS: usize = 65536;
pub const LANES: usize = 32;
pub const PROB_BITS: u32 = 11;
const M: u32 = 1 << PROB_BITS;
const L: u32 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Bf16,
    F16,
    F32,
}

impl Layout {
    pub fn elem_bytes(self) -> usize {
        match self {
            Layout::Bf16 | Layout::F16 => 2,
            Layout::F32 => 4,
        }
    }
    pub fn raw_bytes(self) -> usize {
        match self {
            Layout::Bf16 | Layout::F16 => 1,
            Layout::F32 => 3,
        }
    }
    fn split(self, e: &[u8]) -> (u8, u32) {
        match self {
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
    fn join(self, sym: u8, raw: u32, out: &mut [u8]) {
        match self {
            Layout::Bf16 => {
                let v = (((raw >> 7) & 1) << 15) as u16 | ((sym as u16) << 7) | (raw & 0x7f) as u16;
                out.copy_from_slice(&v.to_le_bytes());
            }
            Layout::F16 => {
                out[0] = raw as u8;
                out[1] = sym;
            }
            Layout::F32 => {
                let v = ((raw >> 23) << 31) | ((sym as u32) << 23) | (raw & 0x7f_ffff);
                out.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Rans,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(why: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(why.into()))
}

fn pad(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Frequencies summing to M, every present symbol at least 1.
fn normalise(counts: &[u64; 256]) -> [u32; 256] {
    let total: u64 = counts.iter().sum();
    let mut f = [0u32; 256];
    if total == 0 {
        return f;
    }
    let mut sum = 0i64;
    for s in 0..256 {
        if counts[s] > 0 {
            f[s] = ((counts[s] as u128 * M as u128 / total as u128) as u32).max(1);
            sum += f[s] as i64;
        }
    }
    // Fix the total on the largest symbols, never below 1.
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

/// Appends the stored chunk of `decoded` to `out`; returns its codec.
pub fn encode_chunk(layout: Layout, decoded: &[u8], out: &mut Vec<u8>) -> Codec {
    let eb = layout.elem_bytes();
    let n = decoded.len() / eb;
    let rb = layout.raw_bytes();
    let mut syms = Vec::with_capacity(n);
    let mut raw = Vec::with_capacity(n * rb);
    let mut counts = [0u64; 256];
    for e in decoded.chunks_exact(eb) {
        let (s, r) = layout.split(e);
        syms.push(s);
        counts[s as usize] += 1;
        raw.extend_from_slice(&r.to_le_bytes()[..rb]);
    }
    let freq = normalise(&counts);
    let mut cum = [0u32; 257];
    for s in 0..256 {
        cum[s + 1] = cum[s] + freq[s];
    }
    let mut x = [L; LANES];
    let mut words: Vec<u16> = Vec::new();
    for j in (0..n).rev() {
        let lane = j % LANES;
        let s = syms[j] as usize;
        let f = freq[s];
        if x[lane] >= ((L >> PROB_BITS) << 16) * f {
            words.push(x[lane] as u16);
            x[lane] >>= 16;
        }
        x[lane] = ((x[lane] / f) << PROB_BITS) + (x[lane] % f) + cum[s];
    }
    words.reverse();
    let present: Vec<usize> = (0..256).filter(|&s| freq[s] > 0).collect();
    let k = present.len();
    let table = pad(3 * k, 4);
    let total = 8 + 4 * LANES + table + pad(2 * words.len(), 16) + pad(n * rb, 16);
    if total * 100 > decoded.len() * 98 || n == 0 {
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
    out.resize(start + 8 + 4 * LANES + table, 0);
    for w in &words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.resize(start + 8 + 4 * LANES + table + pad(2 * words.len(), 16), 0);
    out.extend_from_slice(&raw);
    out.resize(start + total, 0);
    Codec::Rans
}

/// Decodes a stored chunk into `out` (its decoded length).
pub fn decode_chunk(
    layout: Layout,
    codec: Codec,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    if codec == Codec::Raw {
        if stored.len() != out.len() {
            return err(format!(
                "a raw chunk of {} bytes for {} decoded bytes",
                stored.len(),
                out.len()
            ));
        }
        out.copy_from_slice(stored);
        return Ok(());
    }
    let eb = layout.elem_bytes();
    if out.len() % eb != 0 {
        return err("decoded length is not a whole number of elements");
    }
    let n = out.len() / eb;
    let rb = layout.raw_bytes();
    if stored.len() < 8 + 4 * LANES {
        return err("shorter than its header");
    }
    let nwords = u32::from_le_bytes(stored[0..4].try_into().expect("4")) as usize;
    let k = u16::from_le_bytes(stored[4..6].try_into().expect("2")) as usize;
    if !(1..=256).contains(&k) {
        return err(format!("{k} symbols in the table"));
    }
    let table = pad(3 * k, 4);
    let need = 8 + 4 * LANES + table + pad(2 * nwords, 16) + pad(n * rb, 16);
    if stored.len() != need {
        return err(format!(
            "{} stored bytes, the header implies {need}",
            stored.len()
        ));
    }
    let mut x = [0u32; LANES];
    for (i, v) in x.iter_mut().enumerate() {
        let at = 8 + 4 * i;
        *v = u32::from_le_bytes(stored[at..at + 4].try_into().expect("4"));
    }
    let t0 = 8 + 4 * LANES;
    let mut lut = vec![(0u8, 0u32, 0u32); M as usize];
    let mut cum = 0u32;
    let mut prev: i32 = -1;
    for i in 0..k {
        let f = u16::from_le_bytes([stored[t0 + 2 * i], stored[t0 + 2 * i + 1]]) as u32;
        let s = stored[t0 + 2 * k + i];
        if f == 0 || s as i32 <= prev || cum + f > M {
            return err("malformed frequency table");
        }
        prev = s as i32;
        for slot in cum..cum + f {
            lut[slot as usize] = (s, f, cum);
        }
        cum += f;
    }
    if cum != M {
        return err("frequencies do not sum to the probability scale");
    }
    let w0 = t0 + table;
    let r0 = w0 + pad(2 * nwords, 16);
    let mut pos = 0usize;
    for j in 0..n {
        let lane = j % LANES;
        let slot = x[lane] & (M - 1);
        let (s, f, c) = lut[slot as usize];
        x[lane] = f * (x[lane] >> PROB_BITS) + slot - c;
        if x[lane] < L {
            if pos >= nwords {
                return err("the coded stream ends early");
            }
            let w = u16::from_le_bytes([stored[w0 + 2 * pos], stored[w0 + 2 * pos + 1]]);
            x[lane] = (x[lane] << 16) | w as u32;
            pos += 1;
        }
        let mut r = [0u8; 4];
        r[..rb].copy_from_slice(&stored[r0 + j * rb..r0 + (j + 1) * rb]);
        layout.join(s, u32::from_le_bytes(r), &mut out[j * eb..(j + 1) * eb]);
    }
    if pos != nwords || x.iter().any(|&v| v != L) {
        return err("the coded stream does not end where its header says");
    }
    Ok(())
}
