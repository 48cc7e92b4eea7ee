//! One chunk: the `Rans` layout, its validation, the encoder and the CPU
//! decoder (in the GPU's warp-step form).
//!
//! # Why at most one 16-bit word per element
//!
//! States live in `I = [L, 2^32)` with `L = 2^16`, words are 16 bits and
//! `M = 2^PB` with `PB <= 12` (so `M <= 2^16`).
//!
//! Decoding one element from `x` in `I` with symbol frequency `f`
//! (`1 <= f <= M`): `x' = f * (x >> PB) + (slot - cum)` where
//! `0 <= slot - cum < f`. Since `2^(16-PB) <= x >> PB < 2^(32-PB)`,
//! `x'` lies in `[f * 2^(16-PB), f * 2^(32-PB))`, which is within
//! `[1, 2^32)`. If `x' >= L` it is in `I` and no word is read. Otherwise
//! one word gives `x'' = (x' << 16) | w` with
//! `2^32 > x'' >= x' * 2^16 >= f * 2^(32-PB) >= 2^(32-PB) >= 2^16 = L`,
//! so `x''` is in `I`: exactly one read restores the invariant, never two.
//!
//! Encoding is the exact inverse. Before coding a symbol of frequency `f`
//! the state must lie in `J_f = [f * 2^(16-PB), f * 2^(32-PB))`, because
//! `C(x) = (x / f) * M + x % f + cum` maps `J_f` onto a subset of `I`
//! (`x / f` is in `[2^(16-PB), 2^(32-PB))`, times `M` gives `[L, 2^32)`, and
//! adding `x % f + cum < M` stays below `2^32` since the multiple of `M`
//! is at most `2^32 - M`). The encoder's test `x >= x_max` with
//! `x_max = ((L >> PB) << 16) * f = f * 2^(32-PB)` is the upper end of
//! `J_f`. When `x` (in `I`) is below it, `x >= L >= f * 2^(16-PB)` (as
//! `f <= M`): `x` is in `J_f`. When it is not, one word goes out and
//! `x >> 16` satisfies `x >> 16 >= x_max >> 16 = f * 2^(16-PB)` and
//! `x >> 16 < 2^16 <= f * 2^(32-PB)` (as `PB <= 16`): `x >> 16` is in
//! `J_f` after exactly one word. (For `f = M`, `x_max = 2^32` does not fit
//! a u32; it is kept as u64, and `C(x) = x`: a symbol that is the only one
//! of its chunk costs nothing.)
//!
//! Each lane starts encoding at `x = L`. `L` is in `J_f` for every `f`,
//! so the first symbol coded in a lane (the last decoded) emits no word, and
//! the decoder, inverting it, ends in exactly `L`.

use crate::error::CodecError;
use crate::freq::{histogram, normalise};
use crate::layout::{
    join_bf16, join_f16, join_f32, split_bf16, split_f16, split_f32, Codec, Layout,
};
use crate::{HEADER_BYTES, L, LANES, MAX_RANS_PERCENT, PROB_BITS, TABLE_OFFSET};

/// Table entries of the largest supported precision (PB = 12).
const LUT_LEN: usize = 1 << 12;

/// The CPU's decoding table: for each slot, `freq << 16 | (slot - cum)` and
/// the symbol, in two arrays (the GPU packs the same three values into one
/// u32, `sym | (freq - 1) << 8 | (slot - cum) << 20`; two arrays take
/// fewer instructions to unpack).
struct Lut {
    fb: [u32; LUT_LEN],
    sym: [u8; LUT_LEN],
}

#[inline]
fn pad(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

#[inline]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Where the parts of a validated `Rans` chunk are (offsets from the start
/// of the stored chunk). Made by [`ChunkInfo::parse`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Elements of the chunk.
    pub elems: usize,
    /// 16-bit words in the coded stream.
    pub words: usize,
    /// Distinct symbols in the table (k).
    pub symbols: usize,
    /// Offset of the k u16 frequencies; the k symbols follow them.
    pub table_offset: usize,
    /// Offset of the coded stream (`words` u16).
    pub stream_offset: usize,
    /// Offset of the raw plane (`elems * raw_bytes_per_elem` bytes).
    pub raw_offset: usize,
    /// The exact stored length.
    pub stored_len: usize,
}

