//! Every op against a CPU computation on random inputs: what `flash
//! selftest` runs on a GPU machine (which has no Rust toolchain), through
//! [`check_ops`]. The CPU side is written from the op's definition (f64
//! sums), not from the kernel, and rounds to bf16 where the op's output is
//! bf16.

use super::{
    attention_scratch_bytes, AttnShape, DevView, GemvOut, GemvPart, KernelInfo, Ops, OutType,
};
use flash_sys::cuda::{CudaError, DeviceMemory, Gpu};
use std::path::Path;

/// One op on one shape.
#[derive(Debug, Clone)]
pub struct OpCheck {
    pub op: String,
    pub shape: String,
    /// Largest |gpu - cpu|.
    pub max_abs: f64,
    /// Largest |gpu - cpu| / max(|cpu|) over the output (0 when exact).
    pub max_rel: f64,
    /// The bound on `max_rel`.
    pub tolerance: f64,
    pub ok: bool,
}

/// bf16 bits of `f` (round to nearest even), as the kernels do.
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    let u = u.wrapping_add(0x7fff + ((u >> 16) & 1));
    (u >> 16) as u16
}

pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `f` rounded to bf16 and back.
pub fn round_bf16(f: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(f))
}

/// A small deterministic generator (xorshift64*), so the checks need no
/// dependency and are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// `n` values, normal with standard deviation `std` and mean `mean`,
    /// already rounded to bf16.
    pub fn bf16s(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| round_bf16((mean + std * self.normal()) as f32))
            .collect()
    }
}

pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_bf16(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn upload(gpu: &Gpu, bytes: &[u8]) -> Result<DeviceMemory, CudaError> {
    let m = gpu.alloc(bytes.len().max(4))?;
    m.copy_from_host(0, bytes)?;
    Ok(m)
}

fn download(m: &DeviceMemory, bytes: usize) -> Result<Vec<u8>, CudaError> {
    let mut v = vec![0u8; bytes];
    m.copy_to_host(0, &mut v)?;
    Ok(v)
}

fn compare(op: &str, shape: String, gpu: &[f32], cpu: &[f64], tolerance: f64) -> OpCheck {
    let mut max_abs = 0f64;
    let mut scale = 0f64;
    let mut finite = gpu.len() == cpu.len();
    for (&g, &c) in gpu.iter().zip(cpu) {
        if !g.is_finite() {
            finite = false;
        }
        max_abs = max_abs.max((g as f64 - c).abs());
        scale = scale.max(c.abs());
    }
    let max_rel = if max_abs == 0.0 {
        0.0
    } else {
        max_abs / scale.max(1e-30)
    };
    OpCheck {
        op: op.to_string(),
        shape,
        max_abs,
        max_rel,
        tolerance,
        ok: finite && max_rel <= tolerance,
    }
}

/// Rope tables `[max_pos, hd/2]` for base `theta` (plain RoPE).
pub fn rope_tables(hd: usize, max_pos: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let inv = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
            let a = p as f64 * inv;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// RMSNorm as the kernels define it: normalised value rounded to bf16, times
/// the weight, rounded to bf16.
fn cpu_rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let n = x.len();
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let r = 1.0 / (ss / n as f64 + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &wi)| round_bf16(round_bf16((v as f64 * r) as f32) * wi) as f64)
        .collect()
}

