//! Element layouts (how an element splits into a coded symbol and raw bits)
//! and chunk codecs.

/// How an element is split into a coded symbol and raw bits. Elements are
/// little-endian.
///
/// | layout | element | symbol | raw bytes per element |
/// |---|---|---|---|
/// | `Bf16` | `s eeeeeeee mmmmmmm` | the 8 exponent bits | 1: `s << 7 \| m7` |
/// | `F16` | `s eeeee mmmmmmmmmm` | the high byte (s, e5, top 2 bits of m) | 1: the low byte |
/// | `F32` | `s e8 m23` | the 8 exponent bits | 3: the 24-bit LE value `s << 23 \| m23` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
    /// IEEE binary32.
    F32,
}

impl Layout {
    /// The layout of a safetensors dtype name (`BF16`, `F16`, `F32`;
    /// case-insensitive), `None` for any other.
    pub fn for_dtype(name: &str) -> Option<Layout> {
        match name.to_ascii_uppercase().as_str() {
            "BF16" => Some(Layout::Bf16),
            "F16" => Some(Layout::F16),
            "F32" => Some(Layout::F32),
            _ => None,
        }
    }

    /// The layout for elements of this many bytes that are bf16 (when
    /// `bfloat` is true) or IEEE floats: 2 → `Bf16`/`F16`, 4 → `F32`.
    pub fn from_elem_bytes(elem_bytes: usize, bfloat: bool) -> Option<Layout> {
        match (elem_bytes, bfloat) {
            (2, true) => Some(Layout::Bf16),
            (2, false) => Some(Layout::F16),
            (4, false) => Some(Layout::F32),
            _ => None,
        }
    }

    /// Bytes per decoded element: 2, 2, 4.
    pub const fn elem_bytes(self) -> usize {
        match self {
            Layout::Bf16 | Layout::F16 => 2,
            Layout::F32 => 4,
        }
    }

    /// Bytes per element in the raw plane: 1, 1, 3.
    pub const fn raw_bytes_per_elem(self) -> usize {
        match self {
            Layout::Bf16 | Layout::F16 => 1,
            Layout::F32 => 3,
        }
    }

    /// The layout's number in a [`GpuChunk`](crate::GpuChunk) kind: 0, 1, 2.
    pub const fn code(self) -> u32 {
        match self {
            Layout::Bf16 => 0,
            Layout::F16 => 1,
            Layout::F32 => 2,
        }
    }

    /// The layout with this [`code`](Layout::code).
    pub const fn from_code(code: u32) -> Option<Layout> {
        match code {
            0 => Some(Layout::Bf16),
            1 => Some(Layout::F16),
            2 => Some(Layout::F32),
            _ => None,
        }
    }
}

/// How one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The chunk's decoded bytes verbatim.
    Raw,
    /// Header, lane states, frequency table, rANS stream, raw plane.
    Rans,
}

impl Codec {
    /// The codec's number in a [`GpuChunk`](crate::GpuChunk) kind: 0, 1.
    pub const fn code(self) -> u32 {
        match self {
            Codec::Raw => 0,
            Codec::Rans => 1,
        }
    }

    /// The codec with this [`code`](Codec::code).
    pub const fn from_code(code: u32) -> Option<Codec> {
        match code {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Rans),
            _ => None,
        }
    }
}

// Splitting and joining elements. `RB` raw bytes, `EB` element bytes.

/// bf16 `[lo, hi]` → (exponent, `s << 7 | m7`).
#[inline(always)]
pub(crate) fn split_bf16(e: [u8; 2]) -> (u8, [u8; 1]) {
    let sym = (e[1] << 1) | (e[0] >> 7);
    (sym, [(e[1] & 0x80) | (e[0] & 0x7f)])
}

/// The inverse of [`split_bf16`].
#[inline(always)]
pub(crate) fn join_bf16(sym: u32, r: [u8; 1]) -> [u8; 2] {
    let r = r[0] as u32;
    let v = ((r & 0x80) << 8) | (sym << 7) | (r & 0x7f);
    (v as u16).to_le_bytes()
}

/// f16 `[lo, hi]` → (hi, lo).
#[inline(always)]
pub(crate) fn split_f16(e: [u8; 2]) -> (u8, [u8; 1]) {
    (e[1], [e[0]])
}

/// The inverse of [`split_f16`].
#[inline(always)]
pub(crate) fn join_f16(sym: u32, r: [u8; 1]) -> [u8; 2] {
    [r[0], sym as u8]
}

/// f32 bytes → (exponent, 24-bit LE `s << 23 | m23`).
#[inline(always)]
pub(crate) fn split_f32(e: [u8; 4]) -> (u8, [u8; 3]) {
    let sym = (e[3] << 1) | (e[2] >> 7);
    (sym, [e[0], e[1], (e[3] & 0x80) | (e[2] & 0x7f)])
}

/// The inverse of [`split_f32`].
#[inline(always)]
pub(crate) fn join_f32(sym: u32, r: [u8; 3]) -> [u8; 4] {
    let r = u32::from_le_bytes([r[0], r[1], r[2], 0]);
    let v = ((r & 0x80_0000) << 8) | (sym << 23) | (r & 0x7f_ffff);
    v.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_join_are_inverse_and_match_the_spec() {
        for v in 0..=u16::MAX {
            let b = v.to_le_bytes();
            let (s, r) = split_bf16(b);
            assert_eq!(s as u16, (v >> 7) & 0xff);
            assert_eq!(r[0] as u16, ((v >> 15) << 7) | (v & 0x7f));
            assert_eq!(join_bf16(s as u32, r), b);
            let (s, r) = split_f16(b);
            assert_eq!(s as u16, v >> 8);
            assert_eq!(join_f16(s as u32, r), b);
        }
        for v in [
            0u32,
            1,
            0x8000_0000,
            0x7f80_0000,
            0xffff_ffff,
            0x3f80_0001,
            0xc123_4567,
        ] {
            let b = v.to_le_bytes();
            let (s, r) = split_f32(b);
            assert_eq!(s as u32, (v >> 23) & 0xff);
            assert_eq!(
                u32::from_le_bytes([r[0], r[1], r[2], 0]),
                ((v >> 31) << 23) | (v & 0x7f_ffff)
            );
            assert_eq!(join_f32(s as u32, r), b);
        }
    }

    #[test]
    fn codes_round_trip() {
        for l in [Layout::Bf16, Layout::F16, Layout::F32] {
            assert_eq!(Layout::from_code(l.code()), Some(l));
        }
        for c in [Codec::Raw, Codec::Rans] {
            assert_eq!(Codec::from_code(c.code()), Some(c));
        }
        assert_eq!(Layout::for_dtype("bf16"), Some(Layout::Bf16));
        assert_eq!(Layout::for_dtype("F64"), None);
        assert_eq!(Layout::from_elem_bytes(4, false), Some(Layout::F32));
        assert_eq!(Layout::from_elem_bytes(4, true), None);
    }
}
