// upq native CPU kernels: y = x @ W^T for W stored as packed 2/4-bit codes with per-row or
// per-group scales (SEQ, asymmetric and residual-binary grids), without ever materialising a
// full-precision W for small batches (decode) and with cache-sized dequantized tiles fed to
// at::mm for larger batches (prefill).
//
// One source, three instruction sets: kernel_body.inc is compiled for AVX-512 (F/BW/VL/DQ),
// AVX2+FMA and portable scalar C++ via `#pragma GCC target`; the best one the CPU supports is
// picked at run time with __builtin_cpu_supports. Threads: at::parallel_for over output rows
// (torch's own OpenMP pool, so no oversubscription with torch ops).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace upq {

static int detect_isa() {
#ifdef UPQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

static const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

static int lanes_of(int isa) { return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 1; }

static int resolve_isa(int64_t requested) {
  const int best = detect_isa();
  if (requested < 0) return best;
  TORCH_CHECK(requested <= best, "upq kernel: instruction set '", isa_name(static_cast<int>(requested)),
              "' is not supported by this CPU (best: '", isa_name(best), "')");
  return static_cast<int>(requested);
}

using GemvFn = void (*)(const Ctx&, const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
using DequantFn = void (*)(const Ctx&, int64_t, int64_t, int64_t, int64_t, float*);

static GemvFn gemv_fn(int isa) {
#ifdef UPQ_X86
  if (isa == kAvx512) return avx512::gemv_range;
  if (isa == kAvx2) return avx2::gemv_range;
#endif
  return scalar::gemv_range;
}

static DequantFn dequant_fn(int isa) {
#ifdef UPQ_X86
  if (isa == kAvx512) return avx512::dequant_rows;
  if (isa == kAvx2) return avx2::dequant_rows;
#endif
  return scalar::dequant_rows;
}

static int storage_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 4, "upq kernel: only 1..4-bit codes (2- or 4-bit storage) are supported, got ",
              bits, " bits");
  return bits <= 2 ? 2 : 4;
}

// Whether every block of LANES bytes touches at most two groups, split on a lane boundary.
static bool layout_ok(int64_t G, int64_t g, int sbits, int isa) {
  if (G == 1) return true;
  const int64_t C = 8 / sbits;
  const int64_t BC = C * lanes_of(isa);
  if (g % C != 0) return false;
  if (g >= BC) return true;
  return BC % g == 0 && BC / g == 2;
}

static std::string layout_reason(int64_t G, int64_t g, int sbits, int isa) {
  const int64_t C = 8 / sbits;
  const int64_t BC = C * lanes_of(isa);
  return "group size " + std::to_string(g) + " is not supported by the " + isa_name(isa) + " kernel for " +
         std::to_string(sbits) + "-bit storage (needs a multiple of " + std::to_string(C) + " that is >= " +
         std::to_string(BC) + " or equal to " + std::to_string(BC / 2) + ")";
}

// x (m, K) -> xp (m, kp) float32 in the lane-permuted order of blocks of `lanes` bytes.
template <typename T>
static void permute_x(const T* x, int64_t m, int64_t K, int lanes, int C, int64_t nblk, float* xp) {
  const int64_t BC = static_cast<int64_t>(lanes) * C;
  const int64_t kp = nblk * BC;
  const int64_t full = K / BC;
  at::parallel_for(0, m, m >= 16 ? 1 : m + 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* xr = x + b * K;
      float* d = xp + b * kp;
      for (int64_t blk = 0; blk < full; ++blk) {
        const T* xs = xr + blk * BC;
        for (int s = 0; s < C; ++s)
          for (int l = 0; l < lanes; ++l) *d++ = static_cast<float>(xs[l * C + s]);
      }
      for (int64_t blk = full; blk < nblk; ++blk)
        for (int s = 0; s < C; ++s)
          for (int l = 0; l < lanes; ++l) {
            const int64_t k = blk * BC + l * C + s;
            *d++ = k < K ? static_cast<float>(xr[k]) : 0.f;
          }
    }
  });
}

static void permute_any(const at::Tensor& x, int64_t K, int lanes, int C, int64_t nblk, float* xp) {
  const int64_t m = x.size(0);
  switch (x.scalar_type()) {
    case at::kFloat: permute_x(x.data_ptr<float>(), m, K, lanes, C, nblk, xp); break;
    case at::kBFloat16: permute_x(x.data_ptr<at::BFloat16>(), m, K, lanes, C, nblk, xp); break;
    default: permute_x(x.data_ptr<at::Half>(), m, K, lanes, C, nblk, xp); break;
  }
}

// out (m, N) in x's dtype = acc (float32) + bias.
template <typename T>
static void store_out(const float* acc, const float* bias, int64_t m, int64_t N, T* out) {
  for (int64_t b = 0; b < m; ++b)
    for (int64_t r = 0; r < N; ++r) out[b * N + r] = static_cast<T>(acc[b * N + r] + (bias ? bias[r] : 0.f));
}

