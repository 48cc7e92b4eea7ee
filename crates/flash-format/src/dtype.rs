//! Element types, named as the safetensors specification names them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Every element type of the safetensors specification.
///
/// Sub-byte types (`F4`, `F6_*`) are packed: a tensor's byte length is
/// `elements * bits / 8`, and the element count times the bit width must be a
/// whole number of bytes.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    BOOL,
    F4,
    F6_E2M3,
    F6_E3M2,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl DType {
    pub const ALL: [DType; 20] = [
        DType::BOOL,
        DType::F4,
        DType::F6_E2M3,
        DType::F6_E3M2,
        DType::U8,
        DType::I8,
        DType::F8_E5M2,
        DType::F8_E4M3,
        DType::F8_E8M0,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::C64,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// Width of one element in bits.
    pub fn bits(self) -> u64 {
        match self {
            DType::F4 => 4,
            DType::F6_E2M3 | DType::F6_E3M2 => 6,
            DType::BOOL | DType::U8 | DType::I8 => 8,
            DType::F8_E5M2 | DType::F8_E4M3 | DType::F8_E8M0 => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
        }
    }

    /// The safetensors name (`"BF16"`, `"F8_E4M3"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::BOOL => "BOOL",
            DType::F4 => "F4",
            DType::F6_E2M3 => "F6_E2M3",
            DType::F6_E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8_E5M2 => "F8_E5M2",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E8M0 => "F8_E8M0",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// True for the types `--dtype` conversion acts on (F16, BF16, F32).
    /// F64, FP8 and sub-byte types are left as they are: converting them
    /// would lose precision or change a quantization scheme silently.
    pub fn is_convertible_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32)
    }

    /// Byte length of a tensor of this type and shape, or `None` when the
    /// element count overflows or does not fill a whole number of bytes.
    pub fn byte_len(self, shape: &[u64]) -> Option<u64> {
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        let bits = elements.checked_mul(self.bits())?;
        if bits % 8 != 0 {
            return None;
        }
        Some(bits / 8)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An element type name that the specification does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}")]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .iter()
            .copied()
            .find(|d| d.name() == s)
            .ok_or_else(|| UnknownDType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.name())
            );
        }
        assert!("bf16".parse::<DType>().is_err());
    }

    #[test]
    fn byte_len_checks() {
        assert_eq!(DType::BF16.byte_len(&[]), Some(2));
        assert_eq!(DType::BF16.byte_len(&[0, 7]), Some(0));
        assert_eq!(DType::F4.byte_len(&[3]), None);
        assert_eq!(DType::F4.byte_len(&[4]), Some(2));
        assert_eq!(DType::F6_E2M3.byte_len(&[4]), Some(3));
        assert_eq!(DType::U64.byte_len(&[u64::MAX, 2]), None);
    }
}
