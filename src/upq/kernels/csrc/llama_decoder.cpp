// A lean Llama forward for generation: every decoder layer in one native call per forward, a
// KV cache per slot, no Python between layers.
//
// Layout ("ragged slots"): the cache holds `slots` independent sequences; token t of slot s sits
// at column t, so a token's column is its position. A forward takes any set of new tokens, each
// tagged with its slot and position: a prompt is its tokens at positions 0..n-1, a decode step one
// token per live slot at the slot's current length, a chat turn the turn's tokens after the
// conversation so far. Each token attends to columns [0, position] of its own slot, so there is
// no padding and no mask, and finished slots cost nothing.
//
// Numerics: float32 throughout (residual stream, norms, rotary, attention); the decoder linears
// run through the packed kernel (upq_cpu.cpp) or at::linear for float weights, the same calls
// the transformers path makes, so only summation order differs from it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "multiversion.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <limits>
#include <vector>

namespace upq {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t grid,
                         int64_t bits, int64_t group_len, int64_t isa_req, int64_t gemv_max_batch);
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);

namespace {

c10::optional<at::Tensor> maybe(const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; }

}  // namespace

// One linear layer: packed codes (grid >= 0) or a float weight (grid < 0), optional bias.
struct DecoderLinear {
  at::Tensor weight;  // packed: uint8 qweight (N, row bytes); float: float32 or bfloat16 (N, K)
  at::Tensor scale, zero, bias;
  int64_t grid = -1, bits = 0, group_len = 0, gemv_max_batch = 16;

  at::Tensor operator()(const at::Tensor& x) const {
    if (grid >= 0)
      return packed_linear(x, weight, scale, maybe(zero), maybe(bias), grid, bits, group_len, -1, gemv_max_batch);
    // decode batches stream W once per four rows; a bfloat16 W always does (widening it for a
    // matmul would allocate a float32 copy per call); larger float32 batches go to at::linear
    if (x.size(0) <= gemv_max_batch || weight.scalar_type() != at::kFloat) return dense_gemv(x, weight, maybe(bias));
    return bias.defined() ? at::linear(x, weight, bias) : at::linear(x, weight);
  }
};

// Sibling projections that read the same input; the output is theirs concatenated.
struct DecoderProjection {
  std::vector<DecoderLinear> parts;

  at::Tensor operator()(const at::Tensor& x) const {
    if (parts.size() == 1) return parts[0](x);
    std::vector<at::Tensor> outs;
    outs.reserve(parts.size());
    for (const DecoderLinear& p : parts) outs.push_back(p(x));
    return at::cat(outs, 1);
  }
};

struct DecoderLayer {
  at::Tensor input_norm, post_norm;  // float32 (hidden,)
  DecoderProjection qkv, o, gate_up, down;
};

struct DecoderShape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  double eps = 1e-6, rope_scaling = 1.0;
};

namespace {

// The helpers below are multiversioned (multiversion.h).

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, rows of length n.
UPQ_MULTIVERSION void rms_norm(const float* x, const float* w, int64_t rows, int64_t n, double eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    float* o = out + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

// Llama's rotate-half rotary embedding of one head vector in place.
UPQ_MULTIVERSION void rotate(float* v, const float* cos_t, const float* sin_t, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos_t[i] - b * sin_t[i];
    v[i + half] = b * cos_t[i] + a * sin_t[i];
  }
}

// Causal attention of `group` query heads that share one key/value head, over the n cached
// positions k/v (n, D): out[h] = softmax(q[h] . k^T * scale) v. Each key and value row is read
// once for the whole group. p: scratch of group * n floats.
UPQ_MULTIVERSION void attend(const float* q, const float* k, const float* v, int64_t n, int64_t D, int64_t group,
                             float scale, float* p, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* kt = k + t * D;
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = q + h * D;
      float d = 0.f;
#pragma omp simd reduction(+ : d)
      for (int64_t e = 0; e < D; ++e) d += qh[e] * kt[e];
      p[h * n + t] = d * scale;
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* ph = p + h * n;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) top = std::max(top, ph[t]);
    float total = 0.f;
    for (int64_t t = 0; t < n; ++t) total += (ph[t] = std::exp(ph[t] - top));
    const float inv = 1.f / total;
    for (int64_t t = 0; t < n; ++t) ph[t] *= inv;
    std::fill(out + h * D, out + (h + 1) * D, 0.f);
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* vt = v + t * D;
    for (int64_t h = 0; h < group; ++h) {
      const float pt = p[h * n + t];
      float* o = out + h * D;
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) o[e] += pt * vt[e];
    }
  }
}