impl ChunkInfo {
    /// Offset of the 32 u32 lane states.
    pub const STATES_OFFSET: usize = HEADER_BYTES;

    /// The stored length of a `Rans` chunk of `elems` elements whose header
    /// says `words` words and `symbols` table entries:
    /// `136 + pad4(3 * symbols) + pad16(2 * words) + pad16(elems * raw_bytes_per_elem)`.
    pub fn stored_len(layout: Layout, elems: usize, words: usize, symbols: usize) -> usize {
        TABLE_OFFSET
            + pad(3 * symbols, 4)
            + pad(2 * words, 16)
            + pad(elems * layout.raw_bytes_per_elem(), 16)
    }

    /// Validates a stored `Rans` chunk of `elems` elements without decoding
    /// it: length at least 136; 1 to 256 symbols; reserved field 0; stored
    /// length exactly [`stored_len`](Self::stored_len); lane states at least
    /// `L`; frequencies at least 1 summing to `2^PROB_BITS`; symbols
    /// strictly increasing; every padding byte zero.
    pub fn parse(layout: Layout, elems: usize, stored: &[u8]) -> Result<ChunkInfo, CodecError> {
        parse_pb(layout, elems, stored, PROB_BITS)
    }

    /// The 32 initial lane states of a chunk this info was parsed from.
    pub fn states(&self, stored: &[u8]) -> [u32; LANES] {
        std::array::from_fn(|j| u32_at(stored, Self::STATES_OFFSET + 4 * j))
    }
}

fn parse_pb(layout: Layout, elems: usize, stored: &[u8], pb: u32) -> Result<ChunkInfo, CodecError> {
    if elems > u32::MAX as usize {
        return Err(CodecError::TooManyElements { elems });
    }
    if stored.len() < TABLE_OFFSET {
        return Err(CodecError::Truncated {
            stored: stored.len(),
        });
    }
    let words = u32_at(stored, 0) as usize;
    let symbols = u16_at(stored, 4) as usize;
    let reserved = u16_at(stored, 6);
    if !(1..=256).contains(&symbols) {
        return Err(CodecError::SymbolCount { symbols });
    }
    if reserved != 0 {
        return Err(CodecError::Reserved { value: reserved });
    }
    let expected = ChunkInfo::stored_len(layout, elems, words, symbols);
    if stored.len() != expected {
        return Err(CodecError::StoredLength {
            stored: stored.len(),
            elems,
            expected,
        });
    }
    for lane in 0..LANES {
        let state = u32_at(stored, ChunkInfo::STATES_OFFSET + 4 * lane);
        if state < L {
            return Err(CodecError::InitialState { lane, state });
        }
    }
    let t = TABLE_OFFSET;
    let mut sum = 0u32;
    for index in 0..symbols {
        let f = u16_at(stored, t + 2 * index) as u32;
        if f == 0 {
            return Err(CodecError::ZeroFrequency { index });
        }
        sum += f;
        if index > 0 {
            let (previous, symbol) = (
                stored[t + 2 * symbols + index - 1],
                stored[t + 2 * symbols + index],
            );
            if symbol <= previous {
                return Err(CodecError::SymbolOrder {
                    index,
                    symbol,
                    previous,
                });
            }
        }
    }
    if sum != 1 << pb {
        return Err(CodecError::FrequencySum {
            sum,
            expected: 1 << pb,
        });
    }
    let stream_offset = t + pad(3 * symbols, 4);
    let raw_offset = stream_offset + pad(2 * words, 16);
    let raw_end = raw_offset + elems * layout.raw_bytes_per_elem();
    for range in [
        t + 3 * symbols..stream_offset,
        stream_offset + 2 * words..raw_offset,
        raw_end..expected,
    ] {
        if let Some(i) = stored[range.clone()].iter().position(|&b| b != 0) {
            return Err(CodecError::Padding {
                offset: range.start + i,
            });
        }
    }
    Ok(ChunkInfo {
        elems,
        words,
        symbols,
        table_offset: t,
        stream_offset,
        raw_offset,
        stored_len: expected,
    })
}

// ---------------------------------------------------------------- encoding

