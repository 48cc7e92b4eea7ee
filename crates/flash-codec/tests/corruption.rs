//! Corrupt chunks give errors: never a panic, never an access out of
//! bounds, never a hang.

mod common;

use common::*;
use flash_codec::explore::encode_chunk_rans_pb;
use flash_codec::{decode_chunk, encode_chunk, ChunkInfo, Codec, CodecError, Layout, L, PROB_BITS};
use rand::Rng;

struct Sample {
    layout: Layout,
    decoded: Vec<u8>,
    stored: Vec<u8>,
    info: ChunkInfo,
}

fn samples() -> Vec<Sample> {
    let mut v = Vec::new();
    for (i, layout) in LAYOUTS.into_iter().enumerate() {
        let cases = [
            normal_bytes(layout, 5000, 0.02, i as u64),
            normal_bytes(layout, 40, 1.0, 10 + i as u64),
            to_bytes(layout, &vec![0.5; 300]),
            normal_bytes(layout, 32 * 33, 3.0, 20 + i as u64),
        ];
        for decoded in cases {
            let mut stored = Vec::new();
            assert_eq!(
                encode_chunk_rans_pb::<PROB_BITS>(layout, &decoded, &mut stored),
                Codec::Rans
            );
            let info =
                ChunkInfo::parse(layout, decoded.len() / layout.elem_bytes(), &stored).unwrap();
            v.push(Sample {
                layout,
                decoded,
                stored,
                info,
            });
        }
    }
    v
}

/// Where a byte lies in a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Header, frequencies, padding: any change is refused by the checks.
    Checked,
    /// Lane states and coded stream: a change is refused, or (rarely) the
    /// stream still ends consistently and the output differs.
    Stream,
    /// Raw plane and table symbols: a change only changes the output.
    Unseen,
}

fn part(s: &Sample, at: usize) -> Part {
    let i = &s.info;
    let raw = i.raw_offset..i.raw_offset + i.elems * s.layout.raw_bytes_per_elem();
    let syms = i.table_offset + 2 * i.symbols..i.table_offset + 3 * i.symbols;
    let states = 8..136;
    let stream = i.stream_offset..i.stream_offset + 2 * i.words;
    if raw.contains(&at) || syms.contains(&at) {
        Part::Unseen
    } else if states.contains(&at) || stream.contains(&at) {
        Part::Stream
    } else {
        Part::Checked
    }
}

/// Decoding a corrupt chunk either fails or gives other bytes than the
/// original (a decode is a bijection: the same output, final states and
/// words consumed can only come from the same stream), so the caller's
/// checksum of the decoded bytes sees every corruption. Changes to checked
/// bytes always fail.
#[test]
fn random_corruptions_are_caught() {
    let samples = samples();
    let mut r = rng(99);
    let (mut stream_hits, mut stream_errs, mut checked) = (0, 0, 0);
    for _ in 0..4000 {
        let s = &samples[r.random_range(0..samples.len())];
        let mut bad = s.stored.clone();
        let mut places = Vec::new();
        for _ in 0..r.random_range(1..=3) {
            let at = r.random_range(0..bad.len());
            if r.random_bool(0.5) {
                bad[at] ^= 1 << r.random_range(0..8);
            } else {
                bad[at] = r.random();
            }
            if bad[at] != s.stored[at] {
                places.push(at);
            }
        }
        if places.is_empty() {
            continue;
        }
        let mut out = vec![0u8; s.decoded.len()];
        let res = decode_chunk(s.layout, Codec::Rans, &bad, &mut out);
        let parse = ChunkInfo::parse(s.layout, s.info.elems, &bad);
        if parse.is_err() {
            assert!(res.is_err(), "parse refuses what decode accepts");
        }
        assert!(
            res.is_err() || out != s.decoded,
            "{:?}: corruption at {places:?} is silent ({:?})",
            s.layout,
            s.info
        );
        let parts: Vec<Part> = places.iter().map(|&p| part(s, p)).collect();
        if parts.contains(&Part::Checked) {
            checked += 1;
            assert!(
                res.is_err(),
                "{:?}: checked bytes {places:?} changed, decoded",
                s.layout
            );
        } else if parts.contains(&Part::Stream) {
            stream_hits += 1;
            stream_errs += res.is_err() as usize;
        }
    }
    println!(
        "{checked} corruptions of checked bytes refused; {stream_errs}/{stream_hits} of states/stream refused, the rest decoded to other bytes"
    );
    assert!(checked > 100 && stream_hits > 1000);
    assert!(
        stream_errs * 100 >= stream_hits * 95,
        "the final-state check misses too much"
    );
}

