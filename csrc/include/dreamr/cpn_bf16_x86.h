// Verdict logits of bf16 hidden states against bf16 LM-head rows with AVX512-BF16 (VDPBF16PS), for CPUs
// that have it (x86-64 with avx512_bf16: Zen 4 and later, Cooper Lake and Sapphire Rapids and later).
//
// Each instruction multiplies 32 bf16 pairs exactly and accumulates them in float32, so the logits are
// float32 dot products of the stored bf16 values, as the generic path gets by widening both operands to
// float first: the same numbers up to summation order, without the widened [B, H] copy and with the
// verdict rows read once per 4 hidden rows. Plain C++ over raw pointers; host only; no torch.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && !defined(__CUDACC__) && defined(__GNUC__)
#include <immintrin.h>
#define DREAMR_HAVE_BF16_DOT_KERNEL 1
#endif

namespace dreamr {

#ifdef DREAMR_HAVE_BF16_DOT_KERNEL

// Whether this CPU runs the kernel below (checked once at run time; the build needs no -mavx512 flag).
inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

// logits[r * count + k] = dot(hidden[r, :], weight[token_ids[k], :]) for rows r in [row_begin, row_end),
// in float32. hidden: [B, H] bf16 bits with row stride hidden_stride (elements); weight: [V, H] bf16 bits
// with row stride weight_stride; both dense along H. Only call where cpu_has_avx512_bf16().
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void verdict_logits_bf16(
    const uint16_t* hidden, int64_t hidden_stride, const uint16_t* weight, int64_t weight_stride,
    const int64_t* token_ids, int64_t count, int64_t hidden_size, int64_t row_begin, int64_t row_end,
    float* logits) {
  constexpr int64_t kLanes = 32;  // bf16 values per 512-bit register
  const int64_t full = hidden_size / kLanes * kLanes;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (hidden_size - full)) - 1);
  constexpr int64_t kRows = 4;  // hidden rows per pass: each verdict row chunk is loaded once for four rows
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int64_t rows = row_end - r0 < kRows ? row_end - r0 : kRows;
    for (int64_t k = 0; k < count; ++k) {
      const uint16_t* w = weight + token_ids[k] * weight_stride;
      __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t i = 0; i < full; i += kLanes) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);
        for (int64_t r = 0; r < rows; ++r) {
          const __m512bh hv = (__m512bh)_mm512_loadu_si512(hidden + (r0 + r) * hidden_stride + i);
          acc[r] = _mm512_dpbf16_ps(acc[r], hv, wv);
        }
      }
      if (tail) {  // masked-off lanes load as zero and add nothing
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + full);
        for (int64_t r = 0; r < rows; ++r) {
          const __m512bh hv = (__m512bh)_mm512_maskz_loadu_epi16(tail, hidden + (r0 + r) * hidden_stride + full);
          acc[r] = _mm512_dpbf16_ps(acc[r], hv, wv);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // horizontal sum (not _mm512_reduce_add_ps: GCC 12 -Wall flags it)
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, acc[r]);
        float sum = 0.f;
        for (float lane : lanes) sum += lane;
        logits[(r0 + r) * count + k] = sum;
      }
    }
  }
}

#else

inline bool cpu_has_avx512_bf16() { return false; }

#endif

}  // namespace dreamr