// SiLU(gate) * up for rows of (gate | up), each half of width I.
UPQ_MULTIVERSION void silu_mul(const float* gu, int64_t rows, int64_t I, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* g = gu + i * 2 * I;
    const float* u = g + I;
    float* o = out + i * I;
#pragma omp simd
    for (int64_t j = 0; j < I; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
  }
}

// Wall time per part of the forward, accumulated while profiling is on (one clock read per part).
class PartClock {
 public:
  void start(bool on) {
    on_ = on;
    if (on_) last_ = std::chrono::steady_clock::now();
  }
  void mark(const char* part) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    seconds_[part] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }
  std::map<std::string, double> take() {
    std::map<std::string, double> out;
    out.swap(seconds_);
    return out;
  }

 private:
  bool on_ = false;
  std::chrono::steady_clock::time_point last_;
  std::map<std::string, double> seconds_;
};

}  // namespace

class LlamaDecoder {
 public:
  LlamaDecoder(at::Tensor embed, std::vector<DecoderLayer> layers, at::Tensor final_norm, DecoderLinear head,
               at::Tensor inv_freq, DecoderShape shape)
      : embed_(std::move(embed)), layers_(std::move(layers)), final_norm_(std::move(final_norm)),
        head_(std::move(head)), inv_freq_(inv_freq.to(at::kFloat).contiguous()), s_(shape) {
    TORCH_CHECK(embed_.scalar_type() == at::kFloat && embed_.dim() == 2 && embed_.is_contiguous(),
                "LlamaDecoder: the embedding must be a contiguous float32 (vocab, hidden) tensor");
    TORCH_CHECK(s_.heads % s_.kv_heads == 0, "LlamaDecoder: ", s_.heads, " heads do not split into ", s_.kv_heads,
                " key/value heads");
    TORCH_CHECK(inv_freq_.numel() * 2 == s_.head_dim, "LlamaDecoder: rotary inv_freq has ", inv_freq_.numel(),
                " entries, expected head_dim / 2 = ", s_.head_dim / 2);
  }

  // Drop every cached token and size the cache to `slots` sequences of `capacity` positions.
  void reset(int64_t slots, int64_t capacity) {
    TORCH_CHECK(slots >= 1 && capacity >= 1, "LlamaDecoder.reset: slots and capacity must be positive");
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    const int64_t L = static_cast<int64_t>(layers_.size());
    k_ = at::empty({L, slots, s_.kv_heads, capacity, s_.head_dim}, opts);
    v_ = at::empty({L, slots, s_.kv_heads, capacity, s_.head_dim}, opts);
    lengths_.assign(static_cast<size_t>(slots), 0);
  }

  // Grow every slot to hold `capacity` positions, keeping what is cached.
  void reserve(int64_t capacity) {
    TORCH_CHECK(k_.defined(), "LlamaDecoder.reserve: call reset() first");
    if (capacity <= k_.size(3)) return;
    const int64_t old = k_.size(3);
    at::Tensor k = at::empty({k_.size(0), k_.size(1), k_.size(2), capacity, k_.size(4)}, k_.options());
    at::Tensor v = at::empty_like(k);
    k.narrow(3, 0, old).copy_(k_);
    v.narrow(3, 0, old).copy_(v_);
    k_ = k;
    v_ = v;
  }

  // Start (or stop) accumulating the wall time of each part of forward().
  void set_profile(bool on) { profile_ = on; }

  // Seconds per part since the last call: embedding, norms, linears (the decoder's projections),
  // attention (rotary, cache writes, scores), mlp_activation, residual, lm_head.
  std::map<std::string, double> take_profile() { return clock_.take(); }

  int64_t slots() const { return k_.defined() ? k_.size(1) : 0; }
  int64_t capacity() const { return k_.defined() ? k_.size(3) : 0; }

