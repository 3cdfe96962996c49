// scratchgpt's int4 CPU kernel: y = x · Wᵀ (+ b) for group-wise int4 weights, as llama.cpp's Q4_0 x Q8_0
// dot product does it, on the weights exactly as scratchgpt stores them (model/int4.py):
//   W (N, K/2) uint8: byte j of a row holds u = q + 8 for column 2j (low nibble) and 2j + 1 (high nibble),
//   scales (N, K/G) float16, one per group of G = 32, 64 or 128 columns: w = scale · q, q in [-8, 7].
// Each activation row is quantized to int8 in blocks of 32 columns (one float scale per block, as Q8_0
// does), so a product of 128 columns is two integer multiply-adds of 64 byte pairs (AVX512-VNNI
// `vpdpbusd`; AVX2 `vpmaddubsw`) and one float multiply-add per 8 columns. Decoding one token is a stream
// over the weights, 4.5 bits each at group 32: the kernel's job is to keep up with memory.
//
// Layout trick: a 64-byte load of a weight row holds 128 columns, low nibbles the even ones and high
// nibbles the odd ones. So the activation is laid out once per call to match (even columns, then odd
// columns, per 128), and the weights are read as stored: no copy of the model in another layout.
// Integer lane i of a 512-bit accumulator then sums columns 8i .. 8i + 7 of the chunk (4 bytes, two
// nibbles each): one int4 group (32 columns) is 4 lanes, one int8 activation block too.
//
// Built by model/native.py with the compiler's flags for the CPU it runs on (-march=native); the
// instruction set is chosen at compile time below. K must be a multiple of 128 (model/int4.py checks).


#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__)
#define SG_AVX512_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define SG_AVX2 1
#include <immintrin.h>
#endif