/// Runs every check; also returns how the kernels were obtained.
pub fn check_ops(
    gpu: &Gpu,
    cache_dir: Option<&Path>,
) -> Result<(Vec<OpCheck>, KernelInfo), CudaError> {
    let ops = Ops::new(gpu, cache_dir)?;
    let mut out = Vec::new();
    let mut rng = Rng::new(42);
    check_embed(&ops, &mut rng, &mut out)?;
    check_rmsnorm(&ops, &mut rng, &mut out)?;
    for hd in [128, 64, 16] {
        for norms in [true, false] {
            check_qk_rope(&ops, &mut rng, hd, norms, false, &mut out)?;
        }
    }
    check_qk_rope(&ops, &mut rng, 128, true, true, &mut out)?;
    check_qk_rope(&ops, &mut rng, 64, false, true, &mut out)?;
    for (t, pos0, hd) in [
        (37, 0, 128),
        (1, 200, 128),
        (3, 100, 128),
        (1, 3000, 128),
        (20, 5, 64),
        (1, 70, 64),
        (9, 0, 16),
        (1, 9, 16),
    ] {
        check_attention(&ops, &mut rng, t, pos0, hd, &mut out)?;
    }
    check_elementwise(&ops, &mut rng, &mut out)?;
    check_argmax(&ops, &mut rng, &mut out)?;
    for (m, n, k, ty, acc) in [
        (7, 300, 256, OutType::Bf16, false),
        (64, 512, 1024, OutType::F32, true),
        (1, 4096, 4096, OutType::Bf16, false),
        (1, 1000, 2048, OutType::F32, false),
    ] {
        check_gemm(&ops, &mut rng, m, n, k, ty, acc, &mut out)?;
    }
    // The fused products of decode and short prompts: shapes of Qwen3-0.6B
    // and an odd tail (k = 8 * 33: the unrolled loop and the remainder), for
    // one token, a partial launch, a full one, and two launches.
    for (k, rows, tokens) in [
        (1024, [2048, 1024, 1024], 1),
        (1024, [2048, 1024, 1024], 13),
        (264, [37, 5, 0], 3),
        (264, [37, 5, 0], 8),
        (3072, [1, 0, 0], 1),
    ] {
        check_gemv(&ops, &mut rng, k, rows, tokens, &mut out)?;
    }
    for (k, rows, tokens) in [(1024, 3072, 1), (1024, 3072, 11), (264, 45, 5)] {
        check_gemv_swiglu(&ops, &mut rng, k, rows, tokens, &mut out)?;
    }
    Ok((out, ops.kernel_info().clone()))
}

fn check_embed(ops: &Ops, rng: &mut Rng, out: &mut Vec<OpCheck>) -> Result<(), CudaError> {
    let g = ops.gpu();
    let (v, h, t) = (1000, 256, 37);
    let table = rng.bf16s(v * h, 0.0, 1.0);
    let ids: Vec<i32> = (0..t).map(|_| (rng.next_u64() % v as u64) as i32).collect();
    let table_d = upload(g, &bf16_bytes(&table))?;
    let ids_d = upload(
        g,
        &ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<_>>(),
    )?;
    let o = g.alloc(t * h * 4)?;
    ops.embed(
        DevView::whole(&ids_d),
        DevView::whole(&table_d),
        DevView::whole(&o),
        t,
        h,
        v,
    )?;
    let got = bytes_f32(&download(&o, t * h * 4)?);
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| {
            table[i as usize * h..(i as usize + 1) * h]
                .iter()
                .map(|&x| x as f64)
        })
        .collect();
    out.push(compare(
        "embed",
        format!("{t} ids, [{v}, {h}]"),
        &got,
        &want,
        0.0,
    ));
    Ok(())
}

fn check_rmsnorm(ops: &Ops, rng: &mut Rng, out: &mut Vec<OpCheck>) -> Result<(), CudaError> {
    let g = ops.gpu();
    let eps = 1e-6f32;
    // f32 rows (the residual stream).
    let (rows, n) = (5, 4096);
    let x: Vec<f32> = (0..rows * n).map(|_| rng.normal() as f32 * 3.0).collect();
    let w = rng.bf16s(n, 1.0, 0.2);
    let (xd, wd, od) = (
        upload(g, &f32_bytes(&x))?,
        upload(g, &bf16_bytes(&w))?,
        g.alloc(rows * n * 2)?,
    );
    ops.rmsnorm_f32(
        DevView::whole(&xd),
        DevView::whole(&wd),
        DevView::whole(&od),
        rows,
        n,
        eps,
    )?;
    let got = bytes_bf16(&download(&od, rows * n * 2)?);
    let want: Vec<f64> = x.chunks(n).flat_map(|r| cpu_rmsnorm(r, &w, eps)).collect();
    out.push(compare(
        "rmsnorm_f32",
        format!("[{rows}, {n}]"),
        &got,
        &want,
        1e-2,
    ));
    Ok(())
}

