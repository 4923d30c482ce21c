// W4A16 groupwise GEMM for few rows (decode): y[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias), M <= 64.
//
// Tensor cores with the operands swapped: the weight is the 16-row A operand of
// mma.m16n8k16 (16 output features), the activations the 8-column B operand (8 rows of x), so a
// batch of 1 wastes MMA columns, not weight bandwidth. The weight comes in the layout that
// trtc/plugins/gemm/w4a16_packed.py writes at load time, so that one 16-byte load per lane
// holds exactly the A fragments of four MMAs (k = 64) and no shuffle is needed:
//
//   w      uint32 [N/16, K/64, 32 lanes, 4 k-tiles]: lane (g = lane/4, t = lane%4) of k-tile j holds
//          the 8 nibbles of rows g, g+8 and columns 64c + 16t + 4j + (0..3), ordered so that
//          (word >> 4p) & 0x000f000f is A register p in the 16-bit pair layout the MMA reads
//   scales [N/16, K/G, 8] pairs (scale of row g, of row g+8) in the model dtype
//   zeros  same shape: -(MAGIC + zero point) pairs, or null (symmetric: zero point 8)
//
// Columns inside a 64-wide chunk are taken in the order the lanes hold them (16t + 4j + e), for
// the weight and the activations alike: the dot product is the same, and x needs two 16-byte
// loads per row and chunk. Dequantization: OR-ing a nibble into the mantissa of MAGIC (128 in
// bf16, 1024 in fp16) gives MAGIC + u, minus (MAGIC + zero) is u - zero exactly. Groups are 2^GS
// chunks of 64 columns (GS >= 31: one group).
//
// A block is WARPS warps: R n-groups, each shared by KW = WARPS / R warps that take every KW-th
// chunk of K and add up their partial sums in shared memory at the end, in a fixed order
// (deterministic). NB n8-tiles of B cover M <= 8 NB rows of x. Two kernels:
//
//   w4a16_gemv (M <= 16): an n-group is one n-tile. Each warp streams its chunks through a ring of
//     RING_CHUNKS shared-memory slots filled by cp.async, a slot holding everything one chunk
//     needs: the weights, the group's scale and zero-point pairs, x's rows and pre_quant_scale
//     (so no load in the loop waits on memory). Decode is bound by the instructions per chunk as
//     much as by bandwidth, so the loop is rolled and lean, and the MMAs take u - zero, each
//     chunk's fp32 sums then multiplied by its group's scale.
//   w4a16_gemm (16 < M <= 64): an n-group is two n-tiles (TW), which share each x fragment; the
//     weight pair is scaled before its MMAs (rounded once to the model dtype, as the reference
//     does); the weights come through the ring, x from global memory.

#define DEVICE __device__ __forceinline__

struct __align__(16) U4 {
  unsigned v[4];
};

DEVICE U4 load_cached(const void* p) {  // activations: the block's other n-groups read them too
  U4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "l"(p));
  return r;
}

// Shared memory is addressed by 32-bit offsets in the shared window.
DEVICE unsigned shared_address(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

DEVICE void cp_async16(unsigned smem, const void* global) {  // the weight: read once, past L1
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(global) : "memory");
}

DEVICE void cp_async16_cached(unsigned smem, const void* global) {  // x: other warps read it too
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(global) : "memory");
}

DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int PENDING>
DEVICE void cp_async_wait() {  // all but the PENDING most recent groups of this thread have landed
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

DEVICE unsigned load_shared_u32(unsigned p) {
  unsigned r;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(p) : "memory");
  return r;
}

DEVICE U4 load_shared(unsigned p) {
  U4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "r"(p) : "memory");
  return r;
}