namespace {

#ifndef SG_PREFETCH
#define SG_PREFETCH 1024
#endif
constexpr int64_t kChunk = 128;       // columns per step: 64 bytes of weights
constexpr int64_t kXBytes = 256;      // prepared activation per chunk: 64 even + 64 odd int8, 16 int32, 16 float

// One activation row, prepared per 128-column chunk c at out + 256 c:
//   [0, 64)    int8  even columns 2j (j = 0..63): the partners of the low nibbles
//   [64, 128)  int8  odd columns 2j + 1: the partners of the high nibbles
//   [128, 192) int32 per lane i: -8 · (sum of the 8 quantized values lane i multiplies), so the unsigned
//              nibbles u = q + 8 give sum q·x exactly
//   [192, 256) float per lane i: the scale of the activation block (32 columns) lane i belongs to
// The int8 quantization of one block of 32 activations: (scale, 1 / step). A block holding an infinity or
// NaN gets scale NaN and step 0 (its values quantize to 0), so the outputs it feeds are NaN, as a float product's
// would be, and no non-finite value is ever converted to an integer (undefined in C++).
inline void block_scale(const float* xb, float& scale, float& inv) {
  float amax = 0.f;
  bool finite = true;
  for (int k = 0; k < 32; ++k) {
    finite = finite && std::isfinite(xb[k]);
    amax = std::max(amax, std::fabs(xb[k]));
  }
  scale = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
  inv = finite && amax > 0.f ? 127.f / amax : 0.f;
}

void prepare_row(const float* x, int64_t K, uint8_t* out) {
  for (int64_t c = 0; c < K / kChunk; ++c) {
    const float* xc = x + c * kChunk;
    int8_t* even = reinterpret_cast<int8_t*>(out + c * kXBytes);
    int8_t* odd = even + 64;
    int32_t* corr = reinterpret_cast<int32_t*>(out + c * kXBytes + 128);
    float* scale = reinterpret_cast<float*>(out + c * kXBytes + 192);
    for (int b = 0; b < 4; ++b) {  // activation blocks of 32 columns
      const float* xb = xc + 32 * b;
      float s, inv;
      block_scale(xb, s, inv);
      for (int j = 0; j < 16; ++j) {
        even[16 * b + j] = static_cast<int8_t>(inv > 0.f ? std::nearbyint(xb[2 * j] * inv) : 0.f);
        odd[16 * b + j] = static_cast<int8_t>(inv > 0.f ? std::nearbyint(xb[2 * j + 1] * inv) : 0.f);
      }
      for (int l = 0; l < 4; ++l) {
        const int i = 4 * b + l;  // lane i: bytes 4i .. 4i + 3 of each half
        int32_t sum = 0;
        for (int t = 0; t < 4; ++t) sum += even[4 * i + t] + odd[4 * i + t];
        corr[i] = -8 * sum;
        scale[i] = s;
      }
    }
  }
}

// Which weight group each of the 16 lanes of a chunk falls in, as an offset from the chunk's first group:
// lane i covers columns 8i .. 8i + 7, so group (8 i) / G; with g = 128 / G groups per chunk, i · g / 16.
template <int G>
inline float group_scale_lane(const at::Half* s, int lane) {
  return static_cast<float>(s[(lane * (kChunk / G)) / 16]);
}

#if SG_AVX512_VNNI
// R weight rows at once against one prepared activation row (they share its loads): out[r] = row r · x.
// Per 4 chunks, each row's group scales (16, 8 or 4 float16 values) become floats once; each chunk then
// picks its lanes' scales with one permute.
template <int G, int R, int MT>
inline void dot_tile(const uint8_t* w, int64_t w_stride, const at::Half* s, int64_t s_stride,
                     const uint8_t* xp, int64_t x_stride, int64_t chunks, float* out) {
  // R weight rows (w_stride bytes and s_stride scales apart) x MT activation rows: each weight chunk is loaded and split into nibbles once, its scales
  // converted once, and used for all MT activation rows (a small batch, a speculative check); out[m * R + r].
  constexpr int per_chunk = kChunk / G;  // groups per chunk: 4, 2 or 1
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // idx[u] lane i: the group of column 8i of chunk u among the 4 chunks' scales, u · per_chunk + i · per_chunk / 16
  __m512i idx[4];
  for (int u = 0; u < 4; ++u) {
    alignas(64) int32_t lanes[16];
    for (int i = 0; i < 16; ++i) lanes[i] = u * per_chunk + (i * per_chunk) / 16;
    idx[u] = _mm512_load_si512(lanes);
  }
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, chunks - c0));
    const __mmask16 mask = static_cast<__mmask16>((1u << (n * per_chunk)) - 1u);
    __m512 scales[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* ahead = w + r * w_stride + c0 * 64 + SG_PREFETCH;
      for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * l), _MM_HINT_T0);
      scales[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, s + r * s_stride + c0 * per_chunk));
    }
    for (int u = 0; u < n; ++u) {
      __m512i lo[R], hi[R];
      __m512 wscale[R];
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512(w + r * w_stride + (c0 + u) * 64);
        lo[r] = _mm512_and_si512(v, low4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        wscale[r] = _mm512_permutexvar_ps(idx[u], scales[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const uint8_t* x = xp + m * x_stride + (c0 + u) * kXBytes;
        const __m512i even = _mm512_loadu_si512(x), odd = _mm512_loadu_si512(x + 64);
        const __m512i corr = _mm512_loadu_si512(x + 128);
        const __m512 xscale = _mm512_loadu_ps(reinterpret_cast<const float*>(x + 192));
        for (int r = 0; r < R; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo[r], even), hi[r], odd);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale[r], xscale), acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

#elif SG_AVX2
template <int G>
inline float dot_row(const uint8_t* w, const at::Half* s, const uint8_t* xp, int64_t chunks) {
  constexpr int per_chunk = kChunk / G;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* x = xp + c * kXBytes;
    const at::Half* sc = s + c * per_chunk;
    // The chunk's (up to 4) group scales as floats in the low lanes of a 256-bit register.
    alignas(16) uint16_t halves[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(halves, sc, sizeof(uint16_t) * per_chunk);
    const __m256 groups = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(halves))));
    for (int h = 0; h < 2; ++h) {  // two 32-byte halves: lanes 8h .. 8h + 7 of the chunk
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 64 + 32 * h));
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      // u (0..15) x int8: pairs of products fit int16 (2 · 15 · 127), and so do the two nibbles' sums.
      const __m256i p = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * h))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 + 32 * h))));
      __m256i dot = _mm256_madd_epi16(p, ones);
      dot = _mm256_add_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 128 + 32 * h)));
      const __m256i idx = _mm256_setr_epi32(
          ((8 * h + 0) * per_chunk) / 16, ((8 * h + 1) * per_chunk) / 16, ((8 * h + 2) * per_chunk) / 16,
          ((8 * h + 3) * per_chunk) / 16, ((8 * h + 4) * per_chunk) / 16, ((8 * h + 5) * per_chunk) / 16,
          ((8 * h + 6) * per_chunk) / 16, ((8 * h + 7) * per_chunk) / 16);
      const __m256 scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(groups, idx),
                                         _mm256_loadu_ps(reinterpret_cast<const float*>(x + 192) + 8 * h));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
    }
  }
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}