fn rope_cpu(x: &[f64], pos: usize, cos: &[f32], sin: &[f32], hf: bool) -> Vec<f64> {
    let hd = x.len();
    let half = hd / 2;
    let r = |v: f64| {
        if hf {
            round_bf16(v as f32) as f64
        } else {
            v
        }
    };
    (0..hd)
        .map(|i| {
            let j = i % half;
            let (c, s) = (r(cos[pos * half + j] as f64), r(sin[pos * half + j] as f64));
            if i < half {
                r(x[i] * c) - r(x[i + half] * s)
            } else {
                r(x[i] * c) + r(x[i - half] * s)
            }
        })
        .collect()
}

fn check_qk_rope(
    ops: &Ops,
    rng: &mut Rng,
    hd: usize,
    norms: bool,
    hf: bool,
    out: &mut Vec<OpCheck>,
) -> Result<(), CudaError> {
    let g = ops.gpu();
    let (t, nq, nkv, pos0, max_seq) = (5, 8, 2, 3, 16);
    let eps = 1e-6f32;
    let shape = AttnShape {
        tokens: t,
        heads: nq,
        kv_heads: nkv,
        head_dim: hd,
        pos0,
        max_seq,
    };
    let q = rng.bf16s(t * nq * hd, 0.0, 1.0);
    let k = rng.bf16s(t * nkv * hd, 0.0, 1.0);
    let v = rng.bf16s(t * nkv * hd, 0.0, 1.0);
    let qw = rng.bf16s(hd, 1.0, 0.3);
    let kw = rng.bf16s(hd, 1.0, 0.3);
    let (cos, sin) = rope_tables(hd, max_seq, 10_000.0);
    let cache_bytes = shape.cache_elements() * 2;
    let (qd, kd, vd) = (
        upload(g, &bf16_bytes(&q))?,
        upload(g, &bf16_bytes(&k))?,
        upload(g, &bf16_bytes(&v))?,
    );
    let (qwd, kwd) = (upload(g, &bf16_bytes(&qw))?, upload(g, &bf16_bytes(&kw))?);
    let (cd, sd) = (upload(g, &f32_bytes(&cos))?, upload(g, &f32_bytes(&sin))?);
    // Biases (Qwen2) with the plain-RoPE case, so both paths are covered.
    let bias_vals = (!norms).then(|| {
        (
            rng.bf16s(nq * hd, 0.0, 0.5),
            rng.bf16s(nkv * hd, 0.0, 0.5),
            rng.bf16s(nkv * hd, 0.0, 0.5),
        )
    });
    let biases = match &bias_vals {
        Some((a, b, c)) => Some((
            upload(g, &bf16_bytes(a))?,
            upload(g, &bf16_bytes(b))?,
            upload(g, &bf16_bytes(c))?,
        )),
        None => None,
    };
    let add_bias = |x: &[f32], b: Option<&[f32]>| -> Vec<f32> {
        match b {
            Some(b) => x.iter().zip(b).map(|(&a, &c)| round_bf16(a + c)).collect(),
            None => x.to_vec(),
        }
    };
    let (kc, vc) = (g.alloc(cache_bytes)?, g.alloc(cache_bytes)?);
    kc.fill(0)?;
    vc.fill(0)?;
    ops.qk_norm_rope_cache(
        &shape,
        DevView::whole(&qd),
        DevView::whole(&kd),
        DevView::whole(&vd),
        if norms {
            Some((DevView::whole(&qwd), DevView::whole(&kwd)))
        } else {
            None
        },
        biases
            .as_ref()
            .map(|(q, k, v)| (DevView::whole(q), DevView::whole(k), DevView::whole(v))),
        DevView::whole(&cd),
        DevView::whole(&sd),
        DevView::whole(&kc),
        DevView::whole(&vc),
        eps,
        hf,
    )?;
    let got_q = bytes_bf16(&download(&qd, q.len() * 2)?);
    let got_k = bytes_bf16(&download(&kc, cache_bytes)?);
    let got_v = bytes_bf16(&download(&vc, cache_bytes)?);
    let prep = |x: &[f32], w: &[f32]| -> Vec<f64> {
        if norms {
            cpu_rmsnorm(x, w, eps)
        } else {
            x.iter().map(|&a| a as f64).collect()
        }
    };
    let mut want_q = Vec::new();
    for ti in 0..t {
        for h in 0..nq {
            let head = &q[(ti * nq + h) * hd..][..hd];
            let bias = bias_vals.as_ref().map(|b| &b.0[h * hd..][..hd]);
            let head = add_bias(head, bias);
            want_q.extend(rope_cpu(&prep(&head, &qw), pos0 + ti, &cos, &sin, hf));
        }
    }
    // Expected caches: zeros except rows pos0..pos0+t.
    let mut want_k = vec![0f64; shape.cache_elements()];
    let mut want_v = vec![0f64; shape.cache_elements()];
    for ti in 0..t {
        for h in 0..nkv {
            let head = &k[(ti * nkv + h) * hd..][..hd];
            let head = add_bias(head, bias_vals.as_ref().map(|b| &b.1[h * hd..][..hd]));
            let r = rope_cpu(&prep(&head, &kw), pos0 + ti, &cos, &sin, hf);
            let at = (h * max_seq + pos0 + ti) * hd;
            want_k[at..at + hd].copy_from_slice(&r);
            let vh = &v[(ti * nkv + h) * hd..][..hd];
            let vh = add_bias(vh, bias_vals.as_ref().map(|b| &b.2[h * hd..][..hd]));
            for i in 0..hd {
                want_v[at + i] = vh[i] as f64;
            }
        }
    }
    let tag = match (norms, hf) {
        (true, false) => "q/k norm + rope",
        (false, false) => "bias + rope",
        (true, true) => "q/k norm + rope (hf)",
        (false, true) => "bias + rope (hf)",
    };
    let shape_s = format!("t {t}, heads {nq}/{nkv}, hd {hd}, pos0 {pos0}");
    out.push(compare(
        &format!("{tag}: q"),
        shape_s.clone(),
        &got_q,
        &want_q,
        1e-2,
    ));
    out.push(compare(
        &format!("{tag}: k cache"),
        shape_s.clone(),
        &got_k,
        &want_k,
        1e-2,
    ));
    out.push(compare(
        &format!("{tag}: v cache"),
        shape_s,
        &got_v,
        &want_v,
        0.0,
    ));
    Ok(())
}

