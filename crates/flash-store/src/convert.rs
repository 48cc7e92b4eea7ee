//! Floating-point conversion at import (`--dtype`): F16, BF16 and F32 into
//! each other, rounding to nearest even. Other dtypes are never converted.

use flash_format::DType;
use half::{bf16, f16};
use rayon::prelude::*;

/// What `--dtype` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// Keep every tensor as stored.
    #[default]
    Auto,
    To(DType),
}

impl std::str::FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => DtypeChoice::Auto,
            "bf16" | "bfloat16" => DtypeChoice::To(DType::BF16),
            "fp16" | "f16" | "float16" | "half" => DtypeChoice::To(DType::F16),
            "fp32" | "f32" | "float32" | "float" => DtypeChoice::To(DType::F32),
            _ => return Err(format!("unknown dtype {s:?} (auto, bf16, fp16, fp32)")),
        })
    }
}

impl DtypeChoice {
    /// The dtype a tensor stored as `from` gets.
    pub fn target(self, from: DType) -> DType {
        match self {
            DtypeChoice::To(to) if from.is_convertible_float() => to,
            _ => from,
        }
    }

    /// Name transformers uses in config.json (`torch_dtype`).
    pub fn torch_name(self) -> Option<&'static str> {
        match self {
            DtypeChoice::Auto => None,
            DtypeChoice::To(DType::BF16) => Some("bfloat16"),
            DtypeChoice::To(DType::F16) => Some("float16"),
            DtypeChoice::To(_) => Some("float32"),
        }
    }
}

const PAR_CHUNK: usize = 1 << 16;

fn to_f32(from: DType, bytes: &[u8]) -> Vec<f32> {
    let width = (from.bits() / 8) as usize;
    let mut out = vec![0f32; bytes.len() / width];
    out.par_chunks_mut(PAR_CHUNK)
        .zip(bytes.par_chunks(PAR_CHUNK * width))
        .for_each(|(o, b)| {
            for (x, e) in o.iter_mut().zip(b.chunks_exact(width)) {
                *x = match from {
                    DType::BF16 => bf16::from_le_bytes([e[0], e[1]]).to_f32(),
                    DType::F16 => f16::from_le_bytes([e[0], e[1]]).to_f32(),
                    _ => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                }
            }
        });
    out
}

fn from_f32(to: DType, values: &[f32]) -> Vec<u8> {
    let width = (to.bits() / 8) as usize;
    let mut out = vec![0u8; values.len() * width];
    out.par_chunks_mut(PAR_CHUNK * width)
        .zip(values.par_chunks(PAR_CHUNK))
        .for_each(|(o, v)| {
            for (e, &x) in o.chunks_exact_mut(width).zip(v) {
                match to {
                    DType::BF16 => e.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    DType::F16 => e.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
                    _ => e.copy_from_slice(&x.to_le_bytes()),
                }
            }
        });
    out
}

/// Converts little-endian `bytes` of dtype `from` to `to`. Both must be
/// convertible floats; equal dtypes return the bytes unchanged.
pub fn convert(from: DType, to: DType, bytes: Vec<u8>) -> Vec<u8> {
    if from == to {
        return bytes;
    }
    assert!(from.is_convertible_float() && to.is_convertible_float());
    from_f32(to, &to_f32(from, &bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_where_exact() {
        let vals = [0.0f32, 1.0, -2.5, 0.15625, 65504.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let h = convert(DType::F32, DType::F16, f32b.clone());
        assert_eq!(convert(DType::F16, DType::F32, h), f32b);
        let b = convert(DType::F32, DType::BF16, f32b.clone());
        let back = convert(DType::BF16, DType::F32, b);
        let got: Vec<f32> = back
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&got[..4], &vals[..4]);
        assert_eq!(got[4], 65536.0, "bf16 rounds 65504 to nearest even");
    }

    #[test]
    fn choice_leaves_other_dtypes() {
        let c: DtypeChoice = "fp16".parse().unwrap();
        assert_eq!(c.target(DType::BF16), DType::F16);
        assert_eq!(c.target(DType::I64), DType::I64);
        assert_eq!(c.target(DType::F8_E4M3), DType::F8_E4M3);
        assert_eq!(c.target(DType::F64), DType::F64);
        assert!("int4".parse::<DtypeChoice>().is_err());
    }
}