/// Appends the stored form of the chunk `decoded` (whole little-endian
/// elements of `layout`) to `out` and returns its codec: `Rans` when its
/// stored length is at most [`MAX_RANS_PERCENT`] % of `decoded.len()`,
/// else `Raw` (the bytes verbatim). An empty chunk, or one of more than
/// 2^32 - 1 elements, is `Raw`. Deterministic: the same input gives the
/// same bytes.
///
/// # Panics
/// When `decoded.len()` is not a multiple of `layout.elem_bytes()`.
pub fn encode_chunk(layout: Layout, decoded: &[u8], out: &mut Vec<u8>) -> Codec {
    encode_chunk_pb::<PROB_BITS>(layout, decoded, out)
}

/// [`encode_chunk`] with the probability precision `PB` (8 to 12) as a
/// parameter (exploration only).
pub fn encode_chunk_pb<const PB: u32>(layout: Layout, decoded: &[u8], out: &mut Vec<u8>) -> Codec {
    encode_with::<PB>(layout, decoded, out, false)
}

/// [`encode_chunk_pb`] that stores every non-empty chunk `Rans`, however
/// large (tests of the decoders on tiny and incompressible chunks).
pub fn encode_chunk_rans_pb<const PB: u32>(
    layout: Layout,
    decoded: &[u8],
    out: &mut Vec<u8>,
) -> Codec {
    encode_with::<PB>(layout, decoded, out, true)
}

fn encode_with<const PB: u32>(
    layout: Layout,
    decoded: &[u8],
    out: &mut Vec<u8>,
    force: bool,
) -> Codec {
    const { assert!(PB >= 8 && PB <= 12) };
    let eb = layout.elem_bytes();
    assert!(
        decoded.len() % eb == 0,
        "a chunk of {} bytes is not a whole number of {eb}-byte elements",
        decoded.len()
    );
    let elems = decoded.len() / eb;
    let coded = elems > 0
        && elems <= u32::MAX as usize
        && match layout {
            Layout::Bf16 => encode_rans::<PB, 2, 1>(layout, decoded, out, force, split_bf16),
            Layout::F16 => encode_rans::<PB, 2, 1>(layout, decoded, out, force, split_f16),
            Layout::F32 => encode_rans::<PB, 4, 3>(layout, decoded, out, force, split_f32),
        };
    if coded {
        Codec::Rans
    } else {
        out.extend_from_slice(decoded);
        Codec::Raw
    }
}

/// What the encoder needs for one symbol.
#[derive(Clone, Copy, Default)]
struct EncSym {
    /// `f * 2^(32-PB)`: a state at or above it emits a word first.
    x_max: u64,
    /// `ceil(2^63 / f)`: `x / f == (x * rcp) >> 63` for every `x < 2^32`
    /// (the error `x * (rcp * f - 2^63) < 2^32 * 2^12` is far below
    /// `2^63 / f`).
    rcp: u64,
    /// Cumulative frequency of the smaller symbols.
    cum: u32,
    /// `M - f`: `C(x) = x + cum + (x / f) * (M - f)`.
    cmpl: u32,
}

/// Codes one symbol in one lane; the word (when one goes out) is written
/// at `words[*p - 1]` and `*p` decremented. The store is unconditional
/// (branch-free); `*p >= 1` always holds since at most one word per element
/// is emitted and `words` has one more slot than elements.
#[inline(always)]
fn put(x: &mut u32, s: &EncSym, words: &mut [u16], p: &mut usize) {
    let v = *x;
    let emit = v as u64 >= s.x_max;
    words[*p - 1] = v as u16;
    *p -= emit as usize;
    let v = if emit { v >> 16 } else { v };
    let q = ((v as u128 * s.rcp as u128) >> 63) as u32;
    *x = v + s.cum + q * s.cmpl;
}