fn check_attention(
    ops: &Ops,
    rng: &mut Rng,
    t: usize,
    pos0: usize,
    hd: usize,
    out: &mut Vec<OpCheck>,
) -> Result<(), CudaError> {
    let g = ops.gpu();
    let (nq, nkv) = (8, 2);
    let max_seq = (pos0 + t).next_multiple_of(64);
    let shape = AttnShape {
        tokens: t,
        heads: nq,
        kv_heads: nkv,
        head_dim: hd,
        pos0,
        max_seq,
    };
    let q = rng.bf16s(t * nq * hd, 0.0, 1.0);
    let kc = rng.bf16s(shape.cache_elements(), 0.0, 1.0);
    let vc = rng.bf16s(shape.cache_elements(), 0.0, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let (qd, kd, vd) = (
        upload(g, &bf16_bytes(&q))?,
        upload(g, &bf16_bytes(&kc))?,
        upload(g, &bf16_bytes(&vc))?,
    );
    let od = g.alloc(t * nq * hd * 2)?;
    let scratch = g.alloc(attention_scratch_bytes(hd))?;
    ops.attention(
        &shape,
        DevView::whole(&qd),
        DevView::whole(&kd),
        DevView::whole(&vd),
        DevView::whole(&od),
        DevView::whole(&scratch),
        scale,
    )?;
    let got = bytes_bf16(&download(&od, t * nq * hd * 2)?);
    let mut want = Vec::with_capacity(t * nq * hd);
    let group = nq / nkv;
    for ti in 0..t {
        let len = pos0 + ti + 1;
        for h in 0..nq {
            let kh = h / group;
            let qh = &q[(ti * nq + h) * hd..][..hd];
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    let kr = &kc[(kh * max_seq + j) * hd..][..hd];
                    qh.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..hd {
                let o: f64 = (0..len)
                    .map(|j| e[j] * vc[(kh * max_seq + j) * hd + i] as f64)
                    .sum();
                want.push(o / sum);
            }
        }
    }
    out.push(compare(
        "attention",
        format!("t {t}, pos0 {pos0}, heads {nq}/{nkv}, hd {hd}"),
        &got,
        &want,
        1e-2,
    ));
    Ok(())
}

fn check_elementwise(ops: &Ops, rng: &mut Rng, out: &mut Vec<OpCheck>) -> Result<(), CudaError> {
    let g = ops.gpu();
    let n = 10_000;
    let gate = rng.bf16s(n, 0.0, 2.0);
    let up = rng.bf16s(n, 0.0, 2.0);
    let (gd, ud) = (upload(g, &bf16_bytes(&gate))?, upload(g, &bf16_bytes(&up))?);
    ops.swiglu(
        DevView::whole(&gd),
        DevView::whole(&ud),
        DevView::whole(&gd),
        n,
    )?;
    let got = bytes_bf16(&download(&gd, n * 2)?);
    let want: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&a, &b)| {
            let s = round_bf16((a as f64 / (1.0 + (-a as f64).exp())) as f32);
            round_bf16(s * b) as f64
        })
        .collect();
    out.push(compare(
        "swiglu (in place)",
        format!("{n}"),
        &got,
        &want,
        1e-2,
    ));

    let n = 10_001;
    let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let d = rng.bf16s(n, 0.0, 1.0);
    let (xd, dd) = (upload(g, &f32_bytes(&x))?, upload(g, &bf16_bytes(&d))?);
    ops.residual_add(DevView::whole(&xd), DevView::whole(&dd), n, false)?;
    let got = bytes_f32(&download(&xd, n * 4)?);
    let want: Vec<f64> = x.iter().zip(&d).map(|(&a, &b)| (a + b) as f64).collect();
    out.push(compare("residual_add", format!("{n}"), &got, &want, 1e-6));
    // Rounded to bf16 (transformers' residual stream).
    let xr = rng.bf16s(n, 0.0, 1.0);
    let xd = upload(g, &f32_bytes(&xr))?;
    ops.residual_add(DevView::whole(&xd), DevView::whole(&dd), n, true)?;
    let got = bytes_f32(&download(&xd, n * 4)?);
    let want: Vec<f64> = xr
        .iter()
        .zip(&d)
        .map(|(&a, &b)| round_bf16(a + b) as f64)
        .collect();
    out.push(compare(
        "residual_add (bf16)",
        format!("{n}"),
        &got,
        &want,
        0.0,
    ));
    // bf16 -> f32.
    let od = g.alloc(n * 4)?;
    ops.bf16_to_f32(DevView::whole(&dd), DevView::whole(&od), n)?;
    let got = bytes_f32(&download(&od, n * 4)?);
    let want: Vec<f64> = d.iter().map(|&a| a as f64).collect();
    out.push(compare("bf16_to_f32", format!("{n}"), &got, &want, 0.0));
    Ok(())
}