static void fill_constants(Ctx& c, int64_t bits) {
  const int mask = c.sbits == 2 ? 3 : 15;
  const float n = static_cast<float>(1 << (bits - 1));
  for (int i = 0; i < 16; ++i) {
    const int k = i & mask;
    c.kv[i] = static_cast<float>(k);
    c.seqv[i] = (static_cast<float>(k) - n + 0.5f) / n;
    c.b1v[i] = static_cast<float>(2 * ((k >> 1) & 1) - 1);
    c.b2v[i] = static_cast<float>(2 * (k & 1) - 1);
  }
}

// Add the bias and return in x's dtype.
static at::Tensor finish(at::Tensor out, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) out.add_(bias->to(out.scalar_type()));
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// y = x @ W^T (+ bias). x: (m, K) float32/bfloat16/float16; returns (m, N) in x's dtype.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t grid,
                         int64_t bits, int64_t group_len, int64_t isa_req, int64_t gemv_max_batch) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu(),
              "upq kernel: CPU tensors expected");
  TORCH_CHECK(x.dim() == 2, "upq kernel: x must be 2-D (m, in_features), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "upq kernel: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "upq kernel: qweight must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(grid >= kSeq && grid <= kR2q, "upq kernel: unknown grid id ", grid);
  TORCH_CHECK(grid != kR2q || bits == 2, "upq kernel: the residual-binary grid is 2-bit only");
  const int sbits = storage_bits(bits);
  const int64_t m = x.size(0), K = x.size(1), N = qweight.size(0);
  const int64_t row_bytes = (K * sbits + 7) / 8;
  TORCH_CHECK(qweight.size(1) == row_bytes, "upq kernel: qweight rows have ", qweight.size(1), " bytes, expected ",
              row_bytes, " for ", K, " ", sbits, "-bit codes");
  TORCH_CHECK(group_len > 0 && K % group_len == 0, "upq kernel: group length ", group_len, " does not divide ", K);
  const int64_t G = K / group_len;
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == N * G * (grid == kR2q ? 2 : 1),
              "upq kernel: scale must be contiguous with ", N * G * (grid == kR2q ? 2 : 1), " elements, got shape ",
              scale.sizes());
  Ctx c;
  switch (scale.scalar_type()) {
    case at::kFloat: c.scale_kind = kF32; break;
    case at::kHalf: c.scale_kind = kF16; break;
    case at::kBFloat16: c.scale_kind = kBF16; break;
    default: TORCH_CHECK(false, "upq kernel: scale must be float32, float16 or bfloat16, got ", scale.scalar_type());
  }
  if (grid == kAsym) {
    TORCH_CHECK(zero.has_value() && zero->scalar_type() == at::kByte && zero->is_contiguous() &&
                    zero->numel() == N * G && zero->device().is_cpu(),
                "upq kernel: the asymmetric grid needs a contiguous uint8 zero tensor of ", N * G, " elements");
    c.zero = zero->data_ptr<uint8_t>();
  }
  const int isa = resolve_isa(isa_req);
  TORCH_CHECK(layout_ok(G, group_len, sbits, isa), "upq kernel: ", layout_reason(G, group_len, sbits, isa));
  c.qw = qweight.data_ptr<uint8_t>();
  c.row_bytes = row_bytes;
  c.scale = scale.data_ptr();
  c.N = N;
  c.K = K;
  c.G = G;
  c.g = group_len;
  c.grid = static_cast<int>(grid);
  c.sbits = sbits;
  fill_constants(c, bits);

  const int C = 8 / sbits;
  constexpr int64_t rows = 4;  // output rows per parallel tile (the kernels' ROWS)
  const int64_t ntiles = N / rows + N % rows;
  // serial below ~128K multiply-adds per chunk: a fork/join costs more than it saves there
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, rows * K * m));
  at::Tensor out;
  const int lanes = lanes_of(isa);
  const int64_t nblk = (row_bytes + lanes - 1) / lanes;
  const int64_t kp = nblk * lanes * C;
  const at::Tensor xc = x.contiguous();

  if (m <= gemv_max_batch) {
    // Decode: the permuted activations and float32 results live in reused per-thread buffers;
    // only the output tensor is allocated.
    thread_local std::vector<float> xbuf, obuf;
    xbuf.resize(static_cast<size_t>(m * kp));
    permute_any(xc, K, lanes, C, nblk, xbuf.data());
    out = at::empty({m, N}, x.options());
    const bool f32 = x.scalar_type() == at::kFloat;
    const bool has_bias = bias.has_value() && bias->defined();
    if (!f32 || has_bias) obuf.resize(static_cast<size_t>(m * N));
    float* op = f32 && !has_bias ? out.data_ptr<float>() : obuf.data();
    if (m > 0 && N > 0) {
      const GemvFn fn = gemv_fn(isa);
      const float* xpp = xbuf.data();
      at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) { fn(c, xpp, m, kp, nblk, op, t0, t1); });
    }
    if (f32 && !has_bias) return out;
    at::Tensor bias_f;
    if (has_bias) {
      TORCH_CHECK(bias->numel() == N, "upq kernel: bias has ", bias->numel(), " elements, expected ", N);
      bias_f = bias->to(at::kFloat).contiguous();
    }
    const float* bp = has_bias ? bias_f.data_ptr<float>() : nullptr;
    switch (x.scalar_type()) {
      case at::kFloat: store_out(op, bp, m, N, out.data_ptr<float>()); break;
      case at::kBFloat16: store_out(op, bp, m, N, out.data_ptr<at::BFloat16>()); break;
      default: store_out(op, bp, m, N, out.data_ptr<at::Half>()); break;
    }
    return out;
  } else {
    at::Tensor xp = at::empty({m, kp}, x.options().dtype(at::kFloat));
    permute_any(xc, K, lanes, C, nblk, xp.data_ptr<float>());
    // Prefill: dequantize cache-sized row tiles (lane-permuted K, zero-padded x makes the padding
    // inert) and multiply each with at::mm in x's precision, like the reference path does.
    const at::ScalarType mm_type = x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
    const at::Tensor xpm = xp.to(mm_type);
    at::Tensor out_t = at::empty({N, m}, x.options().dtype(mm_type));
    // Tiles of about 2 MiB of float32 weights (at least 16 rows), as many as a multiple of the
    // thread count so that every thread gets the same share.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t max_rows = std::max<int64_t>(16, (int64_t{1} << 21) / (kp * 4));
    int64_t ptiles = std::max<int64_t>(1, (N + max_rows - 1) / max_rows);
    ptiles = std::max<int64_t>(1, std::min<int64_t>((N + 15) / 16, (ptiles + threads - 1) / threads * threads));
    const int64_t tile = (N + ptiles - 1) / ptiles;
    const DequantFn fn = dequant_fn(isa);
    at::parallel_for(0, N > 0 && m > 0 ? ptiles : 0, 1, [&](int64_t t0, int64_t t1) {
      at::Tensor buf = at::empty({tile, kp}, x.options().dtype(at::kFloat));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tile, r1 = std::min(N, r0 + tile);
        if (r0 >= r1) break;
        fn(c, r0, r1, kp, nblk, buf.data_ptr<float>());
        at::Tensor w = buf.narrow(0, 0, r1 - r0);
        if (mm_type != at::kFloat) w = w.to(mm_type);
        at::Tensor dst = out_t.narrow(0, r0, r1 - r0);
        at::mm_out(dst, w, xpm.t());
      }
    });
    out = out_t.t().contiguous();
  }
  return finish(out, x, bias);
}

