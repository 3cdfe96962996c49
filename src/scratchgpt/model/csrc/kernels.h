// What the source files of scratchgpt's CPU kernels share (model/native.py builds them as one extension).
// Only ATen's tensor, parallel_for and empty are included here: torch/extension.h (the whole C++ frontend
// and the Python bindings) takes ~30 s to compile per file, so only bindings.cpp includes the binding part.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
// float32 or bfloat16 values as 16 floats (a bf16 value is the top half of a float32): a full vector, or the
// first lanes of mask `m` (a row's tail; the other lanes 0). float_linear.cpp's weight rows and
// decode_block.cpp's keys and values.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// The steps both entry points take around a kernel (quantized_linear.cpp): x (..., K) of any float dtype
// as a contiguous float32 (M, K); the bias as float32 (nullptr for None; `holder` keeps the copy alive);
// the (M, N) result back in x's shape and dtype.
at::Tensor as_rows(const at::Tensor& x);
const float* bias_of(const c10::optional<at::Tensor>& bias, int64_t N, at::Tensor& holder);
at::Tensor shaped_like(const at::Tensor& y, const at::Tensor& x, int64_t N);

// A Python-facing product: x (..., K) of any float dtype -> (..., N) in x's dtype, `rows(x, M, K, bias, y)`
// filling the float32 (M, N) result from the contiguous float32 rows (what int4_linear, int8_linear and
// float_linear share around their kernels).
template <typename Rows>
at::Tensor product_of_rows(const at::Tensor& x_in, int64_t N, const c10::optional<at::Tensor>& bias, Rows rows) {
  const at::Tensor x = as_rows(x_in);
  at::Tensor holder;
  const float* b = bias_of(bias, N, holder);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  rows(x.data_ptr<float>(), x.size(0), x.size(1), b, y.data_ptr<float>());
  return shaped_like(y, x_in, N);
}

// The products on raw rows, arguments checked: y (M, N) = x (M, K) · Wᵀ + b (bias nullptr: none).
// quantized_linear.cpp: int4 (weight (N, K/2) uint8, scale (N, K/G) float16) and int8 (weight (N, K) int8,
// scale (N,) float32); float_linear.cpp: float32 or bfloat16 weight (N, K).
void int4_rows(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const at::Tensor& scale,
               const float* bias, int64_t group_size, float* y);
void int8_rows(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const at::Tensor& scale,
               const float* bias, float* y);
void float_rows(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const float* bias, float* y);

// float_linear.cpp
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
std::string float_instruction_set();

// decode_block.cpp
at::Tensor blocks_decode(const at::Tensor& x, const std::vector<at::Tensor>& params, const std::vector<int64_t>& groups,
                         const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start, int64_t n_head,
                         const std::vector<double>& eps, bool rms, int64_t activation, const at::Tensor& rope_cos,
                         const at::Tensor& rope_sin, const std::vector<at::Tensor>& qk_norms, double qk_eps);

// quantized_linear.cpp
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, int64_t group_size);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias);
std::string instruction_set();