fn check_argmax(ops: &Ops, rng: &mut Rng, out: &mut Vec<OpCheck>) -> Result<(), CudaError> {
    let g = ops.gpu();
    let (rows, n) = (4, 151_936);
    let mut x: Vec<f32> = (0..rows * n).map(|_| rng.normal() as f32).collect();
    // Row 1: a tie, the first index must win; row 2: NaNs are ignored;
    // row 3: the maximum at the last index.
    x[n + 77] = 50.0;
    x[n + 90_000] = 50.0;
    x[2 * n + 5] = f32::NAN;
    x[2 * n + 6] = 60.0;
    x[4 * n - 1] = 70.0;
    let xd = upload(g, &f32_bytes(&x))?;
    let od = g.alloc(rows * 4)?;
    ops.argmax(DevView::whole(&xd), DevView::whole(&od), rows, n)?;
    let got: Vec<f32> = download(&od, rows * 4)?
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
        .collect();
    let want: Vec<f64> = x
        .chunks(n)
        .map(|r| {
            let mut bi = 0usize;
            for (i, &v) in r.iter().enumerate() {
                if !v.is_nan() && (r[bi].is_nan() || v > r[bi]) {
                    bi = i;
                }
            }
            bi as f64
        })
        .collect();
    out.push(compare(
        "argmax",
        format!("[{rows}, {n}]"),
        &got,
        &want,
        0.0,
    ));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_gemm(
    ops: &Ops,
    rng: &mut Rng,
    m: usize,
    n: usize,
    k: usize,
    ty: OutType,
    accumulate: bool,
    out: &mut Vec<OpCheck>,
) -> Result<(), CudaError> {
    let g = ops.gpu();
    let x = rng.bf16s(m * k, 0.0, 1.0);
    let w = rng.bf16s(n * k, 0.0, 0.05);
    let y0: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
    let (xd, wd) = (upload(g, &bf16_bytes(&x))?, upload(g, &bf16_bytes(&w))?);
    let yd = match ty {
        OutType::F32 => upload(g, &f32_bytes(&y0))?,
        OutType::Bf16 => g.alloc(m * n * 2)?,
    };
    ops.gemm(
        DevView::whole(&xd),
        DevView::whole(&wd),
        DevView::whole(&yd),
        ty,
        m,
        n,
        k,
        accumulate,
    )?;
    let got = match ty {
        OutType::F32 => bytes_f32(&download(&yd, m * n * 4)?),
        OutType::Bf16 => bytes_bf16(&download(&yd, m * n * 2)?),
    };
    let mut want = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let mut s: f64 = x[i * k..(i + 1) * k]
                .iter()
                .zip(&w[j * k..(j + 1) * k])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            if accumulate {
                s += y0[i * n + j] as f64;
            }
            want.push(s);
        }
    }
    let tol = match ty {
        OutType::Bf16 => 1e-2,
        OutType::F32 => 1e-4,
    };
    out.push(compare(
        "gemm",
        format!(
            "{m}x{n}x{k} -> {}{}",
            match ty {
                OutType::Bf16 => "bf16",
                OutType::F32 => "f32",
            },
            if accumulate { " (+=)" } else { "" }
        ),
        &got,
        &want,
        tol,
    ));
    Ok(())
}