#[test]
fn every_single_byte_of_header_states_and_stream() {
    // Exhaustive over positions for some chunks: each byte before the raw
    // plane, xor 0x01 and xor 0x80.
    let samples = samples();
    let (mut stream_hits, mut stream_errs) = (0, 0);
    for s in samples.iter().step_by(3) {
        for at in 0..s.info.raw_offset {
            for m in [0x01u8, 0x80] {
                let mut bad = s.stored.clone();
                bad[at] ^= m;
                let mut out = vec![0u8; s.decoded.len()];
                let res = decode_chunk(s.layout, Codec::Rans, &bad, &mut out);
                assert!(
                    res.is_err() || out != s.decoded,
                    "{:?} byte {at} ^ {m:#x} is silent",
                    s.layout
                );
                match part(s, at) {
                    Part::Checked => assert!(
                        res.is_err(),
                        "{:?} byte {at} ^ {m:#x} not refused",
                        s.layout
                    ),
                    Part::Stream => {
                        stream_hits += 1;
                        stream_errs += res.is_err() as usize;
                    }
                    Part::Unseen => {}
                }
            }
        }
    }
    println!("single-bit changes of states/stream: {stream_errs}/{stream_hits} refused");
}

#[test]
fn truncated_or_extended_chunks_are_errors() {
    let mut r = rng(5);
    for s in samples() {
        let mut out = vec![0u8; s.decoded.len()];
        for len in (0..s.stored.len()).step_by(7).chain([s.stored.len() - 1]) {
            assert!(decode_chunk(s.layout, Codec::Rans, &s.stored[..len], &mut out).is_err());
        }
        for extra in [1, 2, 15, 16, 17, 64] {
            let mut long = s.stored.clone();
            long.extend((0..extra).map(|_| r.random::<u8>()));
            assert!(decode_chunk(s.layout, Codec::Rans, &long, &mut out).is_err());
            long.truncate(s.stored.len());
            long.extend(std::iter::repeat_n(0, extra));
            assert!(decode_chunk(s.layout, Codec::Rans, &long, &mut out).is_err());
        }
        // The right bytes for a different element count (one that changes
        // the padded raw plane: a one-symbol chunk cannot tell 300
        // elements from 301, the caller's element count and checksum can).
        for d in [16usize, 32] {
            let mut o = vec![0u8; s.decoded.len() + d * s.layout.elem_bytes()];
            assert!(decode_chunk(s.layout, Codec::Rans, &s.stored, &mut o).is_err());
        }
        // And decoded as the wrong codec.
        assert!(decode_chunk(s.layout, Codec::Raw, &s.stored, &mut out).is_err());
        // The intact chunk still decodes.
        decode_chunk(s.layout, Codec::Rans, &s.stored, &mut out).unwrap();
        assert_eq!(out, s.decoded);
    }
}

#[test]
fn raw_chunks_and_partial_elements() {
    let data = random_bytes(1000, 3);
    let mut stored = Vec::new();
    assert_eq!(encode_chunk(Layout::Bf16, &data, &mut stored), Codec::Raw);
    let mut out = vec![0u8; 1000];
    decode_chunk(Layout::Bf16, Codec::Raw, &stored, &mut out).unwrap();
    assert!(matches!(
        decode_chunk(Layout::Bf16, Codec::Raw, &stored[..998], &mut out),
        Err(CodecError::RawLength { .. })
    ));
    let mut odd = vec![0u8; 999];
    assert!(matches!(
        decode_chunk(Layout::Bf16, Codec::Raw, &stored[..999], &mut odd),
        Err(CodecError::PartialElement { .. })
    ));
    let mut out3 = vec![0u8; 1002];
    assert!(matches!(
        decode_chunk(Layout::F32, Codec::Rans, &stored, &mut out3),
        Err(CodecError::PartialElement { .. })
    ));
}

