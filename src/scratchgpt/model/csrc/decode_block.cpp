// One decode step of a transformer block in one call: x (1, 1, C) -> x + attn(norm_1(x)) -> + mlp(norm_2(.)),
// the layer's KV cache written at `start`. What model/gpt.py's Block computes for one new token, no mask:
// GPT-2's block (LayerNorm, GELU) and the Llama / Qwen ones (RMSNorm, SwiGLU or relu², RoPE, grouped-query
// attention, QK-norm, biases on q/k/v).
//
// Why: at GPT-2 124M a decode step's ~300 small tensor operations around the products (norms, splitting
// heads, writing the cache, attention over a few hundred keys, GELU, residual adds) cost 3-6 ms a token on
// the Intel Xeon here, against ~18 ms for streaming the weights: each runs after a product has swept the
// caches, so each pays the memory's latency again, and each goes through the dispatcher. Here they are
// loops over a few thousand floats in one call, and the four products run on the same kernels the layers
// use (float_rows, int8_rows, int4_rows), so only the work between them changes.
//
// params (16 tensors; an empty tensor stands for None): norm_1 weight, bias; c_attn weight, scale, bias;
// attn c_proj weight, scale, bias; norm_2 weight, bias; c_fc weight, scale, bias; mlp c_proj weight, scale,
// bias. A weight is float32/bfloat16 (N, K), int8 (N, K) with a float32 scale per row, or uint8 (N, K/2)
// int4 with float16 scales per group of groups[i] columns (0 for the others).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"

namespace {

bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// A float32 view of an optional parameter (nullptr for None); `holder` keeps a converted copy alive.
const float* floats(const at::Tensor& t, int64_t n, const char* what, at::Tensor& holder) {
  if (!given(t)) return nullptr;
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && at::isFloatingType(t.scalar_type()), what, ": (", n, ",) floating point");
  holder = t.to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

// y = layer(x) for one row: the weight's dtype says which kernel. Returns the layer's output width N.
int64_t product(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& bias, int64_t group,
                const float* x, int64_t K, int64_t N, float* y) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N, "block_decode: a weight has ", weight.size(0),
              " rows where ", N, " were expected");
  at::Tensor holder;
  const float* b = floats(bias, N, "bias", holder);
  if (weight.scalar_type() == at::kChar) int8_rows(x, 1, K, weight, scale, b, y);
  else if (weight.scalar_type() == at::kByte) int4_rows(x, 1, K, weight, scale, b, group, y);
  else float_rows(x, 1, K, weight, b, y);
  return N;
}

void layer_norm(const float* x, int64_t C, const float* w, const float* b, float eps, float* out) {
  float mean = 0.f;
  for (int64_t c = 0; c < C; ++c) mean += x[c];
  mean /= static_cast<float>(C);
  float var = 0.f;
  for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
  const float r = 1.f / std::sqrt(var / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * r * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
}

void rms_norm(const float* x, int64_t C, const float* w, float eps, float* out) {
  float squares = 0.f;
  for (int64_t c = 0; c < C; ++c) squares += x[c] * x[c];
  const float r = 1.f / std::sqrt(squares / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = x[c] * r * (w ? w[c] : 1.f);
}

// Each of `heads` vectors of hs channels, in place: RMSNorm over its channels (QK-norm) when `norm_w` is
// given, then rotated by RoPE when `cos` is given: channel i becomes v_i·cos_i + v_(i+hs/2 mod hs)·sin_i, the
// model's `apply_rotary` (its sin arrives with the first half negated).
void heads_in_place(float* v, int64_t heads, int64_t hs, const float* norm_w, float eps, const float* cos,
                    const float* sin) {
  std::vector<float> tmp(hs);
  for (int64_t h = 0; h < heads; ++h) {
    float* u = v + h * hs;
    if (norm_w) rms_norm(u, hs, norm_w, eps, u);
    if (cos) {
      std::copy(u, u + hs, tmp.begin());
      for (int64_t i = 0; i < hs; ++i) u[i] = tmp[i] * cos[i] + tmp[(i + hs / 2) % hs] * sin[i];
    }
  }
}

inline float as_float(float v) { return v; }
inline float as_float(at::BFloat16 v) { return static_cast<float>(v); }

// Write this token's keys and values at `start`, then each query head attends over positions 0..start of its
// key/value head (grouped-query: n_head / nkv query heads per key/value head). cache (nkv, T_max, hs).
template <typename T>
void attend(const float* qkv, T* kc, T* vc, int64_t n_head, int64_t nkv, int64_t t_max, int64_t hs,
            int64_t start, float* y) {
  const float* q = qkv;
  const float* k = qkv + n_head * hs;
  const float* v = k + nkv * hs;
  for (int64_t g = 0; g < nkv; ++g)
    for (int64_t d = 0; d < hs; ++d) {
      kc[(g * t_max + start) * hs + d] = static_cast<T>(k[g * hs + d]);
      vc[(g * t_max + start) * hs + d] = static_cast<T>(v[g * hs + d]);
    }
  const int64_t S = start + 1, rep = n_head / nkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  // Heads in parallel once a head's work is worth a thread's start (~16k multiply-adds).
  const int64_t grain = std::max<int64_t>(1, 16384 / (S * hs));
  at::parallel_for(0, n_head, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(S);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q + h * hs;
      const T* K = kc + (h / rep) * t_max * hs;
      const T* V = vc + (h / rep) * t_max * hs;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < S; ++t) {
        float s = 0.f;
        for (int64_t d = 0; d < hs; ++d) s += qh[d] * as_float(K[t * hs + d]);
        p[t] = s * scale;
        top = std::max(top, p[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < S; ++t) total += (p[t] = std::exp(p[t] - top));
      float* out = y + h * hs;
      std::fill(out, out + hs, 0.f);
      for (int64_t t = 0; t < S; ++t) {
        const float a = p[t] / total;
        for (int64_t d = 0; d < hs; ++d) out[d] += a * as_float(V[t * hs + d]);
      }
    }
  });
}

}  // namespace

