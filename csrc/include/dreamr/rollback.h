// Step-level KV-cache rollback over all layers at once, in transformers' cache layout.
//
// Every cache tensor is [B, H_kv, T, D]. Row b keeps positions [0, lengths[b]); where a copy is asked
// for, it then receives the span [src_start, src_start + n) of row src at position lengths[b] (FPSR's
// clean fallback: the target branch's step becomes the main sequence's next step). Positions from a row's
// new length up to the longest new length in the batch are zeroed, so the dead span holds no leftover
// step (deterministic contents; attention must still mask it); positions past the longest new length are
// left alone, since the caller crops the time axis there (DynamicCache.crop) and zeroing them would be
// wasted memory traffic. Sources are never written by the same call (checked on the host; see plan_row
// for device-held values), so the result does not depend on the order in which rows are processed.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && !defined(__CUDACC__)
#include <emmintrin.h>
#define DREAMR_STREAMING_STORES 1
#endif

#include "dreamr/common.h"

namespace dreamr {

// Sizes, and strides in elements: rows, heads and positions may be strided (a cache cropped by
// transformers holds views whose time axis is shorter than their storage); the head dimension is dense.
struct RollbackShape {
  int64_t batch, heads, time, head_dim;
  int64_t stride_batch, stride_head, stride_time;
};

// What row b of every tensor becomes. Values are clamped into range so that a device-side caller that
// skips the host check can never write out of bounds, and plans the host check refuses are made
// race-free: a row copying from itself, or from a row whose own copy_src_row names a row of the batch
// (a source that also receives a copy), copies nothing; a source span is clipped to what its row keeps
// ([0, lengths[src])), which no block writes. The CPU launcher raises on all of these instead (it can
// read the values), so only device-held plans on CUDA ever take these paths.
struct RowPlan {
  int64_t keep;       // positions [0, keep) stay
  int64_t src_row;    // -1: no copy
  int64_t src_start;  // first source position
  int64_t copied;     // positions [keep, keep + copied) come from src_row
};

DREAMR_HOST_DEVICE int64_t clamp_index(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

DREAMR_HOST_DEVICE RowPlan plan_row(int64_t b, const RollbackShape& s, const int64_t* lengths, const int64_t* src_row,
                                    const int64_t* src_start, const int64_t* copy_length) {
  RowPlan p{clamp_index(lengths[b], 0, s.time), -1, 0, 0};
  if (src_row == nullptr || src_row[b] < 0 || src_row[b] >= s.batch) return p;
  const int64_t src = src_row[b];
  const bool source_receives = src_row[src] >= 0 && src_row[src] < s.batch;
  if (src == b || source_receives) return p;  // invalid plan: no copy rather than a read racing a write
  const int64_t src_keep = clamp_index(lengths[src], 0, s.time);
  p.src_row = src;
  p.src_start = clamp_index(src_start[b], 0, src_keep);
  const int64_t n = clamp_index(copy_length[b], 0, src_keep - p.src_start);
  p.copied = clamp_index(n, 0, s.time - p.keep);
  return p;
}

// Longest new length over the batch: the end of the zeroed span of every row.
DREAMR_HOST_DEVICE int64_t longest_new_length(const RollbackShape& s, const int64_t* lengths, const int64_t* src_row,
                                              const int64_t* src_start, const int64_t* copy_length) {
  int64_t longest = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const RowPlan p = plan_row(b, s, lengths, src_row, src_start, copy_length);
    longest = p.keep + p.copied > longest ? p.keep + p.copied : longest;
  }
  return longest;
}

// Zeroes (src == nullptr) or copies n bytes at dst. Spans of a few KiB and more (a rolled-back step of one
// head) use non-temporal stores on x86: plain stores would first read every destination line into the
// cache (read-for-ownership), which for a rollback scattered over the whole cache doubles the memory
// traffic. The caller issues the store fence (stream_fence) before the spans may be read.
inline void write_span(char* dst, const char* src, int64_t n) {
#ifdef DREAMR_STREAMING_STORES
  constexpr int64_t kStreamingMin = 4096;
  if (n >= kStreamingMin) {
    const int64_t head = static_cast<int64_t>((16 - reinterpret_cast<std::uintptr_t>(dst) % 16) % 16);
    const int64_t body = (n - head) / 16, tail = n - head - body * 16;
    __m128i* out = reinterpret_cast<__m128i*>(dst + head);
    if (src == nullptr) {
      std::memset(dst, 0, head);
      const __m128i zero = _mm_setzero_si128();
      for (int64_t i = 0; i < body; ++i) _mm_stream_si128(out + i, zero);
      std::memset(dst + head + body * 16, 0, tail);
    } else {
      std::memcpy(dst, src, head);
      const __m128i* in = reinterpret_cast<const __m128i*>(src + head);
      for (int64_t i = 0; i < body; ++i) _mm_stream_si128(out + i, _mm_loadu_si128(in + i));
      std::memcpy(dst + head + body * 16, src + head + body * 16, tail);
    }
    return;
  }
#endif
  if (src == nullptr) {
    std::memset(dst, 0, n);
  } else {
    std::memcpy(dst, src, n);
  }
}

inline void stream_fence() {
#ifdef DREAMR_STREAMING_STORES
  _mm_sfence();
#endif
}

// CPU kernel for one (tensor, row): element_size bytes per element, any dtype; zeroes up to zero_end.
inline void rollback_row_cpu(char* tensor, int64_t element_size, const RollbackShape& s, int64_t b, const RowPlan& p,
                             int64_t zero_end) {
  const int64_t position_bytes = s.head_dim * element_size;
  const int64_t time_bytes = s.stride_time * element_size;
  const bool dense_time = s.stride_time == s.head_dim;  // positions back to back: one memcpy per span
  const int64_t end = p.keep + p.copied;
  for (int64_t h = 0; h < s.heads; ++h) {
    char* dst = tensor + (b * s.stride_batch + h * s.stride_head) * element_size;
    const char* src = tensor + (p.src_row * s.stride_batch + h * s.stride_head) * element_size;
    if (dense_time) {
      if (p.copied > 0) write_span(dst + p.keep * time_bytes, src + p.src_start * time_bytes, p.copied * time_bytes);
      if (zero_end > end) write_span(dst + end * time_bytes, nullptr, (zero_end - end) * time_bytes);
      continue;
    }
    for (int64_t t = 0; t < p.copied; ++t) {
      std::memcpy(dst + (p.keep + t) * time_bytes, src + (p.src_start + t) * time_bytes, position_bytes);
    }
    for (int64_t t = end; t < zero_end; ++t) std::memset(dst + t * time_bytes, 0, position_bytes);
  }
  stream_fence();
}

}  // namespace dreamr
