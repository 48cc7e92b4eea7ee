// flash-codec GPU decoder: decodes stored chunks (crates/flash-codec/README.md)
// into their decoded bytes, bit for bit as the CPU decoder does.
//
// Compiled at run time with NVRTC (no headers). Launch contract:
//   grid  = ceil(n_chunks / FC_WARPS_PER_BLOCK) blocks (any grid works: warps
//           loop over chunks with a grid stride), block = FC_THREADS_PER_BLOCK
//           threads, no dynamic shared memory (the tables are static:
//           FC_WARPS_PER_BLOCK * 2^FC_PROB_BITS * 4 bytes per block);
//   chunks: device array of n_chunks GpuChunk (24 bytes each, 8-aligned);
//   status: device u32[2], set by the host to {0, 0xffffffff} before launch;
//           afterwards status[0] = number of bad chunks, status[1] = the
//           smallest bad chunk index (0xffffffff when none).
// The host validates every Rans chunk (flash_codec::ChunkInfo::parse) before
// the launch; the kernel still checks the table and never reads past the
// coded stream, so a bad chunk is reported, not decoded out of bounds.
// src addresses are 16-byte aligned; dst addresses at least element aligned.
//
// One warp decodes one chunk. Per Rans chunk the warp builds its own table
// of 2^FC_PROB_BITS u32 entries in shared memory (entry for slot:
// sym | (freq - 1) << 8 | (slot - cum) << 20), then runs ceil(elems / 32)
// steps; in step t lane j decodes element 32t + j:
//   slot = x & (2^PB - 1); entry = table[slot];
//   x = freq * (x >> PB) + bias;
//   lanes with x < 2^16 take consecutive words of the stream in lane order
//   (ballot + popc) and shift them in: x = x << 16 | word;
//   the element = symbol recombined with the lane's raw bits.
// At the end every lane's state must be 2^16 and exactly `words` words taken.
//
// Expected cost of one step (32 elements) per warp: ~30 instructions
// (1 shared load, 1 or 3 byte loads of the raw plane, at most 1 u16 load of
// the stream, ballot, 2 popc, 1 store of 64 or 128 coalesced bytes). The
// dependency chain x -> table (shared, ~30 cycles) -> imad -> ballot ->
// stream load (L1 hit ~35 cycles; one 128-byte line holds ~12 steps of
// bf16 words) -> x is ~100 cycles; the raw-plane load does not depend on
// x and is issued first. With 24 warps per SM (shared memory bound:
// 6 blocks of 32 KiB + 1 KiB) the SM issues ~24 * 32 elements per ~150
// cycles, an order of magnitude above the 0.4 elements per SM cycle that
// 200 GB/s of bf16 output needs on an H200 (132 SMs at ~1.98 GHz).
// Measured there (tests/gpu_check.py, ~1 GB decoded per launch): 43
// registers, no spills; bf16 445 GB/s, f16 400 GB/s, f32 410 GB/s of output.

#define FC_PROB_BITS 11
#define FC_PROB_SCALE (1u << FC_PROB_BITS)
#define FC_L 65536u
#define FC_LANES 32
#define FC_WARPS_PER_BLOCK 4
#define FC_THREADS_PER_BLOCK (FC_WARPS_PER_BLOCK * FC_LANES)
#define FC_TABLE_OFFSET 136
#define FC_LAYOUT_BF16 0
#define FC_LAYOUT_F16 1
#define FC_LAYOUT_F32 2
#define FC_CODEC_RAW 0
#define FC_CODEC_RANS 1
#define FC_FULL_MASK 0xffffffffu

// One chunk to decode (24 bytes, 8-aligned; written by
// flash_codec::GpuChunk::write_to).
struct GpuChunk {
    unsigned long long src;  // device address of the stored chunk (16-aligned)
    unsigned long long dst;  // device address of its decoded bytes
    unsigned int elems;      // elements in the chunk
    unsigned int kind;       // layout | codec << 8 (layout: 0 bf16, 1 f16, 2 f32; codec: 0 raw, 1 rans)
};

struct __align__(16) FcVec16 {
    unsigned int a, b, c, d;
};

static __device__ __forceinline__ unsigned long long fc_pad(unsigned long long n, unsigned long long to)
{
    return (n + to - 1) / to * to;
}