  // Run `tokens` (M,) at `positions` (M,) of `slots` (M,) through the model, writing their keys
  // and values to the cache; return float32 logits (R, vocab) of the tokens `logit_rows` (R,).
  // Every earlier position of a token's slot must already be cached (by this or an earlier call;
  // within a call, tokens of one slot come in position order). Writing position p ends the slot's
  // sequence at p: an earlier position rewinds it (e.g. a conversation re-prefilled from 0).
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions,
                     const at::Tensor& logit_rows) {
    TORCH_CHECK(k_.defined(), "LlamaDecoder.forward: call reset() first");
    TORCH_CHECK(tokens.dim() == 1 && slots.sizes() == tokens.sizes() && positions.sizes() == tokens.sizes(),
                "LlamaDecoder.forward: tokens, slots and positions must be 1-D of one length");
    const at::Tensor tok = tokens.to(at::kLong).contiguous(), slt = slots.to(at::kLong).contiguous();
    const at::Tensor pos = positions.to(at::kLong).contiguous(), keep = logit_rows.to(at::kLong).contiguous();
    const int64_t M = tok.numel(), H = s_.hidden, D = s_.head_dim, half = D / 2;
    const int64_t nq = s_.heads, nkv = s_.kv_heads, cap = k_.size(3), S = k_.size(1), V = embed_.size(0);
    const int64_t* tp = tok.data_ptr<int64_t>();
    const int64_t* sp = slt.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    std::vector<int64_t> lengths = lengths_;
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "LlamaDecoder.forward: token id ", tp[i], " outside the vocabulary of ", V);
      TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "LlamaDecoder.forward: slot ", sp[i], " outside the ", S, " slots");
      TORCH_CHECK(pp[i] >= 0 && pp[i] < cap, "LlamaDecoder.forward: position ", pp[i], " outside the cache of ", cap,
                  " positions (call reserve())");
      int64_t& length = lengths[static_cast<size_t>(sp[i])];
      TORCH_CHECK(pp[i] <= length, "LlamaDecoder.forward: position ", pp[i], " of slot ", sp[i],
                  " skips uncached positions (the slot holds ", length, ")");
      length = pp[i] + 1;
    }
    const int64_t* kp = keep.data_ptr<int64_t>();
    for (int64_t r = 0; r < keep.numel(); ++r)
      TORCH_CHECK(kp[r] >= 0 && kp[r] < M, "LlamaDecoder.forward: logit row ", kp[r], " outside the ", M, " tokens");

    clock_.start(profile_);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor h = at::empty({M, H}, f32);
    float* hp = h.data_ptr<float>();
    const float* ep = embed_.data_ptr<float>();
    for (int64_t i = 0; i < M; ++i) std::copy(ep + tp[i] * H, ep + (tp[i] + 1) * H, hp + i * H);

    // Rotary tables of every token, shared by all layers.
    at::Tensor cs = at::empty({M, 2, half}, f32);
    float* csp = cs.data_ptr<float>();
    const float* fp = inv_freq_.data_ptr<float>();
    const float rs = static_cast<float>(s_.rope_scaling);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < half; ++j) {
        const float a = static_cast<float>(pp[i]) * fp[j];
        csp[(i * 2) * half + j] = std::cos(a) * rs;
        csp[(i * 2 + 1) * half + j] = std::sin(a) * rs;
      }
    clock_.mark("embedding");

    at::Tensor xn = at::empty({M, H}, f32);
    at::Tensor attn = at::empty({M, nq * D}, f32);
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const int64_t group = nq / nkv;
    int64_t longest = 0;
    for (int64_t i = 0; i < M; ++i) longest = std::max(longest, pp[i] + 1);

    for (size_t l = 0; l < layers_.size(); ++l) {
      const DecoderLayer& L = layers_[l];
      rms_norm(hp, L.input_norm.data_ptr<float>(), M, H, s_.eps, xn.data_ptr<float>());
      clock_.mark("norms");
      at::Tensor qkv = L.qkv(xn).contiguous();
      clock_.mark("linears");
      float* qp = qkv.data_ptr<float>();
      const int64_t width = (nq + 2 * nkv) * D;
      float* kc = k_[l].data_ptr<float>();  // (S, nkv, cap, D)
      float* vc = v_[l].data_ptr<float>();
      for (int64_t i = 0; i < M; ++i) {
        float* row = qp + i * width;
        const float* c = csp + i * 2 * half;
        for (int64_t hq = 0; hq < nq + nkv; ++hq) rotate(row + hq * D, c, c + half, half);
        for (int64_t g = 0; g < nkv; ++g) {
          const int64_t at_ = ((sp[i] * nkv + g) * cap + pp[i]) * D;
          std::copy(row + (nq + g) * D, row + (nq + g + 1) * D, kc + at_);
          std::copy(row + (nq + nkv + g) * D, row + (nq + nkv + g + 1) * D, vc + at_);
        }
      }
      float* ap = attn.data_ptr<float>();
      const int64_t work = M * nq * longest * D;
      at::parallel_for(0, M * nkv, work < (int64_t{1} << 18) ? M * nkv + 1 : 1, [&](int64_t w0, int64_t w1) {
        std::vector<float> p(static_cast<size_t>(group * longest));
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t i = w / nkv, g = w % nkv;
          const int64_t base = (sp[i] * nkv + g) * cap * D;
          attend(qp + i * width + g * group * D, kc + base, vc + base, pp[i] + 1, D, group, scale, p.data(),
                 ap + i * nq * D + g * group * D);
        }
      });
      clock_.mark("attention");
      at::Tensor o = L.o(attn);
      clock_.mark("linears");
      h.add_(o);
      clock_.mark("residual");
      rms_norm(hp, L.post_norm.data_ptr<float>(), M, H, s_.eps, xn.data_ptr<float>());
      clock_.mark("norms");
      at::Tensor gu = L.gate_up(xn).contiguous();
      clock_.mark("linears");
      const int64_t I = s_.intermediate;
      at::Tensor act = at::empty({M, I}, f32);
      silu_mul(gu.data_ptr<float>(), M, I, act.data_ptr<float>());
      clock_.mark("mlp_activation");
      at::Tensor down = L.down(act);
      clock_.mark("linears");
      h.add_(down);
      clock_.mark("residual");
    }

    lengths_ = lengths;
    at::Tensor last = h.index_select(0, keep).contiguous();
    at::Tensor normed = at::empty_like(last);
    rms_norm(last.data_ptr<float>(), final_norm_.data_ptr<float>(), last.size(0), H, s_.eps, normed.data_ptr<float>());
    clock_.mark("norms");
    at::Tensor logits = head_(normed);
    clock_.mark("lm_head");
    return logits;
  }

 private:
  at::Tensor embed_;
  std::vector<DecoderLayer> layers_;
  at::Tensor final_norm_;
  DecoderLinear head_;
  at::Tensor inv_freq_;
  DecoderShape s_;
  at::Tensor k_, v_;  // (layers, slots, kv_heads, capacity, head_dim)
  std::vector<int64_t> lengths_;  // cached positions per slot
  bool profile_ = false;
  PartClock clock_;
};

