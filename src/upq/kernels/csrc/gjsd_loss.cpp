// Generalized Jensen-Shannon divergence of full-vocabulary logit rows, with its gradient, in one
// pass per row that stays in the core's cache (the distillation loss of upq.distill.losses).
//
// For student logits s and teacher logits t of one row, P_S = softmax(s), P_T = softmax(t),
// M = (1 - beta) P_S + beta P_T, F = log(M / P_S), G = log(M / P_T):
//   loss = -(sum P_T G) / (1 - beta) - (sum P_S F) / beta        (normalized: forward KL at 0,
//   d loss / d s = P_S (sum P_S F - F) / beta                      reverse KL at 1; 0 < beta < 1)
// and the unnormalized loss and gradient are these times beta (1 - beta).
// With d = log P_T - log P_S: F = log((1 - beta) + beta e^d), G = F - d (as the torch version).
//
// The torch version runs about twenty passes over (rows x vocabulary) buffers that do not fit the
// cache; here each row (s, t and the gradient: 3 x 4 x V bytes, 576 KiB at V = 49152) is read
// from memory once and worked on in L2. exp and log are float polynomial versions (relative error
// a few 1e-7) written so that the loops vectorize; rows run in parallel (at::parallel_for).
// Logits may be -inf (a zero probability), not NaN or +inf.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "multiversion.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace upq {
namespace {

constexpr float kLogZero = -1.0e4f;

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// e^x for x <= 88, 0 below -87 (where e^x is at the bottom of the float range).
inline float poly_exp(float x) {
  const float c = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round to nearest by the 1.5 * 2^23 trick (no rounding instruction needed on any ISA)
  const float k = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (c - k * 0.693359375f) + k * 2.12194440e-4f;  // c - k ln2, ln2 split in two
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float e = p * bits_to_float((static_cast<int32_t>(k) + 127) << 23);
  return x < -87.0f ? 0.0f : e;
}

// log(x) for normal x > 0.
inline float poly_log(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e += high ? 1 : 0;
  const float f = m - 1.0f;  // [-0.293, 0.414]
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float f2 = f * f;
  return (f + (f2 * f * p - 0.5f * f2)) + static_cast<float>(e) * 0.693147180559945f;
}

// log(1 + u) for u > -1, accurate for tiny u: log(w) * u / (w - 1) with w = 1 + u rounded cancels
// the rounding of w (Goldberg's trick); u itself where w rounds to 1.
inline float log1p_of(float u) {
  const float w = 1.0f + u;
  const float den = w == 1.0f ? 1.0f : w - 1.0f;
  return w == 1.0f ? u : poly_log(w) * (u / den);
}

// One row: writes the gradient (scaled by `scale`) to g and returns the loss (scaled).
// w_t = beta and w_s = 1 - beta are rounded separately from the double beta (1 - float(beta) would
// lose w_s's digits as beta nears 1).
UPQ_MULTIVERSION float gjsd_row(const float* s, const float* t, int64_t V, float w_t, float w_s, float scale,
                                     float* g) {
  float ms = -std::numeric_limits<float>::infinity(), mt = ms;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t v = 0; v < V; ++v) {
    ms = s[v] > ms ? s[v] : ms;
    mt = t[v] > mt ? t[v] : mt;
  }
  float zs = 0.f, zt = 0.f;
#pragma omp simd reduction(+ : zs, zt)
  for (int64_t v = 0; v < V; ++v) {
    zs += poly_exp(s[v] - ms);
    zt += poly_exp(t[v] - mt);
  }
  // log-probabilities as (x - max) - log(z), as log_softmax does: x - (max + log z) would lose the
  // small log z (and with it the top token's log-probability) to the rounding of a large max.
  const float log_zs = std::log(zs), log_zt = std::log(zt);
  // F = log((1 - beta) + beta e^d) and G = F - d: the one whose weight (beta, resp. 1 - beta) is
  // at most 1/2 is computed directly (it may be tiny and is divided by that weight), the other
  // from it, as L = log((1 - w) + w e^x) with (w, x) = (beta, d) or (1 - beta, -d).
  const bool small_is_f = w_t <= 0.5f;
  const float w = small_is_f ? w_t : w_s;
  const float log_w = std::log(w), log_1mw = std::log(small_is_f ? w_s : w_t);
  float s_term = 0.f, t_term = 0.f;  // sum P_S F, sum P_T G
#pragma omp simd reduction(+ : s_term, t_term)
  for (int64_t v = 0; v < V; ++v) {
    // -inf logits (log 0) become -1e4, as in the torch version: exp(-1e4) is 0, the difference finite
    const float ls0 = (s[v] - ms) - log_zs, lt0 = (t[v] - mt) - log_zt;
    const float ls = ls0 < kLogZero ? kLogZero : ls0, lt = lt0 < kLogZero ? kLogZero : lt0;
    const float d = lt - ls;
    // L = log((1 - w) + w e^x): through log1p while w (e^x - 1) is small, else as a logaddexp
    const float x = small_is_f ? d : -d;
    const float xc = x > 80.0f ? 80.0f : x;
    const float u = w * (poly_exp(xc) - 1.0f);
    const float a = x + log_w;
    const float gap = std::fabs(a - log_1mw);
    const float lse = (a > log_1mw ? a : log_1mw) + log1p_of(poly_exp(-gap));
    const bool near = (x < 80.0f) & (std::fabs(u) < 0.5f);  // & not &&: no branch in the vector loop
    const float L = near ? log1p_of(u) : lse;
    const float f = small_is_f ? L : L + d;
    const float gg = small_is_f ? L - d : L;
    s_term += poly_exp(ls) * f;
    t_term += poly_exp(lt) * gg;
    g[v] = f;
  }
  const float k = scale / w_t;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) g[v] = (s_term - g[v]) * poly_exp((s[v] - ms) - log_zs) * k;
  return scale * (-t_term / w_s - s_term / w_t);
}

// (loss (N,), grad (N, V)) of float32 (N, V) student and teacher logits.
std::vector<torch::Tensor> gjsd_rows(const torch::Tensor& student, const torch::Tensor& teacher, double beta,
                                     bool normalized) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "gjsd_rows: CPU tensors only");
  TORCH_CHECK(student.scalar_type() == torch::kFloat32 && teacher.scalar_type() == torch::kFloat32,
              "gjsd_rows: float32 logits only");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), "gjsd_rows: (N, V) logits of equal shape");
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "gjsd_rows: 0 < beta < 1");
  const auto s = student.contiguous(), t = teacher.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  auto loss = torch::empty({N}, s.options());
  auto grad = torch::empty({N, V}, s.options());
  const float w_t = static_cast<float>(beta), w_s = static_cast<float>(1.0 - beta);
  const float scale = normalized ? 1.0f : static_cast<float>(beta * (1.0 - beta));
  const float *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>();
  float *lp = loss.data_ptr<float>(), *gp = grad.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) lp[r] = gjsd_row(sp + r * V, tp + r * V, V, w_t, w_s, scale, gp + r * V);
  });
  return {loss, grad};
}

}  // namespace

void bind_losses(py::module& m) {
  m.def("gjsd_rows", &gjsd_rows, "generalized JSD of (N, V) float32 logit rows and its gradient w.r.t. the student",
        py::arg("student"), py::arg("teacher"), py::arg("beta"), py::arg("normalized"));
}

}  // namespace upq
