// The engine's element-wise, normalisation and attention kernels, compiled at
// run time by NVRTC (see nvrtc.rs) and cached on disk. No headers: bf16 is
// handled as its 16 raw bits (`unsigned short`), so NVRTC needs no include
// path. Every kernel accumulates in f32.
//
// Rounding follows Hugging Face transformers where it is cheap to do so
// (RMSNorm: normalised value rounded to bf16, then multiplied by the bf16
// weight; SwiGLU: silu rounded to bf16, then multiplied), so that the GPU
// engine tracks a bf16 transformers run closely.

typedef unsigned short bf16;
typedef unsigned int u32;

#define FLASH_INF __int_as_float(0x7f800000)
#define MAX_HEAD_DIM 256
#define MAX_WARPS 8
#define EPT (MAX_HEAD_DIM / 32)

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float round_bf(float f) { return bf2f(f2bf(f)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the total. `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (lane < nw) ? sh[lane] : 0.f;
    return warp_sum(v);
}

// out[t, :] = f32(table[ids[t], :]); one block per token. Ids outside the
// table give zeros (the host checks them before the upload).
extern "C" __global__ void embed_f32(const int* __restrict__ ids, const bf16* __restrict__ table,
                                     float* __restrict__ out, int hidden, int vocab) {
    const int t = blockIdx.x;
    const int id = ids[t];
    float* o = out + (size_t)t * hidden;
    if (id < 0 || id >= vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0.f;
        return;
    }
    const bf16* row = table + (size_t)id * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf2f(row[i]);
}

// RMSNorm of f32 rows (the residual stream) to bf16; one block per row.
extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, const bf16* __restrict__ w,
                                       bf16* __restrict__ out, int n, float eps) {
    __shared__ float sh[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    bf16* orow = out + (size_t)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i];
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float r = rsqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = f2bf(round_bf(xr[i] * r) * bf2f(w[i]));
}

// After the q/k/v projections of `t` tokens at positions pos0..pos0+t:
// projection biases added when given (Qwen2; null otherwise), per-head RMSNorm of q and k (Qwen3's q_norm/k_norm; skipped when the weight
// is null), rotary embedding (neox style: the halves of each head rotate,
// HF's rotate_half) with cos/sin tables [max_pos, hd/2], q written back in
// place, k and v written into the layer's cache [nkv, max_seq, hd].
// Grid (t, nq + nkv), block: hd rounded up to a multiple of 32.
extern "C" __global__ void qk_norm_rope_cache(bf16* q, const bf16* __restrict__ k,
                                              const bf16* __restrict__ v,
                                              const bf16* __restrict__ qw,
                                              const bf16* __restrict__ kw,
                                              const bf16* __restrict__ qb,
                                              const bf16* __restrict__ kb,
                                              const bf16* __restrict__ vb,
                                              const float* __restrict__ cos_t,
                                              const float* __restrict__ sin_t,
                                              bf16* __restrict__ kc, bf16* __restrict__ vc,
                                              int nq, int nkv, int hd, int pos0, int max_seq,
                                              float eps, int hf_round) {
    __shared__ float red[32];
    __shared__ float xs[MAX_HEAD_DIM];
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int pos = pos0 + t;
    const bool isq = h < nq;
    const int kh = h - nq;
    const bf16* src = isq ? q + ((size_t)t * nq + h) * hd : k + ((size_t)t * nkv + kh) * hd;
    const bf16* w = isq ? qw : kw;
    const bf16* b = isq ? qb : kb;
    const int hb = isq ? h : kh;
    float x = (i < hd) ? bf2f(src[i]) : 0.f;
    if (b != 0 && i < hd) x = round_bf(x + bf2f(b[hb * hd + i]));
    if (w != 0) {
        const float ss = block_sum(x * x, red);
        const float r = rsqrtf(ss / (float)hd + eps);
        if (i < hd) x = round_bf(round_bf(x * r) * bf2f(w[i]));
    }
    if (i < hd) xs[i] = x;
    __syncthreads();
    if (i >= hd) return;
    const int half = hd >> 1;
    const int j = i < half ? i : i - half;
    float c = cos_t[(size_t)pos * half + j];
    float s = sin_t[(size_t)pos * half + j];
    float y;
    if (hf_round) {
        // As transformers in bf16: cos/sin rounded to bf16, each product
        // and the sum rounded (q * cos + rotate_half(q) * sin).
        c = round_bf(c);
        s = round_bf(s);
        y = i < half ? round_bf(x * c) - round_bf(xs[i + half] * s)
                     : round_bf(x * c) + round_bf(xs[i - half] * s);
    } else {
        y = i < half ? x * c - xs[i + half] * s : x * c + xs[i - half] * s;
    }
    const bf16 o = f2bf(y);
    if (isq) {
        q[((size_t)t * nq + h) * hd + i] = o;
    } else {
        const size_t at = ((size_t)kh * max_seq + pos) * hd + i;
        kc[at] = o;
        const bf16 vv = v[((size_t)t * nkv + kh) * hd + i];
        vc[at] = vb != 0 ? f2bf(bf2f(vv) + bf2f(vb[kh * hd + i])) : vv;
    }
}

// Causal grouped-query attention of `t` queries at positions pos0..pos0+t
// against the layer's cache (keys 0..=position). Grid (t, nq, nsplit); block
// up to MAX_WARPS warps. Split z covers keys [z*chunk, (z+1)*chunk); each warp
// takes every nw-th key of it with an online softmax in f32. With nsplit == 1
// the block writes `out` [t, nq, hd] (bf16); else it writes its partial
// (max, sum, acc[hd]) to `part` [t, nq, nsplit, hd + 2] for attention_combine.
extern "C" __global__ void attention(const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                     const bf16* __restrict__ vc, bf16* __restrict__ out,
                                     float* __restrict__ part, int nq, int nkv, int hd, int pos0,
                                     int max_seq, int chunk, float scale) {
    __shared__ float sm[MAX_WARPS], sl[MAX_WARPS];
    __shared__ float sacc[MAX_WARPS * MAX_HEAD_DIM];
    const int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z, nsplit = gridDim.z;
    const int kh = h / (nq / nkv);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int L = pos0 + t + 1;
    const int j0 = z * chunk;
    const int j1 = min(L, j0 + chunk);
    const bf16* qp = q + ((size_t)t * nq + h) * hd;
    float qv[EPT], acc[EPT];
#pragma unroll
    for (int e = 0; e < EPT; e++) {
        const int idx = lane + 32 * e;
        qv[e] = idx < hd ? bf2f(qp[idx]) * scale : 0.f;
        acc[e] = 0.f;
    }
    float m = -FLASH_INF, l = 0.f;
    const bf16* kb = kc + (size_t)kh * max_seq * hd;
    const bf16* vb = vc + (size_t)kh * max_seq * hd;
    for (int j = j0 + w; j < j1; j += nw) {
        const bf16* kp = kb + (size_t)j * hd;
        const bf16* vp = vb + (size_t)j * hd;
        float s = 0.f;
        float vv[EPT];
#pragma unroll
        for (int e = 0; e < EPT; e++) {
            const int idx = lane + 32 * e;
            if (idx < hd) {
                s += qv[e] * bf2f(kp[idx]);
                vv[e] = bf2f(vp[idx]);
            } else {
                vv[e] = 0.f;
            }
        }
        s = warp_sum(s);
        const float mn = fmaxf(m, s);
        const float corr = __expf(m - mn);
        const float p = __expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < EPT; e++) acc[e] = acc[e] * corr + p * vv[e];
        m = mn;
    }
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
#pragma unroll
    for (int e = 0; e < EPT; e++) {
        const int idx = lane + 32 * e;
        if (idx < hd) sacc[w * hd + idx] = acc[e];
    }
    __syncthreads();
    float M = -FLASH_INF;
    for (int ww = 0; ww < nw; ww++) M = fmaxf(M, sm[ww]);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float tl = 0.f, o = 0.f;
        if (M != -FLASH_INF) {
            for (int ww = 0; ww < nw; ww++) {
                const float f = __expf(sm[ww] - M);
                tl += sl[ww] * f;
                o += sacc[ww * hd + i] * f;
            }
        }
        if (nsplit == 1) {
            out[((size_t)t * nq + h) * hd + i] = f2bf(tl > 0.f ? o / tl : 0.f);
        } else {
            float* pp = part + (((size_t)t * nq + h) * nsplit + z) * (size_t)(hd + 2);
            pp[2 + i] = o;
            if (i == 0) {
                pp[0] = M;
                pp[1] = tl;
            }
        }
    }
}

// Merges the nsplit partials of attention. Grid (t, nq).
extern "C" __global__ void attention_combine(const float* __restrict__ part,
                                             bf16* __restrict__ out, int nq, int hd,
                                             int nsplit) {
    const int t = blockIdx.x, h = blockIdx.y;
    const float* base = part + ((size_t)t * nq + h) * nsplit * (size_t)(hd + 2);
    float M = -FLASH_INF;
    for (int z = 0; z < nsplit; z++) M = fmaxf(M, base[(size_t)z * (hd + 2)]);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float tl = 0.f, o = 0.f;
        if (M != -FLASH_INF) {
            for (int z = 0; z < nsplit; z++) {
                const float* pp = base + (size_t)z * (hd + 2);
                const float f = __expf(pp[0] - M);
                tl += pp[1] * f;
                o += pp[2 + i] * f;
            }
        }
        out[((size_t)t * nq + h) * hd + i] = f2bf(tl > 0.f ? o / tl : 0.f);
    }
}

// out = silu(gate) * up (bf16); out may alias gate.
extern "C" __global__ void swiglu(const bf16* gate, const bf16* __restrict__ up, bf16* out,
                                  long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = bf2f(gate[i]);
        const float a = round_bf(g / (1.f + __expf(-g)));
        out[i] = f2bf(a * bf2f(up[i]));
    }
}

// x (f32) += d (bf16); with `round`, the sum is rounded to bf16 (a bf16
// residual stream, as transformers keeps it).
extern "C" __global__ void residual_add(float* __restrict__ x, const bf16* __restrict__ d,
                                        long long n, int round) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i] + bf2f(d[i]);
        x[i] = round ? round_bf(v) : v;
    }
}

// out (f32) = in (bf16).
extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ in, float* __restrict__ out,
                                       long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = bf2f(in[i]);
}

// out[r] = the first index of the largest value of row r (NaN counts as
// -inf; a row of only -inf/NaN gives 0). One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ x, int* __restrict__ out, int n) {
    __shared__ float sb[32];
    __shared__ int si[32];
    const float* row = x + (size_t)blockIdx.x * n;
    float best = -FLASH_INF;
    int bi = -1;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        if (v != v) v = -FLASH_INF;
        if (bi < 0 || v > best) {
            best = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ob > best || (ob == best && oi < bi))) {
            best = ob;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sb[w] = best;
        si[w] = bi;
    }
    __syncthreads();
    if (w == 0) {
        best = lane < nw ? sb[lane] : -FLASH_INF;
        bi = lane < nw ? si[lane] : -1;
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ob > best || (ob == best && oi < bi))) {
                best = ob;
                bi = oi;
            }
        }
        if (lane == 0) out[blockIdx.x] = bi < 0 ? 0 : bi;
    }
}

// ---------------------------------------------------------------------------
// Matrix products for a few tokens: decode (one token) and short prefills (up
// to GEMV_TOKENS tokens a launch). cuBLAS reaches 50-80 % of the memory
// bandwidth on the one-token shapes, and a step made of separate q/k/v,
// gate/up/swiglu and residual kernels launches twice as many; these read each
// weight row once with 16-byte streaming loads (one warp per row, four loads
// in flight per lane), multiply it with every token's input, and fuse what
// follows the product. A short prompt thus never needs cuBLAS, whose
// libraries a cold start would otherwise read from disk.
// Requirements (checked by the host): k % 8 == 0, 16-byte aligned rows and x.
// ---------------------------------------------------------------------------

// Tokens one launch multiplies (Ops::gemv splits more into launches).
#define GEMV_TOKENS 8

// How a product's f32 sum is written (GemvOut in ops.rs).
#define GEMV_BF16 0      // out (bf16) = sum
#define GEMV_F32 1       // out (f32) = sum
#define GEMV_ADD_F32 2   // out (f32) += sum
#define GEMV_ADD_ROUND 3 // out (f32) = bf16(out + bf16(sum)): a bf16 residual stream
#define GEMV_F32_OF_BF16 4 // out (f32) = bf16(sum), as f32 (bf16 logits)

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    // bf16 -> f32 is a 16-bit shift: the low half moves up, the high half is
    // masked in place.
    float s = __uint_as_float(w.x << 16) * __uint_as_float(x.x << 16);
    s += __uint_as_float(w.x & 0xffff0000u) * __uint_as_float(x.x & 0xffff0000u);
    s += __uint_as_float(w.y << 16) * __uint_as_float(x.y << 16);
    s += __uint_as_float(w.y & 0xffff0000u) * __uint_as_float(x.y & 0xffff0000u);
    s += __uint_as_float(w.z << 16) * __uint_as_float(x.z << 16);
    s += __uint_as_float(w.z & 0xffff0000u) * __uint_as_float(x.z & 0xffff0000u);
    s += __uint_as_float(w.w << 16) * __uint_as_float(x.w << 16);
    s += __uint_as_float(w.w & 0xffff0000u) * __uint_as_float(x.w & 0xffff0000u);
    return s;
}

// Weights are read once per step: stream them past the caches.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) { return __ldcs(p); }

// acc[t] = the dot product of one weight row with token t's input (x is
// [n, nv] vectors of 8 bf16), summed over the warp (every lane gets them),
// for t < n <= GEMV_TOKENS. The token loops unroll; `t < n` is uniform over
// the warp.
__device__ __forceinline__ void rows_dot(const uint4* __restrict__ w, const uint4* __restrict__ x,
                                         int nv, int n, int lane, float* acc) {
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) acc[t] = 0.f;
    int i = lane;
    for (; i + 96 < nv; i += 128) {
        const uint4 a = ld_stream(w + i), b = ld_stream(w + i + 32);
        const uint4 c = ld_stream(w + i + 64), d = ld_stream(w + i + 96);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            if (t < n) {
                const uint4* xt = x + (size_t)t * nv;
                acc[t] += dot8(a, __ldg(xt + i)) + dot8(b, __ldg(xt + i + 32)) +
                          dot8(c, __ldg(xt + i + 64)) + dot8(d, __ldg(xt + i + 96));
            }
        }
    }
    for (; i < nv; i += 32) {
        const uint4 a = ld_stream(w + i);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            if (t < n) acc[t] += dot8(a, __ldg(x + (size_t)t * nv + i));
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) {
        if (t < n) acc[t] = warp_sum(acc[t]);
    }
}

__device__ __forceinline__ void gemv_store(void* out, size_t at, float s, int mode) {
    if (mode == GEMV_BF16) {
        ((bf16*)out)[at] = f2bf(s);
    } else if (mode == GEMV_F32) {
        ((float*)out)[at] = s;
    } else if (mode == GEMV_ADD_F32) {
        ((float*)out)[at] += s;
    } else if (mode == GEMV_ADD_ROUND) {
        float* o = (float*)out;
        o[at] = round_bf(o[at] + round_bf(s));
    } else {
        ((float*)out)[at] = round_bf(s);
    }
}

// out_s[t, r] = W_s[r, :] . x[t, :] for n tokens and the rows of up to three
// matrices stacked (rows r0, then r1, then r2; a count of 0 skips one), one
// warp per row: the q, k and v projections of a layer in one launch. Lane t
// writes token t's result.
extern "C" __global__ void gemv_bf16(const bf16* __restrict__ x, int k, int n, const bf16* w0,
                                     const bf16* w1, const bf16* w2, void* o0, void* o1, void* o2,
                                     int r0, int r1, int r2, int m0, int m1, int m2) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const bf16* w;
    void* o;
    int mode, rows;
    if (row < r0) {
        w = w0, o = o0, mode = m0, rows = r0;
    } else if ((row -= r0) < r1) {
        w = w1, o = o1, mode = m1, rows = r1;
    } else if ((row -= r1) < r2) {
        w = w2, o = o2, mode = m2, rows = r2;
    } else {
        return; // the whole warp: rows are per warp
    }
    const int nv = k >> 3;
    float acc[GEMV_TOKENS];
    rows_dot((const uint4*)(w + (size_t)row * k), (const uint4*)x, nv, n, lane, acc);
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) {
        if (t < n && lane == t) gemv_store(o, (size_t)t * rows + row, acc[t], mode);
    }
}

// out[t, r] = swiglu(Wg[r, :] . x[t, :], Wu[r, :] . x[t, :]) in bf16 for n
// tokens, with the rounding of the unfused path (gate and up rounded to
// bf16, silu rounded, product rounded): the MLP's gate and up projections
// and its activation in one launch, one warp per row of both.
extern "C" __global__ void gemv_swiglu(const bf16* __restrict__ x, int k, int n, const bf16* wg,
                                       const bf16* wu, bf16* __restrict__ out, int rows) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int nv = k >> 3;
    float ag[GEMV_TOKENS], au[GEMV_TOKENS];
    rows_dot((const uint4*)(wg + (size_t)row * k), (const uint4*)x, nv, n, lane, ag);
    rows_dot((const uint4*)(wu + (size_t)row * k), (const uint4*)x, nv, n, lane, au);
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) {
        if (t < n && lane == t) {
            const float gv = round_bf(ag[t]);
            const float a = round_bf(gv / (1.f + __expf(-gv)));
            out[(size_t)t * rows + row] = f2bf(a * round_bf(au[t]));
        }
    }
}