#else
template <int G>
inline float dot_row(const uint8_t* w, const at::Half* s, const uint8_t* xp, int64_t chunks) {
  float total = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* x = xp + c * kXBytes;
    const int8_t* even = reinterpret_cast<const int8_t*>(x);
    const int8_t* odd = even + 64;
    const int32_t* corr = reinterpret_cast<const int32_t*>(x + 128);
    const float* xscale = reinterpret_cast<const float*>(x + 192);
    for (int lane = 0; lane < 16; ++lane) {
      int32_t dot = corr[lane];
      for (int t = 0; t < 4; ++t) {
        const uint8_t b = w[c * 64 + 4 * lane + t];
        dot += (b & 0xF) * even[4 * lane + t] + (b >> 4) * odd[4 * lane + t];
      }
      total += static_cast<float>(dot) * group_scale_lane<G>(s + c * (kChunk / G), lane) * xscale[lane];
    }
  }
  return total;
}
#endif

#if !SG_AVX512_VNNI
template <int G, int R, int MT>
inline void dot_tile(const uint8_t* w, int64_t w_stride, const at::Half* s, int64_t s_stride,
                     const uint8_t* xp, int64_t x_stride, int64_t chunks, float* out) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      out[m * R + r] = dot_row<G>(w + r * w_stride, s + r * s_stride, xp + m * x_stride, chunks);
}
#endif

// out[m * R + r] for the MT (1-4) activation rows from m: the tile size as a template argument.
template <int G, int R>
inline void dot_rows_of(int MT, const uint8_t* w, int64_t w_stride, const at::Half* s, int64_t s_stride,
                        const uint8_t* xp, int64_t x_stride, int64_t chunks, float* out) {
  switch (MT) {
    case 4: dot_tile<G, R, 4>(w, w_stride, s, s_stride, xp, x_stride, chunks, out); break;
    case 3: dot_tile<G, R, 3>(w, w_stride, s, s_stride, xp, x_stride, chunks, out); break;
    case 2: dot_tile<G, R, 2>(w, w_stride, s, s_stride, xp, x_stride, chunks, out); break;
    default: dot_tile<G, R, 1>(w, w_stride, s, s_stride, xp, x_stride, chunks, out);
  }
}