/// A hand-made valid chunk: `elems` bf16 elements all of exponent 127
/// (one symbol, no words), raw plane zero.
fn one_symbol_chunk(elems: usize) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&0u16.to_le_bytes());
    for _ in 0..32 {
        c.extend_from_slice(&L.to_le_bytes());
    }
    c.extend_from_slice(&(1u16 << PROB_BITS).to_le_bytes());
    c.push(127);
    c.push(0);
    c.resize(c.len() + elems.div_ceil(16) * 16, 0);
    c
}

#[test]
fn parse_rejects_bad_headers_and_tables() {
    let elems = 100;
    let good = one_symbol_chunk(elems);
    let info = ChunkInfo::parse(Layout::Bf16, elems, &good).unwrap();
    assert_eq!(
        (
            info.words,
            info.symbols,
            info.stream_offset,
            info.raw_offset
        ),
        (0, 1, 140, 140)
    );
    let mut out = vec![0u8; 2 * elems];
    decode_chunk(Layout::Bf16, Codec::Rans, &good, &mut out).unwrap();
    assert!(out.chunks(2).all(|e| e == [0x80, 0x3f]), "1.0 everywhere");

    let check = |f: &dyn Fn(&mut Vec<u8>), want: fn(&CodecError) -> bool| {
        let mut c = good.clone();
        f(&mut c);
        let e = ChunkInfo::parse(Layout::Bf16, elems, &c).unwrap_err();
        assert!(want(&e), "unexpected {e:?}");
        let mut out = vec![0u8; 2 * elems];
        assert_eq!(
            decode_chunk(Layout::Bf16, Codec::Rans, &c, &mut out).unwrap_err(),
            e
        );
        println!("{e}");
    };
    check(&|c| c.truncate(100), |e| {
        matches!(e, CodecError::Truncated { .. })
    });
    check(&|c| c[4] = 0, |e| {
        matches!(e, CodecError::SymbolCount { symbols: 0 })
    });
    check(&|c| c[4..6].copy_from_slice(&257u16.to_le_bytes()), |e| {
        matches!(e, CodecError::SymbolCount { symbols: 257 })
    });
    check(&|c| c[7] = 1, |e| matches!(e, CodecError::Reserved { .. }));
    check(&|c| c[0] = 1, |e| {
        matches!(e, CodecError::StoredLength { .. })
    });
    check(&|c| c.extend_from_slice(&[0; 16]), |e| {
        matches!(e, CodecError::StoredLength { .. })
    });
    check(&|c| c[8 + 4 * 5 + 2] = 0, |e| {
        matches!(e, CodecError::InitialState { lane: 5, .. })
    });
    check(&|c| c[136..138].copy_from_slice(&0u16.to_le_bytes()), |e| {
        matches!(e, CodecError::ZeroFrequency { index: 0 })
    });
    check(
        &|c| c[136..138].copy_from_slice(&2047u16.to_le_bytes()),
        |e| matches!(e, CodecError::FrequencySum { sum: 2047, .. }),
    );
    check(&|c| c[139] = 1, |e| {
        matches!(e, CodecError::Padding { offset: 139 })
    });
    check(&|c| *c.last_mut().unwrap() = 1, |e| {
        matches!(e, CodecError::Padding { .. })
    });
    // Two symbols, equal: not strictly increasing.
    check(
        &|c| {
            c[4] = 2;
            c[136..138].copy_from_slice(&1024u16.to_le_bytes());
            c[138..140].copy_from_slice(&1024u16.to_le_bytes());
            c.splice(140..140, [127, 127, 0, 0]);
        },
        |e| matches!(e, CodecError::SymbolOrder { index: 1, .. }),
    );
    // A stream that ends early, and one with words left over: a valid
    // table of two halves where lane states start at L make every lane
    // need a word at once.
    let mut c = good.clone();
    c[4] = 2;
    c[136..138].copy_from_slice(&1024u16.to_le_bytes());
    c.splice(138..140, [0, 4, 100, 127, 0, 0]);
    let mut out = vec![0u8; 2 * elems];
    assert!(matches!(
        decode_chunk(Layout::Bf16, Codec::Rans, &c, &mut out),
        Err(CodecError::StreamOverrun { step: 0, words: 0 })
    ));
    c[0] = 8; // 8 words of zeros: the first step needs 32
    c.splice(144..144, [0u8; 16]);
    assert!(matches!(
        decode_chunk(Layout::Bf16, Codec::Rans, &c, &mut out),
        Err(CodecError::StreamOverrun { step: 0, words: 8 })
    ));
}