void bind_decoder(py::module& m) {
  m.def("dense_gemv", &dense_gemv, "x @ W^T (+bias) for a few float32 rows and a float32/bfloat16 W", py::arg("x"),
        py::arg("w"), py::arg("bias") = c10::nullopt);
  py::class_<DecoderLinear>(m, "DecoderLinear")
      .def(py::init([](at::Tensor weight, c10::optional<at::Tensor> scale, c10::optional<at::Tensor> zero,
                       c10::optional<at::Tensor> bias, int64_t grid, int64_t bits, int64_t group_len,
                       int64_t gemv_max_batch) {
             DecoderLinear d;
             d.weight = weight;
             d.scale = scale.value_or(at::Tensor());
             d.zero = zero.value_or(at::Tensor());
             d.bias = bias.value_or(at::Tensor());
             d.grid = grid;
             d.bits = bits;
             d.group_len = group_len;
             d.gemv_max_batch = gemv_max_batch;
             return d;
           }),
           py::arg("weight"), py::arg("scale"), py::arg("zero"), py::arg("bias"), py::arg("grid"), py::arg("bits"),
           py::arg("group_len"), py::arg("gemv_max_batch") = 16)
      .def("__call__", &DecoderLinear::operator());
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init([](at::Tensor input_norm, at::Tensor post_norm, std::vector<DecoderLinear> qkv,
                       std::vector<DecoderLinear> o, std::vector<DecoderLinear> gate_up,
                       std::vector<DecoderLinear> down) {
             return DecoderLayer{input_norm, post_norm, {qkv}, {o}, {gate_up}, {down}};
           }),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"));
  py::class_<DecoderShape>(m, "DecoderShape")
      .def(py::init([](int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                       double eps, double rope_scaling) {
             return DecoderShape{hidden, heads, kv_heads, head_dim, intermediate, eps, rope_scaling};
           }),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("eps"), py::arg("rope_scaling"));
  py::class_<LlamaDecoder>(m, "LlamaDecoder")
      .def(py::init<at::Tensor, std::vector<DecoderLayer>, at::Tensor, DecoderLinear, at::Tensor, DecoderShape>(),
           py::arg("embed"), py::arg("layers"), py::arg("final_norm"), py::arg("head"), py::arg("inv_freq"),
           py::arg("shape"))
      .def("reset", &LlamaDecoder::reset, py::arg("slots"), py::arg("capacity"))
      .def("reserve", &LlamaDecoder::reserve, py::arg("capacity"))
      .def("set_profile", &LlamaDecoder::set_profile, py::arg("on"))
      .def("take_profile", &LlamaDecoder::take_profile)
      .def_property_readonly("slots", &LlamaDecoder::slots)
      .def_property_readonly("capacity", &LlamaDecoder::capacity)
      .def("forward", &LlamaDecoder::forward, py::arg("tokens"), py::arg("slots"), py::arg("positions"),
           py::arg("logit_rows"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace upq
