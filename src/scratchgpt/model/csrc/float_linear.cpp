// scratchgpt's float CPU kernel for decoding: y = x · Wᵀ (+ b) for a few rows x and float32 or bfloat16
// weights W (N, K) in nn.Linear's own layout, read as stored.
//
// Why: a decode step multiplies every weight by one activation row, so its speed is how fast the weights
// stream from DRAM. PyTorch's matrix-vector path (MKL / oneDNN) streamed a GPT-2 124M decode step at ~60%
// of the measured read bandwidth on the Intel Xeon here (llama.cpp's F32 kernel: 80%); the split-K and
// W @ xᵀ tricks in model/fast_linear.py reach the bandwidth only on some CPUs. Streaming is simple to do
// well by hand: each thread takes a contiguous band of rows (one sequential stream for the hardware
// prefetcher), every weight vector loaded once is multiplied by all (up to 4) activation rows, and four
// weight rows, one from each quarter of the band, run side by side (see run_rows).
//
// bfloat16 weights are widened to float32 in registers (a bf16 value is the top half of a float32), so
// the product is a float32 product of the bf16 weights: the activation is not rounded to bf16 and the
// weights stream at half the bytes. Their rows are also prefetched by hand, 512 weights (1 KB) ahead, once
// per 64-byte line: a bf16 weight costs a widening and an FMA per 2 bytes where a float32 one costs an FMA
// per 4, so fewer bytes are in flight within the core's window of instructions, and the hardware prefetcher
// alone held bf16 at 21-26 GB/s where float32 streams at 29-31. With the hint, GPT-2 124M in bf16 decoded
// 98 tok/s instead of 87 (the same tokens; Intel Xeon AMX here, both paths: AVX-512 and, built for
// haswell, AVX2). float32 rows gained nothing from it (0 to -5%) and are left to the hardware.
//
// Built by model/native.py together with quantized_linear.cpp (one extension); the instruction set is
// chosen at compile time: AVX-512 (16 floats a vector), AVX2 + FMA (8), or plain C++.


#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SGF_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define SGF_AVX2 1
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = 4;      // weight rows side by side
constexpr int kMaxM = 4;      // activation rows per call (model/native.py: MAX_ROWS)

// Widening loads: `n` (< the vector width, for a row's tail) or a full vector of weights as floats (AVX-512:
// kernels.h's load16).
#if SGF_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum8(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}
#endif

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

// out[r * M + m] = dot(weight row w[r], row m of x) for R weight rows and M activation rows (K columns).
template <int R, int M, typename W>
inline void dot_tile(const W* const* w, int64_t K, const float* x, float* out) {
#if SGF_AVX512
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (sizeof(W) == 2 && (k & 31) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + 512), _MM_HINT_T0);
    __m512 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 v = load16(w[r] + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(v, xs[m], acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm512_maskz_loadu_ps(tail, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 v = load16(w[r] + k, tail);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(v, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r * M + m] = _mm512_reduce_add_ps(acc[r][m]);
#elif SGF_AVX2
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (sizeof(W) == 2 && (k & 31) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + 512), _MM_HINT_T0);
    __m256 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 v = load8(w[r] + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(v, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float total = hsum8(acc[r][m]);
      for (int64_t j = k; j < K; ++j) total += widen(w[r][j]) * x[m * K + j];
      out[r * M + m] = total;
    }
#else
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t j = 0; j < K; ++j) total += widen(w[r][j]) * x[m * K + j];
      out[r * M + m] = total;
    }
#endif
}

template <int M, typename W>
void run_rows(const float* x, int64_t K, const W* w, const float* bias, int64_t N, float* y) {
  // Bands of at least ~64 KB of weights per task: enough to amortize a task, small enough to split a
  // 768 x 768 layer over the threads.
  const int64_t grain = std::max<int64_t>(kRows, (65536 / static_cast<int64_t>(sizeof(W))) / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // The band is read as kRows sequential streams, one per quarter: tile i takes row i of each quarter.
    // A core keeps more reads in flight over several streams far apart than over one: the hardware
    // prefetcher follows each stream within a 4 KB page. Measured on the Intel Xeon (AMX) here, a plain
    // read of 1 GB on two threads: 24 GB/s as one stream per thread, 30-32 GB/s as four.
    const int64_t quarter = (n1 - n0) / kRows;
    float out[kRows * M];
    const W* rows[kRows];
    for (int64_t i = 0; i < quarter; ++i) {
      for (int r = 0; r < kRows; ++r) rows[r] = w + (n0 + r * quarter + i) * K;
      dot_tile<kRows, M>(rows, K, x, out);
      for (int r = 0; r < kRows; ++r) {
        const int64_t n = n0 + r * quarter + i;
        for (int m = 0; m < M; ++m) y[m * N + n] = out[r * M + m] + (bias ? bias[n] : 0.f);
      }
    }
    for (int64_t n = n0 + kRows * quarter; n < n1; ++n) {  // the last (n1 - n0) % kRows rows
      const W* row = w + n * K;
      dot_tile<1, M>(&row, K, x, out);
      for (int m = 0; m < M; ++m) y[m * N + n] = out[m] + (bias ? bias[n] : 0.f);
    }
  });
}

template <typename W>
void run_float(const float* x, int64_t M, int64_t K, const W* w, const float* bias, int64_t N, float* y) {
  switch (M) {
    case 1: run_rows<1>(x, K, w, bias, N, y); break;
    case 2: run_rows<2>(x, K, w, bias, N, y); break;
    case 3: run_rows<3>(x, K, w, bias, N, y); break;
    default: run_rows<4>(x, K, w, bias, N, y); break;
  }
}

}  // namespace

// y (M, N) = x (M, K) · Wᵀ + b for weight (N, K) float32 or bfloat16: checked, then the kernel, up to kMaxM
// rows per pass over the weights (more rows take more passes: the Python side sends only a few).
void float_rows(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const float* bias, float* y) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "float_linear: weight must be a contiguous (N, K) float32 or bfloat16 tensor");
  const int64_t N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "float_linear: weight has ", weight.size(1), " columns for K = ", K);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t rows = std::min<int64_t>(kMaxM, M - m0);
    if (weight.scalar_type() == at::kFloat) run_float(x + m0 * K, rows, K, weight.data_ptr<float>(), bias, N, y + m0 * N);
    else run_float(x + m0 * K, rows, K, weight.data_ptr<at::BFloat16>(), bias, N, y + m0 * N);
  }
}

// x (..., K) float, weight (N, K) float32 or bfloat16 (contiguous), bias (N,) or None -> (..., N) in x's dtype.
at::Tensor float_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t N = weight.dim() == 2 ? weight.size(0) : 0;
  return product_of_rows(x_in, N, bias, [&](const float* x, int64_t M, int64_t K, const float* b, float* y) {
    float_rows(x, M, K, weight, b, y);
  });
}

std::string float_instruction_set() {
#if SGF_AVX512
  return "avx512";
#elif SGF_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}