#[test]
fn final_state_and_leftover_words() {
    // Take a valid chunk and append words to its stream (fixing the header
    // and padding): decoding leaves them unread.
    let decoded = normal_bytes(Layout::Bf16, 3000, 0.02, 77);
    let mut stored = Vec::new();
    encode_chunk(Layout::Bf16, &decoded, &mut stored);
    let info = ChunkInfo::parse(Layout::Bf16, 3000, &stored).unwrap();
    let mut c = Vec::new();
    c.extend_from_slice(&((info.words + 8) as u32).to_le_bytes());
    c.extend_from_slice(&stored[4..info.stream_offset + 2 * info.words]);
    c.extend_from_slice(&[0xaa; 16]);
    c.resize(
        info.stream_offset + (2 * info.words + 16).div_ceil(16) * 16,
        0,
    );
    c.extend_from_slice(&stored[info.raw_offset..]);
    ChunkInfo::parse(Layout::Bf16, 3000, &c).unwrap();
    let mut out = vec![0u8; decoded.len()];
    let e = decode_chunk(Layout::Bf16, Codec::Rans, &c, &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::WordsLeft { .. } | CodecError::FinalState { .. }
        ),
        "{e:?}"
    );
    // A lane state one off.
    let mut c = stored.clone();
    c[8 + 4 * 31] ^= 1;
    let e = decode_chunk(Layout::Bf16, Codec::Rans, &c, &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::FinalState { .. }
                | CodecError::StreamOverrun { .. }
                | CodecError::WordsLeft { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn garbage_never_panics() {
    // Random chunks with a consistent length and a valid table, random
    // states and stream: any result but a panic (or a hang).
    let mut r = rng(1234);
    let mut oks = 0;
    for i in 0..3000 {
        let layout = LAYOUTS[i % 3];
        let elems = r.random_range(0..200);
        let words = r.random_range(0..200);
        let k = r.random_range(1..=256usize);
        let mut c = vec![0u8; ChunkInfo::stored_len(layout, elems, words, k)];
        r.fill(&mut c[8..]);
        c[0..4].copy_from_slice(&(words as u32).to_le_bytes());
        c[4..6].copy_from_slice(&(k as u16).to_le_bytes());
        c[6] = 0;
        c[7] = 0;
        // A valid table most of the time.
        if i % 4 != 0 {
            let mut syms: Vec<u8> = (0..=255).collect();
            for j in (1..256).rev() {
                syms.swap(j, r.random_range(0..=j));
            }
            let mut syms = syms[..k].to_vec();
            syms.sort();
            let mut f = vec![1u32; k];
            for _ in k..(1 << PROB_BITS) {
                f[r.random_range(0..k)] += 1;
            }
            for j in 0..k {
                c[136 + 2 * j..138 + 2 * j].copy_from_slice(&(f[j] as u16).to_le_bytes());
                c[136 + 2 * k + j] = syms[j];
            }
            for lane in 0..32 {
                let at = 8 + 4 * lane;
                c[at + 2] |= 1; // state >= L
            }
            // Zero the paddings so that the stream is what gets tested.
            let t_end = 136 + 3 * k;
            let s0 = 136 + (3 * k).div_ceil(4) * 4;
            c[t_end..s0].fill(0);
            let s_end = s0 + 2 * words;
            let r0 = s0 + (2 * words).div_ceil(16) * 16;
            c[s_end..r0].fill(0);
            let r_end = r0 + elems * layout.raw_bytes_per_elem();
            let len = c.len();
            c[r_end..len].fill(0);
            ChunkInfo::parse(layout, elems, &c).unwrap();
        }
        let mut out = vec![0u8; elems * layout.elem_bytes()];
        if decode_chunk(layout, Codec::Rans, &c, &mut out).is_ok() {
            oks += 1;
        }
    }
    println!("{oks} random chunks decoded without error");
}