// Dequantize the whole weight to a float32 (N, K) tensor with the native unpacker (tests/tools).
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                      int64_t K, int64_t grid, int64_t bits, int64_t group_len, int64_t isa_req) {
  const int64_t N = qweight.size(0);
  at::Tensor eye = at::eye(K, qweight.options().dtype(at::kFloat));
  return packed_linear(eye, qweight, scale, zero, c10::nullopt, grid, bits, group_len, isa_req, 0).t().contiguous()
      .view({N, K});
}

bool layout_supported(int64_t bits, int64_t G, int64_t group_len, int64_t isa_req) {
  const int isa = isa_req < 0 ? detect_isa() : static_cast<int>(isa_req);
  return bits >= 1 && bits <= 4 && layout_ok(G, group_len, storage_bits(bits), isa);
}

std::string best_isa() { return isa_name(detect_isa()); }

void bind_decoder(py::module& m);  // llama_decoder.cpp
void bind_losses(py::module& m);   // gjsd_loss.cpp
void bind_block_cache(py::module& m);  // block_cache.cpp

}  // namespace upq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "upq native CPU kernels for packed low-bit linear layers";
  m.def("packed_linear", &upq::packed_linear, "y = x @ W^T (+bias) for a packed low-bit W", py::arg("x"),
        py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("bias"), py::arg("grid"), py::arg("bits"),
        py::arg("group_len"), py::arg("isa") = -1, py::arg("gemv_max_batch") = 16);
  m.def("dequantize", &upq::dequantize, "the float32 weight the kernel multiplies with", py::arg("qweight"),
        py::arg("scale"), py::arg("zero"), py::arg("in_features"), py::arg("grid"), py::arg("bits"),
        py::arg("group_len"), py::arg("isa") = -1);
  m.def("layout_supported", &upq::layout_supported, py::arg("bits"), py::arg("groups"), py::arg("group_len"),
        py::arg("isa") = -1);
  m.def("best_isa", &upq::best_isa);
  upq::bind_decoder(m);
  upq::bind_losses(m);
  upq::bind_block_cache(m);
}
