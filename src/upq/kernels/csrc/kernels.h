// Kernel core of upq_cpu.cpp, free of torch headers (so it can also be compiled standalone):
// the context struct, the three instruction-set traits and their instantiations of
// kernel_body.inc. See upq_cpu.cpp for the overview.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define UPQ_X86 1
#endif

// Everything called from the inner loops must be inlined: an out-of-line call clobbers every
// vector register (SysV ABI), spilling the accumulators on each group change.
#define UPQ_INLINE inline __attribute__((always_inline))

namespace upq {

enum Grid : int { kSeq = 0, kAsym = 1, kR2q = 2 };
enum ScaleKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum IsaId : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Ctx {
  const uint8_t* qw = nullptr;  // (N, row_bytes) packed codes
  int64_t row_bytes = 0;
  const void* scale = nullptr;  // (N, G) or (N, G, 2) for r2q
  int scale_kind = kF32;
  const uint8_t* zero = nullptr;  // (N, G), asymmetric grid only
  int64_t N = 0, K = 0, G = 1, g = 0;
  int grid = kSeq, sbits = 2;
  // Per-code constants of the level tables (16 entries; 2-bit tables repeat with period 4 so a
  // lookup may use the low 4 bits of a shifted byte without masking).
  alignas(64) float kv[16];    // code value k
  alignas(64) float seqv[16];  // (k - n + 0.5) / n, SEQ
  alignas(64) float b1v[16];   // 2 * (k >> 1) - 1, residual binary first sign
  alignas(64) float b2v[16];   // 2 * (k & 1) - 1, residual binary second sign
};

// IEEE binary16 -> binary32 (exact; handles subnormals, inf and NaN).
static UPQ_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112u) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// (a, b) of a group: SEQ (delta, -), asymmetric (scale, zero), residual binary (a1, a2).
struct GroupParams {
  float a, b;
};

// ---------------------------------------------------------------- scalar (portable) -------------
namespace scalar {
static UPQ_INLINE float half_bits(uint16_t h) { return half_to_float(h); }
#include "group_params.inc"
struct Isa {
  static constexpr int LANES = 1;
  using V = float;
  using I = uint32_t;
  using Split = int;
  struct Lut {
    float t[16];
  };
  static UPQ_INLINE V zero() { return 0.f; }
  static UPQ_INLINE V fma(V a, V b, V acc) { return a * b + acc; }
  static UPQ_INLINE V load(const float* p) { return *p; }
  static UPQ_INLINE void store(float* p, V v) { *p = v; }
  static UPQ_INLINE float hsum(V v) { return v; }
  static UPQ_INLINE I codes(const uint8_t* p) { return *p; }
  static UPQ_INLINE I codes_partial(const uint8_t* p, int n) { return n > 0 ? *p : 0u; }
  static UPQ_INLINE I shr(I v, int n) { return v >> n; }
  static UPQ_INLINE Lut make_lut(const Ctx& c, int64_t row, int64_t gi) {
    const GroupParams p = group_params(c, row, gi);
    Lut l;
    for (int k = 0; k < 16; ++k) {
      l.t[k] = c.grid == kSeq ? p.a * c.seqv[k] : c.grid == kAsym ? (c.kv[k] - p.b) * p.a : p.a * c.b1v[k] + p.b * c.b2v[k];
    }
    return l;
  }
  template <int SB>
  static UPQ_INLINE V lookup(I idx, const Lut& l) { return l.t[idx & 15u]; }
  template <int SB>
  static UPQ_INLINE V lookup2(I idx, const Lut& a, const Lut& b, Split m) { return m ? b.t[idx & 15u] : a.t[idx & 15u]; }
  static UPQ_INLINE Split split_mask(int lane) { return lane <= 0; }
};
#include "kernel_body.inc"
}  // namespace scalar