template <int G>
void run(const float* x, int64_t M, int64_t K, const uint8_t* w, const at::Half* s, const float* bias,
         int64_t N, float* y) {
  const int64_t chunks = K / kChunk;
  at::Tensor prepared = at::empty({M, chunks * kXBytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* xp = prepared.data_ptr<uint8_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) prepare_row(x + m * K, K, xp + m * chunks * kXBytes);
  });
  const int64_t row_bytes = K / 2, row_groups = K / G;
  // At least ~32 KB of weights per task: the threads' fixed cost stays small beside the stream.
  const int64_t grain = std::max<int64_t>(1, 32768 / row_bytes);
  constexpr int64_t kRowTile = 32;  // activation rows per pass over a block of weight rows (prefill)
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // The band is read as two sequential streams, one per half: pass i takes row i of each half (the two
    // weight rows that share each activation load). See float_linear.cpp's run_rows for why.
    const int64_t half = (n1 - n0) / 2;
    const int64_t x_stride = chunks * kXBytes;
    for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
      const int64_t m1 = std::min(M, m0 + kRowTile);
      for (int64_t i = 0; i < half; ++i) {
        const int64_t n = n0 + i, n2 = n0 + half + i;
        for (int64_t m = m0; m < m1; m += 4) {  // up to four activation rows share each weight load
          const int mt = static_cast<int>(std::min<int64_t>(4, m1 - m));
          float out[8];
          dot_rows_of<G, 2>(mt, w + n * row_bytes, half * row_bytes, s + n * row_groups, half * row_groups,
                            xp + m * x_stride, x_stride, chunks, out);
          for (int t = 0; t < mt; ++t) {
            y[(m + t) * N + n] = out[2 * t] + (bias ? bias[n] : 0.f);
            y[(m + t) * N + n2] = out[2 * t + 1] + (bias ? bias[n2] : 0.f);
          }
        }
      }
      for (int64_t n = n0 + 2 * half; n < n1; ++n) {  // an odd band's last row
        for (int64_t m = m0; m < m1; m += 4) {
          const int mt = static_cast<int>(std::min<int64_t>(4, m1 - m));
          float out[4];
          dot_rows_of<G, 1>(mt, w + n * row_bytes, row_bytes, s + n * row_groups, row_groups, xp + m * x_stride,
                            x_stride, chunks, out);
          for (int t = 0; t < mt; ++t) y[(m + t) * N + n] = out[t] + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// int8: weights (N, K) int8 with one float scale per row (model/quantize.py's Int8Linear), read as stored.
// The activation is quantized to int8 per 32 columns as for int4; a chunk is 64 columns (64 bytes of
// weights). u8 x s8 multiply-adds need one unsigned side: as llama.cpp's Q8_0 product does, |x| is the
// unsigned operand and each weight takes the sign of its x (products and sums unchanged). Lane i of a
// chunk sums columns 4i .. 4i + 3: activation block i / 8.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kChunk8 = 64;
constexpr int64_t kXBytes8 = 192;  // per chunk: 64 |x| (uint8), 64 x (int8, for the signs), 16 float lane scales

void prepare_row8(const float* x, int64_t K, uint8_t* out) {
  for (int64_t c = 0; c < K / kChunk8; ++c) {
    const float* xc = x + c * kChunk8;
    uint8_t* mag = out + c * kXBytes8;
    int8_t* q = reinterpret_cast<int8_t*>(mag + 64);
    float* scale = reinterpret_cast<float*>(mag + 128);
    for (int b = 0; b < 2; ++b) {
      float s, inv;
      block_scale(xc + 32 * b, s, inv);
      for (int k = 0; k < 32; ++k) {
        const int v = inv > 0.f ? static_cast<int>(std::nearbyint(xc[32 * b + k] * inv)) : 0;
        q[32 * b + k] = static_cast<int8_t>(v);
        mag[32 * b + k] = static_cast<uint8_t>(v < 0 ? -v : v);
      }
      for (int l = 0; l < 8; ++l) scale[8 * b + l] = s;
    }
  }
}

// R weight rows w_stride bytes apart against one prepared activation row: out[r] = row r · x.
template <int R>
inline void dot_rows8(const int8_t* w, int64_t w_stride, int64_t K, const uint8_t* xp, float* out) {
  const int64_t chunks = K / kChunk8;
#if SG_AVX512_VNNI
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* x = xp + c * kXBytes8;
    const __m512i mag = _mm512_loadu_si512(x);
    const __mmask64 negative = _mm512_movepi8_mask(_mm512_loadu_si512(x + 64));
    const __m512 xscale = _mm512_loadu_ps(reinterpret_cast<const float*>(x + 128));
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + r * w_stride + c * kChunk8;
      _mm_prefetch(reinterpret_cast<const char*>(wr + SG_PREFETCH), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(wr);
      const __m512i signed_w = _mm512_mask_sub_epi8(v, negative, zero, v);  // -w where x < 0
      const __m512i dot = _mm512_dpbusd_epi32(zero, mag, signed_w);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xscale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif SG_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* x = xp + c * kXBytes8;
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * w_stride + c * kChunk8 + 32 * h));
        const __m256i signed_w = _mm256_sign_epi8(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 + 32 * h)));
        // |x| <= 127 and |w| <= 127: a pair of products fits int16 (2 · 127 · 127)
        const __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * h)), signed_w);
        const __m256i dot = _mm256_madd_epi16(p, ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(reinterpret_cast<const float*>(x + 128) + 8 * h),
                              acc);
      }
    }
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    out[r] = _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
  }
#else
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* x = xp + c * kXBytes8;
      const int8_t* q = reinterpret_cast<const int8_t*>(x + 64);
      const float* xscale = reinterpret_cast<const float*>(x + 128);
      for (int lane = 0; lane < 16; ++lane) {
        int32_t dot = 0;
        for (int t = 0; t < 4; ++t) dot += q[4 * lane + t] * w[r * w_stride + c * kChunk8 + 4 * lane + t];
        total += static_cast<float>(dot) * xscale[lane];
      }
    }
    out[r] = total;
  }
#endif
}

