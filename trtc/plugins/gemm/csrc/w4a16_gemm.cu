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
// loads per row and chunk. Dequantization is exact up to the final product: OR-ing a nibble into
// the mantissa of MAGIC (128 in bf16, 1024 in fp16) gives MAGIC + u, minus (MAGIC + zero) is u - zero
// exactly, times the scale rounds once, as the PyTorch reference does.
//
// A block is 8 warps: R n-tiles of 16 rows, each shared by 8/R warps that split K and add up
// their partial sums in shared memory at the end. Each warp issues the weight loads of U chunks at
// once. NB n8-tiles of B cover M <= 8 NB rows of x.

#define DEVICE __device__ __forceinline__

struct __align__(16) U4 {
  unsigned v[4];
};

DEVICE U4 load_stream(const unsigned* p) {  // the weight: read once, kept out of L1
  U4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "l"(p));
  return r;
}

DEVICE U4 load_cached(const void* p) {  // activations: the block's other n-tiles read them too
  U4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3]) : "l"(p));
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
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
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

// x's 16 columns 64c + 16t .. +15 of rows 8b + g (zero past M), times pre_quant_scale if any.
template <bool BF16, int NB>
DEVICE void load_x(unsigned (&xw)[NB][8], const unsigned short* __restrict__ x,
                   const unsigned short* __restrict__ pre_quant_scale, int c, int M, int K, int g, int t) {
  using H = Half2<BF16>;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const int row = 8 * b + g;
    if (row < M) {
      const unsigned short* xp = x + (size_t)row * K + c * 64 + 16 * t;
      U4 lo = load_cached(xp), hi = load_cached(xp + 8);
#pragma unroll
      for (int i = 0; i < 4; ++i) xw[b][i] = lo.v[i], xw[b][4 + i] = hi.v[i];
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) xw[b][i] = 0u;
    }
  }
  if (pre_quant_scale) {  // AWQ: x * pre_quant_scale, rounded to the model dtype as the reference does
    const unsigned short* pp = pre_quant_scale + c * 64 + 16 * t;
    U4 lo = load_cached(pp), hi = load_cached(pp + 8);
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xw[b][i] = H::fma(xw[b][i], lo.v[i], 0x80008000u);
        xw[b][4 + i] = H::fma(xw[b][4 + i], hi.v[i], 0x80008000u);
      }
  }
}

constexpr int WARPS = 8;
constexpr int U = 4;

template <bool BF16, int NB, int R>
__global__ void __launch_bounds__(WARPS * 32) w4a16_gemm(
    const unsigned short* __restrict__ x,    // [M, K]
    const unsigned* __restrict__ w,          // [N/16, K/64, 32, 4]
    const unsigned* __restrict__ scales,     // [N/16, K/G, 8]
    const unsigned* __restrict__ zeros,      // [N/16, K/G, 8] or null
    const unsigned short* __restrict__ pre_quant_scale,  // [K] or null
    const unsigned short* __restrict__ bias,  // [N] or null
    unsigned short* __restrict__ y,          // [M, N]
    int M, int N, int K, int group_size) {
  using H = Half2<BF16>;
  constexpr int KW = WARPS / R;  // warps splitting K for one n-tile
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int r = warp % R, kw = warp / R;
  const int nt = blockIdx.x * R + r;
  const bool active = nt < N / 16;
  const int chunks = K / 64, groups = K / group_size, chunks_per_group = group_size / 64;

  float acc[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[b][e] = 0.f;

  if (active) {
    const unsigned* wp = w + (size_t)nt * chunks * 128 + lane * 4;
    const unsigned* sp = scales + (size_t)nt * groups * 8 + g;
    const unsigned* zp = zeros ? zeros + (size_t)nt * groups * 8 + g : nullptr;
    for (int c0 = kw; c0 < chunks; c0 += KW * U) {
      U4 wq[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c0 + u * KW < chunks) wq[u] = load_stream(wp + (size_t)(c0 + u * KW) * 128);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * KW;
        if (c >= chunks) break;
        const int q = c / chunks_per_group;
        const unsigned s = __ldg(sp + q * 8);
        const unsigned z = zp ? __ldg(zp + q * 8) : H::SYM_ZERO;
        const unsigned s_lo = prmt(s, 0x1010), s_hi = prmt(s, 0x3232);  // rows g, g+8
        const unsigned z_lo = prmt(z, 0x1010), z_hi = prmt(z, 0x3232);
        unsigned xw[NB][8];
        load_x<BF16, NB>(xw, x, pre_quant_scale, c, M, K, g, t);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned word = wq[u].v[j];
          unsigned a[4];
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const unsigned v = lop3_and_or(word >> (4 * p), 0x000f000fu, H::MAGIC);  // MAGIC + u, two of them
            const bool upper = p & 1;  // A registers 1 and 3 are row g + 8
            a[p] = H::fma(H::fma(v, H::ONE, upper ? z_hi : z_lo), upper ? s_hi : s_lo, 0x80008000u);
          }
#pragma unroll
          for (int b = 0; b < NB; ++b) H::mma(acc[b], a, xw[b][2 * j], xw[b][2 * j + 1]);
        }
      }
    }
  }

  // acc[b]: rows (output features) g and g+8 of the n-tile, columns (rows of x) 8b + 2t, +1.
  if (KW > 1) {
    __shared__ float partial[KW][R][NB * 4][32];
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) partial[kw][r][b * 4 + e][lane] = acc[b][e];
    __syncthreads();
    if (kw != 0) return;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < KW; ++k) sum += partial[k][r][b * 4 + e][lane];  // fixed order: deterministic
        acc[b][e] = sum;
      }
  }
  if (!active) return;
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * b + 2 * t + (e & 1), n = nt * 16 + g + 8 * (e >> 1);
      if (m < M) {
        float v = acc[b][e];
        if (bias) v += H::to_float(bias[n]);
        y[(size_t)m * N + n] = H::from_float(v);
      }
    }
}