/// `[tokens, rows]`: the dot products of the `rows` rows of `w` (row-major,
/// `k` wide) with each of the `tokens` rows of `x`.
fn cpu_gemv(x: &[f32], w: &[f32], k: usize, rows: usize) -> Vec<f64> {
    x.chunks(k)
        .flat_map(|xt| {
            (0..rows).map(move |r| {
                w[r * k..(r + 1) * k]
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            })
        })
        .collect()
}

/// Three matrices of `rows` in one call for `tokens` inputs, each written in
/// another mode.
fn check_gemv(
    ops: &Ops,
    rng: &mut Rng,
    k: usize,
    rows: [usize; 3],
    tokens: usize,
    out: &mut Vec<OpCheck>,
) -> Result<(), CudaError> {
    let g = ops.gpu();
    let modes = [GemvOut::Bf16, GemvOut::AddF32, GemvOut::AddRounded];
    let x = rng.bf16s(tokens * k, 0.0, 1.0);
    let xd = upload(g, &bf16_bytes(&x))?;
    let mut ws = Vec::new();
    let mut outs = Vec::new();
    let mut starts = Vec::new();
    for (&r, &mode) in rows.iter().zip(&modes) {
        let w = rng.bf16s(r * k, 0.0, 0.05);
        // Residual-like values, bf16-exact for the rounded mode.
        let y0: Vec<f32> = (0..tokens * r)
            .map(|_| round_bf16(rng.normal() as f32))
            .collect();
        ws.push((upload(g, &bf16_bytes(&w))?, w));
        outs.push(match mode {
            GemvOut::Bf16 => g.alloc((tokens * r * 2).max(4))?,
            _ => upload(g, &f32_bytes(&y0))?,
        });
        starts.push(y0);
    }
    let parts: Vec<GemvPart<'_>> = (0..3)
        .map(|i| GemvPart {
            w: DevView::whole(&ws[i].0),
            out: DevView::whole(&outs[i]),
            rows: rows[i],
            mode: modes[i],
        })
        .collect();
    ops.gemv(DevView::whole(&xd), k, tokens, &parts)?;
    for i in 0..3 {
        let r = rows[i];
        if r == 0 {
            continue;
        }
        let n = tokens * r;
        let dots = cpu_gemv(&x, &ws[i].1, k, r);
        let (got, want, tol): (Vec<f32>, Vec<f64>, f64) = match modes[i] {
            GemvOut::Bf16 => (bytes_bf16(&download(&outs[i], n * 2)?), dots, 1e-2),
            GemvOut::AddF32 => (
                bytes_f32(&download(&outs[i], n * 4)?),
                dots.iter()
                    .zip(&starts[i])
                    .map(|(d, &y)| d + y as f64)
                    .collect(),
                1e-4,
            ),
            _ => (
                bytes_f32(&download(&outs[i], n * 4)?),
                dots.iter()
                    .zip(&starts[i])
                    .map(|(&d, &y)| round_bf16(y + round_bf16(d as f32)) as f64)
                    .collect(),
                1e-2,
            ),
        };
        out.push(compare(
            "gemv",
            format!("{tokens} x {r}x{k} of {rows:?} -> {:?}", modes[i]),
            &got,
            &want,
            tol,
        ));
    }
    Ok(())
}