void run8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* wscale, const float* bias, int64_t N,
          float* y) {
  const int64_t chunks = K / kChunk8;
  at::Tensor prepared = at::empty({M, chunks * kXBytes8}, at::TensorOptions().dtype(at::kByte));
  uint8_t* xp = prepared.data_ptr<uint8_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) prepare_row8(x + m * K, K, xp + m * chunks * kXBytes8);
  });
  const int64_t grain = std::max<int64_t>(1, 32768 / K);
  constexpr int64_t kRowTile = 32;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const int64_t half = (n1 - n0) / 2;  // two sequential streams per band, as int4's run reads them
    for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
      const int64_t m1 = std::min(M, m0 + kRowTile);
      for (int64_t i = 0; i < half; ++i) {
        const int64_t n = n0 + i, n2 = n0 + half + i;
        for (int64_t m = m0; m < m1; ++m) {
          float out[2];
          dot_rows8<2>(w + n * K, half * K, K, xp + m * chunks * kXBytes8, out);
          y[m * N + n] = out[0] * wscale[n] + (bias ? bias[n] : 0.f);
          y[m * N + n2] = out[1] * wscale[n2] + (bias ? bias[n2] : 0.f);
        }
      }
      for (int64_t n = n0 + 2 * half; n < n1; ++n) {
        for (int64_t m = m0; m < m1; ++m) {
          float out[1];
          dot_rows8<1>(w + n * K, K, K, xp + m * chunks * kXBytes8, out);
          y[m * N + n] = out[0] * wscale[n] + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

}  // namespace

// What every entry point does around its kernel (declared in kernels.h), in C++ because a decode step calls
// them ~50 times a token (the same steps in Python cost more than a small product): x (..., K) of any float
// dtype as a contiguous float32 (M, K), the bias as float32, and the result back in x's shape and dtype.
at::Tensor as_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), "x: (..., K) floating point");
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
}

const float* bias_of(const c10::optional<at::Tensor>& bias, int64_t N, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == N && at::isFloatingType(bias->scalar_type()), "bias: (N,) floating point");
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

at::Tensor shaped_like(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = y.view(sizes);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// y (M, N) = x (M, K) · Wᵀ + b for weight (N, K/2) uint8, scale (N, K/G) float16: checked, then the kernel.
void int4_rows(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const at::Tensor& scale,
               const float* bias, int64_t group_size, float* y) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous(), "weight: (N, K/2) uint8");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.is_contiguous(), "scale: (N, K/G) float16");
  const int64_t N = weight.size(0);
  TORCH_CHECK(K % kChunk == 0, "int4_linear: K must be a multiple of 128, got ", K);
  TORCH_CHECK(weight.size(1) * 2 == K, "int4_linear: weight has ", weight.size(1), " bytes a row for K = ", K);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "group size 32, 64 or 128");
  TORCH_CHECK(scale.size(0) == N && scale.size(1) * group_size == K, "int4_linear: scale shape");
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const at::Half* s = scale.data_ptr<at::Half>();
  if (group_size == 32) run<32>(x, M, K, w, s, bias, N, y);
  else if (group_size == 64) run<64>(x, M, K, w, s, bias, N, y);
  else run<128>(x, M, K, w, s, bias, N, y);
}

// y (M, N) = x (M, K) · Wᵀ + b for weight (N, K) int8, scale (N,) float32: checked, then the kernel.
void int8_rows(const float* x, int64_t M, int64_t K, const at::Tensor& weight, const at::Tensor& scale,
               const float* bias, float* y) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(), "weight: (N, K) int8");
  const int64_t N = weight.size(0);
  TORCH_CHECK(K % kChunk8 == 0, "int8_linear: K must be a multiple of 64, got ", K);
  TORCH_CHECK(weight.size(1) == K, "int8_linear: weight has ", weight.size(1), " columns for K = ", K);
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale: (N,) float32");
  run8(x, M, K, weight.data_ptr<int8_t>(), scale.data_ptr<float>(), bias, N, y);
}

// x (..., K) float, weight (N, K/2) uint8, scale (N, K/G) float16, bias (N,) or None -> (..., N) in x's dtype.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, int64_t group_size) {
  return product_of_rows(x_in, weight.size(0), bias, [&](const float* x, int64_t M, int64_t K, const float* b, float* y) {
    int4_rows(x, M, K, weight, scale, b, group_size, y);
  });
}

// x (..., K) float, weight (N, K) int8, scale (N,) float32, bias (N,) or None -> (..., N) in x's dtype.
at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return product_of_rows(x_in, weight.size(0), bias, [&](const float* x, int64_t M, int64_t K, const float* b, float* y) {
    int8_rows(x, M, K, weight, scale, b, y);
  });
}

std::string instruction_set() {
#if SG_AVX512_VNNI
  return "avx512_vnni";
#elif SG_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}