// Raw chunk: the warp copies n bytes, 16 bytes per lane when both addresses
// are 16-aligned, else 4, 2 or 1.
static __device__ void fc_copy_raw(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                   unsigned long long n, unsigned int lane)
{
    const unsigned long long align = (unsigned long long)src | (unsigned long long)dst;
    unsigned long long done = 0;
    if ((align & 15) == 0) {
        const FcVec16* s = (const FcVec16*)src;
        FcVec16* d = (FcVec16*)dst;
        const unsigned long long m = n >> 4;
        for (unsigned long long i = lane; i < m; i += FC_LANES) d[i] = s[i];
        done = m << 4;
    } else if ((align & 3) == 0) {
        const unsigned int* s = (const unsigned int*)src;
        unsigned int* d = (unsigned int*)dst;
        const unsigned long long m = n >> 2;
        for (unsigned long long i = lane; i < m; i += FC_LANES) d[i] = s[i];
        done = m << 2;
    } else if ((align & 1) == 0) {
        const unsigned short* s = (const unsigned short*)src;
        unsigned short* d = (unsigned short*)dst;
        const unsigned long long m = n >> 1;
        for (unsigned long long i = lane; i < m; i += FC_LANES) d[i] = s[i];
        done = m << 1;
    }
    for (unsigned long long i = done + lane; i < n; i += FC_LANES) dst[i] = src[i];
}

// Builds the warp's decoding table from the chunk's frequency table.
// Returns false (warp-uniform) when the table is invalid: k outside 1..256,
// a zero frequency, symbols not strictly increasing, or a sum other than
// 2^PB. With a valid table every write below is inside lut[0, 2^PB).
static __device__ bool fc_build_lut(unsigned int* lut, const unsigned char* __restrict__ src, unsigned int lane)
{
    const unsigned int k = *(const unsigned short*)(src + 4);
    if (k < 1 || k > 256) return false;
    const unsigned short* freq = (const unsigned short*)(src + FC_TABLE_OFFSET);
    const unsigned char* sym = src + FC_TABLE_OFFSET + 2 * k;

    unsigned int sum = 0;
    bool ok = true;
    for (unsigned int i = lane; i < k; i += FC_LANES) {
        const unsigned int f = freq[i];
        sum += f;
        ok = ok && f != 0 && (i == 0 || sym[i] > sym[i - 1]);
    }
    for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(FC_FULL_MASK, sum, d);
    if (!__all_sync(FC_FULL_MASK, ok) || sum != FC_PROB_SCALE) return false;

    unsigned int carry = 0;
    for (unsigned int base = 0; base < k; base += FC_LANES) {
        const unsigned int i = base + lane;
        const unsigned int f = i < k ? (unsigned int)freq[i] : 0u;
        const unsigned int s = i < k ? (unsigned int)sym[i] : 0u;
        unsigned int incl = f;  // inclusive prefix sum over the 32 entries
        for (unsigned int d = 1; d < FC_LANES; d <<= 1) {
            const unsigned int y = __shfl_up_sync(FC_FULL_MASK, incl, d);
            if (lane >= d) incl += y;
        }
        const unsigned int cum = carry + incl - f;
        carry += __shfl_sync(FC_FULL_MASK, incl, FC_LANES - 1);
        const unsigned int n = k - base < FC_LANES ? k - base : FC_LANES;
        for (unsigned int j = 0; j < n; ++j) {
            const unsigned int fj = __shfl_sync(FC_FULL_MASK, f, j);
            const unsigned int cj = __shfl_sync(FC_FULL_MASK, cum, j);
            const unsigned int packed = __shfl_sync(FC_FULL_MASK, s, j) | ((fj - 1u) << 8);
            for (unsigned int b = lane; b < fj; b += FC_LANES) lut[cj + b] = packed | (b << 20);
        }
    }
    __syncwarp();
    return true;
}