at::Tensor block_decode(const at::Tensor& x_in, const std::vector<at::Tensor>& params, const std::vector<int64_t>& groups,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start, int64_t n_head,
                        double eps_1, double eps_2, bool rms, int64_t activation, const at::Tensor& rope_cos,
                        const at::Tensor& rope_sin, const at::Tensor& q_norm, const at::Tensor& k_norm, double qk_eps) {
  TORCH_CHECK(params.size() == 16 && groups.size() == 4, "block_decode: 16 parameters and 4 group sizes");
  TORCH_CHECK(activation >= 0 && activation <= 3, "block_decode: activation 0 (GELU, tanh), 1 (GELU, erf), 2 (SwiGLU) "
              "or 3 (relu²)");
  const at::Tensor x = as_rows(x_in);
  TORCH_CHECK(x.size(0) == 1, "block_decode: one token of one sequence, got ", x.size(0), " rows");
  const int64_t C = x.size(1);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "block_decode: caches (1, n_kv_head, T_max, head_size), contiguous, float32 or bfloat16");
  const int64_t nkv = k_cache.size(1), t_max = k_cache.size(2), hs = k_cache.size(3);
  TORCH_CHECK(n_head > 0 && n_head % nkv == 0, "block_decode: n_head must be a multiple of n_kv_head");
  TORCH_CHECK(start >= 0 && start < t_max, "block_decode: position ", start, " is outside the cache");
  const int64_t q_dim = n_head * hs, qkv_dim = q_dim + 2 * nkv * hs;
  const int64_t wide = params[10].dim() == 2 ? params[10].size(0) : 0;  // c_fc's outputs (2·H for SwiGLU)
  const int64_t hidden = activation == 2 ? wide / 2 : wide;

  at::Tensor holders[8];
  const float* n1_w = floats(params[0], C, "norm_1 weight", holders[0]);
  const float* n1_b = floats(params[1], C, "norm_1 bias", holders[1]);
  const float* n2_w = floats(params[8], C, "norm_2 weight", holders[2]);
  const float* n2_b = floats(params[9], C, "norm_2 bias", holders[3]);
  const float* cos = floats(rope_cos, hs, "rope cos", holders[4]);
  const float* sin = floats(rope_sin, hs, "rope sin", holders[5]);
  TORCH_CHECK((cos == nullptr) == (sin == nullptr), "block_decode: RoPE needs both cos and sin");
  const float* qn = floats(q_norm, hs, "q_norm weight", holders[6]);
  const float* kn = floats(k_norm, hs, "k_norm weight", holders[7]);
  TORCH_CHECK((qn == nullptr) == (kn == nullptr), "block_decode: QK-norm needs both weights");
  std::vector<float> h(std::max(C, q_dim)), qkv(qkv_dim), att(q_dim), a(C), f(wide);
  at::Tensor out = at::empty({1, C}, x.options());
  float* r = out.data_ptr<float>();
  const float* x0 = x.data_ptr<float>();
  auto norm = [&](const float* in, const float* w, const float* b, double eps) {
    if (rms) rms_norm(in, C, w, static_cast<float>(eps), h.data());
    else layer_norm(in, C, w, b, static_cast<float>(eps), h.data());
  };

  // x + attn(norm_1(x))
  norm(x0, n1_w, n1_b, eps_1);
  product(params[2], params[3], params[4], groups[0], h.data(), C, qkv_dim, qkv.data());
  if (qn || cos) {  // queries, then keys: QK-norm, then RoPE (model/gpt.py's order)
    heads_in_place(qkv.data(), n_head, hs, qn, static_cast<float>(qk_eps), cos, sin);
    heads_in_place(qkv.data() + q_dim, nkv, hs, kn, static_cast<float>(qk_eps), cos, sin);
  }
  if (k_cache.scalar_type() == at::kFloat)
    attend(qkv.data(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), n_head, nkv, t_max, hs, start, att.data());
  else
    attend(qkv.data(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), n_head, nkv, t_max, hs, start,
           att.data());
  product(params[5], params[6], params[7], groups[1], att.data(), q_dim, C, a.data());
  for (int64_t c = 0; c < C; ++c) r[c] = x0[c] + a[c];

  // + mlp(norm_2(.))
  norm(r, n2_w, n2_b, eps_2);
  product(params[10], params[11], params[12], groups[2], h.data(), C, wide, f.data());
  for (int64_t j = 0; j < hidden; ++j) {
    const float u = f[j];
    if (activation == 0) f[j] = 0.5f * u * (1.f + std::tanh(0.79788456080286536f * (u + 0.044715f * u * u * u)));
    else if (activation == 1) f[j] = 0.5f * u * (1.f + std::erf(u * 0.70710678118654752f));
    else if (activation == 2) f[j] = u / (1.f + std::exp(-u)) * f[hidden + j];  // silu(gate) · up
    else f[j] = u > 0.f ? u * u : 0.f;
  }
  product(params[13], params[14], params[15], groups[3], f.data(), hidden, C, a.data());
  for (int64_t c = 0; c < C; ++c) r[c] += a[c];
  return shaped_like(out, x_in, C);
}