DEVICE unsigned lop3_and_or(unsigned a, unsigned mask, unsigned magic) {  // (a & mask) | magic
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

DEVICE unsigned prmt(unsigned a, unsigned selector) {
  unsigned r;
  asm("prmt.b32 %0, %1, %1, %2;" : "=r"(r) : "r"(a), "r"(selector));
  return r;
}

// c[0..3] += A (a[0..3]) x B (b0, b1), fp32 accumulators, operands of type T ("bf16" or "f16").
#define MMA_M16N8K16(T)                                                                                   \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
               "{%0,%1,%2,%3};"                                                                           \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <bool BF16>
struct Half2;

template <>
struct Half2<true> {
  static constexpr unsigned MAGIC = 0x43004300u;  // bf16 128.0 twice
  static constexpr unsigned ONE = 0x3f803f80u;
  static constexpr unsigned SYM_ZERO = 0xc308c308u;  // -(128 + 8)
  static DEVICE unsigned fma(unsigned a, unsigned b, unsigned c) {
    unsigned r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
  }
  static DEVICE float to_float(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }
  static DEVICE unsigned short from_float(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
  static DEVICE void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) { MMA_M16N8K16("bf16"); }
};

template <>
struct Half2<false> {
  static constexpr unsigned MAGIC = 0x64006400u;  // fp16 1024.0 twice
  static constexpr unsigned ONE = 0x3c003c00u;
  static constexpr unsigned SYM_ZERO = 0xe408e408u;  // -(1024 + 8)
  static DEVICE unsigned fma(unsigned a, unsigned b, unsigned c) {
    unsigned r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
  }
  static DEVICE float to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static DEVICE unsigned short from_float(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
  static DEVICE void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) { MMA_M16N8K16("f16"); }
};

// x's 8 columns at xc (row g) and the 8 rows below each, for b < rows (zero past them), times
// pre_quant_scale (at pc) if PQS, rounded to the model dtype as the reference does. Eight rows of x
// are K 16-byte units.
template <bool BF16, int NB, bool PQS>
DEVICE void load_x(unsigned (&xw)[NB][4], const U4* xc, const U4* pc, unsigned K, int rows) {
  using H = Half2<BF16>;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const U4 v = b < rows ? load_cached(xc + b * K) : U4{};
#pragma unroll
    for (int e = 0; e < 4; ++e) xw[b][e] = v.v[e];
  }
  if (PQS) {
    const U4 p = load_cached(pc);
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) xw[b][e] = H::fma(xw[b][e], p.v[e], 0x80008000u);
  }
}

// c[k] += dequant(k-tiles 2h, 2h+1 of wq[k]) x xw for the TW n-tiles k; sz: scale and zero-point pairs.
template <bool BF16, int NB, int TW, bool SCALED>
DEVICE void half_chunk_mma(float (&c)[TW][NB][4], const U4 (&wq)[TW], int h, const unsigned (&sc)[TW],
                           const unsigned (&zr)[TW], const unsigned (&xw)[NB][4]) {
  using H = Half2<BF16>;
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
#pragma unroll
    for (int k = 0; k < TW; ++k) {
      const unsigned word = wq[k].v[2 * h + jj];
      unsigned a[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const unsigned v = lop3_and_or(word >> (4 * p), 0x000f000fu, H::MAGIC);  // MAGIC + u, two of them
        const bool upper = p & 1;  // A registers 1 and 3 are row g + 8
        a[p] = H::fma(v, H::ONE, prmt(zr[k], upper ? 0x3232 : 0x1010));  // u - zero, exact
        if (SCALED) a[p] = H::fma(a[p], prmt(sc[k], upper ? 0x3232 : 0x1010), 0x80008000u);
      }
#pragma unroll
      for (int b = 0; b < NB; ++b) H::mma(c[k][b], a, xw[b][2 * jj], xw[b][2 * jj + 1]);
    }
  }
}

#ifndef W4A16_WARPS  // benchmarks may compile other shapes of the block
#define W4A16_WARPS 8
#define W4A16_RING_CHUNKS 8
#endif
constexpr int WARPS = W4A16_WARPS;
constexpr int RING_CHUNKS = W4A16_RING_CHUNKS;  // per warp: 8 x 512 bytes of weights in flight
static_assert((RING_CHUNKS & (RING_CHUNKS - 1)) == 0, "the ring's slots are a power of two");

// The KW warps of each of the R n-groups add up their sums acc [TW][NB][4] pairwise in shared
// memory (half of them write, the others add), then warp kw = 0 writes y: acc[i][b] holds rows
// (output features) g and g+8 of n-tile nt0 + i, columns (rows of x) 8b + 2t, +1.
template <bool BF16, int TW, int NB, int R>
DEVICE void reduce_store(float (&acc)[TW][NB][4], unsigned* smem, int kw, int r, int lane, int nt0, int ntiles,
                         const unsigned short* __restrict__ bias, unsigned short* __restrict__ y, int M, int N) {
  using H = Half2<BF16>;
  constexpr int KW = WARPS / R, SLICE = TW * NB * 4;
  float* partial = reinterpret_cast<float*>(smem);  // [KW / 2][R][SLICE][32]
#pragma unroll
  for (int half = KW / 2; half >= 1; half /= 2) {
    __syncthreads();
    if (kw >= half && kw < 2 * half) {
      float* dst = partial + ((kw - half) * R + r) * SLICE * 32 + lane;
#pragma unroll
      for (int i = 0; i < TW; ++i)
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[((i * NB + b) * 4 + e) * 32] = acc[i][b][e];
    }
    __syncthreads();
    if (kw < half) {
      const float* src = partial + (kw * R + r) * SLICE * 32 + lane;
#pragma unroll
      for (int i = 0; i < TW; ++i)
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][b][e] += src[((i * NB + b) * 4 + e) * 32];
    }
  }
  if (kw != 0) return;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < TW; ++i) {
    if (nt0 + i >= ntiles) continue;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * b + 2 * t + (e & 1), n = (nt0 + i) * 16 + g + 8 * (e >> 1);
        if (m < M) {
          float v = acc[i][b][e];
          if (bias) v += H::to_float(bias[n]);
          y[(size_t)m * N + n] = H::from_float(v);
        }
      }
  }
}