/// Encodes into `out` when that pays (returns true), else leaves `out`
/// untouched (returns false).
#[inline(always)]
fn encode_rans<const PB: u32, const EB: usize, const RB: usize>(
    layout: Layout,
    decoded: &[u8],
    out: &mut Vec<u8>,
    force: bool,
    split: impl Fn([u8; EB]) -> (u8, [u8; RB]) + Copy,
) -> bool {
    let elems = decoded.len() / EB;
    let elem = |b: &[u8]| -> [u8; EB] { b.try_into().expect("EB bytes") };
    let counts = histogram::<EB>(decoded, |e| split(e).0);
    let freq = normalise(&counts, PB);
    let m = 1u32 << PB;
    let mut enc = [EncSym::default(); 256];
    let mut symbols = 0usize;
    let mut cum = 0u32;
    for (s, &f) in freq.iter().enumerate() {
        if f > 0 {
            enc[s] = EncSym {
                x_max: (f as u64) << (32 - PB),
                rcp: (1u64 << 63).div_ceil(f as u64),
                cum,
                cmpl: m - f,
            };
            cum += f;
            symbols += 1;
        }
    }

    // Reverse decode order: the last (partial) step first, lanes 31..0
    // within a step.
    let mut words = vec![0u16; elems + 1];
    let mut p = elems + 1;
    let mut x = [L; LANES];
    let full = elems / LANES;
    let (body, tail) = decoded.split_at(full * LANES * EB);
    for (j, e) in tail.chunks_exact(EB).enumerate().rev() {
        put(
            &mut x[j],
            &enc[split(elem(e)).0 as usize],
            &mut words,
            &mut p,
        );
    }
    for step in body.rchunks_exact(LANES * EB) {
        for (xj, e) in x.iter_mut().zip(step.chunks_exact(EB)).rev() {
            put(xj, &enc[split(elem(e)).0 as usize], &mut words, &mut p);
        }
    }
    let words = &words[p..];

    let stored_len = ChunkInfo::stored_len(layout, elems, words.len(), symbols);
    if !force && stored_len * 100 > decoded.len() * MAX_RANS_PERCENT {
        return false;
    }
    let start = out.len();
    out.resize(start + stored_len, 0);
    let o = &mut out[start..];
    o[0..4].copy_from_slice(&(words.len() as u32).to_le_bytes());
    o[4..6].copy_from_slice(&(symbols as u16).to_le_bytes());
    for (d, s) in o[ChunkInfo::STATES_OFFSET..TABLE_OFFSET]
        .chunks_exact_mut(4)
        .zip(x)
    {
        d.copy_from_slice(&s.to_le_bytes());
    }
    let mut i = 0;
    for (s, &f) in freq.iter().enumerate() {
        if f > 0 {
            o[TABLE_OFFSET + 2 * i..TABLE_OFFSET + 2 * i + 2]
                .copy_from_slice(&(f as u16).to_le_bytes());
            o[TABLE_OFFSET + 2 * symbols + i] = s as u8;
            i += 1;
        }
    }
    let stream_offset = TABLE_OFFSET + pad(3 * symbols, 4);
    let raw_offset = stream_offset + pad(2 * words.len(), 16);
    for (d, w) in o[stream_offset..].chunks_exact_mut(2).zip(words) {
        d.copy_from_slice(&w.to_le_bytes());
    }
    for (d, e) in o[raw_offset..raw_offset + elems * RB]
        .chunks_exact_mut(RB)
        .zip(decoded.chunks_exact(EB))
    {
        d.copy_from_slice(&split(elem(e)).1);
    }
    true
}

// ---------------------------------------------------------------- decoding

/// Decodes a stored chunk into `out`, whose length is the chunk's decoded
/// length (whole elements of `layout`). A `Raw` chunk must be exactly
/// `out.len()` bytes; a `Rans` chunk is validated as by
/// [`ChunkInfo::parse`] and its stream must end where its header says,
/// with every lane back in state `L`.
///
/// Only `out` is written. On an error its content is unspecified (partly
/// decoded); the error says what is wrong.
pub fn decode_chunk(
    layout: Layout,
    codec: Codec,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    decode_chunk_pb::<PROB_BITS>(layout, codec, stored, out, Kernel::Best)
}

/// Which CPU decoder [`decode_chunk_pb`] runs (exploration and tests: both
/// give the same bytes and errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest this CPU has: the AVX2 steps on x86-64 CPUs with AVX2
    /// (unless `FLASH_CPU_DECODER=scalar`), else the scalar ones.
    Best,
    /// The portable scalar steps.
    Scalar,
}

