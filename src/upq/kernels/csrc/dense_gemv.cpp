// y = x @ W^T (+ bias) for a few float32 rows x and a dense float32 or bfloat16 W, the decode
// case of the native decoder's unquantized layers (a float lm_head above all, which reads more
// bytes per token than the whole INT2 body). Memory-bound: W streams once per call, four rows of
// W against up to four rows of x per step, float32 accumulation (bfloat16 widens exactly, so a
// bfloat16 copy of bfloat16-valued weights gives the float32 result up to summation order).
// Threads: at::parallel_for over output rows.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define UPQ_DENSE_X86 1
#endif

namespace upq {
namespace {

constexpr int kRows = 4;   // rows of W per step
constexpr int kBatch = 4;  // rows of x per pass

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename W>
void rows_scalar(const float* x, int64_t nb, const W* w, int64_t K, int64_t r0, int64_t r1, int64_t N, float* out) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += widen(w[r * K + k]) * x[b * K + k];
      out[b * N + r] = acc;
    }
}

#ifdef UPQ_DENSE_X86
#define UPQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// float32 W: 16 weights per load, x in its natural order.
template <int NB>
UPQ_AVX512 void tile_f32(const float* x, const float* w, int64_t K, int64_t r, int64_t N, float* out) {
  __m512 acc[kRows][NB];
  for (int i = 0; i < kRows; ++i)
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const bool full = K - k >= 16;
    const __mmask16 m = full ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = full ? _mm512_loadu_ps(x + b * K + k) : _mm512_maskz_loadu_ps(m, x + b * K + k);
    for (int i = 0; i < kRows; ++i) {
      const float* p = w + (r + i) * K + k;
      const __m512 wv = full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
      for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_fmadd_ps(wv, xv[b], acc[i][b]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int b = 0; b < NB; ++b) out[b * N + r + i] = _mm512_reduce_add_ps(acc[i][b]);
}

// bfloat16 W: 32 weights per load, widened without a shuffle: the 32-bit lanes hold weight pairs
// (2j, 2j+1), so `lane << 16` is the even weight and `lane & 0xffff0000` the odd one. xp holds x
// permuted to match: per block of 32, the 16 even entries, then the 16 odd ones (zero padded).
template <int NB>
UPQ_AVX512 void tile_bf16(const float* xp, int64_t Kp, const uint16_t* w, int64_t K, int64_t r, int64_t N,
                          float* out) {
  __m512 acc[kRows][NB];
  for (int i = 0; i < kRows; ++i)
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 32) {
    const bool full = K - k >= 32;
    const __mmask32 m = full ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1u);
    __m512 xe[NB], xo[NB];
    for (int b = 0; b < NB; ++b) {
      xe[b] = _mm512_loadu_ps(xp + b * Kp + k);
      xo[b] = _mm512_loadu_ps(xp + b * Kp + k + 16);
    }
    for (int i = 0; i < kRows; ++i) {
      const uint16_t* p = w + (r + i) * K + k;
      const __m512i pair = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
      for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_fmadd_ps(odd, xo[b], _mm512_fmadd_ps(even, xe[b], acc[i][b]));
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int b = 0; b < NB; ++b) out[b * N + r + i] = _mm512_reduce_add_ps(acc[i][b]);
}

template <int NB>
UPQ_AVX512 void tile_avx512(const float* x, const float*, int64_t, const float* w, int64_t K, int64_t r, int64_t N,
                            float* out) {
  tile_f32<NB>(x, w, K, r, N, out);
}
template <int NB>
UPQ_AVX512 void tile_avx512(const float*, const float* xp, int64_t Kp, const uint16_t* w, int64_t K, int64_t r,
                            int64_t N, float* out) {
  tile_bf16<NB>(xp, Kp, w, K, r, N, out);
}

template <typename W>
UPQ_AVX512 void rows_avx512(const float* x, const float* xp, int64_t Kp, int64_t nb, const W* w, int64_t K,
                            int64_t r0, int64_t r1, int64_t N, float* out) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    switch (nb) {
      case 1: tile_avx512<1>(x, xp, Kp, w, K, r, N, out); break;
      case 2: tile_avx512<2>(x, xp, Kp, w, K, r, N, out); break;
      case 3: tile_avx512<3>(x, xp, Kp, w, K, r, N, out); break;
      default: tile_avx512<4>(x, xp, Kp, w, K, r, N, out); break;
    }
  }
  rows_scalar(x, nb, w, K, r, r1, N, out);
}

bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return yes;
}
#endif

// x (nb, K) -> xp (nb, Kp): per block of 32, the even entries then the odd ones, zero padded.
void pair_permute(const float* x, int64_t nb, int64_t K, int64_t Kp, float* xp) {
  std::fill(xp, xp + nb * Kp, 0.f);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t k = 0; k < K; ++k) xp[b * Kp + (k / 32) * 32 + (k % 2) * 16 + (k % 32) / 2] = x[b * K + k];
}

template <typename W>
void gemv(const float* x, int64_t m, const W* w, int64_t K, int64_t N, float* out) {
  // row blocks of about 64 KiB of W per task: below that a fork/join costs more than it saves
  const int64_t grain = std::max<int64_t>(kRows, (int64_t{1} << 16) / std::max<int64_t>(1, K * sizeof(W)));
  const int64_t Kp = (K + 31) / 32 * 32;
  std::vector<float> xp;
  for (int64_t b0 = 0; b0 < m; b0 += kBatch) {
    const int64_t nb = std::min<int64_t>(kBatch, m - b0);
    const float* xb = x + b0 * K;
    float* ob = out + b0 * N;
    if (sizeof(W) == 2) {
      xp.resize(static_cast<size_t>(nb * Kp));
      pair_permute(xb, nb, K, Kp, xp.data());
    }
    at::parallel_for(0, (N + kRows - 1) / kRows, std::max<int64_t>(1, grain / kRows), [&](int64_t t0, int64_t t1) {
      const int64_t r0 = t0 * kRows, r1 = std::min(N, t1 * kRows);
#ifdef UPQ_DENSE_X86
      if (has_avx512()) return rows_avx512(xb, xp.data(), Kp, nb, w, K, r0, r1, N, ob);
#endif
      rows_scalar(xb, nb, w, K, r0, r1, N, ob);
    });
  }
}

}  // namespace

// x (m, K) float32, w (N, K) float32 or bfloat16 contiguous -> (m, N) float32.
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "dense_gemv: x must be 2-D float32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "dense_gemv: w must be a contiguous 2-D float32 or bfloat16 tensor");
  TORCH_CHECK(x.size(1) == w.size(1), "dense_gemv: x has ", x.size(1), " features, w expects ", w.size(1));
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), K = xc.size(1), N = w.size(0);
  at::Tensor out = at::empty({m, N}, xc.options());
  if (m > 0 && N > 0) {
    if (w.scalar_type() == at::kFloat)
      gemv(xc.data_ptr<float>(), m, w.data_ptr<float>(), K, N, out.data_ptr<float>());
    else
      gemv(xc.data_ptr<float>(), m, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), K, N,
           out.data_ptr<float>());
  }
  if (bias.has_value() && bias->defined()) out.add_(bias->to(at::kFloat));
  return out;
}

}  // namespace upq
