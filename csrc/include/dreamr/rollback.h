// Step-level KV-cache rollback and compaction over all layers at once, in transformers' cache layout.
//
// Rollback. Every cache tensor is [B, H_kv, T, D]. Row b keeps positions [0, lengths[b]); where a copy is
// asked for, it then receives the span [src_start, src_start + n) of row src at position lengths[b]
// (FPSR's clean fallback: the target branch's step becomes the main sequence's next step). Positions from
// a row's new length up to the longest new length in the batch are zeroed, so the dead span holds no
// leftover step (deterministic contents; attention must still mask it); positions past the longest new
// length are left alone, since the caller crops the time axis there (DynamicCache.crop) and zeroing them
// would be wasted memory traffic. Sources are never written by the same call (checked on the host; see
// plan_row for device-held values), so the result does not depend on the order in which rows are
// processed.
//
// Compaction (CompactPlan, below) moves entries within and between rows: what a row-to-row copy cannot
// express (FPSR's ragged batches close the column gaps their released rows and private verdict tokens
// leave; docs/architecture.md, mode "fpsr", hop 10).
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

// Compaction, in place. Output row i < rows of every tensor becomes, at positions [0, counts[i]), the
// positions columns[i, 0 .. counts[i]) of input row src_rows[i]; its positions [counts[i], longest count)
// are zeroed (as rollback's dead spans); later positions and rows [rows, B) are left alone (the caller
// crops them or never reads them). Entries columns[i, j] with j >= counts[i] are padding, never read.
//
// Order rules (checked on the host): src_rows strictly increasing, and each row's first counts[i] columns
// strictly increasing; with non-negative indices these give src_rows[i] >= i and columns[i, j] >= j. A
// pass over the rows front to back, and over the positions front to back within a row, then reads every
// entry before anything overwrites it. Across rows: row i reads row src_rows[i] >= i only, and the rows
// written before it are rows < i; its own writes land in row i, which every later row i' reads past
// (src_rows[i'] > src_rows[i] >= i). Inside a row that moves within itself (src_rows[i] == i): position j
// reads column columns[i, j] >= j, and the row's earlier writes were at positions < j. So the in-place
// result equals a gather from a copy of the cache taken before the call (dreamr.reference.kv_compact).
// The CPU runs exactly that pass per (tensor, head); the CUDA kernel runs it per (tensor, head) in one
// block, a chunk of positions at a time, all reads of a chunk before its writes (csrc/cuda/rollback.cu).
struct CompactPlan {
  int64_t rows;             // B': output rows [0, rows), rows <= B
  int64_t width;            // W: entries per row of columns, W <= T
  const int64_t* src_rows;  // [rows]
  const int64_t* columns;   // [rows, width], row-major
  const int64_t* counts;    // [rows], each in [0, width]
};

// Plan values clamped into range, so that a device-held plan (not checked) never reads or writes out of
// bounds; the host check refuses what these clamps would change.
DREAMR_HOST_DEVICE int64_t compact_count(const CompactPlan& p, int64_t i) {
  return clamp_index(p.counts[i], 0, p.width);
}
DREAMR_HOST_DEVICE int64_t compact_source_row(const CompactPlan& p, const RollbackShape& s, int64_t i) {
  return clamp_index(p.src_rows[i], 0, s.batch - 1);
}
DREAMR_HOST_DEVICE int64_t compact_column(const CompactPlan& p, const RollbackShape& s, int64_t i, int64_t j) {
  return clamp_index(p.columns[i * p.width + j], 0, s.time - 1);
}

// Longest new length: the end of every output row's zeroed span.
DREAMR_HOST_DEVICE int64_t longest_count(const CompactPlan& p) {
  int64_t longest = 0;
  for (int64_t i = 0; i < p.rows; ++i) longest = compact_count(p, i) > longest ? compact_count(p, i) : longest;
  return longest;
}

// CPU kernel for one (tensor, head): every output row in order (the order rules above make the pass
// safe in place). Runs of consecutive source columns move with one memmove where positions are back to
// back (a row moving left within itself overlaps its source); a run that would land where it is (an
// unchanged row prefix) is skipped.
inline void compact_head_cpu(char* tensor, int64_t element_size, const RollbackShape& s, int64_t h,
                             const CompactPlan& p, int64_t zero_end) {
  const int64_t position_bytes = s.head_dim * element_size;
  const int64_t time_bytes = s.stride_time * element_size;
  const bool dense_time = s.stride_time == s.head_dim;
  for (int64_t i = 0; i < p.rows; ++i) {
    const int64_t src_row = compact_source_row(p, s, i), n = compact_count(p, i);
    char* dst = tensor + (i * s.stride_batch + h * s.stride_head) * element_size;
    const char* src = tensor + (src_row * s.stride_batch + h * s.stride_head) * element_size;
    for (int64_t j = 0; j < n;) {
      const int64_t c = compact_column(p, s, i, j);
      int64_t run = 1;
      while (j + run < n && compact_column(p, s, i, j + run) == c + run) ++run;
      if (src_row != i || c != j) {
        if (dense_time) {
          std::memmove(dst + j * time_bytes, src + c * time_bytes, run * time_bytes);
        } else {
          // distinct positions never share bytes (position_bytes <= time_bytes): memcpy is safe
          for (int64_t k = 0; k < run; ++k) {
            std::memcpy(dst + (j + k) * time_bytes, src + (c + k) * time_bytes, position_bytes);
          }
        }
      }
      j += run;
    }
    if (dense_time) {
      if (zero_end > n) write_span(dst + n * time_bytes, nullptr, (zero_end - n) * time_bytes);
    } else {
      for (int64_t t = n; t < zero_end; ++t) std::memset(dst + t * time_bytes, 0, position_bytes);
    }
  }
  stream_fence();
}

}  // namespace dreamr