/// [`decode_chunk`] with the probability precision `PB` (8 to 12) as a
/// parameter (exploration only).
pub fn decode_chunk_pb<const PB: u32>(
    layout: Layout,
    codec: Codec,
    stored: &[u8],
    out: &mut [u8],
    kernel: Kernel,
) -> Result<(), CodecError> {
    const { assert!(PB >= 8 && PB <= 12) };
    let eb = layout.elem_bytes();
    if out.len() % eb != 0 {
        return Err(CodecError::PartialElement {
            len: out.len(),
            elem_bytes: eb,
        });
    }
    if codec == Codec::Raw {
        if stored.len() != out.len() {
            return Err(CodecError::RawLength {
                stored: stored.len(),
                decoded: out.len(),
            });
        }
        out.copy_from_slice(stored);
        return Ok(());
    }
    let elems = out.len() / eb;
    let info = parse_pb(layout, elems, stored, PB)?;
    let mut x = info.states(stored);
    let stream = &stored[info.stream_offset..info.stream_offset + 2 * info.words];
    let raw = &stored[info.raw_offset..info.raw_offset + elems * layout.raw_bytes_per_elem()];
    // Other architectures have the scalar steps only.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernel;
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Best {
        if let Some(simd) = crate::avx2::detect() {
            use crate::avx2::{Bf16, F16, F32};
            let packed = build_packed_lut(stored, &info);
            let (x, lut) = (&mut x, &*packed);
            let pos = match layout {
                Layout::Bf16 => vector::<PB, 1, 2, Bf16>(simd, lut, x, stream, raw, out, join_bf16),
                Layout::F16 => vector::<PB, 1, 2, F16>(simd, lut, x, stream, raw, out, join_f16),
                Layout::F32 => vector::<PB, 3, 4, F32>(simd, lut, x, stream, raw, out, join_f32),
            };
            return finish(x, pos?, &info);
        }
    }
    let lut = build_lut(stored, &info);
    let consumed = match layout {
        Layout::Bf16 => run::<PB, 1, 2, u8>(&lut, &mut x, stream, raw, out, join_bf16)?,
        Layout::F16 => run::<PB, 1, 2, u32>(&lut, &mut x, stream, raw, out, join_f16)?,
        Layout::F32 => run::<PB, 3, 4, u32>(&lut, &mut x, stream, raw, out, join_f32)?,
    };
    finish(&x, consumed, &info)
}

/// The AVX2 decoder's full steps, then the chunk's last partial step (if
/// any) on the scalar step.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn vector<const PB: u32, const RB: usize, const EB: usize, J: crate::avx2::Join>(
    simd: flash_sys::simd::V3,
    packed: &crate::avx2::PackedLut,
    x: &mut [u32; LANES],
    stream: &[u8],
    raw: &[u8],
    out: &mut [u8],
    join: impl Fn(u32, [u8; RB]) -> [u8; EB],
) -> Result<usize, CodecError> {
    let elems = out.len() / EB;
    let full = elems / LANES * LANES;
    let (o, tail) = out.split_at_mut(full * EB);
    let (r, raw_tail) = raw.split_at(full * RB);
    let mut pos = crate::avx2::full_steps::<PB, J>(simd, packed, x, stream, r, o)?;
    if !tail.is_empty() {
        let lut = build_lut_from_packed(packed);
        let mut spare = [0u8; 2 * LANES];
        let win = window(stream, pos, &mut spare);
        pos += step::<PB, RB, EB>(&lut, &mut x[..elems - full], win, raw_tail, tail, join);
        let words = stream.len() / 2;
        if pos > words {
            return Err(CodecError::StreamOverrun {
                step: full / LANES,
                words,
            });
        }
    }
    Ok(pos)
}

/// The end-of-chunk checks: every lane back in state `L`, every word of the
/// stream consumed.
fn finish(x: &[u32; LANES], consumed: usize, info: &ChunkInfo) -> Result<(), CodecError> {
    if let Some(lane) = x.iter().position(|&s| s != L) {
        return Err(CodecError::FinalState {
            lane,
            state: x[lane],
        });
    }
    if consumed != info.words {
        return Err(CodecError::WordsLeft {
            consumed,
            words: info.words,
        });
    }
    Ok(())
}