// Decodes a Rans chunk whose table is in lut. Returns true (warp-uniform)
// when the stream ended exactly where the header says with every lane in
// state L. On a stream overrun the warp stops (elements of earlier steps
// are written, later ones not).
template <int LAYOUT>
static __device__ bool fc_decode_rans(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                      unsigned int elems, const unsigned int* lut, unsigned int lane)
{
    const unsigned int words = *(const unsigned int*)src;
    const unsigned int k = *(const unsigned short*)(src + 4);
    const unsigned long long stream_off = FC_TABLE_OFFSET + fc_pad(3ull * k, 4);
    const unsigned short* __restrict__ stream = (const unsigned short*)(src + stream_off);
    const unsigned char* __restrict__ raw = src + stream_off + fc_pad(2ull * words, 16);
    unsigned int x = ((const unsigned int*)(src + 8))[lane];
    const unsigned int lanes_below = (1u << lane) - 1u;
    const unsigned int steps = (elems >> 5) + ((elems & 31u) != 0);
    unsigned int pos = 0;  // words taken so far; pos <= words throughout

    for (unsigned int t = 0; t < steps; ++t) {
        const unsigned int e = (t << 5) + lane;
        const bool active = e < elems;
        unsigned int r = 0;
        if (active) {
            if (LAYOUT == FC_LAYOUT_F32) {
                const unsigned char* p = raw + 3ull * e;
                r = (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16);
            } else {
                r = raw[e];
            }
        }
        const unsigned int entry = lut[x & (FC_PROB_SCALE - 1u)];
        const unsigned int nx = (((entry >> 8) & 0xfffu) + 1u) * (x >> FC_PROB_BITS) + (entry >> 20);
        if (active) x = nx;
        const bool need = active && x < FC_L;
        const unsigned int mask = __ballot_sync(FC_FULL_MASK, need);
        const unsigned int taken = __popc(mask);
        if (taken > words - pos) return false;  // the stream ends early
        if (need) x = (x << 16) | (unsigned int)stream[pos + __popc(mask & lanes_below)];
        pos += taken;
        if (active) {
            const unsigned int s = entry & 0xffu;
            if (LAYOUT == FC_LAYOUT_BF16) {
                ((unsigned short*)dst)[e] = (unsigned short)(((r & 0x80u) << 8) | (s << 7) | (r & 0x7fu));
            } else if (LAYOUT == FC_LAYOUT_F16) {
                ((unsigned short*)dst)[e] = (unsigned short)((s << 8) | r);
            } else {
                ((unsigned int*)dst)[e] = ((r & 0x800000u) << 8) | (s << 23) | (r & 0x7fffffu);
            }
        }
    }
    return __all_sync(FC_FULL_MASK, x == FC_L) && pos == words;
}

extern "C" __global__ void __launch_bounds__(FC_THREADS_PER_BLOCK)
flash_codec_decode(const GpuChunk* __restrict__ chunks, unsigned int n_chunks, unsigned int* __restrict__ status)
{
    __shared__ unsigned int fc_lut[FC_WARPS_PER_BLOCK][FC_PROB_SCALE];
    const unsigned int lane = threadIdx.x & (FC_LANES - 1);
    const unsigned int warp = threadIdx.x / FC_LANES;
    unsigned int* lut = fc_lut[warp];
    const unsigned long long stride = (unsigned long long)gridDim.x * FC_WARPS_PER_BLOCK;

    for (unsigned long long c = (unsigned long long)blockIdx.x * FC_WARPS_PER_BLOCK + warp; c < n_chunks; c += stride) {
        const GpuChunk ch = chunks[c];
        const unsigned char* src = (const unsigned char*)ch.src;
        unsigned char* dst = (unsigned char*)ch.dst;
        const unsigned int layout = ch.kind & 0xffu;
        const unsigned int codec = (ch.kind >> 8) & 0xffu;
        bool ok = layout <= FC_LAYOUT_F32 && codec <= FC_CODEC_RANS && (ch.kind >> 16) == 0;
        if (ok && codec == FC_CODEC_RAW) {
            const unsigned long long elem_bytes = layout == FC_LAYOUT_F32 ? 4 : 2;
            fc_copy_raw(src, dst, (unsigned long long)ch.elems * elem_bytes, lane);
        } else if (ok) {
            ok = fc_build_lut(lut, src, lane);
            if (ok) {
                if (layout == FC_LAYOUT_BF16) {
                    ok = fc_decode_rans<FC_LAYOUT_BF16>(src, dst, ch.elems, lut, lane);
                } else if (layout == FC_LAYOUT_F16) {
                    ok = fc_decode_rans<FC_LAYOUT_F16>(src, dst, ch.elems, lut, lane);
                } else {
                    ok = fc_decode_rans<FC_LAYOUT_F32>(src, dst, ch.elems, lut, lane);
                }
            }
            __syncwarp();  // every lane is done with this table before the next chunk's
        }
        if (!ok && lane == 0) {
            atomicAdd(status, 1u);
            atomicMin(status + 1, (unsigned int)c);
        }
    }
}