// w4a16_gemv's steps are two adjacent chunks (128 columns). A ring slot, in bytes: the weights of
// the n-tile (2 x 512) | the chunks' scale pairs (2 x 32) | zero-point pairs (2 x 32) | XR rows
// of x (X_ROW bytes each: 256 and 16 of padding, no bank conflicts) | pre_quant_scale (256). The
// launcher sizes the dynamic shared memory after it (w4a16_packed.shared_bytes).
constexpr int X_ROW = 272;
constexpr int SLOT_SCALE = 1024, SLOT_ZERO = 1088, SLOT_X = 1152;
constexpr int RING_STEPS = RING_CHUNKS / 2;

template <bool BF16, int XR, int R, bool PQS>  // XR: a power of two >= M, x's rows in a slot
__global__ void __launch_bounds__(WARPS * 32) w4a16_gemv(
    const unsigned short* __restrict__ x,    // [M, K]
    const unsigned* __restrict__ w,          // [N/16, K/64, 32, 4]
    const unsigned* __restrict__ scales,     // [N/16, K/G, 8]
    const unsigned* __restrict__ zeros,      // [N/16, K/G, 8] or null
    const unsigned short* __restrict__ pre_quant_scale,  // [K] if PQS
    const unsigned short* __restrict__ bias,  // [N] or null
    unsigned short* __restrict__ y,          // [M, N]
    int M, int N, int K,
    int group_shift) {  // GS: log2(group size / 64), or 31 for one group over K (chunk >> 31 = 0)
  using H = Half2<BF16>;
  constexpr int KW = WARPS / R, NB = (XR + 7) / 8;
  constexpr int X_UNITS = XR * 16 + (PQS ? 16 : 0), XJ = (X_UNITS + 31) / 32;  // 16-byte copies of x and pre_quant_scale
  constexpr unsigned SLOT_BYTES = SLOT_X + XR * X_ROW + (PQS ? 256 : 0);
  extern __shared__ __align__(16) unsigned smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int r = warp % R, kw = warp / R;
  const int ntiles = N / 16, nt = blockIdx.x * R + r, nt_read = min(nt, ntiles - 1);
  const int chunks = K / 64, groups = ((chunks - 1) >> group_shift) + 1;
  const int rows = max(0, min(NB, (M - g + 7) / 8));  // n8-tiles b with row 8b + g < M
  const unsigned ring = shared_address(smem) + warp * RING_STEPS * SLOT_BYTES;
  const int n_steps = nt < ntiles && kw < chunks / 2 ? (chunks / 2 - kw + KW - 1) / KW : 0;  // steps kw, kw + KW, ...

  // Step p's copies, 16 bytes each: the weights (2 per lane), x's rows and pre_quant_scale (unit
  // u = lane + 32 j: XR * 16 of x (rows < M), 16 of pre_quant_scale; 256 bytes further a step), the scale
  // pairs of its chunks (lanes 0-3) and zero-point pairs (lanes 4-7; 32 bytes further a group).
  const char* const w_src = reinterpret_cast<const char*>(w + ((size_t)nt_read * chunks + 2 * kw) * 128 + lane * 4);
  const char* x_src[XJ];
  bool x_on[XJ];
#pragma unroll
  for (int j = 0; j < XJ; ++j) {
    const int u = lane + 32 * j, v = u - XR * 16;
    x_src[j] = u < XR * 16 ? reinterpret_cast<const char*>(x + (size_t)(u / 16) * K + (u % 16) * 8)
                           : reinterpret_cast<const char*>(pre_quant_scale + v * 8);
    x_on[j] = u < XR * 16 ? u / 16 < M : u < X_UNITS;
  }
  const bool sz_on = lane < 4 || (lane < 8 && zeros != nullptr);
  const int sz_chunk = (lane / 2) % 2;  // which chunk of the step
  const char* const sz_src = reinterpret_cast<const char*>((lane < 4 ? scales : zeros) + (size_t)nt_read * groups * 8 + (lane % 2) * 4);
  const unsigned sz_dst = ring + SLOT_SCALE + (lane / 4) * 64 + sz_chunk * 32 + (lane % 2) * 16;
  auto issue = [&](int i) {  // the warp's step i into slot i % RING_STEPS
    if (i < n_steps) {
      const unsigned p = kw + i * KW, slot = (i & (RING_STEPS - 1)) * SLOT_BYTES;
      const char* const wi = w_src + (i * KW) * 1024u;
      cp_async16(ring + slot + lane * 16, wi);
      cp_async16(ring + slot + 512 + lane * 16, wi + 512);
#pragma unroll
      for (int j = 0; j < XJ; ++j)
        if (x_on[j]) cp_async16_cached(ring + slot + SLOT_X + (lane + 32 * j) / 16 * X_ROW + (lane % 16) * 16, x_src[j] + p * 256u);
      if (sz_on) cp_async16_cached(sz_dst + slot, sz_src + ((2 * p + sz_chunk) >> group_shift) * 32u);
    }
    cp_async_commit();  // an empty group past the end: one group per step all along
  };
#pragma unroll
  for (int i = 0; i < RING_STEPS - 1; ++i) issue(i);

  float acc[1][NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][b][e] = 0.f;
  const unsigned x_at = ring + SLOT_X + g * X_ROW + t * 32;  // + slot, + 8 rows b, + 128 chunk, + 16 h
  const unsigned pqs_at = ring + SLOT_X + XR * X_ROW + t * 32;

  for (int i = 0; i < n_steps; ++i) {
    cp_async_wait<RING_STEPS - 2>();  // step i has landed
    __syncwarp();                     // for every lane: its copies were read by other lanes, and slot i - 1 was read
    issue(i + RING_STEPS - 1);        // into slot (i - 1) % RING_STEPS
    const unsigned slot = (i & (RING_STEPS - 1)) * SLOT_BYTES;
#pragma unroll
    for (int q = 0; q < 2; ++q) {  // the step's two chunks: independent MMA chains
      const U4 wk[1] = {load_shared(ring + slot + q * 512 + lane * 16)};
      const unsigned sk[1] = {load_shared_u32(ring + slot + SLOT_SCALE + q * 32 + g * 4)};
      const unsigned zk[1] = {zeros ? load_shared_u32(ring + slot + SLOT_ZERO + q * 32 + g * 4) : H::SYM_ZERO};
      unsigned xw[2][NB][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const U4 v = b < rows ? load_shared(x_at + slot + b * 8 * X_ROW + q * 128 + 16 * h) : U4{};
#pragma unroll
          for (int e = 0; e < 4; ++e) xw[h][b][e] = v.v[e];
        }
        if (PQS) {  // x * pre_quant_scale, rounded to the model dtype as the reference does
          const U4 ps = load_shared(pqs_at + slot + q * 128 + 16 * h);
#pragma unroll
          for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) xw[h][b][e] = H::fma(xw[h][b][e], ps.v[e], 0x80008000u);
        }
      }
      float part[1][NB][4];
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[0][b][e] = 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) half_chunk_mma<BF16, NB, 1, false>(part, wk, h, sk, zk, xw[h]);
      const float lo = H::to_float(sk[0] & 0xffffu), hi = H::to_float(sk[0] >> 16);  // rows g, g + 8
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][b][e] = fmaf(e < 2 ? lo : hi, part[0][b][e], acc[0][b][e]);
    }
  }
  cp_async_wait<0>();
  reduce_store<BF16, 1, NB, R>(acc, smem, kw, r, lane, nt, ntiles, bias, y, M, N);
}