#ifdef UPQ_X86
// ---------------------------------------------------------------- AVX2 + FMA -------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
static UPQ_INLINE float half_bits(uint16_t h) { return _cvtsh_ss(h); }
#include "group_params.inc"
struct Isa {
  static constexpr int LANES = 8;
  using V = __m256;
  using I = __m256i;
  using Split = __m256;
  struct Lut {
    __m256 lo, hi;  // levels of codes 0..7 and 8..15
  };
  static UPQ_INLINE V zero() { return _mm256_setzero_ps(); }
  static UPQ_INLINE V fma(V a, V b, V acc) { return _mm256_fmadd_ps(a, b, acc); }
  static UPQ_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static UPQ_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static UPQ_INLINE float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static UPQ_INLINE I codes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static UPQ_INLINE I codes_partial(const uint8_t* p, int n) {
    uint64_t t = 0;
    std::memcpy(&t, p, static_cast<size_t>(n));
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(t)));
  }
  static UPQ_INLINE I shr(I v, int n) { return _mm256_srli_epi32(v, n); }
  static UPQ_INLINE __m256 half(const Ctx& c, const GroupParams& p, int off) {
    const __m256 a = _mm256_set1_ps(p.a);
    if (c.grid == kSeq) return _mm256_mul_ps(a, _mm256_load_ps(c.seqv + off));
    if (c.grid == kAsym) return _mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(c.kv + off), _mm256_set1_ps(p.b)), a);
    return _mm256_fmadd_ps(a, _mm256_load_ps(c.b1v + off), _mm256_mul_ps(_mm256_set1_ps(p.b), _mm256_load_ps(c.b2v + off)));
  }
  static UPQ_INLINE Lut make_lut(const Ctx& c, int64_t row, int64_t gi) {
    const GroupParams p = group_params(c, row, gi);
    Lut l;
    l.lo = half(c, p, 0);
    l.hi = c.sbits == 4 ? half(c, p, 8) : l.lo;
    return l;
  }
  template <int SB>
  static UPQ_INLINE V lookup(I idx, const Lut& l) {
    const V lo = _mm256_permutevar8x32_ps(l.lo, idx);
    if (SB == 2) return lo;
    const V hi = _mm256_permutevar8x32_ps(l.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  template <int SB>
  static UPQ_INLINE V lookup2(I idx, const Lut& a, const Lut& b, Split m) {
    return _mm256_blendv_ps(lookup<SB>(idx, a), lookup<SB>(idx, b), m);
  }
  static UPQ_INLINE Split split_mask(int lane) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(lane - 1)));
  }
};
#include "kernel_body.inc"
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 ----------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
static UPQ_INLINE float half_bits(uint16_t h) { return _cvtsh_ss(h); }
#include "group_params.inc"
struct Isa {
  static constexpr int LANES = 16;
  using V = __m512;
  using I = __m512i;
  using Split = __mmask16;
  struct Lut {
    __m512 t;
  };
  static UPQ_INLINE V zero() { return _mm512_setzero_ps(); }
  static UPQ_INLINE V fma(V a, V b, V acc) { return _mm512_fmadd_ps(a, b, acc); }
  static UPQ_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static UPQ_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static UPQ_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static UPQ_INLINE I codes(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static UPQ_INLINE I codes_partial(const uint8_t* p, int n) {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1u), p));
  }
  static UPQ_INLINE I shr(I v, int n) { return _mm512_srli_epi32(v, static_cast<unsigned>(n)); }
  static UPQ_INLINE Lut make_lut(const Ctx& c, int64_t row, int64_t gi) {
    const GroupParams p = group_params(c, row, gi);
    const __m512 a = _mm512_set1_ps(p.a);
    if (c.grid == kSeq) return {_mm512_mul_ps(a, _mm512_load_ps(c.seqv))};
    if (c.grid == kAsym) return {_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(c.kv), _mm512_set1_ps(p.b)), a)};
    return {_mm512_fmadd_ps(a, _mm512_load_ps(c.b1v), _mm512_mul_ps(_mm512_set1_ps(p.b), _mm512_load_ps(c.b2v)))};
  }
  template <int SB>
  static UPQ_INLINE V lookup(I idx, const Lut& l) { return _mm512_permutexvar_ps(idx, l.t); }
  template <int SB>
  static UPQ_INLINE V lookup2(I idx, const Lut& a, const Lut& b, Split m) {
    return _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(idx, a.t), m, idx, b.t);
  }
  static UPQ_INLINE Split split_mask(int lane) { return static_cast<__mmask16>(0xFFFFu << lane); }
};
#include "kernel_body.inc"
}  // namespace avx512
#pragma GCC pop_options

#endif  // UPQ_X86

// ---------------------------------------------------------------- dispatch ---------------------

// detect_isa, dispatch and the torch-facing functions follow in upq_cpu.cpp
}  // namespace upq