fn check_gemv_swiglu(
    ops: &Ops,
    rng: &mut Rng,
    k: usize,
    rows: usize,
    tokens: usize,
    out: &mut Vec<OpCheck>,
) -> Result<(), CudaError> {
    let g = ops.gpu();
    let x = rng.bf16s(tokens * k, 0.0, 1.0);
    let wg = rng.bf16s(rows * k, 0.0, 0.05);
    let wu = rng.bf16s(rows * k, 0.0, 0.05);
    let (xd, gd, ud) = (
        upload(g, &bf16_bytes(&x))?,
        upload(g, &bf16_bytes(&wg))?,
        upload(g, &bf16_bytes(&wu))?,
    );
    let n = tokens * rows;
    let od = g.alloc(n * 2)?;
    ops.gemv_swiglu(
        DevView::whole(&xd),
        k,
        tokens,
        DevView::whole(&gd),
        DevView::whole(&ud),
        DevView::whole(&od),
        rows,
    )?;
    let got = bytes_bf16(&download(&od, n * 2)?);
    let (gs, us) = (cpu_gemv(&x, &wg, k, rows), cpu_gemv(&x, &wu, k, rows));
    let want: Vec<f64> = gs
        .iter()
        .zip(&us)
        .map(|(&gv, &uv)| {
            let gv = round_bf16(gv as f32) as f64;
            let a = round_bf16((gv / (1.0 + (-gv).exp())) as f32);
            round_bf16(a * round_bf16(uv as f32)) as f64
        })
        .collect();
    out.push(compare(
        "gemv_swiglu",
        format!("{tokens} x 2 x {rows}x{k}"),
        &got,
        &want,
        2e-2,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: rounds to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway, rounds up to the even neighbour.
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(-2.5)), -2.5);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn comparisons_flag_errors_and_non_finite_values() {
        let ok = compare("x", String::new(), &[1.0, 2.0], &[1.0, 2.0], 0.0);
        assert!(ok.ok && ok.max_abs == 0.0);
        let off = compare("x", String::new(), &[1.0, 2.5], &[1.0, 2.0], 0.1);
        assert!(!off.ok);
        assert!((off.max_rel - 0.25).abs() < 1e-12);
        let nan = compare("x", String::new(), &[f32::NAN], &[1.0], 1.0);
        assert!(!nan.ok);
        let short = compare("x", String::new(), &[1.0], &[1.0, 2.0], 1.0);
        assert!(!short.ok);
    }

    #[test]
    fn the_rng_is_deterministic_and_roughly_normal() {
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
        let v: Vec<f64> = (0..20_000).map(|_| a.normal()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn rope_tables_start_at_identity() {
        let (c, s) = rope_tables(8, 3, 10_000.0);
        assert_eq!(c.len(), 12);
        assert!(c[..4].iter().all(|&x| x == 1.0));
        assert!(s[..4].iter().all(|&x| x == 0.0));
        assert!((s[4] - 1f32.sin()).abs() < 1e-6);
    }

    /// Runs every op against the CPU on a GPU machine.
    #[test]
    #[ignore = "needs a GPU"]
    fn ops_match_the_cpu_on_a_gpu() {
        let cuda = flash_sys::cuda::probe().expect("a GPU");
        let gpu = cuda.device(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (checks, _) = check_ops(&gpu, Some(dir.path())).unwrap();
        for c in &checks {
            assert!(c.ok, "{c:?}");
        }
    }
}