/// The table of a validated chunk as runs of slots: `(first slot,
/// frequency, symbol)` per symbol, in slot order.
fn slot_runs<'a>(
    stored: &'a [u8],
    info: &ChunkInfo,
) -> impl Iterator<Item = (usize, usize, u8)> + 'a {
    let (t, k) = (info.table_offset, info.symbols);
    (0..k).scan(0usize, move |cum, i| {
        let f = u16_at(stored, t + 2 * i) as usize;
        let first = *cum;
        *cum += f;
        Some((first, f, stored[t + 2 * k + i]))
    })
}

/// The vector decoder's table of a validated chunk.
#[cfg(target_arch = "x86_64")]
fn build_packed_lut(stored: &[u8], info: &ChunkInfo) -> Box<crate::avx2::PackedLut> {
    let mut lut = Box::new(crate::avx2::PackedLut([0; LUT_LEN]));
    for (cum, f, s) in slot_runs(stored, info) {
        for (bias, e) in lut.0[cum..cum + f].iter_mut().enumerate() {
            *e = crate::avx2::PackedLut::entry(f as u32, bias as u32, s);
        }
    }
    lut
}

/// The decoding table of a validated chunk (slots past `2^PB` stay 0 and
/// are never looked up).
fn build_lut(stored: &[u8], info: &ChunkInfo) -> Box<Lut> {
    let mut lut = Box::new(Lut {
        fb: [0; LUT_LEN],
        sym: [0; LUT_LEN],
    });
    for (cum, f, s) in slot_runs(stored, info) {
        for (bias, e) in lut.fb[cum..cum + f].iter_mut().enumerate() {
            *e = ((f as u32) << 16) | bias as u32;
        }
        lut.sym[cum..cum + f].fill(s);
    }
    lut
}

/// The scalar table from the vector decoder's (for a chunk's partial last
/// step).
#[cfg(target_arch = "x86_64")]
fn build_lut_from_packed(packed: &crate::avx2::PackedLut) -> Box<Lut> {
    let mut lut = Box::new(Lut {
        fb: [0; LUT_LEN],
        sym: [0; LUT_LEN],
    });
    for ((fb, sym), &e) in lut.fb.iter_mut().zip(lut.sym.iter_mut()).zip(&packed.0) {
        *fb = ((e >> 20) + 1) << 16 | (e & 0xfff);
        *sym = (e >> 12) as u8;
    }
    lut
}

/// One lane's decode of one element: (symbol, state before renormalising).
#[inline(always)]
fn decode_one<const PB: u32>(lut: &Lut, x: u32) -> (u32, u32) {
    let slot = (x & ((1 << PB) - 1)) as usize;
    let e = lut.fb[slot];
    (lut.sym[slot] as u32, (e >> 16) * (x >> PB) + (e & 0xffff))
}

/// The 32 words a step may take from `pos` on, as the bytes of 32 u16
/// (zeros past the end of the stream: taking one of those is an overrun,
/// found after the step).
#[inline(always)]
pub(crate) fn window<'a>(
    stream: &'a [u8],
    pos: usize,
    spare: &'a mut [u8; 2 * LANES],
) -> &'a [u8; 2 * LANES] {
    match stream.get(2 * pos..2 * pos + 2 * LANES) {
        Some(w) => w.try_into().expect("64 bytes"),
        None => {
            let rest = stream.get(2 * pos..).unwrap_or(&[]);
            *spare = [0; 2 * LANES];
            spare[..rest.len()].copy_from_slice(rest);
            spare
        }
    }
}

/// One decoding step over the lanes `x` (32, or fewer in a chunk's last
/// step): each lane decodes its element from `raw` into `out`, then the
/// lanes whose state fell below `L` take consecutive words from `win`
/// in lane order (lane j takes word `popc(need & ((1 << j) - 1))`, as a
/// warp does with ballot + popc). Returns the number of words taken.
#[inline(always)]
fn step<const PB: u32, const RB: usize, const EB: usize>(
    lut: &Lut,
    x: &mut [u32],
    win: &[u8; 2 * LANES],
    raw: &[u8],
    out: &mut [u8],
    join: impl Fn(u32, [u8; RB]) -> [u8; EB],
) -> usize {
    let mut k = 0usize;
    for ((xj, r), o) in x
        .iter_mut()
        .zip(raw.chunks_exact(RB))
        .zip(out.chunks_exact_mut(EB))
    {
        let (sym, nx) = decode_one::<PB>(lut, *xj);
        let need = nx < L;
        let at = 2 * (k & (LANES - 1));
        let w = u16::from_le_bytes([win[at], win[at + 1]]) as u32;
        *xj = if need { (nx << 16) | w } else { nx };
        k += need as usize;
        o.copy_from_slice(&join(sym, r.try_into().expect("RB bytes")));
    }
    k
}