template <bool BF16, int NB, int R, bool PQS>
__global__ void __launch_bounds__(WARPS * 32) w4a16_gemm(
    const unsigned short* __restrict__ x,    // [M, K]
    const unsigned* __restrict__ w,          // [N/16, K/64, 32, 4]
    const unsigned* __restrict__ scales,     // [N/16, K/G, 8]
    const unsigned* __restrict__ zeros,      // [N/16, K/G, 8] or null
    const unsigned short* __restrict__ pre_quant_scale,  // [K] if PQS
    const unsigned short* __restrict__ bias,  // [N] or null
    unsigned short* __restrict__ y,          // [M, N]
    int M, int N, int K,
    int group_shift) {  // GS: log2(group size / 64), or 31 for one group over K (chunk >> 31 = 0)
  using H = Half2<BF16>;
  constexpr int TW = 2;                        // n-tiles per warp
  constexpr int STAGES = RING_CHUNKS / TW;     // ring slots per warp, TW chunks each
  constexpr int KW = WARPS / R;                // warps splitting K for one n-group
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int r = warp % R, kw = warp / R;
  const int ntiles = N / 16, nt0 = (blockIdx.x * R + r) * TW;
  const int chunks = K / 64, groups = ((chunks - 1) >> group_shift) + 1;
  const int rows = max(0, min(NB, (M - g + 7) / 8));  // n8-tiles b with row 8b + g < M
  const bool has_zeros = zeros != nullptr;
  // x (row g) and pre_quant_scale at this lane's columns of the warp's next chunk, in 16-byte units
  const U4* xc = reinterpret_cast<const U4*>(x) + g * (K / 8) + 2 * t + kw * 8;
  const U4* pc = reinterpret_cast<const U4*>(pre_quant_scale) + 2 * t + kw * 8;

  extern __shared__ __align__(16) unsigned smem[];  // the rings [WARPS][STAGES][TW][512 bytes], then the K reduction
  const unsigned ring = shared_address(smem) + warp * RING_CHUNKS * 512 + lane * 16;

  const unsigned* wp[TW];
  const unsigned* sp[TW];
  const unsigned* zp[TW];
#pragma unroll
  for (int k = 0; k < TW; ++k) {
    const int nt = nt0 + k < ntiles ? nt0 + k : 0;  // past the last tile: read tile 0, store nothing
    wp[k] = w + ((size_t)nt * chunks + kw) * 128 + lane * 4;  // then + i KW 128 for the warp's chunk i
    sp[k] = scales + (size_t)nt * groups * 8 + g;
    zp[k] = zeros + (size_t)nt * groups * 8 + g;
  }

  // This warp's chunks: kw, kw + KW, ...; chunk i sits in ring slot i % STAGES, its scale and
  // zero-point pairs in registers sc[i % STAGES], zr[i % STAGES] (loaded as early as the weights).
  // The ring loop is unrolled STAGES times, so slots are static offsets.
  const int n_chunks = nt0 < ntiles && kw < chunks ? (chunks - kw + KW - 1) / KW : 0;
  unsigned sc[STAGES][TW], zr[STAGES][TW];
  auto issue = [&](int i, int slot) {
    if (i < n_chunks) {
      const unsigned q8 = (static_cast<unsigned>(kw + i * KW) >> group_shift) * 8;  // the chunk's group
#pragma unroll
      for (int k = 0; k < TW; ++k) {
        cp_async16(ring + (slot * TW + k) * 512, wp[k] + static_cast<unsigned>(i * KW * 128));
        sc[slot][k] = __ldg(sp[k] + q8);
        zr[slot][k] = has_zeros ? __ldg(zp[k] + q8) : H::SYM_ZERO;
      }
    }
    cp_async_commit();  // an empty group past the end: one group per chunk all along
  };
#pragma unroll
  for (int s = 0; s < STAGES; ++s) issue(s, s);

  float acc[TW][NB][4];
#pragma unroll
  for (int k = 0; k < TW; ++k)
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[k][b][e] = 0.f;

  for (int base = 0; base < n_chunks; base += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      const int i = base + s;
      if (i >= n_chunks) break;
      unsigned xw[2][NB][4];
      load_x<BF16, NB, PQS>(xw[0], xc, pc, K, rows);  // before waiting for the weights
      cp_async_wait<STAGES - 1>();
      U4 wq[TW];
#pragma unroll
      for (int k = 0; k < TW; ++k) wq[k] = load_shared(ring + (s * TW + k) * 512);
      half_chunk_mma<BF16, NB, TW, true>(acc, wq, 0, sc[s], zr[s], xw[0]);
      load_x<BF16, NB, PQS>(xw[1], xc + 1, pc + 1, K, rows);
      half_chunk_mma<BF16, NB, TW, true>(acc, wq, 1, sc[s], zr[s], xw[1]);
      issue(i + STAGES, s);  // the slot's words were read by this lane alone, into registers already used
      xc += KW * 8, pc += KW * 8;
    }
  }
  cp_async_wait<0>();
  reduce_store<BF16, TW, NB, R>(acc, smem, kw, r, lane, nt0, ntiles, bias, y, M, N);
}