/// [`step`] for a full step of 32 lanes, in three passes the compiler keeps
/// branch-free: decode the 32 lanes (independent: their table loads and
/// multiplies overlap), give words to the lanes of the `need` mask (the
/// ballot) in lane order, then recombine symbols and raw bits (vectorised).
/// `S` holds the step's symbols between the passes: `u8` for bf16, whose
/// recombination then widens bytes to 16-bit lanes (+9 % decode speed on
/// x86-64 over `u32`, which needs a narrowing shuffle), `u32` for f16 and f32
/// (`u8` made f16 7 % slower).
#[inline(always)]
fn full_step<
    const PB: u32,
    const RB: usize,
    const EB: usize,
    S: Copy + Default + From<u8> + Into<u32>,
>(
    lut: &Lut,
    x: &mut [u32; LANES],
    win: &[u8; 2 * LANES],
    raw: &[u8],
    out: &mut [u8],
    join: impl Fn(u32, [u8; RB]) -> [u8; EB],
) -> usize {
    let mut sym = [S::default(); LANES];
    for (xs, ss) in x.chunks_exact_mut(4).zip(sym.chunks_exact_mut(4)) {
        for (xj, sj) in xs.iter_mut().zip(ss) {
            let (s, nx) = decode_one::<PB>(lut, *xj);
            *sj = S::from(s as u8);
            *xj = nx;
        }
    }
    let mut need = 0u32;
    for (j, &xj) in x.iter().enumerate() {
        need |= ((xj < L) as u32) << j;
    }
    let mut m = need;
    let mut i = 0usize;
    while m != 0 {
        let j = m.trailing_zeros() as usize & (LANES - 1);
        let at = 2 * (i & (LANES - 1));
        x[j] = (x[j] << 16) | u16::from_le_bytes([win[at], win[at + 1]]) as u32;
        i += 1;
        m &= m - 1;
    }
    for ((s, r), o) in sym
        .iter()
        .zip(raw.chunks_exact(RB))
        .zip(out.chunks_exact_mut(EB))
    {
        o.copy_from_slice(&join((*s).into(), r.try_into().expect("RB bytes")));
    }
    need.count_ones() as usize
}

/// Decodes all steps; returns the number of words consumed.
#[inline(always)]
fn run<
    const PB: u32,
    const RB: usize,
    const EB: usize,
    S: Copy + Default + From<u8> + Into<u32>,
>(
    lut: &Lut,
    x: &mut [u32; LANES],
    stream: &[u8],
    raw: &[u8],
    out: &mut [u8],
    join: impl Fn(u32, [u8; RB]) -> [u8; EB] + Copy,
) -> Result<usize, CodecError> {
    let words = stream.len() / 2;
    let mut pos = 0usize;
    let mut spare = [0u8; 2 * LANES];
    let mut outs = out.chunks_exact_mut(LANES * EB);
    let mut raws = raw.chunks_exact(LANES * RB);
    let mut t = 0usize;
    for (o, r) in (&mut outs).zip(&mut raws) {
        let win = window(stream, pos, &mut spare);
        pos += full_step::<PB, RB, EB, S>(lut, x, win, r, o, join);
        if pos > words {
            return Err(CodecError::StreamOverrun { step: t, words });
        }
        t += 1;
    }
    let o = outs.into_remainder();
    if !o.is_empty() {
        let lanes = o.len() / EB;
        let win = window(stream, pos, &mut spare);
        pos += step::<PB, RB, EB>(lut, &mut x[..lanes], win, raws.remainder(), o, join);
        if pos > words {
            return Err(CodecError::StreamOverrun { step: t, words });
        }
    }
    Ok(pos)
}
